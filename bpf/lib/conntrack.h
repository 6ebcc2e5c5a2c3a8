/* Connection tracking: one LRU map for TCP, one for everything else (reference §2, §3).
 *
 * A tuple is stored as the packet that created it saw it (saddr = the originator) and
 * flagged with the direction it was created in: TUPLE_F_OUT at a pod's egress, TUPLE_F_IN
 * at its ingress. A packet that finds its own tuple is ESTABLISHED; one that finds its
 * reversed tuple with the other direction flag is a REPLY; an ICMP error quoting a tracked
 * tuple is RELATED. "tx" counters and flags belong to the creating direction, "rx" to replies.
 *
 * Service entries (TUPLE_F_SERVICE | TUPLE_F_OUT) are the per-packet load balancer's memory:
 * keyed by the tuple a pod sent to a service frontend (destination = VIP:port), they hold the
 * backend that connection was given and the service's rev-NAT index. The ordinary entry the
 * translated packet then creates (destination = the backend) carries the same rev-NAT index,
 * so its replies are rewritten back to the frontend.
 */
#ifndef CILIUMPY_CONNTRACK_H
#define CILIUMPY_CONNTRACK_H

#include "common.h"
#include "drop_reasons.h"
#include "ipv4.h"
#include "l4.h"

#ifndef CT_MAP_SIZE_TCP
#define CT_MAP_SIZE_TCP 524288
#endif
#ifndef CT_MAP_SIZE_ANY
#define CT_MAP_SIZE_ANY 262144
#endif
#ifndef CT_TIMEOUT_TCP
#define CT_TIMEOUT_TCP 8000
#endif
#ifndef CT_TIMEOUT_SYN
#define CT_TIMEOUT_SYN 60
#endif
#ifndef CT_TIMEOUT_CLOSE
#define CT_TIMEOUT_CLOSE 10
#endif
#ifndef CT_TIMEOUT_ANY
#define CT_TIMEOUT_ANY 60
#endif
/* How often an established flow re-reports a trace event under aggregation. */
#ifndef CT_REPORT_INTERVAL
#define CT_REPORT_INTERVAL 5
#endif
#ifndef MONITOR_AGGREGATION
#define MONITOR_AGGREGATION 2
#endif

#define TUPLE_F_OUT 0
#define TUPLE_F_IN 1
#define TUPLE_F_RELATED 2
#define TUPLE_F_SERVICE 4

#define CT_F_RX_CLOSING (1 << 0)
#define CT_F_TX_CLOSING (1 << 1)
#define CT_F_SEEN_NON_SYN (1 << 4)

enum {
	CT_NEW = 0,
	CT_ESTABLISHED = 1,
	CT_REPLY = 2,
	CT_RELATED = 3,
};

struct ipv4_ct_tuple {
	__be32 daddr;
	__be32 saddr;
	__be16 dport;
	__be16 sport;
	__u8 nexthdr;
	__u8 flags; /* TUPLE_F_* */
} __attribute__((packed));

struct ct_entry {
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tx_packets;
	__u64 tx_bytes;
	__u32 lifetime;      /* expiry, seconds of CLOCK_MONOTONIC */
	__u16 flags;         /* CT_F_* */
	__be16 rev_nat_index;
	__u16 ifindex;
	__u8 tx_flags_seen;  /* TCP flags seen in the creating direction */
	__u8 rx_flags_seen;  /* TCP flags seen in the reply direction */
	union {
		__u32 src_sec_id;  /* identity of the source of the creating packet */
		__u32 backend_id;  /* service entries: the backend the connection was given */
	};
	__u32 last_tx_report;
	__u32 last_rx_report;
};

/* ciliumpy_ct4_global: TCP connections */
PINNED_MAP("lru_hash", struct ipv4_ct_tuple, struct ct_entry, ciliumpy_ct4_global,
	   CT_MAP_SIZE_TCP);
/* ciliumpy_ct_any4_global: UDP, ICMP and every other protocol */
PINNED_MAP("lru_hash", struct ipv4_ct_tuple, struct ct_entry, ciliumpy_ct_any4_global,
	   CT_MAP_SIZE_ANY);

struct ct_state {
	__u32 src_sec_id;
	__be16 rev_nat_index; /* the service the connection was translated for, 0 if none */
	__u8 report; /* the packet should be traced under monitor aggregation */
};

static __always_inline struct ct_entry *ct4_map_lookup(struct ipv4_ct_tuple *t)
{
	if (t->nexthdr == IPPROTO_TCP)
		return ciliumpy_ct4_global.lookup(t);
	return ciliumpy_ct_any4_global.lookup(t);
}

static __always_inline int ct4_map_update(struct ipv4_ct_tuple *t, struct ct_entry *e)
{
	if (t->nexthdr == IPPROTO_TCP)
		return ciliumpy_ct4_global.update(t, e);
	return ciliumpy_ct_any4_global.update(t, e);
}

static __always_inline void ct4_map_delete(struct ipv4_ct_tuple *t)
{
	if (t->nexthdr == IPPROTO_TCP)
		ciliumpy_ct4_global.delete(t);
	else
		ciliumpy_ct_any4_global.delete(t);
}

