"""Reachability matrices: which pod reaches which, measured with real connections.

Every probe is a socket made inside the source pod's namespace (setns on the probing
thread), so probes run in parallel and a denied connection costs one timeout, not one
process. TCP probes expect the listener's greeting (the pod's name); UDP probes expect the
echo."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cilium_py.datapath import netns


@dataclass(frozen=True)
class Target:
    name: str      # "namespace/pod" or "world"
    ip: str
    port: int
    protocol: str = "TCP"


def probe(src_netns: str, target: Target, timeout: float = 0.5) -> bool:
    with netns.entered(src_netns):
        kind = socket.SOCK_STREAM if target.protocol == "TCP" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
    with sock:
        sock.settimeout(timeout)
        try:
            if target.protocol == "TCP":
                sock.connect((target.ip, target.port))
                return sock.recv(256).startswith(target.name.encode())
            sock.sendto(b"probe", (target.ip, target.port))
            return sock.recvfrom(256)[0].endswith(b"probe")
        except OSError:
            return False


def measure(sources: dict[str, str], targets: list[Target], timeout: float = 0.5) -> dict:
    """{(source, target label): reachable} for every source namespace and target."""
    jobs = [(src, t) for src in sources for t in targets]
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = pool.map(lambda job: probe(sources[job[0]], job[1], timeout), jobs)
        return {(src, label(t)): ok for (src, t), ok in zip(jobs, results)}


def label(target: Target) -> str:
    return f"{target.name}:{target.port}/{target.protocol}"


def render(matrix: dict, sources: list[str], targets: list[Target]) -> str:
    cols = [label(t) for t in targets]
    width = max(len(s) for s in sources) + 2
    lines = [" " * width + "  ".join(c for c in cols)]
    for src in sources:
        # A pod talking to itself never leaves its namespace: no policy applies.
        cells = [("self" if t.name == src else "ok" if matrix[(src, c)] else "--").center(len(c))
                 for t, c in zip(targets, cols)]
        lines.append(src.ljust(width) + "  ".join(cells))
    return "\n".join(lines)
