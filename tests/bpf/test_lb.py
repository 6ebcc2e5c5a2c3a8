"""The pods' per-packet load balancer (bpf_lxc.c + lib/lb.h + the conntrack service entries),
run with BPF_PROG_TEST_RUN on crafted frames.

cil_from_container sees what the client pod sends to a service frontend and must rewrite it
to a backend; cil_to_container sees the backend's replies and must rewrite them back to the
frontend. Every rewritten frame is parsed with scapy and its IPv4 and TCP/UDP checksums are
compared with the ones scapy computes for the same packet.

The socket hooks (bpf_sock.c) cannot be test-run (the kernel has no BPF_PROG_TEST_RUN for
cgroup sock_addr programs): tests/netns/test_services.py covers them with real sockets.
"""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, IPOption
from scapy.layers.inet import TCP as TCPSeg
from scapy.layers.inet import UDP as UDPDgram
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from cilium_py.agent.policy.mapstate import PolicyRule, PolicyWriter
from cilium_py.datapath import reasons
from cilium_py.datapath.maps.conntrack import monotonic_seconds
from cilium_py.datapath.maps.endpoints import ENDPOINT_F_HOST
from cilium_py.datapath.maps.lb import (
    ALGORITHM_MAGLEV,
    ALGORITHM_RANDOM,
    BE_STATE_ACTIVE,
    BE_STATE_TERMINATING,
    SCOPE_INTERNAL,
    SVC_F_AFFINITY,
    SVC_F_EXTERNAL_IPS,
    SVC_F_TWO_SCOPES,
    AffinityMap,
    Backend,
    BackendsMap,
    LbAffinityKey,
    MaglevMap,
    RevNatMap,
    ServiceEntry,
    ServicesMap,
    affinity_client_id,
    frontend,
)
from cilium_py.datapath.maps.policy import EGRESS
from cilium_py.datapath.testrun import TC_ACT_OK, TC_ACT_SHOT

from . import packets as pk

pytestmark = [pytest.mark.bpf]

FROM = "cil_from_container"  # the client pod's egress
TO = "cil_to_container"      # the client pod's ingress
TEST_RUN_IFINDEX = 1

POD_IP, POD_ID, POD_IDENTITY = "10.244.1.10", 101, 10101
PEER_IP, PEER_IDENTITY = "10.244.2.20", 20202
BACKEND_IDENTITY = 30303
VIP, VPORT = "10.96.0.10", 80
SERVICE_ID = 7
BACKENDS = {1: ("10.244.2.21", 8080), 2: ("10.244.2.22", 8080), 3: ("10.244.2.23", 8080)}
TCP, UDP = 6, 17
DROP_NO_SERVICE = 158
TC_ACT_REDIRECT = 7


@pytest.fixture
def lb(datapath, maps):
    """The LB maps, empty before and after; the client pod and the backends' identity."""
    pin = datapath.config.pin_dir
    opened = LbMaps(ServicesMap(pin), BackendsMap(pin), RevNatMap(pin),
                    MaglevMap(pin, datapath.config.maglev_table_size), AffinityMap(pin))
    opened.clear()
    maps.endpoints.upsert(POD_IP, endpoint_id=POD_ID, ifindex=TEST_RUN_IFINDEX,
                          identity=POD_IDENTITY)
    maps.ipcache.upsert(PEER_IP, PEER_IDENTITY)
    for ip, _ in BACKENDS.values():
        maps.ipcache.upsert(ip, BACKEND_IDENTITY)
    yield opened
    opened.clear()
    opened.close()


