"""What every benchmark shares: the result row, a run-wide token for names of namespaces
and pins, and cleanup helpers that never touch what this run did not create."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import statistics
import time
import uuid
from dataclasses import dataclass, field

BPFFS = "/sys/fs/bpf"
TOKEN = os.environ.get("CILIUMPY_BENCH_TOKEN") or uuid.uuid4().hex[:6]


@dataclass
class Result:
    """One row of the summary. `ratio` is measured / baseline when there is a baseline;
    `met` is None for figures that are only reported."""

    benchmark: str
    measured: str
    baseline: str = "-"
    ratio: float | None = None
    target: str = "-"
    met: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ratio_text(self) -> str:
        return "-" if self.ratio is None else f"{self.ratio:.2f}x"

    @property
    def met_text(self) -> str:
        return "-" if self.met is None else ("yes" if self.met else "no")


def bpf_root(bench: str) -> str:
    """A bpffs directory of this run and benchmark (lab cleanup knows ciliumpy-bench*)."""
    return os.path.join(BPFFS, f"ciliumpy-bench-{TOKEN}-{bench}")


def remove_bpf_root(path: str) -> None:
    if os.path.basename(path).startswith("ciliumpy-bench-"):
        shutil.rmtree(path, ignore_errors=True)


def stop_process(proc, timeout: float = 10.0) -> None:
    """SIGTERM a process this benchmark started (by its pid), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_listening(ns: str, port: int, timeout: float = 5.0) -> None:
    """Returns once a TCP socket listens on `port` in namespace `ns` (a server this
    benchmark started, iperf3's say, which prints nothing when it is ready)."""
    from cilium_py.datapath import netns

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = netns.run(ns, ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on TCP {port} in {ns} after {timeout:g} s")


def iperf(server_ns: str, client_ns: str, ip: str, seconds: int, *, server_port: int = 5201,
          port: int | None = None) -> float:
    """One iperf3 TCP stream from `client_ns` to ip:`port` (default: `server_port`, where
    the iperf3 server in `server_ns` listens; they differ through a NodePort), the server
    on CPU 1 and the client on CPU 0. Returns the Gbit/s received."""
    from cilium_py.datapath import netns

    port = port or server_port
    server = netns.popen(server_ns, ["taskset", "-c", "1", "iperf3", "-s", "-1", "-p", str(server_port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(server_ns, server_port)
        client = netns.popen(client_ns, ["taskset", "-c", "0", "iperf3", "-c", ip, "-p", str(port),
                                         "-t", str(seconds), "-J"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = client.communicate(timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            stop_process(client, timeout=2)
            raise RuntimeError(f"iperf3 to {ip}:{port} hung") from None
        data = json.loads(out or "{}")
        if client.returncode != 0 or "error" in data:
            raise RuntimeError(f"iperf3 to {ip}:{port}: {data.get('error') or err.strip()}")
        server.wait(timeout=10)
        return data["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        stop_process(server, timeout=5)


def median(values) -> float:
    return float(statistics.median(values))


def fmt_ns(ns: float) -> str:
    return f"{ns:.0f} ns"
