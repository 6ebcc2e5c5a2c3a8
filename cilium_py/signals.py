"""Running a long-lived component (the agent, the operator) in the foreground until SIGTERM
or SIGINT, then stopping it: one place for what `ciliumpy agent` and `ciliumpy operator`
share. Signals only set an event; the stop runs on the main thread, not in the handler."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def run_until_signalled(start: Callable[[], object], stop: Callable[[], object]) -> None:
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    start()
    try:
        done.wait()
    finally:
        stop()