class LbMaps:
    def __init__(self, services, backends, revnat, maglev, affinity):
        self.services, self.backends, self.revnat = services, backends, revnat
        self.maglev, self.affinity = maglev, affinity

    def all(self):
        return (self.services, self.backends, self.revnat, self.maglev, self.affinity)

    def clear(self):
        for m in self.all():
            m.clear()

    def close(self):
        for m in self.all():
            m.close()

    def backend(self, backend_id: int, state: int = BE_STATE_ACTIVE, proto: int = TCP):
        ip, port = BACKENDS[backend_id]
        self.backends.upsert(Backend(backend_id, ipaddress.IPv4Address(ip), port, proto, state))

    def service(self, backend_ids, *, vip=VIP, port=VPORT, proto=TCP, service_id=SERVICE_ID,
                flags=0, affinity_timeout=0, algorithm=0, scope=0, define_backends=True):
        """A frontend whose slots are `backend_ids` (the active ones), its rev-NAT entry and,
        unless told otherwise, active backend entries for them."""
        if define_backends:
            for bid in backend_ids:
                self.backend(bid, proto=proto)
        self.services.upsert(ServiceEntry(frontend(vip, port, proto, scope), service_id,
                                          list(backend_ids), flags=flags,
                                          affinity_timeout=affinity_timeout, algorithm=algorithm))
        self.revnat.upsert(service_id, vip, port)


# -- helpers --------------------------------------------------------------------------

def assert_checksums(frame: bytes):
    """The frame's IPv4 and L4 checksums equal what scapy computes for the same packet."""
    pkt = Ether(frame)
    rebuilt = pkt.copy()
    del rebuilt[IP].chksum
    l4 = TCPSeg if TCPSeg in rebuilt else UDPDgram
    if l4 is UDPDgram and pkt[UDPDgram].chksum == 0:
        l4 = None  # sent without a checksum: stays without one
    if l4 is not None:
        del rebuilt[l4].chksum
    rebuilt = Ether(bytes(rebuilt))
    assert pkt[IP].chksum == rebuilt[IP].chksum, "IPv4 header checksum"
    if l4 is not None:
        assert pkt[l4].chksum == rebuilt[l4].chksum, f"{l4.__name__} checksum"


def dst_of(frame: bytes) -> tuple[str, int]:
    pkt = Ether(frame)
    l4 = pkt[TCPSeg] if TCPSeg in pkt else pkt[UDPDgram]
    return pkt[IP].dst, l4.dport


def src_of(frame: bytes) -> tuple[str, int]:
    pkt = Ether(frame)
    l4 = pkt[TCPSeg] if TCPSeg in pkt else pkt[UDPDgram]
    return pkt[IP].src, l4.sport


def backend_of(frame: bytes) -> int:
    addr = dst_of(frame)
    found = [bid for bid, be in BACKENDS.items() if be == addr]
    assert found, f"{addr} is no backend"
    return found[0]


def to_vip(sport=40000, flags="S", payload=b"", proto=TCP, vip=VIP, port=VPORT, src=POD_IP):
    if proto == TCP:
        return pk.tcp(src, vip, sport, port, flags, payload)
    return pk.udp(src, vip, sport, port, payload)


def send(harness, frame):
    out = harness.run(FROM, frame)
    assert out.retval == TC_ACT_OK, out.events
    assert out.of_type("drop") == []
    return out


def service_entries(maps):
    return [c for c in maps.ct.connections() if c.service]


def ordinary_entries(maps):
    return [c for c in maps.ct.connections() if not c.service]


# Python twin of lb4_hash() in bpf/lib/lb.h: the __be32/__be16 values as a little-endian
# machine holds them.
def lb4_hash(saddr: str, sport: int, dport: int, proto: int) -> int:
    m = 0xFFFFFFFF
    s = int.from_bytes(ipaddress.IPv4Address(saddr).packed, "little")
    sp = int.from_bytes(sport.to_bytes(2, "big"), "little")
    dp = int.from_bytes(dport.to_bytes(2, "big"), "little")
    h = (s * 0x9E3779B1) & m
    h ^= (((dp << 16) | sp) * 0x85EBCA77) & m
    h ^= (proto * 0xC2B2AE3D) & m
    h ^= h >> 16
    h = (h * 0x7FEB352D) & m
    h ^= h >> 15
    return h


# -- translation and checksums --------------------------------------------------------

