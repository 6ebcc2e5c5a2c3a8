"""The parts of Kubernetes mode (agent/k8s/) that need no API server: the identity probe
order, the ipcache claims of remote endpoints and of the API server, the CiliumEndpoint
status a control-plane endpoint gives, and how the CLI picks Kubernetes mode."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import click
import pytest

from cilium_py.agent.backend import MemoryIPCacheMap
from cilium_py.agent.ipcache import IPCache
from cilium_py.agent.k8s.endpoints import endpoint_status
from cilium_py.agent.k8s.identities import identity_object, probe_order
from cilium_py.agent.k8s.remote import APIServerEndpoints, RemoteEndpoints
from cilium_py.agent.objects import CiliumEndpoint, EndpointSlice, SliceEndpoint
from cilium_py.agent.store import Store
from cilium_py.cli.agent import _kubernetes_mode
from cilium_py.vocab import IDENTITY_KUBE_APISERVER, TCP


def test_probe_order_is_the_same_everywhere_spread_and_distinct():
    a = probe_order("k8s:app=web;k8s:io.kubernetes.pod.namespace=prod")
    assert a == probe_order("k8s:app=web;k8s:io.kubernetes.pod.namespace=prod")
    assert len(a) == len(set(a)) == 64 and all(256 <= n <= 65535 for n in a)
    assert a[0] != probe_order("k8s:app=db;k8s:io.kubernetes.pod.namespace=prod")[0]
    assert sorted(probe_order("x", 256, 259)) == [256, 257, 258, 259], "a small range is tried whole"


def test_identity_object_names_the_number_and_labels_the_namespace():
    labels = {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "prod"}
    assert identity_object(300, labels) == {
        "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
        "metadata": {"name": "300", "labels": {"io.kubernetes.pod.namespace": "prod"}},
        "security-labels": labels}


@pytest.fixture
def store():
    s = Store(workers=1)
    yield s
    s.close()


def cep(name: str, ips, identity, node_ip) -> CiliumEndpoint:
    return CiliumEndpoint(namespace="prod", name=name, ipv4=tuple(ips), identity=identity, node_ip=node_ip)


def test_remote_endpoints_claim_their_addresses_and_give_them_back(store):
    ipcache = IPCache(MemoryIPCacheMap())
    remote = RemoteEndpoints(store, ipcache, local_node_ips=("10.250.0.1",))
    store.upsert(cep("a", ["10.220.0.5"], 300, "10.250.0.2"))
    store.upsert(cep("mine", ["10.220.0.7"], 300, "10.250.0.1"))     # this node's own
    store.upsert(cep("unplaced", ["10.220.0.8"], 300, None))
    store.upsert(cep("no-id", ["10.220.0.9"], None, "10.250.0.2"))
    store.wait_idle(5)
    assert remote.addresses() == {"10.220.0.5": 300}
    # The pod moved: a newer endpoint claims the address; the old one going leaves it.
    store.upsert(cep("b", ["10.220.0.5"], 301, "10.250.0.3"))
    store.wait_idle(5)
    assert ipcache.identity("10.220.0.5") == 301
    store.delete(("CiliumEndpoint", "prod", "b"))
    store.wait_idle(5)
    assert ipcache.identity("10.220.0.5") == 300, "the earlier claim takes over"
    store.upsert(cep("a", ["10.220.0.6"], 300, "10.250.0.2"))       # re-addressed
    store.wait_idle(5)
    assert ipcache.identity("10.220.0.5") is None and ipcache.identity("10.220.0.6") == 300
    store.delete(("CiliumEndpoint", "prod", "a"))
    store.wait_idle(5)
    assert ipcache.desired() == {}


def test_api_server_slices_give_kube_apiserver_and_other_slices_do_not(store):
    ipcache = IPCache(MemoryIPCacheMap())
    APIServerEndpoints(store, ipcache)
    ep = SliceEndpoint("10.230.0.10", True, True, False)
    store.upsert(EndpointSlice(namespace="default", name="kubernetes", service="kubernetes", endpoints=(ep,)))
    store.upsert(EndpointSlice(namespace="other", name="kubernetes", service="kubernetes",
                               endpoints=(SliceEndpoint("10.230.0.11", True, True, False),)))
    store.wait_idle(5)
    assert ipcache.desired() == {ipaddress.IPv4Network("10.230.0.10/32"): IDENTITY_KUBE_APISERVER}
    # Relabelled to another Service: no longer the API server's.
    store.upsert(EndpointSlice(namespace="default", name="kubernetes", service="web", endpoints=(ep,)))
    store.wait_idle(5)
    assert ipcache.desired() == {}


def test_endpoint_status_from_a_control_plane_endpoint():
    ep = SimpleNamespace(pod_key="prod/web", handle=SimpleNamespace(ip=ipaddress.IPv4Address("10.210.0.2"),
                                                                    endpoint_id=7),
                         identity=300, labels={"k8s:app": "web", "reserved:init": ""}, state="not-ready",
                         ingress_enforced=True, egress_enforced=False, named_ports={"http": (80, TCP)})
    assert endpoint_status(ep, "10.250.0.1", "robot") == {
        "id": 7, "identity": {"id": 300, "labels": ["k8s:app=web", "reserved:init"]},
        "networking": {"addressing": [{"ipv4": "10.210.0.2"}], "node": "10.250.0.1"},
        "state": "not-ready",
        "policy": {"ingress": {"enforcing": True, "state": "enforcing"},
                   "egress": {"enforcing": False, "state": "non-enforcing"}},
        "external-identifiers": {"k8s-namespace": "prod", "k8s-pod-name": "web", "pod-name": "prod/web"},
        "named-ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "service-account": "robot"}


def test_kubernetes_mode_from_a_kubeconfig_or_in_a_pod(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert _kubernetes_mode("", "/etc/kube.conf") is True
    assert _kubernetes_mode("/manifests", "") is False
    assert _kubernetes_mode("", "") is False
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert _kubernetes_mode("", "") is True, "in a pod: the in-cluster configuration"
    assert _kubernetes_mode("/manifests", "") is False, "an explicit manifests source wins"
    with pytest.raises(click.BadParameter, match="--manifests or an API server"):
        _kubernetes_mode("/manifests", "/etc/kube.conf")
