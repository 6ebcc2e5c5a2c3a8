"""The typed objects and their parsers: one parser per kind, errors naming the field, the
document left as it was, and every path in (the manifests source, `policy validate`)
going through the same parser."""

from __future__ import annotations

import copy
import os

import pytest
import yaml
from click.testing import CliRunner

from cilium_py.agent import objects
from cilium_py.agent.errors import InvalidObject
from cilium_py.agent.objects import (
    CiliumClusterwideNetworkPolicy,
    CiliumEndpoint,
    CiliumIdentity,
    CiliumNetworkPolicy,
    CiliumNode,
    ContainerPort,
    EndpointSlice,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    Service,
    parse_object,
)
from cilium_py.agent.sources.manifests import ManifestsSource, parse_documents
from cilium_py.agent.store import Store
from cilium_py.cli.main import cli
from cilium_py.vocab import SCTP, TCP, UDP


def docs() -> dict[str, dict]:
    """One valid document per kind, leaving out what the API server would default."""
    return {
        "Namespace": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod", "labels": {"team": "a"}}},
        "Node": {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
                 "status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                          {"type": "InternalIP", "address": "10.245.1.1"},
                                          {"type": "ExternalIP", "address": "fd00::1"}]}},
        "Pod": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web", "labels": {"app": "web"}, "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"nodeName": "n1", "containers": [
                    {"name": "main", "image": "busybox", "ports": [
                        {"containerPort": 80, "name": "http"},
                        {"containerPort": 53, "protocol": "UDP", "hostPort": 5353, "hostIP": "10.245.1.1"}]},
                    {"name": "side", "ports": [{"containerPort": 9, "protocol": "SCTP"}]}]},
                "status": {"podIP": "10.244.1.5", "conditions": [{"type": "Ready", "status": "False"}]}},
        "Service": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "prod"},
                    "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                                                   {"name": "dns", "port": 53, "protocol": "UDP"}]}},
        "EndpointSlice": {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                          "metadata": {"name": "web-1", "namespace": "prod",
                                       "labels": {"kubernetes.io/service-name": "web"}},
                          "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "n1"}],
                          "ports": [{"name": "http", "port": 80}]},
        "NetworkPolicy": {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                          "metadata": {"name": "allow", "namespace": "prod"},
                          "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}},
        "CiliumNetworkPolicy": {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                                "metadata": {"name": "cnp"},
                                "spec": {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]}},
        "CiliumClusterwideNetworkPolicy": {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                                           "metadata": {"name": "ccnp"},
                                           "spec": {"endpointSelector": {}, "egress": [{"toEntities": ["world"]}]}},
        "CiliumIdentity": {"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity", "metadata": {"name": "300"},
                           "security-labels": {"k8s:app": "web"}},
        "CiliumEndpoint": {"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
                           "metadata": {"name": "web", "namespace": "prod"},
                           "status": {"identity": {"id": 300}, "networking": {"addressing": [{"ipv4": "10.244.1.5"}]}}},
        "CiliumNode": {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "n1"},
                       "spec": {"ipam": {"podCIDRs": ["10.244.1.0/24"]}}},
    }


CLASSES = {"Namespace": Namespace, "Node": Node, "Pod": Pod, "Service": Service, "EndpointSlice": EndpointSlice,
           "NetworkPolicy": NetworkPolicy, "CiliumNetworkPolicy": CiliumNetworkPolicy,
           "CiliumClusterwideNetworkPolicy": CiliumClusterwideNetworkPolicy, "CiliumIdentity": CiliumIdentity,
           "CiliumEndpoint": CiliumEndpoint, "CiliumNode": CiliumNode}


def test_every_supported_kind_has_one_parser():
    assert set(objects.PARSERS) == set(CLASSES) == set(docs())


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_each_kind_parses_to_an_immutable_typed_object(kind):
    obj = parse_object(docs()[kind], "m.yaml")
    assert type(obj) is CLASSES[kind] and obj.kind == kind and obj.source == "m.yaml"
    namespace = "default" if kind in ("Pod", "CiliumNetworkPolicy") else "prod" if obj.namespace else None
    assert obj.namespace == namespace
    assert obj.key == (kind, namespace or "", obj.name)
    assert obj.describe() == (f"{kind} {namespace}/{obj.name}" if namespace else f"{kind} {obj.name}")
    assert obj == parse_object(docs()[kind], "m.yaml") and hash(obj) == hash(parse_object(docs()[kind], "m.yaml"))
    with pytest.raises(AttributeError):
        obj.name = "other"
    with pytest.raises(TypeError):
        obj.labels["new"] = "label"


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_parsing_leaves_the_document_as_it_was(kind):
    doc = docs()[kind]
    before = copy.deepcopy(doc)
    parse_object(doc, "m.yaml")
    assert doc == before
    broken = copy.deepcopy(doc)
    broken["metadata"]["labels"] = {"bad key!": 1}
    before = copy.deepcopy(broken)
    with pytest.raises(InvalidObject):
        parse_object(broken, "m.yaml")
    assert broken == before


