/* cgroup socket hooks: services translated at the socket (connect, sendmsg, recvmsg,
 * getpeername), so pods reach backends without per-packet NAT. Attached to the cgroup given
 * with --cgroup-root (cilium_py/datapath/attach.py); the logic is in lib/sock_lb.h. */
#include "lib/common.h"
#include "lib/sock_lb.h"

/* cgroup/connect4: TCP connect() and UDP connect() to a frontend go to a backend. */
int cil_sock4_connect(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

/* cgroup/sendmsg4: each datagram an unconnected UDP socket sends to a frontend. */
int cil_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

/* cgroup/recvmsg4: a datagram from a backend reports the frontend as its source. */
int cil_sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}

/* cgroup/getpeername4: a translated socket's peer is the frontend it asked for. */
int cil_sock4_getpeername(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}
