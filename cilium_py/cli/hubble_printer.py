"""Text for `hubble observe`, `hubble status` and `hubble list nodes`.

Flow formats (upstream `hubble observe -o ...`):

* compact: `Jan  2 15:04:05.000: shop/web-1:41234 (ID:1234) -> shop/db-0:5432 (ID:5678)
  to-endpoint FORWARDED (TCP Flags: SYN)`. The time is local time in Go's StampMilli
  layout (day padded with a space, like upstream). Replies (is_reply true) print the
  destination first with `<-`; `<>` says the datapath could not tell (is_reply absent).
  An endpoint is `ns/pod:port` when the pod is known, else its service, DNS names or IP.
  Identities print as `(ID:n)`, except reserved ones, which print as their name:
  `10.245.1.2:80 (world)`, `(host)`.
* dict: `KEY: value` lines per flow, keys right-aligned, blocks separated by `------------`.
* json / jsonpb: each GetFlowsResponse as one line of protobuf JSON (camelCase names).
* table: aligned columns, buffered so widths fit the rows; `flush_every` bounds the buffer
  when following, where output must not wait for the end of a stream that never ends.

Event types and names come from cilium-facts §4/§12; drop descriptions are the ones
`ciliumpy monitor` prints.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TextIO

from google.protobuf import json_format

from cilium_py.datapath.reasons import DROP_DESCRIPTIONS, MATCH_TYPES, MESSAGE_TYPES, TRACE_POINTS
from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.api.observer import observer_pb2 as O
from cilium_py.hubble.api.relay import relay_pb2
from cilium_py.hubble.filters import PORTED_L4_FIELDS
from cilium_py.vocab import RESERVED_IDENTITY_NAMES

FORMATS = ("compact", "dict", "json", "jsonpb", "table")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_XLATE_POINTS = {
    F.SOCK_XLATE_POINT_PRE_DIRECTION_FWD: "pre-xlate-fwd",
    F.SOCK_XLATE_POINT_POST_DIRECTION_FWD: "post-xlate-fwd",
    F.SOCK_XLATE_POINT_PRE_DIRECTION_REV: "pre-xlate-rev",
    F.SOCK_XLATE_POINT_POST_DIRECTION_REV: "post-xlate-rev",
}
# The order upstream lists TCP flags in, which is not the field order.
_TCP_FLAG_ORDER = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR", "NS")
_ICMPV4_TYPES = {
    0: "EchoReply", 3: "DestinationUnreachable", 4: "SourceQuench", 5: "Redirect",
    8: "EchoRequest", 9: "RouterAdvertisement", 10: "RouterSolicitation", 11: "TimeExceeded",
    12: "ParameterProblem", 13: "TimestampRequest", 14: "TimestampReply",
}
_ICMPV4_UNREACHABLE = ("Net", "Host", "Protocol", "Port", "FragmentationNeeded",
                       "SourceRoutingFailed", "NetUnknown", "HostUnknown", "SourceIsolated",
                       "NetAdminProhibited", "HostAdminProhibited", "NetTOS", "HostTOS",
                       "CommAdminProhibited", "HostPrecedence", "PrecedenceCutoff")
_ICMPV4_CODES = {3: dict(enumerate(_ICMPV4_UNREACHABLE)),
                 11: {0: "TTLExceeded", 1: "FragmentReassemblyTimeExceeded"}}
_ICMPV6_TYPES = {
    1: "DestinationUnreachable", 2: "PacketTooBig", 3: "TimeExceeded", 4: "ParameterProblem",
    128: "EchoRequest", 129: "EchoReply", 133: "RouterSolicitation", 134: "RouterAdvertisement",
    135: "NeighborSolicitation", 136: "NeighborAdvertisement", 137: "Redirect",
}
_NODE_STATES = {
    relay_pb2.UNKNOWN_NODE_STATE: "Unknown", relay_pb2.NODE_CONNECTED: "Connected",
    relay_pb2.NODE_UNAVAILABLE: "Unavailable", relay_pb2.NODE_GONE: "Gone",
    relay_pb2.NODE_ERROR: "Error",
}


# -- pieces of a flow ---------------------------------------------------------------------

def format_time(ts, tz=None) -> str:
    """A Timestamp -> Go's StampMilli ("Jan _2 15:04:05.000") in local time (or `tz`)."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "N/A"
    dt = datetime.fromtimestamp(ts.seconds, tz)
    return f"{_MONTHS[dt.month - 1]} {dt.day:>2} {dt:%H:%M:%S}.{ts.nanos // 1_000_000:03d}"


def _ports(flow: F.Flow) -> tuple[int, int]:
    kind = flow.l4.WhichOneof("protocol")
    if kind in PORTED_L4_FIELDS:
        layer = getattr(flow.l4, kind)
        return layer.source_port, layer.destination_port
    return 0, 0


