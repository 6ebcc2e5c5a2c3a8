"""NodePort, LoadBalancer and externalTrafficPolicy with real traffic from outside the node.

Topology (one per datapath mode, all namespaces created and removed here):

    client (the node's -ext namespace, 10.245.N.2)  <-- eth0 -->  node (10.245.N.1, agent,
        |  also the router toward the remote node                      pods "web" and "api")
      rmt0 10.246.N.1
        |
    remote namespace 10.246.N.2: a backend that is not a pod of this node

The client reaches the node's NodePort frontends through eth0, where the agent attached
cil_xdp_entry and bpf_host.c's programs. A remote backend is reached by SNAT to the node's
address; its replies come back through eth0 too, so in XDP modes both directions of that
flow are hairpinned by XDP_TX. Services are written to the maps directly
(cilium_py/datapath/maps/lb.py): the control plane is not under test here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time
from dataclasses import dataclass, field

import pytest
from pyroute2 import IPRoute

from cilium_py.datapath import attach, loader, netns
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.lb import (
    SVC_F_EXT_LOCAL,
    SVC_F_LOADBALANCER,
    SVC_F_NODEPORT,
    Backend,
    BackendsMap,
    RevNatMap,
    ServiceEntry,
    ServicesMap,
    frontend,
)
from cilium_py.datapath.maps.nat import NatMap
from cilium_py.lab.agentproc import AgentProcess
from cilium_py.lab import wire
from cilium_py.lab.harness import PodSpec, running_node
from cilium_py.lab.node import LabNode

pytestmark = [pytest.mark.netns]

TCP, UDP = 6, 17
POD_PORT, UDP_PORT = 80, 53
PODS = {"web": 1100, "api": 1101}

# mode -> (node index, agent arguments)
MODES = {
    "tc": (241, ()),
    "xdp-native": (242, ("--bpf-lb-acceleration", "native", "--xdp-mode", "native")),
    "xdp-generic": (243, ("--bpf-lb-acceleration", "native", "--xdp-mode", "generic")),
}


@dataclass
class NodePortLab:
    mode: str
    node: LabNode
    config: DatapathConfig
    agent: AgentProcess
    remote_ns: str
    pods: dict = field(default_factory=dict)
    services: list = field(default_factory=list)

    @property
    def node_ip(self) -> str:
        return str(self.node.addressing.uplink_ip)

    @property
    def remote_ip(self) -> str:
        return f"10.246.{self.node.addressing.index}.2"

    @property
    def lb_ip(self) -> str:
        return f"10.245.250.{self.node.addressing.index}"

    def pod_ip(self, pod: str) -> str:
        return str(self.pods[pod].ip)

    # -- services, written as the control plane would ---------------------------------------
    def add_service(self, address, port, backends, *, service_id, proto=TCP, flags=SVC_F_NODEPORT):
        """backends: (backend id, ip, port, local)."""
        pin = self.config.pin_dir
        with ServicesMap(pin) as services, BackendsMap(pin) as bmap, RevNatMap(pin) as revnat:
            for bid, ip, bport, local in backends:
                bmap.upsert(Backend(bid, ipaddress.IPv4Address(ip), bport, proto, local=local))
            fe = frontend(address, port, proto)
            services.upsert(ServiceEntry(fe, service_id, [b[0] for b in backends], flags=flags))
            revnat.upsert(service_id, address, port)
        self.services.append(fe)

    def clear_services(self):
        pin = self.config.pin_dir
        with ServicesMap(pin) as services, BackendsMap(pin) as bmap, RevNatMap(pin) as revnat, \
                NatMap(pin) as nat:
            for m in (services, bmap, revnat, nat):
                m.clear()
        self.services.clear()

    def nat(self):
        with NatMap(self.config.pin_dir) as nat:
            return nat.mappings()

    # -- the client, in the outside namespace -------------------------------------------------
    def client_socket(self, kind=socket.SOCK_STREAM) -> socket.socket:
        with netns.entered(self.node.ext_netns):
            return socket.socket(socket.AF_INET, kind)

    def tcp_exchange(self, ip: str, port: int, timeout: float = 3.0) -> str:
        """Connects from the client, returns the banner (the backend's name) after checking
        the connection echoes."""
        with self.client_socket() as sock:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            banner = recv_line(sock)
            sock.sendall(b"ping-" + banner.encode())
            assert recv_exact(sock, 5 + len(banner)) == b"ping-" + banner.encode()
            return banner

    def udp_exchange(self, ip: str, port: int, timeout: float = 3.0) -> str:
        with self.client_socket(socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            sock.send(b"hello")
            data = sock.recv(256)
            name, _, echoed = data.partition(b"\n")
            assert echoed == b"hello"
            return name.decode()


def recv_line(sock) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            break
        buf += chunk
    return buf.decode().strip()


def recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _make_remote(node: LabNode, remote_ns: str) -> None:
    """The remote node behind the outside namespace, which routes between the two."""
    i = node.addressing.index
    netns.create(remote_ns)
    for ns in (node.ext_netns, remote_ns):
        netns.write_sysctls(ns, {"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0,
                                 "net.ipv4.conf.default.rp_filter": 0,
                                 "net.ipv6.conf.all.disable_ipv6": 1,
                                 "net.ipv6.conf.default.disable_ipv6": 1})
    with netns.entered(node.ext_netns), IPRoute() as ipr:
        ipr.link("add", ifname="rmt0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": remote_ns})
        idx = ipr.link_lookup(ifname="rmt0")[0]
        ipr.addr("add", index=idx, address=f"10.246.{i}.1", prefixlen=30)
        ipr.link("set", index=idx, state="up")
        # LoadBalancer IPs of the node are announced to the client as routes via the node.
        ipr.route("add", dst=f"10.245.250.{i}/32", gateway=str(node.addressing.uplink_ip))
    with netns.entered(remote_ns), IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=idx, address=f"10.246.{i}.2", prefixlen=30)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=f"10.246.{i}.1")
    with netns.entered(node.netns), IPRoute() as ipr:
        ipr.route("add", dst=f"10.246.{i}.0/30", gateway=str(node.addressing.world_ip))


def _wire_like_outside(node: LabNode, remote_ns: str) -> None:
    """What native XDP on a veth needs from the other end, which a physical NIC's wire
    provides: frames XDP_TX sends back are only picked up by a veth peer that runs an XDP
    program itself (the kernel schedules the peer's NAPI only then), and those frames lose
    the skb's checksum state, so senders must put complete checksums on the wire (a local
    socket's packet crosses a veth with only the pseudo-header summed)."""
    wire.attach_xdp_pass(node.ext_netns, "eth0")
    wire.set_tx_checksum_offload(node.ext_netns, "eth0", False)
    wire.set_tx_checksum_offload(remote_ns, "eth0", False)


@contextlib.contextmanager
def nodeport_lab(mode: str, unique: str, tmp_path_factory):
    index, agent_args = MODES[mode]
    node = LabNode(f"np{unique}{index}", index=index)
    remote_ns = f"{node.netns}-remote"

    def prepare(handle):
        handle.on_teardown(netns.remove, remote_ns)
        _make_remote(node, remote_ns)
        if mode == "xdp-native":
            _wire_like_outside(node, remote_ns)
        handle.listen(remote_ns, "remote", tcp=(POD_PORT,), udp=(UDP_PORT,))

    pods = {pod: PodSpec(identity, tcp=(POD_PORT,), udp=(UDP_PORT,)) for pod, identity in PODS.items()}
    with running_node(node, bpf_root=f"/sys/fs/bpf/ciliumpy-test-{unique}-np{index}",
                      run_dir=str(tmp_path_factory.mktemp(f"np-{mode}")), agent_args=agent_args,
                      pods=pods, prepare=prepare) as running:
        yield NodePortLab(mode, node, running.config, running.agent, remote_ns, pods=running.pods)


@pytest.fixture(scope="module", params=list(MODES))
def np_lab(request, privileged, unique, tmp_path_factory):
    with nodeport_lab(request.param, unique, tmp_path_factory) as lab:
        yield lab


@pytest.fixture
def lab(np_lab):
    """The mode's lab with no services or NAT entries: what a test leaves goes with the
    next test's clear, or with the mode's node at the end of the module."""
    np_lab.clear_services()
    return np_lab


# -- tests -----------------------------------------------------------------------------------

def test_nodeport_to_local_backend(lab):
    lab.add_service(lab.node_ip, 30080, [(1, lab.pod_ip("web"), POD_PORT, True)], service_id=1)
    assert lab.tcp_exchange(lab.node_ip, 30080) == "web"
    (out,) = [m for m in lab.nat() if m.direction == "OUT"]
    assert (str(out.to_saddr), str(out.to_daddr)) == (str(lab.node.addressing.world_ip), lab.pod_ip("web"))
    assert not out.snat  # the pod saw the client's own address


def test_nodeport_udp_to_local_backend(lab):
    lab.add_service(lab.node_ip, 30053, [(1, lab.pod_ip("api"), UDP_PORT, True)], service_id=1, proto=UDP)
    assert lab.udp_exchange(lab.node_ip, 30053) == "api"


def test_nodeport_to_remote_backend_through_snat(lab):
    lab.add_service(lab.node_ip, 30081, [(1, lab.remote_ip, POD_PORT, False)], service_id=1)
    for _ in range(3):
        assert lab.tcp_exchange(lab.node_ip, 30081) == "remote"
    outs = [m for m in lab.nat() if m.direction == "OUT"]
    assert len(outs) == 3
    assert all(m.snat and str(m.to_saddr) == lab.node_ip for m in outs)
    assert len({m.to_sport for m in outs}) == 3


def test_nodeport_udp_to_remote_backend(lab):
    lab.add_service(lab.node_ip, 30054, [(1, lab.remote_ip, UDP_PORT, False)], service_id=1, proto=UDP)
    assert lab.udp_exchange(lab.node_ip, 30054) == "remote"


def test_loadbalancer_ip(lab):
    lab.add_service(lab.lb_ip, 80, [(1, lab.remote_ip, POD_PORT, False)], service_id=1,
                    flags=SVC_F_LOADBALANCER)
    assert lab.tcp_exchange(lab.lb_ip, 80) == "remote"


def test_external_traffic_policy_local(lab):
    lab.add_service(lab.node_ip, 30082, [(1, lab.remote_ip, POD_PORT, False),
                                         (2, lab.pod_ip("web"), POD_PORT, True)],
                    service_id=1, flags=SVC_F_NODEPORT | SVC_F_EXT_LOCAL)
    assert {lab.tcp_exchange(lab.node_ip, 30082) for _ in range(12)} == {"web"}


def test_cluster_policy_spreads_over_all_backends(lab):
    lab.add_service(lab.node_ip, 30083, [(1, lab.remote_ip, POD_PORT, False),
                                         (2, lab.pod_ip("web"), POD_PORT, True)], service_id=1)
    seen = set()
    for _ in range(60):
        seen.add(lab.tcp_exchange(lab.node_ip, 30083))
        if seen == {"web", "remote"}:
            break
    assert seen == {"web", "remote"}


def test_service_without_endpoints_refuses_at_once(lab):
    lab.add_service(lab.node_ip, 30090, [], service_id=1)
    lab.add_service(lab.node_ip, 30090, [], service_id=2, proto=UDP)
    with lab.client_socket() as sock:
        sock.settimeout(5)
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            sock.connect((lab.node_ip, 30090))
        assert time.monotonic() - started < 1.0  # refused, not timed out
    with lab.client_socket(socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect((lab.node_ip, 30090))
        sock.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(64)


def _tc_ingress(lab, fd: int | None):
    """Puts `fd` as eth0's tc ingress program, or removes the ingress program (None)."""
    with netns.entered(lab.node.netns), IPRoute() as ipr:
        ifindex = ipr.link_lookup(ifname="eth0")[0]
        if fd is not None:
            attach.attach_tc(ipr, ifindex, fd, attach.INGRESS, "cil_from_netdev")
            return
        ipr.tc("del-filter", "bpf", ifindex, attach.FILTER_HANDLE,
               parent=attach.CLSACT_PARENT[attach.INGRESS], prio=attach.FILTER_PRIO,
               protocol=attach.ETH_P_ALL)
        assert attach.tc_program_names(ipr, ifindex, attach.INGRESS) == []


def test_which_hook_translates(lab):
    """With acceleration, XDP translates both directions of a remote backend's connections and
    the client side of a local one, so NodePort keeps working without tc ingress; without
    it, tc ingress is what does it."""
    lab.add_service(lab.node_ip, 30084, [(1, lab.remote_ip, POD_PORT, False)], service_id=1)
    lab.add_service(lab.node_ip, 30085, [(2, lab.pod_ip("api"), POD_PORT, True)], service_id=2)
    _tc_ingress(lab, None)
    try:
        if lab.mode.startswith("xdp"):
            assert lab.tcp_exchange(lab.node_ip, 30084) == "remote"
            assert lab.tcp_exchange(lab.node_ip, 30085) == "api"
        else:
            for port in (30084, 30085):
                with pytest.raises(OSError):  # nobody translates: no answer (or a RST)
                    lab.tcp_exchange(lab.node_ip, port, timeout=1.0)
    finally:
        fd = loader.open_pinned_program(lab.config, "cil_from_netdev")
        try:
            _tc_ingress(lab, fd)
        finally:
            os.close(fd)
    assert lab.tcp_exchange(lab.node_ip, 30085) == "api"


def test_programs_attached_to_the_node_device_only(lab):
    with netns.entered(lab.node.netns), IPRoute() as ipr:
        ifindex = ipr.link_lookup(ifname="eth0")[0]
        assert attach.tc_program_names(ipr, ifindex, attach.INGRESS)[0].startswith("cil_from_netdev")
        assert attach.tc_program_names(ipr, ifindex, attach.EGRESS)[0].startswith("cil_to_netdev")
        assert attach.xdp_program_id(ipr, ifindex) != 0
    with IPRoute() as ipr:  # the root namespace: none of ours, on any device
        for link in ipr.get_links():
            index = link["index"]
            for direction in (attach.INGRESS, attach.EGRESS):
                try:
                    names = attach.tc_program_names(ipr, index, direction)
                except Exception:  # noqa: BLE001 - no clsact on this device
                    names = []
                assert not [n for n in names if n.startswith("cil_")]
            assert attach.xdp_program_id(ipr, index) == 0
