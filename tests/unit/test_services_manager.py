"""The service manager against a memory writer: what it writes for each kind of Service,
that it writes only what changed, IDs, claims (nodePorts, frontends), traffic policies,
affinity, terminating backends, Maglev, derived endpoints, restarts and bad input."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
import yaml

from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.services.endpoints import PodAddresses
from cilium_py.agent.services.maglev import build_table
from cilium_py.agent.services.manager import ServiceManager
from cilium_py.agent.services.writer import MemoryWriter
from cilium_py.agent.objects import parse_object
from cilium_py.agent.sources.manifests import ManifestsSource
from cilium_py.agent.store import Store
from cilium_py.datapath.maps.lb import (
    ALGORITHM_MAGLEV,
    ALGORITHM_RANDOM,
    BE_STATE_ACTIVE,
    BE_STATE_TERMINATING,
    SCOPE_EXTERNAL,
    SCOPE_INTERNAL,
    SVC_F_AFFINITY,
    SVC_F_EXT_LOCAL,
    SVC_F_EXTERNAL_IPS,
    SVC_F_HOSTPORT,
    SVC_F_INT_LOCAL,
    SVC_F_LOADBALANCER,
    SVC_F_NODEPORT,
    SVC_F_TWO_SCOPES,
    frontend,
)

from .waiting import poll

NODE = "n1"
NODE_IP = "10.245.1.1"
TCP, UDP = 6, 17


class LocalPods(PodAddresses):
    """The node's pods as the control plane would report them."""

    def __init__(self):
        self.ips: dict[tuple[str, str], str] = {}

    def pod_ip(self, namespace, name):
        return self.ips.get((namespace, name))

    def is_local(self, ip):
        return ip in self.ips.values()


class Cluster:
    def __init__(self, resync_interval=300.0, **config):
        self.store = Store()
        self.writer = MemoryWriter()
        self.pods = LocalPods()
        defaults = {"node": NODE, "node_ips": (NODE_IP,), "derive_endpoint_slices": True}
        self.config = ServiceConfig(**{**defaults, **config})
        self.manager = ServiceManager(self.store, self.writer, self.config, pods=self.pods,
                                      resync_interval=resync_interval)

    def close(self):
        self.manager.stop()
        self.store.close()

    # -- objects --------------------------------------------------------------------------

    def service(self, name="web", ns="shop", ports=None, created="", annotations=None, status=None, **spec):
        spec.setdefault("clusterIP", "10.96.0.10")
        spec["ports"] = ports if ports is not None else [{"name": "http", "port": 80, "targetPort": 8080,
                                                          "protocol": "TCP"}]
        meta = {"name": name, "namespace": ns}
        if created:
            meta["creationTimestamp"] = created
        if annotations:
            meta["annotations"] = annotations
        doc = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
        if status is not None:
            doc["status"] = status
        self.store.upsert(parse_object(doc, "svc.yaml"))

    def endpoints(self, addresses, service="web", ns="shop", name=None, port=8080, port_name="http",
                  protocol="TCP", **conditions):
        """An EndpointSlice; `addresses` items are an address or (address, {conditions}, nodeName)."""
        eps = []
        for item in addresses:
            addr, cond, node = (item, {}, None) if isinstance(item, str) else (tuple(item) + (None,))[:3]
            ep = {"addresses": [addr], "conditions": {**conditions, **cond}}
            if node:
                ep["nodeName"] = node
            eps.append(ep)
        labels = {"kubernetes.io/service-name": service}
        name = name or f"{service}-abc"
        body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": ns, "labels": labels}, "addressType": "IPv4",
                "endpoints": eps, "ports": [{"name": port_name, "port": port, "protocol": protocol}]}
        self.store.upsert(parse_object(body, "eps.yaml"))

    def pod(self, name, ip=None, ns="shop", labels=None, ports=None, **spec):
        containers = [{"name": "c", "ports": ports if ports is not None else [{"name": "http", "containerPort": 8080}]}]
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
                "spec": {"containers": containers, **spec}}
        if ip is not None:
            self.pods.ips[(ns, name)] = ip
        if labels:
            body["metadata"]["labels"] = labels
        self.store.upsert(parse_object(body, "pod.yaml"))

    def delete(self, kind, name, ns="shop"):
        self.store.delete((kind, ns, name))

    def sync(self):
        self.store.wait_idle(5)
        return self.manager.sync()

    # -- what the maps hold ---------------------------------------------------------------

    def entry(self, address, port, proto=TCP, scope=SCOPE_EXTERNAL):
        return self.writer.entry(frontend(address, port, proto, scope))

    def backend_addrs(self, address, port, proto=TCP, scope=SCOPE_EXTERNAL):
        entry = self.entry(address, port, proto, scope)
        assert entry is not None, f"no frontend {address}:{port}"
        return [str(self.writer.backends[b].address) for b in entry.backend_ids]

    def frontends(self):
        return sorted((str(e.frontend.address), e.frontend.port, e.frontend.proto, e.frontend.scope)
                      for e in self.writer.entries())

    def rejected(self):
        return self.manager.problems()["rejected"]


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


