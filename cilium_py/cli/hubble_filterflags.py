"""`hubble observe` flags -> a GetFlowsRequest (whitelist, blacklist, selection, time range).

Kept free of click so it can be tested on its own: the CLI hands over the filter flags as
an ordered list of (flag, value) pairs, in command-line order, because `--not` negates
only the flag that follows it and click groups repeated options by name.

How flags combine (upstream hubble's rules):

* All filter flags of one list build ONE FlowFilter: different fields are ANDed, repeated
  values of one field (`--pod a --pod b`) are ORed.
* "Either side" flags (`--pod`, `--namespace`, `--ip`, `--label`, `--identity`, `--port`,
  `--service`) cannot be one filter: they build two, a "left" one with the source field and
  a "right" one with the destination field, and the server ORs them. Every other flag is
  written into both, so `--pod a --to-port 80` is (source a AND dst port 80) OR
  (destination a AND dst port 80). Two either-side flags pair up on the same side:
  `--pod a --port 80` is (source a AND source port 80) OR (destination a AND destination
  port 80). When left and right come out equal (no either-side flag) only one is sent.
* `--from-X` / `--to-X` set the source_ / destination_ field (in both halves).
* `--namespace ns` is the pod filter `ns/`. A namespace and a pod flag of the same
  direction (`-n shop --pod web`, `--from-namespace shop --from-pod web`) qualify each
  other into `shop/web`, because both live in the same pod field, where values are ORed
  and a plain `web` would mean "web, or anything in shop". Mixing directions
  (`-n shop --from-pod web`) or an either-side flag with its own from/to form
  (`--pod a --from-pod b`) is rejected: the result would not mean what it reads like.
* `--not` sends the next filter flag to the blacklist, built with the same rules, so
  `--not --pod a --to-port 80` blacklists pod a (either side) and whitelists port 80.

Every bad value raises FlagError naming the flag and the value.
"""

from __future__ import annotations

import calendar
import ipaddress
import json
import re
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from google.protobuf import json_format

from cilium_py.cli.durations import DURATION, parse_go_duration
from cilium_py.datapath.reasons import MESSAGE_TYPES, TRACE_POINTS
from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.api.observer import observer_pb2 as O
from cilium_py.hubble.filters import L4_FIELDS
from cilium_py.vocab import RESERVED_IDENTITY_IDS

# `--all` asks for "everything in the ring": a number larger than any ring. Not 2**64-1:
# the server slices Python lists with it and 2**63 is still a valid uint64.
ALL_FLOWS = 2**63
DEFAULT_LAST = 20  # upstream's FlowPrintCount for a plain `hubble observe`

NOT = "not"


class FlagError(ValueError):
    """A flag with a value it cannot take; str() names both."""

    def __init__(self, flag: str, value: str | None, message: str):
        self.flag, self.value, self.message = flag, value, message
        shown = f"--{flag}" if len(flag) > 1 else f"-{flag}"
        if value is not None:
            shown += f" {shlex.quote(value)}"
        super().__init__(f"{shown}: {message}")


# -- the flags ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FilterFlag:
    name: str                 # long name without dashes
    short: str | None = None  # one-letter alias without the dash
    metavar: str | None = None  # None: a boolean flag that takes no value
    help: str = ""


# Monitor message types `-t` accepts (cilium-facts §4): the numbers in event_type.type.
# debug and agent messages never become flows.
EVENT_TYPES = {name: n for n, name in MESSAGE_TYPES.items() if name not in ("debug", "agent")}
# Trace observation points: the datapath's numbering, which is what event_type.sub_type
# carries (not TraceObservationPoint, where to-endpoint is 101).
TRACE_SUBTYPES = {name: n for n, name in TRACE_POINTS.items()}
PROTOCOLS = tuple(L4_FIELDS)  # what the server's protocol filter accepts
TCP_FLAG_NAMES = tuple(f.name for f in F.TCPFlags.DESCRIPTOR.fields)
VERDICTS = tuple(n for n in F.Verdict.keys() if n != "VERDICT_UNKNOWN")
DROP_REASONS = tuple(n for n in F.DropReason.keys() if n != "DROP_REASON_UNKNOWN")
DIRECTIONS = {"ingress": F.INGRESS, "egress": F.EGRESS}
IP_VERSIONS = {"4": F.IPv4, "v4": F.IPv4, "ipv4": F.IPv4, "6": F.IPv6, "v6": F.IPv6, "ipv6": F.IPv6}

