"""The policy/endpoint controller on the in-memory backend: what regeneration writes, and
that a policy it cannot realize never leaves an endpoint open."""

from __future__ import annotations

import pytest

from cilium_py.agent.controller import NOT_READY, READY
from cilium_py.vocab import IDENTITY_WORLD

from .controlplane import MemoryNode, namespace, pod
from .waiting import poll


def np_ingress_from(ns: str, name: str, peers: list[dict], ports=None) -> dict:
    rule = {"from": peers}
    if ports:
        rule["ports"] = ports
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [rule]}}


def cnp_allow_cidrs(ns: str, name: str, cidrs: list[str], ports: list[int]) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"endpointSelector": {}, "ingress": [
                {"fromCIDR": cidrs, "toPorts": [{"ports": [{"port": str(p), "protocol": "TCP"}
                                                           for p in ports]}]},
                {"fromEndpoints": [{}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}}


@pytest.fixture
def node(tmp_path):
    with MemoryNode(tmp_path / "state") as n:
        yield n


def test_pods_become_ready_endpoints_that_allow_without_policy(node):
    node.apply(namespace("x"), pod("x", "a", app="a"), pod("x", "b", app="b"))
    node.sync()
    assert {k: ep.state for k, ep in node.control.endpoints.items()} == {"x/a": READY, "x/b": READY}
    assert node.enforcement("x/a") == (False, False)
    assert node.ipcache_identity(str(node.endpoint("x/a").handle.ip)) == node.endpoint("x/a").identity


def test_endpoint_is_created_closed(node):
    """Until its first policy is written an endpoint denies: created with both directions
    enforced and no entries."""
    node.apply(namespace("x"), pod("x", "a"))
    node.sync()
    assert node.endpoint("x/a").state == READY
    # A new pod whose first policy write fails stays as it was created: closed.
    node.apply(pod("x", "b"), np_ingress_from("x", "allow-a", [{"podSelector": {"matchLabels": {"app": "a"}}}]))
    node.backend.policy_map.fail_puts = 1000
    node.sync()
    b = node.endpoint("x/b")
    assert b.state == NOT_READY and "denying all traffic" in b.error
    assert node.enforcement("x/b") == (True, True) and not node.entries("x/b")


def test_policy_over_budget_keeps_previous_policy_and_reports(node, tmp_path):
    small = MemoryNode(tmp_path / "small", budget=64)
    node.close()
    small.apply(namespace("x"), pod("x", "a"), pod("x", "b"),
                np_ingress_from("x", "allow-b", [{"podSelector": {"matchLabels": {}}}],
                                [{"port": 80, "protocol": "TCP"}]))
    small.sync()
    before = small.entries("x/a")
    assert small.endpoint("x/a").state == READY and small.enforcement("x/a") == (True, False)
    cidrs = [f"198.51.100.{i}/32" for i in range(40)]
    small.apply(cnp_allow_cidrs("x", "many", cidrs, [443, 8443]))
    small.sync()
    a = small.endpoint("x/a")
    assert a.state == NOT_READY
    assert "--bpf-policy-map-max" in a.error and "previous ingress policy kept" in a.error
    assert small.entries("x/a") == before          # nothing half-written
    assert small.enforcement("x/a") == (True, False)
    assert small.control.failed_endpoints()["x/a"] == a.error
    assert small.control.controllers["endpoint-x/a"].last_error == a.error
    # The loop retries the endpoint by itself after its backoff, not on the next pass.
    small.control.reconciler.run_once()
    assert small.endpoint("x/a").state == NOT_READY
    assert poll(lambda: "x/a" in small.control.reconciler.pending("pods"))
    # Once the policy fits it is ready again.
    small.delete("CiliumNetworkPolicy", "x", "many")
    small.sync()
    assert small.endpoint("x/a").state == READY and not small.control.failed_endpoints()


def test_full_map_fails_closed_for_every_endpoint_it_cannot_hold(tmp_path):
    """The issue's case, scaled down: a shared map too small for all endpoints' policies.
    Endpoints that fit are realized; the others deny everything (they never had a policy)
    and say why; none is left enforcing nothing."""
    node = MemoryNode(tmp_path / "s", policy_map_max_entries=200, budget=150)
    node.apply(namespace("x"), *[pod("x", f"p{i}") for i in range(4)])
    node.sync()
    cidrs = [f"198.51.100.{i}/32" for i in range(30)]
    node.apply(cnp_allow_cidrs("x", "many", cidrs, [443, 8443]))  # about 62 entries each
    node.sync()
    states = {k: ep.state for k, ep in node.control.endpoints.items()}
    assert sorted(states.values()) == [NOT_READY, READY, READY, READY]
    for key, ep in node.control.endpoints.items():
        ingress, _ = node.enforcement(key)
        assert ingress, f"{key} left with ingress enforcement off"
        if ep.state == NOT_READY:
            assert "policy map full" in ep.error
    assert len(node.backend.policy_map.data) <= 200


def test_kernel_error_mid_write_rolls_back(node):
    node.apply(namespace("x"), pod("x", "a"), pod("x", "b"),
               np_ingress_from("x", "p", [{"podSelector": {}}], [{"port": 80, "protocol": "TCP"}]))
    node.sync()
    before = {key: node.entries(key) for key in ("x/a", "x/b")}
    node.apply(np_ingress_from("x", "p", [{"podSelector": {}}],
                               [{"port": 80, "protocol": "TCP"}, {"port": 81, "protocol": "TCP"},
                                {"port": 82, "protocol": "TCP"}]))
    original_put = node.backend.policy_map.put
    calls = {"n": 0}

    def flaky(key, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "map update: Input/output error")
        original_put(key, **kw)

    node.backend.policy_map.put = flaky
    node.sync()
    failed = node.control.failed_endpoints()
    assert list(failed) == ["x/a"] and "Input/output error" in failed["x/a"]
    assert node.entries("x/a") == before["x/a"]           # the one write that went in, undone
    assert len(node.entries("x/b")) > len(before["x/b"])  # the other endpoint went ahead
    node.backend.policy_map.put = original_put
    assert poll(lambda: "x/a" in node.control.reconciler.pending("pods"))  # after its backoff
    node.sync()
    assert not node.control.failed_endpoints()


def test_cidr_rule_naming_a_pod_address_never_takes_its_identity(node):
    """The issue's ipcache bug: an ipBlock `except` with a pod's own /32 overwrote the pod's
    ipcache entry with a CIDR identity, and deleting the policy deleted the entry."""
    node.apply(namespace("x"), namespace("y"), pod("x", "a", app="a"), pod("y", "b", app="b"))
    node.sync()
    b = node.endpoint("y/b")
    b_ip = str(b.handle.ip)
    node.apply(np_ingress_from("x", "world-but-b", [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": [f"{b_ip}/32"]}}]))
    node.sync()
    assert node.ipcache_identity(b_ip) == b.identity
    node.delete("NetworkPolicy", "x", "world-but-b")
    node.sync()
    assert node.ipcache_identity(b_ip) == b.identity
    assert node.ipcache_identity("0.0.0.0/0") in (None, IDENTITY_WORLD)


def test_endpoint_listeners_see_ready_endpoints(node):
    """The service manager takes backends from ready endpoints only: it must be told after
    the policy pass, when new endpoints are ready, and when an endpoint's readiness moves."""
    seen = []
    node.control.endpoint_listeners.append(
        lambda keys: seen.append({k: node.control.endpoints[k].state for k in keys
                                  if k in node.control.endpoints}))
    node.apply(namespace("x"), pod("x", "a"), pod("x", "b"))
    node.sync()
    assert seen[-1] == {"x/a": READY, "x/b": READY}
    node.backend.policy_map.fail_puts = 1000
    node.apply(np_ingress_from("x", "p", [{"podSelector": {}}]))
    node.sync()
    assert seen[-1] == {"x/a": NOT_READY, "x/b": NOT_READY}
