"""Hubble inside the agent: datapath event batches -> parser -> flow ring -> Observer
server, plus the Prometheus metrics fed by the same flows.

Everything per event runs on the event-reader thread (parse, ring write, metric
updates); gRPC clients only read the ring, on their own threads. Losses are never
silent: records the datapath could not queue (ciliumpy_events_lost, perf-reported
losses) and records that did not parse become LostEvents in the ring and counters in
the metrics.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from cilium_py.datapath.maps.events import EventsLostMap
from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.nodeview import NodeView
from cilium_py.hubble.observer import ObserverServer
from cilium_py.hubble.parser import Parser
from cilium_py.hubble.ring import DEFAULT_CAPACITY, FlowRing

log = logging.getLogger(__name__)

LOST_CHECK_SECONDS = 1.0


@dataclass
class HubbleConfig:
    enabled: bool = True
    socket: str = ""                 # unix socket of the Observer server ("" = none)
    listen_address: str = ""         # optional TCP address, e.g. ":4244"
    ring_capacity: int = DEFAULT_CAPACITY
    metrics: tuple[str, ...] = ()    # Hubble flow metrics to enable (drop, tcp, flow, ...)
    metrics_address: str = ""        # where the Hubble flow metrics are served


class Hubble:
    """`node_view` names the flows' endpoints, identities, policies and services (the
    daemon passes an agent/nodeview.AgentNodeView; None names nothing). Its owner closes it."""

    def __init__(self, config: HubbleConfig, node_name: str, pin_dir: str,
                 node_view: NodeView | None = None, flow_observers=()):
        self.config = config
        self.pin_dir = pin_dir
        self.ring = FlowRing(config.ring_capacity)
        self.parser = Parser(node_name, node_view)
        # Callables given every parsed flow (metrics); they run on the reader thread.
        self.flow_observers = list(flow_observers)
        self.server = None
        if config.socket or config.listen_address:
            self.server = ObserverServer(self.ring, node_name, unix_socket=config.socket,
                                         tcp_address=config.listen_address)
        self.lost = {"datapath": 0, "parse": 0}
        self.consumer_failures = 0   # records of batches whose processing raised
        self._datapath_lost_seen: int | None = None
        self._perf_lost_fn = lambda: 0
        self._lost_map = EventsLostMap.shared(pin_dir)  # read every LOST_CHECK_SECONDS: kept open
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_perf_lost_source(self, fn) -> None:
        self._perf_lost_fn = fn

    def on_batch(self, records: list[bytes]) -> None:
        flows = self.parser.parse_batch(records)
        self.ring.write(flows)
        for observe in self.flow_observers:
            for flow in flows:
                observe(flow)

    def check_lost(self) -> None:
        """Turns new datapath and parse losses into LostEvents in the ring."""
        total = self._lost_map.total() + self._perf_lost_fn()
        if self._datapath_lost_seen is None:
            self._datapath_lost_seen = total  # losses from before this agent are not ours
        events = []
        if total > self._datapath_lost_seen:
            delta = total - self._datapath_lost_seen
            self.lost["datapath"] += delta
            events.append(F.LostEvent(source=F.PERF_EVENT_RING_BUFFER, num_events_lost=delta))
            self._datapath_lost_seen = total
        parse_errors = self.parser.errors + self.consumer_failures
        if parse_errors > self.lost["parse"]:
            events.append(F.LostEvent(source=F.OBSERVER_EVENTS_QUEUE,
                                      num_events_lost=parse_errors - self.lost["parse"]))
            self.lost["parse"] = parse_errors
        if events:
            log.warning("hubble: %s", ", ".join(f"{e.num_events_lost} events lost "
                                              f"({F.LostEventSource.Name(e.source)})" for e in events))
            self.ring.write(events)

    def _watch_losses(self) -> None:
        while not self._stop.wait(LOST_CHECK_SECONDS):
            try:
                self.check_lost()
            except Exception:  # noqa: BLE001 - a failed check must not end the watcher
                log.exception("hubble: checking lost events failed")

    def start(self) -> None:
        self.check_lost()
        if self.server is not None:
            self.server.start()
        self._thread = threading.Thread(target=self._watch_losses, name="hubble-lost", daemon=True)
        self._thread.start()

    def status(self) -> dict:
        return {"enabled": True, "socket": self.config.socket,
                "listen_address": self.config.listen_address,
                "tcp_port": self.server.tcp_port if self.server else 0,
                "flows": len(self.ring), "max_flows": self.ring.capacity,
                "seen_flows": self.ring.seen_flows, "lost": dict(self.lost)}

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()
        self.ring.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._lost_map.close()
