"""`hubble` against an in-process fake Observer on a unix socket.

The fake records each request and answers with canned flows, so the tests check both
what the CLI sends (filters, selection) and how it prints what comes back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from click.testing import CliRunner

from cilium_py.cli.hubble import cli, resolve_server
from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.api.observer import observer_pb2 as O
from cilium_py.hubble.api.observer import observer_pb2_grpc
from cilium_py.hubble.api.relay import relay_pb2
from cilium_py.cli.hubble_filterflags import ALL_FLOWS

T0 = 1714564800  # 2024-05-01T12:00:00Z

WEB = dict(ID=11, identity=1234, namespace="shop", pod_name="web-1",
           labels=["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"])
DB = dict(ID=12, identity=5678, namespace="shop", pod_name="db-0",
          labels=["k8s:app=db", "k8s:io.kubernetes.pod.namespace=shop"])
WORLD = dict(identity=2, labels=["reserved:world"])
HOST = dict(identity=1, labels=["reserved:host"])


def _flow(ms: int, **kw) -> O.GetFlowsResponse:
    flow = F.Flow(Type=F.L3_L4, node_name="node-1", **kw)
    flow.time.FromNanoseconds((T0 * 1000 + ms) * 1_000_000)
    resp = O.GetFlowsResponse(flow=flow, node_name="node-1")
    resp.time.CopyFrom(flow.time)
    return resp


DROP = _flow(
    123, verdict=F.DROPPED, drop_reason=133, drop_reason_desc=F.POLICY_DENIED,
    event_type=F.CiliumEventType(type=1, sub_type=133), traffic_direction=F.INGRESS,
    IP=F.IP(source="10.0.1.5", destination="10.0.2.7", ipVersion=F.IPv4),
    l4=F.Layer4(TCP=F.TCP(source_port=41234, destination_port=5432, flags=F.TCPFlags(SYN=True))),
    source=F.Endpoint(**WEB), destination=F.Endpoint(**DB),
    ingress_denied_by=[F.Policy(name="deny-db", namespace="shop", kind="CiliumNetworkPolicy")])
REPLY = _flow(
    456, verdict=F.FORWARDED, event_type=F.CiliumEventType(type=4, sub_type=0),
    trace_observation_point=F.TO_ENDPOINT, is_reply={"value": True},
    IP=F.IP(source="10.0.2.7", destination="10.0.1.5", ipVersion=F.IPv4),
    l4=F.Layer4(TCP=F.TCP(source_port=5432, destination_port=41234,
                          flags=F.TCPFlags(SYN=True, ACK=True))),
    source=F.Endpoint(**DB), destination=F.Endpoint(**WEB))
VERDICT = _flow(
    789, verdict=F.FORWARDED, event_type=F.CiliumEventType(type=5), policy_match_type=1,
    traffic_direction=F.INGRESS, is_reply={"value": False},
    IP=F.IP(source="203.0.113.9", destination="10.0.1.5", ipVersion=F.IPv4),
    l4=F.Layer4(ICMPv4=F.ICMPv4(type=8)), source=F.Endpoint(**WORLD),
    destination=F.Endpoint(**WEB),
    ingress_allowed_by=[F.Policy(name="allow-ping", namespace="shop", kind="CiliumNetworkPolicy")])
DNS = _flow(
    1000, verdict=F.FORWARDED, event_type=F.CiliumEventType(type=4, sub_type=5),
    is_reply={"value": False}, IP=F.IP(source="10.0.1.5", destination="192.168.1.10"),
    l4=F.Layer4(UDP=F.UDP(source_port=40000, destination_port=53)),
    source=F.Endpoint(**WEB), destination=F.Endpoint(**HOST))
LOST = O.GetFlowsResponse(lost_events=F.LostEvent(source=F.HUBBLE_RING_BUFFER, num_events_lost=12),
                          node_name="node-1")
CANNED = [DROP, REPLY, VERDICT, DNS, LOST]

COMPACT = [
    "May  1 12:00:00.123: shop/web-1:41234 (ID:1234) <> shop/db-0:5432 (ID:5678) "
    "Policy denied DROPPED (TCP Flags: SYN)",
    "May  1 12:00:00.456: shop/web-1:41234 (ID:1234) <- shop/db-0:5432 (ID:5678) "
    "to-endpoint FORWARDED (TCP Flags: SYN, ACK)",
    "May  1 12:00:00.789: 203.0.113.9 (world) -> shop/web-1 (ID:1234) "
    "policy-verdict:L3-Only INGRESS FORWARDED (ICMPv4 EchoRequest)",
    "May  1 12:00:01.000: shop/web-1:40000 (ID:1234) -> 192.168.1.10:53 (host) "
    "from-endpoint FORWARDED (UDP)",
    "EVENTS LOST: HUBBLE_RING_BUFFER CPU(0) 12",
]


class FakeObserver(observer_pb2_grpc.ObserverServicer):
    def __init__(self):
        self.requests: list[O.GetFlowsRequest] = []
        self.responses = list(CANNED)
        self.reject = ""           # abort GetFlows with INVALID_ARGUMENT and this message
        self.hold_open = False     # with follow: keep the stream open until the client leaves
        self.cancelled = threading.Event()

    def GetFlows(self, request, context):
        self.requests.append(request)
        if self.reject:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.reject)
        yield from self.responses
        if request.follow and self.hold_open:
            if context.add_callback(self.cancelled.set):
                self.cancelled.wait()

    def ServerStatus(self, request, context):
        resp = O.ServerStatusResponse(num_flows=123, max_flows=4095, seen_flows=5000,
                                      uptime_ns=3_600_000_000_000, version="fake", flows_rate=1.5)
        resp.num_connected_nodes.value = 1
        resp.num_unavailable_nodes.value = 0
        return resp

    def GetNodes(self, request, context):
        return O.GetNodesResponse(nodes=[
            O.Node(name="node-1", state=relay_pb2.NODE_CONNECTED, uptime_ns=192_000_000_000,
                   num_flows=100, max_flows=4095, seen_flows=384),
            O.Node(name="node-0", state=relay_pb2.NODE_UNAVAILABLE),
        ])


@pytest.fixture
def utc(monkeypatch):
    """Compact times are local time; pin the zone so the expected lines are fixed."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def fake(tmp_path, utc, monkeypatch):
    monkeypatch.delenv("HUBBLE_SERVER", raising=False)
    servicer = FakeObserver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    observer_pb2_grpc.add_ObserverServicer_to_server(servicer, server)
    sock = tmp_path / "hubble.sock"
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    servicer.address = f"unix://{sock}"
    yield servicer
    server.stop(None)


