/* tc programs on each endpoint's host-side veth, in the node namespace.
 *
 * cil_from_container: tc ingress of the host-side veth = packets leaving the pod (its egress
 *                     policy).
 * cil_to_container:   tc egress of the host-side veth = packets entering the pod (its ingress
 *                     policy).
 *
 * The programs are compiled once; which endpoint a packet belongs to comes from the
 * endpoint map (its source address leaving the pod, its destination entering it), and the
 * endpoint must own the device the program runs on.
 *
 * Services, per packet: what the socket hooks (bpf_sock.c) did not translate still leaves
 * the pod addressed to a frontend. cil_from_container gives the connection a backend (kept
 * in a conntrack service entry), rewrites the destination to it and goes on through
 * conntrack and the egress policy as traffic to that backend; cil_to_container rewrites the
 * replies' source back to the frontend.
 */
#include "lib/common.h"
#include "lib/drop_reasons.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/l4.h"
#include "lib/maps.h"
#include "lib/ipcache.h"
#include "lib/metrics.h"
#include "lib/events.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/lb.h"

/* Enough linear bytes for Ethernet + IPv4 with options + an ICMP error's quoted headers. */
#define LXC_PULL_LEN 160

/* What the single exit of each program needs to report a drop or a trace. */
struct lxc_flow {
	__u32 src_label;
	__u32 dst_label;
	__u16 ep_id;
	__u16 dst_id;
	__u8 ct_ret;
	__u8 report;
};

/* Identities and the peer endpoint are only needed for policy and for events, so a
 * conntrack hit that reports nothing skips the ipcache (LPM) and peer lookups. */
static __always_inline __u32 lxc4_resolve_peer(const struct pkt4 *p, int dir,
					       struct lxc_flow *f)
{
	struct endpoint_info *peer;
	__u32 remote_id;

	if (dir == CT_EGRESS) {
		remote_id = ipcache4_lookup_identity(p->daddr);
		peer = lookup_ip4_endpoint(p->daddr);
		f->dst_label = remote_id;
		f->dst_id = peer ? peer->lxc_id : 0;
	} else {
		remote_id = ipcache4_lookup_identity(p->saddr);
		f->src_label = remote_id;
	}
	return remote_id;
}

/* -- per-packet load balancing ------------------------------------------------------- */

#define LXC_IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define LXC_IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define LXC_IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

/* Rewrites one address (at `addr_off` in the frame) and the port at `port_off` of the L4
 * header, with the IPv4 header checksum and the TCP/UDP checksum (whose pseudo-header holds
 * the address) kept right. A UDP datagram sent without a checksum keeps none. */
