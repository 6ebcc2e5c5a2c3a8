"""Incremental regeneration equals a fresh one.

Random sequences of pod, namespace-label and policy changes (NetworkPolicy,
CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy, allows and denies, endpoint, CIDR
and entity peers) are applied to one node that regenerates incrementally; after every
step a new node given the same objects regenerates from scratch, and the two must have
realized the same policy entries, enforcement, ipcache and endpoint states (in the normal
form of tests/unit/controlplane.py)."""

from __future__ import annotations

import random

import pytest

from .controlplane import MemoryNode, namespace, pod

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
APPS = ("a", "b", "c")
CIDRS = ("10.200.0.0/24", "10.200.0.0/28", "0.0.0.0/0", "198.51.100.0/24", "198.51.100.7/32")
PORTS = ([{"port": 80, "protocol": "TCP"}], [{"port": 80, "endPort": 90, "protocol": "TCP"}],
         [{"port": 53, "protocol": "UDP"}], None)


def _np(rng: random.Random, name: str) -> dict:
    ns = rng.choice(NAMESPACES)
    peers = rng.choice([
        [{"podSelector": {"matchLabels": {"app": rng.choice(APPS)}}}],
        [{"namespaceSelector": {"matchLabels": {"team": rng.choice(("red", "blue"))}}}],
        [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": rng.choice(APPS)}}}],
        [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.200.0.0/28"]}}],
        [{"ipBlock": {"cidr": rng.choice(CIDRS)}}],
        [],
    ])
    direction = rng.choice(("Ingress", "Egress"))
    rule = {"from" if direction == "Ingress" else "to": peers}
    ports = rng.choice(PORTS)
    if ports:
        rule["ports"] = ports
    selector = rng.choice([{}, {"matchLabels": {"app": rng.choice(APPS)}}])
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": selector, "policyTypes": [direction],
                     direction.lower(): [rule] if rng.random() < 0.9 else []}}


def _cilium_rule(rng: random.Random, direction: str) -> dict:
    side = "from" if direction.startswith("ingress") else "to"
    peer = rng.choice([
        {f"{side}Endpoints": [{"matchLabels": {"app": rng.choice(APPS)}}]},
        {f"{side}Endpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": rng.choice(NAMESPACES)}}]},
        {f"{side}CIDR": [rng.choice(CIDRS)]},
        {f"{side}CIDRSet": [{"cidr": "0.0.0.0/0", "except": ["10.200.0.0/28"]}]},
        {f"{side}Entities": [rng.choice(("world", "cluster", "host", "all"))]},
    ])
    if rng.random() < 0.5:
        peer["toPorts"] = [{"ports": [{"port": str(rng.choice((80, 81, 443))), "protocol": "TCP"}]}]
    return peer


def _cnp(rng: random.Random, name: str, clusterwide: bool) -> dict:
    direction = rng.choice(("ingress", "egress", "ingressDeny", "egressDeny"))
    spec = {"endpointSelector": rng.choice([{}, {"matchLabels": {"app": rng.choice(APPS)}}]),
            direction: [_cilium_rule(rng, direction)]}
    if clusterwide:
        return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                "metadata": {"name": name}, "spec": spec}
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": rng.choice(NAMESPACES)}, "spec": spec}


