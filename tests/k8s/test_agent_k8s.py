"""The agent's Kubernetes mode (agent/k8s/) on the real API server: the real Kubernetes
source fills the store, the control plane runs on the in-memory backend (no BPF), and what
the agent writes back is read from the API server: its CiliumNode and pod CIDR, one
CiliumEndpoint per pod, the policies' Valid condition; other nodes' CiliumEndpoints and
the API server's endpoints come back as ipcache entries and policy peers."""

from __future__ import annotations

import threading
import uuid

import pytest

from cilium_py.agent.backend import memory_backend
from cilium_py.agent.controller import ControlPlaneConfig
from cilium_py.agent.k8s.identities import CRDIdentityAllocator
from cilium_py.agent.k8s.node import WAITING
from cilium_py.agent.k8s.wiring import KubernetesMode
from cilium_py.datapath.config import DatapathConfig
from cilium_py.vocab import EGRESS, IDENTITY_KUBE_APISERVER, INGRESS
from tests.unit.waiting import poll

NODE_IP = "10.250.0.1"
TIMEOUT = 30.0


@pytest.fixture
def node_name(kube, cilium_crds):
    name = "node-" + uuid.uuid4().hex[:8]
    yield name
    kube.delete("CiliumNode", name, missing_ok=True)


@pytest.fixture
def started(kube, node_name, tmp_path):
    """Starts a node's Kubernetes mode (pod CIDR given unless the test says otherwise);
    stops every node it started after the test."""
    modes = []

    def start(pod_cidr: str = "10.210.0.0/24", pod_cidr_timeout: float = 60.0) -> KubernetesMode:
        config = ControlPlaneConfig(
            datapath=DatapathConfig(node=node_name, bpf_root="/nonexistent"), node_netns="mem",
            router_ip="", pod_cidr=pod_cidr, state_dir=str(tmp_path / f"state{len(modes)}"),
            node_ips=(NODE_IP,))
        mode = KubernetesMode(kube, config, node_name=node_name, backend_for=lambda router: memory_backend(),
                              pod_cidr_timeout=pod_cidr_timeout)
        modes.append(mode)
        mode.start()
        return mode

    yield start, modes
    for mode in modes:
        mode.stop()
        mode.close()


@pytest.fixture
def agent(started):
    start, _ = started
    return start()


@pytest.fixture
def pods_allowed(kube, namespace):
    """Pods need the namespace's default ServiceAccount, which its controller creates."""
    assert poll(lambda: kube.get_or_none("ServiceAccount", "default", namespace) is not None, TIMEOUT)
    return namespace


def pod(namespace: str, name: str, node: str, **labels) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "automountServiceAccountToken": False,
                     "containers": [{"name": "c", "image": "registry.invalid/listener",
                                     "ports": [{"name": "http", "containerPort": 8080}]}]}}


def force_delete(kube, namespace: str, name: str) -> None:
    """No kubelet confirms a graceful delete here: the pod goes at once, as after its
    containers stopped."""
    kube.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}",
                 body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})


