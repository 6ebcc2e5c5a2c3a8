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

from cilium_py.agent.labels import format_labels
from cilium_py.datapath.maps.events import EventsLostMap
from cilium_py.datapath.maps.ipcache import IPCacheMap
from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.observer import ObserverServer
from cilium_py.hubble.parser import RESERVED_LABELS, EndpointInfo, Parser, PolicyRef
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


class AgentEnricher:
    """Answers the parser's questions from the control plane's state and the ipcache map.
    Without a control plane (datapath-only agent) only identities are known."""

    def __init__(self, control, pin_dir: str):
        self.control = control
        self._ipcache = IPCacheMap(pin_dir)
        self._by_ip: dict[str, EndpointInfo] = {}
        self._indexed_generation = None

    @property
    def generation(self):
        """Moves whenever an answer may change: endpoints and policies regenerated, or
        service frontends changed."""
        if self.control is None:
            return 0
        services = getattr(self.control, "services", None)
        return (self.control.generation, services.generation if services is not None else 0)

    def _index(self) -> None:
        generation = self.generation
        if generation == self._indexed_generation:
            return
        by_ip = {}
        for key, ep in dict(self.control.endpoints).items():  # a copy: regeneration mutates it
            namespace, _, pod = key.partition("/")
            by_ip[str(ep.handle.ip)] = EndpointInfo(
                id=ep.handle.endpoint_id, identity=ep.identity, namespace=namespace,
                pod_name=pod, labels=tuple(format_labels(ep.labels)))
        self._by_ip, self._indexed_generation = by_ip, generation

    def endpoint(self, ip: str) -> EndpointInfo | None:
        if self.control is None:
            return None
        self._index()
        return self._by_ip.get(ip)

    def identity_of(self, ip: str) -> int:
        try:
            return self._ipcache.get(ip) or 0
        except (OSError, ValueError):
            return 0

    def identity_labels(self, identity: int) -> tuple[str, ...]:
        if identity in RESERVED_LABELS:
            return (RESERVED_LABELS[identity],)
        if self.control is None:
            return ()
        labels = self.control.identities.lookup(identity)
        return tuple(format_labels(labels)) if labels else ()

    def policy(self, cookie: int) -> PolicyRef | None:
        if self.control is None:
            return None
        key = self.control.repo.cookie_key(cookie)
        if not key:
            return None
        kind, namespace, name = key
        return PolicyRef(name=name, namespace=namespace or "", kind=kind)

    def service(self, ip: str, port: int, protocol: int):
        """(name, namespace) of the Service whose frontend ip:port/protocol is."""
        services = getattr(self.control, "services", None)
        return services.frontend_service(ip, port, protocol) if services is not None else None

    def close(self) -> None:
        self._ipcache.close()


class Hubble:
    def __init__(self, config: HubbleConfig, node_name: str, pin_dir: str, control=None,
                 flow_observers=()):
        self.config = config
        self.pin_dir = pin_dir
        self.ring = FlowRing(config.ring_capacity)
        self.enricher = AgentEnricher(control, pin_dir)
        self.parser = Parser(node_name, self.enricher)
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
        self._lost_map = EventsLostMap(pin_dir)  # read every LOST_CHECK_SECONDS: kept open
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
        self.enricher.close()
        self._lost_map.close()