def test_pod_fields():
    pod = parse_object(docs()["Pod"], "m.yaml")
    assert (pod.node_name, pod.service_account, pod.ip, pod.ready, pod.terminating) == (
        "n1", "default", "10.244.1.5", False, False)
    assert pod.created == "2026-01-01T00:00:00Z"
    assert pod.ports == (ContainerPort("http", 80, TCP, 0, None, "spec.containers[0].ports[0]"),
                         ContainerPort("", 53, UDP, 5353, "10.245.1.1", "spec.containers[0].ports[1]"),
                         ContainerPort("", 9, SCTP, 0, None, "spec.containers[1].ports[0]"))
    assert pod.named_ports == {"http": (80, TCP)}
    assert [p.host_port for p in pod.host_ports] == [5353]
    assert pod.container_port("http", TCP) == 80 and pod.container_port("http", UDP) is None
    assert pod.container_port(8080, TCP) == 8080
    assert pod.matches((("app", "web"),)) and not pod.matches((("app", "db"),))
    lab_pod = parse_object({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "deletionTimestamp": "x"},
                            "spec": {"serviceAccountName": "robot", "containers": [{"name": "c"}]}}, "m.yaml")
    assert (lab_pod.node_name, lab_pod.service_account, lab_pod.ip, lab_pod.ready, lab_pod.terminating) == (
        None, "robot", None, None, True)


def test_node_addresses_and_service_defaults():
    node = parse_object(docs()["Node"], "m.yaml")
    assert node.ipv4_addresses() == ["10.245.1.1"]
    service = parse_object(docs()["Service"], "m.yaml")
    assert [(p.name, p.port, p.protocol, p.target_port) for p in service.ports] == [
        ("http", 80, TCP, "http"), ("dns", 53, UDP, 53)]
    assert service.service_key == ("prod", "web") and service.cluster_ip is None


def test_fields_nothing_reads_do_not_make_a_new_version():
    doc = docs()["Pod"]
    changed = copy.deepcopy(doc)
    changed["spec"]["containers"][0]["image"] = "nginx"
    assert parse_object(doc, "m.yaml") == parse_object(changed, "m.yaml")
    changed["spec"]["containers"][0]["ports"][0]["containerPort"] = 81
    assert parse_object(doc, "m.yaml") != parse_object(changed, "m.yaml")


def _set(doc: dict, path: str, value) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        doc = doc[int(key)] if isinstance(doc, list) else doc.setdefault(key, {})
    doc[keys[-1]] = value


