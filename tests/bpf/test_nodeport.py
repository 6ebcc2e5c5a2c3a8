"""North-south load balancing on the node's devices (bpf_host.c, the NodePort path of
bpf_xdp.c), run with BPF_PROG_TEST_RUN on crafted frames.

The programs look routes and neighbours up in the FIB, so every run happens inside a
namespace of this module's own (`fib`), on its devices: np0 (the node's 10.245.200.1/24,
where the client 10.245.200.2 and a hairpin backend 10.245.200.3 are neighbours) and np1
(10.246.200.1/24, with the remote backend 10.246.200.2 as a neighbour and 10.246.200.3 left
unresolved). A run is given the device it happens on (`__sk_buff.ifindex`,
`xdp_md.ingress_ifindex`). Test runs never transmit: a redirect is only a return value.

Three datapaths: the session's (tc NodePort, XDP acceleration off, reject), and two of this
module with --bpf-lb-acceleration native, one replying to frontends without backends
(reject) and one dropping (drop). Checksums of every rewritten packet are checked against
scapy's recomputation.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import struct
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from pyroute2 import IPRoute
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from cilium_py.datapath import libbpf, loader, netns
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.endpoints import ENDPOINT_F_HOST, EndpointMap
from cilium_py.datapath.maps.lb import (
    BE_STATE_TERMINATING,
    SVC_F_AFFINITY,
    SVC_F_EXT_LOCAL,
    SVC_F_EXTERNAL_IPS,
    SVC_F_HOSTPORT,
    SVC_F_LOADBALANCER,
    SVC_F_NODEPORT,
    AffinityMap,
    Backend,
    BackendsMap,
    MaglevMap,
    RevNatMap,
    ServiceEntry,
    ServicesMap,
    frontend,
)
from cilium_py.datapath.maps.metrics import MetricsMap
from cilium_py.datapath.maps.nat import NAT_F_SERVICE, NAT_F_SNAT, NatEntry4, NatMap
from cilium_py.datapath.maps.conntrack import TUPLE_F_IN, CtTuple4
from cilium_py.datapath.reasons import DIR_EGRESS, DIR_INGRESS

from .conftest import EventCollector

pytestmark = [pytest.mark.bpf]

FROM_NETDEV, TO_NETDEV, XDP = "cil_from_netdev", "cil_to_netdev", "cil_xdp_entry"

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
TCP_P, UDP_P = 6, 17

DROP_NO_SERVICE = 158
DROP_NAT_NO_MAPPING = 167
SNAT_PORT_MIN, SNAT_PORT_MAX = 61000, 65535
NODEPORT_XDP_MARK = 0x4E505844

NODE_IP, CLIENT_IP, HAIRPIN_IP = "10.245.200.1", "10.245.200.2", "10.245.200.3"
NODE_IP2, REMOTE_IP, UNRESOLVED_IP = "10.246.200.1", "10.246.200.2", "10.246.200.3"
POD_IP, POD2_IP = "10.244.200.10", "10.244.200.11"
LB_IP, EXT_IP, CLUSTER_IP = "10.245.250.10", "10.245.250.11", "10.96.0.10"
CLIENT_MAC, HAIRPIN_MAC, REMOTE_MAC = "02:00:0a:f5:c8:02", "02:00:0a:f5:c8:03", "02:00:0a:f6:c8:02"

NODE_PORT = 30080


# -- the namespace the runs happen in ----------------------------------------------------

@dataclass
class FibNamespace:
    name: str
    np0: int
    np1: int
    np0_mac: str
    np1_mac: str


NUD_PERMANENT = 0x80


@pytest.fixture(scope="module")
def fib(privileged, unique):
    name = f"cpy-npt-{unique}"
    netns.create(name)
    try:
        with netns.entered(name), IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for dev, addr in (("np0", NODE_IP), ("np1", NODE_IP2)):
                ipr.link("add", ifname=dev, kind="veth", peer={"ifname": dev + "p"})
                for ifname in (dev, dev + "p"):
                    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
                ipr.addr("add", index=ipr.link_lookup(ifname=dev)[0], address=addr, prefixlen=24)
            np0, np1 = ipr.link_lookup(ifname="np0")[0], ipr.link_lookup(ifname="np1")[0]
            for ifindex, ip, mac in ((np0, CLIENT_IP, CLIENT_MAC), (np0, HAIRPIN_IP, HAIRPIN_MAC),
                                     (np1, REMOTE_IP, REMOTE_MAC)):
                ipr.neigh("add", dst=ip, lladdr=mac, ifindex=ifindex, state=NUD_PERMANENT)
            macs = [ipr.get_links(i)[0].get_attr("IFLA_ADDRESS") for i in (np0, np1)]
        netns.write_sysctls(name, {"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.forwarding": 1,
                                   "net.ipv4.conf.np0.forwarding": 1,
                                   "net.ipv4.conf.np1.forwarding": 1})
        yield FibNamespace(name, np0, np1, *macs)
    finally:
        netns.remove(name)


# -- datapaths -----------------------------------------------------------------------------

@dataclass
class DP:
    """One loaded datapath with the maps these tests write and read."""

    loaded: object
    collector: EventCollector
    services: ServicesMap
    backends: BackendsMap
    revnat: RevNatMap
    affinity: AffinityMap
    maglev: MaglevMap
    nat: NatMap
    endpoints: EndpointMap
    metrics: MetricsMap

    @classmethod
    def open(cls, loaded, collector):
        pin = loaded.config.pin_dir
        return cls(loaded, collector, ServicesMap(pin), BackendsMap(pin), RevNatMap(pin),
                   AffinityMap(pin), MaglevMap(pin, loaded.config.maglev_table_size), NatMap(pin),
                   EndpointMap(pin), MetricsMap(pin))

    def maps(self):
        return (self.services, self.backends, self.revnat, self.affinity, self.maglev, self.nat,
                self.endpoints, self.metrics)

    def clear(self):
        for m in self.maps():
            m.clear()
        self.collector.drain()
        self.collector.take_records()

    def close(self):
        for m in self.maps():
            m.close()


def _load(bpf_root, node, **options):
    # Small conftrack tables: the NAT table is sized after them.
    config = DatapathConfig(node=node, bpf_root=bpf_root, ct_global_tcp_max=65536,
                            ct_global_any_max=32768, **options)
    return loader.load(config)


@pytest.fixture(scope="module")
def accel_datapaths(bpf_root):
    loaded = {"reject": _load(bpf_root, "bpftest-npx", lb_acceleration="native"),
              "drop": _load(bpf_root, "bpftest-npxd", lb_acceleration="native",
                            service_no_backend_response="drop")}
    dps = {k: DP.open(v, EventCollector(v)) for k, v in loaded.items()}
    yield dps
    for dp in dps.values():
        dp.close()
    for v in loaded.values():
        v.close()


@pytest.fixture(scope="module")
def session_dp(datapath, event_collector):
    dp = DP.open(datapath, event_collector)
    yield dp
    dp.close()


@pytest.fixture(autouse=True)
def clean(session_dp, accel_datapaths):
    for dp in (session_dp, *accel_datapaths.values()):
        dp.clear()
    yield


@pytest.fixture
def dp(session_dp):
    """The session's datapath: tc NodePort, XDP acceleration disabled, reject."""
    return session_dp


