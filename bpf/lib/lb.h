/* Load balancing: service frontends, backends, reverse NAT, Maglev and session affinity
 * (reference §6, §6.1, §7). Shared by the socket hooks (bpf_sock.c), the per-packet path of
 * the pods (bpf_lxc.c) and the node's devices (bpf_host.c, bpf_xdp.c).
 *
 * A service is one "master" entry (slot 0) per frontend plus one entry per active backend
 * in slots 1..count, each naming a backend ID; backends live in their own map so a backend
 * shared by several frontends is written once. Terminating backends have no slot (no new
 * connection picks them) but keep their backend entry, so connections pinned to them by
 * conntrack (or a NAT entry) keep working until the backend is gone; session affinity
 * moves its client on to an active backend.
 *
 * Byte order: addresses and ports are network order (as in the packet); slots, counts,
 * IDs and the rev-NAT index are host order.
 */
#ifndef CILIUMPY_LB_H
#define CILIUMPY_LB_H

#include "common.h"

/* Service flags: bits 0-7 in `flags`, bits 8-15 in `flags2` (Cilium's ServiceFlags). */
#define SVC_F_EXTERNAL_IPS   (1 << 0)
#define SVC_F_NODEPORT       (1 << 1)
#define SVC_F_EXT_LOCAL      (1 << 2)  /* externalTrafficPolicy: Local */
#define SVC_F_HOSTPORT       (1 << 3)
#define SVC_F_AFFINITY       (1 << 4)  /* sessionAffinity: ClientIP */
#define SVC_F_LOADBALANCER   (1 << 5)
#define SVC_F_ROUTABLE       (1 << 6)  /* reachable from outside the node */
#define SVC_F_SOURCE_RANGE   (1 << 7)
#define SVC_F2_LOCAL_REDIRECT (1 << 0)
#define SVC_F2_LOOPBACK      (1 << 3)
#define SVC_F2_INT_LOCAL     (1 << 4)  /* internalTrafficPolicy: Local */
#define SVC_F2_TWO_SCOPES    (1 << 5)  /* external and internal backends differ */

#define LB_SCOPE_EXTERNAL 0
#define LB_SCOPE_INTERNAL 1

/* Backend states (lb4_backend.flags). */
#define BE_STATE_ACTIVE 0
#define BE_STATE_TERMINATING 1
#define BE_STATE_QUARANTINED 2
#define BE_STATE_MAINTENANCE 3

/* The master entry's union: affinity timeout (seconds) in the low 24 bits, algorithm in
 * the high 8. */
#define LB_ALGORITHM_DEFAULT 0
#define LB_ALGORITHM_RANDOM 1
#define LB_ALGORITHM_MAGLEV 2
#define LB_AFFINITY_TIMEOUT_MASK 0xffffff
#define LB_ALGORITHM_SHIFT 24

#ifndef LB_SERVICE_MAP_SIZE
#define LB_SERVICE_MAP_SIZE 65536
#endif
#ifndef LB_BACKEND_MAP_SIZE
#define LB_BACKEND_MAP_SIZE 65536
#endif
#ifndef LB_REVNAT_MAP_SIZE
#define LB_REVNAT_MAP_SIZE 65536
#endif
#ifndef LB_AFFINITY_MAP_SIZE
#define LB_AFFINITY_MAP_SIZE 65536
#endif
#ifndef LB_MAGLEV_MAP_SIZE
#define LB_MAGLEV_MAP_SIZE 65536
#endif
#ifndef LB_REVERSE_SK_MAP_SIZE
#define LB_REVERSE_SK_MAP_SIZE 262144
#endif
/* Entries of one Maglev table: a prime from reference §7. */
#ifndef LB_MAGLEV_LUT_SIZE
#define LB_MAGLEV_LUT_SIZE 16381
#endif
/* Which algorithm a service whose master says "default" uses. */
#ifndef LB_ALGORITHM
#define LB_ALGORITHM LB_ALGORITHM_RANDOM
#endif

