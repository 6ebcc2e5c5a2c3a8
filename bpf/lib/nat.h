/* NAT for traffic through the node's devices: the translation table of NodePort,
 * LoadBalancer, externalIP and hostPort connections, the SNAT port allocator, and the
 * packet rewrites (tc through the skb helpers, XDP by direct access).
 *
 * ciliumpy_snat_v4_external holds two entries per translated connection, keyed by the
 * tuple exactly as a packet carries it (saddr, daddr, sport, dport of that packet; unlike
 * conntrack, nothing is swapped):
 *   TUPLE_F_OUT  the client's packet as it reaches the node (client -> frontend); the value
 *                is the tuple to rewrite it to (client or node:port -> backend).
 *   TUPLE_F_IN   the backend's reply as the node sees it (backend -> client for a local
 *                backend, backend -> node:allocated port after SNAT); the value is the
 *                tuple the client must see (frontend -> client).
 * So every packet of a connection is translated with one lookup, in either direction.
 * The map is an LRU: entries live as long as they are used and the oldest go first when it
 * fills up; `created` is when the mapping was made.
 */
#ifndef CILIUMPY_NAT_H
#define CILIUMPY_NAT_H

#include "common.h"
#include "drop_reasons.h"
#include "ipv4.h"
#include "l4.h"
/* struct ipv4_ct_tuple, TUPLE_F_*, and the CT sizes the NAT map follows */
#include "conntrack.h"

/* As in Cilium: NAT entries <= 2/3 of the conntrack entries (TCP + other). */
#ifndef SNAT_MAP_SIZE
#define SNAT_MAP_SIZE ((CT_MAP_SIZE_TCP + CT_MAP_SIZE_ANY) * 2 / 3)
#endif
/* Ports SNAT allocates from: above the kernel's default ephemeral range (32768-60999), so
 * a translated connection never takes the 4-tuple of a connection the node's own sockets
 * make to the same backend (nor does the reply lookup catch that socket's packets). A node
 * whose ip_local_port_range reaches into this range must keep it out (or reserve it). Ports
 * inside [NODEPORT_PORT_MIN, NODEPORT_PORT_MAX] are skipped when a configuration makes the
 * two ranges overlap. */
#ifndef SNAT_PORT_MIN
#define SNAT_PORT_MIN 61000
#endif
#ifndef SNAT_PORT_MAX
#define SNAT_PORT_MAX 65535
#endif
#ifndef NODEPORT_PORT_MIN
#define NODEPORT_PORT_MIN 30000
#endif
#ifndef NODEPORT_PORT_MAX
#define NODEPORT_PORT_MAX 32767
#endif
/* Random ports tried before giving up on a connection (NO_MAPPING_FOR_NAT_MASQUERADE). */
#ifndef SNAT_COLLISION_RETRIES
#define SNAT_COLLISION_RETRIES 32
#endif

#define NAT_F_SERVICE 1  /* a service connection: the destination was load-balanced */
#define NAT_F_SNAT 2     /* the source was translated to a node address and port */

struct ipv4_nat_entry {
	__u64 created;       /* seconds of CLOCK_MONOTONIC when the mapping was made */
	__u32 backend_id;    /* OUT entries of a service connection: the backend picked */
	__u16 rev_nat_index; /* the service */
	__u8 flags;          /* NAT_F_* */
	__u8 pad;
	__be32 to_saddr;     /* the packet's tuple after translation */
	__be32 to_daddr;
	__be16 to_sport;
	__be16 to_dport;
	__u32 pad2;
};

/* ciliumpy_snat_v4_external: packet tuple -> translated tuple, both directions of every
 * NodePort/LoadBalancer/externalIP/hostPort connection through the node's devices */
PINNED_MAP("lru_hash", struct ipv4_ct_tuple, struct ipv4_nat_entry, ciliumpy_snat_v4_external,
	   SNAT_MAP_SIZE);

