"""The agent's Prometheus metrics, named as Cilium names them (`cilium_` -> `ciliumpy_`).

Everything lives on one `CollectorRegistry` per `AgentMetrics`, never the process-wide default
registry, so several agents (and tests) in one process never collide.

Datapath numbers (drops, forwards, buffer losses, map pressure) are not mirrored into Python
counters: `DatapathCollector` reads the pinned maps when Prometheus scrapes, so the values are
the kernel's own and carry across agent restarts exactly as the pinned maps do.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cilium_py.datapath import libbpf
from cilium_py.datapath.maps.base import BpfMap, MapNotFound
from cilium_py.datapath.maps.conntrack import CtAnyMap, CtTcpMap
from cilium_py.datapath.maps.events import EVENT_POLICY_VERDICT, EventsLostMap
from cilium_py.datapath.maps.metrics import MetricsMap
from cilium_py.datapath.maps.policy import PolicyMap
from cilium_py.datapath.reasons import DROP_REASONS, MATCH_TYPES, direction_name, drop_reason_name

log = logging.getLogger(__name__)

# (reason, direction) -> (packets, bytes), summed over CPUs; reason 0 = forwarded.
MetricsReader = Callable[[], dict[tuple[int, int], tuple[int, int]]]

REASON_FORWARDED = 0

# Counting a conntrack table means reading every entry (up to hundreds of thousands), while
# Prometheus scrapes every 15-60s and several scrapers may poll one agent: a scrape within
# this many seconds of the last count reports that count again.
DEFAULT_PRESSURE_INTERVAL = 30.0

# Flow enum numbers (flow.proto), kept as plain ints so this module does not need the
# generated stubs: observe_flow reads fields, it never builds messages.
_TRAFFIC_DIRECTIONS = {1: "ingress", 2: "egress"}
_VERDICT_ACTIONS = {1: "allow", 5: "allow", 4: "audit"}  # FORWARDED, REDIRECTED, AUDIT


@functools.cache
def drop_reason_label(reason: int) -> str:
    """Hubble's DropReason enum name, so the agent's and Hubble's drop metrics agree even for
    reasons the datapath tables in `reasons` do not list yet."""
    if reason in DROP_REASONS:
        return DROP_REASONS[reason]
    try:
        from cilium_py.hubble.api.flow import flow_pb2

        return flow_pb2.DropReason.Name(reason)
    except (ImportError, ValueError):
        return drop_reason_name(reason)


def read_metrics_map(pin_dir: str) -> dict[tuple[int, int], tuple[int, int]]:
    with MetricsMap.shared(pin_dir) as m:
        return {(x.reason, x.direction): (x.packets, x.bytes) for x in m.list()}


def read_events_lost(pin_dir: str) -> int:
    with EventsLostMap.shared(pin_dir) as m:
        return m.total()


def count_entries(bpf_map: BpfMap) -> int:
    """Entries in a (non per-CPU) map. Streams batches instead of `len(items())`, which would
    hold every key and value of a full conntrack table in memory at once."""
    try:
        return sum(1 for _ in libbpf.map_lookup_batch(bpf_map.fd, bpf_map.KEY, bpf_map.VALUE))
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524):  # 524: kernel ENOTSUPP
            raise
    return len(bpf_map.keys())


class MapPressure:
    """Fill ratio (entries / max_entries) of the maps that fill up under load, recounted at
    most every `interval` seconds.

    Tradeoff: between recounts the gauge is up to `interval` seconds stale, and the scrape
    that triggers a recount pays for it (a full read of each table). Conntrack tables are LRU,
    so a ratio near 1 means entries are being evicted rather than inserts failing."""

    MAPS: tuple[type[BpfMap], ...] = (CtTcpMap, CtAnyMap, PolicyMap)

    def __init__(self, pin_dir: str, interval: float = DEFAULT_PRESSURE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.pin_dir = pin_dir
        self.interval = interval
        self._clock = clock
        # Serialises recounts so concurrent scrapes (one HTTP thread each) count once.
        self._lock = threading.Lock()
        self._counted_at: float | None = None
        self._ratios: dict[str, float] = {}

    def __call__(self) -> dict[str, float]:
        with self._lock:
            now = self._clock()
            if self._counted_at is None or now - self._counted_at >= self.interval:
                self._ratios = self._count()
                self._counted_at = now
            return dict(self._ratios)

    def _count(self) -> dict[str, float]:
        ratios = {}
        for cls in self.MAPS:
            try:
                with cls.shared(self.pin_dir) as m:
                    ratios[cls.NAME] = count_entries(m) / m.max_entries if m.max_entries else 0.0
            except MapNotFound:
                continue
        return ratios


class DatapathCollector:
    """Reads the datapath's counters at scrape time. Each reader is injectable so tests (and
    callers without a datapath) can supply numbers; a reader that fails drops only its own
    families from that scrape, instead of failing the whole scrape with a 500."""

    def __init__(self, metrics_reader: MetricsReader,
                 pressure_reader: Callable[[], dict[str, float]],
                 events_lost_reader: Callable[[], int],
                 lost_fn: Callable[[], dict[str, int]] | None = None):
        self.metrics_reader = metrics_reader
        self.pressure_reader = pressure_reader
        self.events_lost_reader = events_lost_reader
        self.lost_fn = lost_fn

    # Families without samples: lets the registry detect name clashes at register() time
    # without touching the maps.
    def describe(self) -> list[Metric]:
        return [*self._traffic_families(), self._pressure_family(), self._lost_family()]

    def collect(self) -> Iterator[Metric]:
        yield from self._collect_traffic()
        yield from self._collect_pressure()
        yield from self._collect_lost()

    @staticmethod
    def _traffic_families():
        return (
            CounterMetricFamily("ciliumpy_drop_count", "Total dropped packets, tagged by drop "
                                "reason and ingress/egress direction", labels=["reason", "direction"]),
            CounterMetricFamily("ciliumpy_drop_bytes", "Total dropped bytes, tagged by drop "
                                "reason and ingress/egress direction", labels=["reason", "direction"]),
            CounterMetricFamily("ciliumpy_forward_count", "Total forwarded packets, tagged by "
                                "ingress/egress direction", labels=["direction"]),
            CounterMetricFamily("ciliumpy_forward_bytes", "Total forwarded bytes, tagged by "
                                "ingress/egress direction", labels=["direction"]),
        )

    @staticmethod
    def _pressure_family():
        return GaugeMetricFamily("ciliumpy_bpf_map_pressure", "Fill ratio of a BPF map "
                                 "(entries / max entries)", labels=["map_name"])

    @staticmethod
    def _lost_family():
        return CounterMetricFamily("ciliumpy_events_lost", "Events lost because a buffer was "
                                   "full, by the buffer that lost them", labels=["source"])

    def _collect_traffic(self) -> Iterator[Metric]:
        try:
            counters = self.metrics_reader()
        except OSError as e:
            _log_read_failure("metrics map", e)
            return
        drop_count, drop_bytes, fwd_count, fwd_bytes = self._traffic_families()
        for (reason, direction), (packets, nbytes) in sorted(counters.items()):
            dir_label = direction_name(direction)
            if reason == REASON_FORWARDED:
                fwd_count.add_metric([dir_label], packets)
                fwd_bytes.add_metric([dir_label], nbytes)
            else:
                labels = [drop_reason_label(reason), dir_label]
                drop_count.add_metric(labels, packets)
                drop_bytes.add_metric(labels, nbytes)
        yield from (drop_count, drop_bytes, fwd_count, fwd_bytes)

    def _collect_pressure(self) -> Iterator[Metric]:
        try:
            ratios = self.pressure_reader()
        except OSError as e:
            _log_read_failure("map pressure", e)
            return
        family = self._pressure_family()
        for name, ratio in sorted(ratios.items()):
            family.add_metric([name], ratio)
        yield family

    def _collect_lost(self) -> Iterator[Metric]:
        lost: dict[str, int] = {}
        try:
            lost["datapath"] = self.events_lost_reader()
        except OSError as e:
            _log_read_failure("events lost map", e)
        if self.lost_fn is not None:
            try:
                extra = self.lost_fn()
            except Exception:  # noqa: BLE001 - another component's callback must not fail the scrape
                log.exception("events-lost callback failed; omitting its sources from this scrape")
                extra = {}
            for source, count in extra.items():
                # One series per source: a repeated name is summed rather than exported twice.
                lost[source] = lost.get(source, 0) + count
        family = self._lost_family()
        for source, count in sorted(lost.items()):
            family.add_metric([source], count)
        yield family


def _call_or_nan(fn: Callable[[], int]) -> float:
    # A gauge callback that raises would turn the whole scrape into an HTTP 500.
    try:
        return float(fn())
    except Exception:  # noqa: BLE001
        log.exception("endpoint count callback failed; reporting NaN")
        return float("nan")


def _log_read_failure(what: str, e: OSError) -> None:
    # Before the agent has loaded the datapath the maps are simply absent; not worth a warning
    # every scrape.
    level = logging.DEBUG if isinstance(e, MapNotFound) else logging.WARNING
    log.log(level, "metrics scrape: cannot read %s: %s", what, e)


class EndpointStates:
    """`ciliumpy_endpoint_state{endpoint_state=...}`, as Cilium's cilium_endpoint_state: an
    endpoint whose policy could not be realized counts as not-ready, so an alert on it
    catches what the regeneration loop retries."""

    STATES = ("ready", "not-ready")

    def __init__(self, states_fn: Callable[[], dict[str, int]]):
        self.states_fn = states_fn

    def describe(self) -> list[Metric]:
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("ciliumpy_endpoint_state", "Number of endpoints by state",
                                 labels=["endpoint_state"])

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.states_fn()
        except Exception as e:  # noqa: BLE001 - this family only, not the whole scrape
            _log_read_failure("endpoint states", e)
            return
        family = self._family()
        for state in sorted(set(self.STATES) | set(counts)):
            family.add_metric([state], counts.get(state, 0))
        yield family


class AgentMetrics:
    """The agent's metrics registry: datapath counters read at scrape time, the endpoint
    count from a callback, and policy verdicts counted from Hubble flows."""

    def __init__(self, pin_dir: str, endpoint_count_fn: Callable[[], int],
                 lost_fn: Callable[[], dict[str, int]] | None = None, *,
                 metrics_reader: MetricsReader | None = None,
                 pressure_reader: Callable[[], dict[str, float]] | None = None,
                 events_lost_reader: Callable[[], int] | None = None,
                 pressure_interval: float = DEFAULT_PRESSURE_INTERVAL,
                 endpoint_states_fn: Callable[[], dict[str, int]] | None = None):
        self.pin_dir = pin_dir
        self.registry = CollectorRegistry()
        if endpoint_states_fn is not None:
            self.registry.register(EndpointStates(endpoint_states_fn))
        self.endpoints = Gauge("ciliumpy_endpoint_count", "Number of endpoints managed by this "
                               "agent", registry=self.registry)
        self.endpoints.set_function(functools.partial(_call_or_nan, endpoint_count_fn))
        self.collector = DatapathCollector(
            metrics_reader or functools.partial(read_metrics_map, pin_dir),
            pressure_reader or MapPressure(pin_dir, pressure_interval),
            events_lost_reader or functools.partial(read_events_lost, pin_dir),
            lost_fn)
        self.registry.register(self.collector)
        self.policy_verdicts = Counter(
            "ciliumpy_policy_verdict", "Number of policy verdicts, by direction, matched rule "
            "type and action", ["direction", "match", "action"], registry=self.registry)
        # observe_flow runs once per flow on the Hubble parser thread: resolving label values
        # and `.labels()` once per distinct (direction, match, verdict) keeps it to a dict hit.
        self._verdict_children: dict[tuple[int, int, int], Callable[[], None]] = {}

    def observe_flow(self, flow) -> None:
        """Counts a policy-verdict flow (event type 5); ignores every other flow."""
        if flow.event_type.type != EVENT_POLICY_VERDICT:
            return
        key = (flow.traffic_direction, flow.policy_match_type, flow.verdict)
        inc = self._verdict_children.get(key)
        if inc is None:
            direction, match, verdict = key
            inc = self.policy_verdicts.labels(
                _TRAFFIC_DIRECTIONS.get(direction, "unknown"),
                MATCH_TYPES.get(match, str(match)).lower(),
                _VERDICT_ACTIONS.get(verdict, "deny")).inc
            self._verdict_children[key] = inc
        inc()


# ---- HTTP endpoint ----------------------------------------------------------------------------

_ADDRESS_FORMS = "expected [host]:port, e.g. ':9962', '127.0.0.1:9962', '[::1]:9962' or 'localhost:0'"


def parse_address(address: str) -> tuple[str, int]:
    """Splits "[host]:port" into (host, port); host "" means every interface."""
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(f"metrics address {address!r} has no port: {_ADDRESS_FORMS}")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"metrics address {address!r}: unbalanced brackets: {_ADDRESS_FORMS}")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"metrics address {address!r}: {host!r} in brackets is not an "
                             f"IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"metrics address {address!r}: put an IPv6 host in brackets, "
                         f"e.g. '[::1]:9962'")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"metrics address {address!r}: port {port_text!r} is not a number "
                         f"from 0 to 65535 (0 picks a free port)")
    return host, int(port_text)


class MetricsServer:
    """A running /metrics HTTP endpoint."""

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.host: str = httpd.server_address[0]
        self.port: int = httpd.server_address[1]  # the bound port, also when asked for port 0

    def stop(self) -> None:
        if self._httpd is None:
            return
        httpd, self._httpd = self._httpd, None
        httpd.shutdown()
        httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def serve(address: str, registry: CollectorRegistry) -> MetricsServer:
    """Serves `registry` over HTTP on a daemon thread. ":port" listens on every interface:
    dual-stack "::" where the host has IPv6 (as Go's ":port" does), else "0.0.0.0"."""
    host, port = parse_address(address)
    if host:
        return _start(registry, address, host, port)
    try:
        return _start(registry, address, "::", port)
    except OSError as e:
        if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
    return _start(registry, address, "0.0.0.0", port)


def _start(registry: CollectorRegistry, address: str, host: str, port: int) -> MetricsServer:
    try:
        httpd, thread = start_http_server(port, host, registry=registry)
    except socket.gaierror as e:
        raise ValueError(f"metrics address {address!r}: cannot resolve {host!r}: "
                         f"{e.strerror}") from None
    except OSError as e:
        raise OSError(e.errno, f"cannot serve metrics on {address}: {e.strerror}") from e
    return MetricsServer(httpd, thread)
