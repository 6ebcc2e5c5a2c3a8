/* XDP on the node's devices: the CIDR prefilter drops listed sources before the stack
 * or any tc program spends work on them; then, with --bpf-lb-acceleration native
 * (ENABLE_NODEPORT_ACCELERATION), the NodePort fast path (bpf/lib/nodeport.h) translates
 * service traffic it can finish itself. Everything else passes to tc and the stack. */
#include "lib/common.h"
#include "lib/drop_reasons.h"
#include "lib/ipv4.h"
#include "lib/metrics.h"
#include "lib/events.h"
#include "lib/prefilter.h"
#include "lib/nodeport.h"

int cil_xdp_entry(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct pkt4 p = {};
	struct event *ev;
	int ret = ipv4_parse(data, data_end, &p);

	/* Fragments still carry their source address, so they are filtered too. */
	if (ret != 0 && ret != -DROP_FRAG_NOSUPPORT)
		return XDP_PASS; /* not IPv4, or malformed: the stack drops what it cannot use */
	if (!prefilter4_denied(p.saddr)) {
#if ENABLE_NODEPORT_ACCELERATION
		if (ret == 0) {
			p.len = data_end - data;
			return nodeport4_xdp(ctx, &p);
		}
#endif
		return XDP_PASS;
	}

	ev = event_drop(0, IDENTITY_WORLD, IDENTITY_UNKNOWN, 0, DROP_POLICY_DENY,
			METRIC_DIR_INGRESS, ctx->ingress_ifindex, data_end - data, 0);
	if (ev)
		event_submit_xdp(ctx, ev);
	return XDP_DROP;
}
