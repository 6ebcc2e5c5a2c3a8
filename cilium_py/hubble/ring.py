"""The ring of recent flows the Observer serves from.

One writer (the parser thread) and any number of readers. Every entry gets a sequence
number; a reader remembers the last one it saw and asks for what came after. Writing never
waits for readers: a reader that falls more than `capacity` entries behind is told how
many it missed (a LostEvent of source HUBBLE_RING_BUFFER) and continues from the oldest
entry still held.
"""

from __future__ import annotations

import threading
import time

from cilium_py.hubble.api.flow import flow_pb2 as F

DEFAULT_CAPACITY = 4095
MAX_CAPACITY = (1 << 20) - 1


class Entry:
    """A flow (or a LostEvent) with its sequence number. `wire` caches the serialized
    GetFlowsResponse, built by the first reader that sends it and shared by the others."""

    __slots__ = ("seq", "event", "time_ns", "wire")

    def __init__(self, seq: int, event, time_ns: int):
        self.seq = seq
        self.event = event
        self.time_ns = time_ns
        self.wire = None

    @property
    def is_flow(self) -> bool:
        return isinstance(self.event, F.Flow)


class FlowRing:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"flow ring capacity must be between 1 and {MAX_CAPACITY}, not {capacity!r}")
        self.capacity = capacity
        self._slots: list[Entry | None] = [None] * capacity
        self._next = 0               # sequence number of the next entry written
        self.seen_flows = 0          # flows written since start, including overwritten ones
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return min(self._next, self.capacity)

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest entry, -1 when empty."""
        return self._next - 1

    def write(self, events, time_ns: int | None = None) -> None:
        """Appends flows or LostEvents, oldest first, and wakes the followers."""
        if not events:
            return
        now = time.time_ns() if time_ns is None else time_ns
        slots, cap = self._slots, self.capacity
        with self._cond:
            seq = self._next
            for event in events:
                if isinstance(event, F.Flow):
                    ts = event.time.seconds * 1_000_000_000 + event.time.nanos
                    self.seen_flows += 1
                else:
                    ts = now
                slots[seq % cap] = Entry(seq, event, ts)
                seq += 1
            self._next = seq
            self._cond.notify_all()

    def read_after(self, seq: int | None, limit: int = 0) -> tuple[list[Entry], int]:
        """Entries newer than `seq` (None: every entry held), oldest first, and how many
        were overwritten before the reader got to them."""
        with self._cond:
            newest = self._next
            oldest = max(0, newest - self.capacity)
            start = oldest if seq is None else seq + 1
            lost = 0
            if start < oldest:
                lost, start = oldest - start, oldest
            end = newest if not limit else min(newest, start + limit)
            slots, cap = self._slots, self.capacity
            return [slots[i % cap] for i in range(start, end)], lost

    def wait_after(self, seq: int, timeout: float) -> bool:
        """Blocks until an entry newer than `seq` exists (True) or the timeout passes."""
        with self._cond:
            if self._next - 1 > seq or self._closed:
                return self._next - 1 > seq
            self._cond.wait(timeout)
            return self._next - 1 > seq

    def close(self) -> None:
        """Wakes every waiting reader so servers can shut down promptly."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
