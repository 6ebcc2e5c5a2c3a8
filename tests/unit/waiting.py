"""Waiting for a condition in a test, instead of sleeping for a guessed time."""

from __future__ import annotations

import threading
import time


def poll(condition, timeout: float = 10.0) -> bool:
    """True once `condition()` holds, False when it still does not after `timeout` s."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.01)
    return True
