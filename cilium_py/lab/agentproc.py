"""Running `ciliumpy agent` as a child process for the lab, the demo and the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


class AgentProcessError(RuntimeError):
    pass


class AgentProcess:
    def __init__(self, *, node: str, bpf_root: str, run_dir: str, node_netns: str,
                 devices: tuple[str, ...] = (), node_ips: tuple[str, ...] = (),
                 extra_args: tuple[str, ...] = (), log_path: str | None = None):
        self.node = node
        self.run_dir = run_dir
        self.argv = [sys.executable, "-m", "cilium_py.cli.main", "agent", "--node", node,
                     "--bpf-root", bpf_root, "--run-dir", run_dir, "--node-netns", node_netns,
                     "--xdp-mode", "native", *extra_args]
        for dev in devices:
            self.argv += ["--device", dev]
        for ip in node_ips:
            self.argv += ["--node-ip", ip]
        self.log_path = log_path or os.path.join(run_dir, f"{node}-agent.log")
        self.proc: subprocess.Popen | None = None

    @property
    def ready_file(self) -> str:
        return os.path.join(self.run_dir, self.node, "agent.ready")

    def start(self, timeout: float = 60.0) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.ready_file):
                with open(self.ready_file) as f:
                    if f.read().strip() == str(self.proc.pid):
                        return
            if self.proc.poll() is not None:
                raise AgentProcessError(f"agent exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            time.sleep(0.02)
        self.stop()
        raise AgentProcessError(f"agent not ready after {timeout}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