def test_tcp_to_frontend_is_translated_with_valid_checksums(harness, maps, lb):
    lb.service([1])
    frame = to_vip(payload=b"hello")
    out = send(harness, frame)
    assert dst_of(out.data) == BACKENDS[1]
    assert src_of(out.data) == (POD_IP, 40000)
    assert_checksums(out.data)
    assert Ether(out.data)[TCPSeg].payload.load == b"hello"
    # Policy and the trace saw the backend, not the frontend.
    trace = out.trace
    assert (trace.ct_state, trace.dst_identity) == ("new", BACKEND_IDENTITY)
    assert trace.packet.dst_ip == BACKENDS[1][0]

    (svc,) = service_entries(maps)
    assert (str(svc.daddr), svc.dport, svc.backend_id, svc.rev_nat_index) == (VIP, VPORT, 1, SERVICE_ID)
    (conn,) = ordinary_entries(maps)
    assert (conn.direction, str(conn.daddr), conn.dport, conn.rev_nat_index) == (
        "OUT", BACKENDS[1][0], 8080, SERVICE_ID)
    assert conn.src_identity == POD_IDENTITY


@pytest.mark.parametrize("with_checksum", [True, False], ids=["checksum", "no-checksum"])
def test_udp_to_frontend_is_translated(harness, maps, lb, with_checksum):
    lb.service([2], proto=UDP, port=53)
    frame = bytearray(to_vip(sport=5353, proto=UDP, port=53, payload=b"query"))
    if not with_checksum:
        frame[pk.ETH_HLEN + 20 + 6: pk.ETH_HLEN + 20 + 8] = b"\0\0"
    out = send(harness, bytes(frame))
    assert dst_of(out.data) == BACKENDS[2]
    assert_checksums(out.data)
    assert (Ether(out.data)[UDPDgram].chksum == 0) == (not with_checksum)
    (conn,) = ordinary_entries(maps)
    assert (conn.protocol, str(conn.daddr), conn.rev_nat_index) == (UDP, BACKENDS[2][0], SERVICE_ID)


def test_traffic_to_no_frontend_is_untouched(harness, maps, lb):
    lb.service([1])
    for frame in (pk.tcp(POD_IP, PEER_IP, 40000, 80),        # a pod, not a service
                  to_vip(port=81),                           # the VIP, another port
                  to_vip(proto=UDP),                         # the VIP, another protocol
                  pk.icmp(POD_IP, VIP)):                     # ICMP has no frontends
        out = send(harness, frame)
        assert out.data[: len(frame)] == frame
    assert service_entries(maps) == []
    assert all(c.rev_nat_index == 0 for c in maps.ct.connections())


def test_reply_is_reverse_translated_with_valid_checksums(harness, maps, lb):
    lb.service([3])
    send(harness, to_vip(flags="S"))
    be_ip, be_port = BACKENDS[3]
    reply = pk.tcp(be_ip, POD_IP, be_port, 40000, "SA", payload=b"welcome")
    out = harness.run(TO, reply)
    assert out.retval == TC_ACT_OK
    assert src_of(out.data) == (VIP, VPORT)
    assert dst_of(out.data) == (POD_IP, 40000)
    assert_checksums(out.data)
    assert out.trace.ct_state == "reply"
    assert out.trace.src_identity == BACKEND_IDENTITY
    # The client's next segment finds its connection and goes to the same backend.
    out = send(harness, to_vip(flags="A"))
    assert dst_of(out.data) == BACKENDS[3]
    assert out.trace.ct_state == "established"


def test_udp_reply_is_reverse_translated(harness, maps, lb):
    lb.service([1], proto=UDP, port=53)
    send(harness, to_vip(sport=5353, proto=UDP, port=53, payload=b"q"))
    out = harness.run(TO, pk.udp(BACKENDS[1][0], POD_IP, 8080, 5353, b"answer"))
    assert out.retval == TC_ACT_OK
    assert src_of(out.data) == (VIP, 53)
    assert_checksums(out.data)


