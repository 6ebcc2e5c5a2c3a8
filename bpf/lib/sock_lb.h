/* Socket-level load balancing (reference §1, §6): services translated once per connection at
 * the socket, in the cgroup hooks of bpf_sock.c, instead of per packet.
 *
 * connect4 / sendmsg4: the address the application asks for is a service frontend: pick a
 *   backend and rewrite the address the socket connects (or sends) to. The socket keeps the
 *   backend for its lifetime, so established connections never depend on the service maps.
 *   A frontend with no active backend refuses at once: the syscall fails with ECONNREFUSED.
 * recvmsg4 / getpeername4: the reverse, from ciliumpy_lb4_reverse_sk, so the application
 *   sees the service address it asked for as the peer and as a datagram's source.
 *
 * Packets of a translated socket already carry the backend address: the pods' per-packet
 * load balancer (bpf_lxc.c) finds no frontend and leaves them alone.
 */
#ifndef CILIUMPY_SOCK_LB_H
#define CILIUMPY_SOCK_LB_H

#include "common.h"
#include "lb.h"

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

/* The verdicts of a cgroup sock_addr program: 1 lets the syscall go on; 0 fails it, with
 * EPERM unless the program set another error with bpf_set_retval(). */
#define SOCK_ALLOW 1
#define SOCK_REFUSE 0

/* BCC 0.26 declares bpf_get_socket_cookie() as returning a u32; the kernel's cookie is a
 * u64, and the reverse map is keyed by all of it. */
static __u64 (*sock_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

static __always_inline bool sock4_lb_proto(const struct bpf_sock_addr *ctx)
{
	return ctx->protocol == IPPROTO_TCP || ctx->protocol == IPPROTO_UDP;
}

/* Maglev needs a per-flow hash; at the socket the flow is the socket (its source port may not
 * be chosen yet), so the cookie stands in for the client's address and port. With session
 * affinity the affinity map, keyed by the netns cookie, decides first. */
static __always_inline __u32 sock4_hash(__u64 cookie, __be16 dport, __u8 proto)
{
	return lb4_hash((__u32)cookie ^ (__u32)(cookie >> 32), 0, dport, proto);
}

/* connect4 and sendmsg4. */
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct lb4_reverse_sk_key rkey = {};
	struct lb4_reverse_sk rval = {};
	struct lb4_service *svc;
	struct lb4_backend *be;
	__be32 vip = ctx->user_ip4;
	__be16 vport = (__be16)ctx->user_port;
	__u8 proto = ctx->protocol;
	__be32 fe_addr;
	__u64 cookie;
	__u32 id;

	if (!sock4_lb_proto(ctx))
		return SOCK_ALLOW;
	svc = lb4_lookup_service_ew(vip, vport, proto, true, &fe_addr);
	if (!svc)
		return SOCK_ALLOW;
	if (svc->count == 0) {
		/* No active backend: refuse now rather than let the client time out. */
		bpf_set_retval(-ECONNREFUSED);
		return SOCK_REFUSE;
	}
	cookie = sock_cookie(ctx);
	id = lb4_pick_backend(fe_addr, vport, proto, lb4_svc_scope(svc, true), svc,
			      sock4_hash(cookie, vport, proto), bpf_get_netns_cookie(ctx), true);
	be = id ? lb4_lookup_backend(id) : NULL;
	if (!be)
		/* A slot whose backend is gone: the agent is mid-update. Leave the address to the
		 * per-packet load balancer rather than fail a connection that may succeed. */
		return SOCK_ALLOW;

	rkey.cookie = cookie;
	rkey.address = be->address;
	rkey.port = be->port;
	rval.address = vip;
	rval.port = vport;
	rval.rev_nat_index = svc->rev_nat_index;
	ciliumpy_lb4_reverse_sk.update(&rkey, &rval);

	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	return SOCK_ALLOW;
}

/* recvmsg4 and getpeername4: the backend a translated socket talks to, shown as the service
 * address the application asked for. An entry whose service is gone is forgotten. */
static __always_inline int sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_reverse_sk_key key = {};
	struct lb4_reverse_sk *val;

	if (!sock4_lb_proto(ctx))
		return SOCK_ALLOW;
	key.cookie = sock_cookie(ctx);
	key.address = ctx->user_ip4;
	key.port = (__be16)ctx->user_port;
	val = ciliumpy_lb4_reverse_sk.lookup(&key);
	if (!val)
		return SOCK_ALLOW;
	if (!lb4_lookup_rev_nat(val->rev_nat_index)) {
		ciliumpy_lb4_reverse_sk.delete(&key);
		return SOCK_ALLOW;
	}
	ctx->user_ip4 = val->address;
	ctx->user_port = (__u32)val->port;
	return SOCK_ALLOW;
}

#endif /* CILIUMPY_SOCK_LB_H */
