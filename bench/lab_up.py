"""`ciliumpy lab up` of 20 pods, to ready: node namespace, agent start (compile, load,
attach), 20 endpoints with listeners, policy realized everywhere. Median of 3 runs; the
pieces (agent start, per-endpoint cost) are in the other benchmarks."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from bench.common import Result, bpf_root, median

PODS = 20
RUNS = 3


def manifests(directory: Path) -> None:
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}]
    for i in range(PODS):
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": f"pod{i}", "namespace": "bench", "labels": {"app": f"app{i % 4}"}},
                     "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]}})
    docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "app0-from-app1", "namespace": "bench"},
                 "spec": {"podSelector": {"matchLabels": {"app": "app0"}},
                          "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
                                       "ports": [{"port": 80}]}]}})
    (directory / "bench.yaml").write_text(yaml.safe_dump_all(docs))


def run(quick: bool = False) -> list[Result]:
    from cilium_py.lab.lab import Lab

    runs = 1 if quick else RUNS
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        manifests(Path(tmp))
        for _ in range(runs):
            lab = Lab("benchlab", bpf_root=bpf_root("lab"))
            lab.down()
            try:
                t0 = time.monotonic()
                result = lab.up(tmp)
                times.append(time.monotonic() - t0)
                assert result["endpoints"] == PODS, result
            finally:
                lab.down()
    return [Result("lab_up: 20 pods to ready", f"{median(times):.2f} s", target="reported",
                   notes=[f"runs: {', '.join(f'{t:.2f}' for t in times)} s (namespace, agent compile "
                          f"+ load + attach, 20 endpoints with listeners, policy realized)"])]