def icmp_error_about(quoted: bytes, src: str, dst: str) -> bytes:
    """ICMP port unreachable from `src` to `dst` quoting the whole IP packet `quoted`."""
    return bytes(Ether(src=pk.PEER_MAC, dst=pk.POD_MAC) / IP(src=src, dst=dst) /
                 ICMP(type=3, code=3) / Raw(quoted))


def assert_icmp_checksums(frame: bytes):
    """Outer IPv4, ICMP, and the quoted IPv4 header and UDP datagram all check out."""
    pkt = Ether(frame)
    rebuilt = pkt.copy()
    del rebuilt[IP].chksum
    del rebuilt[ICMP].chksum
    rebuilt = Ether(bytes(rebuilt))
    assert (pkt[IP].chksum, pkt[ICMP].chksum) == (rebuilt[IP].chksum, rebuilt[ICMP].chksum)
    inner = IP(bytes(pkt[ICMP].payload))
    again = inner.copy()
    del again.chksum
    del again[UDPDgram].chksum
    again = IP(bytes(again))
    assert (inner.chksum, inner[UDPDgram].chksum) == (again.chksum, again[UDPDgram].chksum)
    return inner


@pytest.mark.parametrize("from_backend", [True, False], ids=["backend-sent", "router-sent"])
def test_icmp_error_about_a_translated_flow_quotes_the_frontend(harness, maps, lb, from_backend):
    """The client's socket is connected to the frontend: an error quoting the backend would
    match nothing. It must quote the frontend (and come from it, when the backend sent it)."""
    lb.service([1], proto=UDP, port=53)
    send(harness, to_vip(sport=5353, proto=UDP, port=53, payload=b"query"))
    be_ip, be_port = BACKENDS[1]
    as_received = bytes(IP(src=POD_IP, dst=be_ip, ttl=63) / UDPDgram(sport=5353, dport=be_port) /
                        Raw(b"query"))
    sender = be_ip if from_backend else "10.244.9.1"
    out = harness.run(TO, icmp_error_about(as_received, sender, POD_IP))
    assert out.retval == TC_ACT_OK
    assert out.trace.ct_state == "related"
    pkt = Ether(out.data)
    assert pkt[IP].src == (VIP if from_backend else sender)
    inner = assert_icmp_checksums(out.data)
    assert (inner.src, inner.dst, inner[UDPDgram].sport, inner[UDPDgram].dport) == (
        POD_IP, VIP, 5353, 53)
    assert inner[UDPDgram].payload.load == b"query"


def test_traffic_from_a_backend_not_translated_is_left_alone(harness, maps, lb):
    """A pod talking to a backend directly (as after socket-LB translation) is ordinary
    traffic: no service entry, no rev-NAT index, replies unchanged."""
    lb.service([1])
    direct = pk.tcp(POD_IP, BACKENDS[1][0], 40000, 8080)
    assert send(harness, direct).data[: len(direct)] == direct
    reply = pk.tcp(BACKENDS[1][0], POD_IP, 8080, 40000, "SA")
    out = harness.run(TO, reply)
    assert out.retval == TC_ACT_OK and out.data[: len(reply)] == reply
    assert service_entries(maps) == []


def test_egress_policy_applies_to_the_backend(harness, maps, lb):
    lb.service([1])
    PolicyWriter(maps.policy, maps.endpoints).apply(
        POD_IP, POD_ID, [PolicyRule(BACKEND_IDENTITY, EGRESS, TCP, 8080, cookie=0xB1)],
        enforce_ingress=False, enforce_egress=True)
    out = send(harness, to_vip())
    v = out.verdict
    assert (v.verdict, v.src_identity, v.policy_port, v.rule_cookie) == (0, BACKEND_IDENTITY, 8080, 0xB1)
    # A rule for the frontend's port does not admit the backend's.
    PolicyWriter(maps.policy, maps.endpoints).apply(
        POD_IP, POD_ID, [PolicyRule(0, EGRESS, TCP, VPORT)], enforce_ingress=False,
        enforce_egress=True)
    denied = harness.run(FROM, to_vip(sport=40001))
    assert denied.drop.drop_reason == reasons.POLICY_DENIED


