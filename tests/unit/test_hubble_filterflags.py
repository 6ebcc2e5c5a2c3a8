"""The hubble CLI's filterflags and printer on their own: no click, no server."""

from __future__ import annotations

import io

import pytest

from cilium_py.cli import hubble_filterflags as ff
from cilium_py.cli import hubble_printer as printer
from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.api.observer import observer_pb2 as O
from cilium_py.hubble.api.relay import relay_pb2


def build(*pairs):
    return ff.build_filters(pairs)


def flt(**fields):
    return F.FlowFilter(**fields)


# -- filters ---------------------------------------------------------------------------------

def test_no_flags_no_filters():
    assert build() == ([], [])
    assert build(("follow", None), ("last", None)) == ([], [])


def test_two_either_side_flags_pair_up_on_the_same_side():
    allow, _ = build(("pod", "a"), ("port", "80"))
    assert allow == [flt(source_pod=["a"], source_port=["80"]),
                     flt(destination_pod=["a"], destination_port=["80"])]


def test_repeated_values_are_ored_and_deduplicated():
    allow, _ = build(("verdict", "DROPPED"), ("verdict", "audit"), ("verdict", "dropped"))
    assert allow == [flt(verdict=[F.DROPPED, F.AUDIT])]


def test_blacklist_uses_the_same_rules():
    allow, deny = build(("not", None), ("from-pod", "a"), ("not", None), ("to-port", "53"),
                        ("verdict", "FORWARDED"))
    assert allow == [flt(verdict=[F.FORWARDED])]
    assert deny == [flt(source_pod=["a"], destination_port=["53"])]


def test_namespace_qualifies_pods_of_its_direction():
    allow, _ = build(("namespace", "a"), ("namespace", "b"), ("pod", "web"))
    assert allow == [flt(source_pod=["a/web", "b/web"]), flt(destination_pod=["a/web", "b/web"])]
    allow, _ = build(("from-namespace", "a"), ("to-pod", "db"))
    assert allow == [flt(source_pod=["a/"], destination_pod=["db"])]
    with pytest.raises(ff.FlagError, match="names its namespace already"):
        build(("namespace", "a"), ("pod", "b/web"))


def test_type_subtypes():
    allow, _ = build(("type", "trace:from-endpoint"), ("type", "drop:133"), ("type", "Policy-Verdict"))
    assert list(allow[0].event_type) == [
        F.EventTypeFilter(type=4, match_sub_type=True, sub_type=5),
        F.EventTypeFilter(type=1, match_sub_type=True, sub_type=133),
        F.EventTypeFilter(type=5)]
    with pytest.raises(ff.FlagError, match="--type drop:x"):
        build(("type", "drop:x"))


@pytest.mark.parametrize("value, identity", [("2", 2), ("world", 2), ("reserved:host", 1),
                                             ("Kube-Apiserver", 7), ("16777217", 16777217)])
def test_identity(value, identity):
    assert build(("from-identity", value))[0] == [flt(source_identity=[identity])]


@pytest.mark.parametrize("value, normalized", [("10.0.0.1", "10.0.0.1"), ("10.0.0.0/8", "10.0.0.0/8"),
                                               ("2001:DB8::1", "2001:db8::1"), ("fd00::/8", "fd00::/8")])
def test_ip(value, normalized):
    assert build(("to-ip", value))[0] == [flt(destination_ip=[normalized])]


@pytest.mark.parametrize("pairs, message", [
    ([("port", "-1")], "--port -1: expected a port number 0-65535"),
    ([("port", "65536")], "--port 65536"),
    ([("ip", "300.1.1.1")], "--ip 300.1.1.1: not an IP address or CIDR"),
    ([("pod", "a/b/c")], "--pod a/b/c"),
    ([("service", "ns/")], "--service ns/"),
    ([("label", " ")], "--label"),
    ([("ip-version", "5")], "--ip-version 5"),
    ([("not", None), ("not", None), ("pod", "a")], "--not: given twice"),
    ([("to-ip", "1.1.1.1"), ("ip", "2.2.2.2")], "--to-ip 1.1.1.1: cannot be combined with --ip"),
    ([("to-namespace", "a"), ("pod", "b")], "--pod b: cannot be combined with --to-namespace"),
])
def test_bad_values_name_the_flag(pairs, message):
    with pytest.raises(ff.FlagError) as e:
        build(*pairs)
    assert message in str(e.value)


def test_raw_filters_round_trip():
    allow, deny = build(("pod", "it's"), ("not", None), ("verdict", "DROPPED"))
    text = ff.format_raw_filters(allow, deny)
    assert "it''s" in text  # YAML single-quote escaping
    item = text.splitlines()[1].strip()[3:-1].replace("''", "'")
    assert ff.parse_raw_filters("allowlist", [item]) == allow[:1]


# -- times and selection ---------------------------------------------------------------------

@pytest.mark.parametrize("value, ns", [
    ("10s", 10 * 10**9), ("1h30m", 5400 * 10**9), ("1.5s", 1_500_000_000), ("300ms", 300_000_000),
    ("2m0.5s", 120_500_000_000), (".5h", 1800 * 10**9)])
def test_parse_duration(value, ns):
    assert ff.parse_duration("since", value) == ns