@pytest.fixture
def xdp_dp(accel_datapaths):
    return accel_datapaths["reject"]


@pytest.fixture
def drop_dp(accel_datapaths):
    return accel_datapaths["drop"]


# -- running programs ----------------------------------------------------------------------

@dataclass
class Run:
    retval: int
    data: bytes
    events: list
    meta: bytes = b""

    @property
    def pkt(self) -> Ether:
        return Ether(self.data)

    def drops(self):
        return [e for e in self.events if e.type == "drop"]


def run(dp: DP, fib: FibNamespace, program: str, frame: bytes, ifindex: int | None = None) -> Run:
    """One test run on `ifindex` (np0 by default) of the fib namespace."""
    ifindex = fib.np0 if ifindex is None else ifindex
    if program == XDP:
        # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        ctx = struct.pack("=6I", 0, len(frame), 0, ifindex, 0, 0)
    else:
        # struct __sk_buff up to ifindex (offset 40); everything the kernel does not take is 0
        ctx = bytearray(44)
        struct.pack_into("=I", ctx, 40, ifindex)
        ctx = bytes(ctx)
    before = dp.collector.reader.decode_errors
    with netns.entered(fib.name):
        retval, _, data = libbpf.prog_test_run(dp.loaded.fd(program), frame, ctx=ctx)
    events = dp.collector.drain()
    assert dp.collector.reader.decode_errors == before
    meta = b""
    if program == XDP and retval == XDP_PASS and len(data) == len(frame) + 4:
        meta, data = data[:4], data[4:]  # XDP test runs return the metadata in front
    return Run(retval, data, events, meta)


