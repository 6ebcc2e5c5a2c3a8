"""Cold agent start: `ciliumpy agent` as a subprocess with a fresh bpffs root (no pinned
maps, so it compiles, creates and pins everything), timed until it writes agent.ready;
RSS read from /proc after ready. Median of 3 runs.

Also events delivered to userspace, BPF ring buffer against perf buffer: the datapath is
built both ways with monitor aggregation "none" (a trace event per packet) and the same
number of events is generated for each by pushing an established flow through
cil_from_container with BPF_PROG_TEST_RUN, in bursts that fit the buffer; an EventReader
thread drains each burst before the next. Events/s = delivered / total time. Losses (none
expected) are counted by the datapath.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from bench.common import Result, bpf_root, median, remove_bpf_root

NODE_NAME = "benchag"
NODE_INDEX = 203
RUNS = 3
READY_TIMEOUT = 60.0
EVENT_TOTAL = 200_000
EVENT_BURST = 2048  # 2048 x 184-byte records fit the 1 MiB buffers


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _one_start(node_netns: str, root: str, run_dir: str) -> tuple[float, float]:
    from cilium_py.lab.agentproc import AgentProcess

    agent = AgentProcess(node=NODE_NAME, bpf_root=root, run_dir=run_dir, node_netns=node_netns,
                         log_path=os.path.join(run_dir, "agent.log"), poll_interval=0.005)
    try:
        agent.start(READY_TIMEOUT)
        time.sleep(0.2)  # let the reader/GC/monitor threads settle before reading RSS
        return agent.ready_seconds, _rss_mb(agent.pid)
    finally:
        agent.stop()


def agent_start(quick: bool = False) -> list[Result]:
    from cilium_py.lab.node import LabNode

    runs = 1 if quick else RUNS
    node = LabNode(NODE_NAME, NODE_INDEX)
    node_up = False
    roots: list[str] = []
    run_dir = tempfile.mkdtemp(prefix="ciliumpy-bench-run-")
    try:
        node.create()
        node_up = True
        secs, rss = [], []
        for i in range(runs):
            root = bpf_root(f"agent{i}")  # fresh root each run: a cold start pins everything
            roots.append(root)
            s, r = _one_start(node.netns, root, run_dir)
            secs.append(s)
            rss.append(r)
        return [
            Result("agent_start: cold start to ready", f"{median(secs):.2f} s",
                   notes=["runs: " + ", ".join(f"{s:.2f}" for s in secs) + " s (subprocess "
                          "spawn to agent.ready, fresh bpffs root each run)"]),
            Result("agent_start: RSS after ready", f"{median(rss):.1f} MB",
                   notes=["VmRSS per run: " + ", ".join(f"{r:.1f}" for r in rss) + " MB"]),
        ]
    finally:
        if node_up:
            node.destroy()
        for root in roots:
            remove_bpf_root(root)
        shutil.rmtree(run_dir, ignore_errors=True)


def _close_buffers(loaded) -> None:
    """Closes BCC's per-CPU perf readers while the map fd is still open. The EventReader
    keeps the table alive past bpf.cleanup(), and BCC's PerfEventArray.__del__ would
    otherwise try to clear the (closed) map at exit and print a KeyError."""
    table = loaded.events_table
    for key in list(getattr(table, "_open_key_fds", {})):
        del table[key]


def _event_rate(backend: str, total: int) -> tuple[float, int, int, int]:
    """(delivered events/s, delivered, lost, generated) for one event backend."""
    from bench.prog_cost import close_maps, packets, setup_flow_maps
    from cilium_py.datapath import loader, testrun
    from cilium_py.datapath.config import DatapathConfig
    from cilium_py.datapath.monitor import EventReader

    root = bpf_root(f"ev{backend}")
    loaded = reader = None
    maps = []
    try:
        config = DatapathConfig(node=f"benchev{backend}", bpf_root=root, events=backend,
                                monitor_aggregation="none")
        loaded = loader.load(config, pin_programs=False)
        maps = setup_flow_maps(config.pin_dir)
        lost_map = maps[4]
        fd = loaded.fd("cil_from_container")
        syn, ack = packets()
        if testrun.run(fd, syn).retval != testrun.TC_ACT_OK:
            raise RuntimeError("flow setup failed")
        reader = EventReader(loaded, lambda ev: None, poll_ms=50)
        reader.poll_once(0)
        received0, lost0 = reader.received, lost_map.total()
        reader.start()
        generated = 0
        t0 = time.perf_counter()
        while generated < total:
            # One burst fits in either buffer (1 MiB), then wait until the reader has it all:
            # the same events go through each transport, none lost, and the time is the
            # end-to-end delivery time of `total` events.
            if testrun.run(fd, ack, repeat=EVENT_BURST).retval != testrun.TC_ACT_OK:
                raise RuntimeError("established-flow path did not forward")
            generated += EVENT_BURST
            deadline = time.perf_counter() + 10
            while reader.received - received0 + lost_map.total() - lost0 < generated:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{backend}: events not delivered within 10 s")
                time.sleep(0.0002)
        elapsed = time.perf_counter() - t0
        delivered = reader.received - received0
        reader.stop()
        _close_buffers(loaded)
        reader = None
        lost = lost_map.total() - lost0
        return delivered / elapsed, delivered, lost, generated
    finally:
        if reader is not None:
            reader.stop()
            _close_buffers(loaded)
        close_maps(maps)
        if loaded is not None:
            loaded.close()
        remove_bpf_root(root)


def event_transport(quick: bool = False) -> list[Result]:
    total = EVENT_TOTAL // 10 if quick else EVENT_TOTAL
    ring = _event_rate("ringbuf", total)
    perf = _event_rate("perf", total)

    def describe(name, r):
        rate, delivered, lost, generated = r
        return (f"{name}: {delivered} of {generated} delivered in {delivered / rate:.2f} s, "
                f"{lost} lost")

    return [Result("events: ring buffer vs perf buffer", f"{ring[0] / 1000:.1f} k ev/s ringbuf",
                   f"{perf[0] / 1000:.1f} k ev/s perf", ring[0] / perf[0],
                   notes=[describe("ringbuf (1 MiB shared)", ring),
                          describe("perf (1 MiB per CPU)", perf),
                          f"aggregation none, one trace event per packet; bursts of {EVENT_BURST} "
                          "by BPF_PROG_TEST_RUN, each drained by the EventReader thread (decode "
                          "included) before the next"])]


def run(quick: bool = False) -> list[Result]:
    return agent_start(quick) + event_transport(quick)


if __name__ == "__main__":
    for row in run():
        print(row)
