/* Load balancing at a pod's own device (tc on its host-side veth), for connections the
 * socket hooks did not translate: DNAT of a pod's packet to a service frontend, reverse NAT
 * of the replies and of ICMP errors about the connection, and the answer to a frontend
 * without backends. The backend of a connection is kept in a conntrack service entry; the
 * rev-NAT index in the connection's own entry says which frontend replies come from. */
#ifndef CILIUMPY_LB_SKB_H
#define CILIUMPY_LB_SKB_H

#include "common.h"
#include "drop_reasons.h"
#include "eth.h"
#include "ipv4.h"
#include "l4.h"
#include "conntrack.h"
#include "lb.h"
#include "nat.h"

#define LB4_IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define LB4_IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))

/* A packet leaving the pod for a service frontend: the backend its connection has (a
 * conntrack service entry), or a new one; then DNAT to it. `*rev_nat` is set to the service
 * for the conntrack entry of the translated connection. Everything else costs one lookup
 * of the services map. A frontend without an active backend refuses the packet
 * (-DROP_NO_SERVICE; the program's exit answers it with lb4_icmp_unreach_skb). */
static __always_inline int lb4_xlate_skb(struct __sk_buff *ctx, struct pkt4 *p, __u16 *rev_nat)
{
	struct lb4_service *svc;
	struct lb4_backend *be = NULL;
	struct nat4_xlate x;
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

	x.saddr = p->saddr;
	x.daddr = be->address;
	x.sport = p->sport;
	x.dport = be->port;
	ret = nat4_rewrite_skb(ctx, p, &x);
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
static __always_inline int lb4_rev_nat_skb(struct __sk_buff *ctx, struct pkt4 *p,
					   __be16 rev_nat_index)
{
	struct lb4_reverse_nat *nat = lb4_lookup_rev_nat(ntohs(rev_nat_index));
	struct nat4_xlate x;
	int ret;

	if (!nat || (p->nexthdr != IPPROTO_TCP && p->nexthdr != IPPROTO_UDP))
		return 0;
	x.saddr = nat->address;
	x.daddr = p->daddr;
	x.sport = nat->port;
	x.dport = p->dport;
	ret = nat4_rewrite_skb(ctx, p, &x);
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
static __always_inline int lb4_rev_nat_icmp_skb(struct __sk_buff *ctx, struct pkt4 *p,
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
	if (bpf_l3_csum_replace(ctx, LB4_IP_CSUM_OFF, be_addr, vip, sizeof(vip)) < 0)
		return -DROP_CSUM_L3;
	if (bpf_skb_store_bytes(ctx, LB4_IP_SADDR_OFF, &vip, sizeof(vip), 0) < 0)
		return -DROP_WRITE_ERROR;
	p->saddr = vip;
	return 0;
}

/* -- a frontend without backends: ICMP port unreachable ------------------------------ */

struct lb4_icmp_reply {
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 quote[sizeof(struct iphdr) + 8]; /* the refused packet's header and 8 bytes */
} __attribute__((packed));

#define LB4_ICMP_REPLY_LEN (ETH_HLEN + sizeof(struct lb4_icmp_reply))

/* Rewrites the frame a pod sent to a frontend without backends into the answer a host
 * without a listener gives: ICMP port unreachable from the frontend, quoting the packet.
 * The pod's TCP then fails connect() with ECONNREFUSED at once, and a connected UDP socket
 * reports ECONNREFUSED, instead of waiting for a timeout. Returns 0 when the frame holds
 * the reply; a packet with IP options is not answered. */
static __always_inline int lb4_icmp_unreach_skb(struct __sk_buff *ctx)
{
	struct lb4_icmp_reply r = {};
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
	r.ip.check = csum_fold_u32(sum);
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_PORT_UNREACH;
	sum = bpf_csum_diff(NULL, 0, (void *)&r.icmp, sizeof(r.icmp) + sizeof(r.quote), 0);
	r.icmp.checksum = csum_fold_u32(sum);

	if (bpf_skb_change_tail(ctx, LB4_ICMP_REPLY_LEN, 0) < 0 ||
	    bpf_skb_store_bytes(ctx, 0, &out_eth, sizeof(out_eth), 0) < 0 ||
	    bpf_skb_store_bytes(ctx, ETH_HLEN, &r, sizeof(r), 0) < 0)
		return -1;
	return 0;
}

#endif /* CILIUMPY_LB_SKB_H */
