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
#include "lib/nat.h"
#include "lib/lb_skb.h"

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
		ret = lb4_xlate_skb(ctx, p, &rev_nat);
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
				return lb4_rev_nat_skb(ctx, p, st.rev_nat_index);
			if (ret == CT_RELATED)
				return lb4_rev_nat_icmp_skb(ctx, p, st.rev_nat_index);
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

/* The one exit of both programs: a negative verdict is a drop with its reason. A pod's
 * packet to a frontend without backends is reported as that drop (SERVICE_BACKEND_NOT_FOUND)
 * and also answered: the ICMP port unreachable goes straight back into the pod through the
 * peer of its device (bpf_redirect_peer), skipping the pod's ingress program, so connect()
 * fails at once. A packet that cannot be answered is just dropped. */
static __always_inline int lxc_finish(struct __sk_buff *ctx, int ret, int dir,
				      const struct lxc_flow *f)
{
	__u8 metric_dir = dir == CT_EGRESS ? METRIC_DIR_EGRESS : METRIC_DIR_INGRESS;

	if (ret > 0)
		return CTX_ACT_OK; /* not IP: ARP is left to the kernel */
	if (ret < 0) {
		send_drop_notify_skb(ctx, f->ep_id, f->src_label, f->dst_label, f->dst_id, -ret,
				     metric_dir, 0);
		if (ret == -DROP_NO_SERVICE && dir == CT_EGRESS && lb4_icmp_unreach_skb(ctx) == 0)
			return bpf_redirect_peer(ctx->ifindex, 0);
		return CTX_ACT_DROP;
	}
	metrics_update(REASON_FORWARDED, metric_dir, ctx->len);
	if (f->report)
		send_trace_notify_skb(ctx, dir == CT_EGRESS ? TRACE_FROM_ENDPOINT : TRACE_TO_ENDPOINT,
				      f->ep_id, f->src_label, f->dst_label, f->dst_id, f->ct_ret);
	return CTX_ACT_OK;
}

int cil_from_container(struct __sk_buff *ctx)
{
	struct lxc_flow f = {};
	struct pkt4 p = {};
	int ret = skb4_parse(ctx, &p, LXC_PULL_LEN);

	if (ret == 0)
		ret = lxc4_handle(ctx, &p, CT_EGRESS, &f);
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