static __always_inline int lxc4_nat_rewrite(struct __sk_buff *ctx, const struct pkt4 *p,
					    __u32 addr_off, __be32 old_addr, __be32 new_addr,
					    __u32 port_off, __be16 old_port, __be16 new_port)
{
	__u32 l4_off = p->l4_off & 0x3ff;
	__u32 csum_off;
	__u64 mangled = 0;

	if (p->nexthdr == IPPROTO_TCP) {
		csum_off = l4_off + offsetof(struct tcphdr, check);
	} else {
		csum_off = l4_off + offsetof(struct udphdr, check);
		mangled = BPF_F_MARK_MANGLED_0;
	}
	if (bpf_l4_csum_replace(ctx, csum_off, old_addr, new_addr,
				BPF_F_PSEUDO_HDR | mangled | sizeof(new_addr)) < 0)
		return -DROP_CSUM_L4;
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(ctx, csum_off, old_port, new_port,
					mangled | sizeof(new_port)) < 0)
			return -DROP_CSUM_L4;
		if (bpf_skb_store_bytes(ctx, l4_off + port_off, &new_port, sizeof(new_port), 0) < 0)
			return -DROP_WRITE_ERROR;
	}
	if (bpf_l3_csum_replace(ctx, LXC_IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
		return -DROP_CSUM_L3;
	if (bpf_skb_store_bytes(ctx, addr_off, &new_addr, sizeof(new_addr), 0) < 0)
		return -DROP_WRITE_ERROR;
	return 0;
}

/* A packet leaving the pod for a service frontend: the backend its connection has (a
 * conntrack service entry), or a new one; then DNAT to it. `*rev_nat` is set to the service
 * for the conntrack entry of the translated connection. Everything else costs one lookup
 * of the services map. A frontend without an active backend refuses the packet
 * (-DROP_NO_SERVICE, answered by lxc4_no_service). */
static __always_inline int lxc4_lb(struct __sk_buff *ctx, struct pkt4 *p, __u16 *rev_nat)
{
	struct lb4_service *svc;
	struct lb4_backend *be = NULL;
	__be32 fe_addr;
	__u32 id;
	int ret;

	if (p->nexthdr != IPPROTO_TCP && p->nexthdr != IPPROTO_UDP)
		return 0;
	svc = lb4_lookup_service_ew(p->daddr, p->dport, p->nexthdr, false, &fe_addr);
	if (!svc)
		return 0;

	/* An existing connection keeps its backend while the backend exists, also when it is
	 * terminating; a new connection (or one whose backend is gone) gets an active one. */
	id = ct_lookup4_service(p);
	if (id)
		be = lb4_lookup_backend(id);
	if (!be) {
		if (svc->count == 0)
			return -DROP_NO_SERVICE;
		id = lb4_pick_backend(fe_addr, p->dport, p->nexthdr, lb4_svc_scope(svc, true), svc,
				      lb4_hash(p->saddr, (svc->flags & SVC_F_AFFINITY) ? 0 : p->sport,
					       p->dport, p->nexthdr),
				      (__u64)p->saddr, false);
		be = id ? lb4_lookup_backend(id) : NULL;
		if (!be)
			return -DROP_NO_SERVICE;
		ret = ct_create4_service(p, id, svc->rev_nat_index);
		if (ret < 0)
			return ret;
	}

	ret = lxc4_nat_rewrite(ctx, p, LXC_IP_DADDR_OFF, p->daddr, be->address,
			       offsetof(struct tcphdr, dest), p->dport, be->port);
	if (ret < 0)
		return ret;
	p->daddr = be->address;
	p->dport = be->port;
	p->policy_port = be->port;
	*rev_nat = svc->rev_nat_index;
	return 0;
}

/* A reply of a translated connection entering the client pod: its source becomes the
 * frontend the client addressed. A service that is gone leaves the packet as it is. */
static __always_inline int lxc4_rev_nat(struct __sk_buff *ctx, struct pkt4 *p,
					__be16 rev_nat_index)
{
	struct lb4_reverse_nat *nat = lb4_lookup_rev_nat(ntohs(rev_nat_index));
	int ret;

	if (!nat || (p->nexthdr != IPPROTO_TCP && p->nexthdr != IPPROTO_UDP))
		return 0;
	ret = lxc4_nat_rewrite(ctx, p, LXC_IP_SADDR_OFF, p->saddr, nat->address,
			       offsetof(struct tcphdr, source), p->sport, nat->port);
	if (ret < 0)
		return ret;
	p->saddr = nat->address;
	p->sport = nat->port;
	return 0;
}

/* An ICMP error about a translated connection, entering the client pod. It quotes the packet
 * as the backend got it; make it quote what the client sent (the frontend as destination)
 * and, when the backend itself sent it, come from the frontend, so the client's socket
 * (connected to the frontend) finds it: port unreachable, fragmentation needed... The
 * checksums inside the ICMP message are not offloaded: each is patched field by field. */
static __always_inline int lxc4_rev_nat_icmp(struct __sk_buff *ctx, struct pkt4 *p,
					     __be16 rev_nat_index)
{
	struct lb4_reverse_nat *nat = lb4_lookup_rev_nat(ntohs(rev_nat_index));
	__u32 icmp_csum = (p->l4_off & 0x3ff) + offsetof(struct icmphdr, checksum);
	__u32 inner = (p->l4_off & 0x3ff) + sizeof(struct icmphdr);
	__u32 inner_check = inner + offsetof(struct iphdr, check);
	__u32 inner_l4 = inner + sizeof(struct iphdr);
	__be32 be_addr = p->inner_daddr, vip;
	__be16 be_port = p->inner_dport, vport, old_sum = 0, new_sum = 0;

	if (!nat || (p->inner_nexthdr != IPPROTO_TCP && p->inner_nexthdr != IPPROTO_UDP))
		return 0;
	vip = nat->address;
	vport = nat->port;

	/* The quoted IPv4 header: destination and its checksum. */
	if (bpf_skb_load_bytes(ctx, inner_check, &old_sum, sizeof(old_sum)) < 0 ||
	    bpf_l3_csum_replace(ctx, inner_check, be_addr, vip, sizeof(vip)) < 0 ||
	    bpf_skb_load_bytes(ctx, inner_check, &new_sum, sizeof(new_sum)) < 0 ||
	    bpf_skb_store_bytes(ctx, inner + offsetof(struct iphdr, daddr), &vip, sizeof(vip), 0) < 0 ||
	    bpf_l3_csum_replace(ctx, icmp_csum, be_addr, vip, sizeof(vip)) < 0 ||
	    bpf_l3_csum_replace(ctx, icmp_csum, old_sum, new_sum, sizeof(new_sum)) < 0)
		return -DROP_CSUM_L3;
	/* The quoted UDP checksum, when the datagram had one (TCP's lies past the 8 bytes an
	 * error must quote; the client does not check either). */
	if (p->inner_nexthdr == IPPROTO_UDP) {
		__u32 udp_check = inner_l4 + offsetof(struct udphdr, check);

		if (bpf_skb_load_bytes(ctx, udp_check, &old_sum, sizeof(old_sum)) < 0)
			return -DROP_WRITE_ERROR;
		if (old_sum) {
			if (bpf_l3_csum_replace(ctx, udp_check, be_addr, vip, sizeof(vip)) < 0 ||
			    bpf_l3_csum_replace(ctx, udp_check, be_port, vport, sizeof(vport)) < 0 ||
			    bpf_skb_load_bytes(ctx, udp_check, &new_sum, sizeof(new_sum)) < 0 ||
			    bpf_l3_csum_replace(ctx, icmp_csum, old_sum, new_sum, sizeof(new_sum)) < 0)
				return -DROP_CSUM_L4;
		}
	}
	/* The quoted destination port. */
	if (bpf_skb_store_bytes(ctx, inner_l4 + offsetof(struct udphdr, dest), &vport,
				sizeof(vport), 0) < 0 ||
	    bpf_l3_csum_replace(ctx, icmp_csum, be_port, vport, sizeof(vport)) < 0)
		return -DROP_CSUM_L4;
	/* The error's source: the backend itself becomes the frontend; a router on the way
	 * stays what it is. */
	if (p->saddr != be_addr)
		return 0;
	if (bpf_l3_csum_replace(ctx, LXC_IP_CSUM_OFF, be_addr, vip, sizeof(vip)) < 0)
		return -DROP_CSUM_L3;
	if (bpf_skb_store_bytes(ctx, LXC_IP_SADDR_OFF, &vip, sizeof(vip), 0) < 0)
		return -DROP_WRITE_ERROR;
	p->saddr = vip;
	return 0;
}

static __always_inline int lxc4_handle(struct __sk_buff *ctx, struct pkt4 *p, int dir,
				       struct lxc_flow *f)
{
	struct endpoint_info *ep;
	struct ct_state st = {};
	__u16 rev_nat = 0;
	__u32 remote_id;
	int ret;

	if (dir == CT_EGRESS) {
		ep = lookup_ip4_endpoint(p->saddr);
		if (!ep || ep->ifindex != ctx->ifindex)
			return -DROP_INVALID_SIP; /* not the address this pod was given */
		f->src_label = ep->sec_id;
	} else {
		ep = lookup_ip4_endpoint(p->daddr);
		if (!ep || ep->ifindex != ctx->ifindex) {
			f->src_label = ipcache4_lookup_identity(p->saddr);
			return -DROP_UNKNOWN_TARGET;
		}
		f->dst_label = ep->sec_id;
		f->dst_id = ep->lxc_id;
	}
	f->ep_id = ep->lxc_id;
	if (dir == CT_EGRESS) {
		ret = lxc4_lb(ctx, p, &rev_nat);
		if (ret < 0)
			return ret;
	}

	ret = ct_lookup4(p, dir, &st);
	f->ct_ret = ret;
	f->report = st.report;
	if (ret != CT_NEW) {
		/* Established, reply and related traffic skip policy. */
		if (st.report)
			lxc4_resolve_peer(p, dir, f);
		if (dir == CT_INGRESS && st.rev_nat_index) {
			if (ret == CT_REPLY)
				return lxc4_rev_nat(ctx, p, st.rev_nat_index);
			if (ret == CT_RELATED)
				return lxc4_rev_nat_icmp(ctx, p, st.rev_nat_index);
		}
		return 0;
	}

	remote_id = lxc4_resolve_peer(p, dir, f);
	ret = policy_can_access4(ctx, ep, remote_id, p, dir);
	if (ret < 0)
		return ret;
	ret = ct_create4_nat(p, dir, f->src_label, ctx->ifindex, rev_nat);
	if (ret < 0)
		return ret;
	f->report = 1;
	return 0;
}

/* The one exit of both programs: a negative verdict is a drop with its reason. */
static __always_inline int lxc_finish(struct __sk_buff *ctx, int ret, int dir,
				      const struct lxc_flow *f)
{
	__u8 metric_dir = dir == CT_EGRESS ? METRIC_DIR_EGRESS : METRIC_DIR_INGRESS;

	if (ret > 0)
		return CTX_ACT_OK; /* not IP: ARP is left to the kernel */
	if (ret < 0) {
		send_drop_notify_skb(ctx, f->ep_id, f->src_label, f->dst_label, f->dst_id, -ret,
				     metric_dir, 0);
		return CTX_ACT_DROP;
	}
	metrics_update(REASON_FORWARDED, metric_dir, ctx->len);
	if (f->report)
		send_trace_notify_skb(ctx, dir == CT_EGRESS ? TRACE_FROM_ENDPOINT : TRACE_TO_ENDPOINT,
				      f->ep_id, f->src_label, f->dst_label, f->dst_id, f->ct_ret);
	return CTX_ACT_OK;
}

/* -- no backend: ICMP port unreachable ------------------------------------------------- */

struct lxc_icmp_reply {
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 quote[sizeof(struct iphdr) + 8]; /* the refused packet's header and 8 bytes */
} __attribute__((packed));

#define LXC_ICMP_REPLY_LEN (ETH_HLEN + sizeof(struct lxc_icmp_reply))

static __always_inline __sum16 lxc_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__sum16)~s;
}

