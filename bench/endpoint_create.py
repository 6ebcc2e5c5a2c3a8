"""Endpoint creation time: EndpointManager.create (pod namespace, veth pair, addresses and
routes, endpoint map + ipcache writes, attaching the agent's pinned programs), median of
50 create+delete cycles (only create is timed), with 10 and with 200 endpoints already
present. No compile happens per endpoint, so the time should be flat in the count.
"""

from __future__ import annotations

import time

from bench.common import Result, bpf_root, delete_endpoints, median, remove_bpf_root

NODE_NAME = "benchep"
NODE_INDEX = 202
CYCLES = 50
LEVELS = (10, 200)
PROBE_IP_INDEX = 250  # pod_ip(250); the background endpoints use pod_ip(1..200)


def run(quick: bool = False) -> list[Result]:
    from cilium_py.agent.endpoints import EndpointManager
    from cilium_py.datapath import loader
    from cilium_py.datapath.config import DatapathConfig
    from cilium_py.lab.node import LabNode

    cycles = 10 if quick else CYCLES
    levels = (10, 40) if quick else LEVELS
    root = bpf_root("ep")
    node = LabNode(NODE_NAME, NODE_INDEX)
    loaded = em = None
    node_up = False
    background: list[str] = []
    probe_alive = False
    try:
        node.create()
        node_up = True
        dp = DatapathConfig(node=NODE_NAME, bpf_root=root)
        loaded = loader.load(dp)  # compiles once and pins the programs endpoints attach
        em = EndpointManager(dp, node.netns, node.router_ip)
        timings: dict[int, list[float]] = {}
        for level in levels:
            while len(background) < level:
                name = f"bg{len(background) + 1}"
                em.create(name, node.addressing.pod_ip(len(background) + 1), 2000)
                background.append(name)
            samples = []
            for _ in range(cycles):
                t0 = time.perf_counter()
                em.create("probe", node.addressing.pod_ip(PROBE_IP_INDEX), 3000)
                samples.append(time.perf_counter() - t0)
                probe_alive = True
                em.delete("probe")
                probe_alive = False
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
                    f"compile once at load: {loaded.compile_seconds:.2f} s (not per endpoint)"]),
        ]
    finally:
        if em is not None:
            delete_endpoints(em, (["probe"] if probe_alive else []) + background)
            em.close()
        if node_up:
            node.destroy()
        if loaded is not None:
            loaded.close()
        remove_bpf_root(root)


if __name__ == "__main__":
    for row in run():
        print(row)
