"""A watch that only says "something changed": the operator's controllers list what they
need on every pass (a list is the truth, and cheap at a cluster's count of CiliumNodes), so
they need no cache of their own, only a prompt to run. The reconciler's resync runs a pass
every few seconds anyway, which covers a watch that is down.

List once for the resourceVersion, watch from it with bookmarks, re-open a watch the server
ended from the last resourceVersion seen; 410 Gone relists; a refused or broken watch is
retried after the shared doubling backoff (a kind not served yet, its CRD missing, included).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cilium_py.agent.reconcile import Backoff
from cilium_py.k8s.client import ApiError

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 300   # seconds the server keeps one watch open


class ChangeWatch:
    def __init__(self, kube, kind: str, on_change: Callable[[], object], *,
                 label_selector: str = "", watch_timeout: int = WATCH_TIMEOUT):
        self.kube, self.kind = kube, kind
        self.label_selector = label_selector
        self._on_change = on_change
        self.watch_timeout = watch_timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream = None
        self._thread: threading.Thread | None = None
        self._backoff = Backoff()
        self.events = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()  # shuts the socket down: the reading thread wakes at once
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    page = self.kube.list(self.kind, limit=1,   # only for its resourceVersion
                                          label_selector=self.label_selector)
                    version = str((page.get("metadata") or {}).get("resourceVersion") or "")
                    self._on_change()   # whatever happened while not watching
                version = self._watch(version)
                self._backoff.reset()
            except ApiError as e:
                if e.gone:
                    version = ""
                    continue
                delay = self._backoff.next()
                log.debug("watch %s: %s; again in %.1fs", self.kind, e, delay)
                version = "" if not e.retryable else version
                self._stop.wait(delay)
            except Exception:  # noqa: BLE001 - the watch must keep running
                log.exception("watch %s failed", self.kind)
                version = ""
                self._stop.wait(self._backoff.next())

    def _watch(self, version: str) -> str:
        stream = self.kube.watch(self.kind, version, timeout_seconds=self.watch_timeout,
                                 label_selector=self.label_selector)
        with self._lock:
            if self._stop.is_set():
                stream.close()
                return version
            self._stream = stream
        try:
            for event in stream:
                meta = (event.get("object") or {}).get("metadata") or {}
                version = str(meta.get("resourceVersion") or version)
                if event.get("type") != "BOOKMARK":
                    self.events += 1
                    self._on_change()
        finally:
            with self._lock:
                self._stream = None
        return version