@pytest.mark.parametrize("kind,path,value,field,words", [
    ("Namespace", "metadata.labels", {"team": 1}, "metadata.labels.team", "quote"),
    ("Namespace", "apiVersion", "v2", "apiVersion", "served as 'v1'"),
    ("Node", "status.addresses", [{"type": "InternalIP"}], "status.addresses[0].address", "non-empty string"),
    ("Node", "status", ["x"], "status", "must be a mapping"),
    ("Pod", "spec.containers.0.ports.1.hostPort", 70000, "spec.containers[0].ports[1].hostPort", "not in 1-65535"),
    ("Pod", "spec.containers.0.ports.1.hostIP", "node", "spec.containers[0].ports[1].hostIP", "not an IP address"),
    ("Pod", "spec.containers.0.ports.0.protocol", "tcp", "spec.containers[0].ports[0].protocol", "TCP, UDP or SCTP"),
    ("Pod", "status.podIP", "10.244.1.500", "status.podIP", "not an IP address"),
    ("Pod", "spec.serviceAccountName", "Robot", "spec.serviceAccountName", "not a valid serviceAccountName"),
    ("Service", "spec.ports.0.targetPort", "Not_A_Name", "spec.ports[0].targetPort", "neither a port number"),
    ("Service", "spec.ports.1.nodePort", 30053, "spec.ports[1].nodePort", "only be set for type NodePort"),
    ("Service", "spec.selector", {"app": 1}, "spec.selector", "must map label keys"),
    ("EndpointSlice", "endpoints", [{"addresses": ["nope"]}], "endpoints[0].addresses[0]", "not an IPv4 address"),
    ("EndpointSlice", "ports", [{"port": 80, "protocol": "ICMP"}], "ports[0].protocol", "TCP, UDP or SCTP"),
    ("NetworkPolicy", "spec.ingress.0.ports.0.port", 0, "spec.ingress[0].ports[0].port", "out of range"),
    ("CiliumNetworkPolicy", "spec.ingress.0.fromEndpoint", [{}], "spec.ingress[0].fromEndpoint", ""),
    ("CiliumClusterwideNetworkPolicy", "spec.egress.0.toEntities", ["everywhere"],
     "spec.egress[0].toEntities[0]", "everywhere"),
])
def test_each_parser_names_the_bad_field(kind, path, value, field, words):
    doc = docs()[kind]
    _set(doc, path, value)
    with pytest.raises(InvalidObject) as e:
        parse_object(doc, "bad.yaml")
    err = e.value.errors[0]
    obj = parse_object(docs()[kind], "bad.yaml")
    assert (err.source, err.obj, err.field) == ("bad.yaml", obj.describe(), field)
    assert words in err.message
    assert e.value.key == obj.key
    assert str(e.value) == str(err) and str(err).startswith(f"bad.yaml: {obj.describe()}: {field}: ")


def test_a_parser_reports_every_problem_of_an_object_at_once():
    doc = docs()["Pod"]
    _set(doc, "spec.containers.0.ports.0.containerPort", 0)
    _set(doc, "spec.containers.1.name", "Side")
    _set(doc, "status.podIP", "x")
    with pytest.raises(InvalidObject) as e:
        parse_object(doc, "m.yaml")
    assert [err.field for err in e.value.errors] == [
        "spec.containers[0].ports[0].containerPort", "spec.containers[1].name", "status.podIP"]


BAD_FILE = [
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
     "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": "x"}]}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 0}]}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web-1"},
     "addressType": "IPv4", "endpoints": []},
    {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p"},
     "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "Bad_Name"}]}]}]}},
    {"apiVersion": "v1", "kind": "Deployment", "metadata": {"name": "d"}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fine"}},
]


def test_policy_validate_and_the_manifests_source_give_the_same_errors(tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(BAD_FILE))
    store = Store()
    try:
        source = ManifestsSource(str(tmp_path), store)
        source.sync_once()
        assert [o.key for o in store.list()] == [("Namespace", "", "fine")]
    finally:
        store.close()
    from_source = [str(e) for e in source.errors]
    assert len(from_source) == 5
    result = CliRunner().invoke(cli, ["policy", "validate", str(path)])
    assert result.exit_code == 1 and "5 invalid object(s)" in result.output
    from_cli = [line for line in result.stderr.splitlines() if not line.startswith("Error:")]
    assert from_cli == from_source
    assert f"{path}: Namespace fine: valid" in result.stdout


def test_every_path_in_goes_through_the_kinds_parser(tmp_path, monkeypatch):
    calls = []
    real = objects.PARSERS["Pod"]

    def spy(doc, source, where="object"):
        calls.append(source)
        return real(doc, source, where)

    monkeypatch.setitem(objects.PARSERS, "Pod", spy)
    path = os.path.join(tmp_path, "pod.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(docs()["Pod"], f)
    store = Store()
    try:
        ManifestsSource(str(tmp_path), store).sync_once()
        assert isinstance(store.get(("Pod", "default", "web")), Pod)
    finally:
        store.close()
    assert CliRunner().invoke(cli, ["policy", "validate", path]).exit_code == 0
    parse_documents(yaml.safe_dump(docs()["Pod"]), "text.yaml")
    assert calls == [path, path, "text.yaml"]


def test_objects_built_in_code_hold_immutable_labels():
    pod = Pod(namespace="default", name="p", labels={"app": "web"})
    assert isinstance(pod.labels, objects.Labels) and pod.labels == {"app": "web"}
    assert hash(pod) == hash(Pod(namespace="default", name="p", labels={"app": "web"}))
    assert copy.deepcopy(pod) == pod and copy.deepcopy(pod).labels == {"app": "web"}