/* Rewrites the frame a pod sent to a frontend without backends into the answer a host
 * without a listener gives: ICMP port unreachable from the frontend, quoting the packet.
 * The pod's TCP then fails connect() with ECONNREFUSED at once, and a connected UDP socket
 * reports ECONNREFUSED, instead of waiting for a timeout. Returns 0 when the frame holds
 * the reply; a packet with IP options is not answered. */
static __always_inline int lxc4_icmp_unreach(struct __sk_buff *ctx)
{
	struct lxc_icmp_reply r = {};
	struct ethhdr eth, out_eth;
	__s64 sum;

	if (bpf_skb_load_bytes(ctx, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(ctx, ETH_HLEN, r.quote, sizeof(r.quote)) < 0)
		return -1;
	if ((r.quote[0] & 0x0f) != 5)
		return -1;
	__builtin_memcpy(out_eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(out_eth.h_source, eth.h_dest, ETH_ALEN);
	out_eth.h_proto = htons(ETH_P_IP);

	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tot_len = htons(sizeof(r));
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	__builtin_memcpy(&r.ip.saddr, &r.quote[offsetof(struct iphdr, daddr)], 4);
	__builtin_memcpy(&r.ip.daddr, &r.quote[offsetof(struct iphdr, saddr)], 4);
	sum = bpf_csum_diff(NULL, 0, (void *)&r.ip, sizeof(r.ip), 0);
	r.ip.check = lxc_csum_fold(sum);
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_PORT_UNREACH;
	sum = bpf_csum_diff(NULL, 0, (void *)&r.icmp, sizeof(r.icmp) + sizeof(r.quote), 0);
	r.icmp.checksum = lxc_csum_fold(sum);

	if (bpf_skb_change_tail(ctx, LXC_ICMP_REPLY_LEN, 0) < 0 ||
	    bpf_skb_store_bytes(ctx, 0, &out_eth, sizeof(out_eth), 0) < 0 ||
	    bpf_skb_store_bytes(ctx, ETH_HLEN, &r, sizeof(r), 0) < 0)
		return -1;
	return 0;
}

/* The refused packet is reported as a drop (SERVICE_BACKEND_NOT_FOUND, as the pod sent it)
 * and the ICMP answer goes straight back into the pod through the peer of its device
 * (bpf_redirect_peer): the datapath's own answer to the pod's packet, it skips the pod's
 * ingress program. A packet that cannot be answered is just dropped. */
static __always_inline int lxc4_no_service(struct __sk_buff *ctx, const struct lxc_flow *f)
{
	send_drop_notify_skb(ctx, f->ep_id, f->src_label, f->dst_label, f->dst_id,
			     DROP_NO_SERVICE, METRIC_DIR_EGRESS, 0);
	if (lxc4_icmp_unreach(ctx) < 0)
		return CTX_ACT_DROP;
	return bpf_redirect_peer(ctx->ifindex, 0);
}

int cil_from_container(struct __sk_buff *ctx)
{
	struct lxc_flow f = {};
	struct pkt4 p = {};
	int ret = skb4_parse(ctx, &p, LXC_PULL_LEN);

	if (ret == 0)
		ret = lxc4_handle(ctx, &p, CT_EGRESS, &f);
	if (ret == -DROP_NO_SERVICE)
		return lxc4_no_service(ctx, &f);
	return lxc_finish(ctx, ret, CT_EGRESS, &f);
}

int cil_to_container(struct __sk_buff *ctx)
{
	struct lxc_flow f = {};
	struct pkt4 p = {};
	int ret = skb4_parse(ctx, &p, LXC_PULL_LEN);

	if (ret == 0)
		ret = lxc4_handle(ctx, &p, CT_INGRESS, &f);
	return lxc_finish(ctx, ret, CT_INGRESS, &f);
}