# -- basic programming ---------------------------------------------------------------------

def test_cluster_ip_service_with_endpoint_slice(cluster):
    cluster.service()
    cluster.endpoints(["10.244.1.5", "10.244.1.6", "10.244.1.7"])
    changes = cluster.sync()
    entry = cluster.entry("10.96.0.10", 80)
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.5", "10.244.1.6", "10.244.1.7"]
    assert entry.flags == 0 and entry.algorithm == 0 and entry.affinity_timeout == 0
    assert cluster.writer.revnat[entry.service_id] == (ipaddress.IPv4Address("10.96.0.10"), 80)
    assert {b.port for b in cluster.writer.backends.values()} == {8080}
    assert changes.counts()["slots"] == 3 and changes.counts()["masters"] == 1
    view = cluster.manager.service_views()[0]
    assert (view["frontend"], view["type"], view["namespace"], view["name"]) == ("10.96.0.10:80/TCP", "ClusterIP", "shop", "web")
    assert [b["state"] for b in view["backends"]] == ["active"] * 3
    assert cluster.manager.frontend_service("10.96.0.10", 80, TCP) == ("web", "shop")
    assert cluster.manager.frontend_service("10.96.0.10", 81, TCP) is None


def test_multiple_ports_match_slice_ports_by_name_and_protocol(cluster):
    cluster.service(ports=[{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                           {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}])
    cluster.endpoints(["10.244.1.5"], name="web-http")
    cluster.endpoints(["10.244.1.5", "10.244.1.6"], name="web-dns", port=5353, port_name="dns", protocol="UDP")
    cluster.sync()
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.5"]
    assert cluster.backend_addrs("10.96.0.10", 53, UDP) == ["10.244.1.5", "10.244.1.6"]
    ports = {(str(b.address), b.port, b.proto) for b in cluster.writer.backends.values()}
    assert ports == {("10.244.1.5", 8080, TCP), ("10.244.1.5", 5353, UDP), ("10.244.1.6", 5353, UDP)}


def test_node_port_frontends_on_every_node_address_and_wildcard(cluster):
    cluster.service(type="NodePort", ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080}])
    cluster.endpoints(["10.244.1.5"], port_name="")
    cluster.sync()
    assert cluster.frontends() == [("0.0.0.0", 30080, TCP, 0), ("10.245.1.1", 30080, TCP, 0),
                                   ("10.96.0.10", 80, TCP, 0)]
    for addr in (NODE_IP, "0.0.0.0"):
        entry = cluster.entry(addr, 30080)
        assert entry.flags & SVC_F_NODEPORT and not entry.flags & SVC_F_TWO_SCOPES
        assert cluster.backend_addrs(addr, 30080) == ["10.244.1.5"]
    assert cluster.entry("10.96.0.10", 80).flags == 0
    ids = {e.service_id for e in cluster.writer.entries()}
    assert len(ids) == 3  # one service ID per frontend


def test_node_object_addresses_carry_node_ports_too(cluster):
    def node(name, *addresses):
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}}
        cluster.store.upsert(parse_object(body, "node.yaml"))

    cluster.service(type="NodePort", ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080}])
    node(NODE, ("InternalIP", "10.245.1.2"), ("ExternalIP", "10.245.9.7"), ("Hostname", "10.9.9.9"),
         ("InternalIP", "not-an-ip"), ("InternalIP", NODE_IP))
    node("n2", ("InternalIP", "10.245.2.1"))  # another node's addresses are not ours
    cluster.sync()
    node_ports = sorted(fe[0] for fe in cluster.frontends() if fe[1] == 30080)
    assert node_ports == ["0.0.0.0", "10.245.1.1", "10.245.1.2", "10.245.9.7"]
    assert cluster.manager.status()["node_port_addresses"] == [NODE_IP, "10.245.1.2", "10.245.9.7"]
    node(NODE, ("InternalIP", "10.245.1.2"))  # an address went: its frontends go with it
    cluster.sync()
    assert sorted(fe[0] for fe in cluster.frontends() if fe[1] == 30080) == ["0.0.0.0", "10.245.1.1", "10.245.1.2"]


def test_load_balancer_and_external_ips(cluster):
    cluster.service(type="LoadBalancer", externalIPs=["172.16.1.1"], allocateLoadBalancerNodePorts=False,
                    ports=[{"port": 443, "targetPort": 8443}],
                    status={"loadBalancer": {"ingress": [{"ip": "172.16.0.10"}]}})
    cluster.endpoints(["10.244.1.5"], port=8443, port_name="")
    cluster.sync()
    assert cluster.frontends() == [("10.96.0.10", 443, TCP, 0), ("172.16.0.10", 443, TCP, 0),
                                   ("172.16.1.1", 443, TCP, 0)]
    assert cluster.entry("172.16.0.10", 443).flags & SVC_F_LOADBALANCER
    assert cluster.entry("172.16.1.1", 443).flags & SVC_F_EXTERNAL_IPS