_EITHER_HELP = {
    "pod": ("[NS/]POD", "pod name prefix (namespace 'default' unless given)"),
    "namespace": ("NS", "Kubernetes namespace"),
    "ip": ("IP|CIDR", "IP address or CIDR"),
    "label": ("SELECTOR", "label selector, e.g. app=web or 'k8s:app in (web,api)'"),
    "identity": ("ID|NAME", "security identity: a number or a reserved name (world, host...)"),
    "port": ("PORT", "L4 port 0-65535"),
    "service": ("[NS/]SVC", "Kubernetes service"),
}


def _directional_flags() -> list[FilterFlag]:
    out = []
    for family, (metavar, what) in _EITHER_HELP.items():
        out.append(FilterFlag(family, {"namespace": "n", "label": "l"}.get(family), metavar,
                              f"flows from or to this {what}"))
        out.append(FilterFlag(f"from-{family}", None, metavar, f"flows from this {what}"))
        out.append(FilterFlag(f"to-{family}", None, metavar, f"flows to this {what}"))
    return out


FILTER_FLAGS: tuple[FilterFlag, ...] = (
    FilterFlag(NOT, None, None, "negate the next filter flag: it goes to the blacklist"),
    *_directional_flags(),
    FilterFlag("verdict", None, "VERDICT", "verdict: " + ", ".join(VERDICTS)),
    FilterFlag("type", "t", "TYPE[:SUBTYPE]",
               "event type: " + ", ".join(EVENT_TYPES) + "; trace:to-endpoint, trace:from-host..."),
    FilterFlag("protocol", None, "PROTO", "L4 protocol: " + ", ".join(PROTOCOLS)),
    FilterFlag("tcp-flags", None, "FLAGS", "TCP flags that must all be set, e.g. SYN,ACK"),
    FilterFlag("traffic-direction", None, "ingress|egress", "traffic direction"),
    FilterFlag("drop-reason-desc", None, "REASON", "drop reason, e.g. POLICY_DENIED"),
    FilterFlag("node-name", None, "PATTERN", "node name pattern, e.g. 'kind-*'"),
    FilterFlag("uuid", None, "UUID", "one flow by its UUID"),
    FilterFlag("ip-version", None, "4|6", "IP version"),
    FilterFlag("ipv4", "4", None, "IPv4 flows only (--ip-version 4)"),
    FilterFlag("ipv6", "6", None, "IPv6 flows only (--ip-version 6)"),
)
FILTER_FLAG_NAMES = frozenset(f.name for f in FILTER_FLAGS)


# -- value parsers: raw string -> the field's value, or FlagError ---------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _check_namespace(flag: str, value: str, ns: str) -> None:
    if not _DNS_LABEL.match(ns):
        raise FlagError(flag, value, f"{ns!r} is not a valid namespace name "
                                     "(lower-case letters, digits and '-', at most 63)")


def _parse_pod(flag: str, value: str) -> str:
    if not value or value.strip() != value:
        raise FlagError(flag, value, "expected [NAMESPACE/]POD-NAME-PREFIX")
    ns, slash, pod = value.partition("/")
    if slash:
        if "/" in pod:
            raise FlagError(flag, value, "expected [NAMESPACE/]POD-NAME-PREFIX (one '/')")
        _check_namespace(flag, value, ns)
    return value


def _parse_namespace(flag: str, value: str) -> str:
    _check_namespace(flag, value, value)
    return value