# -- backend selection ------------------------------------------------------------------

def test_random_selection_spreads_and_sticks_per_connection(harness, maps, lb):
    lb.service([1, 2, 3], algorithm=ALGORITHM_RANDOM)
    chosen = {}
    for sport in range(41000, 41060):
        chosen[sport] = backend_of(send(harness, to_vip(sport=sport)).data)
    # 60 draws from 3: a backend never drawn has probability 3 * (2/3)^60 ~ 1e-10.
    assert set(chosen.values()) == {1, 2, 3}
    for sport in (41000, 41017, 41059):
        for _ in range(5):
            assert backend_of(send(harness, to_vip(sport=sport, flags="A")).data) == chosen[sport]


def test_maglev_uses_the_services_table(harness, maps, lb, datapath):
    size = datapath.config.maglev_table_size
    lb.service([1, 2, 3], algorithm=ALGORITHM_MAGLEV)
    table = np.array([(i % 3) + 1 for i in range(size)], dtype=np.uint32)
    lb.maglev.set_table(SERVICE_ID, table)
    for sport in range(42000, 42030):
        expected = int(table[lb4_hash(POD_IP, sport, VPORT, TCP) % size])
        assert backend_of(send(harness, to_vip(sport=sport)).data) == expected, sport
    # A new table moves new connections only.
    lb.maglev.set_table(SERVICE_ID, np.full(size, 2, dtype=np.uint32))
    assert backend_of(send(harness, to_vip(sport=42100)).data) == 2
    old = int(table[lb4_hash(POD_IP, 42000, VPORT, TCP) % size])
    assert backend_of(send(harness, to_vip(sport=42000, flags="A")).data) == old


def test_maglev_without_a_table_falls_back_to_random(harness, maps, lb):
    lb.service([3], algorithm=ALGORITHM_MAGLEV)
    assert backend_of(send(harness, to_vip()).data) == 3


def test_session_affinity_keeps_a_client_on_one_backend(harness, maps, lb):
    lb.service([1, 2, 3], flags=SVC_F_AFFINITY, affinity_timeout=100)
    first = backend_of(send(harness, to_vip(sport=43000)).data)
    for sport in range(43001, 43025):
        assert backend_of(send(harness, to_vip(sport=sport)).data) == first
    (entry,) = lb.affinity.list()
    assert (entry["client"], entry["service_id"], entry["backend_id"]) == (POD_IP, SERVICE_ID, first)
    # Another client is free to land elsewhere, with its own entry.
    other = "10.244.1.11"
    maps.endpoints.upsert(other, endpoint_id=POD_ID + 1, ifindex=TEST_RUN_IFINDEX, identity=POD_IDENTITY)
    send(harness, to_vip(src=other))
    assert {e["client"] for e in lb.affinity.list()} == {POD_IP, other}


def test_expired_affinity_is_picked_again(harness, maps, lb):
    # The client was on backend 1 (still active, e.g. serving another service), but the
    # service's only slot is now backend 2.
    lb.backend(1)
    lb.service([2], flags=SVC_F_AFFINITY, affinity_timeout=100)
    key = LbAffinityKey(client_id=affinity_client_id(POD_IP), rev_nat_id=SERVICE_ID, netns_cookie=0)
    val = lb.affinity.VALUE(last_used=monotonic_seconds() - 50, backend_id=1)
    lb.affinity.update(key, val)
    # Within the timeout the client keeps backend 1.
    assert backend_of(send(harness, to_vip(sport=44000)).data) == 1
    # Past it, the entry is dropped and the client picked again.
    val.last_used = monotonic_seconds() - 101
    lb.affinity.update(key, val)
    assert backend_of(send(harness, to_vip(sport=44001)).data) == 2
    entry = lb.affinity.lookup(key)
    assert entry.backend_id == 2
    assert monotonic_seconds() - entry.last_used <= 2