struct lb4_key {
	__be32 address;     /* frontend VIP */
	__be16 dport;       /* frontend port */
	__u16 backend_slot; /* 0 = the master entry */
	__u8 proto;         /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 scope;         /* LB_SCOPE_* */
	__u8 pad[2];
};

struct lb4_service {
	union {
		__u32 backend_id;        /* slots 1..count */
		__u32 affinity_timeout;  /* master: timeout | algorithm << 24 */
	};
	__u16 count;          /* master: active backends in slots 1..count */
	__u16 rev_nat_index;  /* the service ID */
	__u8 flags;           /* SVC_F_* */
	__u8 flags2;          /* SVC_F2_* */
	__u16 qcount;         /* master: quarantined backends after the active ones */
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;      /* BE_STATE_* */
	__u16 cluster_id;
	__u8 zone;
	__u8 local;      /* the backend is a pod of this node (for the Local traffic policies) */
};

struct lb4_reverse_nat {
	__be32 address;  /* the VIP replies must come from */
	__be16 port;
	__u16 pad;
};

struct lb_affinity_key {
	__u64 client_id;   /* client IPv4 address, or the netns cookie at the socket */
	__u16 rev_nat_id;
	__u8 netns_cookie; /* client_id is a netns cookie */
	__u8 pad[5];
};

struct lb_affinity_val {
	__u64 last_used;   /* seconds of CLOCK_MONOTONIC */
	__u32 backend_id;
	__u32 pad;
};

struct lb4_reverse_sk_key {
	__u64 cookie;      /* socket cookie */
	__be32 address;    /* the backend the socket was connected to */
	__be16 port;
	__u16 pad;
};

struct lb4_reverse_sk {
	__be32 address;    /* the service it was asked for */
	__be16 port;
	__u16 rev_nat_index;
};

struct lb_maglev_lut {
	__u32 backend_ids[LB_MAGLEV_LUT_SIZE];
};

/* ciliumpy_lb4_services: (VIP, port, protocol, scope, slot) -> master entry or backend ID */
PINNED_MAP("hash", struct lb4_key, struct lb4_service, ciliumpy_lb4_services, LB_SERVICE_MAP_SIZE);
/* ciliumpy_lb4_backends: backend ID -> address, port and state */
PINNED_MAP("hash", __u32, struct lb4_backend, ciliumpy_lb4_backends, LB_BACKEND_MAP_SIZE);
/* ciliumpy_lb4_reverse_nat: service ID -> the VIP and port replies are rewritten to */
PINNED_MAP("hash", __u16, struct lb4_reverse_nat, ciliumpy_lb4_reverse_nat, LB_REVNAT_MAP_SIZE);
/* ciliumpy_lb4_affinity: (client, service ID) -> the backend it sticks to, and when last used */
PINNED_MAP("lru_hash", struct lb_affinity_key, struct lb_affinity_val, ciliumpy_lb4_affinity,
	   LB_AFFINITY_MAP_SIZE);
/* ciliumpy_lb4_reverse_sk: (socket, backend) -> the service address the socket asked for */
PINNED_MAP("lru_hash", struct lb4_reverse_sk_key, struct lb4_reverse_sk, ciliumpy_lb4_reverse_sk,
	   LB_REVERSE_SK_MAP_SIZE);
/* ciliumpy_lb4_maglev_inner: the shape of one service's Maglev table (a template, unused) */
BPF_ARRAY(ciliumpy_lb4_maglev_inner, struct lb_maglev_lut, 1);
/* ciliumpy_lb4_maglev: service ID -> its Maglev table; the agent swaps in a new inner map
 * per service when the backends change, so a lookup sees the old or the new table whole */
BPF_TABLE_PINNED("hash_of_maps$ciliumpy_lb4_maglev_inner", __u16, int, ciliumpy_lb4_maglev,
		 LB_MAGLEV_MAP_SIZE, PIN_ROOT "/ciliumpy_lb4_maglev");

