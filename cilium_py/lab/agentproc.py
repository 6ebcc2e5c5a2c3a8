"""Running `ciliumpy agent` as a child process: the one spawner of the lab, the demos, the
tests and the benchmarks.

An agent counts as started when its ready file holds its pid (cilium_py.agent.paths).
A detached agent (the lab's) runs in a session of its own and keeps running after the
process that started it exits; later commands stop it by pid (`stop_pid`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from cilium_py.agent.paths import RunPaths
from cilium_py.lab.node import LabNode
from cilium_py.lab.process import alive, stop_pid


class AgentProcessError(RuntimeError):
    pass


class AgentProcess:
    def __init__(self, *, node: str, bpf_root: str, run_dir: str, node_netns: str,
                 devices: tuple[str, ...] = (), node_ips: tuple[str, ...] = (),
                 extra_args: tuple[str, ...] = (), log_path: str | None = None,
                 detached: bool = False, poll_interval: float = 0.02):
        self.node = node
        self.run_dir = run_dir
        self.paths = RunPaths(run_dir, node)
        self.argv = [sys.executable, "-m", "cilium_py.cli.main", "agent", "--node", node,
                     "--bpf-root", bpf_root, "--run-dir", run_dir, "--node-netns", node_netns,
                     "--xdp-mode", "native", *extra_args]
        for dev in devices:
            self.argv += ["--device", dev]
        for ip in node_ips:
            self.argv += ["--node-ip", ip]
        self.log_path = str(log_path or os.path.join(run_dir, f"{node}-agent.log"))
        self.detached = detached
        self.poll_interval = poll_interval
        self.proc: subprocess.Popen | None = None
        self.ready_seconds = 0.0  # spawn to ready, of the last start

    @classmethod
    def for_node(cls, node: LabNode, *, bpf_root: str, run_dir: str,
                 devices: tuple[str, ...] = ("eth0",), node_ips: tuple[str, ...] | None = None,
                 **options) -> "AgentProcess":
        """The agent of a lab node: its namespace, and by default its uplink as the device
        and the router and uplink addresses as the node's own."""
        if node_ips is None:
            node_ips = (str(node.router_ip), str(node.addressing.uplink_ip))
        return cls(node=node.name, bpf_root=bpf_root, run_dir=run_dir, node_netns=node.netns,
                   devices=devices, node_ips=node_ips, **options)

    @property
    def ready_file(self) -> str:
        return self.paths.ready_file

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def start(self, timeout: float = 60.0) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        log = open(self.log_path, "ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=self.detached)
        log.close()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self._ready():
                self.ready_seconds = time.monotonic() - started
                return
            if self.proc.poll() is not None:
                raise AgentProcessError(f"agent exited with {self.proc.returncode}; its log:\n{self.log_tail()}")
            time.sleep(self.poll_interval)
        self.stop()
        raise AgentProcessError(f"agent not ready within {timeout}s; its log:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with open(self.ready_file) as f:
                return f.read().strip() == str(self.proc.pid)
        except FileNotFoundError:
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and alive(self.proc.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_pid(self.proc.pid, timeout)
        self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