def tcp(src, dst, sport, dport, flags="S", payload=b"", src_mac=CLIENT_MAC, dst_mac=None) -> bytes:
    return bytes(Ether(src=src_mac, dst=dst_mac or "02:00:00:00:00:01") / IP(src=src, dst=dst) /
                 TCP(sport=sport, dport=dport, flags=flags, seq=1000) / Raw(payload or b"x" * 16))


def udp(src, dst, sport, dport, payload=b"hello", zero_csum=False) -> bytes:
    frame = Ether(src=CLIENT_MAC, dst="02:00:00:00:00:01") / IP(src=src, dst=dst) / \
        UDP(sport=sport, dport=dport) / Raw(payload)
    if zero_csum:
        frame[UDP].chksum = 0
    return bytes(frame)


def assert_checksums(frame: bytes) -> None:
    """The IPv4 and L4 checksums are what scapy computes from scratch."""
    pkt = Ether(frame)
    redo = pkt.copy()
    del redo[IP].chksum
    l4 = redo[IP].payload
    if not (isinstance(l4, UDP) and pkt[UDP].chksum == 0):
        del l4.chksum
    again = Ether(bytes(redo))
    assert pkt[IP].chksum == again[IP].chksum, "IPv4 header checksum"
    assert pkt[IP].payload.chksum == again[IP].payload.chksum, f"{type(l4).__name__} checksum"


def tuple_of(pkt: Ether):
    l4 = pkt[IP].payload
    return (pkt[IP].src, l4.sport, pkt[IP].dst, l4.dport)


# -- programming services --------------------------------------------------------------------

def add_service(dp: DP, address, port, backends, *, service_id=1, proto=TCP_P, flags=SVC_F_NODEPORT,
                affinity_timeout=0):
    """`backends`: (id, ip, port, local) or (id, ip, port, local, state); terminating ones get
    no slot."""
    active = []
    for b in backends:
        bid, ip, bport, local, *state = b
        st = state[0] if state else 0
        dp.backends.upsert(Backend(bid, ipaddress.IPv4Address(ip), bport, proto, state=st, local=local))
        if st == 0:
            active.append(bid)
    dp.services.upsert(ServiceEntry(frontend(address, port, proto), service_id, active, flags=flags,
                                    affinity_timeout=affinity_timeout))
    dp.revnat.upsert(service_id, address, port)


def nat_entries(dp: DP):
    return dp.nat.mappings()


# == local backend: DNAT only ================================================================

def test_nodeport_to_local_backend_is_dnat_with_checksums(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True)])
    out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    assert out.retval == TC_ACT_OK  # the stack delivers it to the pod
    assert tuple_of(out.pkt) == (CLIENT_IP, 40000, POD_IP, 8080)  # the pod sees the client
    assert_checksums(out.data)
    assert out.pkt[Raw].load == b"x" * 16

    (fwd,), (rev,) = ([m for m in nat_entries(dp) if m.direction == d] for d in ("OUT", "IN"))
    assert (str(fwd.saddr), fwd.sport, str(fwd.daddr), fwd.dport) == (CLIENT_IP, 40000, NODE_IP, NODE_PORT)
    assert (str(fwd.to_daddr), fwd.to_dport, fwd.backend_id, fwd.service_id) == (POD_IP, 8080, 1, 1)
    assert fwd.flags == NAT_F_SERVICE and not fwd.snat
    assert (str(rev.saddr), rev.sport, str(rev.daddr), rev.dport) == (POD_IP, 8080, CLIENT_IP, 40000)
    assert dp.metrics.get(0, DIR_INGRESS).packets == 1

    # The pod's reply leaves through the device: the client sees the frontend answer.
    reply = run(dp, fib, TO_NETDEV, tcp(POD_IP, CLIENT_IP, 8080, 40000, "SA"))
    assert reply.retval == TC_ACT_OK
    assert tuple_of(reply.pkt) == (NODE_IP, NODE_PORT, CLIENT_IP, 40000)
    assert_checksums(reply.data)
    assert dp.metrics.get(0, DIR_EGRESS).packets == 1


def test_established_connection_keeps_its_backend(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True), (2, POD2_IP, 8080, True)])
    first = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT)).pkt[IP].dst
    for _ in range(10):
        out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT, "A"))
        assert out.pkt[IP].dst == first
    assert len(nat_entries(dp)) == 2


