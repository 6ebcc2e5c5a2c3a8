"""One reconcile loop for the agent's controllers (policy/endpoints, services, later nodes).

Store callbacks only *mark* what changed: a key in a named dirty set, and the revision
moves. One thread per controller then takes the dirty sets and calls the controller's
`reconcile(dirty, revision)`, coalescing bursts. When it returns, that revision is
realized and `wait_for_revision` callers wake.

One retry rule, kopf's: an exception means "retry" unless it is a `PermanentError`.
A failed pass puts what it took back into the dirty sets and runs again after a backoff
that doubles from `RETRY_MIN` to `RETRY_MAX` (a full map must not spin the loop) and
resets on success. A controller that fails for one key but realizes the rest calls
`requeue(set, key)`: that key comes back after its own backoff, while the revision is
realized for everyone else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 0.2, 30.0  # seconds; doubling between the two

Dirty = dict[str, set]


class PermanentError(Exception):
    """Retrying will not help (invalid input); the next change to the object will."""


@dataclass
class ControllerStatus:
    """What `ciliumpy status` shows per controller, as Cilium's controller list does."""

    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_success: float = 0.0

    def succeeded(self) -> None:
        self.consecutive_failures = 0
        self.last_error = ""
        self.last_success = time.time()

    def failed(self, error: str) -> None:
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = error

    def to_dict(self) -> dict:
        return dict(vars(self))


class Backoff:
    """Doubling delays from RETRY_MIN to RETRY_MAX, per key."""

    def __init__(self, first: float = RETRY_MIN, limit: float = RETRY_MAX):
        self.first, self.limit = first, limit
        self._attempts: dict[object, int] = {}

    def next(self, key: object = None) -> float:
        n = self._attempts.get(key, 0)
        self._attempts[key] = n + 1
        return min(self.first * (2 ** n), self.limit)

    def reset(self, key: object = None) -> None:
        self._attempts.pop(key, None)


class Reconciler:
    """The loop, the dirty sets, the revision and the realized condition of one controller.

    `reconcile(dirty, revision)` gets a dict with one set per name in `sets` (what was
    marked since the last pass) and the revision those marks cover. `store`, when given,
    is waited on until idle before each pass, so queued object changes land first.
    `resync_interval`: with nothing marked for that long, `on_resync()` runs and a pass
    follows (drift repair). `lock` is held across each pass, from taking the dirty sets to
    marking the revision realized: two threads running passes (a test's `run_once` next to
    the loop) then realize revisions in order, never a later one before an earlier one's
    changes are written. Give the controller's own lock when its readers must not see a
    pass half done; by default the reconciler has its own."""

    def __init__(self, name: str, reconcile: Callable[[Dirty, int], object], sets: tuple[str, ...],
                 *, store=None, resync_interval: float | None = None,
                 on_resync: Callable[[], object] | None = None, lock=None):
        self.name = name
        self._reconcile = reconcile
        self._set_names = tuple(sets)
        self._store = store
        self._resync_interval = resync_interval
        self._on_resync = on_resync
        self.status = ControllerStatus()
        self.revision = 1
        self._realized_revision = 0
        self._lock = threading.Lock()              # the dirty sets and the revision
        self._pass_lock = lock if lock is not None else threading.RLock()
        self._dirty: Dirty = {n: set() for n in self._set_names}
        self._backoff = Backoff()
        self._realized = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- marking ------------------------------------------------------------------------

    def mark(self, set_name: str, *keys) -> int:
        """Records a change; returns the revision that covers it."""
        with self._lock:
            self._dirty[set_name].update(keys)
            self.revision += 1
            revision = self.revision
        self._wake.set()
        return revision

    def bump(self) -> int:
        """A change with nothing to mark (the next pass still runs)."""
        with self._lock:
            self.revision += 1
            revision = self.revision
        self._wake.set()
        return revision

    def requeue(self, set_name: str, key) -> float:
        """`key` failed in this pass: it comes back after its backoff. Returns the delay."""
        delay = self._backoff.next((set_name, key))
        # Held back until its backoff is over: put into the dirty set now, any other change
        # would retry it at once and a lasting failure (a full map) would run on every pass.
        # A change marked for the key itself still brings it back sooner.
        timer = threading.Timer(delay, self._release, args=(set_name, key))
        timer.daemon = True
        timer.start()
        return delay

    def pending(self, set_name: str) -> set:
        """The keys marked in `set_name` for the next pass (a copy)."""
        with self._lock:
            return set(self._dirty[set_name])

    def _release(self, set_name: str, key) -> None:
        with self._lock:
            self._dirty[set_name].add(key)
        self._wake.set()

    def succeeded(self, set_name: str, key) -> None:
        """`key` went through: its next failure starts from the shortest backoff again."""
        self._backoff.reset((set_name, key))

    def take(self) -> tuple[Dirty, int]:
        """The dirty sets (emptied) and the revision they cover."""
        with self._lock:
            taken, self._dirty = self._dirty, {n: set() for n in self._set_names}
            return taken, self.revision

    def put_back(self, taken: Dirty) -> None:
        with self._lock:
            for name, keys in taken.items():
                self._dirty[name] |= keys

    # -- running ------------------------------------------------------------------------

    def run_once(self) -> object:
        """One pass in the caller's thread (tests, and the loop itself). Raises what the
        controller raised, after putting its dirty sets back."""
        with self._pass_lock:
            taken, revision = self.take()
            self.status.runs += 1
            try:
                result = self._reconcile(taken, revision)
            except Exception as e:
                self.put_back(taken)
                self.status.failed(str(e) or type(e).__name__)
                raise
            self.status.succeeded()
            self._mark_realized(revision)
        return result

    def _mark_realized(self, revision: int) -> None:
        with self._realized:
            self._realized_revision = max(self._realized_revision, revision)
            self._realized.notify_all()

    def start(self, before_first: Callable[[], object] | None = None) -> None:
        """`before_first` runs in the loop's thread before the first pass."""
        self._wake.set()
        self._thread = threading.Thread(target=self._loop, args=(before_first,), name=self.name,
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self, before_first) -> None:
        if before_first is not None:
            try:
                before_first()
            except Exception:  # noqa: BLE001 - go on without it
                log.exception("%s: preparing the first pass failed", self.name)
        while not self._stop.is_set():
            if not self._wake.wait(self._resync_interval) and self._on_resync is not None:
                self._on_resync()
            if self._stop.is_set():
                return
            self._wake.clear()
            if self._store is not None:
                self._store.wait_idle(5.0)
            try:
                self.run_once()
                self._backoff.reset(None)
            except PermanentError as e:
                log.warning("%s: %s (not retried until the next change)", self.name, e)
            except Exception:  # noqa: BLE001 - reported in status; retried after the backoff
                delay = self._backoff.next(None)
                log.exception("%s: pass failed; retrying in %.1fs", self.name, delay)
                if self._stop.wait(delay):
                    return
                self._wake.set()

    # -- waiting ------------------------------------------------------------------------

    @property
    def realized_revision(self) -> int:
        return self._realized_revision

    def wait_for_revision(self, revision: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._realized:
            while self._realized_revision < revision:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._realized.wait(left)
        return True
