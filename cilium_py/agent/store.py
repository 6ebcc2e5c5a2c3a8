"""One in-memory store of typed Kubernetes-style objects (cilium_py.agent.objects), fed by
the sources, which build them with the kinds' parsers.

Subscribers are called with (event, old, new) on a small pool of worker threads. Every
key hashes to one worker, so the changes to one object reach a subscriber in the order
they happened, while a slow handler for one object does not hold up the others (except
those that share its worker). Handlers run outside the store lock and may read or write
the store.

An upsert of an object equal to the stored one (every parsed field, including the file it
came from) is not an event: sources re-read everything and would otherwise make every
controller redo its work on each pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable

# The store holds the typed objects of cilium_py.agent.objects; `Resource` is their base.
from cilium_py.agent.objects.base import Key, Resource

log = logging.getLogger(__name__)

Callback = Callable[[str, "Resource | None", "Resource | None"], None]

__all__ = ["DELETE", "UPSERT", "Callback", "Key", "Resource", "Store"]

UPSERT = "upsert"
DELETE = "delete"


class Store:
    def __init__(self, workers: int = 4):
        self._lock = threading.Lock()
        self._objects: dict[Key, Resource] = {}
        self._subscribers: list[Callback] = []
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self.callback_errors = 0
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(max(1, workers))]
        self._threads = [threading.Thread(target=self._work, args=(q,), name=f"store-worker-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    # -- objects -------------------------------------------------------------------

    def upsert(self, res: Resource) -> bool:
        """Stores `res`; returns False (and notifies nobody) when nothing changed."""
        with self._lock:
            old = self._objects.get(res.key)
            if old == res:
                return False
            self._objects[res.key] = res
            self._notify(UPSERT, old, res, self._subscribers)
            return True

    def delete(self, key: Key) -> Resource | None:
        with self._lock:
            old = self._objects.pop(tuple(key), None)
            if old is not None:
                self._notify(DELETE, old, None, self._subscribers)
            return old

    def get(self, key: Key) -> Resource | None:
        with self._lock:
            return self._objects.get(tuple(key))

    def list(self, kind: str | None = None) -> list[Resource]:
        with self._lock:
            return [r for k, r in sorted(self._objects.items()) if kind is None or k[0] == kind]

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    # -- subscribers ---------------------------------------------------------------

    def subscribe(self, callback: Callback, replay: bool = True) -> Callable[[], None]:
        """Registers `callback`; with `replay` it first gets an upsert (old None) for
        every stored object, ordered before any later change of that object. Returns a
        function that unsubscribes."""
        with self._lock:
            self._subscribers = self._subscribers + [callback]
            if replay:
                for res in sorted(self._objects.values(), key=lambda r: r.key):
                    self._notify(UPSERT, None, res, [callback])

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [c for c in self._subscribers if c is not callback]

        return unsubscribe

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until every queued notification has been handled. Must not be called
        from a subscriber (it would wait for itself)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True

    def close(self) -> None:
        """Stops the workers after they finish what is queued."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)

    # -- internals -----------------------------------------------------------------

    def worker_index(self, key: Key) -> int:
        # crc32 rather than hash(): the same key lands on the same worker in every run,
        # which makes ordering problems reproducible.
        return zlib.crc32("\x00".join(key).encode()) % len(self._queues)

    def _notify(self, event: str, old: Resource | None, new: Resource | None,
                callbacks: list[Callback]) -> None:
        # Called with the lock held so that queue order equals store-change order.
        if not callbacks:
            return
        key = (new or old).key
        self._pending += 1
        self._queues[self.worker_index(key)].put((tuple(callbacks), event, old, new))

    def _work(self, q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            callbacks, event, old, new = item
            try:
                for cb in callbacks:
                    try:
                        cb(event, old, new)
                    except Exception:  # noqa: BLE001 - one broken handler must not stop the others
                        with self._lock:
                            self.callback_errors += 1
                        log.exception("store subscriber %r failed on %s %s",
                                      getattr(cb, "__qualname__", cb), event, (new or old).describe())
            finally:
                with self._idle:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.notify_all()
