/* The endpoint map: every pod endpoint on this node, keyed by its IP. */
#ifndef CILIUMPY_MAPS_H
#define CILIUMPY_MAPS_H

#include "common.h"

#define ENDPOINT_KEY_IPV4 1

#define ENDPOINT_F_HOST 1            /* the entry is one of the node's own addresses */
#define ENDPOINT_F_POLICY_INGRESS 2  /* ingress is enforced: what no entry allows is dropped */
#define ENDPOINT_F_POLICY_EGRESS 4   /* egress is enforced */

#ifndef ENDPOINTS_MAP_SIZE
#define ENDPOINTS_MAP_SIZE 65535
#endif

struct endpoint_key {
	union {
		__be32 ip4;
		__u8 ip6[16]; /* room for IPv6, as in Cilium's layout */
	};
	__u8 family;
	__u8 key;
	__u8 cluster_id;
	__u8 pad;
};

struct endpoint_info {
	__u32 ifindex;   /* host-side veth in the node namespace */
	__u16 unused;
	__u16 lxc_id;    /* endpoint ID, the policy map's endpoint field */
	__u32 flags;     /* ENDPOINT_F_* */
	__u32 pad;
	__u64 mac;       /* pod-side MAC */
	__u64 node_mac;  /* host-side MAC */
	__u32 sec_id;    /* the endpoint's security identity */
	__u32 pad2;
};

/* ciliumpy_lxc: endpoint IP -> endpoint_info for every local endpoint */
PINNED_MAP("hash", struct endpoint_key, struct endpoint_info, ciliumpy_lxc, ENDPOINTS_MAP_SIZE);

static __always_inline struct endpoint_info *lookup_ip4_endpoint(__be32 ip4)
{
	struct endpoint_key key = {};

	key.ip4 = ip4;
	key.family = ENDPOINT_KEY_IPV4;
	return ciliumpy_lxc.lookup(&key);
}

#endif /* CILIUMPY_MAPS_H */
