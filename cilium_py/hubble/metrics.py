"""Hubble's flow metrics (`--hubble-metrics drop,tcp,flow,icmp,port-distribution`), named and
labelled as Cilium's Hubble names them, on a registry of their own.

`HubbleMetrics.process` runs once per flow on the parser thread, so it is built for speed:
every handler keys a dict by the flow's raw numbers and caches the bound `inc` of the labelled
child it resolved the first time; label strings are built once per distinct key, never per
flow. Label sets stay bounded by the enums (and, for port-distribution, the port space).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter

from cilium_py.datapath.maps.events import EVENT_TRACE
from cilium_py.datapath.reasons import TRACE_POINTS, drop_reason_name
from cilium_py.hubble.api.flow import flow_pb2
from cilium_py.hubble.filters import PORTED_L4_FIELDS

_FORWARDED = flow_pb2.FORWARDED
_DROPPED = flow_pb2.DROPPED
_REDIRECTED = flow_pb2.REDIRECTED


# gopacket's names, which is what Hubble's icmp metric reports.
_ICMPV4_TYPES = {
    0: "EchoReply", 3: "DestinationUnreachable", 4: "SourceQuench", 5: "Redirect",
    8: "EchoRequest", 9: "RouterAdvertisement", 10: "RouterSolicitation", 11: "TimeExceeded",
    12: "ParameterProblem", 13: "TimestampRequest", 14: "TimestampReply", 15: "InfoRequest",
    16: "InfoReply", 17: "AddressMaskRequest", 18: "AddressMaskReply",
}
_ICMPV6_TYPES = {
    1: "DestinationUnreachable", 2: "PacketTooBig", 3: "TimeExceeded", 4: "ParameterProblem",
    128: "EchoRequest", 129: "EchoReply", 130: "MLDv1MulticastListenerQuery",
    131: "MLDv1MulticastListenerReport", 132: "MLDv1MulticastListenerDone",
    133: "RouterSolicitation", 134: "RouterAdvertisement", 135: "NeighborSolicitation",
    136: "NeighborAdvertisement", 137: "Redirect", 143: "MLDv2MulticastListenerReport",
}
_ICMP = {"ICMPv4": ("IPv4", _ICMPV4_TYPES), "ICMPv6": ("IPv6", _ICMPV6_TYPES)}

# Layer4 oneof member names double as Hubble's protocol label values.
_UNKNOWN_PROTOCOL = "Unknown flow"  # Hubble's FlowProtocol() for flows without L4

_TCP_FLAG_NAMES = tuple(f.name for f in flow_pb2.TCPFlags.DESCRIPTOR.fields)


def _enum_name(enum, number: int) -> str:
    try:
        return enum.Name(number)
    except ValueError:  # proto3 enums are open: a newer datapath may send numbers we lack
        return str(number)


def _drop_reason(number: int) -> str:
    try:
        return flow_pb2.DropReason.Name(number)
    except ValueError:
        return drop_reason_name(number)


# Every handler's process(flow, verdict, l4, l4_protocol): the last three are read once per
# flow by HubbleMetrics.process and shared, since most handlers need them.
Process = Callable[[object, int, object, "str | None"], None]


class _Handler:
    def __init__(self, registry: CollectorRegistry):
        self._incs: dict = {}

    def process(self, flow, verdict: int, l4, proto: str | None) -> None:
        raise NotImplementedError


_EVENT_DROP = 1


class DropHandler(_Handler):
    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.drops = Counter("hubble_drop", "Number of drops", ["reason", "protocol"],
                             registry=registry)

    def process(self, flow, verdict, l4, proto):
        # A denied packet yields a DROPPED policy verdict and the drop itself; counting the
        # drop events only counts each dropped packet once.
        if verdict != _DROPPED or flow.event_type.type != _EVENT_DROP:
            return
        # drop_reason_desc is what Hubble reads; the deprecated number covers a parser that
        # fills only that.
        key = (flow.drop_reason_desc or flow.drop_reason, proto)
        inc = self._incs.get(key)
        if inc is None:
            inc = self.drops.labels(_drop_reason(key[0]), proto or _UNKNOWN_PROTOCOL).inc
            self._incs[key] = inc
        inc()


class TcpHandler(_Handler):
    """One count per flag set on a forwarded TCP packet (as Hubble, forwarded only: a dropped
    SYN and its retransmissions are the drop metric's business)."""

    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.flags = Counter("hubble_tcp_flags", "TCP flag occurrences", ["flag", "family"],
                             registry=registry)

    def process(self, flow, verdict, l4, proto):
        if verdict != _FORWARDED or proto != "TCP":
            return
        flags = l4.TCP.flags
        # The serialized flags are a cheaper key than reading nine booleans, and identical
        # flag sets serialize identically.
        key = (flow.IP.ipVersion, flags.SerializeToString())
        incs = self._incs.get(key)
        if incs is None:
            family = _enum_name(flow_pb2.IPVersion, key[0])
            incs = tuple(self.flags.labels(name, family).inc
                         for name in _TCP_FLAG_NAMES if getattr(flags, name))
            self._incs[key] = incs
        for inc in incs:
            inc()


class FlowHandler(_Handler):
    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.flows = Counter("hubble_flows_processed", "Total number of flows processed",
                             ["type", "subtype", "verdict"], registry=registry)

    def process(self, flow, verdict, l4, proto):
        event = flow.event_type
        key = (flow.Type, event.type, event.sub_type, verdict)
        inc = self._incs.get(key)
        if inc is None:
            flow_type, event_type, sub_type, _ = key
            subtype = TRACE_POINTS.get(sub_type, str(sub_type)) if event_type == EVENT_TRACE else ""
            inc = self.flows.labels(_enum_name(flow_pb2.FlowType, flow_type), subtype,
                                    _enum_name(flow_pb2.Verdict, verdict)).inc
            self._incs[key] = inc
        inc()


class IcmpHandler(_Handler):
    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.icmp = Counter("hubble_icmp", "Number of ICMP messages", ["family", "type"],
                            registry=registry)

    def process(self, flow, verdict, l4, proto):
        if proto not in _ICMP:
            return
        key = (proto, getattr(l4, proto).type)
        inc = self._incs.get(key)
        if inc is None:
            family, names = _ICMP[proto]
            inc = self.icmp.labels(family, names.get(key[1], str(key[1]))).inc
            self._incs[key] = inc
        inc()


class PortDistributionHandler(_Handler):
    """Destination ports of forwarded requests. As Hubble, a flow counts only when it is known
    not to be a reply (is_reply set and false): counting replies, or flows whose direction is
    unknown, would report clients' ephemeral ports as services."""

    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.ports = Counter("hubble_port_distribution", "Numbers of packets distributed by "
                             "destination port", ["protocol", "port"], registry=registry)

    def process(self, flow, verdict, l4, proto):
        if (verdict != _FORWARDED and verdict != _REDIRECTED) or proto not in PORTED_L4_FIELDS:
            return
        if not flow.HasField("is_reply") or flow.is_reply.value:
            return
        key = (proto, getattr(l4, proto).destination_port)
        inc = self._incs.get(key)
        if inc is None:
            inc = self.ports.labels(proto, str(key[1])).inc
            self._incs[key] = inc
        inc()


HANDLERS: dict[str, type[_Handler]] = {
    "drop": DropHandler,
    "tcp": TcpHandler,
    "flow": FlowHandler,
    "icmp": IcmpHandler,
    "port-distribution": PortDistributionHandler,
}


def parse_enabled(value: str | Iterable[str]) -> list[str]:
    """Metric names from "drop,tcp flow" (commas and/or spaces) or a list; order kept,
    repeats dropped. Unknown names raise ValueError listing the valid ones."""
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        for name in re.split(r"[\s,]+", item.strip()):
            if name and name not in names:
                names.append(name)
    valid = ", ".join(HANDLERS)
    for name in names:
        if ":" in name:
            raise ValueError(f"hubble metric {name!r}: metric options (after ':') are not "
                             f"supported; valid metrics: {valid}")
        if name not in HANDLERS:
            raise ValueError(f"unknown hubble metric {name!r}; valid metrics: {valid}")
    return names


class HubbleMetrics:
    def __init__(self, enabled: str | Iterable[str]):
        self.enabled = parse_enabled(enabled)
        self.registry = CollectorRegistry()
        self.handlers = {name: HANDLERS[name](self.registry) for name in self.enabled}
        self._process: tuple[Process, ...] = tuple(h.process for h in self.handlers.values())

    def process(self, flow: flow_pb2.Flow) -> None:
        if not self._process:
            return
        l4 = flow.l4
        proto = l4.WhichOneof("protocol")
        verdict = flow.verdict
        for handle in self._process:
            handle(flow, verdict, l4, proto)
