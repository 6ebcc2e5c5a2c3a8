"""Reachability matrices with real connections, in the style of the Kubernetes network
policy e2e suite: namespaces x, y, z with pods a, b, c; each case applies policies and
checks every pair."""

from __future__ import annotations

import pytest
import yaml

from .manifests import ccnp, cnp, np

pytestmark = pytest.mark.e2e


def ns_of(pod):
    return pod.split("/")[0]


def test_no_policy_allows_everything(cluster):
    cluster.expect(lambda s, d: True)


def test_default_deny_ingress_in_one_namespace(cluster):
    cluster.apply([np("deny", "x", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    cluster.expect(lambda s, d: ns_of(d) != "x")


def test_default_deny_egress_in_one_namespace(cluster):
    cluster.apply([np("deny", "x", {"podSelector": {}, "policyTypes": ["Egress"]})])
    cluster.expect(lambda s, d: ns_of(s) != "x", world=True)


def test_allow_same_namespace(cluster):
    cluster.apply([np("same-ns", "x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})])
    cluster.expect(lambda s, d: ns_of(d) != "x" or ns_of(s) == "x")


def test_namespace_selector(cluster):
    cluster.apply([np("from-y", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})])
    cluster.expect(lambda s, d: d != "x/a" or ns_of(s) == "y")


def test_pod_and_namespace_selector_in_one_peer(cluster):
    cluster.apply([np("from-y-b", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                   "podSelector": {"matchLabels": {"pod": "b"}}}]}]})])
    cluster.expect(lambda s, d: d != "x/a" or s == "y/b")


def test_ports_and_protocols(cluster):
    cluster.apply([np("tcp-80", "x", {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]})])
    cluster.expect(lambda s, d: True, udp=lambda s, d: ns_of(d) != "x")


def test_named_port_and_end_port(cluster):
    cluster.apply([
        np("named", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                          "ingress": [{"ports": [{"port": "http"}]}]}),
        np("range", "y", {"podSelector": {"matchLabels": {"pod": "a"}},
                          "ingress": [{"ports": [{"protocol": "UDP", "port": 70, "endPort": 81}]}]}),
    ])
    cluster.expect(lambda s, d: d != "y/a", udp=lambda s, d: d != "x/a")


def test_egress_to_ip_block_only(cluster):
    world_cidr = cluster.world.ip.rsplit(".", 1)[0] + ".0/24"
    cluster.apply([np("egress-world", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                            "policyTypes": ["Egress"],
                                            "egress": [{"to": [{"ipBlock": {"cidr": world_cidr}}]}]})])
    cluster.expect(lambda s, d: s != "x/a" or d == "world", world=True)


def test_ip_block_except(cluster):
    world_cidr = cluster.world.ip.rsplit(".", 1)[0] + ".0/24"
    cluster.apply([np("egress-except", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                             "policyTypes": ["Egress"],
                                             "egress": [{"to": [{"ipBlock": {"cidr": world_cidr,
                                                                             "except": [f"{cluster.world.ip}/32"]}}]}]})])
    cluster.expect(lambda s, d: s != "x/a", world=True)


def test_cilium_ingress_deny_beats_network_policy_allow(cluster):
    cluster.apply([
        np("allow-all", "x", {"podSelector": {}, "ingress": [{}]}),
        cnp("deny-y", "x", {"endpointSelector": {"matchLabels": {"pod": "a"}},
                            "ingressDeny": [{"fromEndpoints": [
                                {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y"}}]}]}),
    ])
    cluster.expect(lambda s, d: not (d == "x/a" and ns_of(s) == "y"))


def test_cilium_endpoints_entities_and_match_expressions(cluster):
    cluster.apply([cnp("expr", "y", {
        "endpointSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
        "ingress": [{"fromEndpoints": [{"matchExpressions": [
            {"key": "pod", "operator": "NotIn", "values": ["c"]}]}]}]})])
    # Same-namespace peers only (CNP adds the policy's namespace to fromEndpoints).
    cluster.expect(lambda s, d: d not in ("y/a", "y/b") or (ns_of(s) == "y" and s != "y/c"))


def test_clusterwide_egress_deny_with_except(cluster):
    cluster.apply([ccnp("no-world", {"endpointSelector": {"matchLabels": {"pod": "c"}},
                                     "enableDefaultDeny": {"egress": False, "ingress": False},
                                     "egressDeny": [{"toCIDRSet": [{"cidr": "10.0.0.0/8",
                                                                    "except": ["10.244.0.0/16"]}]}]})])
    cluster.expect(lambda s, d: not (d == "world" and s.endswith("/c")), world=True)


def test_change_while_traffic_runs_and_delete_restores(cluster):
    path = cluster.apply([np("deny", "z", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    cluster.expect(lambda s, d: ns_of(d) != "z")
    # Narrow the same policy in place: only z/a stays isolated.
    path.write_text(path.read_text().replace("podSelector: {}", "podSelector: {matchLabels: {pod: a}}"))
    cluster.lab.apply(path)
    cluster.expect(lambda s, d: d != "z/a")
    cluster.lab.delete(path)
    cluster.expect(lambda s, d: True)


def test_pod_label_change_moves_the_pod_between_peers(cluster):
    cluster.apply([np("from-b", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})])
    cluster.expect(lambda s, d: d != "x/a" or s == "x/b")
    manifest = cluster.lab.paths.manifests / "cluster.yaml"
    original = manifest.read_text()
    docs = list(yaml.safe_load_all(original))
    for doc in docs:
        if doc["kind"] == "Pod" and doc["metadata"]["namespace"] == "x" and doc["metadata"]["name"] == "c":
            doc["metadata"]["labels"] = {"pod": "b"}
    try:
        manifest.write_text(yaml.safe_dump_all(docs))
        cluster.lab.wait_realized()
        cluster.expect(lambda s, d: d != "x/a" or s in ("x/b", "x/c"))
    finally:
        manifest.write_text(original)
        cluster.lab.wait_realized()
    cluster.expect(lambda s, d: d != "x/a" or s == "x/b")