/* A 32-bit mix of the flow's client side, so one client maps to one Maglev slot across
 * the VIPs of a service (the destination address is left out, as in Cilium). */
static __always_inline __u32 lb4_hash(__be32 saddr, __be16 sport, __be16 dport, __u8 proto)
{
	__u32 h = (__u32)saddr * 0x9e3779b1u;

	h ^= ((__u32)dport << 16 | (__u32)sport) * 0x85ebca77u;
	h ^= (__u32)proto * 0xc2b2ae3du;
	h ^= h >> 16;
	h *= 0x7feb352du;
	h ^= h >> 15;
	return h;
}

static __always_inline __u8 lb4_svc_algorithm(const struct lb4_service *svc)
{
	__u8 algorithm = svc->affinity_timeout >> LB_ALGORITHM_SHIFT;

	return algorithm == LB_ALGORITHM_DEFAULT ? LB_ALGORITHM : algorithm;
}

/* The master entry of a frontend. With two scopes, in-node clients (internal) use the
 * internal master. */
static __always_inline struct lb4_service *lb4_lookup_service(__be32 addr, __be16 dport,
							      __u8 proto, bool internal)
{
	struct lb4_key key = {};
	struct lb4_service *svc;

	key.address = addr;
	key.dport = dport;
	key.proto = proto;
	key.scope = LB_SCOPE_EXTERNAL;
	svc = ciliumpy_lb4_services.lookup(&key);
	if (svc && internal && (svc->flags2 & SVC_F2_TWO_SCOPES)) {
		key.scope = LB_SCOPE_INTERNAL;
		svc = ciliumpy_lb4_services.lookup(&key);
	}
	return svc;
}

static __always_inline struct lb4_backend *lb4_lookup_backend(__u32 backend_id)
{
	return ciliumpy_lb4_backends.lookup(&backend_id);
}

/* The backend in `slot` (1..count) of a frontend; 0 when the slot is empty. */
static __always_inline __u32 lb4_slot_backend(__be32 addr, __be16 dport, __u8 proto, __u8 scope,
					      __u16 slot)
{
	struct lb4_key key = {};
	struct lb4_service *be;

	key.address = addr;
	key.dport = dport;
	key.proto = proto;
	key.scope = scope;
	key.backend_slot = slot;
	be = ciliumpy_lb4_services.lookup(&key);
	return be ? be->backend_id : 0;
}

static __always_inline __u32 lb4_maglev_backend(const struct lb4_service *svc, __u32 hash)
{
	__u16 id = svc->rev_nat_index;
	__u32 zero = 0, slot;
	struct lb_maglev_lut *lut;
	void *inner;

	inner = ciliumpy_lb4_maglev.lookup(&id);
	if (!inner)
		return 0;
	lut = bpf_map_lookup_elem(inner, &zero);
	if (!lut)
		return 0;
	slot = hash % LB_MAGLEV_LUT_SIZE;
	/* The verifier does not follow the modulo: hide it from clang and bound it again. */
	asm volatile("" : "+r"(slot));
	if (slot >= LB_MAGLEV_LUT_SIZE)
		return 0;
	return lut->backend_ids[slot];
}

/* A new backend for a new connection: 0 when the service has no active backend.
 * `hash` feeds Maglev; random picks a uniform slot in 1..count. */
static __always_inline __u32 lb4_select_backend_id(__be32 addr, __be16 dport, __u8 proto,
						   __u8 scope, const struct lb4_service *svc,
						   __u32 hash)
{
	__u16 slot;

	if (svc->count == 0)
		return 0;
	if (lb4_svc_algorithm(svc) == LB_ALGORITHM_MAGLEV) {
		__u32 id = lb4_maglev_backend(svc, hash);

		if (id)
			return id;
		/* No table yet (the agent writes it right after the slots): fall back. */
	}
	slot = (bpf_get_prandom_u32() % svc->count) + 1;
	return lb4_slot_backend(addr, dport, proto, scope, slot);
}

