"""CiliumIdentity, CiliumEndpoint and CiliumNode as the agent reads them: valid documents
become the typed objects the ipcache and identity code need, and every malformed field is
named in the error (all of them at once), whatever the API server let through."""

from __future__ import annotations

import copy

import pytest

from cilium_py.agent.errors import InvalidObject
from cilium_py.agent.objects import (
    CiliumEndpoint,
    CiliumIdentity,
    CiliumNode,
    CiliumNodeAddress,
    NamedPort,
    parse_object,
)
from cilium_py.vocab import TCP, UDP


def identity_doc() -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
            "metadata": {"name": "12345", "labels": {"io.kubernetes.pod.namespace": "shop"},
                         "annotations": {"io.cilium.heartbeat": "2026-12-02T10:00:00.000000001Z"}},
            "security-labels": {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "shop",
                                "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "shop",
                                "k8s:io.cilium.k8s.policy.serviceaccount": "default"}}


def endpoint_doc() -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
            "metadata": {"name": "web-1", "namespace": "shop"},
            "status": {"id": 1234, "state": "ready",
                       "identity": {"id": 12345, "labels": ["k8s:app=web"]},
                       "networking": {"addressing": [{"ipv4": "10.244.1.5", "ipv6": "fd00::5"}, {"ipv4": "10.244.1.6"}],
                                      "node": "10.245.1.1"},
                       "encryption": {"key": 3},
                       "named-ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                       {"name": "dns", "port": 53, "protocol": "UDP"}],
                       "policy": {"ingress": {"enforcing": True, "state": "enforcing"},
                                  "egress": {"enforcing": False, "state": "non-enforcing"}}}}


def node_doc() -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "node-1"},
            "spec": {"addresses": [{"type": "InternalIP", "ip": "10.245.1.1"},
                                   {"type": "CiliumInternalIP", "ip": "10.244.1.1"},
                                   {"type": "Hostname", "ip": "node-1"}],
                     "health": {"ipv4": "10.244.1.9"},
                     "ipam": {"podCIDRs": ["10.244.1.0/24", "fd00:1::/96"]}},
            "status": {"ipam": {"operator-status": {"error": "pool exhausted"}}}}


def errors(doc) -> dict[str, str]:
    with pytest.raises(InvalidObject) as e:
        parse_object(doc, "api")
    return {err.field: err.message for err in e.value.errors}


# -- valid documents -----------------------------------------------------------------------

def test_identity_number_comes_from_the_name_and_labels_from_security_labels():
    doc = identity_doc()
    before = copy.deepcopy(doc)
    ident = parse_object(doc, "api")
    assert ident == CiliumIdentity(
        namespace=None, name="12345", labels={"io.kubernetes.pod.namespace": "shop"}, source="api",
        identity=12345, security_labels=doc["security-labels"], heartbeat="2026-12-02T10:00:00.000000001Z")
    assert ident.key == ("CiliumIdentity", "", "12345") and ident.describe() == "CiliumIdentity 12345"
    assert doc == before                                   # the document is left as it was
    hash(ident)                                            # immutable, labels included
    with pytest.raises(TypeError):
        ident.security_labels["k8s:app"] = "db"


def test_endpoint_gives_addresses_node_identity_and_named_ports():
    cep = parse_object(endpoint_doc(), "api")
    assert cep == CiliumEndpoint(
        namespace="shop", name="web-1", source="api", endpoint_id=1234, identity=12345,
        ipv4=("10.244.1.5", "10.244.1.6"), ipv6=("fd00::5",), node_ip="10.245.1.1", state="ready",
        named_ports=(NamedPort("http", 80, TCP), NamedPort("dns", 53, UDP)), encryption_key=3)
    assert cep.addresses == ("10.244.1.5", "10.244.1.6", "fd00::5")


def test_endpoint_without_status_has_nothing_to_place():
    doc = endpoint_doc()
    del doc["status"]
    cep = parse_object(doc, "api")
    assert (cep.identity, cep.addresses, cep.node_ip, cep.state, cep.encryption_key) == (None, (), None, None, None)


def test_endpoint_addresses_are_normalized_and_named_port_protocol_defaults_to_tcp():
    doc = endpoint_doc()
    doc["status"]["networking"] = {"addressing": [{"ipv6": "FD00:0::5"}, {"ipv4": "10.244.1.5"},
                                                  {"ipv4": "10.244.1.5"}], "node": "fd00::0:1"}
    doc["status"]["named-ports"] = [{"name": "http", "port": 80}]
    cep = parse_object(doc, "api")
    assert (cep.ipv4, cep.ipv6, cep.node_ip) == (("10.244.1.5",), ("fd00::5",), "fd00::1")
    assert cep.named_ports == (NamedPort("http", 80, TCP),)


def test_node_gives_addresses_pod_cidrs_health_and_operator_error():
    node = parse_object(node_doc(), "api")
    assert node == CiliumNode(
        namespace=None, name="node-1", source="api",
        addresses=(CiliumNodeAddress("InternalIP", "10.245.1.1"), CiliumNodeAddress("CiliumInternalIP", "10.244.1.1"),
                   CiliumNodeAddress("Hostname", "node-1")),
        pod_cidrs=("10.244.1.0/24", "fd00:1::/96"), health_ipv4="10.244.1.9", operator_error="pool exhausted")
    assert node.address("CiliumInternalIP") == "10.244.1.1" and node.address("ExternalIP") is None