@pytest.mark.parametrize("zero_csum", [False, True], ids=["csum", "no-csum"])
def test_udp_nodeport_local(dp, fib, zero_csum):
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD_IP, 53, True)], proto=UDP_P)
    out = run(dp, fib, FROM_NETDEV, udp(CLIENT_IP, NODE_IP, 5353, NODE_PORT, zero_csum=zero_csum))
    assert out.retval == TC_ACT_OK
    assert tuple_of(out.pkt) == (CLIENT_IP, 5353, POD_IP, 53)
    assert_checksums(out.data)
    assert (out.pkt[UDP].chksum == 0) == zero_csum  # "no checksum" stays so
    reply = run(dp, fib, TO_NETDEV, udp(POD_IP, CLIENT_IP, 53, 5353, zero_csum=zero_csum))
    assert tuple_of(reply.pkt) == (NODE_IP, NODE_PORT, CLIENT_IP, 5353)
    assert_checksums(reply.data)


@pytest.mark.parametrize("flags,address", [(SVC_F_LOADBALANCER, LB_IP), (SVC_F_EXTERNAL_IPS, EXT_IP),
                                           (SVC_F_HOSTPORT, NODE_IP)],
                         ids=["LoadBalancer", "externalIP", "hostPort"])
def test_other_north_south_frontends(dp, fib, flags, address):
    add_service(dp, address, 8081, [(1, POD_IP, 8080, True)], flags=flags)
    out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, address, 40000, 8081))
    assert out.retval == TC_ACT_OK
    assert tuple_of(out.pkt) == (CLIENT_IP, 40000, POD_IP, 8080)
    reply = run(dp, fib, TO_NETDEV, tcp(POD_IP, CLIENT_IP, 8080, 40000, "SA"))
    assert tuple_of(reply.pkt) == (address, 8081, CLIENT_IP, 40000)


def test_clusterip_is_not_served_from_outside(dp, fib):
    add_service(dp, CLUSTER_IP, 80, [(1, POD_IP, 8080, True)], flags=0)
    frame = tcp(CLIENT_IP, CLUSTER_IP, 40000, 80)
    out = run(dp, fib, FROM_NETDEV, frame)
    assert (out.retval, out.data, out.events) == (TC_ACT_OK, frame, [])
    assert nat_entries(dp) == []


def test_wildcard_nodeport_frontend_serves_node_addresses_only(dp, fib):
    add_service(dp, "0.0.0.0", NODE_PORT, [(1, POD_IP, 8080, True)])
    dp.endpoints.upsert(NODE_IP, endpoint_id=0, ifindex=0, identity=1, flags=ENDPOINT_F_HOST)
    out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    assert tuple_of(out.pkt) == (CLIENT_IP, 40000, POD_IP, 8080)
    reply = run(dp, fib, TO_NETDEV, tcp(POD_IP, CLIENT_IP, 8080, 40000, "SA"))
    assert tuple_of(reply.pkt) == (NODE_IP, NODE_PORT, CLIENT_IP, 40000)  # the address used
    other = tcp(CLIENT_IP, LB_IP, 40001, NODE_PORT)  # not an address of the node
    assert run(dp, fib, FROM_NETDEV, other).data == other


def test_traffic_that_is_not_a_service_passes_untouched(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True)])
    frames = [tcp(CLIENT_IP, NODE_IP, 40000, 22), udp(CLIENT_IP, NODE_IP, 5000, 53),
              bytes(Ether() / IP(src=CLIENT_IP, dst=NODE_IP) / ICMP()),
              bytes(Ether(type=0x86DD) / Raw(b"\x60" + b"\0" * 60))]
    for program in (FROM_NETDEV, TO_NETDEV):
        for frame in frames:
            out = run(dp, fib, program, frame)
            assert (out.retval, out.data, out.events) == (TC_ACT_OK, frame, [])
    assert nat_entries(dp) == []
    assert dp.metrics.list() == []


# == remote backend: DNAT + SNAT ==============================================================