def _parse_service(flag: str, value: str) -> str:
    ns, slash, name = value.partition("/")
    if not value or (slash and (not name or "/" in name)):
        raise FlagError(flag, value, "expected [NAMESPACE/]SERVICE-NAME")
    if slash:
        _check_namespace(flag, value, ns)
    return value


def _parse_ip(flag: str, value: str) -> str:
    try:
        if "/" in value:
            # strict: 10.0.0.1/8 is more likely a typo than a request for 10.0.0.0/8.
            return str(ipaddress.ip_network(value, strict=True))
        return str(ipaddress.ip_address(value))
    except ValueError as e:
        if "host bits set" in str(e):
            net = ipaddress.ip_network(value, strict=False)
            raise FlagError(flag, value, f"host bits set; did you mean {net}?") from None
        raise FlagError(flag, value, "not an IP address or CIDR") from None


def _parse_label(flag: str, value: str) -> str:
    # The server parses the selector and answers INVALID_ARGUMENT with details; here only
    # what is certainly wrong, so the error comes before connecting.
    if not value.strip():
        raise FlagError(flag, value, "empty label selector")
    if value.count("(") != value.count(")"):
        raise FlagError(flag, value, "unbalanced parentheses in label selector")
    return value


def _parse_identity(flag: str, value: str) -> int:
    name = value.lower().removeprefix("reserved:")
    if name in RESERVED_IDENTITY_IDS:
        return RESERVED_IDENTITY_IDS[name]
    if value.isdigit() and int(value) < 2**32:
        return int(value)
    raise FlagError(flag, value, "expected a numeric identity (0-4294967295) or a reserved "
                                 "name: " + ", ".join(RESERVED_IDENTITY_IDS))


def _parse_port(flag: str, value: str) -> str:
    if not value.isdigit() or int(value) > 65535:
        raise FlagError(flag, value, "expected a port number 0-65535")
    return str(int(value))  # the field is a string; normalize "080"


def _parse_verdict(flag: str, value: str) -> int:
    if value.upper() in VERDICTS:
        return F.Verdict.Value(value.upper())
    raise FlagError(flag, value, "unknown verdict; valid: " + ", ".join(VERDICTS))


def _parse_type(flag: str, value: str) -> F.EventTypeFilter:
    name, colon, sub = value.lower().partition(":")
    if name not in EVENT_TYPES:
        raise FlagError(flag, value, "unknown event type; valid: " + ", ".join(EVENT_TYPES) +
                        " (trace takes a subtype: trace:" + ", trace:".join(TRACE_SUBTYPES) + ")")
    flt = F.EventTypeFilter(type=EVENT_TYPES[name])
    if colon:
        if name == "trace" and sub in TRACE_SUBTYPES:
            sub_type = TRACE_SUBTYPES[sub]
        elif sub.isdigit() and int(sub) < 256:  # raw subtype, e.g. a drop reason code
            sub_type = int(sub)
        else:
            valid = ", ".join(TRACE_SUBTYPES) if name == "trace" else "a number 0-255"
            raise FlagError(flag, value, f"unknown subtype {sub!r} for {name}; valid: {valid}")
        flt.match_sub_type = True  # sub_type 0 (to-endpoint) is a real subtype
        flt.sub_type = sub_type
    return flt


def _parse_protocol(flag: str, value: str) -> str:
    if value.lower() not in PROTOCOLS:
        raise FlagError(flag, value, "unknown protocol; valid: " + ", ".join(PROTOCOLS))
    return value.lower()


def _parse_tcp_flags(flag: str, value: str) -> F.TCPFlags:
    flags = F.TCPFlags()
    names = [n.strip().upper() for n in value.split(",")]
    for name in names:
        if name not in TCP_FLAG_NAMES:
            raise FlagError(flag, value, f"unknown TCP flag {name!r}; valid: " +
                            ", ".join(TCP_FLAG_NAMES))
        setattr(flags, name, True)
    return flags


def _parse_direction(flag: str, value: str) -> int:
    if value.lower() not in DIRECTIONS:
        raise FlagError(flag, value, "expected ingress or egress")
    return DIRECTIONS[value.lower()]