def test_headless_and_selectorless_services_program_nothing_or_empty(cluster):
    cluster.service(name="headless", clusterIP="None", selector={"app": "x"})
    cluster.service(name="manual", clusterIP="10.96.0.20")
    cluster.sync()
    assert cluster.frontends() == [("10.96.0.20", 80, TCP, 0)]
    assert cluster.entry("10.96.0.20", 80).backend_ids == []


def test_missing_cluster_ip_is_allocated_stably(cluster):
    cluster.service(clusterIP=None)
    cluster.sync()
    [(ip, port, _, _)] = cluster.frontends()
    assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("10.96.0.0/12") and port == 80
    cluster.service(clusterIP=None, annotations={"note": "changed"})  # re-planned: the address stays
    assert not cluster.sync()
    other = Cluster()
    other.service(clusterIP=None)
    other.sync()
    assert other.frontends()[0][0] == ip  # another node picks the same address
    other.close()


# -- incremental ---------------------------------------------------------------------------

def test_a_backend_added_to_one_service_writes_only_that_service(cluster):
    for i in range(20):
        cluster.service(name=f"s{i}", clusterIP=f"10.96.1.{i + 1}")
        cluster.endpoints([f"10.244.2.{i + 1}", f"10.244.3.{i + 1}"], service=f"s{i}")
    cluster.sync()
    before = dict(cluster.writer.services)
    cluster.endpoints(["10.244.2.6", "10.244.3.6", "10.244.4.6"], service="s5")
    changes = cluster.sync()
    assert changes.counts() == {"backends": 1, "revnat": 0, "maglev": 0, "slots": 1, "masters": 1,
                                "service_deletes": 0, "maglev_deletes": 0, "revnat_deletes": 0,
                                "backend_deletes": 0}
    assert changes.slots[0].slot == 3 and changes.masters[0].count == 3
    changed = {k for k in cluster.writer.services if before.get(k) != cluster.writer.services[k]}
    assert {fe.frontend().address for fe, _ in changed} == {ipaddress.IPv4Address("10.96.1.6")}
    assert not cluster.sync(), "nothing changed, nothing written"


def test_slots_keep_their_positions(cluster):
    cluster.service()
    cluster.endpoints(["10.244.1.1", "10.244.1.2", "10.244.1.3", "10.244.1.4"])
    cluster.sync()
    ids = dict(zip(cluster.backend_addrs("10.96.0.10", 80), cluster.entry("10.96.0.10", 80).backend_ids))
    cluster.endpoints(["10.244.1.1", "10.244.1.3", "10.244.1.4"])  # .2 goes
    changes = cluster.sync()
    # The last backend moves into the hole, one slot is deleted, the master shrinks.
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.1", "10.244.1.4", "10.244.1.3"]
    assert [(w.slot, w.backend_id) for w in changes.slots] == [(2, ids["10.244.1.4"])]
    assert [slot for _, slot in changes.service_deletes] == [4]
    assert changes.backend_deletes == [ids["10.244.1.2"]]


def test_service_deleted_removes_frontends_revnat_and_unshared_backends(cluster):
    cluster.service(name="a", clusterIP="10.96.0.1")
    cluster.service(name="b", clusterIP="10.96.0.2")
    cluster.endpoints(["10.244.1.5", "10.244.1.6"], service="a")
    cluster.endpoints(["10.244.1.6"], service="b")
    cluster.sync()
    a_id = cluster.entry("10.96.0.1", 80).service_id
    cluster.delete("Service", "a")
    cluster.sync()
    assert cluster.frontends() == [("10.96.0.2", 80, TCP, 0)]
    assert a_id not in cluster.writer.revnat
    assert sorted(str(b.address) for b in cluster.writer.backends.values()) == ["10.244.1.6"]  # shared stays


# -- IDs -----------------------------------------------------------------------------------

def test_backend_id_per_address_port_protocol_across_services(cluster):
    cluster.service(name="a", clusterIP="10.96.0.1")
    cluster.service(name="b", clusterIP="10.96.0.2")
    cluster.endpoints(["10.244.1.5"], service="a")
    cluster.endpoints(["10.244.1.5"], service="b")
    cluster.sync()
    assert cluster.entry("10.96.0.1", 80).backend_ids == cluster.entry("10.96.0.2", 80).backend_ids
    assert len(cluster.writer.backends) == 1
    old = cluster.entry("10.96.0.1", 80).backend_ids[0]
    cluster.endpoints([], service="a")
    cluster.sync()
    assert old in cluster.writer.backends  # b still uses it
    cluster.endpoints([], service="b")
    cluster.sync()
    assert cluster.writer.backends == {}
    cluster.endpoints(["10.244.1.5"], service="a")  # the same backend comes back later
    cluster.sync()
    assert cluster.entry("10.96.0.1", 80).backend_ids != [old]