def test_affinity_to_a_terminating_backend_is_picked_again(harness, maps, lb):
    lb.service([1], flags=SVC_F_AFFINITY, affinity_timeout=100)
    assert backend_of(send(harness, to_vip(sport=44100)).data) == 1
    lb.backend(1, state=BE_STATE_TERMINATING)
    lb.service([2], flags=SVC_F_AFFINITY, affinity_timeout=100)
    assert backend_of(send(harness, to_vip(sport=44101)).data) == 2


# -- no backend, terminating backends ------------------------------------------------------

@pytest.mark.parametrize("proto", [TCP, UDP])
def test_frontend_without_backends_is_refused_with_icmp_port_unreachable(harness, maps, lb, proto):
    """The packet is dropped (SERVICE_BACKEND_NOT_FOUND in the event and the metrics) and
    the pod is answered as by a host with no listener: ICMP port unreachable from the
    frontend, sent back to the pod through its device's peer."""
    lb.service([], proto=proto)
    frame = to_vip(proto=proto, payload=b"data" * 10)
    out = harness.run(FROM, frame)
    assert out.retval == TC_ACT_REDIRECT
    drop = out.drop
    assert (drop.drop_reason, drop.direction) == (DROP_NO_SERVICE, "EGRESS")
    assert reasons.drop_reason_name(drop.drop_reason) == "SERVICE_BACKEND_NOT_FOUND"
    assert (drop.source, drop.src_identity) == (POD_ID, POD_IDENTITY)
    assert drop.packet.dst_ip == VIP  # reported as the client sent it
    assert drop.length == len(frame)
    metric = maps.metrics.get(DROP_NO_SERVICE, reasons.DIR_EGRESS)
    assert (metric.packets, metric.bytes) == (1, len(frame))
    assert maps.metrics.get(0, reasons.DIR_EGRESS).packets == 0
    assert maps.ct.connections() == []

    reply = Ether(out.data)
    sent = Ether(frame)
    assert (reply.src, reply.dst) == (sent.dst, sent.src)
    assert (reply[IP].src, reply[IP].dst, reply[IP].proto) == (VIP, POD_IP, 1)
    icmp = reply[ICMP]
    assert (icmp.type, icmp.code) == (3, 3)
    assert bytes(icmp.payload)[:28] == bytes(sent[IP])[:28]  # the header and 8 bytes quoted
    assert len(out.data) == pk.ETH_HLEN + 20 + 8 + 28
    rebuilt = reply.copy()
    del rebuilt[IP].chksum
    del rebuilt[ICMP].chksum
    rebuilt = Ether(bytes(rebuilt))
    assert (reply[IP].chksum, icmp.chksum) == (rebuilt[IP].chksum, rebuilt[ICMP].chksum)


def test_frontend_without_backends_and_ip_options_is_dropped(harness, maps, lb):
    """A packet with IP options is not answered (the reply quotes a plain header): dropped."""
    lb.service([])
    frame = bytes(Ether(src=pk.POD_MAC, dst=pk.PEER_MAC) /
                  IP(src=POD_IP, dst=VIP, options=[IPOption(b"\x01\x01\x01\x00")]) /
                  TCPSeg(sport=40000, dport=VPORT, flags="S"))
    out = harness.run(FROM, frame)
    assert out.retval == TC_ACT_SHOT
    assert out.drop.drop_reason == DROP_NO_SERVICE


