/* CIDR deny list checked by XDP on the node's devices before anything else sees a packet. */
#ifndef CILIUMPY_PREFILTER_H
#define CILIUMPY_PREFILTER_H

#include "common.h"

#ifndef PREFILTER_MAP_SIZE
#define PREFILTER_MAP_SIZE 16384
#endif

struct prefilter4_key {
	__u32 prefixlen;
	__be32 addr;
};

/* ciliumpy_prefilter4: source CIDRs dropped at XDP (value unused, 1) */
PINNED_MAP_F("lpm_trie", struct prefilter4_key, __u8, ciliumpy_prefilter4, PREFILTER_MAP_SIZE,
	     BPF_F_NO_PREALLOC);

static __always_inline int prefilter4_denied(__be32 saddr)
{
	struct prefilter4_key key = { .prefixlen = 32, .addr = saddr };

	return ciliumpy_prefilter4.lookup(&key) != NULL;
}

#endif /* CILIUMPY_PREFILTER_H */