@pytest.mark.parametrize("value", ["", "5", "5d", "m", "-5m", "0s", "5m "])
def test_parse_duration_rejects(value):
    with pytest.raises(ff.FlagError, match="--since"):
        ff.parse_duration("since", value)


def test_parse_time():
    now = 1_714_564_800 * 10**9
    assert ff.parse_time("since", "5m", now) == now - 300 * 10**9
    assert ff.parse_time("since", "2024-05-01T12:00:00Z", now) == now
    assert ff.parse_time("since", "2024-05-01T14:00:00.25+02:00", now) == now + 250_000_000


def test_build_request():
    req = ff.build_request([flt(verdict=[F.DROPPED])], [], since="10m", until="5m", now_ns=10**12)
    assert req.number == 0 and req.since.ToNanoseconds() == 10**12 - 600 * 10**9
    assert list(req.whitelist) == [flt(verdict=[F.DROPPED])]
    with pytest.raises(ff.FlagError, match="--until 10m: is before --since 5m"):
        ff.build_request(since="5m", until="10m")
    with pytest.raises(ff.FlagError, match="--first 2: cannot be combined with --last"):
        ff.build_request(last=1, first=2)


# -- printer details ---------------------------------------------------------------------------

def _resp(**kw):
    return O.GetFlowsResponse(flow=F.Flow(**kw))


def test_hosts_and_identities():
    flow = F.Flow(IP=F.IP(source="2001:db8::1", destination="10.0.0.9"),
                  l4=F.Layer4(TCP=F.TCP(source_port=443, destination_port=80)),
                  source=F.Endpoint(identity=9), destination=F.Endpoint(identity=300),
                  destination_service=F.Service(name="api", namespace="shop"))
    assert printer.source_host(flow) == "[2001:db8::1]:443"
    assert printer.destination_host(flow) == "shop/api:80"
    assert printer.format_identity(flow.source) == "(world-ipv4)"
    assert printer.format_identity(flow.destination) == "(ID:300)"
    assert printer.format_identity(F.Endpoint(identity=104, labels=["reserved:coredns"])) == "(coredns)"
    assert printer.format_identity(F.Endpoint()) == "(ID:0)"


@pytest.mark.parametrize("l4, text", [
    (F.Layer4(ICMPv4=F.ICMPv4(type=3, code=3)), "ICMPv4 DestinationUnreachable(Port)"),
    (F.Layer4(ICMPv4=F.ICMPv4(type=42)), "ICMPv4 type 42 code 0"),
    (F.Layer4(ICMPv6=F.ICMPv6(type=128)), "ICMPv6 EchoRequest"),
    (F.Layer4(TCP=F.TCP(flags=F.TCPFlags(FIN=True, ACK=True, PSH=True))), "TCP Flags: ACK, FIN, PSH"),
    (F.Layer4(TCP=F.TCP()), "TCP"),
    (F.Layer4(SCTP=F.SCTP()), "SCTP"),
])
def test_summary(l4, text):
    assert printer.summary(F.Flow(l4=l4)) == text


def test_types():
    assert printer.flow_type(F.Flow(event_type=F.CiliumEventType(type=4, sub_type=10))) == "from-network"
    drop = F.Flow(event_type=F.CiliumEventType(type=1), drop_reason_desc=F.SERVICE_BACKEND_NOT_FOUND)
    assert printer.flow_type(drop) == "Service backend not found"
    assert printer.flow_type(F.Flow(event_type=F.CiliumEventType(type=1, sub_type=181))) == \
        "Policy denied by denylist"
    xlate = F.Flow(event_type=F.CiliumEventType(type=7),
                   sock_xlate_point=F.SOCK_XLATE_POINT_POST_DIRECTION_FWD)
    assert printer.flow_type(xlate) == "post-xlate-fwd"


def test_table_flushes_every_n_rows_with_growing_widths():
    out = io.StringIO()
    p = printer.FlowPrinter("table", out, flush_every=1)
    p.write(_resp(IP=F.IP(source="1.1.1.1", destination="2.2.2.2"), verdict=F.FORWARDED))
    first = out.getvalue().splitlines()
    assert len(first) == 2 and first[1].split()[1:3] == ["1.1.1.1", "2.2.2.2"]
    p.write(_resp(IP=F.IP(source="10.100.100.100", destination="2.2.2.2"), verdict=F.DROPPED))
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[2].index("2.2.2.2") > lines[1].index("2.2.2.2")


def test_node_status_goes_to_stderr_in_text_formats():
    out, err = io.StringIO(), io.StringIO()
    p = printer.FlowPrinter("compact", out, err)
    p.write(O.GetFlowsResponse(node_status=relay_pb2.NodeStatusEvent(
        state_change=relay_pb2.NODE_UNAVAILABLE, node_names=["n1", "n2"], message="timeout")))
    assert out.getvalue() == "" and err.getvalue() == "NODE STATUS: NODE_UNAVAILABLE n1, n2: timeout\n"


@pytest.mark.parametrize("seconds, text", [(45, "45s"), (192, "3m12s"), (180, "3m"), (7500, "2h5m"),
                                           (3 * 86400 + 4 * 3600, "3d4h")])
def test_human_duration(seconds, text):
    assert printer.human_duration(seconds * 10**9) == text
