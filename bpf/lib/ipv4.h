/* IPv4 header parsing and the packet summary every later stage works on. */
#ifndef CILIUMPY_IPV4_H
#define CILIUMPY_IPV4_H

#include "common.h"
#include "drop_reasons.h"
#include "eth.h"

#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

/* What the datapath needs from one IPv4 packet, in one place so helpers take one pointer. */
struct pkt4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;     /* TCP/UDP/SCTP source port; ICMP echo identifier on requests */
	__be16 dport;     /* TCP/UDP/SCTP destination port; ICMP echo identifier on replies */
	__be16 policy_port; /* port the policy matches: dport, or the ICMP type */
	__u8 nexthdr;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 is_icmp_error;   /* ICMP error whose quoted packet was parsed into inner_* */
	__u16 l4_off;
	__u32 len;
	/* The packet an ICMP error quotes, as the tuple it was sent with. */
	__be32 inner_saddr;
	__be32 inner_daddr;
	__be16 inner_sport;
	__be16 inner_dport;
	__u8 inner_nexthdr;
};

/* Parses Ethernet + IPv4 at the start of [data, data_end). Returns 0 for IPv4, a positive
 * value for frames this program lets through untouched (ARP), or a negative drop reason. */
static __always_inline int ipv4_parse(void *data, void *data_end, struct pkt4 *p)
{
	struct iphdr *ip4 = data + sizeof(struct ethhdr);
	__be16 proto;
	__u32 hdr_len;
	int ret;

	ret = eth_load_proto(data, data_end, &proto);
	if (ret < 0)
		return ret;
	if (proto == ETH_P_ARP_BE)
		return 1;
	if (proto != htons(ETH_P_IP))
		return -DROP_UNKNOWN_L3;
	if ((void *)(ip4 + 1) > data_end)
		return -DROP_INVALID;
	if (ip4->version != 4 || ip4->ihl < 5)
		return -DROP_INVALID;
	hdr_len = ip4->ihl * 4;
	if (data + sizeof(struct ethhdr) + hdr_len > data_end)
		return -DROP_INVALID;

	p->saddr = ip4->saddr;
	p->daddr = ip4->daddr;
	p->nexthdr = ip4->protocol;
	p->l4_off = sizeof(struct ethhdr) + hdr_len;
	/* No fragment tracking yet: a later fragment carries no ports, so policy and
	 * conntrack could not be applied consistently to any fragment of the datagram.
	 * Addresses are filled first so a source-only check (the prefilter) still works. */
	if (ip4->frag_off & htons(IP_MF | IP_OFFSET))
		return -DROP_FRAG_NOSUPPORT;
	return 0;
}

#endif /* CILIUMPY_IPV4_H */
