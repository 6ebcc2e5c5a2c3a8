/* Identity-based L3/L4 policy (reference §11). One LPM map holds every endpoint's entries:
 * the endpoint ID is part of the key instead of one map per endpoint, so creating an
 * endpoint never creates a map. */
#ifndef CILIUMPY_POLICY_H
#define CILIUMPY_POLICY_H

#include "common.h"
#include "drop_reasons.h"
#include "ipv4.h"
#include "maps.h"
#include "events.h"

#ifndef POLICY_MAP_SIZE
#define POLICY_MAP_SIZE 65536
#endif

/* Bits of policy_key matched exactly: sec_label (32) + endpoint_id (16) + egress (8). */
#define POLICY_PREFIX_STATIC 56
#define POLICY_PREFIX_FULL (POLICY_PREFIX_STATIC + 8 + 16)

#define POLICY_F_DENY 1

/* Policy-verdict match types, as Cilium's monitor reports them. */
#define POLICY_MATCH_NONE 0
#define POLICY_MATCH_L3_ONLY 1
#define POLICY_MATCH_L3_L4 2
#define POLICY_MATCH_L4_ONLY 3
#define POLICY_MATCH_ALL 4
#define POLICY_MATCH_L3_PROTO 5
#define POLICY_MATCH_PROTO_ONLY 6

/* The protocol and port follow the exact fields, so the LPM prefix can stop after the
 * protocol (any port) or inside the port (an aligned port block from an endPort range). */
struct policy_key {
	__u32 prefixlen;
	__u32 sec_label;   /* peer identity, 0 = any */
	__u16 endpoint_id;
	__u8 egress;       /* 0 ingress, 1 egress */
	__u8 protocol;     /* 0 = any */
	__be16 dport;      /* port, or the ICMP type for ICMP */
} __attribute__((packed));

struct policy_entry {
	__be16 proxy_port;
	__u8 flags;      /* POLICY_F_* */
	__u8 prefix_len; /* bits of protocol + port the entry matches: 0, 8 or 8 + port prefix */
	__u32 cookie;    /* set by the agent; names the rule in policy-verdict events */
	__u64 packets;
	__u64 bytes;
};

/* ciliumpy_policy: (endpoint, peer identity, direction, protocol, port prefix) -> allow/deny */
PINNED_MAP_F("lpm_trie", struct policy_key, struct policy_entry, ciliumpy_policy,
	     POLICY_MAP_SIZE, BPF_F_NO_PREALLOC);

static __always_inline __u8 policy_match_type(const struct policy_entry *e, int l3)
{
	if (e->prefix_len == 0)
		return l3 ? POLICY_MATCH_L3_ONLY : POLICY_MATCH_ALL;
	if (e->prefix_len == 8)
		return l3 ? POLICY_MATCH_L3_PROTO : POLICY_MATCH_PROTO_ONLY;
	return l3 ? POLICY_MATCH_L3_L4 : POLICY_MATCH_L4_ONLY;
}

/* Two lookups, as in Cilium: the peer's own identity, then the any-identity entries.
 * A deny in either wins; between allows the longer protocol/port prefix wins, and on a tie
 * the identity-specific entry. The agent folds allows that a same-identity deny covers into
 * denies before writing, so the longest match of one lookup is never an allow shadowing a
 * deny. Returns 0 or a negative drop reason; *match and *cookie describe the decision. */
static __always_inline int policy_lookup4(__u16 ep_id, __u32 remote_id, int egress,
					  const struct pkt4 *p, __u8 *match, __u32 *cookie)
{
	struct policy_key key = {};
	struct policy_entry *l3 = NULL, *l4, *win;

	key.prefixlen = POLICY_PREFIX_FULL;
	key.endpoint_id = ep_id;
	key.egress = egress;
	key.protocol = p->nexthdr;
	key.dport = p->policy_port;
	if (remote_id) {
		key.sec_label = remote_id;
		l3 = ciliumpy_policy.lookup(&key);
	}
	key.sec_label = 0;
	l4 = ciliumpy_policy.lookup(&key);

	if (l3 && (l3->flags & POLICY_F_DENY)) {
		win = l3;
		*match = policy_match_type(l3, 1);
	} else if (l4 && (l4->flags & POLICY_F_DENY)) {
		win = l4;
		*match = policy_match_type(l4, 0);
	} else if (l3 && (!l4 || l3->prefix_len >= l4->prefix_len)) {
		win = l3;
		*match = policy_match_type(l3, 1);
	} else if (l4) {
		win = l4;
		*match = policy_match_type(l4, 0);
	} else {
		*match = POLICY_MATCH_NONE;
		*cookie = 0;
		return -DROP_POLICY;
	}
	*cookie = win->cookie;
	__sync_fetch_and_add(&win->packets, 1);
	__sync_fetch_and_add(&win->bytes, p->len);
	return (win->flags & POLICY_F_DENY) ? -DROP_POLICY_DENY : 0;
}

/* Policy for a new connection in one direction of an endpoint. A direction without
 * enforcement allows everything and reports no verdict; an enforced one reports each
 * verdict, allowed or not. */
static __always_inline int policy_can_access4(struct __sk_buff *ctx,
					      const struct endpoint_info *ep, __u32 remote_id,
					      const struct pkt4 *p, int dir)
{
	__u32 enforce = dir == CT_EGRESS ? ENDPOINT_F_POLICY_EGRESS : ENDPOINT_F_POLICY_INGRESS;
	__u8 metric_dir = dir == CT_EGRESS ? METRIC_DIR_EGRESS : METRIC_DIR_INGRESS;
	__u8 match = POLICY_MATCH_NONE;
	__u32 cookie = 0;
	int ret;

	if (!(ep->flags & enforce))
		return 0;
	ret = policy_lookup4(ep->lxc_id, remote_id, dir == CT_EGRESS, p, &match, &cookie);
	send_policy_verdict_skb(ctx, ep->lxc_id, remote_id, p->policy_port, p->nexthdr,
				metric_dir, match, ret, cookie);
	return ret;
}

#endif /* CILIUMPY_POLICY_H */
