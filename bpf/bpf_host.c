/* tc programs on the node's own devices (the uplink in the node namespace): NodePort,
 * LoadBalancer and externalIPs for traffic entering the node, SNAT to the node address
 * toward remote backends and its reversal on the way back. */
#include "lib/common.h"
