"""FlowFilter -> predicate over flows.

A FlowFilter's set fields are ANDed and the values of one repeated field ORed; a request's
whitelist filters are ORed (an empty whitelist lets everything through) and a flow is
dropped when any blacklist filter matches. Each filter is compiled once per request into
a list of small checks, so the per-flow cost is a few attribute reads.

Invalid input (a bad CIDR, a non-numeric port, a malformed label selector, a field this
server does not implement) raises FilterError naming the field and value; the server
answers INVALID_ARGUMENT instead of silently widening the result.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Sequence

from google.protobuf.unknown_fields import UnknownFieldSet

from cilium_py.hubble.api.flow import flow_pb2 as F

Check = Callable[[F.Flow], bool]

# A FlowFilter's protocol spellings -> the Flow.l4 oneof member they select.
L4_FIELDS = {"tcp": "TCP", "udp": "UDP", "icmp": "ICMPv4", "icmpv4": "ICMPv4",
             "icmpv6": "ICMPv6", "sctp": "SCTP"}
# The Flow.l4 members that carry source_port and destination_port.
PORTED_L4_FIELDS = frozenset({"TCP", "UDP", "SCTP"})


class FilterError(ValueError):
    pass


def _ip_matcher(field: str, values: Sequence[str]) -> Callable[[str], bool]:
    exact, nets = set(), []
    for value in values:
        try:
            if "/" in value:
                nets.append(ipaddress.ip_network(value, strict=False))
            else:
                exact.add(str(ipaddress.ip_address(value)))
        except ValueError:
            raise FilterError(f"{field}: {value!r} is not an IP address or CIDR") from None

    def match(ip: str) -> bool:
        if ip in exact:
            return True
        if nets and ip:
            addr = ipaddress.ip_address(ip)
            return any(addr in net for net in nets)
        return False
    return match


def _pod_matcher(field: str, values: Sequence[str]) -> Callable[[F.Endpoint], bool]:
    """`namespace/prefix`, `namespace/` (the whole namespace) or `prefix` (namespace default)."""
    wanted = []
    for value in values:
        if not value:
            raise FilterError(f"{field}: empty pod filter")
        namespace, slash, prefix = value.partition("/")
        if not slash:
            namespace, prefix = "default", value
        if not namespace:
            raise FilterError(f"{field}: {value!r} has an empty namespace")
        wanted.append((namespace, prefix))

    def match(ep: F.Endpoint) -> bool:
        return any(ep.namespace == ns and ep.pod_name.startswith(prefix) for ns, prefix in wanted)
    return match


def _service_matcher(field: str, values: Sequence[str]) -> Callable[[F.Service], bool]:
    wanted = []
    for value in values:
        namespace, slash, name = value.partition("/")
        if not slash:
            namespace, name = "", value
        wanted.append((namespace, name))

    def match(svc: F.Service) -> bool:
        return any((not ns or svc.namespace == ns) and svc.name.startswith(name)
                   for ns, name in wanted)
    return match


_REQ = re.compile(r"""^\s*(?:(?P<neg>!)\s*(?P<nkey>[^\s=!(),]+)
                     |(?P<key>[^\s=!(),]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[^\s,()]*)
                       |\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\))?)\s*$""", re.X)


def _split_requirements(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _label_key_matches(selector_key: str, label_key: str) -> bool:
    """`app` and `any:app` match a label of any source; `k8s:app` only k8s:app."""
    if selector_key.startswith("any:"):
        selector_key = selector_key[4:]
    if ":" in selector_key:
        return label_key == selector_key
    return label_key.partition(":")[2] == selector_key if ":" in label_key else label_key == selector_key


def parse_label_selector(field: str, selector: str) -> Callable[[Sequence[str]], bool]:
    """Kubernetes label-selector syntax over Cilium's "source:key=value" label strings."""
    reqs = []
    for part in _split_requirements(selector):
        m = _REQ.match(part)
        if not m or (not m.group("nkey") and not m.group("key")):
            raise FilterError(f"{field}: cannot parse label selector {selector!r} at {part.strip()!r}")
        if m.group("neg"):
            reqs.append(("!", m.group("nkey"), None))
        elif m.group("op"):
            reqs.append(("!=" if m.group("op") == "!=" else "=", m.group("key"), m.group("val")))
        elif m.group("setop"):
            values = {v.strip() for v in m.group("set").split(",") if v.strip()}
            reqs.append((m.group("setop"), m.group("key"), values))
        else:
            reqs.append(("exists", m.group("key"), None))

    def match(labels: Sequence[str]) -> bool:
        pairs = [(k, v) for k, _, v in (label.partition("=") for label in labels)]
        for op, key, value in reqs:
            found = [v for k, v in pairs if _label_key_matches(key, k)]
            if op == "exists" and not found:
                return False
            if op == "!" and found:
                return False
            if op == "=" and value not in found:
                return False
            if op == "!=" and value in found:
                return False
            if op == "in" and not value.intersection(found):
                return False
            if op == "notin" and value.intersection(found):
                return False
        return True
    return match


def _ports(field: str, values: Sequence[str]) -> set[int]:
    out = set()
    for value in values:
        try:
            port = int(value)
        except ValueError:
            raise FilterError(f"{field}: {value!r} is not a port number") from None
        if not 0 <= port <= 65535:
            raise FilterError(f"{field}: port {port} is out of range 0-65535")
        out.add(port)
    return out


