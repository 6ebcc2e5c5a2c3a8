"""Per-packet cost of cil_from_container measured with BPF_PROG_TEST_RUN, against a trivial
tc program (`return TC_ACT_OK;`) compiled in the same run and timed the same way.

- Conntrack hit: an established TCP flow (CT entry present, egress policy enforced, so the
  packet skips policy). repeat=N in one syscall; the kernel reports ns per run.
- New flow with policy: a SYN whose CT entry is deleted before every run, so each run does
  the policy lookup, the verdict event and the CT create. repeat=1 many times; median of
  the kernel-reported durations. The trivial program is timed with repeat=1 too, interleaved.

No device is touched: test-run executes the program on a synthetic skb whose device is the
calling namespace's loopback (ifindex 1), which is why the endpoint is registered with
ifindex 1. Events go to the ring buffer, which is drained between batches of runs.
"""

from __future__ import annotations

import ipaddress
import os

from bench.common import Result, bpf_root, fmt_ns, median, remove_bpf_root

NODE = "benchprog"
SRC_IP, DST_IP = "10.244.250.2", "10.244.250.3"
SRC_ID, DST_ID = 1000, 1001
SRC_EP = 7
SPORT, DPORT = 40000, 80
TEST_RUN_IFINDEX = 1  # the loopback device BPF_PROG_TEST_RUN gives the skb

HIT_REPEAT = 100_000
HIT_ROUNDS = 5
NEW_FLOW_RUNS = 2000
DRAIN_EVERY = 200

TRIVIAL_SRC = r"""
#include <uapi/linux/pkt_cls.h>
int bench_trivial(struct __sk_buff *skb) { return TC_ACT_OK; }
"""


def setup_flow_maps(pin_dir: str) -> list:
    """Registers SRC (ifindex 1, egress enforced) and DST as endpoints with identities and
    allows SRC -> DST TCP DPORT. Returns the open maps: endpoints, ipcache, policy,
    conntrack tables, events-lost counter (the caller closes them)."""
    from cilium_py.datapath.maps.conntrack import ConntrackTables
    from cilium_py.datapath.maps.endpoints import ENDPOINT_F_POLICY_EGRESS, EndpointMap
    from cilium_py.datapath.maps.events import EventsLostMap
    from cilium_py.datapath.maps.ipcache import IPCacheMap
    from cilium_py.datapath.maps.policy import EGRESS, PolicyMap

    maps = [EndpointMap(pin_dir), IPCacheMap(pin_dir), PolicyMap(pin_dir), ConntrackTables(pin_dir),
            EventsLostMap(pin_dir)]
    endpoints, ipcache, policy = maps[:3]
    endpoints.upsert(SRC_IP, endpoint_id=SRC_EP, ifindex=TEST_RUN_IFINDEX, identity=SRC_ID,
                     flags=ENDPOINT_F_POLICY_EGRESS)
    endpoints.upsert(DST_IP, endpoint_id=SRC_EP + 1, ifindex=TEST_RUN_IFINDEX + 1, identity=DST_ID)
    ipcache.upsert(SRC_IP, SRC_ID)
    ipcache.upsert(DST_IP, DST_ID)
    policy.allow(SRC_EP, DST_ID, DPORT, 6, EGRESS)
    return maps


def close_maps(maps) -> None:
    for m in maps:
        try:
            m.close()
        except Exception:  # noqa: BLE001
            pass


def packets() -> tuple[bytes, bytes]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    def pkt(flags: str) -> bytes:
        return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                     / IP(src=SRC_IP, dst=DST_IP) / TCP(sport=SPORT, dport=DPORT, flags=flags)
                     / (b"x" * 64))

    return pkt("S"), pkt("A")