def observe(fake, *args):
    return CliRunner().invoke(cli, ["observe", "--server", fake.address, *args])


def sent(fake) -> O.GetFlowsRequest:
    assert len(fake.requests) == 1
    return fake.requests[0]


def flt(**fields) -> F.FlowFilter:
    return F.FlowFilter(**fields)


# -- selection -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, number, first, follow", [
    ([], 20, False, False),             # plain `hubble observe`: the last 20
    (["--last", "5"], 5, False, False),
    (["--first", "3"], 3, True, False),
    (["--all"], ALL_FLOWS, False, False),
    (["-f"], 0, False, True),           # follow alone: no history, only new flows
    (["-f", "--last", "7"], 7, False, True),
    (["--since", "5m"], 0, False, False),  # a time window alone: everything in it
])
def test_selection(fake, args, number, first, follow):
    result = observe(fake, *args)
    assert result.exit_code == 0, result.output
    req = sent(fake)
    assert (req.number, req.first, req.follow) == (number, first, follow)


def test_since_until(fake):
    result = observe(fake, "--since", "2024-05-01T12:00:00Z", "--until", "2024-05-01T14:30:00+02:00")
    assert result.exit_code == 0, result.output
    req = sent(fake)
    assert req.since.seconds == T0 and req.until.seconds == T0 + 1800
    before = time.time_ns()
    assert observe(fake, "--since", "1h30m").exit_code == 0
    since = fake.requests[1].since.ToNanoseconds()
    assert before - 5400 * 10**9 - 10**9 < since <= time.time_ns() - 5400 * 10**9


# -- filter translation ----------------------------------------------------------------------

def test_not_negates_only_the_next_flag(fake):
    result = observe(fake, "--not", "--pod", "a", "--to-port", "80")
    assert result.exit_code == 0, result.output
    req = sent(fake)
    assert list(req.whitelist) == [flt(destination_port=["80"])]
    assert list(req.blacklist) == [flt(source_pod=["a"]), flt(destination_pod=["a"])]


def test_order_decides_what_not_negates(fake):
    assert observe(fake, "--to-port", "80", "--not", "--pod", "a", "--pod", "b").exit_code == 0
    req = sent(fake)
    # only the first --pod after --not is negated; the second one is whitelisted
    assert list(req.blacklist) == [flt(source_pod=["a"]), flt(destination_pod=["a"])]
    assert list(req.whitelist) == [flt(source_pod=["b"], destination_port=["80"]),
                                   flt(destination_pod=["b"], destination_port=["80"])]


