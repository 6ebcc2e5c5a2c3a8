"""One lab for the e2e session: namespaces x, y, z with pods a, b, c each, every pod
listening on TCP 80 (named "http") and UDP 81, plus a listener in the world namespace.
Tests apply policies, compare full reachability matrices, and remove what they applied."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import yaml

from cilium_py.datapath.maps.conntrack import ConntrackTables
from cilium_py.lab.lab import WORLD_PORT, Lab
from cilium_py.lab.matrix import Target, label, measure

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
ALL = tuple(f"{ns}/{pod}" for ns, pod in itertools.product(NAMESPACES, PODS))


def cluster_manifests() -> list[dict]:
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"ns": ns}}}
            for ns in NAMESPACES]
    for ns, pod in itertools.product(NAMESPACES, PODS):
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
                     "spec": {"containers": [{"name": "c", "ports": [
                         {"name": "http", "containerPort": 80, "protocol": "TCP"},
                         {"name": "dns", "containerPort": 81, "protocol": "UDP"}]}]}})
    return docs


class E2ELab:
    def __init__(self, lab: Lab, workdir: Path):
        self.lab = lab
        self.workdir = workdir
        eps = {ep["pod"]: ep for ep in lab.client().endpoints()}
        self.sources = {pod: eps[pod]["netns"] for pod in ALL}
        self.ips = {pod: eps[pod]["ipv4"] for pod in ALL}
        self.world = Target("world", lab.world_ip(), WORLD_PORT)
        self._n = 0

    def write(self, docs: list[dict], name: str | None = None) -> Path:
        self._n += 1
        path = self.workdir / (name or f"policy-{self._n}.yaml")
        path.write_text(yaml.safe_dump_all(docs))
        return path

    def apply(self, docs: list[dict]) -> Path:
        path = self.write(docs)
        self.lab.apply(path)
        return path

    def targets(self, protocol: str = "TCP") -> list[Target]:
        port = 80 if protocol == "TCP" else 81
        return [Target(pod, self.ips[pod], port, protocol) for pod in ALL]

    def matrix(self, protocol: str = "TCP", world: bool = False) -> dict[tuple[str, str], bool]:
        targets = self.targets(protocol) + ([self.world] if world else [])
        measured = measure(self.sources, targets)
        # Keyed by (source pod, target name); a pod talking to itself never crosses its veth.
        return {(src, t.name): measured[(src, label(t))] for src in ALL for t in targets if src != t.name}

    def expect(self, allowed, protocol: str = "TCP", world: bool = False, udp=None) -> None:
        """Checks the full matrix. A TCP check also checks UDP 81 with the same expectation
        (or with `udp`), unless udp=False: most cases are about peers, not protocols."""
        # Probes test policy on new connections: a UDP probe whose random source port
        # matches a live conntrack entry of an earlier, allowed probe would ride on it.
        tables = ConntrackTables(os.path.join(self.lab.bpf_root, self.lab.name))
        tables.flush()
        tables.close()
        got = self.matrix(protocol, world)
        want = {key: bool(allowed(*key)) for key in got}
        wrong = sorted(f"{s} -> {d}: got {'allowed' if got[(s, d)] else 'denied'}"
                       for (s, d) in got if got[(s, d)] != want[(s, d)])
        assert not wrong, f"{len(wrong)} of {len(got)} {protocol} probes differ:\n" + "\n".join(wrong)
        if protocol == "TCP" and udp is not False:
            self.expect(udp or allowed, protocol="UDP")


@pytest.fixture(scope="session")
def e2e(privileged, unique, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    (workdir / "cluster").mkdir()
    (workdir / "cluster" / "cluster.yaml").write_text(yaml.safe_dump_all(cluster_manifests()))
    lab = Lab(f"e{unique}", bpf_root=f"/sys/fs/bpf/ciliumpy-test-{unique}-e2e")
    try:
        lab.up(workdir / "cluster")
        yield E2ELab(lab, workdir)
    finally:
        lab.down()


@pytest.fixture
def cluster(e2e):
    """The lab with no policy; whatever a test applied is deleted afterwards."""
    applied_before = set(e2e.lab.paths.manifests.iterdir())
    yield e2e
    for path in set(e2e.lab.paths.manifests.iterdir()) - applied_before:
        path.unlink()
    e2e.lab.wait_realized()