def test_restart_keeps_ids_and_removes_leftovers():
    first = Cluster()
    first.service(name="a", clusterIP="10.96.0.1")
    first.service(name="gone", clusterIP="10.96.0.9")
    first.endpoints(["10.244.1.5", "10.244.1.6"], service="a")
    first.endpoints(["10.244.1.7"], service="gone")
    first.sync()
    before = first.entry("10.96.0.1", 80)
    writer = first.writer
    first.close()
    # A new agent over the same maps, and the Service "gone" deleted while none ran.
    second = Cluster()
    second.writer = writer
    second.manager = ServiceManager(second.store, writer, second.config, pods=second.pods)
    second.service(name="a", clusterIP="10.96.0.1")
    second.endpoints(["10.244.1.5", "10.244.1.6", "10.244.1.8"], service="a")
    changes = second.sync()
    after = second.entry("10.96.0.1", 80)
    assert after.service_id == before.service_id
    assert after.backend_ids[:2] == before.backend_ids  # kept slots and IDs: one slot written
    assert len(changes.slots) == 1
    assert second.frontends() == [("10.96.0.1", 80, TCP, 0)]
    assert "10.244.1.7" not in {str(b.address) for b in writer.backends.values()}
    second.close()


def test_failed_write_is_repaired_from_the_maps(cluster):
    cluster.service()
    cluster.endpoints(["10.244.1.5"])
    cluster.sync()
    cluster.endpoints(["10.244.1.5", "10.244.1.6"])
    cluster.writer.fail_next = OSError(28, "No space left on device")
    with pytest.raises(OSError):
        cluster.sync()
    assert "No space" in cluster.manager.last_error
    cluster.endpoints(["10.244.1.5", "10.244.1.6"], name="web-abc")
    cluster.sync()
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.5", "10.244.1.6"]
    assert cluster.manager.last_error == ""


# -- NodePorts and claims ------------------------------------------------------------------

def test_node_port_allocated_in_range_and_kept(cluster):
    cluster.service(type="NodePort", ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    cluster.sync()
    ports = {(fe[1], fe[2]) for fe in cluster.frontends() if fe[0] == NODE_IP}
    assert len(ports) == 2 and all(30000 <= p <= 32767 for p, _ in ports)
    cluster.endpoints(["10.244.1.5"], port=80)
    cluster.sync()
    assert {(fe[1], fe[2]) for fe in cluster.frontends() if fe[0] == NODE_IP} == ports


def test_node_port_collision_rejects_the_later_service(cluster):
    cluster.service(name="first", clusterIP="10.96.0.1", type="NodePort", created="2026-01-01T00:00:00Z",
                    ports=[{"port": 80, "nodePort": 30080}])
    cluster.sync()
    cluster.service(name="second", clusterIP="10.96.0.2", type="NodePort", ports=[{"port": 81, "nodePort": 30080}])
    cluster.sync()
    assert cluster.entry(NODE_IP, 30080) is not None and cluster.entry("10.96.0.2", 81) is None
    [err] = cluster.rejected()
    assert (err["object"], err["field"]) == ("Service shop/second", "spec.ports[0].nodePort")
    assert "nodePort 30080/TCP is already used by Service shop/first" in err["message"]
    # The first keeps working, including changes to it; the second gets it once free.
    cluster.endpoints(["10.244.1.5"], service="first", port_name="")
    cluster.sync()
    assert cluster.backend_addrs(NODE_IP, 30080) == ["10.244.1.5"]
    cluster.delete("Service", "first")
    cluster.sync()
    assert cluster.rejected() == []
    assert cluster.entry("10.96.0.2", 81) is not None
    assert cluster.manager.frontend_service(NODE_IP, 30080, TCP) == ("second", "shop")


def test_cluster_ip_collision_and_invalid_update_keep_the_previous_version(cluster):
    cluster.service(name="a", clusterIP="10.96.0.1")
    cluster.endpoints(["10.244.1.5"], service="a")
    cluster.sync()
    cluster.service(name="b", clusterIP="10.96.0.1")
    cluster.service(name="a", clusterIP="10.96.0.1", ports=[{"port": 80, "protocol": "SCTP"}])
    cluster.sync()
    rejected = {(e["object"], e["field"]): e["message"] for e in cluster.rejected()}
    assert "SCTP is not supported" in rejected[("Service shop/a", "spec.ports[0].protocol")]
    assert "previous version stays in effect" in rejected[("Service shop/a", "spec.ports[0].protocol")]
    assert "ClusterIP 10.96.0.1 is already used by Service shop/a" in rejected[("Service shop/b", "spec.clusterIP")]
    assert cluster.backend_addrs("10.96.0.1", 80) == ["10.244.1.5"]  # a's valid version serves on
    assert cluster.manager.frontend_service("10.96.0.1", 80, TCP) == ("a", "shop")


def test_endpoint_slice_for_unknown_service_is_kept_and_used_later(cluster):
    cluster.endpoints(["10.244.1.5"], service="later")
    cluster.sync()
    [warning] = cluster.manager.problems()["warnings"]
    assert warning["object"] == "EndpointSlice shop/later-abc"
    assert "Service shop/later does not exist (yet)" in warning["message"]
    assert cluster.frontends() == []
    cluster.service(name="later", clusterIP="10.96.0.5")
    cluster.sync()
    assert cluster.backend_addrs("10.96.0.5", 80) == ["10.244.1.5"]
    assert cluster.manager.problems() == {"rejected": [], "warnings": []}


def test_bad_endpoint_slice_is_reported_and_its_valid_version_serves_on(cluster, tmp_path):
    # A slice that does not parse never reaches the manager: the source reports it, and
    # the store keeps (and the manager serves) the last valid version.
    cluster.service()
    slice_doc = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "web-abc", "namespace": "shop",
                              "labels": {"kubernetes.io/service-name": "web"}},
                 "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.5"]}],
                 "ports": [{"name": "http", "port": 8080}]}
    (tmp_path / "eps.yaml").write_text(yaml.safe_dump(slice_doc))
    source = ManifestsSource(str(tmp_path), cluster.store)
    source.sync_once()
    cluster.sync()
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.5"]
    slice_doc["endpoints"] = [{"addresses": ["not-an-ip"]}]
    (tmp_path / "eps.yaml").write_text(yaml.safe_dump(slice_doc))
    source.sync_once()
    cluster.sync()
    [err] = source.errors
    assert (err.obj, err.field) == ("EndpointSlice shop/web-abc", "endpoints[0].addresses[0]")
    assert "previous valid version stays in effect" in err.message
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.5"]