def run(quick: bool = False) -> list[Result]:
    from cilium_py.datapath import loader, testrun
    from cilium_py.datapath.bcc_import import import_bcc
    from cilium_py.datapath.config import DatapathConfig
    from cilium_py.datapath.maps.conntrack import TUPLE_F_OUT, CtTuple4
    from cilium_py.datapath.monitor import EventReader

    hit_repeat = HIT_REPEAT // 10 if quick else HIT_REPEAT
    new_runs = NEW_FLOW_RUNS // 10 if quick else NEW_FLOW_RUNS
    root = bpf_root("prog")
    bcc = import_bcc()
    loaded = trivial_bpf = None
    maps = []
    affinity = os.sched_getaffinity(0)
    try:
        # One CPU for every run: per-CPU state (LRU free lists, per-CPU maps, caches) then
        # stays put, which makes the medians repeatable.
        os.sched_setaffinity(0, {max(affinity)})
        config = DatapathConfig(node=NODE, bpf_root=root)  # monitor aggregation "medium"
        loaded = loader.load(config, pin_programs=False)
        trivial_bpf = bcc.BPF(text=TRIVIAL_SRC)
        trivial_fd = trivial_bpf.load_func("bench_trivial", bcc.BPF.SCHED_CLS).fd
        lxc_fd = loaded.fd("cil_from_container")

        maps = setup_flow_maps(config.pin_dir)
        ct, lost_map = maps[3], maps[4]

        received = [0]
        reader = EventReader(loaded, lambda ev: received.__setitem__(0, received[0] + 1))
        syn, ack = packets()
        tuple_ = CtTuple4(saddr=int(ipaddress.IPv4Address(SRC_IP)),
                          daddr=int(ipaddress.IPv4Address(DST_IP)), sport=SPORT, dport=DPORT,
                          nexthdr=6, flags=TUPLE_F_OUT)
        lost_before = lost_map.total()

        # Sanity: the SYN is allowed and creates its CT entry; the ACK then hits it.
        r = testrun.run(lxc_fd, syn)
        if r.retval != testrun.TC_ACT_OK or ct.tcp.lookup(tuple_) is None:
            raise RuntimeError(f"new-flow path did not forward and create CT (retval {r.retval})")
        r = testrun.run(lxc_fd, ack)
        if r.retval != testrun.TC_ACT_OK:
            raise RuntimeError(f"CT-hit path returned {r.retval}")
        reader.poll_once(0)

        # (a) Conntrack hit, repeat=N, alternating with the trivial program.
        hit_ns, triv_ns = [], []
        for _ in range(HIT_ROUNDS):
            triv_ns.append(testrun.run(trivial_fd, ack, repeat=hit_repeat).ns_per_run)
            res = testrun.run(lxc_fd, ack, repeat=hit_repeat)
            if res.retval != testrun.TC_ACT_OK:
                raise RuntimeError(f"CT-hit path returned {res.retval}")
            hit_ns.append(res.ns_per_run)
            reader.poll_once(0)
        hit, triv = median(hit_ns), median(triv_ns)

        # (b) New flow with policy: delete the CT entry before each run, repeat=1.
        new_ns, triv1_ns = [], []
        for i in range(new_runs):
            triv1_ns.append(testrun.run(trivial_fd, syn).ns_per_run)
            ct.tcp.delete(tuple_)
            res = testrun.run(lxc_fd, syn)
            if res.retval != testrun.TC_ACT_OK:
                raise RuntimeError(f"new-flow path returned {res.retval}")
            new_ns.append(res.ns_per_run)
            if i % DRAIN_EVERY == DRAIN_EVERY - 1:
                reader.poll_once(0)
        reader.poll_once(0)
        if ct.tcp.lookup(tuple_) is None:
            raise RuntimeError("new-flow runs did not create the CT entry")
        new, triv1 = median(new_ns), median(triv1_ns)
        lost = lost_map.total() - lost_before

        note = (f"events: monitor aggregation medium, ring buffer drained every {DRAIN_EVERY} "
                f"runs; {received[0]} delivered, {lost} lost")
        pinned = f"process pinned to CPU {max(affinity)}"
        return [
            Result("prog_cost: CT hit (from-container)",
                   f"{fmt_ns(hit)}/pkt", f"{fmt_ns(triv)}/pkt trivial", hit / triv,
                   "<= 3x trivial", hit / triv <= 3.0,
                   [f"repeat={hit_repeat}, median of {HIT_ROUNDS} rounds, {pinned}", note]),
            Result("prog_cost: new flow + policy + CT create",
                   f"{fmt_ns(new)}/pkt", f"{fmt_ns(triv1)}/pkt trivial", new / triv1,
                   "<= 8x trivial", new / triv1 <= 8.0,
                   [f"repeat=1, median of {new_runs} runs, CT entry deleted before each run "
                    f"(p90 {fmt_ns(sorted(new_ns)[int(len(new_ns) * 0.9)])})"]),
        ]
    finally:
        os.sched_setaffinity(0, affinity)
        close_maps(maps)
        if trivial_bpf is not None:
            trivial_bpf.cleanup()
        if loaded is not None:
            loaded.close()
        remove_bpf_root(root)


if __name__ == "__main__":
    for row in run():
        print(row)