def _join_port(host: str, port: int) -> str:
    if not port:
        return host
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def _host(ep: F.Endpoint, ip: str, service: F.Service | None, names: Sequence[str]) -> str:
    """The most useful name for one side: pod, else service, else DNS names, else the IP."""
    if ep.pod_name:
        return f"{ep.namespace}/{ep.pod_name}" if ep.namespace else ep.pod_name
    if service is not None and service.name:
        return f"{service.namespace}/{service.name}" if service.namespace else service.name
    if names:
        return ",".join(names)
    return ip or "N/A"


def source_host(flow: F.Flow) -> str:
    svc = flow.source_service if flow.HasField("source_service") else None
    return _join_port(_host(flow.source, flow.IP.source, svc, flow.source_names), _ports(flow)[0])


def destination_host(flow: F.Flow) -> str:
    svc = flow.destination_service if flow.HasField("destination_service") else None
    return _join_port(_host(flow.destination, flow.IP.destination, svc, flow.destination_names),
                      _ports(flow)[1])


def format_identity(ep: F.Endpoint) -> str:
    """`(ID:1234)`; a reserved identity as its name, `(world)`, the way upstream prints it."""
    name = RESERVED_IDENTITY_NAMES.get(ep.identity)
    if name is None and ep.identity and ep.identity < 256:
        # a reserved identity we have no number for: its reserved: label names it
        name = next((label[len("reserved:"):] for label in ep.labels
                     if label.startswith("reserved:")), None)
    return f"({name})" if name else f"(ID:{ep.identity})"


def drop_reason_code(flow: F.Flow) -> int:
    # drop_reason_desc is the field to read; the deprecated drop_reason, and the subtype
    # of a drop event (only there: other events use it for other things), carry the same
    # number from older producers.
    subtype = flow.event_type.sub_type if flow.event_type.type == 1 else 0
    return flow.drop_reason_desc or flow.drop_reason or subtype


def drop_description(code: int) -> str:
    """"Policy denied": monitor's wording, else the enum name made readable."""
    if code in DROP_DESCRIPTIONS:
        return DROP_DESCRIPTIONS[code]
    try:
        name = F.DropReason.Name(code)
    except ValueError:
        return f"Drop reason {code}"
    return name.replace("_", " ").capitalize()


def flow_type(flow: F.Flow) -> str:
    """The TYPE column: observation point, drop reason, policy-verdict match, xlate point."""
    etype = flow.event_type.type
    if etype == 4:
        return TRACE_POINTS.get(flow.event_type.sub_type, f"trace:{flow.event_type.sub_type}")
    if etype == 1:
        return drop_description(drop_reason_code(flow))
    if etype == 5:
        match = MATCH_TYPES.get(flow.policy_match_type, str(flow.policy_match_type))
        return f"policy-verdict:{match} {F.TrafficDirection.Name(flow.traffic_direction)}"
    if etype == 7 and flow.sock_xlate_point in _XLATE_POINTS:
        return _XLATE_POINTS[flow.sock_xlate_point]
    return MESSAGE_TYPES.get(etype, "UNKNOWN")