def test_remote_backend_is_snated_and_sent_out_by_the_fib(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, REMOTE_IP, 9090, False)])
    out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    assert out.retval == TC_ACT_REDIRECT
    saddr, sport, daddr, dport = tuple_of(out.pkt)
    # The source is the node's address toward the backend (np1), not the frontend's.
    assert (saddr, daddr, dport) == (NODE_IP2, REMOTE_IP, 9090)
    assert SNAT_PORT_MIN <= sport <= SNAT_PORT_MAX
    assert (out.pkt.dst, out.pkt.src) == (REMOTE_MAC, fib.np1_mac)
    assert_checksums(out.data)

    (fwd,), (rev,) = ([m for m in nat_entries(dp) if m.direction == d] for d in ("OUT", "IN"))
    assert fwd.flags == NAT_F_SERVICE | NAT_F_SNAT
    assert (str(fwd.to_saddr), fwd.to_sport, str(fwd.to_daddr), fwd.to_dport) == (NODE_IP2, sport, REMOTE_IP, 9090)
    assert (str(rev.saddr), rev.sport, str(rev.daddr), rev.dport) == (REMOTE_IP, 9090, NODE_IP2, sport)

    # Later packets of the connection keep the port.
    again = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT, "A"))
    assert tuple_of(again.pkt) == (NODE_IP2, sport, REMOTE_IP, 9090)

    # The reply arrives on np1 and leaves toward the client as the frontend's.
    reply = run(dp, fib, FROM_NETDEV, tcp(REMOTE_IP, NODE_IP2, 9090, sport, "SA", src_mac=REMOTE_MAC),
                ifindex=fib.np1)
    assert reply.retval == TC_ACT_REDIRECT
    assert tuple_of(reply.pkt) == (NODE_IP, NODE_PORT, CLIENT_IP, 40000)
    assert (reply.pkt.dst, reply.pkt.src) == (CLIENT_MAC, fib.np0_mac)
    assert_checksums(reply.data)
    assert reply.pkt[Raw].load == b"x" * 16


def test_udp_remote_backend_round_trip(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, REMOTE_IP, 53, False)], proto=UDP_P)
    out = run(dp, fib, FROM_NETDEV, udp(CLIENT_IP, NODE_IP, 5353, NODE_PORT))
    _, sport, _, _ = tuple_of(out.pkt)
    assert tuple_of(out.pkt) == (NODE_IP2, sport, REMOTE_IP, 53)
    assert_checksums(out.data)
    reply = run(dp, fib, FROM_NETDEV, udp(REMOTE_IP, NODE_IP2, 53, sport, b"answer"), ifindex=fib.np1)
    assert tuple_of(reply.pkt) == (NODE_IP, NODE_PORT, CLIENT_IP, 5353)
    assert_checksums(reply.data)


def test_clients_get_distinct_snat_ports(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, REMOTE_IP, 9090, False)])
    ports = set()
    for i in range(40):
        out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000 + i, NODE_PORT))
        ports.add(tuple_of(out.pkt)[1])
    assert len(ports) == 40


def _fill_snat_ports(dp, saddr, sport, daddr, free=()):
    """Takes every SNAT port of the range toward backend saddr:sport from node address daddr,
    except `free`."""
    entry = NatEntry4(flags=NAT_F_SERVICE | NAT_F_SNAT)
    for port in range(SNAT_PORT_MIN, SNAT_PORT_MAX + 1):
        if port not in free:
            dp.nat.update(CtTuple4(saddr=int(ipaddress.IPv4Address(saddr)), sport=sport,
                                   daddr=int(ipaddress.IPv4Address(daddr)), dport=port,
                                   nexthdr=TCP_P, flags=TUPLE_F_IN), entry)


def test_snat_port_exhaustion_is_no_mapping(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, REMOTE_IP, 9090, False)])
    _fill_snat_ports(dp, REMOTE_IP, 9090, NODE_IP2)
    frame = tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT)
    out = run(dp, fib, FROM_NETDEV, frame)
    assert out.retval == TC_ACT_SHOT
    (drop,) = out.drops()
    assert drop.drop_reason == DROP_NAT_NO_MAPPING
    assert dp.metrics.get(DROP_NAT_NO_MAPPING, DIR_INGRESS).packets == 1
    assert [m for m in nat_entries(dp) if m.direction == "OUT"] == []


def test_hairpin_backend_behind_the_same_device(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, HAIRPIN_IP, 9090, False)])
    out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    assert out.retval == TC_ACT_REDIRECT
    _, sport, _, _ = tuple_of(out.pkt)
    assert tuple_of(out.pkt) == (NODE_IP, sport, HAIRPIN_IP, 9090)
    assert out.pkt.dst == HAIRPIN_MAC


