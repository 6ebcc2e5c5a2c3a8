"""Planning alone: the frontends, flags, scopes, backends and claims of a Service or a
Pod's hostPorts, from parsed records and the node's addresses (no store, no maps)."""

from __future__ import annotations

import pytest

from cilium_py.agent.services.allocators import ClusterIPAllocator, NodePortAllocator
from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.services.endpoints import BackendRef
from cilium_py.agent.objects import Service, ServicePort
from cilium_py.agent.services.parse import HostPort, ServiceValidationError
from cilium_py.agent.services.plan import WILDCARD, OwnerPlan, claim_text, describe, plan_host_ports, plan_service
from cilium_py.datapath.maps import lb

WEB = ("Service", "shop", "web")
POD = ("HostPort", "shop", "proxy")
NODE_IP = "10.245.1.1"
TCP, UDP = 6, 17
CONFIG = ServiceConfig(node="n1", node_ips=(NODE_IP,))


def spec(type="ClusterIP", cluster_ip="10.96.0.10", ports=None, headless=False, **fields) -> Service:
    ports = ports or (ServicePort("http", 80, TCP, 8080, 0, 0),)
    return Service(namespace="shop", name="web", source="svc.yaml", type=type, cluster_ip=cluster_ip,
                   headless=headless, ports=tuple(ports), **fields)


def backend(address, local=False, state=lb.BE_STATE_ACTIVE) -> BackendRef:
    return BackendRef((address, 8080, TCP), state, local)


def plan(s: Service, backends=None, old=None, claims=None) -> OwnerPlan:
    claims = {} if claims is None else claims
    return plan_service(WEB, s, backends or {}, CONFIG, [NODE_IP], ClusterIPAllocator(CONFIG.service_cidr, claims),
                        NodePortAllocator(CONFIG.node_port_range, claims), old)


def test_cluster_ip_service_plans_one_frontend_and_its_claims():
    p = plan(spec(), {0: [backend("10.244.1.5")]})
    [fp] = p.frontends.values()
    assert (fp.key, fp.type, fp.flags, fp.internal) == (("10.96.0.10", 80, TCP), "ClusterIP", 0, None)
    assert [r.key[0] for r in fp.external] == ["10.244.1.5"]
    assert p.claims == {("ip", "10.96.0.10"): "spec.clusterIP", ("fe", "10.96.0.10", 80, TCP): "spec.clusterIP"}
    assert p.backends == {("10.244.1.5", 8080, TCP): (lb.BE_STATE_ACTIVE, False)}
    assert p.entry_count() == 2  # the master and one slot


def test_node_port_on_every_node_address_and_the_wildcard():
    s = spec("NodePort", ports=(ServicePort("http", 80, TCP, 8080, 30080, 0),))
    p = plan(s)
    node_ports = {k: fp for k, fp in p.frontends.items() if fp.type == "NodePort"}
    assert set(node_ports) == {(NODE_IP, 30080, TCP), (WILDCARD, 30080, TCP)}
    assert all(fp.flags & lb.SVC_F_NODEPORT and fp.flags & lb.SVC_F_ROUTABLE for fp in node_ports.values())
    assert p.claims[("nodeport", 30080, TCP)] == "spec.ports[0].nodePort"
    assert p.node_ports == {("http", TCP): 30080}


def test_allocated_cluster_ip_and_node_port_are_kept_across_replans():
    s = spec("NodePort", cluster_ip=None)
    first = plan(s)
    claims = {c: WEB for c in first.claims}
    again = plan(s, old=first, claims=claims)
    assert again.cluster_ip == first.cluster_ip and again.node_ports == first.node_ports
    assert again == first


def test_external_traffic_policy_local_gives_two_scopes():
    s = spec("NodePort", ports=(ServicePort("http", 80, TCP, 8080, 30080, 0),), etp_local=True)
    p = plan(s, {0: [backend("10.244.1.5", local=True), backend("10.244.2.5")]})
    fp = p.frontends[(NODE_IP, 30080, TCP)]
    assert fp.flags & lb.SVC_F_EXT_LOCAL and fp.flags & lb.SVC_F_TWO_SCOPES
    assert [r.key[0] for r in fp.external] == ["10.244.1.5"]
    assert [r.key[0] for r in fp.internal] == ["10.244.1.5", "10.244.2.5"]
    cip = p.frontends[("10.96.0.10", 80, TCP)]
    assert cip.internal is None and len(cip.external) == 2  # ClusterIPs are east-west: one scope


def test_backends_no_frontend_uses_keep_an_entry():
    s = spec(etp_local=True, itp_local=True)
    p = plan(s, {0: [backend("10.244.2.5")]})  # no local backend on this node
    assert p.frontends[("10.96.0.10", 80, TCP)].external == ()
    assert ("10.244.2.5", 8080, TCP) in p.backends


def test_a_frontend_defined_twice_is_rejected_with_its_field():
    s = spec(external_ips=("10.96.0.10",))
    with pytest.raises(ServiceValidationError) as e:
        plan(s)
    err = e.value.errors[0]
    assert (err.obj, err.field) == ("Service shop/web", "spec.externalIPs[0]")
    assert "already defined by this Service as ClusterIP" in err.message


def test_headless_and_external_name_plan_nothing():
    assert plan(spec(cluster_ip="", headless=True)).empty
    assert plan(spec("ExternalName", cluster_ip="")).empty


def test_host_ports_on_the_host_ip_or_every_node_address():
    ports = [HostPort(8080, 80, TCP, None, "spec.containers[0].ports[0]"),
             HostPort(5353, 53, UDP, "10.245.1.1", "spec.containers[0].ports[1]")]
    p = plan_host_ports(POD, ports, "10.244.1.21", CONFIG, [NODE_IP])
    assert set(p.frontends) == {(NODE_IP, 8080, TCP), (WILDCARD, 8080, TCP), (NODE_IP, 5353, UDP)}
    fp = p.frontends[(WILDCARD, 8080, TCP)]
    assert fp.type == "HostPort" and fp.flags == lb.SVC_F_HOSTPORT | lb.SVC_F_ROUTABLE
    assert fp.external == (BackendRef(("10.244.1.21", 80, TCP), lb.BE_STATE_ACTIVE, True),)
    assert p.claims[("fe", NODE_IP, 5353, UDP)] == "spec.containers[0].ports[1].hostPort"


def test_claims_and_owners_read_as_people_write_them():
    assert claim_text(("ip", "10.96.0.10")) == "ClusterIP 10.96.0.10"
    assert claim_text(("nodeport", 30080, UDP)) == "nodePort 30080/UDP"
    assert claim_text(("fe", NODE_IP, 8080, TCP)) == f"frontend {NODE_IP}:8080/TCP"
    assert (describe(WEB), describe(POD)) == ("Service shop/web", "Pod shop/proxy")
