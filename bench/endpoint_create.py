"""Endpoint creation time: EndpointManager.create (pod namespace, veth pair, addresses and
routes, endpoint map + ipcache writes, attaching the pinned programs of an agent running
next to it), median of 50 create+delete cycles (only create is timed), with 10 and with
200 endpoints already present. No compile happens per endpoint, so the time should be
flat in the count.
"""

from __future__ import annotations

import time

from bench.common import Result, bpf_root, median

NODE_NAME = "benchep"
NODE_INDEX = 202
CYCLES = 50
LEVELS = (10, 200)
PROBE_IP_INDEX = 250  # pod_ip(250); the background endpoints use pod_ip(1..200)


def run(quick: bool = False) -> list[Result]:
    from cilium_py.lab.harness import PodSpec, running_node
    from cilium_py.lab.node import LabNode

    cycles = 10 if quick else CYCLES
    levels = (10, 40) if quick else LEVELS
    # The agent compiles once and pins the programs endpoints attach; teardown removes the
    # endpoints, the probe's too if a cycle failed between its create and delete.
    with running_node(LabNode(NODE_NAME, NODE_INDEX), bpf_root=bpf_root("ep"), devices=()) as node:
        compile_seconds = node.client().status()["datapath"]["load_seconds"]
        timings: dict[int, list[float]] = {}
        for level in levels:
            while len(node.pods) < level:
                node.add_endpoint(f"bg{len(node.pods) + 1}", PodSpec(2000))
            samples = []
            for _ in range(cycles):
                t0 = time.perf_counter()
                node.manager.create("probe", node.node.addressing.pod_ip(PROBE_IP_INDEX), 3000)
                samples.append(time.perf_counter() - t0)
                node.manager.delete("probe")
            timings[level] = samples
    lo, hi = levels
    m_lo, m_hi = median(timings[lo]) * 1000, median(timings[hi]) * 1000
    growth = m_hi / m_lo
    flat = growth <= 1.25
    p90 = {lv: sorted(s)[int(len(s) * 0.9)] * 1000 for lv, s in timings.items()}
    return [
        Result(f"endpoint_create: {hi} existing", f"{m_hi:.1f} ms",
               f"{m_lo:.1f} ms with {lo} existing", growth, "<= 50 ms, flat (<= 1.25x)",
               m_hi <= 50 and m_lo <= 50 and flat,
               [f"median of {cycles} create+delete cycles per level (create timed); "
                f"p90 {p90[lo]:.1f} ms ({lo}), {p90[hi]:.1f} ms ({hi})",
                f"compile once at agent start: {compile_seconds:.2f} s (not per endpoint)"]),
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
