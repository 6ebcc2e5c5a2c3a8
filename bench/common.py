"""What every benchmark shares: the result row, a run-wide token for names of namespaces
and pins, and cleanup helpers that never touch what this run did not create."""

from __future__ import annotations

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


def median(values) -> float:
    return float(statistics.median(values))


def fmt_ns(ns: float) -> str:
    return f"{ns:.0f} ns"