def test_unresolved_neighbour_is_left_to_redirect_neigh(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, UNRESOLVED_IP, 9090, False)])
    out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    assert out.retval == TC_ACT_REDIRECT  # bpf_redirect_neigh resolves it on the way out
    assert tuple_of(out.pkt)[0::2] == (NODE_IP2, UNRESOLVED_IP)
    assert_checksums(out.data)


# == backend selection ========================================================================

def test_external_traffic_policy_local_uses_local_backends_only(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, REMOTE_IP, 9090, False), (2, POD_IP, 8080, True),
                                         (3, HAIRPIN_IP, 9090, False), (4, POD2_IP, 8080, True)],
                flags=SVC_F_NODEPORT | SVC_F_EXT_LOCAL)
    seen = set()
    for i in range(60):
        out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 41000 + i, NODE_PORT))
        assert out.retval == TC_ACT_OK
        seen.add(out.pkt[IP].dst)
    assert seen == {POD_IP, POD2_IP}
    assert not any(m.snat for m in nat_entries(dp))


def test_external_traffic_policy_local_without_local_backend_has_no_backend(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, REMOTE_IP, 9090, False)],
                flags=SVC_F_NODEPORT | SVC_F_EXT_LOCAL)
    out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    assert [d.drop_reason for d in out.drops()] == [DROP_NO_SERVICE]
    assert out.pkt.haslayer(ICMP)


def test_session_affinity_by_client_ip(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(i, f"10.244.200.{10 + i}", 8080, True) for i in range(1, 9)],
                flags=SVC_F_NODEPORT | SVC_F_AFFINITY, affinity_timeout=300)
    picked = {run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 42000 + i, NODE_PORT)).pkt[IP].dst
              for i in range(20)}
    assert len(picked) == 1
    (aff,) = dp.affinity.list()
    assert aff["client"] == CLIENT_IP


def test_removed_backend_is_replaced_for_the_connection(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True)])
    assert run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT)).pkt[IP].dst == POD_IP
    dp.backends.remove(1)
    add_service(dp, NODE_IP, NODE_PORT, [(2, POD2_IP, 8080, True)])
    out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT, "A"))
    assert out.pkt[IP].dst == POD2_IP
    assert {str(m.saddr) for m in nat_entries(dp) if m.direction == "IN"} == {POD2_IP}


def test_backend_id_reused_for_another_address_is_rebalanced(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True)])
    run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD2_IP, 8080, True)])  # ID 1 names another pod now
    out = run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT, "A"))
    assert out.pkt[IP].dst == POD2_IP


def test_terminating_backend_keeps_connections_but_takes_no_new_ones(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True)])
    run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True, BE_STATE_TERMINATING),
                                         (2, POD2_IP, 8080, True)])
    assert run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT, "A")).pkt[IP].dst == POD_IP
    # The same client port starting over (a new SYN) goes to an active backend.
    assert run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT, "S")).pkt[IP].dst == POD2_IP


# == no backend ===============================================================================

def assert_port_unreachable(out: Run, refused: bytes, fib):
    pkt, orig = out.pkt, Ether(refused)
    assert (pkt.dst, pkt.src) == (orig.src, orig.dst)  # back to the sender
    assert (pkt[IP].src, pkt[IP].dst, pkt[IP].proto) == (orig[IP].dst, orig[IP].src, 1)
    assert (pkt[ICMP].type, pkt[ICMP].code) == (3, 3)  # destination / port unreachable
    quoted = bytes(pkt[ICMP].payload)
    assert quoted == bytes(orig[IP])[:28]  # the refused packet's header + 8 bytes
    assert_checksums(out.data)
    assert len(out.data) == 14 + 20 + 8 + 28


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_no_backend_is_rejected_with_port_unreachable(dp, fib, proto):
    add_service(dp, NODE_IP, NODE_PORT, [], proto=TCP_P if proto == "tcp" else UDP_P)
    frame = (tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT) if proto == "tcp"
             else udp(CLIENT_IP, NODE_IP, 40000, NODE_PORT, b"q"))
    out = run(dp, fib, FROM_NETDEV, frame)
    assert out.retval == TC_ACT_REDIRECT  # back out of the device it came in on
    assert_port_unreachable(out, frame, fib)
    (drop,) = out.drops()
    assert (drop.drop_reason, drop.direction, drop.length) == (DROP_NO_SERVICE, "INGRESS", len(frame))
    assert dp.metrics.get(DROP_NO_SERVICE, DIR_INGRESS).packets == 1
    assert dp.metrics.get(0, DIR_INGRESS).packets == 0