class Scenario:
    def __init__(self, node: MemoryNode, rng: random.Random):
        self.node, self.rng = node, rng
        self.pods: set[tuple[str, str]] = set()
        self.policies: dict[str, tuple[str, str]] = {}  # name -> (kind, namespace)

    def step(self) -> str:
        rng, node = self.rng, self.node
        op = rng.choice(("pod", "pod", "pod-delete", "namespace", "policy", "policy",
                         "policy-delete"))
        if op == "pod":
            ns, name = rng.choice(NAMESPACES), rng.choice(PODS)
            node.apply(pod(ns, name, app=rng.choice(APPS), tier=rng.choice(("fe", "be"))))
            self.pods.add((ns, name))
            return f"pod {ns}/{name}"
        if op == "pod-delete" and self.pods:
            ns, name = rng.choice(sorted(self.pods))
            node.delete("Pod", ns, name)
            self.pods.discard((ns, name))
            return f"delete pod {ns}/{name}"
        if op == "namespace":
            ns = rng.choice(NAMESPACES)
            node.apply(namespace(ns, team=rng.choice(("red", "blue"))))
            return f"namespace {ns}"
        if op == "policy-delete" and self.policies:
            name = rng.choice(sorted(self.policies))
            kind, ns = self.policies.pop(name)
            node.delete(kind, ns, name)
            return f"delete {kind} {name}"
        name = f"p{rng.randrange(6)}"
        if name in self.policies:  # one kind per name: replace keeps the kind's key stable
            kind, ns = self.policies.pop(name)
            node.delete(kind, ns, name)
        kind = rng.choice(("np", "cnp", "ccnp"))
        doc = _np(rng, name) if kind == "np" else _cnp(rng, name, clusterwide=kind == "ccnp")
        node.apply(doc)
        self.policies[name] = (doc["kind"], doc["metadata"].get("namespace", ""))
        return f"{doc['kind']} {name}"


def _assert_equal_to_fresh(node: MemoryNode, state_dir, history: list[str]) -> None:
    with node.fresh(state_dir) as fresh:
        got, want = node.realized(), fresh.realized()
    for part in want:
        if got[part] != want[part]:
            diff = got[part] ^ want[part] if isinstance(want[part], set) else {
                k: (got[part].get(k), want[part].get(k))
                for k in set(got[part]) | set(want[part]) if got[part].get(k) != want[part].get(k)}
            pytest.fail(f"incremental {part} differs from a fresh regeneration after "
                        f"{' ; '.join(history)}:\n{sorted(map(str, diff))[:20] if isinstance(diff, set) else diff}")


@pytest.mark.parametrize("seed", range(24))
def test_incremental_equals_fresh(tmp_path, seed):
    rng = random.Random(seed)
    with MemoryNode(tmp_path / "incremental") as node:
        for ns in NAMESPACES:
            node.apply(namespace(ns, team="red"))
        scenario = Scenario(node, rng)
        history = []
        for step in range(30):
            history.append(scenario.step())
            node.sync()
            _assert_equal_to_fresh(node, tmp_path / f"fresh-{step}", history)


def test_ipcache_bug_sequence_equals_fresh(tmp_path):
    """The issue's case as a fixed sequence: a policy excepting a pod's /32, then a deny
    from that pod's namespace next to an allow-all, then the first policy deleted."""
    with MemoryNode(tmp_path / "incremental") as node:
        for ns in NAMESPACES:
            node.apply(namespace(ns, ns=ns))
        for ns in NAMESPACES:
            for name in PODS:
                node.apply(pod(ns, name, pod=name))
        node.sync()
        b_ip = str(node.endpoint("y/b").handle.ip)
        steps = [
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "world-but-yb", "namespace": "x"},
             "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [
                 {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [f"{b_ip}/32"]}}]}]}},
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "allow-all", "namespace": "x"},
             "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}},
            {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
             "metadata": {"name": "deny-y", "namespace": "x"},
             "spec": {"endpointSelector": {}, "ingressDeny": [{"fromEndpoints": [
                 {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y"}}]}]}},
        ]
        history = []
        for doc in steps:
            node.apply(doc)
            node.sync()
            history.append(doc["metadata"]["name"])
            _assert_equal_to_fresh(node, tmp_path / f"fresh-{len(history)}", history)
        node.delete("NetworkPolicy", "x", "world-but-yb")
        node.sync()
        history.append("delete world-but-yb")
        _assert_equal_to_fresh(node, tmp_path / "fresh-last", history)
        assert node.ipcache_identity(b_ip) == node.endpoint("y/b").identity