def _enum_name(enum, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


def _icmp(kind: str, types: dict, codes: dict, icmp) -> str:
    name = types.get(icmp.type)
    if name is None:
        return f"{kind} type {icmp.type} code {icmp.code}"
    code = codes.get(icmp.type, {}).get(icmp.code)
    return f"{kind} {name}({code})" if code else f"{kind} {name}"


def summary(flow: F.Flow) -> str:
    """`TCP Flags: SYN, ACK`, `UDP`, `ICMPv4 EchoRequest`, ..."""
    kind = flow.l4.WhichOneof("protocol")
    if kind == "TCP":
        flags = [name for name in _TCP_FLAG_ORDER if getattr(flow.l4.TCP.flags, name)]
        return f"TCP Flags: {', '.join(flags)}" if flags else "TCP"
    if kind == "ICMPv4":
        return _icmp("ICMPv4", _ICMPV4_TYPES, _ICMPV4_CODES, flow.l4.ICMPv4)
    if kind == "ICMPv6":
        return _icmp("ICMPv6", _ICMPV6_TYPES, {}, flow.l4.ICMPv6)
    if kind in ("UDP", "SCTP"):
        return kind
    return _enum_name(F.FlowType, flow.Type) if flow.Type else "N/A"


def _policy_ref(policy: F.Policy) -> str:
    name = f"{policy.namespace}/{policy.name}" if policy.namespace else policy.name
    return f"{name} ({policy.kind})" if policy.kind else name


def policy_names(flow: F.Flow) -> str:
    """`ingress allowed by shop/allow-web (CiliumNetworkPolicy); egress denied by ...`."""
    parts = []
    for label, policies in (("ingress allowed by", flow.ingress_allowed_by),
                            ("ingress denied by", flow.ingress_denied_by),
                            ("egress allowed by", flow.egress_allowed_by),
                            ("egress denied by", flow.egress_denied_by)):
        if policies:
            parts.append(f"{label} {', '.join(_policy_ref(p) for p in policies)}")
    return "; ".join(parts)


def lost_events_line(lost: F.LostEvent) -> str:
    # cpu is absent for losses that are not per CPU; upstream prints CPU(0) then too.
    return (f"EVENTS LOST: {_enum_name(F.LostEventSource, lost.source)} "
            f"CPU({lost.cpu.value}) {lost.num_events_lost}")


def node_status_line(status) -> str:
    state = _enum_name(relay_pb2.NodeState, status.state_change)
    line = f"NODE STATUS: {state} {', '.join(status.node_names)}"
    return f"{line}: {status.message}" if status.message else line


def _response_time(resp: O.GetFlowsResponse):
    flow = resp.flow
    if resp.HasField("flow") and flow.HasField("time"):
        return flow.time
    return resp.time if resp.HasField("time") else None


def _node(resp: O.GetFlowsResponse) -> str:
    return resp.node_name or resp.flow.node_name


# -- whole responses ----------------------------------------------------------------------

class FlowPrinter:
    """Writes GetFlowsResponses to `out` in one of FORMATS; call close() at the end.

    Node status events (relay only) are notes, not flows: text formats send them to `err`
    so a pipe of flows stays parseable; json keeps them in the stream like upstream.
    """

    def __init__(self, output: str = "compact", out: TextIO | None = None, err: TextIO | None = None,
                 *, print_node_name: bool = False, print_policy_names: bool = False,
                 flush_every: int | None = None, line_buffered: bool = False, tz=None):
        if output not in FORMATS:
            raise ValueError(f"unknown output format {output!r}; valid: {', '.join(FORMATS)}")
        self.output = output
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.print_node_name = print_node_name
        self.print_policy_names = print_policy_names
        self.flush_every = flush_every
        self.line_buffered = line_buffered
        self.tz = tz
        self.count = 0
        self._rows: list[list[str] | str] = []  # table rows; a str is a line outside the grid
        self._widths: list[int] = []              # table widths already printed; they only grow
        self._header_done = False

    def write(self, resp: O.GetFlowsResponse) -> None:
        kind = resp.WhichOneof("response_types")
        if self.output in ("json", "jsonpb"):
            self._emit(json_format.MessageToJson(resp, indent=None, preserving_proto_field_name=False))
        elif kind == "node_status":
            self.err.write(node_status_line(resp.node_status) + "\n")
        elif self.output == "compact":
            self._emit(self._compact(resp) if kind == "flow" else lost_events_line(resp.lost_events))
        elif self.output == "dict":
            block = self._dict(resp) if kind == "flow" else lost_events_line(resp.lost_events)
            self._emit(block if self.count == 0 else "------------\n" + block)
        elif kind is not None:
            self._rows.append(self._table_row(resp) if kind == "flow" else lost_events_line(resp.lost_events))
            if self.flush_every and len(self._rows) >= self.flush_every:
                self._flush_table()
        if kind is not None:
            self.count += 1

    def flush(self) -> None:
        """Prints buffered table rows now (a followed stream went quiet)."""
        if self.output == "table":
            self._flush_table()
        self.out.flush()

    def close(self) -> None:
        self.flush()

    def _emit(self, text: str) -> None:
        self.out.write(text + "\n")
        if self.line_buffered:
            self.out.flush()

    # compact ------------------------------------------------------------------------

    def _compact(self, resp: O.GetFlowsResponse) -> str:
        flow = resp.flow
        src = f"{source_host(flow)} {format_identity(flow.source)}"
        dst = f"{destination_host(flow)} {format_identity(flow.destination)}"
        if not flow.HasField("is_reply"):
            arrow = "<>"
        elif flow.is_reply.value:
            # a reply: the endpoint that answered is on the right, pointing back
            src, dst, arrow = dst, src, "<-"
        else:
            arrow = "->"
        node = f" [{_node(resp)}]" if self.print_node_name else ""
        line = (f"{format_time(_response_time(resp), self.tz)}{node}: {src} {arrow} {dst} "
                f"{flow_type(flow)} {_enum_name(F.Verdict, flow.verdict)} ({summary(flow)})")
        if self.print_policy_names and policy_names(flow):
            line += f" [{policy_names(flow)}]"
        return line

    # dict ---------------------------------------------------------------------------

    def _dict(self, resp: O.GetFlowsResponse) -> str:
        flow = resp.flow
        fields = [("TIMESTAMP", format_time(_response_time(resp), self.tz))]
        if self.print_node_name:
            fields.append(("NODE", _node(resp)))
        fields += [
            ("SOURCE", f"{source_host(flow)} {format_identity(flow.source)}"),
            ("DESTINATION", f"{destination_host(flow)} {format_identity(flow.destination)}"),
            ("TYPE", flow_type(flow)),
            ("VERDICT", _enum_name(F.Verdict, flow.verdict)),
            ("SUMMARY", summary(flow)),
        ]
        if drop_reason_code(flow):
            fields.append(("DROP_REASON", _enum_name(F.DropReason, drop_reason_code(flow))))
        if policy_names(flow):
            fields.append(("POLICY", policy_names(flow)))
        width = max(len(k) for k, _ in fields)
        return "\n".join(f"{k.rjust(width)}: {v}" for k, v in fields)

    # table --------------------------------------------------------------------------

    def _columns(self) -> list[str]:
        cols = ["TIMESTAMP"]
        if self.print_node_name:
            cols.append("NODE")
        cols += ["SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
        if self.print_policy_names:
            cols.append("POLICIES")
        return cols

    def _table_row(self, resp: O.GetFlowsResponse) -> list[str]:
        flow = resp.flow
        row = [format_time(_response_time(resp), self.tz)]
        if self.print_node_name:
            row.append(_node(resp))
        row += [source_host(flow), destination_host(flow), flow_type(flow),
                _enum_name(F.Verdict, flow.verdict), summary(flow)]
        if self.print_policy_names:
            row.append(policy_names(flow))
        return row

    def _flush_table(self) -> None:
        if not self._rows:
            return  # no flows, no header: like compact, an empty result prints nothing
        header = self._columns()
        grid = [r for r in self._rows if not isinstance(r, str)] + [header]
        # Widths never shrink, so a table printed in several flushes (when following)
        # stays aligned as far as the rows allow.
        widths = [max([len(r[i]) for r in grid] + self._widths[i:i + 1]) for i in range(len(header))]
        self._widths = widths

        def line(cells: list[str]) -> str:
            return "   ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        if not self._header_done:
            self.out.write(line(header) + "\n")
            self._header_done = True
        for row in self._rows:
            self.out.write((row if isinstance(row, str) else line(row)) + "\n")
        self._rows = []
        if self.line_buffered:
            self.out.flush()


# -- status and nodes ---------------------------------------------------------------------

def _occupancy(num: int, max_: int) -> str:
    pct = 100.0 * num / max_ if max_ else 0.0
    return f"{num:,}/{max_:,} ({pct:.2f}%)"


def status_text(resp: O.ServerStatusResponse, server: str) -> str:
    """`hubble status`, upstream's lines; Ok because ServerStatus answered."""
    lines = [f"Healthcheck (via {server}): Ok",
             f"Current/Max Flows: {_occupancy(resp.num_flows, resp.max_flows)}",
             f"Flows/s: {resp.flows_rate:.2f}"]
    if resp.HasField("num_connected_nodes"):
        connected = resp.num_connected_nodes.value
        total = connected + resp.num_unavailable_nodes.value
        lines.append(f"Connected Nodes: {connected}/{total}")
    if resp.num_unavailable_nodes.value:
        lines.append(f"Unavailable Nodes: {resp.num_unavailable_nodes.value}")
        lines += [f"  - {name}" for name in resp.unavailable_nodes]
    return "\n".join(lines)


def human_duration(ns: int) -> str:
    """`45s`, `3m12s`, `2h5m`, `3d4h`: two units at most, like kubectl's AGE."""
    s = ns // 1_000_000_000
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m" if s % 3600 // 60 else f"{s // 3600}h"
    return f"{s // 86400}d{s % 86400 // 3600}h" if s % 86400 // 3600 else f"{s // 86400}d"


def nodes_table(resp: O.GetNodesResponse) -> str:
    """`hubble list nodes`: NAME STATUS AGE FLOWS/S CURRENT/MAX-FLOWS, sorted by name."""
    rows = [["NAME", "STATUS", "AGE", "FLOWS/S", "CURRENT/MAX-FLOWS"]]
    for node in sorted(resp.nodes, key=lambda n: n.name):
        state = _NODE_STATES.get(node.state, str(node.state))
        if node.state != relay_pb2.NODE_CONNECTED:
            rows.append([node.name, state, "N/A", "N/A", "N/A"])
            continue
        seconds = node.uptime_ns / 1e9
        rate = node.seen_flows / seconds if seconds > 0 else 0.0
        rows.append([node.name, state, human_duration(node.uptime_ns), f"{rate:.2f}",
                     _occupancy(node.num_flows, node.max_flows)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
