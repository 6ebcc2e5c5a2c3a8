/* tc programs on the node's own devices (the uplink in the node namespace): NodePort,
 * LoadBalancer, externalIPs and hostPorts for traffic entering the node, SNAT to the node
 * address toward remote backends and its reversal on the way back (bpf/lib/nodeport.h).
 *
 * cil_from_netdev: tc ingress of a device = packets entering the node. New connections to
 *                  a frontend are balanced; both directions of translated connections
 *                  that arrive here are rewritten (client -> backend, remote backend ->
 *                  client) and local-backend traffic goes on to the stack, the rest out
 *                  of a device by the FIB.
 * cil_to_netdev:   tc egress of a device = packets leaving the node. A local backend's
 *                  reply gets its frontend back as source.
 *
 * Whatever these programs do not translate (IPv6, ARP, ICMP, fragments, the node's own
 * traffic) goes on untouched: the node's devices carry more than services.
 */
#include "lib/common.h"
#include "lib/drop_reasons.h"
#include "lib/ipv4.h"
#include "lib/l4.h"
#include "lib/ipcache.h"
#include "lib/metrics.h"
#include "lib/events.h"
#include "lib/nodeport.h"

/* Enough linear bytes for Ethernet + IPv4 with options + TCP. */
#define HOST_PULL_LEN 128

/* The one exit of both programs for the packets they translate: `ret` is a tc action, or a
 * negative drop reason. A frontend without backends is answered (unless configured to
 * drop) after the drop is reported with the refused packet. */
static __always_inline int host_finish(struct __sk_buff *ctx, const struct pkt4 *p, int ret,
				       __u8 dir)
{
	if (ret >= 0) {
		metrics_update(REASON_FORWARDED, dir, ctx->len);
		return ret;
	}
	send_drop_notify_skb(ctx, 0, ipcache4_lookup_identity(p->saddr), IDENTITY_UNKNOWN, 0, -ret,
			     dir, 0);
	if (ret == -DROP_NO_SERVICE && !SERVICE_NO_BACKEND_DROP) {
		ret = nodeport4_reject_skb(ctx, p);
		if (ret >= 0)
			return ret;
	}
	return CTX_ACT_DROP;
}

int cil_from_netdev(struct __sk_buff *ctx)
{
	struct nodeport4_state n = {};
	struct pkt4 p = {};
	int ret;

	if (nodeport4_xdp_done(ctx))
		return CTX_ACT_OK;
	if (skb4_parse(ctx, &p, HOST_PULL_LEN) != 0)
		return CTX_ACT_OK;
	ret = nodeport4_ingress(ctx, &p, ctx->ifindex, false, &n);
	if (ret == NP_PASS)
		return CTX_ACT_OK;
	if (ret > 0)
		ret = nodeport4_apply_skb(ctx, &p, &n, ret);
	return host_finish(ctx, &p, ret, METRIC_DIR_INGRESS);
}

int cil_to_netdev(struct __sk_buff *ctx)
{
	struct nodeport4_state n = {};
	struct pkt4 p = {};
	int ret;

	if (skb4_parse(ctx, &p, HOST_PULL_LEN) != 0)
		return CTX_ACT_OK;
	ret = nodeport4_egress(&p, &n);
	if (ret == NP_PASS)
		return CTX_ACT_OK;
	ret = nodeport4_apply_skb(ctx, &p, &n, ret);
	return host_finish(ctx, &p, ret, METRIC_DIR_EGRESS);
}
