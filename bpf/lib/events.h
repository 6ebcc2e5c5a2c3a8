/* Datapath-to-agent events, typed like Cilium's monitor messages (reference §4): one fixed
 * layout for drop, trace and policy-verdict records, followed by the first packet bytes. */
#ifndef CILIUMPY_EVENTS_H
#define CILIUMPY_EVENTS_H

#include "common.h"
#include "metrics.h"

#define EVENT_DROP 1
#define EVENT_TRACE 4
#define EVENT_POLICY_VERDICT 5

#define EVENT_VERSION 1
#define TRACE_PAYLOAD_LEN 128

/* Trace observation points (subtype of EVENT_TRACE). */
#define TRACE_TO_ENDPOINT 0
#define TRACE_FROM_ENDPOINT 5

/* Trace reasons: the conntrack verdict of the packet, as Cilium's TRACE_REASON_*. */
#define TRACE_REASON_NEW 0
#define TRACE_REASON_ESTABLISHED 1
#define TRACE_REASON_REPLY 2
#define TRACE_REASON_RELATED 3

/* Policy verdict flags, bit positions as in Cilium's policy_verdict_notify. */
#define PV_FLAG_INGRESS 1
#define PV_FLAG_EGRESS 2
#define PV_MATCH_SHIFT 3

#ifndef EVENTS_RINGBUF_PAGES
#define EVENTS_RINGBUF_PAGES 256
#endif

struct event_hdr {
	__u8 type;       /* EVENT_* */
	__u8 subtype;    /* drop: reason; trace: observation point; verdict: 0 */
	__u16 source;    /* endpoint ID the event is about */
	__u32 hash;
	__u32 len_orig;  /* packet length */
	__u16 len_cap;   /* packet bytes captured in data[] */
	__u16 version;
};

struct event {
	struct event_hdr hdr;
	__u32 src_label;   /* source identity (verdict: remote identity) */
	__u32 dst_label;   /* destination identity */
	__u16 dst_id;      /* destination endpoint ID, 0 when not local */
	__u8 reason;       /* trace: TRACE_REASON_*; drop: METRIC_DIR_* */
	__u8 flags;        /* verdict: direction bits and match type */
	__u32 ifindex;
	__u16 line;        /* drop: source line in the datapath */
	__u8 file;
	__s8 ext_error;
	__be16 dst_port;   /* verdict: port (or ICMP type) the policy matched on */
	__u8 proto;
	__u8 pad;
	__s32 verdict;     /* verdict: 0 allowed, else -drop reason */
	__u32 cookie;      /* verdict: rule cookie of the matched policy entry */
	__u8 data[TRACE_PAYLOAD_LEN];
};

/* ciliumpy_event_buf: per-CPU scratch for building one event (too large for the stack) */
BPF_PERCPU_ARRAY(ciliumpy_event_buf, struct event, 1);
/* ciliumpy_events_lost: per-CPU count of events the ring/perf buffer had no room for */
PINNED_MAP("percpu_array", __u32, __u64, ciliumpy_events_lost, 1);

#ifdef EVENTS_PERF
/* ciliumpy_events: perf buffer of struct event records (selected with --events perf) */
BPF_PERF_OUTPUT(ciliumpy_events);
#else
/* ciliumpy_events: ring buffer of struct event records */
BPF_RINGBUF_OUTPUT(ciliumpy_events, EVENTS_RINGBUF_PAGES);
#endif

static __always_inline struct event *event_start(__u8 type, __u8 subtype, __u16 source)
{
	__u32 zero = 0;
	struct event *ev = ciliumpy_event_buf.lookup(&zero);

	if (!ev)
		return NULL;
	__builtin_memset(ev, 0, offsetof(struct event, data));
	ev->hdr.type = type;
	ev->hdr.subtype = subtype;
	ev->hdr.source = source;
	ev->hdr.version = EVENT_VERSION;
	return ev;
}

static __always_inline void events_count_lost(void)
{
	__u32 zero = 0;
	__u64 *lost = ciliumpy_events_lost.lookup(&zero);

	if (lost)
		*lost += 1;
}