# -- traffic policies, affinity, terminating -----------------------------------------------

def local_remote(cluster, **spec):
    cluster.service(type="NodePort", ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080}], **spec)
    cluster.endpoints([("10.244.1.5", {}, NODE), ("10.244.9.5", {}, "n2")], port_name="")
    cluster.sync()


def test_etp_local_two_scopes(cluster):
    local_remote(cluster, externalTrafficPolicy="Local")
    ext = cluster.entry(NODE_IP, 30080, scope=SCOPE_EXTERNAL)
    assert ext.flags & SVC_F_EXT_LOCAL and ext.flags & SVC_F_TWO_SCOPES and not ext.flags & SVC_F_INT_LOCAL
    assert cluster.backend_addrs(NODE_IP, 30080) == ["10.244.1.5"]
    assert cluster.backend_addrs(NODE_IP, 30080, scope=SCOPE_INTERNAL) == ["10.244.1.5", "10.244.9.5"]
    internal = cluster.entry(NODE_IP, 30080, scope=SCOPE_INTERNAL)
    assert internal.service_id == ext.service_id and internal.flags == ext.flags
    # ClusterIPs are east-west: ETP does not apply, one scope with every backend.
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.5", "10.244.9.5"]
    assert cluster.entry("10.96.0.10", 80, scope=SCOPE_INTERNAL) is None
    assert {b.local for b in cluster.writer.backends.values()} == {True, False}


def test_itp_local(cluster):
    local_remote(cluster, internalTrafficPolicy="Local")
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.5"]
    assert cluster.entry("10.96.0.10", 80).flags == SVC_F_INT_LOCAL
    assert cluster.backend_addrs(NODE_IP, 30080) == ["10.244.1.5", "10.244.9.5"]
    assert cluster.backend_addrs(NODE_IP, 30080, scope=SCOPE_INTERNAL) == ["10.244.1.5"]
    # The remote backend keeps its entry: the external scope still uses it.
    assert len(cluster.writer.backends) == 2


def test_both_local_is_one_scope_and_back(cluster):
    local_remote(cluster, externalTrafficPolicy="Local", internalTrafficPolicy="Local")
    entry = cluster.entry(NODE_IP, 30080)
    assert entry.flags & SVC_F_EXT_LOCAL and entry.flags & SVC_F_INT_LOCAL and not entry.flags & SVC_F_TWO_SCOPES
    assert cluster.entry(NODE_IP, 30080, scope=SCOPE_INTERNAL) is None
    local_remote(cluster, externalTrafficPolicy="Local")
    assert cluster.entry(NODE_IP, 30080, scope=SCOPE_INTERNAL) is not None
    local_remote(cluster)
    assert cluster.entry(NODE_IP, 30080, scope=SCOPE_INTERNAL) is None  # the internal master went