def test_either_direction_makes_two_ored_filters(fake):
    assert observe(fake, "--ip", "10.0.0.0/8", "--verdict", "dropped", "--protocol", "TCP").exit_code == 0
    common = dict(verdict=[F.DROPPED], protocol=["tcp"])
    assert list(sent(fake).whitelist) == [flt(source_ip=["10.0.0.0/8"], **common),
                                          flt(destination_ip=["10.0.0.0/8"], **common)]


def test_from_and_to_flags_make_one_filter(fake):
    assert observe(fake, "--from-pod", "shop/web", "--to-label", "app=db", "--to-port", "5432",
                   "--from-identity", "world", "--to-identity", "5678").exit_code == 0
    assert list(sent(fake).whitelist) == [flt(
        source_pod=["shop/web"], destination_label=["app=db"], destination_port=["5432"],
        source_identity=[2], destination_identity=[5678])]


@pytest.mark.parametrize("args, whitelist", [
    (["-n", "shop"], [flt(source_pod=["shop/"]), flt(destination_pod=["shop/"])]),
    (["-n", "shop", "--pod", "web"], [flt(source_pod=["shop/web"]), flt(destination_pod=["shop/web"])]),
    (["--from-namespace", "shop", "--to-namespace", "db"],
     [flt(source_pod=["shop/"], destination_pod=["db/"])]),
    (["--from-namespace", "shop", "--from-pod", "web"], [flt(source_pod=["shop/web"])]),
])
def test_namespace(fake, args, whitelist):
    result = observe(fake, *args)
    assert result.exit_code == 0, result.output
    assert list(sent(fake).whitelist) == whitelist


def test_other_filter_flags(fake):
    result = observe(fake, "-t", "trace:to-endpoint", "--type", "drop", "--tcp-flags", "syn,ack",
                     "--traffic-direction", "INGRESS", "--drop-reason-desc", "policy_denied",
                     "--node-name", "kind-*", "--uuid", "u-1", "-4", "--label", "k8s:app=web")
    assert result.exit_code == 0, result.output
    common = dict(event_type=[F.EventTypeFilter(type=4, match_sub_type=True, sub_type=0),
                              F.EventTypeFilter(type=1)],
                  tcp_flags=[F.TCPFlags(SYN=True, ACK=True)], traffic_direction=[F.INGRESS],
                  drop_reason_desc=[F.POLICY_DENIED], node_name=["kind-*"], uuid=["u-1"],
                  ip_version=[F.IPv4])
    assert list(sent(fake).whitelist) == [flt(source_label=["k8s:app=web"], **common),
                                          flt(destination_label=["k8s:app=web"], **common)]


def test_raw_lists_are_added(fake):
    result = observe(fake, "--verdict", "DROPPED", "--allowlist", '{"source_pod": ["kube-system/"]}',
                     "--denylist", '{"destinationPort": ["53"]}')
    assert result.exit_code == 0, result.output
    req = sent(fake)
    assert list(req.whitelist) == [flt(verdict=[F.DROPPED]), flt(source_pod=["kube-system/"])]
    assert list(req.blacklist) == [flt(destination_port=["53"])]