def test_no_backend_in_drop_mode(drop_dp, fib):
    add_service(drop_dp, NODE_IP, NODE_PORT, [])
    frame = tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT)
    for program in (FROM_NETDEV, XDP):
        out = run(drop_dp, fib, program, frame)
        assert out.retval == (TC_ACT_SHOT if program == FROM_NETDEV else XDP_DROP)
        (drop,) = out.drops()
        assert (drop.drop_reason, drop.direction) == (DROP_NO_SERVICE, "INGRESS")
    metric = drop_dp.metrics.get(DROP_NO_SERVICE, DIR_INGRESS)
    assert (metric.packets, metric.bytes) == (2, 2 * len(frame))


# == XDP ======================================================================================

def test_xdp_without_acceleration_leaves_nodeport_to_tc(dp, fib):
    add_service(dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True)])
    frame = tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT)
    out = run(dp, fib, XDP, frame)
    assert (out.retval, out.data, out.meta) == (XDP_PASS, frame, b"")
    assert nat_entries(dp) == []


def test_xdp_local_backend_is_dnated_and_passed_with_mark(xdp_dp, fib):
    add_service(xdp_dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True)])
    out = run(xdp_dp, fib, XDP, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    assert out.retval == XDP_PASS
    assert struct.unpack("=I", out.meta) == (NODEPORT_XDP_MARK,)  # tc skips it
    assert tuple_of(out.pkt) == (CLIENT_IP, 40000, POD_IP, 8080)
    assert_checksums(out.data)
    # tc egress finds the entries XDP made for the reply.
    reply = run(xdp_dp, fib, TO_NETDEV, tcp(POD_IP, CLIENT_IP, 8080, 40000, "SA"))
    assert tuple_of(reply.pkt) == (NODE_IP, NODE_PORT, CLIENT_IP, 40000)
    assert_checksums(reply.data)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_xdp_remote_backend_round_trip(xdp_dp, fib, proto):
    mk = tcp if proto == "tcp" else (lambda s, d, sp, dp_, *a, **k: udp(s, d, sp, dp_))
    add_service(xdp_dp, NODE_IP, NODE_PORT, [(1, REMOTE_IP, 9090, False)],
                proto=TCP_P if proto == "tcp" else UDP_P)
    out = run(xdp_dp, fib, XDP, mk(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    assert out.retval == XDP_REDIRECT  # toward np1
    _, sport, _, _ = tuple_of(out.pkt)
    assert tuple_of(out.pkt) == (NODE_IP2, sport, REMOTE_IP, 9090)
    assert SNAT_PORT_MIN <= sport <= SNAT_PORT_MAX
    assert (out.pkt.dst, out.pkt.src) == (REMOTE_MAC, fib.np1_mac)
    assert_checksums(out.data)
    reply = run(xdp_dp, fib, XDP, mk(REMOTE_IP, NODE_IP2, 9090, sport, "SA"), ifindex=fib.np1)
    assert reply.retval == XDP_REDIRECT  # toward np0
    assert tuple_of(reply.pkt) == (NODE_IP, NODE_PORT, CLIENT_IP, 40000)
    assert (reply.pkt.dst, reply.pkt.src) == (CLIENT_MAC, fib.np0_mac)
    assert_checksums(reply.data)
    assert xdp_dp.metrics.get(0, DIR_INGRESS).packets == 2


def test_xdp_hairpin_is_xdp_tx(xdp_dp, fib):
    add_service(xdp_dp, NODE_IP, NODE_PORT, [(1, HAIRPIN_IP, 9090, False)])
    out = run(xdp_dp, fib, XDP, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    assert out.retval == XDP_TX
    _, sport, _, _ = tuple_of(out.pkt)
    assert tuple_of(out.pkt) == (NODE_IP, sport, HAIRPIN_IP, 9090)
    assert out.pkt.dst == HAIRPIN_MAC
    assert_checksums(out.data)
    reply = run(xdp_dp, fib, XDP, tcp(HAIRPIN_IP, NODE_IP, 9090, sport, "SA", src_mac=HAIRPIN_MAC))
    assert reply.retval == XDP_TX
    assert tuple_of(reply.pkt) == (NODE_IP, NODE_PORT, CLIENT_IP, 40000)
    assert reply.pkt.dst == CLIENT_MAC
    assert_checksums(reply.data)


def test_xdp_leaves_what_it_cannot_send_to_tc(xdp_dp, fib):
    """No neighbour entry: XDP cannot build the frame, so it passes the packet untouched and
    records nothing; tc translates it and lets bpf_redirect_neigh resolve the neighbour."""
    add_service(xdp_dp, NODE_IP, NODE_PORT, [(1, UNRESOLVED_IP, 9090, False)])
    frame = tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT)
    out = run(xdp_dp, fib, XDP, frame)
    assert (out.retval, out.data, out.meta) == (XDP_PASS, frame, b"")
    assert nat_entries(xdp_dp) == []
    tc = run(xdp_dp, fib, FROM_NETDEV, frame)
    assert tc.retval == TC_ACT_REDIRECT
    assert tuple_of(tc.pkt)[0::2] == (NODE_IP2, UNRESOLVED_IP)


def test_xdp_external_traffic_policy_local(xdp_dp, fib):
    add_service(xdp_dp, NODE_IP, NODE_PORT, [(1, REMOTE_IP, 9090, False), (2, POD_IP, 8080, True)],
                flags=SVC_F_NODEPORT | SVC_F_EXT_LOCAL)
    for i in range(20):
        out = run(xdp_dp, fib, XDP, tcp(CLIENT_IP, NODE_IP, 41000 + i, NODE_PORT))
        assert (out.retval, out.pkt[IP].dst) == (XDP_PASS, POD_IP)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_xdp_no_backend_is_rejected(xdp_dp, fib, proto):
    add_service(xdp_dp, NODE_IP, NODE_PORT, [], proto=TCP_P if proto == "tcp" else UDP_P)
    frame = (tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT) if proto == "tcp"
             else udp(CLIENT_IP, NODE_IP, 40000, NODE_PORT, b"q"))
    out = run(xdp_dp, fib, XDP, frame)
    assert out.retval == XDP_TX
    assert_port_unreachable(out, frame, fib)
    (drop,) = out.drops()
    assert (drop.drop_reason, drop.length) == (DROP_NO_SERVICE, len(frame))
    assert xdp_dp.metrics.get(DROP_NO_SERVICE, DIR_INGRESS).packets == 1


def test_xdp_prefilter_still_comes_first(xdp_dp, fib):
    add_service(xdp_dp, NODE_IP, NODE_PORT, [(1, POD_IP, 8080, True)])
    from cilium_py.datapath.maps.prefilter import PrefilterMap

    with PrefilterMap(xdp_dp.loaded.config.pin_dir) as prefilter:
        prefilter.deny(ipaddress.IPv4Network("10.245.200.0/24"))
        try:
            out = run(xdp_dp, fib, XDP, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
        finally:
            prefilter.clear()
    assert out.retval == XDP_DROP
    assert [d.drop_reason for d in out.drops()] == [181]
    assert nat_entries(xdp_dp) == []


# == the map mirror and the CLI ==================================================================

def test_nat_cli_lists_and_flushes(dp, fib):
    from cilium_py.cli.main import cli

    add_service(dp, NODE_IP, NODE_PORT, [(1, REMOTE_IP, 9090, False)])
    run(dp, fib, FROM_NETDEV, tcp(CLIENT_IP, NODE_IP, 40000, NODE_PORT))
    config = dp.loaded.config
    where = ["--node", config.node, "--bpf-root", config.bpf_root]
    runner = CliRunner()
    res = runner.invoke(cli, ["bpf", "nat", "list", "-o", "json", *where])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["direction"], r["source"], r["destination"]) for r in rows][0] == (
        "OUT", f"{CLIENT_IP}:40000", f"{NODE_IP}:{NODE_PORT}")
    assert rows[0]["flags"] == ["Service", "SNAT"]
    assert rows[1]["translated_destination"] == f"{CLIENT_IP}:40000"
    text = runner.invoke(cli, ["bpf", "nat", "list", *where]).output
    assert f"TCP OUT {CLIENT_IP}:40000 -> {NODE_IP}:{NODE_PORT} XLATE {NODE_IP2}:" in text
    res = runner.invoke(cli, ["bpf", "nat", "flush", "-o", "json", *where])
    assert json.loads(res.output) == [{"deleted": 2}]
    assert runner.invoke(cli, ["bpf", "nat", "list", *where]).output.strip() == "No entries found."


def test_nat_entry_mirror_size():
    assert ctypes.sizeof(NatEntry4) == 32
