/* North-south load balancing on the node's devices (kube-proxy replacement, reference §6):
 * NodePort, LoadBalancer IPs, externalIPs and hostPorts for traffic entering the node.
 *
 * A client's first packet to a frontend (external scope) picks a backend (only node-local
 * ones with externalTrafficPolicy=Local; session affinity by client IP) and is recorded in
 * the NAT table (nat.h), which every later packet of the connection, in both directions,
 * is translated by:
 *   - local backend (a pod of this node, or an address of the node itself): DNAT only, the
 *     stack delivers the packet and the pod sees the client's address. The reply leaves
 *     through a device's tc egress (cil_to_netdev), which puts the frontend back as source.
 *   - remote backend: DNAT and SNAT to the node's address toward the backend (source chosen
 *     by the FIB) and a port from the SNAT allocator, then sent out by the FIB result
 *     (bpf_redirect with the MACs it returned, or bpf_redirect_neigh when the neighbour is
 *     not resolved yet). The reply comes back to node:port through a device's tc ingress,
 *     is turned into frontend -> client there and sent out the same way. Neither direction
 *     may go through the stack: it would drop a packet from one of its own addresses as a
 *     martian.
 * A frontend without backends is refused with an ICMP port unreachable from the frontend
 * (for TCP as for UDP: the client's connect() fails with ECONNREFUSED at once), or dropped
 * when compiled with SERVICE_NO_BACKEND_DROP; either way it is reported as a drop with
 * SERVICE_BACKEND_NOT_FOUND (158).
 *
 * NodePort frontends: the control plane may write one frontend per node address, or one
 * wildcard frontend 0.0.0.0:nodePort (also a hostPort without hostIP), which serves every
 * address the endpoint map marks as the host's (ENDPOINT_F_HOST: the agent's --node-ip
 * addresses). An exact frontend wins.
 *
 * With ENABLE_NODEPORT_ACCELERATION the XDP program (bpf_xdp.c) runs the same logic first:
 * it translates what it can finish itself (FIB lookup resolved, so XDP_TX/XDP_REDIRECT; a
 * local backend, so XDP_PASS after the rewrite) and passes everything else untouched to tc.
 * What XDP translated carries a metadata word, so tc does not look it up again. XDP
 * rewrites checksums as complete ones, as packets off a wire carry them; on a veth, a peer's
 * local socket sends them with only the pseudo-header summed, so there the senders need tx
 * checksum offload off (and native XDP_TX needs an XDP program on the peer for its frames
 * to be picked up). The reject reply is built in XDP unless the buffer cannot grow to it;
 * then tc builds it.
 *
 * Not handled (yet): IPv6; fragments and ICMP errors quoting a translated connection (they
 * pass untranslated, so PMTU discovery toward a remote backend does not work through it);
 * entries have no lifetime of their own (LRU, plus rebalancing when the backend is gone).
 */
#ifndef CILIUMPY_NODEPORT_H
#define CILIUMPY_NODEPORT_H

#include "common.h"
#include "drop_reasons.h"
#include "eth.h"
#include "ipv4.h"
#include "l4.h"
#include "maps.h"
#include "ipcache.h"
#include "metrics.h"
#include "events.h"
#include "lb.h"
#include "nat.h"

/* --service-no-backend-response: 0 reject (ICMP), 1 drop. */
#ifndef SERVICE_NO_BACKEND_DROP
#define SERVICE_NO_BACKEND_DROP 0
#endif
/* --bpf-lb-acceleration native: XDP does NodePort before tc. */
#ifndef ENABLE_NODEPORT_ACCELERATION
#define ENABLE_NODEPORT_ACCELERATION 0
#endif

/* BPF_FIB_LOOKUP_SRC (kernel 6.7): the lookup also returns the source address the node
 * would use toward the destination. Spelled out: the uapi headers BCC compiles against
 * may predate it. */
#define NODEPORT_FIB_LOOKUP_SRC (1U << 4)
#define NODEPORT_AF_INET 2