static __always_inline __u8 ct_tuple_dir_flag(int dir)
{
	return dir == CT_EGRESS ? TUPLE_F_OUT : TUPLE_F_IN;
}

static __always_inline __u8 ct_tuple_reverse_flag(int dir)
{
	return dir == CT_EGRESS ? TUPLE_F_IN : TUPLE_F_OUT;
}

static __always_inline __u32 ct_lifetime(const struct ct_entry *e, __u8 nexthdr)
{
	if (nexthdr != IPPROTO_TCP)
		return CT_TIMEOUT_ANY;
	if ((e->flags & (CT_F_RX_CLOSING | CT_F_TX_CLOSING)) == (CT_F_RX_CLOSING | CT_F_TX_CLOSING))
		return CT_TIMEOUT_CLOSE;
	if (e->flags & CT_F_SEEN_NON_SYN)
		return CT_TIMEOUT_TCP;
	return CT_TIMEOUT_SYN;
}

/* Monitor aggregation "medium": report the first packet of each direction, new TCP flags,
 * and otherwise once per CT_REPORT_INTERVAL. */
static __always_inline __u8 ct_should_report(__u8 *flags_seen, __u32 *last_report,
					     __u8 tcp_flags, __u32 now)
{
	__u8 report = MONITOR_AGGREGATION == 0;

	if ((*flags_seen | tcp_flags) != *flags_seen)
		report = 1;
	if (now - *last_report >= CT_REPORT_INTERVAL)
		report = 1;
	*flags_seen |= tcp_flags;
	if (report)
		*last_report = now;
	return report;
}

/* Advances TCP state, counters and lifetime of a found entry. Returns 1 when a new SYN
 * found a connection that both sides had closed: the tuple is reused and starts over. */
static __always_inline int ct4_update(struct ct_entry *e, const struct pkt4 *p, int forward,
				      __u32 now, struct ct_state *st)
{
	__u8 f = p->tcp_flags;

	if (p->nexthdr == IPPROTO_TCP) {
		if (forward && (f & TCP_FLAG_SYN) && !(f & TCP_FLAG_ACK) &&
		    (e->flags & CT_F_TX_CLOSING) && (e->flags & CT_F_RX_CLOSING))
			return 1;
		if (f & TCP_FLAG_RST)
			e->flags |= CT_F_RX_CLOSING | CT_F_TX_CLOSING;
		if (f & TCP_FLAG_FIN)
			e->flags |= forward ? CT_F_TX_CLOSING : CT_F_RX_CLOSING;
		if (!(f & TCP_FLAG_SYN))
			e->flags |= CT_F_SEEN_NON_SYN;
	}
	e->lifetime = now + ct_lifetime(e, p->nexthdr);
	if (forward) {
		__sync_fetch_and_add(&e->tx_packets, 1);
		__sync_fetch_and_add(&e->tx_bytes, p->len);
		st->report = ct_should_report(&e->tx_flags_seen, &e->last_tx_report, f, now);
	} else {
		__sync_fetch_and_add(&e->rx_packets, 1);
		__sync_fetch_and_add(&e->rx_bytes, p->len);
		st->report = ct_should_report(&e->rx_flags_seen, &e->last_rx_report, f, now);
	}
	st->src_sec_id = e->src_sec_id;
	return 0;
}

/* The tuple a packet creates or finds going forward. */
static __always_inline void ct4_tuple_of(const struct pkt4 *p, __u8 flags, struct ipv4_ct_tuple *t)
{
	t->saddr = p->saddr;
	t->daddr = p->daddr;
	t->sport = p->sport;
	t->dport = p->dport;
	t->nexthdr = p->nexthdr;
	t->flags = flags;
}

/* Classifies a packet seen at `dir` of an endpoint: CT_NEW, CT_ESTABLISHED, CT_REPLY or
 * CT_RELATED. Only CT_NEW packets go through policy. */
static __always_inline int ct_lookup4(const struct pkt4 *p, int dir, struct ct_state *st)
{
	struct ipv4_ct_tuple t = {};
	struct ct_entry *e;
	__u32 now = bpf_mono_now();

	if (p->is_icmp_error) {
		t.saddr = p->inner_saddr;
		t.daddr = p->inner_daddr;
		t.sport = p->inner_sport;
		t.dport = p->inner_dport;
		t.nexthdr = p->inner_nexthdr;
		/* The quoted packet travelled the other way: it is the connection as the
		 * endpoint at the opposite direction recorded it. */
		t.flags = ct_tuple_reverse_flag(dir);
		e = ct4_map_lookup(&t);
		if (e) {
			st->src_sec_id = e->src_sec_id;
			st->rev_nat_index = e->rev_nat_index;
			st->report = 1;
			return CT_RELATED;
		}
	}

	ct4_tuple_of(p, ct_tuple_dir_flag(dir), &t);
	e = ct4_map_lookup(&t);
	if (e) {
		if (ct4_update(e, p, 1, now, st)) {
			ct4_map_delete(&t);
			return CT_NEW;
		}
		st->rev_nat_index = e->rev_nat_index;
		return CT_ESTABLISHED;
	}

	t.saddr = p->daddr;
	t.daddr = p->saddr;
	t.sport = p->dport;
	t.dport = p->sport;
	t.flags = ct_tuple_reverse_flag(dir);
	e = ct4_map_lookup(&t);
	if (e) {
		ct4_update(e, p, 0, now, st);
		st->rev_nat_index = e->rev_nat_index;
		return CT_REPLY;
	}
	return CT_NEW;
}

