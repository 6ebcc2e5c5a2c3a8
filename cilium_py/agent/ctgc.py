"""Conntrack garbage collection: the LRU maps evict under pressure, but an expired entry
would otherwise sit in the table (and `bpf ct list`) until then."""

from __future__ import annotations

import logging
import threading

from cilium_py.datapath.maps.conntrack import ConntrackTables

log = logging.getLogger(__name__)


class ConntrackGC:
    def __init__(self, pin_dir: str, interval: float):
        self.tables = ConntrackTables.shared(pin_dir)
        self.interval = interval
        self.runs = 0
        self.removed_total = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        removed = self.tables.gc()
        self.runs += 1
        self.removed_total += removed
        if removed:
            log.info("conntrack GC removed %d expired entries", removed)
        return removed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ct-gc", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except OSError:
                log.exception("conntrack GC pass failed; retrying next interval")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.tables.close()