def _parse_drop_reason(flag: str, value: str) -> int:
    name = value.upper().replace("-", "_")
    if name in DROP_REASONS:
        return F.DropReason.Value(name)
    raise FlagError(flag, value, "unknown drop reason; valid: " + ", ".join(DROP_REASONS))


def _parse_nonempty(flag: str, value: str) -> str:
    if not value.strip():
        raise FlagError(flag, value, "must not be empty")
    return value


def _parse_ip_version(flag: str, value: str) -> int:
    if value.lower() not in IP_VERSIONS:
        raise FlagError(flag, value, "expected 4 or 6")
    return IP_VERSIONS[value.lower()]


# Either-side families: (source field, destination field, parser). pod and namespace are
# special-cased below because they share the pod fields.
_FAMILIES: dict[str, tuple[str, str, Callable[[str, str], object]]] = {
    "ip": ("source_ip", "destination_ip", _parse_ip),
    "label": ("source_label", "destination_label", _parse_label),
    "identity": ("source_identity", "destination_identity", _parse_identity),
    "port": ("source_port", "destination_port", _parse_port),
    "service": ("source_service", "destination_service", _parse_service),
}
# Flags that set one field, the same in the left and right halves.
_SIMPLE: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "verdict": ("verdict", _parse_verdict),
    "type": ("event_type", _parse_type),
    "protocol": ("protocol", _parse_protocol),
    "tcp-flags": ("tcp_flags", _parse_tcp_flags),
    "traffic-direction": ("traffic_direction", _parse_direction),
    "drop-reason-desc": ("drop_reason_desc", _parse_drop_reason),
    "node-name": ("node_name", _parse_nonempty),
    "uuid": ("uuid", _parse_nonempty),
    "ip-version": ("ip_version", _parse_ip_version),
}
_BOOLEAN = {"ipv4": ("ip_version", F.IPv4), "ipv6": ("ip_version", F.IPv6)}


def _append(flt: F.FlowFilter, field: str, value) -> None:
    repeated = getattr(flt, field)
    if isinstance(value, (F.EventTypeFilter, F.TCPFlags)):
        repeated.add().CopyFrom(value)
    elif value not in repeated:  # `--pod a --pod a` is one value
        repeated.append(value)


def _split(name: str) -> tuple[str, str]:
    """'from-pod' -> ('from', 'pod'); 'pod' -> ('either', 'pod')."""
    for direction in ("from", "to"):
        if name.startswith(direction + "-") and name[len(direction) + 1:] in _EITHER_HELP:
            return direction, name[len(direction) + 1:]
    return "either", name


