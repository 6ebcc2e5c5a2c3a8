"""A lab node with an agent process and three pods, shared by the netns tests of a session.
Each test starts from no policy and no conntrack state; teardown removes namespaces, pins
and processes even when a test fails."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass

import pytest

from cilium_py.agent.endpoints import EndpointHandle, EndpointManager
from cilium_py.agent.policy.mapstate import PolicyRule, PolicyWriter
from cilium_py.datapath import netns
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.conntrack import ConntrackTables
from cilium_py.lab.agentproc import AgentProcess
from cilium_py.lab.harness import PodSpec, running_node
from cilium_py.lab.node import LabNode

TCP_PORTS = (80, 8080, 8085, 8090, 8091)
UDP_PORT = 53
IDENTITIES = {"a": 1000, "b": 1001, "c": 1002}


@dataclass
class Lab:
    node: LabNode
    config: DatapathConfig
    agent: AgentProcess
    manager: EndpointManager
    pods: dict[str, EndpointHandle]
    run_dir: str
    cgroup: str = ""  # where the agent's socket-LB hooks are attached, if anywhere

    def set_policy(self, pod: str, rules: list[PolicyRule], *, ingress: bool, egress: bool):
        ep = self.pods[pod]
        PolicyWriter(self.manager.policy, self.manager.endpoints).apply(
            ep.ip, ep.endpoint_id, rules, enforce_ingress=ingress, enforce_egress=egress)

    def reset(self):
        for pod in self.pods:
            self.set_policy(pod, [], ingress=False, egress=False)
        tables = ConntrackTables(self.config.pin_dir)
        tables.flush()
        tables.close()

    def ip(self, pod: str) -> str:
        return str(self.pods[pod].ip)

    def tcp_connect(self, src: str, dst_ip: str, port: int, timeout: float = 1.0) -> socket.socket:
        """A connected socket created inside pod `src`'s namespace; raises OSError when the
        connection is not established within the timeout."""
        with netns.entered(self.pods[src].netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((dst_ip, port))
        except OSError:
            sock.close()
            raise
        return sock

    def tcp_ok(self, src: str, dst: str, port: int) -> bool:
        try:
            sock = self.tcp_connect(src, self.ip(dst), port)
        except OSError:
            return False
        with sock:
            return sock.recv(64) == f"{dst}\n".encode()

    def udp_ok(self, src: str, dst: str, port: int = UDP_PORT) -> bool:
        with netns.entered(self.pods[src].netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(1.0)
            sock.sendto(b"hello", (self.ip(dst), port))
            try:
                data, _ = sock.recvfrom(256)
            except OSError:
                return False
            return data == f"{dst}\nhello".encode()

    def ping_ok(self, src: str, dst_ip: str) -> bool:
        return netns.run(self.pods[src].netns, ["ping", "-c", "1", "-W", "1", dst_ip],
                         capture_output=True).returncode == 0


@contextlib.contextmanager
def running_lab(unique: str, tmp_path_factory, *, index: int, suffix: str = "",
                agent_args: tuple[str, ...] = ()):
    """A lab node, its agent (with `agent_args`) and the three pods with listeners; all of
    it removed on exit, also after a failure."""
    name = f"t{unique}{suffix}"
    pods = {pod: PodSpec(identity, tcp=TCP_PORTS, udp=(UDP_PORT,)) for pod, identity in IDENTITIES.items()}
    with running_node(LabNode(name, index=index), bpf_root=f"/sys/fs/bpf/ciliumpy-test-{unique}-netns{suffix}",
                      run_dir=str(tmp_path_factory.mktemp("run")), agent_args=agent_args, pods=pods) as node:
        yield Lab(node.node, node.config, node.agent, node.manager, node.pods, node.run_dir)


@pytest.fixture(scope="session")
def lab(privileged, unique, tmp_path_factory):
    with running_lab(unique, tmp_path_factory, index=231) as made:
        yield made


CGROUP_PARENT = "/sys/fs/cgroup/unified"


@pytest.fixture(scope="session")
def session_cgroup(privileged, unique):
    """A cgroup v2 child of this session's own (never the root cgroup), removed afterwards.
    Whatever runs in it must have exited by then: removing it detaches every program."""
    path = os.path.join(CGROUP_PARENT, f"ciliumpy-test-{unique}")
    os.mkdir(path)
    try:
        yield path
    finally:
        deadline = time.monotonic() + 10
        while cgroup_pids(path) and time.monotonic() < deadline:
            time.sleep(0.05)  # a client still exiting
        os.rmdir(path)


def cgroup_pids(path: str) -> list[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(line) for line in f.read().split()]


@pytest.fixture(scope="session")
def sock_lab(privileged, unique, tmp_path_factory, session_cgroup):
    """A second lab node whose agent attaches the socket-LB hooks to `session_cgroup`."""
    with running_lab(unique, tmp_path_factory, index=232, suffix="s",
                     agent_args=("--cgroup-root", session_cgroup)) as made:
        made.cgroup = session_cgroup
        yield made


@pytest.fixture
def clean_lab(lab):
    lab.reset()
    yield lab
    lab.reset()
