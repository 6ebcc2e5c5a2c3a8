"""Processes the lab started and knows only by pid: the agent of a lab that `lab up`
left running, and the listeners the agent started for its pods."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its /proc status says so.
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def read_pid(path: str | os.PathLike) -> int:
    """The pid in a pidfile; 0 when there is none or it is unreadable."""
    try:
        return int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def stop_pid(pid: int, timeout: float | None = 10.0) -> bool:
    """SIGTERM, then SIGKILL if it outlives `timeout` (None: SIGTERM only, no waiting);
    returns whether it was running."""
    if not alive(pid):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    if timeout is None:
        return True
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True