/* The translation a packet gets: its new tuple. */
struct nat4_xlate {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

static __always_inline void snat4_tuple(struct ipv4_ct_tuple *t, __be32 saddr, __be32 daddr,
					__be16 sport, __be16 dport, __u8 nexthdr, __u8 flags)
{
	t->saddr = saddr;
	t->daddr = daddr;
	t->sport = sport;
	t->dport = dport;
	t->nexthdr = nexthdr;
	t->flags = flags;
}

static __always_inline struct ipv4_nat_entry *snat4_lookup(const struct pkt4 *p, __u8 dir_flag)
{
	struct ipv4_ct_tuple t = {};

	snat4_tuple(&t, p->saddr, p->daddr, p->sport, p->dport, p->nexthdr, dir_flag);
	return ciliumpy_snat_v4_external.lookup(&t);
}

static __always_inline void nat4_xlate_of(const struct ipv4_nat_entry *e, struct nat4_xlate *x)
{
	x->saddr = e->to_saddr;
	x->daddr = e->to_daddr;
	x->sport = e->to_sport;
	x->dport = e->to_dport;
}

/* Removes both entries of a connection, given its OUT entry. */
static __always_inline void snat4_delete(const struct pkt4 *p, const struct ipv4_nat_entry *out)
{
	struct ipv4_ct_tuple t = {};

	/* The reply's tuple is the translated forward tuple, reversed. */
	snat4_tuple(&t, out->to_daddr, out->to_saddr, out->to_dport, out->to_sport, p->nexthdr,
		    TUPLE_F_IN);
	ciliumpy_snat_v4_external.delete(&t);
	snat4_tuple(&t, p->saddr, p->daddr, p->sport, p->dport, p->nexthdr, TUPLE_F_OUT);
	ciliumpy_snat_v4_external.delete(&t);
}

static __always_inline __u16 snat4_random_port(void)
{
	return SNAT_PORT_MIN + bpf_get_prandom_u32() % (SNAT_PORT_MAX - SNAT_PORT_MIN + 1);
}

/* Records a translated connection: `p` is the client's packet, `x` what it becomes. With
 * NAT_F_SNAT the source port is allocated here: random ports of the SNAT range are tried
 * until one is free for (backend, node address) — the reply entry is inserted with
 * BPF_NOEXIST (insert), so two CPUs can never take the same port — and x->sport is set to it.
 * The OUT entry is written last: a packet that finds it finds the reply entry in place. */
static __always_inline int snat4_create(const struct pkt4 *p, struct nat4_xlate *x, __u8 flags,
					__u32 backend_id, __u16 rev_nat_index)
{
	struct ipv4_ct_tuple rt = {}, ot = {};
	struct ipv4_nat_entry rev = {}, fwd = {};
	__u64 now = bpf_mono_now();
	int i;

	/* The reply turns back into frontend -> client. */
	rev.created = now;
	rev.flags = flags;
	rev.rev_nat_index = rev_nat_index;
	rev.to_saddr = p->daddr;
	rev.to_daddr = p->saddr;
	rev.to_sport = p->dport;
	rev.to_dport = p->sport;
	snat4_tuple(&rt, x->daddr, x->saddr, x->dport, x->sport, p->nexthdr, TUPLE_F_IN);

	if (flags & NAT_F_SNAT) {
		for (i = 0; i < SNAT_COLLISION_RETRIES; i++) {
			__u16 port = snat4_random_port();

			if (port >= NODEPORT_PORT_MIN && port <= NODEPORT_PORT_MAX)
				continue;
			rt.dport = htons(port);
			if (ciliumpy_snat_v4_external.insert(&rt, &rev) == 0)
				break;
		}
		if (i == SNAT_COLLISION_RETRIES)
			return -DROP_NAT_NO_MAPPING;
		x->sport = rt.dport;
	} else if (ciliumpy_snat_v4_external.update(&rt, &rev) < 0) {
		return -DROP_NAT_NO_MAPPING;
	}

	fwd.created = now;
	fwd.flags = flags;
	fwd.backend_id = backend_id;
	fwd.rev_nat_index = rev_nat_index;
	fwd.to_saddr = x->saddr;
	fwd.to_daddr = x->daddr;
	fwd.to_sport = x->sport;
	fwd.to_dport = x->dport;
	snat4_tuple(&ot, p->saddr, p->daddr, p->sport, p->dport, p->nexthdr, TUPLE_F_OUT);
	if (ciliumpy_snat_v4_external.update(&ot, &fwd) < 0) {
		ciliumpy_snat_v4_external.delete(&rt);
		return -DROP_NAT_NO_MAPPING;
	}
	return 0;
}

/* Offset of the L4 checksum from the start of the L4 header (TCP and UDP only). */
static __always_inline __u32 nat4_l4_csum_off(__u8 nexthdr)
{
	return nexthdr == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check);
}