def test_terminating_backend_keeps_existing_connections_only(harness, maps, lb):
    lb.service([1])
    assert backend_of(send(harness, to_vip(sport=45000)).data) == 1
    assert backend_of(send(harness, to_vip(sport=45000, flags="A")).data) == 1
    # Backend 1 starts terminating: it loses its slot, backend 2 takes over.
    lb.backend(1, state=BE_STATE_TERMINATING)
    lb.service([2])
    for _ in range(3):
        assert backend_of(send(harness, to_vip(sport=45000, flags="A")).data) == 1
    for sport in range(45001, 45011):
        assert backend_of(send(harness, to_vip(sport=sport)).data) == 2
    # Once backend 1 is gone, its connection's next packet is given an active backend.
    lb.backends.remove(1)
    assert backend_of(send(harness, to_vip(sport=45000, flags="A")).data) == 2
    svc = [c for c in service_entries(maps) if c.sport == 45000]
    assert [c.backend_id for c in svc] == [2]


def test_terminating_backend_kept_for_udp_flow(harness, maps, lb):
    lb.service([1], proto=UDP)
    assert backend_of(send(harness, to_vip(sport=5000, proto=UDP)).data) == 1
    lb.backend(1, state=BE_STATE_TERMINATING, proto=UDP)
    lb.service([], proto=UDP)
    # No active backend at all: new flows are refused, the existing one keeps going.
    assert backend_of(send(harness, to_vip(sport=5000, proto=UDP)).data) == 1
    assert harness.run(FROM, to_vip(sport=5001, proto=UDP)).drop.drop_reason == DROP_NO_SERVICE


def test_new_syn_on_a_closed_connection_picks_again(harness, maps, lb):
    lb.service([1])
    assert backend_of(send(harness, to_vip(sport=46000)).data) == 1
    send(harness, to_vip(sport=46000, flags="FA"))
    (svc,) = service_entries(maps)
    assert 8 <= svc.expires_in <= 10  # closed: the short lifetime
    lb.backend(1, state=BE_STATE_TERMINATING)
    lb.service([2])
    # The same tuple, a new connection: it must not reuse the terminating backend.
    assert backend_of(send(harness, to_vip(sport=46000, flags="S")).data) == 2


# -- which frontends a pod reaches -----------------------------------------------------------

def test_external_ip_is_translated_only_at_a_node_address(harness, maps, lb):
    outside, node_ip = "10.250.7.7", "10.244.1.1"
    lb.service([1], vip=outside, flags=SVC_F_EXTERNAL_IPS, service_id=8)
    frame = to_vip(vip=outside)
    assert send(harness, frame).data[: len(frame)] == frame  # CVE-2020-8554 mitigation
    lb.service([1], vip=node_ip, flags=SVC_F_EXTERNAL_IPS, service_id=9)
    maps.endpoints.upsert(node_ip, endpoint_id=0, ifindex=0, identity=1, flags=ENDPOINT_F_HOST)
    assert dst_of(send(harness, to_vip(vip=node_ip, sport=47000)).data) == BACKENDS[1]


def test_two_scopes_use_the_internal_backends(harness, maps, lb):
    lb.backend(1)
    lb.backend(2)
    lb.services.upsert(ServiceEntry(frontend(VIP, VPORT, TCP), SERVICE_ID, [1],
                                    flags=SVC_F_TWO_SCOPES))
    lb.services.upsert(ServiceEntry(frontend(VIP, VPORT, TCP, SCOPE_INTERNAL), SERVICE_ID, [2],
                                    flags=SVC_F_TWO_SCOPES))
    lb.revnat.upsert(SERVICE_ID, VIP, VPORT)
    for sport in range(48000, 48010):
        assert backend_of(send(harness, to_vip(sport=sport)).data) == 2


def test_service_entries_are_collected_like_connections(harness, maps, lb):
    lb.service([1], proto=UDP)
    send(harness, to_vip(proto=UDP))
    (svc,) = service_entries(maps)
    assert 58 <= svc.expires_in <= 60
    assert maps.ct.gc() == 0
    for key, value in maps.ct.any.items():
        value.lifetime = monotonic_seconds() - 1
        maps.ct.any.update(key, value)
    assert maps.ct.gc() == 2  # the service entry and the connection to the backend
    send(harness, to_vip(proto=UDP))
    assert len(service_entries(maps)) == 1