class _Tracker:
    """One list (whitelist or blacklist) under construction: a left and a right half."""

    def __init__(self):
        self.left: F.FlowFilter | None = None
        self.right: F.FlowFilter | None = None
        self.seen: dict[str, str] = {}  # flag -> first value, for the conflict checks
        # pod and namespace values by direction; resolved together at the end
        self.pods: dict[str, list[str]] = {"either": [], "from": [], "to": []}
        self.namespaces: dict[str, list[str]] = {"either": [], "from": [], "to": []}

    def _half(self, side: str) -> F.FlowFilter:
        if getattr(self, side) is None:
            setattr(self, side, F.FlowFilter())
        return getattr(self, side)

    def both(self, field: str, value) -> None:
        _append(self._half("left"), field, value)
        _append(self._half("right"), field, value)

    def either(self, src_field: str, dst_field: str, value) -> None:
        _append(self._half("left"), src_field, value)
        _append(self._half("right"), dst_field, value)

    def add(self, name: str, value: str | None) -> None:
        self.seen.setdefault(name, value)
        if name in _BOOLEAN:
            field, const = _BOOLEAN[name]
            self.both(field, const)
            return
        if name in _SIMPLE:
            field, parse = _SIMPLE[name]
            self.both(field, parse(name, value))
            return
        direction, family = _split(name)
        if family == "pod":
            self.pods[direction].append(_parse_pod(name, value))
        elif family == "namespace":
            self.namespaces[direction].append(_parse_namespace(name, value))
        else:
            src, dst, parse = _FAMILIES[family]
            parsed = parse(name, value)
            if direction == "either":
                self.either(src, dst, parsed)
            else:
                self.both(src if direction == "from" else dst, parsed)

    def _check_conflicts(self) -> None:
        def clash(a: str, b: str, why: str) -> None:
            if a in self.seen and b in self.seen:
                raise FlagError(b, self.seen[b], f"cannot be combined with --{a}: {why}")

        for family in _EITHER_HELP:
            for direction in ("from", "to"):
                clash(family, f"{direction}-{family}",
                      f"--{family} already matches either side; use --from-{family} "
                      f"and --to-{family} instead")
        # namespace and pod share the pod fields; only the same direction can be merged
        for ns_flag, pod_flag in (("namespace", "from-pod"), ("namespace", "to-pod"),
                                  ("from-namespace", "pod"), ("to-namespace", "pod")):
            clash(ns_flag, pod_flag, "namespace and pod flags must have the same direction "
                                     "(e.g. --from-namespace with --from-pod)")

    def _resolve_pods(self) -> None:
        fields = {"either": ("source_pod", "destination_pod"), "from": ("source_pod",) * 2,
                  "to": ("destination_pod",) * 2}
        for direction, (src, dst) in fields.items():
            pods, namespaces = self.pods[direction], self.namespaces[direction]
            if pods and namespaces:
                ns_flag = "namespace" if direction == "either" else f"{direction}-namespace"
                pod_flag = "pod" if direction == "either" else f"{direction}-pod"
                for pod in pods:
                    if "/" in pod:
                        raise FlagError(pod_flag, pod, f"names its namespace already; drop --{ns_flag} "
                                                       "or give the pod without a namespace")
                values = [f"{ns}/{pod}" for ns in namespaces for pod in pods]
            else:
                values = pods or [f"{ns}/" for ns in namespaces]
            for value in values:
                if direction == "either":
                    self.either(src, dst, value)
                else:
                    self.both(src, value)

    def filters(self) -> list[F.FlowFilter]:
        self._check_conflicts()
        self._resolve_pods()
        halves = [h for h in (self.left, self.right) if h is not None]
        if len(halves) == 2 and halves[0] == halves[1]:
            return halves[:1]
        return halves


def build_filters(args: Iterable[tuple[str, str | None]]) -> tuple[list[F.FlowFilter], list[F.FlowFilter]]:
    """Ordered (flag, value) pairs -> (whitelist, blacklist).

    Flags are long names without dashes ("from-pod"); "not" negates the next filter flag.
    Names that are not filter flags (e.g. "follow") may be included to keep the order: they
    are skipped, but `--not` directly before one is an error, because it would silently
    jump over it to a later filter.
    """
    allow, deny = _Tracker(), _Tracker()
    pending_not = False
    for name, value in args:
        if name == NOT:
            if pending_not:
                raise FlagError(NOT, None, "given twice in a row; it negates the next filter flag")
            pending_not = True
            continue
        if name not in FILTER_FLAG_NAMES:
            if pending_not:
                raise FlagError(NOT, None, f"must be followed directly by a filter flag, not --{name}")
            continue
        (deny if pending_not else allow).add(name, value)
        pending_not = False
    if pending_not:
        raise FlagError(NOT, None, "must be followed by the filter flag it negates")
    return allow.filters(), deny.filters()


def parse_raw_filters(flag: str, values: Sequence[str]) -> list[F.FlowFilter]:
    """`--allowlist` / `--denylist`: FlowFilters as JSON, e.g. '{"source_pod":["shop/"]}'."""
    out = []
    for value in values:
        try:
            out.append(json_format.Parse(value, F.FlowFilter()))
        except json_format.ParseError as e:
            raise FlagError(flag, value, f"not a JSON FlowFilter: {e}") from None
    return out


