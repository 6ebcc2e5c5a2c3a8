"""One node on this machine, for as long as a `with` block: its namespaces, an agent,
endpoints and listeners, all removed at the end, also after a failure or Ctrl-C.

    with running_node(LabNode("t1", 231), bpf_root="/sys/fs/bpf/ciliumpy-test-x",
                      pods={"a": PodSpec(1000, tcp=(80,))}) as node:
        node.pods["a"].ip, node.manager, node.agent, node.client()

The lab (cilium_py.lab.lab), the demos, the netns tests and the benchmarks build their
nodes with it. Whatever it starts is torn down in the reverse order it was made; a `with`
body that wants the node to outlive it (`lab up`) calls `keep()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from cilium_py.agent.client import AgentClient
from cilium_py.agent.endpoints import EndpointHandle, EndpointManager
from cilium_py.agent.paths import RunPaths
from cilium_py.datapath import netns
from cilium_py.datapath.config import DatapathConfig
from cilium_py.lab.agentproc import AgentProcess
from cilium_py.lab.listeners import start_listener
from cilium_py.lab.node import LabNode


@dataclass(frozen=True)
class PodSpec:
    """An endpoint the harness creates itself (no control plane): its identity, and the
    ports a listener answers on inside it (none: no listener)."""

    identity: int
    tcp: tuple[int, ...] = ()
    udp: tuple[int, ...] = ()


class RunningNode:
    """The handle `running_node` yields."""

    def __init__(self, node: LabNode, config: DatapathConfig, run_dir: str, stack: contextlib.ExitStack):
        self.node = node
        self.config = config
        self.run_dir = run_dir
        self.paths = RunPaths(run_dir, node.name)
        self.agent = None  # AgentProcess, or the in-process cilium_py.agent.daemon.Agent
        self.pods: dict[str, EndpointHandle] = {}
        self.listeners: list[subprocess.Popen] = []
        self._stack = stack
        self._manager: EndpointManager | None = None

    @property
    def manager(self) -> EndpointManager:
        """An endpoint manager on the agent's pinned maps, opened on first use."""
        if self._manager is None:
            self._manager = EndpointManager(self.config, self.node.netns, self.node.router_ip)
            self._stack.callback(self._manager.close)
        return self._manager

    def client(self, timeout: float = 60.0) -> AgentClient:
        return AgentClient(self.paths.api_socket, timeout=timeout)

    def on_teardown(self, fn: Callable, *args) -> None:
        """Runs `fn(*args)` at teardown, before what was made earlier is removed."""
        self._stack.callback(fn, *args)

    def listen(self, ns: str, name: str, tcp=(), udp=(), *, detached: bool = False) -> subprocess.Popen:
        """A listener in namespace `ns`, stopped at teardown."""
        proc = start_listener(ns, name, tcp, udp, detached=detached)
        self._stack.callback(_terminate, proc)
        self.listeners.append(proc)
        return proc

    def add_endpoint(self, name: str, spec: PodSpec, n: int | None = None) -> EndpointHandle:
        """Creates endpoint `name` at the node's pod address number `n` (default: the next
        one) and its listener; both are removed at teardown."""
        n = len(self.pods) + 1 if n is None else n
        handle = self.manager.create(name, self.node.addressing.pod_ip(n), spec.identity)
        self.pods[name] = handle
        self._stack.callback(self._delete_endpoint, name)
        if spec.tcp or spec.udp:
            self.listen(handle.netns, name, spec.tcp, spec.udp)
        return handle

    def _delete_endpoint(self, name: str) -> None:
        self.manager.delete(name)
        self.pods.pop(name, None)

    def keep(self) -> None:
        """Leaves everything running past the `with` block: someone else removes it."""
        self._stack.pop_all()


@contextlib.contextmanager
def running_node(node: LabNode, *, bpf_root: str, run_dir: str | None = None,
                 pods: Mapping[str, PodSpec] | None = None, agent: AgentProcess | None = None,
                 agent_args: tuple[str, ...] = (), devices: tuple[str, ...] = ("eth0",),
                 node_ips: tuple[str, ...] | None = None, in_process: bool = False,
                 prepare: Callable[[RunningNode], None] | None = None,
                 ready_timeout: float = 60.0) -> Iterator[RunningNode]:
    """Creates `node`, calls `prepare(handle)` (what must exist before the agent starts;
    it registers its own cleanup with `handle.on_teardown` or `handle.listen`), starts the
    agent and waits until it is ready, then creates `pods` in order, each with its
    listener, and yields the handle.

    The agent is `agent` if given, else an AgentProcess of the node with `agent_args`,
    `devices` and `node_ips` (default: the router and uplink addresses); `in_process` runs
    cilium_py.agent.daemon.Agent in this process instead (its threads, its open programs).
    `run_dir` defaults to a temporary directory, removed at the end. Teardown also removes
    every namespace named after the node and its pins under `bpf_root`."""
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = tempfile.mkdtemp(prefix=f"ciliumpy-{node.name}-run-")
            stack.callback(shutil.rmtree, run_dir, True)
        config = DatapathConfig(node=node.name, bpf_root=bpf_root)
        node.create()  # refuses a node that exists: nothing of another run is removed below
        stack.callback(remove_pins, bpf_root, node.name)
        stack.callback(_remove_namespaces, node)
        handle = RunningNode(node, config, run_dir, stack)
        if prepare is not None:
            prepare(handle)
        if in_process:
            handle.agent = _start_in_process(stack, node, config, run_dir, devices, node_ips)
        else:
            handle.agent = agent or AgentProcess.for_node(node, bpf_root=bpf_root, run_dir=run_dir,
                                                          devices=devices, node_ips=node_ips,
                                                          extra_args=agent_args)
            stack.callback(handle.agent.stop)
            handle.agent.start(ready_timeout)
        for name, spec in (pods or {}).items():
            handle.add_endpoint(name, spec)
        yield handle


def _start_in_process(stack, node: LabNode, config: DatapathConfig, run_dir: str,
                      devices, node_ips):
    from cilium_py.agent.daemon import Agent, AgentConfig

    agent = Agent(AgentConfig(datapath=config, node_netns=node.netns, run_dir=run_dir,
                              devices=tuple(devices),
                              node_ips=node_ips if node_ips is not None
                              else (str(node.router_ip), str(node.addressing.uplink_ip))))
    stack.callback(_close_loaded, agent)
    stack.callback(agent.stop)
    agent.start()
    return agent


def _close_loaded(agent) -> None:
    if agent.loaded is not None:
        agent.loaded.close()


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _remove_namespaces(node: LabNode) -> None:
    """The node's namespaces and every one named after it (pods, peers a test added):
    also what a failed endpoint creation or a crashed agent left."""
    for name in node.owned_namespaces():
        netns.remove(name)


def remove_pins(bpf_root: str, node: str) -> str:
    """Removes a node's pinned maps and programs, and `bpf_root` when no other node's pins
    live there; returns the directory removed ("" when there was none)."""
    pins = DatapathConfig(node=node, bpf_root=bpf_root).pin_dir
    removed = pins if os.path.isdir(pins) else ""
    shutil.rmtree(pins, ignore_errors=True)
    try:
        os.rmdir(bpf_root)
    except OSError:
        pass
    return removed
