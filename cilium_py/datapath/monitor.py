"""Reading and decoding datapath events.

`decode()` turns one ring/perf buffer record (struct event, bpf/lib/events.h) into a
MonitorEvent with the captured packet summarized, for `ciliumpy monitor`; `EventReader`
polls the buffer on a thread and hands batches of raw records to the agent, which feeds
them to the monitor relay and to Hubble's parser (cilium_py/hubble/parser.py).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import asdict, dataclass, field

from cilium_py.datapath import reasons
from cilium_py.datapath.packet import PORT_PROTOCOLS, decode_l3l4
from cilium_py.datapath.ringbuf import RingBufferConsumer
from cilium_py.datapath.maps.events import (
    EVENT_DROP,
    EVENT_POLICY_VERDICT,
    EVENT_TRACE,
    EVENT_TYPES,
    PV_FLAG_EGRESS,
    PV_MATCH_SHIFT,
    EventRecord,
)
from cilium_py.vocab import ICMP, protocol_name

log = logging.getLogger(__name__)

RECORD_SIZE = ctypes.sizeof(EventRecord)
TCP_FLAG_NAMES = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"),
                  (0x20, "URG"))


class EventDecodeError(ValueError):
    """A record too short or of an unknown version; the reader counts and skips it."""


@dataclass
class PacketSummary:
    src_ip: str = ""
    dst_ip: str = ""
    protocol: int = 0
    src_port: int = 0
    dst_port: int = 0
    tcp_flags: list[str] = field(default_factory=list)
    icmp_type: int | None = None
    icmp_code: int | None = None

    def line(self) -> str:
        proto = protocol_name(self.protocol).lower()
        if self.protocol == ICMP:
            return f"{self.src_ip} -> {self.dst_ip} icmp type {self.icmp_type} code {self.icmp_code}"
        if self.protocol in PORT_PROTOCOLS:
            flags = (" " + ", ".join(self.tcp_flags)) if self.tcp_flags else ""
            return f"{self.src_ip}:{self.src_port} -> {self.dst_ip}:{self.dst_port} {proto}{flags}"
        return f"{self.src_ip} -> {self.dst_ip} {proto}"


def summarize_packet(data: bytes) -> PacketSummary:
    """Best effort over a capture that may be cut short: fills what the bytes hold."""
    decoded = decode_l3l4(data)
    if decoded is None:
        return PacketSummary()
    src, dst, proto, sport, dport, tcp_flags, icmp_type, icmp_code = decoded
    summary = PacketSummary(src_ip=src, dst_ip=dst, protocol=proto)
    if proto in PORT_PROTOCOLS and sport >= 0:
        summary.src_port, summary.dst_port = sport, dport
        if tcp_flags >= 0:
            summary.tcp_flags = [name for bit, name in TCP_FLAG_NAMES if tcp_flags & bit]
    elif icmp_type >= 0:
        summary.icmp_type, summary.icmp_code = icmp_type, icmp_code
    return summary


@dataclass
class MonitorEvent:
    type: str                 # "drop", "trace" or "policy-verdict"
    source: int               # endpoint ID the event is about
    src_identity: int
    dst_identity: int
    dst_endpoint: int
    ifindex: int
    length: int
    packet: PacketSummary
    drop_reason: int = 0      # drop: Hubble DropReason number
    direction: str = ""       # drop / verdict: INGRESS or EGRESS
    observation_point: str = ""  # trace: to-endpoint / from-endpoint
    ct_state: str = ""        # trace: new / established / reply / related
    verdict: int = 0          # verdict: 0 allowed, else -reason
    match_type: str = ""      # verdict: L3-L4, L4-Only...
    policy_port: int = 0      # verdict: the port (or ICMP type) policy matched on
    rule_cookie: int = 0      # verdict: cookie of the matched entry
    raw: bytes = b""

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("raw")
        if self.type == "drop":
            out["drop_reason_name"] = reasons.drop_reason_name(self.drop_reason)
        return out

    def line(self) -> str:
        """One line in the style of `cilium monitor`."""
        pkt = self.packet.line()
        ids = f"identity {self.src_identity}->{self.dst_identity}"
        if self.type == "drop":
            return (f"xx drop ({reasons.drop_description(self.drop_reason)}) flow {0:#x} to endpoint "
                    f"{self.dst_endpoint}, ifindex {self.ifindex}, {ids}: {pkt}")
        if self.type == "trace":
            arrow = "->" if self.observation_point == "to-endpoint" else "<-"
            return (f"{arrow} endpoint {self.source} flow {0:#x} {ids} state {self.ct_state} "
                    f"ifindex {self.ifindex}: {pkt}")
        action = "allow" if self.verdict == 0 else (
            "deny" if -self.verdict == reasons.POLICY_DENY else "deny (no match)")
        return (f"Policy verdict log: flow {0:#x} local EP ID {self.source}, remote ID "
                f"{self.src_identity}, proto {self.packet.protocol}, {self.direction.lower()}, "
                f"action {action}, match {self.match_type}, {pkt}")


def decode(raw: bytes) -> MonitorEvent:
    if len(raw) < RECORD_SIZE:
        raise EventDecodeError(f"event record of {len(raw)} bytes, expected {RECORD_SIZE}")
    rec = EventRecord.from_buffer_copy(raw[:RECORD_SIZE])
    kind = rec.hdr.type
    if kind not in EVENT_TYPES:
        raise EventDecodeError(f"unknown event type {kind}")
    captured = bytes(rec.data[: min(rec.hdr.len_cap, len(rec.data))])
    event = MonitorEvent(type=EVENT_TYPES[kind], source=rec.hdr.source, src_identity=rec.src_label,
                         dst_identity=rec.dst_label, dst_endpoint=rec.dst_id, ifindex=rec.ifindex,
                         length=rec.hdr.len_orig, packet=summarize_packet(captured), raw=captured)
    if kind == EVENT_DROP:
        event.drop_reason = rec.hdr.subtype
        event.direction = reasons.direction_name(rec.reason)
    elif kind == EVENT_TRACE:
        event.observation_point = reasons.TRACE_POINTS.get(rec.hdr.subtype, str(rec.hdr.subtype))
        event.ct_state = reasons.CT_STATES.get(rec.reason, str(rec.reason))
    elif kind == EVENT_POLICY_VERDICT:
        event.direction = "EGRESS" if rec.flags & PV_FLAG_EGRESS else "INGRESS"
        event.match_type = reasons.MATCH_TYPES.get((rec.flags >> PV_MATCH_SHIFT) & 0x7, "?")
        event.verdict = rec.verdict
        event.policy_port = rec.dst_port
        event.rule_cookie = rec.cookie
        event.dst_identity = 0
    return event


class EventReader:
    """Polls the loaded datapath's event buffer on a daemon thread and hands over whole
    batches of raw records: `on_batch(list[bytes])`. With `on_event`, each record is also
    decoded into a MonitorEvent (records that fail to decode are counted and skipped).

    The ring buffer is read straight from its shared memory (RingBufferConsumer), one
    batch per wake-up; the perf buffer goes through BCC's per-record callbacks, which
    also report the records the kernel could not queue (`perf_lost`).
    """

    def __init__(self, loaded, on_event=None, *, on_batch=None, poll_ms: int = 100):
        self.loaded = loaded
        self.on_event = on_event
        self.on_batch = on_batch
        self.poll_ms = poll_ms
        self.received = 0
        self.batches = 0
        self.decode_errors = 0
        self.perf_lost = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ring: RingBufferConsumer | None = None
        self._pending: list[bytes] = []
        table = loaded.events_table
        if loaded.config.events == "perf":
            table.open_perf_buffer(self._on_perf, page_cnt=256, lost_cb=self._on_lost)
            self._bcc_poll = loaded.bpf.perf_buffer_poll
        elif RingBufferConsumer.supported():
            self._ring = RingBufferConsumer(table.map_fd)
        else:  # BCC's callback reader: slower, but right on any memory model
            table.open_ring_buffer(self._on_ring)
            self._bcc_poll = loaded.bpf.ring_buffer_poll

    def _on_perf(self, cpu, data, size):
        self._pending.append(ctypes.string_at(data, size))

    def _on_ring(self, ctx, data, size):
        self._pending.append(ctypes.string_at(data, size))
        return 0

    def _on_lost(self, count):
        self.perf_lost += count

    def _dispatch(self, records: list[bytes]) -> None:
        self.received += len(records)
        self.batches += 1
        try:
            if self.on_batch is not None:
                self.on_batch(records)
            if self.on_event is not None:
                for raw in records:
                    try:
                        event = decode(raw)
                    except EventDecodeError:
                        self.decode_errors += 1
                        continue
                    self.on_event(event)
        except Exception:  # a consumer bug must not stop the reader
            log.exception("event consumer failed")

    def poll_once(self, timeout_ms: int | None = None) -> int:
        """Waits up to timeout_ms for events and dispatches what arrived; returns the count."""
        timeout = self.poll_ms if timeout_ms is None else timeout_ms
        if self._ring is not None:
            records = self._ring.read() if self._ring.wait(timeout) else []
        else:
            self._bcc_poll(timeout=timeout)
            records, self._pending = self._pending, []
        if records:
            self._dispatch(records)
        return len(records)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="event-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._ring is not None:
            self._ring.close()
            self._ring = None
