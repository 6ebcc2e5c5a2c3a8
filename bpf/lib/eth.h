/* Ethernet header parsing. */
#ifndef CILIUMPY_ETH_H
#define CILIUMPY_ETH_H

#include "common.h"
#include "drop_reasons.h"

#define ETH_P_ARP_BE 0x0608 /* htons(ETH_P_ARP) without a function call in constant context */

/* Returns the ethertype in network order, or a negative drop reason when the frame is too
 * short to hold an Ethernet header. */
static __always_inline int eth_load_proto(void *data, void *data_end, __be16 *proto)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -DROP_INVALID;
	*proto = eth->h_proto;
	return 0;
}

#endif /* CILIUMPY_ETH_H */