def test_print_raw_filters_needs_no_server(monkeypatch):
    monkeypatch.setenv("HUBBLE_SERVER", "/nonexistent/hubble.sock")
    result = CliRunner().invoke(cli, ["observe", "--print-raw-filters", "--not", "-n", "kube-system",
                                      "--verdict", "DROPPED"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "allowlist:", """  - '{"verdict":["DROPPED"]}'""",
        "denylist:", """  - '{"source_pod":["kube-system/"]}'""",
        """  - '{"destination_pod":["kube-system/"]}'"""]


# -- bad input: exit 2, the flag named, nothing sent -----------------------------------------

@pytest.mark.parametrize("args, flag, detail", [
    (["--verdict", "BOGUS"], "--verdict BOGUS", "FORWARDED, DROPPED"),
    (["--port", "70000"], "--port 70000", "0-65535"),
    (["--to-port", "http"], "--to-port http", "0-65535"),
    (["--ip", "10.0.0.0/33"], "--ip 10.0.0.0/33", "CIDR"),
    (["--from-ip", "10.0.0.1/8"], "--from-ip 10.0.0.1/8", "10.0.0.0/8"),
    (["-o", "bogus"], "--output", "compact"),
    (["--bogus"], "--bogus", "No such option"),
    (["--type", "trace:nowhere"], "--type trace:nowhere", "to-endpoint"),
    (["--type", "dns"], "--type dns", "policy-verdict"),
    (["--identity", "nobody"], "--identity nobody", "world"),
    (["--protocol", "gopher"], "--protocol gopher", "tcp"),
    (["--tcp-flags", "SYN,BOGUS"], "--tcp-flags SYN,BOGUS", "ACK"),
    (["--traffic-direction", "up"], "--traffic-direction up", "ingress"),
    (["--drop-reason-desc", "NOPE"], "--drop-reason-desc NOPE", "POLICY_DENIED"),
    (["-n", "Shop"], "--namespace Shop", "namespace"),
    (["--not"], "--not", "filter flag"),
    (["--not", "--follow", "--pod", "a"], "--not", "--follow"),
    (["--pod", "a", "--from-pod", "b"], "--from-pod b", "--pod"),
    (["-n", "shop", "--from-pod", "web"], "--from-pod web", "direction"),
    (["--since", "yesterday"], "--since yesterday", "RFC3339"),
    (["--until", "2024-05-01T12:00:00"], "--until 2024-05-01T12:00:00", "offset"),
    (["--first", "3", "--follow"], "--first 3", "--follow"),
    (["--last", "0"], "--last", "x>=1"),
    (["--last", "3", "--all"], "--last 3", "--all"),
    (["--allowlist", "{nope"], "--allowlist", "JSON"),
    (["--server", "nonsense"], "--server", "host:port"),
    (["--timeout", "soon"], "--timeout", "duration"),
])
def test_bad_input(fake, args, flag, detail):
    result = observe(fake, *args)
    assert result.exit_code == 2, result.output
    assert flag in result.output and detail in result.output
    assert "Traceback" not in result.output
    assert fake.requests == []


def test_server_rejection_is_shown(fake):
    fake.reject = "invalid filter: source_label: cannot parse label selector 'a=(b'"
    result = observe(fake, "--label", "a=b")
    assert result.exit_code == 1
    assert "invalid filter: source_label: cannot parse label selector" in result.output


# -- output ---------------------------------------------------------------------------------

def test_compact(fake):
    result = observe(fake)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == COMPACT


def test_compact_policy_and_node_names(fake):
    fake.responses = [DROP, VERDICT]
    result = observe(fake, "--print-policy-names", "--print-node-name")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("May  1 12:00:00.123 [node-1]: shop/web-1:41234")
    assert lines[0].endswith("(TCP Flags: SYN) [ingress denied by shop/deny-db (CiliumNetworkPolicy)]")
    assert lines[1].endswith("[ingress allowed by shop/allow-ping (CiliumNetworkPolicy)]")


@pytest.mark.parametrize("fmt", ["json", "jsonpb"])
def test_json(fake, fmt):
    result = observe(fake, "-o", fmt)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(CANNED)
    first = json.loads(lines[0])
    assert first["nodeName"] == "node-1" and first["time"] == "2024-05-01T12:00:00.123Z"
    assert first["flow"]["verdict"] == "DROPPED" and first["flow"]["dropReasonDesc"] == "POLICY_DENIED"
    assert first["flow"]["l4"]["TCP"]["flags"] == {"SYN": True}
    assert json.loads(lines[1])["flow"]["isReply"] is True
    assert json.loads(lines[4])["lostEvents"] == {"source": "HUBBLE_RING_BUFFER", "numEventsLost": "12"}


def test_dict(fake):
    fake.responses = [DROP, VERDICT]
    result = observe(fake, "-o", "dict")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "  TIMESTAMP: May  1 12:00:00.123",
        "     SOURCE: shop/web-1:41234 (ID:1234)",
        "DESTINATION: shop/db-0:5432 (ID:5678)",
        "       TYPE: Policy denied",
        "    VERDICT: DROPPED",
        "    SUMMARY: TCP Flags: SYN",
        "DROP_REASON: POLICY_DENIED",
        "     POLICY: ingress denied by shop/deny-db (CiliumNetworkPolicy)",
        "------------",
        "  TIMESTAMP: May  1 12:00:00.789",
        "     SOURCE: 203.0.113.9 (world)",
        "DESTINATION: shop/web-1 (ID:1234)",
        "       TYPE: policy-verdict:L3-Only INGRESS",
        "    VERDICT: FORWARDED",
        "    SUMMARY: ICMPv4 EchoRequest",
        "     POLICY: ingress allowed by shop/allow-ping (CiliumNetworkPolicy)",
    ]