def test_node_with_only_a_name_is_valid():
    node = parse_object({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "n"}}, "api")
    assert (node.addresses, node.pod_cidrs, node.health_ipv4, node.operator_error) == ((), (), None, "")


# -- malformed documents: every bad field named --------------------------------------------

@pytest.mark.parametrize("name,fragment", [
    ("web", "not a numeric identity"),
    ("0256", "not a numeric identity"),
    ("5", "not a cluster identity"),            # would claim the reserved `health`
    ("16777216", "not a cluster identity"),     # local scope: never stored in the API
])
def test_identity_name_must_be_a_cluster_identity_number(name, fragment):
    doc = identity_doc()
    doc["metadata"]["name"] = name
    assert fragment in errors(doc)["metadata.name"]


def test_identity_reports_every_bad_label_and_needs_security_labels():
    doc = identity_doc()
    doc["security-labels"] = {"app": "web", "k8s:tier": 5, "k8s:ok": "fine", ":x": "y", "k8s:v": "-bad"}
    doc["apiVersion"] = "cilium.io/v1"
    found = errors(doc)
    assert set(found) == {"apiVersion", "security-labels.app", "security-labels.k8s:tier", "security-labels.:x",
                          "security-labels.k8s:v"}
    assert "source:key" in found["security-labels.app"] and "strings" in found["security-labels.k8s:tier"]
    doc = identity_doc()
    del doc["security-labels"]
    assert "is required" in errors(doc)["security-labels"]
    doc["security-labels"] = ["k8s:app=web"]
    assert "mapping" in errors(doc)["security-labels"]


def test_endpoint_reports_every_malformed_field():
    doc = endpoint_doc()
    status = doc["status"]
    status["id"] = "one"
    status["identity"]["id"] = 16777216
    status["networking"]["addressing"] = [{"ipv4": "fd00::1"}, {"ipv4": "10.244.1.300", "ipv6": "10.0.0.1"}]
    status["networking"]["node"] = "node-1"
    status["state"] = "happy"
    status["named-ports"] = [{"name": "http", "port": 70000}, {"name": "Web_1", "port": 80},
                             {"name": "dns", "port": 53, "protocol": "DNS"}]
    status["encryption"]["key"] = True
    found = errors(doc)
    assert set(found) == {
        "status.id", "status.identity.id", "status.networking.addressing[0].ipv4",
        "status.networking.addressing[1].ipv4", "status.networking.addressing[1].ipv6",
        "status.networking.node", "status.state", "status.named-ports[0].port", "status.named-ports[1].name",
        "status.named-ports[2].protocol", "status.encryption.key"}
    assert "not in 1-16777215" in found["status.identity.id"]
    assert "not an IPv4 address" in found["status.networking.addressing[0].ipv4"]
    assert "not an IP address" in found["status.networking.node"]
    assert "endpoint state" in found["status.state"]


def test_endpoint_wrong_shapes_are_named():
    doc = endpoint_doc()
    doc["status"]["networking"] = {"addressing": "10.244.1.5"}
    doc["status"]["identity"] = 12345
    doc["status"]["named-ports"] = [{"name": "http", "port": 80}, {"name": "http", "port": 81}]
    found = errors(doc)
    assert set(found) == {"status.networking.addressing", "status.identity", "status.named-ports[1].name"}
    assert "listed twice" in found["status.named-ports[1].name"]
    doc = endpoint_doc()
    doc["status"] = ["ready"]
    assert errors(doc) == {"status": "must be a mapping"}


def test_node_reports_every_malformed_field():
    doc = node_doc()
    doc["spec"]["addresses"] = [{"type": "InternalIP", "ip": "10.245.1.300"}, {"type": "Magic", "ip": "10.0.0.1"},
                                {"type": "ExternalIP"}, "10.0.0.2"]
    doc["spec"]["ipam"]["podCIDRs"] = ["10.244.1.1/24", "10.244.2.0", 7]
    doc["spec"]["health"]["ipv4"] = "fd00::9"
    doc["status"]["ipam"]["operator-status"]["error"] = {"code": 1}
    found = errors(doc)
    assert set(found) == {
        "spec.addresses[0].ip", "spec.addresses[1].type", "spec.addresses[2].ip", "spec.addresses[3]",
        "spec.ipam.podCIDRs[0]", "spec.ipam.podCIDRs[1]", "spec.ipam.podCIDRs[2]", "spec.health.ipv4",
        "status.ipam.operator-status.error"}
    assert "without host bits" in found["spec.ipam.podCIDRs[0]"]
    assert "address type" in found["spec.addresses[1].type"]
    doc = node_doc()
    doc["spec"]["ipam"]["podCIDRs"] = "10.244.1.0/24"
    doc["spec"]["ipam"]["extra"] = 1
    assert set(errors(doc)) == {"spec.ipam.podCIDRs"}


def test_namespaced_and_cluster_scoped_kinds():
    assert CiliumEndpoint.namespaced and not CiliumIdentity.namespaced and not CiliumNode.namespaced
    doc = endpoint_doc()
    del doc["metadata"]["namespace"]
    assert parse_object(doc, "api").namespace == "default"