def test_session_affinity(cluster):
    cluster.service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}})
    cluster.endpoints(["10.244.1.5"])
    cluster.sync()
    entry = cluster.entry("10.96.0.10", 80)
    assert entry.flags & SVC_F_AFFINITY and entry.affinity_timeout == 600
    cluster.service(sessionAffinity="ClientIP")
    cluster.sync()
    assert cluster.entry("10.96.0.10", 80).affinity_timeout == 10800


def test_terminating_backends_get_no_slot_but_keep_their_entry(cluster):
    cluster.service()
    cluster.endpoints(["10.244.1.5", "10.244.1.6"])
    cluster.sync()
    cluster.endpoints(["10.244.1.5", ("10.244.1.6", {"ready": False, "serving": True, "terminating": True}),
                       ("10.244.1.7", {"ready": False})])
    cluster.sync()
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.5"]
    states = {str(b.address): b.state for b in cluster.writer.backends.values()}
    assert states == {"10.244.1.5": BE_STATE_ACTIVE, "10.244.1.6": BE_STATE_TERMINATING}  # .7 not ready: none
    view = cluster.manager.service_views()[0]
    assert [(b["address"], b["state"]) for b in view["backends"]] == [("10.244.1.5", "active"),
                                                                      ("10.244.1.6", "terminating")]
    cluster.endpoints(["10.244.1.5"])  # gone for good
    cluster.sync()
    assert {str(b.address) for b in cluster.writer.backends.values()} == {"10.244.1.5"}


# -- Maglev --------------------------------------------------------------------------------

def test_maglev_tables_follow_backends_per_service(cluster):
    maglev = {"service.cilium.io/lb-algorithm": "maglev"}
    cluster.service(name="a", clusterIP="10.96.0.1", annotations=maglev)
    cluster.service(name="b", clusterIP="10.96.0.2", annotations=maglev)
    cluster.service(name="c", clusterIP="10.96.0.3")
    for name in "abc":
        cluster.endpoints(["10.244.1.5", "10.244.1.6"], service=name)
    cluster.sync()
    a, b, c = (cluster.entry(f"10.96.0.{i}", 80) for i in (1, 2, 3))
    assert a.algorithm == ALGORITHM_MAGLEV and c.algorithm == 0
    assert set(cluster.writer.maglev) == {a.service_id, b.service_id}
    table_a = cluster.writer.maglev[a.service_id]
    assert table_a.shape == (cluster.config.maglev_table_size,)
    assert set(np.unique(table_a).tolist()) == set(a.backend_ids)
    names = sorted((f"{cluster.writer.backends[i].address}:8080/TCP", i) for i in a.backend_ids)
    assert np.array_equal(table_a, build_table(names, cluster.config.maglev_table_size, cluster.config.maglev_seed))
    # A backend added to a: only a's table changes.
    cluster.endpoints(["10.244.1.5", "10.244.1.6", "10.244.1.7"], service="a")
    changes = cluster.sync()
    assert [sid for sid, _ in changes.maglev] == [a.service_id]
    assert not np.array_equal(cluster.writer.maglev[a.service_id], table_a)
    # The annotation removed: the table goes.
    cluster.service(name="a", clusterIP="10.96.0.1")
    changes = cluster.sync()
    assert changes.maglev_deletes == [a.service_id] and a.service_id not in cluster.writer.maglev


def test_maglev_as_agent_default_and_two_scopes():
    c = Cluster(algorithm="maglev", maglev_table_size=251)
    local_remote(c, externalTrafficPolicy="Local")
    ext, internal = c.entry(NODE_IP, 30080), c.entry(NODE_IP, 30080, scope=SCOPE_INTERNAL)
    # The annotation is absent: the master says "default" and the agent's default is Maglev.
    assert ext.algorithm == 0 and internal.algorithm == ALGORITHM_RANDOM
    table = c.writer.maglev[ext.service_id]
    assert table.shape == (251,) and set(np.unique(table).tolist()) == set(ext.backend_ids)  # the local one
    c.close()


def test_same_backends_same_table_on_every_node():
    tables = []
    for order in (["10.244.1.5", "10.244.1.6", "10.244.1.7"], ["10.244.1.7", "10.244.1.5", "10.244.1.6"]):
        c = Cluster(algorithm="maglev")
        c.service(clusterIP="10.96.9.1")  # another node: IDs allocated in another order
        c.service(name="x", clusterIP="10.96.9.2")
        c.endpoints(["10.244.1.9"], service="x")
        c.sync()
        c.endpoints(order)
        c.sync()
        e = c.entry("10.96.9.1", 80)
        table = c.writer.maglev[e.service_id]
        tables.append([str(c.writer.backends[i].address) for i in table[:200]])
        c.close()
    assert tables[0] == tables[1]


# -- endpoints derived from selectors --------------------------------------------------------