/* Rewrites addresses and ports of a TCP/UDP packet in an skb. The checksum helpers keep
 * every skb checksum state right: CHECKSUM_PARTIAL packets of local sockets (whose L4
 * field holds only the pseudo-header sum, as veth delivers them) get the address change
 * alone, full checksums get both; a UDP checksum of 0 (none) stays 0. */
static __always_inline int nat4_rewrite_skb(struct __sk_buff *ctx, const struct pkt4 *p,
					    const struct nat4_xlate *x)
{
	__u32 csum_off = p->l4_off + nat4_l4_csum_off(p->nexthdr);
	__u64 mangled = p->nexthdr == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be32 old_addr[2] = { p->saddr, p->daddr };
	__be32 new_addr[2] = { x->saddr, x->daddr };
	__be16 old_port[2] = { p->sport, p->dport };
	__be16 new_port[2] = { x->sport, x->dport };
	__s64 sum;

	if (old_addr[0] != new_addr[0] || old_addr[1] != new_addr[1]) {
		sum = bpf_csum_diff(old_addr, sizeof(old_addr), new_addr, sizeof(new_addr), 0);
		if (sum < 0)
			return -DROP_CSUM_L3;
		if (bpf_skb_store_bytes(ctx, ETH_HLEN + offsetof(struct iphdr, saddr), new_addr,
					sizeof(new_addr), 0) < 0)
			return -DROP_WRITE_ERROR;
		if (bpf_l3_csum_replace(ctx, ETH_HLEN + offsetof(struct iphdr, check), 0, sum, 0) < 0)
			return -DROP_CSUM_L3;
		if (bpf_l4_csum_replace(ctx, csum_off, 0, sum, BPF_F_PSEUDO_HDR | mangled) < 0)
			return -DROP_CSUM_L4;
	}
	if (old_port[0] != new_port[0] || old_port[1] != new_port[1]) {
		__u32 from = *(__u32 *)old_port, to = *(__u32 *)new_port;

		if (bpf_l4_csum_replace(ctx, csum_off, from, to, sizeof(__u32) | mangled) < 0)
			return -DROP_CSUM_L4;
		if (bpf_skb_store_bytes(ctx, p->l4_off, new_port, sizeof(new_port), 0) < 0)
			return -DROP_WRITE_ERROR;
	}
	return 0;
}

static __always_inline __u16 csum_fold_u32(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* The same rewrite in XDP, by direct access: packets reach XDP as they came off the wire,
 * with complete checksums, which are updated incrementally. */
static __always_inline int nat4_rewrite_xdp(struct xdp_md *ctx, const struct pkt4 *p,
					    const struct nat4_xlate *x)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip4 = data + ETH_HLEN;
	__be16 *ports = data + (p->l4_off & 0x7f);
	__u32 old[3], new[3];
	__u16 *check;
	__s64 sum;

	if ((void *)(ip4 + 1) > data_end || (void *)(ports + 2) > data_end)
		return -DROP_INVALID;
	if (p->nexthdr == IPPROTO_TCP) {
		struct tcphdr *th = (void *)ports;

		if ((void *)(th + 1) > data_end)
			return -DROP_CT_INVALID_HDR;
		check = (__u16 *)&th->check;
	} else {
		struct udphdr *uh = (void *)ports;

		if ((void *)(uh + 1) > data_end)
			return -DROP_CT_INVALID_HDR;
		check = (__u16 *)&uh->check;
	}

	old[0] = ip4->saddr;
	old[1] = ip4->daddr;
	old[2] = *(__u32 *)ports;
	new[0] = x->saddr;
	new[1] = x->daddr;
	((__be16 *)&new[2])[0] = x->sport;
	((__be16 *)&new[2])[1] = x->dport;

	sum = bpf_csum_diff(old, 8, new, 8, (__u16)~ip4->check);
	if (sum < 0)
		return -DROP_CSUM_L3;
	ip4->check = csum_fold_u32(sum);
	if (p->nexthdr != IPPROTO_UDP || *check) {
		sum = bpf_csum_diff(old, sizeof(old), new, sizeof(new), (__u16)~*check);
		if (sum < 0)
			return -DROP_CSUM_L4;
		*check = csum_fold_u32(sum);
		if (p->nexthdr == IPPROTO_UDP && *check == 0)
			*check = 0xffff;
	}
	ip4->saddr = new[0];
	ip4->daddr = new[1];
	*(__u32 *)ports = new[2];
	return 0;
}

#endif /* CILIUMPY_NAT_H */