/* bpf_redirect_neigh with the kernel's signature: BCC 0.26 declares it without `plen`. */
static long (*nodeport_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				       __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

/* Frontend types served for traffic from outside (a ClusterIP is not: Cilium's
 * bpf-lb-external-clusterip defaults to false). */
#define SVC_F_NORTH_SOUTH (SVC_F_NODEPORT | SVC_F_LOADBALANCER | SVC_F_EXTERNAL_IPS | SVC_F_HOSTPORT)

/* XDP -> tc metadata: "translated by XDP already". */
#define NODEPORT_XDP_MARK 0x4e505844

/* What to do with a packet. */
enum {
	NP_PASS = 0,    /* not a NodePort packet (or, in XDP, one tc must handle): untouched */
	NP_LOCAL = 1,   /* translate; the stack delivers it */
	NP_FORWARD = 2, /* translate; send it out by the FIB result */
};

struct nodeport4_state {
	struct nat4_xlate x;        /* the packet's new tuple */
	__u8 no_neigh;              /* NP_FORWARD from tc: the neighbour is not resolved */
	__u8 pad[3];
	struct bpf_fib_lookup fib;  /* NP_FORWARD: device and MACs */
};

static __always_inline bool nodeport4_is_syn(const struct pkt4 *p)
{
	return p->nexthdr == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* The frontend a packet from outside is addressed to; *fe_addr is the address its slots
 * are keyed by (0 for the wildcard NodePort frontend). */
static __always_inline struct lb4_service *nodeport4_lookup_service(const struct pkt4 *p,
								    __be32 *fe_addr)
{
	struct lb4_service *svc = lb4_lookup_service(p->daddr, p->dport, p->nexthdr, false);
	struct endpoint_info *host;

	if (svc && (svc->flags & SVC_F_NORTH_SOUTH)) {
		*fe_addr = p->daddr;
		return svc;
	}
	host = lookup_ip4_endpoint(p->daddr);
	if (!host || !(host->flags & ENDPOINT_F_HOST))
		return NULL;
	svc = lb4_lookup_service(0, p->dport, p->nexthdr, false);
	if (!svc || !(svc->flags & (SVC_F_NODEPORT | SVC_F_HOSTPORT)))
		return NULL;
	*fe_addr = 0;
	return svc;
}

static __always_inline __u32 nodeport4_select_backend(const struct pkt4 *p, __be32 fe_addr,
						      const struct lb4_service *svc)
{
	__u32 hash = lb4_hash(p->saddr, p->sport, p->dport, p->nexthdr);
	/* The u64 whose memory image starts with the client's address. */
	__u64 client = (__u32)p->saddr;

	if (svc->flags & SVC_F_EXT_LOCAL)
		return lb4_pick_local_backend(fe_addr, p->dport, p->nexthdr, LB_SCOPE_EXTERNAL, svc,
					      hash, client, false);
	return lb4_pick_backend(fe_addr, p->dport, p->nexthdr, LB_SCOPE_EXTERNAL, svc, hash, client,
				false);
}

/* Where n->x goes next, by the FIB of the node's namespace. NP_FORWARD: n->fib holds the
 * device (and the MACs unless n->no_neigh); with `select_src`, fib.ipv4_src is the node
 * address toward it. NP_LOCAL: the destination is the node itself. XDP returns NP_PASS for
 * anything it cannot send at once, so tc handles the packet. */
static __always_inline int nodeport4_fib(void *ctx, __u32 ifindex, struct nodeport4_state *n,
					 bool xdp, bool select_src)
{
	struct bpf_fib_lookup *fib = &n->fib;
	long ret;

	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = NODEPORT_AF_INET;
	fib->ifindex = ifindex;
	fib->ipv4_src = n->x.saddr;
	fib->ipv4_dst = n->x.daddr;
	ret = bpf_fib_lookup(ctx, fib, sizeof(*fib), select_src ? NODEPORT_FIB_LOOKUP_SRC : 0);
	n->no_neigh = 0;
	switch (ret) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		return NP_FORWARD;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		if (xdp)
			return NP_PASS;
		n->no_neigh = 1;
		return NP_FORWARD;
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		return NP_LOCAL;
	default:
		return xdp ? NP_PASS : -DROP_FIB_LOOKUP;
	}
}

/* A packet entering the node through one of its devices (`ifindex`): classifies it and,
 * for the first packet of a connection to a frontend, balances and records it. Fills n;
 * returns NP_* or a negative drop reason (-DROP_NO_SERVICE: the frontend has no backend). */
static __always_inline int nodeport4_ingress(void *ctx, const struct pkt4 *p, __u32 ifindex,
					     bool xdp, struct nodeport4_state *n)
{
	struct ipv4_nat_entry *e;
	struct lb4_service *svc;
	struct lb4_backend *be;
	__be32 fe_addr = 0;
	__u32 backend_id;
	__u8 flags = NAT_F_SERVICE;
	int ret;

	if (p->nexthdr != IPPROTO_TCP && p->nexthdr != IPPROTO_UDP)
		return NP_PASS;

	/* The client side of a connection already translated. */
	e = snat4_lookup(p, TUPLE_F_OUT);
	if (e) {
		be = lb4_lookup_backend(e->backend_id);
		if (be && be->address == e->to_daddr && be->port == e->to_dport &&
		    (be->flags == BE_STATE_ACTIVE || !nodeport4_is_syn(p))) {
			nat4_xlate_of(e, &n->x);
			if (!(e->flags & NAT_F_SNAT))
				return NP_LOCAL;
			return nodeport4_fib(ctx, ifindex, n, xdp, false);
		}
		/* Its backend is gone (or its ID names another one now), or a new connection
		 * reuses the tuple of one whose backend takes no new ones: balance it again. */
		snat4_delete(p, e);
	}

	/* A remote backend's reply to node:port. */
	e = snat4_lookup(p, TUPLE_F_IN);
	if (e && (e->flags & NAT_F_SNAT)) {
		nat4_xlate_of(e, &n->x);
		return nodeport4_fib(ctx, ifindex, n, xdp, false);
	}

	svc = nodeport4_lookup_service(p, &fe_addr);
	if (!svc)
		return NP_PASS;
	backend_id = nodeport4_select_backend(p, fe_addr, svc);
	be = backend_id ? lb4_lookup_backend(backend_id) : NULL;
	if (!be)
		return -DROP_NO_SERVICE;

	n->x.saddr = p->saddr;
	n->x.sport = p->sport;
	n->x.daddr = be->address;
	n->x.dport = be->port;
	if (!be->local) {
		ret = nodeport4_fib(ctx, ifindex, n, xdp, true);
		if (ret <= NP_PASS)
			return ret;
		if (ret == NP_FORWARD) {
			flags |= NAT_F_SNAT;
			n->x.saddr = n->fib.ipv4_src;
		}
		/* NP_LOCAL: the backend is an address of this node (host network) */
	}
	ret = snat4_create(p, &n->x, flags, backend_id, svc->rev_nat_index);
	if (ret < 0)
		return ret;
	return (flags & NAT_F_SNAT) ? NP_FORWARD : NP_LOCAL;
}

/* A packet leaving the node through one of its devices: a local backend's reply gets the
 * frontend back as its source. */
static __always_inline int nodeport4_egress(const struct pkt4 *p, struct nodeport4_state *n)
{
	struct ipv4_nat_entry *e;

	if (p->nexthdr != IPPROTO_TCP && p->nexthdr != IPPROTO_UDP)
		return NP_PASS;
	e = snat4_lookup(p, TUPLE_F_IN);
	if (!e || (e->flags & NAT_F_SNAT))
		return NP_PASS;
	nat4_xlate_of(e, &n->x);
	return NP_LOCAL;
}

/* ---- tc ------------------------------------------------------------------------------ */

static __always_inline bool nodeport4_xdp_done(struct __sk_buff *ctx)
{
	void *data = (void *)(long)ctx->data;
	__u32 *meta = (void *)(long)ctx->data_meta;

	if ((void *)(meta + 1) > data)
		return false;
	return *meta == NODEPORT_XDP_MARK;
}

/* Translates the packet and sends it where nodeport4_ingress/egress decided. Returns a tc
 * action or a negative drop reason. */
static __always_inline int nodeport4_apply_skb(struct __sk_buff *ctx, const struct pkt4 *p,
					       struct nodeport4_state *n, int action)
{
	int ret = nat4_rewrite_skb(ctx, p, &n->x);

	if (ret < 0)
		return ret;
	if (action != NP_FORWARD)
		return CTX_ACT_OK;
	if (n->no_neigh)
		return nodeport_redirect_neigh(n->fib.ifindex, NULL, 0, 0);
	if (bpf_skb_store_bytes(ctx, 0, n->fib.dmac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(ctx, ETH_ALEN, n->fib.smac, ETH_ALEN, 0) < 0)
		return -DROP_WRITE_ERROR;
	return bpf_redirect(n->fib.ifindex, 0);
}

/* The ICMP "port unreachable" a frontend without backends answers with: Ethernet, IPv4,
 * ICMP, and the refused packet's IPv4 header and first 8 bytes (RFC 792). */
struct nodeport4_reject {
	struct ethhdr eth;
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 quote[sizeof(struct iphdr) + 8];
} __attribute__((packed));

#define NODEPORT_REJECT_LEN sizeof(struct nodeport4_reject)

/* Fills the reply to `p` from the packet's first bytes (`head`: Ethernet + IPv4 header +
 * 8 bytes). Returns false for packets with IP options, which are only dropped. */
static __always_inline bool nodeport4_reject_build(struct nodeport4_reject *r, const __u8 *head,
						   const struct pkt4 *p)
{
	const struct ethhdr *eth = (const void *)head;
	__s64 sum;

	if (head[ETH_HLEN] != 0x45)
		return false;
	__builtin_memcpy(r->eth.h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(r->eth.h_source, eth->h_dest, ETH_ALEN);
	r->eth.h_proto = htons(ETH_P_IP);
	__builtin_memcpy(r->quote, head + ETH_HLEN, sizeof(r->quote));

	r->ip.version = 4;
	r->ip.ihl = 5;
	r->ip.ttl = 64;
	r->ip.protocol = IPPROTO_ICMP;
	r->ip.tot_len = htons(NODEPORT_REJECT_LEN - ETH_HLEN);
	r->ip.saddr = p->daddr;
	r->ip.daddr = p->saddr;
	r->ip.check = 0;
	sum = bpf_csum_diff(NULL, 0, (void *)&r->ip, sizeof(r->ip), 0);
	r->ip.check = csum_fold_u32(sum < 0 ? 0 : sum);

	r->icmp.type = ICMP_DEST_UNREACH;
	r->icmp.code = ICMP_PORT_UNREACH;
	r->icmp.checksum = 0;
	sum = bpf_csum_diff(NULL, 0, (void *)&r->icmp, sizeof(r->icmp) + sizeof(r->quote), 0);
	r->icmp.checksum = csum_fold_u32(sum < 0 ? 0 : sum);
	return true;
}

/* Turns the skb into the reject reply and sends it back out the device it came in on.
 * Returns a tc action, or a negative value when only a drop is possible. */
static __always_inline int nodeport4_reject_skb(struct __sk_buff *ctx, const struct pkt4 *p)
{
	__u8 head[ETH_HLEN + sizeof(struct iphdr) + 8];
	struct nodeport4_reject r = {};

	if (bpf_skb_load_bytes(ctx, 0, head, sizeof(head)) < 0)
		return -DROP_INVALID;
	if (!nodeport4_reject_build(&r, head, p))
		return -DROP_NO_SERVICE;
	if (bpf_skb_change_tail(ctx, NODEPORT_REJECT_LEN, 0) < 0)
		return -DROP_WRITE_ERROR;
	if (bpf_skb_store_bytes(ctx, 0, &r, NODEPORT_REJECT_LEN, 0) < 0)
		return -DROP_WRITE_ERROR;
	return bpf_redirect(ctx->ifindex, 0);
}

/* ---- XDP ----------------------------------------------------------------------------- */

static __always_inline int nodeport4_apply_xdp(struct xdp_md *ctx, const struct pkt4 *p,
					       struct nodeport4_state *n, int action)
{
	void *data, *data_end;
	struct ethhdr *eth;
	__u32 *meta;
	int ret = nat4_rewrite_xdp(ctx, p, &n->x);

	if (ret < 0)
		return ret;
	if (action != NP_FORWARD) {
		/* Tell tc the packet is done. Without room for metadata tc just finds
		 * nothing to do for it. */
		if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(__u32)) == 0) {
			data = (void *)(long)ctx->data;
			meta = (void *)(long)ctx->data_meta;
			if ((void *)(meta + 1) <= data)
				*meta = NODEPORT_XDP_MARK;
		}
		return XDP_PASS;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return -DROP_INVALID;
	__builtin_memcpy(eth->h_dest, n->fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, n->fib.smac, ETH_ALEN);
	if (n->fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(n->fib.ifindex, 0);
}

/* Reports a drop with the packet's first `len` bytes (its length before any tail change). */
static __always_inline void nodeport4_drop_notify_xdp(struct xdp_md *ctx, const struct pkt4 *p,
						      __u8 reason, __u32 len)
{
	struct event *ev = event_drop(0, ipcache4_lookup_identity(p->saddr), IDENTITY_UNKNOWN, 0,
				      reason, METRIC_DIR_INGRESS, ctx->ingress_ifindex, len, 0);
	__u32 cap = event_cap_len(len);

	if (!ev)
		return;
	ev->hdr.len_orig = len;
	if (len > 0 && bpf_xdp_load_bytes(ctx, 0, ev->data, cap) == 0)
		ev->hdr.len_cap = cap;
	event_output(ctx, ev);
}

/* A frontend without backends, in XDP: the reject reply is built in place and bounced back
 * (XDP_TX); a packet shorter than the reply whose buffer cannot grow is passed to tc
 * untouched and unreported, tc refuses it. Returns an XDP action. */
static __always_inline int nodeport4_no_service_xdp(struct xdp_md *ctx, const struct pkt4 *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 len = data_end - data;
	int delta = (int)NODEPORT_REJECT_LEN - (int)len;
	struct nodeport4_reject r = {};

	if (SERVICE_NO_BACKEND_DROP || data + ETH_HLEN + sizeof(struct iphdr) + 8 > data_end ||
	    !nodeport4_reject_build(&r, data, p)) {
		nodeport4_drop_notify_xdp(ctx, p, DROP_NO_SERVICE, len);
		return XDP_DROP;
	}
	/* Grow first: what the drop report captures is still the refused packet. */
	if (delta > 0 && bpf_xdp_adjust_tail(ctx, delta) < 0)
		return XDP_PASS;
	nodeport4_drop_notify_xdp(ctx, p, DROP_NO_SERVICE, len);
	if (delta < 0 && bpf_xdp_adjust_tail(ctx, delta) < 0)
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + NODEPORT_REJECT_LEN > data_end)
		return XDP_DROP;
	__builtin_memcpy(data, &r, NODEPORT_REJECT_LEN);
	return XDP_TX;
}

/* The NodePort fast path of cil_xdp_entry, for a parsed IPv4 packet. */
static __always_inline int nodeport4_xdp(struct xdp_md *ctx, struct pkt4 *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct nodeport4_state n = {};
	int ret = l4_parse(data, data_end, p);

	if (ret < 0)
		return XDP_PASS;
	ret = nodeport4_ingress(ctx, p, ctx->ingress_ifindex, true, &n);
	if (ret == NP_PASS)
		return XDP_PASS;
	if (ret == -DROP_NO_SERVICE)
		return nodeport4_no_service_xdp(ctx, p);
	if (ret > 0)
		ret = nodeport4_apply_xdp(ctx, p, &n, ret);
	if (ret >= 0) {
		metrics_update(REASON_FORWARDED, METRIC_DIR_INGRESS, p->len);
		return ret;
	}
	nodeport4_drop_notify_xdp(ctx, p, -ret, p->len);
	return XDP_DROP;
}

#endif /* CILIUMPY_NODEPORT_H */