def test_table(fake):
    result = observe(fake, "-o", "table")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert len(lines) == 1 + len(CANNED)
    # columns line up: every field starts where its header does
    start = lines[0].index("VERDICT")
    verdicts = [line[start:].split()[0] for line in lines[1:5]]
    assert verdicts == ["DROPPED", "FORWARDED", "FORWARDED", "FORWARDED"]
    assert lines[1][lines[0].index("TYPE"):].startswith("Policy denied ")
    assert lines[3][lines[0].index("SOURCE"):].startswith("203.0.113.9 ")
    assert lines[5] == COMPACT[4]


def test_nothing_matched_prints_nothing(fake):
    fake.responses = []
    for fmt in ("compact", "table", "dict", "json"):
        result = observe(fake, "-o", fmt)
        assert result.exit_code == 0 and result.stdout == "", fmt


# -- status and nodes -------------------------------------------------------------------------

def test_status(fake):
    result = CliRunner().invoke(cli, ["status", "--server", fake.address])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"Healthcheck (via {fake.address}): Ok",
        "Current/Max Flows: 123/4,095 (3.00%)",
        "Flows/s: 1.50",
        "Connected Nodes: 1/1",
    ]
    result = CliRunner().invoke(cli, ["status", "--server", fake.address, "-o", "json"])
    data = json.loads(result.stdout)
    assert data["numFlows"] == "123" and data["maxFlows"] == "4095" and data["numConnectedNodes"] == 1


def test_list_nodes(fake, monkeypatch):
    monkeypatch.setenv("HUBBLE_SERVER", fake.address)  # no --server: the variable decides
    result = CliRunner().invoke(cli, ["list", "nodes"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows == [
        ["NAME", "STATUS", "AGE", "FLOWS/S", "CURRENT/MAX-FLOWS"],
        ["node-0", "Unavailable", "N/A", "N/A", "N/A"],
        ["node-1", "Connected", "3m12s", "2.00", "100/4,095", "(2.44%)"],
    ]
    result = CliRunner().invoke(cli, ["list", "nodes", "-o", "json"])
    assert [n["name"] for n in json.loads(result.stdout)["nodes"]] == ["node-1", "node-0"]


# -- connection problems ----------------------------------------------------------------------

def test_missing_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBBLE_SERVER", str(tmp_path / "nope.sock"))
    for args in (["observe"], ["status"], ["list", "nodes"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1
        assert f"unix://{tmp_path}/nope.sock" in result.output and "--server" in result.output


def test_stale_socket(tmp_path):
    import socket

    path = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.close()  # bound, never listening: connect() is refused
    result = CliRunner().invoke(cli, ["status", "--server", f"unix:{path}"])
    assert result.exit_code == 1 and "nothing is listening" in result.output


def test_unreachable_tcp_server(monkeypatch):
    monkeypatch.delenv("HUBBLE_SERVER", raising=False)
    result = CliRunner().invoke(cli, ["status", "--server", ":1", "--timeout", "1s"])
    assert result.exit_code == 1
    assert "localhost:1: connection refused" in result.output and "--server" in result.output


@pytest.mark.parametrize("address, target", [
    ("unix:///run/h.sock", "unix:///run/h.sock"),
    ("unix:/run/h.sock", "unix:///run/h.sock"),
    ("/run/h.sock", "unix:///run/h.sock"),
    ("relay:4245", "relay:4245"),
    (":4245", "localhost:4245"),
    ("[::1]:4245", "[::1]:4245"),
])
def test_resolve_server(address, target):
    assert resolve_server(address) == target


@pytest.mark.parametrize("address", ["relay", "relay:http", "unix:run/h.sock", "::1:4245", "h:70000"])
def test_resolve_server_rejects(address):
    with pytest.raises(ValueError):
        resolve_server(address)


# -- a real process: Ctrl-C and closed pipes end quietly --------------------------------------

def _spawn(fake, *args):
    return subprocess.Popen([sys.executable, "-m", "cilium_py.cli.hubble", "observe",
                             "--server", fake.address, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TZ": "UTC"})


def test_ctrl_c_ends_follow_cleanly(fake):
    fake.hold_open = True
    proc = _spawn(fake, "--follow", "-o", "table")
    try:
        # the rows appear only once the table is flushed while the stream stays open
        lines = [proc.stdout.readline() for _ in range(1 + len(CANNED))]
        assert lines[0].split()[0] == "TIMESTAMP" and lines[-1].startswith("EVENTS LOST")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
        assert fake.cancelled.wait(timeout=20)  # the stream was cancelled, not leaked
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_closed_pipe_ends_cleanly(fake):
    fake.responses = CANNED * 2000  # far more than a pipe buffer holds
    proc = _spawn(fake)
    try:
        assert proc.stdout.readline().rstrip("\n") == COMPACT[0]
        proc.stdout.close()  # like `| head -1`
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