def cnp(namespace: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def cep_status(kube, namespace: str, name: str) -> dict | None:
    doc = kube.get_or_none("CiliumEndpoint", name, namespace)
    return None if doc is None else doc.get("status") or {}


def valid_condition(kube, namespace: str, name: str) -> dict | None:
    doc = kube.get_or_none("CiliumNetworkPolicy", name, namespace) or {}
    return next((c for c in (doc.get("status") or {}).get("conditions") or [] if c["type"] == "Valid"), None)


def peer_identities(mode: KubernetesMode, pod_key: str, direction: str) -> set[int]:
    ep = mode.control.endpoints.get(pod_key)
    if ep is None:
        return set()
    entries = mode.control.backend.policy_map.entries(ep.handle.endpoint_id)
    return {k.identity for k in entries if k.direction == direction}


# -- CiliumNode ----------------------------------------------------------------------------


def test_registration_waits_for_the_operators_pod_cidr(kube, started, node_name):
    start, modes = started
    errors: list[BaseException] = []

    def run():
        try:
            start(pod_cidr="")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert poll(lambda: modes and modes[0].registration is not None
                    and modes[0].registration.state == WAITING, TIMEOUT)
        status = modes[0].status()["ciliumnode"]
        assert f"spec.ipam.podCIDRs of CiliumNode {node_name}" in status["message"]
        registered = kube.get("CiliumNode", node_name)
        assert registered["spec"]["addresses"] == [{"type": "InternalIP", "ip": NODE_IP}]
        # The operator's part: a pod CIDR in spec.ipam.podCIDRs.
        registered["spec"]["ipam"] = {"podCIDRs": ["10.211.3.0/24"]}
        kube.replace("CiliumNode", registered)
    finally:
        thread.join(TIMEOUT)
    assert not errors, errors
    mode = modes[0]
    assert mode.control.config.pod_cidr == "10.211.3.0/24"
    assert mode.control.config.router_ip == "10.211.3.1"
    assert poll(lambda: kube.get("CiliumNode", node_name)["spec"]["addresses"] == [
        {"type": "InternalIP", "ip": NODE_IP}, {"type": "CiliumInternalIP", "ip": "10.211.3.1"}], TIMEOUT)
    assert kube.get("CiliumNode", node_name)["spec"]["ipam"]["podCIDRs"] == ["10.211.3.0/24"], \
        "the operator's allocation is kept"


def test_explicit_pod_cidr_wins_and_a_deleted_node_comes_back(kube, started, node_name):
    start, _ = started
    kube.create("CiliumNode", {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": node_name},
                               "spec": {"instance-id": "i-1", "ipam": {"podCIDRs": ["10.212.0.0/24"]}}})
    mode = start(pod_cidr="10.213.0.0/24")
    assert mode.control.config.pod_cidr == "10.213.0.0/24"
    spec = kube.get("CiliumNode", node_name)["spec"]
    assert spec["ipam"]["podCIDRs"] == ["10.213.0.0/24"]
    assert spec["instance-id"] == "i-1", "fields that are not the agent's are kept"
    kube.delete("CiliumNode", node_name)
    assert poll(lambda: (kube.get_or_none("CiliumNode", node_name) or {}).get("spec", {}).get("addresses") == [
        {"type": "InternalIP", "ip": NODE_IP}, {"type": "CiliumInternalIP", "ip": "10.213.0.1"}], TIMEOUT)


# -- CiliumEndpoints and policy status -------------------------------------------------------


def test_ciliumendpoint_follows_the_pod_and_its_policy(kube, agent, node_name, pods_allowed):
    ns = pods_allowed
    created = kube.create("Pod", pod(ns, "web", node_name, app="web"))
    assert poll(lambda: (cep_status(kube, ns, "web") or {}).get("state") == "ready", TIMEOUT)
    cep = kube.get("CiliumEndpoint", "web", ns)
    status = cep["status"]
    assert cep["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "web",
                                                   "uid": created["metadata"]["uid"], "blockOwnerDeletion": False}]
    ep = agent.control.endpoints[f"{ns}/web"]
    assert status["id"] == ep.handle.endpoint_id
    assert status["networking"] == {"addressing": [{"ipv4": str(ep.handle.ip)}], "node": NODE_IP}
    assert status["named-ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert status["policy"]["ingress"] == {"enforcing": False, "state": "non-enforcing"}
    # The identity is a CiliumIdentity holding the pod's labels.
    identity = kube.get("CiliumIdentity", str(status["identity"]["id"]))
    assert identity["security-labels"]["k8s:app"] == "web"
    assert identity["security-labels"]["k8s:io.kubernetes.pod.namespace"] == ns
    assert "k8s:app=web" in status["identity"]["labels"]

    kube.create("CiliumNetworkPolicy", cnp(ns, "web-ingress", {
        "endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"fromEndpoints": [{}]}]}))
    assert poll(lambda: (cep_status(kube, ns, "web") or {}).get("policy", {}).get("ingress")
                == {"enforcing": True, "state": "enforcing"}, TIMEOUT)
    assert poll(lambda: (valid_condition(kube, ns, "web-ingress") or {}).get("status") == "True", TIMEOUT)
    assert valid_condition(kube, ns, "web-ingress")["reason"] == "Accepted"
    writes = agent.endpoints.writes
    agent.control.reconciler.bump()   # a pass that changes nothing writes nothing
    assert agent.control.wait_for_revision(agent.control.revision, TIMEOUT)
    assert agent.endpoints.writes == writes

    force_delete(kube, ns, "web")
    assert poll(lambda: kube.get_or_none("CiliumEndpoint", "web", ns) is None, TIMEOUT)


def test_a_deleted_ciliumendpoint_is_written_again(kube, agent, node_name, pods_allowed):
    ns = pods_allowed
    kube.create("Pod", pod(ns, "db", node_name, app="db"))
    assert poll(lambda: cep_status(kube, ns, "db") is not None, TIMEOUT)
    kube.delete("CiliumEndpoint", "db", ns)
    assert poll(lambda: kube.get_or_none("CiliumEndpoint", "db", ns) is not None
                and agent.endpoints.status()["in_sync"] == 1, TIMEOUT)


def test_a_rejected_policy_is_valid_false_naming_the_field(kube, agent, namespace):
    bad = cnp(namespace, "ports", {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "80", "endPort": 79}]}]}]})
    kube.create("CiliumNetworkPolicy", bad)
    assert poll(lambda: (valid_condition(kube, namespace, "ports") or {}).get("status") == "False", TIMEOUT)
    condition = valid_condition(kube, namespace, "ports")
    assert condition["reason"] == "Invalid"
    assert f"CiliumNetworkPolicy {namespace}/ports" in condition["message"]
    assert "endPort" in condition["message"]
    # Fixed: valid again.
    fixed = kube.get("CiliumNetworkPolicy", "ports", namespace)
    fixed["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["endPort"] = 81
    kube.replace("CiliumNetworkPolicy", fixed)
    assert poll(lambda: (valid_condition(kube, namespace, "ports") or {}).get("status") == "True", TIMEOUT)


# -- what other nodes and the API server are -------------------------------------------------


def test_remote_ciliumendpoints_become_ipcache_entries_and_policy_peers(kube, agent, node_name, pods_allowed):
    ns = pods_allowed
    kube.create("Pod", pod(ns, "web", node_name, app="web"))
    kube.create("CiliumNetworkPolicy", cnp(ns, "from-db", {
        "endpointSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "db"}}]}]}))
    # Another node's pod: its agent made the identity and the CiliumEndpoint.
    other = CRDIdentityAllocator(kube)
    remote_id = other.acquire({"k8s:app": "db", "k8s:io.kubernetes.pod.namespace": ns,
                               "k8s:io.cilium.k8s.policy.serviceaccount": "default",
                               "k8s:io.cilium.k8s.policy.cluster": "default",
                               f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": ns})
    kube.create("CiliumEndpoint", {"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
                                   "metadata": {"name": "db-remote", "namespace": ns},
                                   "status": {"id": 9, "identity": {"id": remote_id},
                                              "networking": {"addressing": [{"ipv4": "10.220.0.5"}],
                                                             "node": "10.250.9.9"}, "state": "ready"}})
    ipcache = agent.control.backend.ipcache
    assert poll(lambda: ipcache.identity("10.220.0.5") == remote_id, TIMEOUT)
    assert remote_id in agent.control.identities.all()
    assert poll(lambda: remote_id in peer_identities(agent, f"{ns}/web", INGRESS), TIMEOUT), \
        "the remote pod's identity is a peer of the local pod's policy"
    # A CiliumEndpoint placed on this node is not a remote one.
    kube.create("CiliumEndpoint", {"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
                                   "metadata": {"name": "stale-local", "namespace": ns},
                                   "status": {"identity": {"id": remote_id},
                                              "networking": {"addressing": [{"ipv4": "10.220.0.6"}],
                                                             "node": NODE_IP}}})
    kube.delete("CiliumEndpoint", "db-remote", ns)
    assert poll(lambda: ipcache.identity("10.220.0.5") is None, TIMEOUT)
    assert ipcache.identity("10.220.0.6") is None


def test_kube_apiserver_endpoints_and_entity(kube, agent, node_name, pods_allowed):
    ns = pods_allowed
    slice_name = "kubernetes-" + uuid.uuid4().hex[:6]
    kube.create("EndpointSlice", {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice_name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.230.0.10"]}],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]})
    try:
        kube.create("Pod", pod(ns, "client", node_name, app="client"))
        kube.create("CiliumNetworkPolicy", cnp(ns, "to-apiserver", {
            "endpointSelector": {"matchLabels": {"app": "client"}},
            "egress": [{"toEntities": ["kube-apiserver"]}]}))
        ipcache = agent.control.backend.ipcache
        assert poll(lambda: ipcache.identity("10.230.0.10") == IDENTITY_KUBE_APISERVER, TIMEOUT)
        assert poll(lambda: peer_identities(agent, f"{ns}/client", EGRESS) == {IDENTITY_KUBE_APISERVER}, TIMEOUT)
        assert "10.230.0.10" in agent.status()["kube_apiserver"]
    finally:
        kube.delete("EndpointSlice", slice_name, "default", missing_ok=True)
    assert poll(lambda: agent.control.backend.ipcache.identity("10.230.0.10") is None, TIMEOUT)


def test_an_identity_in_use_that_is_deleted_is_created_again(kube, agent, node_name, pods_allowed):
    ns = pods_allowed
    kube.create("Pod", pod(ns, "api", node_name, app="api"))
    assert poll(lambda: (cep_status(kube, ns, "api") or {}).get("state") == "ready", TIMEOUT)
    number = str(kube.get("CiliumEndpoint", "api", ns)["status"]["identity"]["id"])
    labels = kube.get("CiliumIdentity", number)["security-labels"]
    kube.delete("CiliumIdentity", number)
    assert poll(lambda: (kube.get_or_none("CiliumIdentity", number) or {}).get("security-labels") == labels,
                TIMEOUT), "the same number with the same labels"
    assert agent.control.endpoints[f"{ns}/api"].identity == int(number)


def test_an_identity_in_use_marked_for_deletion_is_unmarked(kube, agent, node_name, pods_allowed):
    ns = pods_allowed
    kube.create("Pod", pod(ns, "cache", node_name, app="cache"))
    assert poll(lambda: (cep_status(kube, ns, "cache") or {}).get("state") == "ready", TIMEOUT)
    number = str(kube.get("CiliumEndpoint", "cache", ns)["status"]["identity"]["id"])
    marked = kube.get("CiliumIdentity", number)
    marked["metadata"].setdefault("annotations", {})["io.cilium.heartbeat"] = "2026-01-01T00:00:00.000000000Z"
    kube.replace("CiliumIdentity", marked)
    assert poll(lambda: "io.cilium.heartbeat" not in
                (kube.get("CiliumIdentity", number)["metadata"].get("annotations") or {}), TIMEOUT)
