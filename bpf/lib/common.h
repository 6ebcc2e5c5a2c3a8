/* Shared includes, constants and small helpers for every ciliumpy program.
 *
 * Build-time knobs come from the loader as -D flags (see cilium_py/datapath/loader.py):
 *   PIN_ROOT            bpffs directory every map is pinned in ("/sys/fs/bpf/ciliumpy/<node>")
 *   CT_MAP_SIZE_TCP     entries of ciliumpy_ct4_global
 *   CT_MAP_SIZE_ANY     entries of ciliumpy_ct_any4_global
 *   CT_TIMEOUT_*        conntrack lifetimes in seconds
 *   EVENTS_PERF         when defined, events go to a perf buffer instead of the ring buffer
 *   MONITOR_AGGREGATION 0 = trace every forwarded packet, 2 = "medium" (Cilium's default)
 */
#ifndef CILIUMPY_COMMON_H
#define CILIUMPY_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/pkt_cls.h>

#ifndef PIN_ROOT
#error "PIN_ROOT must name the bpffs directory the maps are pinned in"
#endif

/* Every map is pinned, so a restarted agent (and the CLI) finds the same map. BCC creates
 * the map and pins it when the path is empty, and reuses the pinned map otherwise. */
#define PINNED_MAP(type, key_t, value_t, name, max) \
	BPF_TABLE_PINNED(type, key_t, value_t, name, max, PIN_ROOT "/" #name)
#define PINNED_MAP_F(type, key_t, value_t, name, max, flags) \
	BPF_TABLE_PINNED(type, key_t, value_t, name, max, PIN_ROOT "/" #name, flags)

/* Reserved security identities (reference §10). */
#define IDENTITY_UNKNOWN 0
#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2

/* Metric / verdict directions, as in Cilium's metrics map. */
#define METRIC_DIR_UNKNOWN 0
#define METRIC_DIR_INGRESS 1
#define METRIC_DIR_EGRESS 2
#define METRIC_DIR_SERVICE 3 /* Cilium's service-translation drops; none counted here yet */

#define CT_EGRESS 0
#define CT_INGRESS 1

/* Verdict of a program that keeps going: not a drop, not yet a final tc action. */
#define CTX_ACT_OK TC_ACT_OK
#define CTX_ACT_DROP TC_ACT_SHOT

#ifndef NSEC_PER_SEC
#define NSEC_PER_SEC 1000000000ULL
#endif

static __always_inline __u32 bpf_mono_now(void)
{
	return (__u32)(bpf_ktime_get_ns() / NSEC_PER_SEC);
}

#endif /* CILIUMPY_COMMON_H */