static __always_inline void event_output(void *ctx, struct event *ev)
{
	long ret;

#ifdef EVENTS_PERF
	ret = ciliumpy_events.perf_submit(ctx, ev, sizeof(*ev));
#else
	ret = ciliumpy_events.ringbuf_output(ev, sizeof(*ev), 0);
#endif
	if (ret < 0)
		events_count_lost();
}

/* Bytes to capture, in [1, TRACE_PAYLOAD_LEN] for a non-empty packet. The mask keeps the
 * bound visible to the verifier after clang merges the two range checks into one. */
static __always_inline __u32 event_cap_len(__u32 len)
{
	__u32 cap = len > TRACE_PAYLOAD_LEN ? TRACE_PAYLOAD_LEN : len;

	asm volatile("%0 += -1; %0 &= 0x7f; %0 += 1" : "+r"(cap));
	return cap;
}

static __always_inline void event_submit_skb(struct __sk_buff *ctx, struct event *ev)
{
	__u32 cap = event_cap_len(ctx->len);

	ev->hdr.len_orig = ctx->len;
	ev->hdr.hash = ctx->hash;
	if (ctx->len > 0 && bpf_skb_load_bytes(ctx, 0, ev->data, cap) == 0)
		ev->hdr.len_cap = cap;
	event_output(ctx, ev);
}

static __always_inline void event_submit_xdp(struct xdp_md *ctx, struct event *ev)
{
	__u32 len = ctx->data_end - ctx->data;
	__u32 cap = event_cap_len(len);

	ev->hdr.len_orig = len;
	if (len > 0 && bpf_xdp_load_bytes(ctx, 0, ev->data, cap) == 0)
		ev->hdr.len_cap = cap;
	event_output(ctx, ev);
}

/* Fills a drop record and counts the drop. The caller submits it with its context. */
static __always_inline struct event *event_drop(__u16 source, __u32 src_label, __u32 dst_label,
						__u16 dst_id, __u8 reason, __u8 dir,
						__u32 ifindex, __u32 bytes, __u16 line)
{
	struct event *ev;

	metrics_update(reason, dir, bytes);
	ev = event_start(EVENT_DROP, reason, source);
	if (!ev)
		return NULL;
	ev->src_label = src_label;
	ev->dst_label = dst_label;
	ev->dst_id = dst_id;
	ev->reason = dir;
	ev->ifindex = ifindex;
	ev->line = line;
	return ev;
}

static __always_inline void send_drop_notify_skb(struct __sk_buff *ctx, __u16 source,
						 __u32 src_label, __u32 dst_label, __u16 dst_id,
						 __u8 reason, __u8 dir, __u16 line)
{
	struct event *ev = event_drop(source, src_label, dst_label, dst_id, reason, dir,
				      ctx->ifindex, ctx->len, line);

	if (ev)
		event_submit_skb(ctx, ev);
}

static __always_inline void send_trace_notify_skb(struct __sk_buff *ctx, __u8 obs_point,
						  __u16 source, __u32 src_label, __u32 dst_label,
						  __u16 dst_id, __u8 ct_reason)
{
	struct event *ev = event_start(EVENT_TRACE, obs_point, source);

	if (!ev)
		return;
	ev->src_label = src_label;
	ev->dst_label = dst_label;
	ev->dst_id = dst_id;
	ev->reason = ct_reason;
	ev->ifindex = ctx->ifindex;
	event_submit_skb(ctx, ev);
}

static __always_inline void send_policy_verdict_skb(struct __sk_buff *ctx, __u16 source,
						    __u32 remote_label, __be16 dport, __u8 proto,
						    __u8 dir, __u8 match_type, int verdict,
						    __u32 cookie)
{
	struct event *ev = event_start(EVENT_POLICY_VERDICT, 0, source);

	if (!ev)
		return;
	ev->src_label = remote_label;
	ev->dst_port = dport;
	ev->proto = proto;
	ev->flags = (dir == METRIC_DIR_EGRESS ? PV_FLAG_EGRESS : PV_FLAG_INGRESS) |
		    (match_type << PV_MATCH_SHIFT);
	ev->verdict = verdict;
	ev->cookie = cookie;
	ev->ifindex = ctx->ifindex;
	event_submit_skb(ctx, ev);
}

#endif /* CILIUMPY_EVENTS_H */