/* A new entry from the packet that creates it: counters, lifetime and the TCP flags seen.
 * A first packet without SYN was picked up mid-stream (e.g. after a CT flush); one carrying
 * any of `closing_flags` is created already closing. */
static __always_inline void ct4_entry_init(struct ct_entry *e, const struct pkt4 *p,
					   __u8 closing_flags)
{
	__u32 now = bpf_mono_now();

	if (p->nexthdr == IPPROTO_TCP && !(p->tcp_flags & TCP_FLAG_SYN))
		e->flags |= CT_F_SEEN_NON_SYN;
	if (p->nexthdr == IPPROTO_TCP && (p->tcp_flags & closing_flags))
		e->flags |= CT_F_RX_CLOSING | CT_F_TX_CLOSING;
	e->lifetime = now + ct_lifetime(e, p->nexthdr);
	e->tx_packets = 1;
	e->tx_bytes = p->len;
	e->tx_flags_seen = p->tcp_flags;
	e->last_tx_report = now;
}

/* Records a new connection after policy allowed it; `rev_nat_index` (host order) names the
 * service a translated connection was sent to, 0 for none. */
static __always_inline int ct_create4_nat(const struct pkt4 *p, int dir, __u32 src_sec_id,
					  __u32 ifindex, __u16 rev_nat_index)
{
	struct ipv4_ct_tuple t = {};
	struct ct_entry e = {};

	ct4_tuple_of(p, ct_tuple_dir_flag(dir), &t);
	ct4_entry_init(&e, p, TCP_FLAG_RST);
	e.src_sec_id = src_sec_id;
	e.ifindex = ifindex;
	e.rev_nat_index = htons(rev_nat_index);
	if (ct4_map_update(&t, &e) < 0)
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

/* -- service entries -------------------------------------------------------------------- */

/* Advances a service entry with a packet of its (only) forward direction. The entry never
 * sees replies, so a FIN or RST from the client closes it for both sides: it then lives
 * CT_TIMEOUT_CLOSE past the client's last packet. Returns 1 when a new SYN reuses the tuple
 * of a closed connection: that is a new connection, due a new backend. */
static __always_inline int ct4_service_update(struct ct_entry *e, const struct pkt4 *p, __u32 now)
{
	__u8 f = p->tcp_flags;

	if (p->nexthdr == IPPROTO_TCP) {
		if ((f & TCP_FLAG_SYN) && !(f & TCP_FLAG_ACK) &&
		    (e->flags & CT_F_TX_CLOSING) && (e->flags & CT_F_RX_CLOSING))
			return 1;
		if (f & (TCP_FLAG_RST | TCP_FLAG_FIN))
			e->flags |= CT_F_RX_CLOSING | CT_F_TX_CLOSING;
		if (!(f & TCP_FLAG_SYN))
			e->flags |= CT_F_SEEN_NON_SYN;
	}
	e->lifetime = now + ct_lifetime(e, p->nexthdr);
	__sync_fetch_and_add(&e->tx_packets, 1);
	__sync_fetch_and_add(&e->tx_bytes, p->len);
	e->tx_flags_seen |= f;
	return 0;
}

/* The backend a pod's connection to a service frontend was given, 0 when it has none yet
 * (no entry, or a closed connection's tuple reused by a new SYN). `p` is the packet as the
 * pod sent it, addressed to the frontend. */
static __always_inline __u32 ct_lookup4_service(const struct pkt4 *p)
{
	struct ipv4_ct_tuple t = {};
	struct ct_entry *e;

	ct4_tuple_of(p, TUPLE_F_OUT | TUPLE_F_SERVICE, &t);
	e = ct4_map_lookup(&t);
	if (!e || ct4_service_update(e, p, bpf_mono_now()))
		return 0;
	return e->backend_id;
}

/* Records (or replaces) the backend of a pod's connection to a service frontend. */
static __always_inline int ct_create4_service(const struct pkt4 *p, __u32 backend_id,
					      __u16 rev_nat_index)
{
	struct ipv4_ct_tuple t = {};
	struct ct_entry e = {};

	ct4_tuple_of(p, TUPLE_F_OUT | TUPLE_F_SERVICE, &t);
	/* A service entry never sees replies: a client FIN closes it as well as a RST. */
	ct4_entry_init(&e, p, TCP_FLAG_RST | TCP_FLAG_FIN);
	e.backend_id = backend_id;
	e.rev_nat_index = htons(rev_nat_index);
	if (ct4_map_update(&t, &e) < 0)
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

#endif /* CILIUMPY_CONNTRACK_H */