/* Session affinity: the backend this client used within the timeout, if it is still
 * active; 0 otherwise. */
static __always_inline __u32 lb4_affinity_backend(const struct lb4_service *svc,
						  __u64 client_id, bool netns_cookie)
{
	struct lb_affinity_key key = {};
	struct lb_affinity_val *val;
	struct lb4_backend *be;
	__u32 timeout = svc->affinity_timeout & LB_AFFINITY_TIMEOUT_MASK;

	key.client_id = client_id;
	key.rev_nat_id = svc->rev_nat_index;
	key.netns_cookie = netns_cookie;
	val = ciliumpy_lb4_affinity.lookup(&key);
	if (!val)
		return 0;
	if (val->last_used + timeout <= bpf_mono_now()) {
		ciliumpy_lb4_affinity.delete(&key);
		return 0;
	}
	be = lb4_lookup_backend(val->backend_id);
	if (!be || be->flags != BE_STATE_ACTIVE) {
		ciliumpy_lb4_affinity.delete(&key);
		return 0;
	}
	val->last_used = bpf_mono_now();
	return val->backend_id;
}

static __always_inline void lb4_affinity_update(const struct lb4_service *svc, __u64 client_id,
						bool netns_cookie, __u32 backend_id)
{
	struct lb_affinity_key key = {};
	struct lb_affinity_val val = {};

	key.client_id = client_id;
	key.rev_nat_id = svc->rev_nat_index;
	key.netns_cookie = netns_cookie;
	val.last_used = bpf_mono_now();
	val.backend_id = backend_id;
	ciliumpy_lb4_affinity.update(&key, &val);
}

/* The backend for a new connection to `svc`, honouring session affinity. */
static __always_inline __u32 lb4_pick_backend(__be32 addr, __be16 dport, __u8 proto, __u8 scope,
					      const struct lb4_service *svc, __u32 hash,
					      __u64 client_id, bool netns_cookie)
{
	__u32 id = 0;

	if (svc->flags & SVC_F_AFFINITY) {
		id = lb4_affinity_backend(svc, client_id, netns_cookie);
		if (id)
			return id;
	}
	id = lb4_select_backend_id(addr, dport, proto, scope, svc, hash);
	if (id && (svc->flags & SVC_F_AFFINITY))
		lb4_affinity_update(svc, client_id, netns_cookie, id);
	return id;
}

static __always_inline struct lb4_reverse_nat *lb4_lookup_rev_nat(__u16 rev_nat_index)
{
	return ciliumpy_lb4_reverse_nat.lookup(&rev_nat_index);
}

/* ---- East-west frontends (added with the socket hooks and the pods' per-packet LB) ---- */
#include "maps.h"

/* The scope whose slots hold the backends of a master found by lb4_lookup_service(). */
static __always_inline __u8 lb4_svc_scope(const struct lb4_service *svc, bool internal)
{
	return internal && (svc->flags2 & SVC_F2_TWO_SCOPES) ? LB_SCOPE_INTERNAL : LB_SCOPE_EXTERNAL;
}

static __always_inline bool lb4_is_node_address(__be32 addr)
{
	struct endpoint_info *ep = lookup_ip4_endpoint(addr);

	return ep && (ep->flags & ENDPOINT_F_HOST);
}

static __always_inline bool lb4_is_loopback(__be32 addr)
{
	return (addr & htonl(0xff000000)) == htonl(0x7f000000);
}

/* The frontend a pod (or a process of the node) reaches at addr:dport, with the internal
 * scope; NULL when there is none. `*fe_addr` is the address of the frontend found, the one
 * its backend slots are keyed by.
 *
 * An ExternalIPs frontend counts only at one of this node's addresses: a Service must not
 * capture in-cluster traffic to an address outside (CVE-2020-8554, Cilium's default
 * mitigation). With `wildcard`, a NodePort or HostPort service is also reached at any node
 * address through its 0.0.0.0:port frontend, and a NodePort at loopback addresses too. */
