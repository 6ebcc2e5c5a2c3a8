/* TCP, UDP, SCTP and ICMP header parsing into struct pkt4. */
#ifndef CILIUMPY_L4_H
#define CILIUMPY_L4_H

#include "common.h"
#include "drop_reasons.h"
#include "ipv4.h"

#define IPPROTO_SCTP_NUM 132

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define TCP_FLAG_ACK 0x10

static __always_inline int icmp4_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
	       type == ICMP_PARAMETERPROB || type == ICMP_SOURCE_QUENCH;
}

/* An ICMP error quotes the IP header and first 8 bytes of the packet that caused it; that
 * quote names the connection the error is related to. A quote cut short leaves the packet
 * an ordinary ICMP message. */
static __always_inline void icmp4_parse_inner(struct icmphdr *ih, void *data_end, struct pkt4 *p)
{
	struct iphdr *inner = (void *)(ih + 1);
	__u8 *l4;

	if ((void *)(inner + 1) > data_end || inner->ihl != 5)
		return;
	l4 = (void *)(inner + 1);
	if ((void *)(l4 + 8) > data_end)
		return;
	p->inner_saddr = inner->saddr;
	p->inner_daddr = inner->daddr;
	p->inner_nexthdr = inner->protocol;
	if (inner->protocol == IPPROTO_ICMP) {
		struct icmphdr *iih = (void *)l4;

		if (iih->type == ICMP_ECHO)
			p->inner_sport = iih->un.echo.id;
		else if (iih->type == ICMP_ECHOREPLY)
			p->inner_dport = iih->un.echo.id;
	} else {
		p->inner_sport = *(__be16 *)l4;
		p->inner_dport = *(__be16 *)(l4 + 2);
	}
	p->is_icmp_error = 1;
}

/* Fills ports, TCP flags and ICMP fields. A header cut short is CT_TRUNCATED_OR_INVALID_HEADER,
 * as in Cilium; protocols without ports are tracked and matched on protocol alone. */
static __always_inline int l4_parse(void *data, void *data_end, struct pkt4 *p)
{
	void *l4 = data + (p->l4_off & 0x3ff);

	p->sport = 0;
	p->dport = 0;
	p->policy_port = 0;
	p->tcp_flags = 0;
	p->icmp_type = 0;
	p->is_icmp_error = 0;

	switch (p->nexthdr) {
	case IPPROTO_TCP: {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return -DROP_CT_INVALID_HDR;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		break;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP_NUM: {
		/* SCTP's common header starts with the two ports, like UDP. */
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return -DROP_CT_INVALID_HDR;
		p->sport = uh->source;
		p->dport = uh->dest;
		break;
	}
	case IPPROTO_ICMP: {
		struct icmphdr *ih = l4;

		if ((void *)(ih + 1) > data_end)
			return -DROP_CT_INVALID_HDR;
		p->icmp_type = ih->type;
		/* The echo identifier plays the port: requests carry it as source, replies as
		 * destination, so a reply's reversed tuple is the request's tuple. */
		if (ih->type == ICMP_ECHO)
			p->sport = ih->un.echo.id;
		else if (ih->type == ICMP_ECHOREPLY)
			p->dport = ih->un.echo.id;
		p->policy_port = htons(ih->type);
		if (icmp4_is_error(ih->type))
			icmp4_parse_inner(ih, data_end, p);
		return 0;
	}
	default:
		return 0;
	}
	p->policy_port = p->dport;
	return 0;
}

/* Parses a tc packet after making at least `pull_len` bytes linear (or the whole packet if
 * shorter): headers split across fragments of the skb are otherwise invisible to direct
 * packet access. */
static __always_inline int skb4_parse(struct __sk_buff *ctx, struct pkt4 *p, __u32 pull_len)
{
	void *data, *data_end;
	int ret;

	if (ctx->data_end - ctx->data < pull_len && ctx->len > ctx->data_end - ctx->data)
		bpf_skb_pull_data(ctx, ctx->len < pull_len ? ctx->len : pull_len);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	ret = ipv4_parse(data, data_end, p);
	if (ret != 0)
		return ret;
	p->len = ctx->len;
	return l4_parse(data, data_end, p);
}

#endif /* CILIUMPY_L4_H */
