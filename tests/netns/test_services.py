"""Services east-west with real sockets: ClusterIP through the socket hooks (bpf_sock.c,
attached by the agent to this session's own cgroup) and through the pods' per-packet load
balancer (bpf_lxc.c), TCP and UDP.

The node `sock_lab` runs an agent started with `--cgroup-root <test cgroup>`. A client that
runs inside that cgroup (and pod a's network namespace) has its sockets translated at
connect/sendmsg; a client outside it (the pytest process's own cgroup has no programs) sends
packets to the frontend and meets the per-packet load balancer. Services are programmed by
writing the LB maps directly; pods b and c are the backends, a the client.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cilium_py.datapath import attach, libbpf
from cilium_py.datapath.maps.conntrack import ConntrackTables
from cilium_py.datapath.maps.lb import (
    BE_STATE_TERMINATING,
    SVC_F_AFFINITY,
    SVC_F_HOSTPORT,
    SVC_F_NODEPORT,
    AffinityMap,
    Backend,
    BackendsMap,
    ReverseSkMap,
    RevNatMap,
    ServiceEntry,
    ServicesMap,
    frontend,
)
from cilium_py.datapath.maps.metrics import MetricsMap
from cilium_py.datapath.reasons import DIR_EGRESS
from cilium_py.lab.agentproc import AgentProcess

from .conftest import CGROUP_PARENT, UDP_PORT

pytestmark = pytest.mark.netns

TCP, UDP = 6, 17
VIP = "10.96.7.10"          # ClusterIP: only ever routed inside our namespaces
VPORT = 8000                # service port; the backends listen on 80 (TCP) and 53 (UDP)
UDP_VPORT = 5353
NODEPORT = 30080
SERVICE_ID, UDP_SERVICE_ID, NODEPORT_ID = 21, 22, 23
BACKEND_IDS = {"b": 101, "c": 102}
UDP_BACKEND_IDS = {"b": 111, "c": 112}
DROP_NO_SERVICE = 158
CLIENT = str(Path(__file__).with_name("sock_client.py"))


class Client:
    """sock_client.py in a pod's namespace; in `cgroup` too when given (socket hooks)."""

    def __init__(self, netns_name: str, cgroup: str | None):
        procs = os.path.join(cgroup, "cgroup.procs") if cgroup else None

        def enter():
            if procs:  # the cgroup first, as `ciliumpy lab exec` does
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))
            from pyroute2 import netns as _netns

            _netns.setns(netns_name)

        self.proc = subprocess.Popen([sys.executable, CLIENT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=enter)

    def call(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"client exited with {self.proc.poll()}"
        return json.loads(line)

    def tcp(self, ip=VIP, port=VPORT, **kw) -> dict:
        return self.call(op="tcp", ip=ip, port=port, **kw)

    def udp(self, ip=VIP, port=UDP_VPORT, data="hello", connected=False) -> dict:
        return self.call(op="udp", ip=ip, port=port, data=data, connected=connected)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Services:
    """The LB maps of a lab node, written the way the control plane will write them."""

    def __init__(self, lab):
        pin = lab.config.pin_dir
        self.lab = lab
        self.services, self.backends = ServicesMap(pin), BackendsMap(pin)
        self.revnat, self.affinity, self.reverse_sk = RevNatMap(pin), AffinityMap(pin), ReverseSkMap(pin)

    def maps(self):
        return (self.services, self.backends, self.revnat, self.affinity, self.reverse_sk)

    def clear(self):
        for m in self.maps():
            m.clear()

    def close(self):
        for m in self.maps():
            m.close()

    def backend(self, backend_id: int, pod: str, port: int, proto: int, state: int = 0):
        self.backends.upsert(Backend(backend_id, ipaddress.IPv4Address(self.lab.ip(pod)), port,
                                     proto, state))

    def service(self, pods, *, vip=VIP, port=VPORT, proto=TCP, service_id=SERVICE_ID, flags=0,
                affinity_timeout=0, ids=None):
        """A frontend whose active backends are `pods` (port 80 TCP, 53 UDP)."""
        ids = ids or (BACKEND_IDS if proto == TCP else UDP_BACKEND_IDS)
        be_port = 80 if proto == TCP else UDP_PORT
        for pod in pods:
            self.backend(ids[pod], pod, be_port, proto)
        self.services.upsert(ServiceEntry(frontend(vip, port, proto), service_id,
                                          [ids[p] for p in pods], flags=flags,
                                          affinity_timeout=affinity_timeout))
        self.revnat.upsert(service_id, vip, port)


@pytest.fixture
def svc(sock_lab):
    """Empty LB maps and conntrack before and after each test."""
    made = Services(sock_lab)
    made.clear()
    tables = ConntrackTables(sock_lab.config.pin_dir)
    tables.flush()
    yield made
    made.clear()
    tables.flush()
    tables.close()
    made.close()


@pytest.fixture
def clients(sock_lab):
    """Clients in pod a: `sock` inside the hooks' cgroup, `pkt` outside it."""
    ns = sock_lab.pods["a"].netns
    made = {"sock": Client(ns, sock_lab.cgroup), "pkt": Client(ns, None)}
    yield made
    for c in made.values():
        c.close()


MODES = ["sock", "pkt"]


def service_entries(lab):
    tables = ConntrackTables(lab.config.pin_dir)
    try:
        return [c for c in tables.connections() if c.service]
    finally:
        tables.close()


def drops(lab, reason: int) -> int:
    with MetricsMap(lab.config.pin_dir) as m:
        return m.get(reason, DIR_EGRESS).packets


# -- ClusterIP, TCP and UDP, both ways of translating ---------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_clusterip_tcp(sock_lab, svc, clients, mode):
    svc.service(["b", "c"])
    names = set()
    for _ in range(20):
        r = clients[mode].tcp()
        assert r["ok"], r
        assert r["peer"] == [VIP, VPORT], "getpeername shows the service, not the backend"
        names.add(r["name"])
    assert names == {"b", "c"}  # all 20 on one of 2: probability 2^-19
    entries = service_entries(sock_lab)
    if mode == "sock":
        assert entries == [], "translated at connect(): no packet ever went to the VIP"
        assert len(svc.reverse_sk) >= 2
    else:
        assert len(entries) == 20
        assert {e.backend_id for e in entries} == set(BACKEND_IDS.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("connected", [False, True], ids=["sendto", "connected"])
def test_clusterip_udp(sock_lab, svc, clients, mode, connected):
    svc.service(["b", "c"], proto=UDP, port=UDP_VPORT, service_id=UDP_SERVICE_ID)
    names = set()
    for i in range(20):
        r = clients[mode].udp(data=f"q{i}", connected=connected)
        assert r["ok"], r
        assert r["source"] == [VIP, UDP_VPORT], "the answer comes from the service address"
        if connected:
            assert r["peer"] == [VIP, UDP_VPORT]
        name, _, echoed = r["data"].partition("\n")
        assert echoed == f"q{i}"
        names.add(name)
    assert names == {"b", "c"}


def test_nodeport_on_loopback_through_the_socket_hooks(sock_lab, svc, clients):
    """A NodePort's 0.0.0.0:port frontend serves 127.0.0.1:port at the socket."""
    svc.service(["c"], vip="0.0.0.0", port=NODEPORT, flags=SVC_F_NODEPORT, service_id=NODEPORT_ID)
    r = clients["sock"].tcp(ip="127.0.0.1", port=NODEPORT)
    assert r["ok"], r
    assert (r["name"], r["peer"]) == ("c", ["127.0.0.1", NODEPORT])


def test_hostport_is_not_captured_on_loopback(sock_lab, svc, clients):
    """A hostPort's 0.0.0.0:port frontend is for node addresses only: a pod's connection to
    its own localhost port of the same number must stay local (here: nothing listens)."""
    svc.service(["c"], vip="0.0.0.0", port=NODEPORT, flags=SVC_F_HOSTPORT, service_id=NODEPORT_ID)
    r = clients["sock"].tcp(ip="127.0.0.1", port=NODEPORT)
    assert (r["ok"], r["errno"]) == (False, errno.ECONNREFUSED), r


@pytest.mark.parametrize("mode", MODES)
def test_backend_port_unreachable_reaches_the_client(sock_lab, svc, clients, mode):
    """The backend answers a datagram with ICMP port unreachable (nothing listens on 54).
    Per packet, the error quotes the backend and is rewritten to quote the frontend, so the
    client's connected socket reports ECONNREFUSED instead of waiting for an answer."""
    svc.backend(UDP_BACKEND_IDS["b"], "b", 54, UDP)
    svc.services.upsert(ServiceEntry(frontend(VIP, UDP_VPORT, UDP), UDP_SERVICE_ID,
                                     [UDP_BACKEND_IDS["b"]]))
    svc.revnat.upsert(UDP_SERVICE_ID, VIP, UDP_VPORT)
    r = clients[mode].udp(connected=True)
    assert (r["ok"], r["errno"]) == (False, errno.ECONNREFUSED), r
    assert r["elapsed"] < 1.0


# -- session affinity -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_session_affinity_keeps_the_client_on_one_backend(sock_lab, svc, clients, mode):
    svc.service(["b", "c"], flags=SVC_F_AFFINITY, affinity_timeout=300)
    names = {clients[mode].tcp()["name"] for _ in range(12)}
    assert len(names) == 1 and names <= {"b", "c"}
    (entry,) = svc.affinity.list()
    if mode == "sock":
        assert entry["client"].startswith("netns:")  # keyed by the pod's netns cookie
    else:
        assert entry["client"] == sock_lab.ip("a")
    assert entry["backend_id"] == BACKEND_IDS[names.pop()]


# -- backends going away ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_terminating_backend_keeps_open_connections(sock_lab, svc, clients, mode):
    client = clients[mode]
    svc.service(["b"])
    r = client.call(op="open", id="long", ip=VIP, port=VPORT)
    assert r["ok"] and r["name"] == "b", r
    assert client.call(op="echo", id="long", data="before")["data"] == "before"
    # b is terminating: it loses its slot (c takes over) but keeps its backend entry.
    svc.backend(BACKEND_IDS["b"], "b", 80, TCP, state=BE_STATE_TERMINATING)
    svc.service(["c"])
    for i in range(3):
        r = client.call(op="echo", id="long", data=f"during{i}")
        assert r["ok"] and r["data"] == f"during{i}", r
    assert {client.tcp()["name"] for _ in range(8)} == {"c"}, "new connections avoid b"
    assert client.call(op="close", id="long")["ok"]


@pytest.mark.parametrize("mode", MODES)
def test_service_without_endpoints_is_refused_at_once(sock_lab, svc, clients, mode):
    """Socket hooks: connect()/sendto() fail with ECONNREFUSED before any packet. Per packet:
    the SYN is dropped with SERVICE_BACKEND_NOT_FOUND and answered with ICMP port
    unreachable, which the client's TCP turns into ECONNREFUSED just as fast."""
    svc.service([])
    svc.service([], proto=UDP, port=UDP_VPORT, service_id=UDP_SERVICE_ID)
    before = drops(sock_lab, DROP_NO_SERVICE)
    r = clients[mode].tcp(timeout=1.0)
    assert (r["ok"], r["errno"]) == (False, errno.ECONNREFUSED), r
    assert r["elapsed"] < 0.5
    connected = clients[mode].udp(connected=True)
    assert (connected["ok"], connected["errno"]) == (False, errno.ECONNREFUSED), connected
    if mode == "sock":
        assert drops(sock_lab, DROP_NO_SERVICE) == before, "no packet ever left"
        u = clients[mode].udp()
        assert (u["ok"], u["errno"]) == (False, errno.ECONNREFUSED), u
    else:
        assert drops(sock_lab, DROP_NO_SERVICE) == before + 2
    assert service_entries(sock_lab) == []


# -- the agent's hooks on the cgroup ----------------------------------------------------------

def attached(cgroup: str) -> dict[str, list[str]]:
    return attach.cgroup_program_names(cgroup)


OURS = {"connect4": ["cil_sock4_conne"], "sendmsg4": ["cil_sock4_sendm"],
        "recvmsg4": ["cil_sock4_recvm"], "getpeername4": ["cil_sock4_getpe"]}


def test_agent_attaches_one_program_per_hook_and_replaces_it_on_restart(sock_lab, svc, clients):
    assert attached(sock_lab.cgroup) == OURS
    before = _attached_ids(sock_lab.cgroup)
    sock_lab.agent.restart()
    assert attached(sock_lab.cgroup) == OURS, "the old programs were detached"
    assert _attached_ids(sock_lab.cgroup).isdisjoint(before), "the new agent's programs"
    svc.service(["c"])
    r = clients["sock"].tcp()
    assert (r["ok"], r["name"], r["peer"]) == (True, "c", [VIP, VPORT])
    assert service_entries(sock_lab) == []


def test_no_bpf_lb_sock_detaches_and_leaves_per_packet(sock_lab, svc, clients):
    off = AgentProcess(node=sock_lab.config.node, bpf_root=sock_lab.config.bpf_root,
                       run_dir=sock_lab.run_dir, node_netns=sock_lab.node.netns,
                       devices=("eth0",), extra_args=("--cgroup-root", sock_lab.cgroup,
                                                      "--no-bpf-lb-sock"))
    sock_lab.agent.stop()
    try:
        off.start()
        assert attached(sock_lab.cgroup) == {hook: [] for hook in OURS}
        svc.service(["b"])
        r = clients["sock"].tcp()
        assert (r["ok"], r["name"], r["peer"]) == (True, "b", [VIP, VPORT])
        assert len(service_entries(sock_lab)) == 1, "translated per packet instead"
    finally:
        off.stop()
        sock_lab.agent.start()
    assert attached(sock_lab.cgroup) == OURS


def test_agent_refuses_a_root_cgroup(sock_lab, tmp_path):
    argv = [sys.executable, "-m", "cilium_py.cli.main", "agent", "--node", "refused",
            "--bpf-root", str(tmp_path), "--node-netns", sock_lab.node.netns,
            "--cgroup-root", CGROUP_PARENT]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "root of the cgroup v2 mount" in result.stderr


def test_root_cgroup_carries_no_programs_of_ours(sock_lab):
    for hook, names in attached(CGROUP_PARENT).items():
        assert not [n for n in names if n.startswith("cil_")], f"root cgroup {hook}: {names}"


def _attached_ids(cgroup: str) -> set[int]:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {i for t in attach.SOCK_LB_PROGRAMS.values() for i in libbpf.prog_query(fd, t)}
    finally:
        os.close(fd)
