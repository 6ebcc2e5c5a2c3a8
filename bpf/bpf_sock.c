/* cgroup socket hooks: services translated at the socket (connect, sendmsg, recvmsg,
 * getpeername), so pods reach backends without per-packet NAT. */
#include "lib/common.h"
