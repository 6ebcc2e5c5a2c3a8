"""What the service manager hands out, alone: IDs kept and reused only after going round,
restored IDs, and ClusterIPs and nodePorts that are stable, kept across changes and
never taken from another owner."""

from __future__ import annotations

import ipaddress

import pytest

from cilium_py.agent.services.allocators import ClusterIPAllocator, IDAllocator, IDExhausted, NodePortAllocator
from cilium_py.agent.objects import Service, ServicePort
from cilium_py.agent.services.parse import ServiceValidationError

WEB = ("Service", "shop", "web")
OTHER = ("Service", "shop", "other")
TCP, UDP = 6, 17


def node_port_service(name="web", ports=(("http", TCP),)) -> Service:
    return Service(namespace="shop", name=name, source="svc.yaml", type="NodePort", cluster_ip="10.96.0.10",
                   ports=tuple(ServicePort(n, 80, proto, 8080, 0, i) for i, (n, proto) in enumerate(ports)))


# -- IDs ------------------------------------------------------------------------------------

def test_backend_ids_are_shared_and_reused_only_after_going_round():
    ids = IDAllocator("backend", 1, 5)
    a = ids.acquire("a")
    assert ids.acquire("a") == a == 1
    b = ids.acquire("b")
    assert ids.release("a") == 1
    assert ids.acquire("c") == 3  # not 1: a released ID waits until the counter goes round
    ids.acquire("d"), ids.acquire("e")
    assert ids.acquire("f") == 1  # wrapped, 1 was free again
    with pytest.raises(IDExhausted, match="all 5 backend IDs are in use"):
        ids.acquire("g")
    assert b == 2



def test_restored_ids_are_kept_and_new_ones_continue_after_them():
    ids = IDAllocator("service", 1, 100)
    assert ids.restore("a", 7)
    assert not ids.restore("b", 7)      # the ID is taken: a conflicting leftover
    assert not ids.restore("a", 9)      # the key has its ID already
    assert not ids.restore("c", 101)    # out of the range
    assert ids.acquire("d") == 8        # after the highest restored ID, not in the gap before it
    assert (ids.get("a"), ids.key_of(7), len(ids)) == (7, "a", 2)


# -- ClusterIPs -----------------------------------------------------------------------------

def test_cluster_ip_is_stable_in_the_cidr_and_kept_across_changes():
    claims: dict = {}
    alloc = ClusterIPAllocator("10.96.0.0/24", claims)
    ip = alloc.allocate(WEB, "", "svc.yaml")
    assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("10.96.0.0/24")
    assert ip not in ("10.96.0.0", "10.96.0.255")
    assert ClusterIPAllocator("10.96.0.0/24", {}).allocate(WEB, "", "svc.yaml") == ip  # every agent agrees
    claims[("ip", ip)] = WEB
    assert alloc.allocate(WEB, ip, "svc.yaml") == ip   # its own, kept
    taken = alloc.allocate(OTHER, ip, "svc.yaml")      # another owner's previous address is not its own
    assert taken != ip


def test_cluster_ip_probes_past_taken_addresses_and_reports_a_full_cidr():
    claims: dict = {}
    alloc = ClusterIPAllocator("10.96.0.0/30", claims)   # two usable addresses
    first = alloc.allocate(WEB, "", "svc.yaml")
    claims[("ip", first)] = WEB
    second = alloc.allocate(OTHER, "", "svc.yaml")
    assert {first, second} == {"10.96.0.1", "10.96.0.2"}
    claims[("ip", second)] = OTHER
    with pytest.raises(ServiceValidationError) as e:
        alloc.allocate(("Service", "shop", "third"), "", "third.yaml")
    err = e.value.errors[0]
    assert (err.source, err.obj, err.field) == ("third.yaml", "Service shop/third", "spec.clusterIP")
    assert "no free address found in 10.96.0.0/30" in err.message


# -- nodePorts ------------------------------------------------------------------------------

def test_node_port_is_stable_in_range_and_kept():
    claims: dict = {}
    alloc = NodePortAllocator((30000, 32767), claims)
    spec = node_port_service()
    port = alloc.allocate(WEB, spec, spec.ports[0], None, set())
    assert 30000 <= port <= 32767
    assert NodePortAllocator((30000, 32767), {}).allocate(WEB, spec, spec.ports[0], None, set()) == port
    claims[("nodeport", port, TCP)] = WEB
    assert alloc.allocate(WEB, spec, spec.ports[0], port, set()) == port
    # The same port taken by another owner, or already used by this Service: a new one.
    claims[("nodeport", 30500, TCP)] = OTHER
    assert alloc.allocate(WEB, spec, spec.ports[0], 30500, set()) not in (30500, None)
    assert alloc.allocate(WEB, spec, spec.ports[0], port, {port}) != port
    # Out of the range (the range changed): a new one.
    assert 30000 <= alloc.allocate(WEB, spec, spec.ports[0], 29999, set()) <= 32767


def test_node_ports_are_per_protocol_and_skip_taken_ones():
    claims: dict = {}
    alloc = NodePortAllocator((31000, 31001), claims)
    spec = node_port_service(ports=(("dns", UDP),))
    udp = alloc.allocate(WEB, spec, spec.ports[0], None, set())
    claims[("nodeport", udp, UDP)] = WEB
    other = node_port_service(name="other", ports=(("dns", UDP),))
    assert alloc.allocate(OTHER, other, other.ports[0], None, set()) == ({31000, 31001} - {udp}).pop()
    claims[("nodeport", 31000, UDP)] = claims[("nodeport", 31001, UDP)] = WEB
    with pytest.raises(ServiceValidationError) as e:
        alloc.allocate(OTHER, other, other.ports[0], None, set())
    err = e.value.errors[0]
    assert (err.obj, err.field) == ("Service shop/other", "spec.ports[0].nodePort")
    assert "no free nodePort left in 31000-31001" in err.message
    tcp = node_port_service(name="other")
    assert alloc.allocate(OTHER, tcp, tcp.ports[0], None, set()) in (31000, 31001)  # TCP is free
