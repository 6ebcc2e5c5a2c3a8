"""Hubble's flow enrichment through the agent's NodeView (agent/nodeview.py) over an
in-memory control plane, service manager and ipcache: recorded datapath events come out
named as the agent would name them. No privileges needed."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from cilium_py.agent.controller import LocalEndpoint
from cilium_py.agent.endpoints import EndpointHandle
from cilium_py.agent.nodeview import AgentNodeView
from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.nodeview import EndpointInfo, NullNodeView, PolicyRef, ServiceRef
from cilium_py.hubble.parser import Parser

RECORDS = {name: [bytes.fromhex(h) for h in hexes] for name, hexes in
           json.loads((Path(__file__).parent / "data" / "hubble_events.json").read_text()).items()}

POD_IP, PEER_IP = "10.244.1.10", "10.244.2.20"
POD_ID, POD_IDENTITY, PEER_IDENTITY = 101, 10101, 20202
ALLOW_COOKIE = 7


def local_endpoint(pod_key: str, ip: str, endpoint_id: int, identity: int, labels: dict) -> LocalEndpoint:
    handle = EndpointHandle(name=pod_key.replace("/", "-"), endpoint_id=endpoint_id,
                            ip=ipaddress.IPv4Address(ip), identity=identity, netns="",
                            host_ifname="", ifindex=0)
    return LocalEndpoint(pod_key=pod_key, handle=handle, labels=labels, identity=identity,
                         named_ports={}, container_ports=[])


class MemoryControlPlane:
    """The read-only accessors of ControlPlane that the node view uses, held in memory."""

    def __init__(self):
        self.generation = 1
        self.endpoints = [local_endpoint("shop/web-1", POD_IP, POD_ID, POD_IDENTITY,
                                         {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "shop"})]
        self.identities = {PEER_IDENTITY: {"k8s:app": "db"}}
        self.cookies = {ALLOW_COOKIE: ("CiliumNetworkPolicy", "shop", "allow-web"),
                        8: ("CiliumClusterwideNetworkPolicy", "", "cluster-wide")}
        self.endpoint_reads = 0

    def local_endpoints(self):
        self.endpoint_reads += 1
        return list(self.endpoints)

    def identity_labels(self, identity):
        return self.identities.get(identity)

    def policy_by_cookie(self, cookie):
        return self.cookies.get(cookie)


class MemoryServices:
    generation = 0

    def frontend_service(self, ip, port, protocol):
        return ("db", "shop") if (ip, port, protocol) == (PEER_IP, 80, 6) else None


def view(control=None, services=None, ipcache=None) -> AgentNodeView:
    ipcache = {PEER_IP: PEER_IDENTITY} if ipcache is None else ipcache
    return AgentNodeView(ipcache.get, control=control, services=services)


def test_answers_from_the_control_plane_services_and_ipcache():
    v = view(MemoryControlPlane(), MemoryServices())
    assert v.endpoint_by_ip(POD_IP) == EndpointInfo(
        POD_ID, POD_IDENTITY, "shop", "web-1", ("k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"))
    assert v.endpoint_by_ip(PEER_IP) is None
    assert v.identity_by_ip(PEER_IP) == PEER_IDENTITY and v.identity_by_ip("10.250.0.1") == 0
    assert v.identity_labels(PEER_IDENTITY) == ("k8s:app=db",)
    assert v.identity_labels(1) == ("reserved:host",) and v.identity_labels(99999) == ()
    assert v.policy_by_cookie(ALLOW_COOKIE) == PolicyRef("allow-web", "shop", "CiliumNetworkPolicy")
    assert v.policy_by_cookie(8) == PolicyRef("cluster-wide", "", "CiliumClusterwideNetworkPolicy")
    assert v.policy_by_cookie(1234) is None
    assert v.service_by_frontend(PEER_IP, 80, 6) == ServiceRef("db", "shop")
    assert v.service_by_frontend(PEER_IP, 80, 17) is None


def test_parser_names_flows_through_the_view():
    parser = Parser("node-a", view(MemoryControlPlane(), MemoryServices()))
    verdict, trace = parser.parse_batch(RECORDS["allowed_egress_tcp"])
    assert parser.errors == 0
    assert (verdict.source.pod_name, verdict.source.namespace, verdict.source.ID) == ("web-1", "shop", POD_ID)
    assert list(verdict.source.labels) == ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"]
    assert (verdict.destination.identity, list(verdict.destination.labels)) == (PEER_IDENTITY, ["k8s:app=db"])
    assert [p.name for p in verdict.egress_allowed_by] == ["allow-web"]
    assert (verdict.destination_service.name, verdict.destination_service.namespace) == ("db", "shop")
    (world,) = parser.parse_batch(RECORDS["udp_to_world"])
    assert (world.destination.identity, list(world.destination.labels)) == (2, ["reserved:world"])


def test_endpoints_are_indexed_once_per_generation():
    control = MemoryControlPlane()
    v = view(control)
    parser = Parser("node-a", v)
    parser.parse_batch(RECORDS["udp_to_world"] * 20)
    assert control.endpoint_reads == 1
    control.endpoints = [local_endpoint("shop/web-2", POD_IP, 102, POD_IDENTITY, {"k8s:app": "web"})]
    control.generation = 2  # what a regeneration does
    (flow,) = parser.parse_batch(RECORDS["udp_to_world"])
    assert (flow.source.pod_name, flow.source.ID) == ("web-2", 102) and control.endpoint_reads == 2


def test_services_changes_move_the_generation():
    services = MemoryServices()
    v = view(MemoryControlPlane(), services)
    before = v.generation
    services.generation = 5
    assert v.generation != before


def test_a_datapath_only_agent_names_identities_only():
    v = view()
    assert v.generation == (0, 0)
    assert v.endpoint_by_ip(POD_IP) is None and v.policy_by_cookie(ALLOW_COOKIE) is None
    assert v.service_by_frontend(PEER_IP, 80, 6) is None
    assert v.identity_by_ip(PEER_IP) == PEER_IDENTITY
    assert v.identity_labels(PEER_IDENTITY) == () and v.identity_labels(2) == ("reserved:world",)
    (trace,) = Parser("node-a", v).parse_batch(RECORDS["udp_to_world"])
    assert trace.source.pod_name == "" and trace.source.identity == POD_IDENTITY


def test_an_unreadable_ipcache_means_unknown_not_an_error():
    def broken(ip):
        raise OSError(9, "Bad file descriptor")

    v = AgentNodeView(broken)
    assert v.identity_by_ip(PEER_IP) == 0


def test_close_releases_what_the_view_holds():
    closed = []
    AgentNodeView(lambda ip: None, close=lambda: closed.append(True)).close()
    assert closed == [True]


def test_the_null_view_knows_reserved_identities_only():
    null = NullNodeView()
    assert null.endpoint_by_ip(POD_IP) is None and null.identity_by_ip(PEER_IP) == 0
    assert null.identity_labels(1) == ("reserved:host",) and null.identity_labels(PEER_IDENTITY) == ()
    assert null.policy_by_cookie(ALLOW_COOKIE) is None and null.service_by_frontend(PEER_IP, 80, 6) is None
    (flow,) = Parser("node-a", null).parse_batch(RECORDS["udp_to_world"])
    assert flow.verdict == F.FORWARDED and flow.source.pod_name == ""


def test_the_control_plane_accessors_the_view_relies_on():
    """ControlPlane's own accessors (not just the in-memory stand-in) answer as the view
    expects; called on a bare object, as building a ControlPlane needs pinned maps."""
    from types import SimpleNamespace

    from cilium_py.agent.controller import ControlPlane
    from cilium_py.agent.policy.repository import PolicyRepository

    ep = local_endpoint("shop/web-1", POD_IP, POD_ID, POD_IDENTITY, {"k8s:app": "web"})
    repo = PolicyRepository()
    repo.upsert(("CiliumNetworkPolicy", "shop", "allow-web"), [])
    cookie = repo.cookie(("CiliumNetworkPolicy", "shop", "allow-web"))
    control = SimpleNamespace(endpoints={"shop/web-1": ep}, repo=repo,
                              identities=SimpleNamespace(lookup={PEER_IDENTITY: {"k8s:app": "db"}}.get))
    assert ControlPlane.local_endpoints(control) == [ep]
    assert ControlPlane.identity_labels(control, PEER_IDENTITY) == {"k8s:app": "db"}
    assert ControlPlane.policy_by_cookie(control, cookie) == ("CiliumNetworkPolicy", "shop", "allow-web")
    assert ControlPlane.policy_by_cookie(control, 0) is None