def _l4_ports(flow: F.Flow) -> tuple[int, int]:
    kind = flow.l4.WhichOneof("protocol")
    if kind in PORTED_L4_FIELDS:
        layer = getattr(flow.l4, kind)
        return layer.source_port, layer.destination_port
    return -1, -1


def _check_known_fields(flt: F.FlowFilter) -> None:
    unknown = UnknownFieldSet(flt)
    if len(unknown):
        numbers = sorted({field.field_number for field in unknown})
        raise FilterError(f"filter field(s) {', '.join(map(str, numbers))} are not supported by "
                          f"this server")


def compile_filter(flt: F.FlowFilter) -> Check:
    """One FlowFilter -> a predicate that is True when every set field matches."""
    _check_known_fields(flt)
    checks: list[Check] = []
    if flt.source_ip:
        m_src_ip = _ip_matcher("source_ip", flt.source_ip)
        checks.append(lambda f: m_src_ip(f.IP.source))
    if flt.destination_ip:
        m_dst_ip = _ip_matcher("destination_ip", flt.destination_ip)
        checks.append(lambda f: m_dst_ip(f.IP.destination))
    if flt.source_pod:
        m_src_pod = _pod_matcher("source_pod", flt.source_pod)
        checks.append(lambda f: m_src_pod(f.source))
    if flt.destination_pod:
        m_dst_pod = _pod_matcher("destination_pod", flt.destination_pod)
        checks.append(lambda f: m_dst_pod(f.destination))
    if flt.verdict:
        verdicts = set(flt.verdict)
        checks.append(lambda f: f.verdict in verdicts)
    if flt.event_type:
        types = [(t.type, t.sub_type if t.match_sub_type else None) for t in flt.event_type]
        checks.append(lambda f: any(f.event_type.type == t and (s is None or f.event_type.sub_type == s)
                                    for t, s in types))
    if flt.source_label:
        m_src_labels = [parse_label_selector("source_label", s) for s in flt.source_label]
        checks.append(lambda f: any(m(f.source.labels) for m in m_src_labels))
    if flt.destination_label:
        m_dst_labels = [parse_label_selector("destination_label", s) for s in flt.destination_label]
        checks.append(lambda f: any(m(f.destination.labels) for m in m_dst_labels))
    if flt.protocol:
        protos = set()
        for p in flt.protocol:
            name = L4_FIELDS.get(p.lower())
            if name is None:
                raise FilterError(f"protocol: unknown protocol {p!r} (known: {', '.join(L4_FIELDS)})")
            protos.add(name)
        checks.append(lambda f: f.l4.WhichOneof("protocol") in protos)
    if flt.source_port:
        sports = _ports("source_port", flt.source_port)
        checks.append(lambda f: _l4_ports(f)[0] in sports)
    if flt.destination_port:
        dports = _ports("destination_port", flt.destination_port)
        checks.append(lambda f: _l4_ports(f)[1] in dports)
    if flt.reply:
        replies = set(flt.reply)
        checks.append(lambda f: f.HasField("is_reply") and f.is_reply.value in replies)
    if flt.source_service:
        m_src_svc = _service_matcher("source_service", flt.source_service)
        checks.append(lambda f: f.HasField("source_service") and m_src_svc(f.source_service))
    if flt.destination_service:
        m_dst_svc = _service_matcher("destination_service", flt.destination_service)
        checks.append(lambda f: f.HasField("destination_service") and m_dst_svc(f.destination_service))
    if flt.source_identity:
        src_ids = set(flt.source_identity)
        checks.append(lambda f: f.source.identity in src_ids)
    if flt.destination_identity:
        dst_ids = set(flt.destination_identity)
        checks.append(lambda f: f.destination.identity in dst_ids)
    if flt.tcp_flags:
        wanted_flags = [[d.name for d, v in fl.ListFields() if v] for fl in flt.tcp_flags]
        checks.append(lambda f: f.l4.HasField("TCP") and any(
            all(getattr(f.l4.TCP.flags, name) for name in names) for names in wanted_flags))
    if flt.node_name:
        patterns = list(flt.node_name)
        checks.append(lambda f: any(fnmatch.fnmatchcase(f.node_name, p) for p in patterns))
    if flt.ip_version:
        versions = set(flt.ip_version)
        checks.append(lambda f: f.IP.ipVersion in versions)
    if flt.uuid:
        uuids = set(flt.uuid)
        checks.append(lambda f: f.uuid in uuids)
    if flt.traffic_direction:
        directions = set(flt.traffic_direction)
        checks.append(lambda f: f.traffic_direction in directions)
    if flt.drop_reason_desc:
        reasons = set(flt.drop_reason_desc)
        checks.append(lambda f: f.drop_reason_desc in reasons)

    if not checks:
        return lambda f: True
    if len(checks) == 1:
        return checks[0]
    return lambda f: all(check(f) for check in checks)


def compile_filters(whitelist: Sequence[F.FlowFilter], blacklist: Sequence[F.FlowFilter]) -> Check:
    """The request's combined predicate: any whitelist filter and no blacklist filter."""
    allow = [compile_filter(flt) for flt in whitelist]
    deny = [compile_filter(flt) for flt in blacklist]
    if not allow and not deny:
        return lambda f: True
    if not deny:
        return lambda f: any(m(f) for m in allow)
    if not allow:
        return lambda f: not any(m(f) for m in deny)
    return lambda f: any(m(f) for m in allow) and not any(m(f) for m in deny)