def test_endpoints_derived_from_selector_and_updated_with_pods(cluster):
    cluster.service(selector={"app": "web"}, ports=[{"name": "http", "port": 80, "targetPort": "http"}])
    cluster.pod("web-1", "10.244.1.11", labels={"app": "web"})
    cluster.pod("web-2", "10.244.1.12", labels={"app": "web"}, ports=[{"name": "http", "containerPort": 9090}])
    cluster.pod("db", "10.244.1.13", labels={"app": "db"})
    cluster.pod("web-3", None, labels={"app": "web"})  # no address yet: not ready
    cluster.pod("other-ns", "10.244.1.14", ns="elsewhere", labels={"app": "web"})
    cluster.sync()
    backends = sorted((str(b.address), b.port, b.local) for b in cluster.writer.backends.values())
    assert backends == [("10.244.1.11", 8080, True), ("10.244.1.12", 9090, True)]  # named port resolved per pod
    cluster.pods.ips[("shop", "web-3")] = "10.244.1.15"
    cluster.manager.pods_changed(["shop/web-3"])  # the endpoint appeared
    cluster.pod("web-1", "10.244.1.11", labels={"app": "old"})  # relabelled away
    cluster.sync()
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.15", "10.244.1.12"]
    cluster.delete("Pod", "web-2")
    cluster.sync()
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.15"]


def test_given_endpoint_slices_win_over_the_selector(cluster):
    cluster.service(selector={"app": "web"})
    cluster.pod("web-1", "10.244.1.11", labels={"app": "web"})
    cluster.sync()
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.1.11"]
    cluster.endpoints(["10.244.7.7"])
    cluster.sync()
    assert cluster.backend_addrs("10.96.0.10", 80) == ["10.244.7.7"]


def test_pod_status_readiness_and_terminating():
    c = Cluster()
    c.service(selector={"app": "web"}, ports=[{"port": 80, "targetPort": 8080}])
    for name, ready, deleting in (("a", "True", False), ("b", "False", False), ("c", "True", True)):
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": name, "namespace": "shop", "labels": {"app": "web"},
                    **({"deletionTimestamp": "now"} if deleting else {})},
                "spec": {"nodeName": "n2", "containers": [{"name": "c"}]},
                "status": {"podIP": f"10.244.9.{ord(name)}", "conditions": [{"type": "Ready", "status": ready}]}}
        c.store.upsert(parse_object(body, "p.yaml"))
    c.sync()
    states = {str(b.address): (b.state, b.local) for b in c.writer.backends.values()}
    assert states == {"10.244.9.97": (BE_STATE_ACTIVE, False), "10.244.9.99": (BE_STATE_TERMINATING, False)}
    c.close()


# -- hostPorts -----------------------------------------------------------------------------

def test_host_ports_of_local_pods(cluster):
    cluster.pod("proxy", "10.244.1.20", ports=[{"containerPort": 80, "hostPort": 8080},
                                               {"containerPort": 81, "hostPort": 30081}])
    cluster.pod("elsewhere", None, ports=[{"containerPort": 80, "hostPort": 8081}], nodeName="n2")
    cluster.sync()
    assert cluster.frontends() == [("0.0.0.0", 8080, TCP, 0), ("10.245.1.1", 8080, TCP, 0)]
    entry = cluster.entry(NODE_IP, 8080)
    assert entry.flags & SVC_F_HOSTPORT
    assert cluster.backend_addrs(NODE_IP, 8080) == ["10.244.1.20"]
    [warning] = [w for w in cluster.manager.problems()["warnings"] if w["object"] == "Pod shop/proxy"]
    assert "inside the NodePort range" in warning["message"]
    view = [v for v in cluster.manager.service_views() if v["address"] == NODE_IP][0]
    assert (view["type"], view["kind"], view["name"]) == ("HostPort", "Pod", "proxy")
    cluster.pod("copy", "10.244.1.21", ports=[{"containerPort": 80, "hostPort": 8080}])
    cluster.sync()
    assert any(e["object"] == "Pod shop/copy" and "already used by Pod shop/proxy" in e["message"]
               for e in cluster.rejected())
    cluster.delete("Pod", "proxy")
    cluster.sync()
    assert cluster.backend_addrs(NODE_IP, 8080) == ["10.244.1.21"]


# -- capacity, status ----------------------------------------------------------------------

def test_full_services_map_rejects_with_a_clear_error():
    c = Cluster(lb_map_max=4)
    c.service(name="a", clusterIP="10.96.0.1")
    c.endpoints(["10.244.1.1", "10.244.1.2"], service="a")
    c.service(name="b", clusterIP="10.96.0.2")
    c.endpoints(["10.244.1.3", "10.244.1.4"], service="b")
    c.sync()
    assert c.frontends() == [("10.96.0.1", 80, TCP, 0)]
    [err] = c.rejected()
    assert err["object"] == "Service shop/b" and "services map is full" in err["message"]
    assert "--bpf-lb-map-max" in err["message"]
    c.delete("Service", "a")
    c.sync()
    assert c.frontends() == [("10.96.0.2", 80, TCP, 0)]
    c.close()