def format_raw_filters(whitelist: Sequence[F.FlowFilter], blacklist: Sequence[F.FlowFilter]) -> str:
    """`--print-raw-filters`: YAML with one JSON FlowFilter per item (proto field names, so
    the items paste back into --allowlist / --denylist)."""
    lines = []
    for key, filters in (("allowlist", whitelist), ("denylist", blacklist)):
        if not filters:
            lines.append(f"{key}: []")
            continue
        lines.append(f"{key}:")
        for flt in filters:
            text = json.dumps(json_format.MessageToDict(flt, preserving_proto_field_name=True),
                              separators=(",", ":"))
            lines.append("  - '" + text.replace("'", "''") + "'")
    return "\n".join(lines)


# -- times --------------------------------------------------------------------------------

def parse_duration(flag: str, value: str) -> int:
    """Go duration syntax ("5m", "1h30m", "1.5s", "300ms") -> nanoseconds, > 0."""
    try:
        total = parse_go_duration(value)
    except ValueError as e:
        raise FlagError(flag, value, str(e)) from None
    if total <= 0:
        raise FlagError(flag, value, "duration must be positive")
    return total


def parse_time(flag: str, value: str, now_ns: int | None = None) -> int:
    """`--since` / `--until`: a duration back from now, or an RFC3339 timestamp -> Unix ns."""
    if DURATION.fullmatch(value):
        return (time.time_ns() if now_ns is None else now_ns) - parse_duration(flag, value)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise FlagError(flag, value, "expected a duration (5m, 1h30m) or an RFC3339 time "
                                     "(2024-05-01T12:00:00Z)") from None
    if dt.tzinfo is None:
        # An offset-less time is ambiguous (local? UTC?); say so rather than guess.
        raise FlagError(flag, value, "RFC3339 times need a UTC offset, "
                                     "e.g. 2024-05-01T12:00:00Z or 2024-05-01T14:00:00+02:00")
    return calendar.timegm(dt.utctimetuple()) * 10**9 + dt.microsecond * 1000


# -- the whole request ----------------------------------------------------------------------

def build_request(whitelist: Sequence[F.FlowFilter] = (), blacklist: Sequence[F.FlowFilter] = (), *,
                  last: int | None = None, first: int | None = None, all_flows: bool = False,
                  follow: bool = False, since: str | None = None, until: str | None = None,
                  now_ns: int | None = None) -> O.GetFlowsRequest:
    """The selection flags -> GetFlowsRequest.number/first/follow/since/until.

    Defaults, as upstream: a plain `hubble observe` asks for the last 20 flows; `--follow`
    alone asks for no history (number 0) and only new flows; `--since`/`--until` alone
    ask for every flow in the window (number 0 = no count limit). `--all` sends
    ALL_FLOWS, which the server caps at the ring size.
    """
    for flag, n in (("last", last), ("first", first)):
        if n is not None and n < 1:
            raise FlagError(flag, str(n), "must be at least 1")
    if last is not None and first is not None:
        raise FlagError("first", str(first), "cannot be combined with --last")
    if all_flows and (last is not None or first is not None):
        flag, n = ("last", last) if last is not None else ("first", first)
        raise FlagError(flag, str(n), "cannot be combined with --all")
    if first is not None and follow:
        raise FlagError("first", str(first), "cannot be combined with --follow "
                                             "(the oldest flows are not followed by new ones)")
    req = O.GetFlowsRequest(whitelist=list(whitelist), blacklist=list(blacklist), follow=follow)
    now_ns = time.time_ns() if now_ns is None else now_ns
    if since is not None:
        req.since.FromNanoseconds(parse_time("since", since, now_ns))
    if until is not None:
        req.until.FromNanoseconds(parse_time("until", until, now_ns))
    if since is not None and until is not None and req.until.ToNanoseconds() < req.since.ToNanoseconds():
        raise FlagError("until", until, f"is before --since {since}")
    if all_flows:
        req.number = ALL_FLOWS
    elif first is not None:
        req.number, req.first = first, True
    elif last is not None:
        req.number = last
    elif not follow and since is None and until is None:
        req.number = DEFAULT_LAST
    return req
