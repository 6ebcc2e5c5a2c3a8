/* IP/CIDR to security identity. */
#ifndef CILIUMPY_IPCACHE_H
#define CILIUMPY_IPCACHE_H

#include "common.h"

#ifndef IPCACHE_MAP_SIZE
#define IPCACHE_MAP_SIZE 512000
#endif

#define IPCACHE_FAMILY_IPV4 1
/* Bits of ipcache_key between prefixlen and the address that every lookup matches exactly. */
#define IPCACHE_PREFIX_STATIC 32

struct ipcache_key {
	__u32 prefixlen; /* IPCACHE_PREFIX_STATIC + the address prefix */
	__u16 pad1;
	__u8 cluster_id;
	__u8 family;
	union {
		__be32 ip4;
		__u8 ip6[16];
	};
};

struct remote_endpoint_info {
	__u32 sec_identity;
	__be32 tunnel_endpoint;
	__u16 node_id;
	__u8 key;
	__u8 flags;
};

/* ciliumpy_ipcache: longest-prefix match from IP/CIDR to identity, for every peer we know */
PINNED_MAP_F("lpm_trie", struct ipcache_key, struct remote_endpoint_info, ciliumpy_ipcache,
	     IPCACHE_MAP_SIZE, BPF_F_NO_PREALLOC);

/* Identity of an IPv4 peer; addresses nobody told us about are the world. */
static __always_inline __u32 ipcache4_lookup_identity(__be32 addr)
{
	struct ipcache_key key = {};
	struct remote_endpoint_info *info;

	key.prefixlen = IPCACHE_PREFIX_STATIC + 32;
	key.family = IPCACHE_FAMILY_IPV4;
	key.ip4 = addr;
	info = ciliumpy_ipcache.lookup(&key);
	return info ? info->sec_identity : IDENTITY_WORLD;
}

#endif /* CILIUMPY_IPCACHE_H */