def test_full_backends_map_rejects_with_a_clear_error():
    c = Cluster(lb_map_max=4)
    gone = {"ready": False, "serving": True, "terminating": True}  # a backend, but no slot
    c.service(name="a", clusterIP="10.96.0.1")
    c.endpoints(["10.244.1.1", ("10.244.1.2", gone), ("10.244.1.9", gone)], service="a")
    c.service(name="b", clusterIP="10.96.0.2")
    c.endpoints(["10.244.1.3", ("10.244.1.4", gone)], service="b")
    c.sync()
    assert c.frontends() == [("10.96.0.1", 80, TCP, 0)]
    [err] = c.rejected()
    assert err["object"] == "Service shop/b"
    assert "backends map is full: 3 of 4 backends used and this object adds 2" in err["message"]
    c.delete("Service", "a")
    c.sync()
    assert c.frontends() == [("10.96.0.2", 80, TCP, 0)] and c.rejected() == []
    c.close()


def test_status_and_revisions(cluster):
    cluster.service(type="NodePort", ports=[{"port": 80, "nodePort": 30080}])
    cluster.sync()
    status = cluster.manager.status()
    assert (status["services"], status["frontends"], status["node_port_range"]) == (1, 3, "30000-32767")
    assert status["service_types_in_use"] == ["ClusterIP", "NodePort"]
    assert cluster.manager.wait_for_revision(cluster.manager.revision, 0)
    assert not cluster.manager.wait_for_revision(cluster.manager.revision + 1, 0.01)


def test_background_loop_programs_changes():
    c = Cluster()
    c.manager.start()
    c.service()
    c.endpoints(["10.244.1.5"])
    c.store.wait_idle(5)
    assert c.manager.wait_for_revision(c.manager.revision, 10)
    assert c.backend_addrs("10.96.0.10", 80) == ["10.244.1.5"]
    c.close()


# -- the packed layouts the BpfWriter batches ------------------------------------------------

def test_numpy_records_match_the_ctypes_mirrors():
    import ctypes

    from cilium_py.agent.services.writer import FE, LB4_BACKEND, LB4_KEY, LB4_REVNAT, LB4_SERVICE, _keys
    from cilium_py.datapath.maps.lb import Lb4Backend, Lb4Key, Lb4ReverseNat, Lb4Service

    for dtype, ctype in ((LB4_KEY, Lb4Key), (LB4_SERVICE, Lb4Service), (LB4_BACKEND, Lb4Backend),
                         (LB4_REVNAT, Lb4ReverseNat)):
        assert dtype.itemsize == ctypes.sizeof(ctype)
        for name in dtype.names:
            assert dtype.fields[name][1] == getattr(ctype, name).offset, (ctype.__name__, name)
    fe = FE(int(ipaddress.IPv4Address("10.96.0.10")), 80, 17, 1)
    packed = _keys([(fe, 3)]).tobytes()
    assert packed == bytes(frontend("10.96.0.10", 80, 17, 1).key(3))
    assert fe.frontend() == frontend("10.96.0.10", 80, 17, 1)


def test_hubble_names_service_frontends(cluster):
    from cilium_py.agent.nodeview import AgentNodeView

    cluster.service()
    cluster.sync()
    view = AgentNodeView(ipcache_identity=lambda ip: None, services=cluster.manager)
    assert view.service_by_frontend("10.96.0.10", 80, TCP) == ("web", "shop")
    assert view.service_by_frontend("10.96.0.10", 80, UDP) is None
    before = view.generation
    cluster.service(clusterIP="10.96.0.11")
    cluster.sync()
    assert view.generation != before  # the parser's cache of service names is dropped


def test_drift_is_repaired_from_the_maps(cluster):
    cluster.service(annotations={"service.cilium.io/lb-algorithm": "maglev"})
    cluster.endpoints(["10.244.1.5", "10.244.1.6"])
    cluster.sync()
    entry = cluster.entry("10.96.0.10", 80)
    # Someone deletes a slot and a backend behind the agent's back.
    fe = next(k for k in cluster.writer.services if k[1] == 2)
    del cluster.writer.services[fe]
    cluster.writer.backends.pop(entry.backend_ids[0])
    cluster.manager.repair_from_maps()  # what the loop does every resync_interval
    changes = cluster.sync()
    assert cluster.entry("10.96.0.10", 80) == entry
    assert (len(changes.slots), len(changes.backends), changes.maglev) == (1, 1, [])  # the table is known


def test_resync_interval_triggers_a_repair():
    c = Cluster(resync_interval=0.05)
    c.service()
    c.endpoints(["10.244.1.5"])
    c.store.wait_idle(5)
    c.manager.start()
    assert c.manager.wait_for_revision(c.manager.revision, 10)
    c.writer.services.clear()
    syncs = c.manager.syncs
    assert poll(lambda: c.entry("10.96.0.10", 80) is not None, 10)
    assert c.manager.syncs > syncs
    c.close()