static __always_inline struct lb4_service *lb4_lookup_service_ew(__be32 addr, __be16 dport,
								 __u8 proto, bool wildcard,
								 __be32 *fe_addr)
{
	struct lb4_service *svc = lb4_lookup_service(addr, dport, proto, true);

	*fe_addr = addr;
	if (svc) {
		if ((svc->flags & SVC_F_EXTERNAL_IPS) && !lb4_is_node_address(addr))
			return NULL;
		return svc;
	}
	if (!wildcard || (!lb4_is_loopback(addr) && !lb4_is_node_address(addr)))
		return NULL;
	svc = lb4_lookup_service(0, dport, proto, true);
	if (!svc || !(svc->flags & (SVC_F_NODEPORT | SVC_F_HOSTPORT)))
		return NULL;
	/* Loopback reaches NodePorts only (as in Cilium): a hostPort there would capture every
	 * pod's connections to its own localhost port of the same number. */
	if (lb4_is_loopback(addr) && !(svc->flags & SVC_F_NODEPORT))
		return NULL;
	*fe_addr = 0;
	return svc;
}

/* ---- Node-local backends (externalTrafficPolicy / internalTrafficPolicy Local; added with
 * the north-south path, bpf/lib/nodeport.h) ---- */
#ifndef LB_LOCAL_SCAN_MAX
#define LB_LOCAL_SCAN_MAX 64 /* slots looked at for local backends */
#endif

static __always_inline bool lb4_backend_is_local(__u32 backend_id)
{
	struct lb4_backend *be = backend_id ? lb4_lookup_backend(backend_id) : NULL;

	return be && be->local;
}

/* A uniformly random node-local backend among slots 1..count (the first LB_LOCAL_SCAN_MAX
 * of them): reservoir sampling, so a service may list local and remote backends in any
 * order. 0 when none is local. */
static __always_inline __u32 lb4_select_local_backend_id(__be32 addr, __be16 dport, __u8 proto,
							 __u8 scope,
							 const struct lb4_service *svc)
{
	__u32 chosen = 0, seen = 0, id;
	__u16 slot;

	for (slot = 1; slot <= LB_LOCAL_SCAN_MAX; slot++) {
		if (slot > svc->count)
			break;
		id = lb4_slot_backend(addr, dport, proto, scope, slot);
		if (!lb4_backend_is_local(id))
			continue;
		seen++;
		if (bpf_get_prandom_u32() % seen == 0)
			chosen = id;
	}
	return chosen;
}

/* lb4_pick_backend() restricted to node-local backends: an affinity or Maglev choice
 * stands only when it is local. */
static __always_inline __u32 lb4_pick_local_backend(__be32 addr, __be16 dport, __u8 proto,
						    __u8 scope, const struct lb4_service *svc,
						    __u32 hash, __u64 client_id, bool netns_cookie)
{
	__u32 id = 0;

	if (svc->flags & SVC_F_AFFINITY) {
		id = lb4_affinity_backend(svc, client_id, netns_cookie);
		if (lb4_backend_is_local(id))
			return id;
	}
	id = 0;
	if (svc->count && lb4_svc_algorithm(svc) == LB_ALGORITHM_MAGLEV) {
		id = lb4_maglev_backend(svc, hash);
		if (!lb4_backend_is_local(id))
			id = 0;
	}
	if (!id)
		id = lb4_select_local_backend_id(addr, dport, proto, scope, svc);
	if (id && (svc->flags & SVC_F_AFFINITY))
		lb4_affinity_update(svc, client_id, netns_cookie, id);
	return id;
}

#endif /* CILIUMPY_LB_H */
