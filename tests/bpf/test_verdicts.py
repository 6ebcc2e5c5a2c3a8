"""One test per verdict path of the datapath, run with BPF_PROG_TEST_RUN on crafted frames.

cil_from_container sees what leaves the pod (its egress policy), cil_to_container what
enters it (its ingress policy), cil_xdp_entry what reaches the node (the CIDR prefilter).
Every drop is checked by its reason, from the drop event and the per-reason metrics, not by
the return value alone; every enforced decision by its policy-verdict event.
"""

from __future__ import annotations

import errno
import struct

import pytest

from cilium_py.agent.policy.mapstate import PolicyRule, PolicyWriter, compute_map_state
from cilium_py.datapath import libbpf, reasons
from cilium_py.datapath.maps.conntrack import (
    CT_F_RX_CLOSING,
    CT_F_SEEN_NON_SYN,
    CT_F_TX_CLOSING,
    Connection,
)
from cilium_py.datapath.maps.policy import EGRESS, INGRESS, PolicyMapKey
from cilium_py.datapath.testrun import TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS

from . import packets as pk

pytestmark = [pytest.mark.bpf]

FROM = "cil_from_container"  # the pod's egress
TO = "cil_to_container"      # the pod's ingress
XDP = "cil_xdp_entry"

# Under BPF_PROG_TEST_RUN a tc program runs on the loopback device of the current netns.
TEST_RUN_IFINDEX = 1

POD_IP, POD_ID, POD_IDENTITY = "10.244.1.10", 101, 10101
PEER_IP, PEER_IDENTITY = "10.244.2.20", 20202   # known to the ipcache
WORLD_IP = "10.250.9.9"                          # unknown: identity world
OTHER_IP = "10.244.1.99"                         # no endpoint on this node

TCP, UDP, ICMP = 6, 17, 1
IDENTITY_WORLD = 2
DIR = {FROM: reasons.DIR_EGRESS, TO: reasons.DIR_INGRESS}
DIRECTION_NAME = {FROM: "EGRESS", TO: "INGRESS"}

DROP_INVALID_SIP = 132
DROP_POLICY = reasons.POLICY_DENIED          # 133
DROP_INVALID = 134
DROP_CT_INVALID_HDR = 135
DROP_UNKNOWN_L3 = 139
DROP_UNKNOWN_TARGET = 152
DROP_FRAG_NOSUPPORT = 157
DROP_POLICY_DENY = reasons.POLICY_DENY       # 181

CT_TIMEOUT_SYN, CT_TIMEOUT_TCP, CT_TIMEOUT_CLOSE, CT_TIMEOUT_ANY = 60, 8000, 10, 60


# -- setup helpers -----------------------------------------------------------------

@pytest.fixture
def pod(maps):
    """The pod under test on this node, owning the test-run device, and a known peer."""
    maps.endpoints.upsert(POD_IP, endpoint_id=POD_ID, ifindex=TEST_RUN_IFINDEX,
                          identity=POD_IDENTITY)
    maps.ipcache.upsert(PEER_IP, PEER_IDENTITY)
    return maps


def apply_policy(maps, rules, *, ingress: bool, egress: bool):
    PolicyWriter(maps.policy, maps.endpoints).apply(POD_IP, POD_ID, rules,
                                                    enforce_ingress=ingress, enforce_egress=egress)


def conns(maps, protocol: int | None = None) -> list[Connection]:
    return [c for c in maps.ct.connections() if protocol is None or c.protocol == protocol]


def only_conn(maps, protocol: int) -> Connection:
    found = conns(maps, protocol)
    assert len(found) == 1, found
    return found[0]


def assert_dropped(out, reason: int, program: str, maps, frame: bytes):
    """Dropped with `reason`: the tc/xdp verdict, the drop event and the metric agree."""
    if program == XDP:
        assert out.retval == XDP_DROP
        direction = reasons.DIR_INGRESS
    else:
        assert out.retval == TC_ACT_SHOT
        direction = DIR[program]
    drop = out.drop
    assert drop.drop_reason == reason, f"{reasons.drop_reason_name(drop.drop_reason)}"
    assert drop.direction == reasons.direction_name(direction)
    assert drop.length == len(frame)
    metric = maps.metrics.get(reason, direction)
    assert (metric.packets, metric.bytes) == (1, len(frame))
    assert maps.metrics.get(0, direction).packets == 0
    assert out.of_type("trace") == []


def assert_forwarded(out, program: str, maps, *, packets: int = 1):
    assert out.retval == TC_ACT_OK
    assert out.of_type("drop") == []
    assert maps.metrics.get(0, DIR[program]).packets == packets


def egress_syn(sport=40000, dport=80, flags="S", payload=b""):
    return pk.tcp(POD_IP, PEER_IP, sport, dport, flags, payload)


def ingress_syn(sport=40000, dport=80, flags="S", payload=b""):
    return pk.tcp(PEER_IP, POD_IP, sport, dport, flags, payload)


# -- which endpoint a packet belongs to ---------------------------------------------

def test_egress_from_address_no_endpoint_owns_is_invalid_source(harness, pod):
    frame = pk.tcp(OTHER_IP, PEER_IP, 40000, 80)
    out = harness.run(FROM, frame)
    assert_dropped(out, DROP_INVALID_SIP, FROM, pod, frame)
    assert conns(pod) == []


def test_egress_from_endpoint_of_another_device_is_invalid_source(harness, maps):
    # The address is a local endpoint's, but the packet arrived on a device it does not own.
    maps.endpoints.upsert(POD_IP, endpoint_id=POD_ID, ifindex=TEST_RUN_IFINDEX + 41,
                          identity=POD_IDENTITY)
    frame = egress_syn()
    out = harness.run(FROM, frame)
    assert_dropped(out, DROP_INVALID_SIP, FROM, maps, frame)


def test_ingress_to_address_no_endpoint_owns_is_unknown_target(harness, pod):
    frame = pk.tcp(PEER_IP, OTHER_IP, 40000, 80)
    out = harness.run(TO, frame)
    assert_dropped(out, DROP_UNKNOWN_TARGET, TO, pod, frame)
    assert out.drop.src_identity == PEER_IDENTITY


# -- allowed new flows ---------------------------------------------------------------

def test_new_flow_without_enforcement_is_tracked_without_verdict(harness, pod):
    frame = egress_syn()
    out = harness.run(FROM, frame)
    assert_forwarded(out, FROM, pod)
    assert out.of_type("policy-verdict") == []  # nothing enforced, nothing to report
    trace = out.trace
    assert (trace.observation_point, trace.ct_state) == ("from-endpoint", "new")
    assert (trace.source, trace.src_identity, trace.dst_identity) == (
        POD_ID, POD_IDENTITY, PEER_IDENTITY)
    conn = only_conn(pod, TCP)
    assert (conn.direction, str(conn.saddr), conn.sport, str(conn.daddr), conn.dport) == (
        "OUT", POD_IP, 40000, PEER_IP, 80)
    assert (conn.src_identity, conn.ifindex) == (POD_IDENTITY, TEST_RUN_IFINDEX)


def test_new_egress_flow_allowed_by_policy(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, EGRESS, TCP, 80, cookie=0xE1)],
                 ingress=False, egress=True)
    frame = egress_syn()
    out = harness.run(FROM, frame)
    assert_forwarded(out, FROM, pod)
    v = out.verdict
    assert (v.verdict, v.direction, v.match_type, v.rule_cookie) == (0, "EGRESS", "L3-L4", 0xE1)
    assert (v.source, v.src_identity, v.policy_port) == (POD_ID, PEER_IDENTITY, 80)
    assert out.trace.ct_state == "new"
    conn = only_conn(pod, TCP)
    assert (conn.direction, str(conn.daddr), conn.dport) == ("OUT", PEER_IP, 80)


def test_new_ingress_flow_allowed_by_policy(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, INGRESS, TCP, 8443, cookie=0x11)],
                 ingress=True, egress=False)
    frame = ingress_syn(dport=8443)
    out = harness.run(TO, frame)
    assert_forwarded(out, TO, pod)
    v = out.verdict
    assert (v.verdict, v.direction, v.match_type, v.rule_cookie) == (0, "INGRESS", "L3-L4", 0x11)
    assert (v.source, v.src_identity, v.policy_port) == (POD_ID, PEER_IDENTITY, 8443)
    trace = out.trace
    assert (trace.observation_point, trace.ct_state) == ("to-endpoint", "new")
    assert (trace.src_identity, trace.dst_identity, trace.dst_endpoint) == (
        PEER_IDENTITY, POD_IDENTITY, POD_ID)
    conn = only_conn(pod, TCP)
    assert (conn.direction, str(conn.saddr), str(conn.daddr), conn.dport) == (
        "IN", PEER_IP, POD_IP, 8443)
    assert conn.src_identity == PEER_IDENTITY


def test_unknown_peer_is_world(harness, pod):
    apply_policy(pod, [PolicyRule(IDENTITY_WORLD, EGRESS, TCP, 443, cookie=7)],
                 ingress=False, egress=True)
    out = harness.run(FROM, pk.tcp(POD_IP, WORLD_IP, 40000, 443))
    assert_forwarded(out, FROM, pod)
    assert (out.verdict.src_identity, out.verdict.match_type) == (IDENTITY_WORLD, "L3-L4")


# -- conntrack states: established, reply, related ------------------------------------------

def test_established_flow_skips_policy(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, EGRESS, TCP, 80, cookie=1)],
                 ingress=False, egress=True)
    first = harness.run(FROM, egress_syn())
    assert first.retval == TC_ACT_OK
    # The rule goes away; the connection it admitted keeps working.
    apply_policy(pod, [], ingress=False, egress=True)
    out = harness.run(FROM, egress_syn(flags="A", payload=b"x" * 10))
    assert_forwarded(out, FROM, pod, packets=2)
    assert out.of_type("policy-verdict") == []
    assert out.trace.ct_state == "established"  # a new TCP flag (ACK) is reported
    assert only_conn(pod, TCP).tx_packets == 2
    # A new connection (other source port) meets the policy again, and is denied.
    denied = harness.run(FROM, egress_syn(sport=40001))
    assert denied.drop.drop_reason == DROP_POLICY


@pytest.mark.parametrize("origin", [FROM, TO], ids=["pod-connects", "peer-connects"])
def test_reply_skips_policy_of_a_default_deny_direction(harness, pod, origin):
    reply_side = TO if origin == FROM else FROM
    direction = EGRESS if origin == FROM else INGRESS
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, direction, TCP, 80, cookie=3)],
                 ingress=True, egress=True)
    if origin == FROM:
        request, reply = egress_syn(), pk.tcp(PEER_IP, POD_IP, 80, 40000, "SA")
        stray = pk.tcp(PEER_IP, POD_IP, 80, 40001, "SA")
    else:
        request, reply = ingress_syn(), pk.tcp(POD_IP, PEER_IP, 80, 40000, "SA")
        stray = pk.tcp(POD_IP, PEER_IP, 80, 40001, "SA")
    assert harness.run(origin, request).retval == TC_ACT_OK

    out = harness.run(reply_side, reply)
    assert_forwarded(out, reply_side, pod)
    assert out.of_type("policy-verdict") == []
    assert out.trace.ct_state == "reply"
    conn = only_conn(pod, TCP)
    assert (conn.tx_packets, conn.rx_packets) == (1, 1)
    assert conn.rx_flags_seen == 0x12  # SYN|ACK

    # The same direction without a tracked connection is still default-deny.
    stray_out = harness.run(reply_side, stray)
    assert stray_out.drop.drop_reason == DROP_POLICY


def test_icmp_echo_reply_is_a_reply(harness, pod):
    apply_policy(pod, [PolicyRule(0, EGRESS, ICMP, pk.ICMP_ECHO, cookie=5)],
                 ingress=True, egress=True)
    assert harness.run(FROM, pk.icmp(POD_IP, PEER_IP, pk.ICMP_ECHO, id=0x77)).retval == TC_ACT_OK
    out = harness.run(TO, pk.icmp(PEER_IP, POD_IP, pk.ICMP_ECHOREPLY, id=0x77))
    assert_forwarded(out, TO, pod)
    assert out.trace.ct_state == "reply"
    # A reply to an echo nobody sent is a new, denied message.
    stray = harness.run(TO, pk.icmp(PEER_IP, POD_IP, pk.ICMP_ECHOREPLY, id=0x78))
    assert stray.drop.drop_reason == DROP_POLICY


@pytest.mark.parametrize("origin", [FROM, TO], ids=["pod-sent", "peer-sent"])
def test_icmp_error_quoting_tracked_flow_is_related(harness, pod, origin):
    error_side = TO if origin == FROM else FROM
    direction = EGRESS if origin == FROM else INGRESS
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, direction, UDP, 53, cookie=9)],
                 ingress=True, egress=True)
    sender, receiver = (POD_IP, PEER_IP) if origin == FROM else (PEER_IP, POD_IP)
    assert harness.run(origin, pk.udp(sender, receiver, 5353, 53, b"query")).retval == TC_ACT_OK

    # The receiver answers with port unreachable, quoting the datagram as it was sent.
    frame = pk.icmp_error(receiver, sender, pk.quoted_udp(sender, receiver, 5353, 53))
    out = harness.run(error_side, frame)
    assert_forwarded(out, error_side, pod)
    assert out.of_type("policy-verdict") == []
    assert out.trace.ct_state == "related"

    # An error about a datagram nobody tracked is an ordinary, denied ICMP message.
    untracked = pk.icmp_error(receiver, sender, pk.quoted_udp(sender, receiver, 5354, 53))
    denied = harness.run(error_side, untracked)
    assert denied.drop.drop_reason == DROP_POLICY
    assert denied.verdict.policy_port == pk.ICMP_DEST_UNREACH


# -- policy drops --------------------------------------------------------------------

@pytest.mark.parametrize("program", [FROM, TO], ids=["egress", "ingress"])
def test_default_deny_without_allow_entry_is_policy_denied(harness, pod, program):
    apply_policy(pod, [], ingress=True, egress=True)
    frame = egress_syn() if program == FROM else ingress_syn()
    out = harness.run(program, frame)
    assert_dropped(out, DROP_POLICY, program, pod, frame)
    v = out.verdict
    assert (v.verdict, v.direction, v.match_type, v.rule_cookie) == (
        -DROP_POLICY, DIRECTION_NAME[program], "none", 0)
    assert v.src_identity == PEER_IDENTITY
    drop = out.drop
    assert drop.source == POD_ID
    if program == FROM:
        assert (drop.src_identity, drop.dst_identity) == (POD_IDENTITY, PEER_IDENTITY)
    else:
        assert (drop.src_identity, drop.dst_identity, drop.dst_endpoint) == (
            PEER_IDENTITY, POD_IDENTITY, POD_ID)
    assert conns(pod) == []


def test_allow_for_another_identity_or_port_does_not_allow(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY + 1, EGRESS, TCP, 80),
                       PolicyRule(PEER_IDENTITY, EGRESS, TCP, 81),
                       PolicyRule(PEER_IDENTITY, EGRESS, UDP, 80)], ingress=False, egress=True)
    frame = egress_syn(dport=80)
    assert_dropped(harness.run(FROM, frame), DROP_POLICY, FROM, pod, frame)


DENY_CASES = {
    # The allow is identity-specific, the deny is for any identity: the datapath's two
    # lookups find both and the deny wins.
    "any-identity-deny-vs-l3-allow": (
        [PolicyRule(PEER_IDENTITY, EGRESS, TCP, 80, cookie=0xA11),
         PolicyRule(0, EGRESS, TCP, 80, deny=True, cookie=0xDE1)], "L4-Only"),
    # The deny is identity-specific, the allow is for any identity on the same port.
    "l3-deny-vs-any-identity-allow": (
        [PolicyRule(0, EGRESS, TCP, 80, cookie=0xA11),
         PolicyRule(PEER_IDENTITY, EGRESS, TCP, 80, deny=True, cookie=0xDE1)], "L3-L4"),
    # A wide deny (every protocol) of the same identity covers a narrow allow: the agent
    # folds the allow into a deny so the longest LPM match cannot hide it.
    "wide-deny-vs-narrow-allow": (
        [PolicyRule(PEER_IDENTITY, EGRESS, TCP, 80, cookie=0xA11),
         PolicyRule(PEER_IDENTITY, EGRESS, deny=True, cookie=0xDE1)], "L3-L4"),
    # A deny for any peer on any port of TCP beats a port-specific allow of the peer.
    "proto-deny-vs-l3-l4-allow": (
        [PolicyRule(PEER_IDENTITY, EGRESS, TCP, 80, cookie=0xA11),
         PolicyRule(0, EGRESS, TCP, deny=True, cookie=0xDE1)], "Proto-Only"),
}


@pytest.mark.parametrize("rules,match", DENY_CASES.values(), ids=DENY_CASES.keys())
def test_explicit_deny_beats_allow(harness, pod, rules, match):
    apply_policy(pod, rules, ingress=False, egress=True)
    frame = egress_syn()
    out = harness.run(FROM, frame)
    assert_dropped(out, DROP_POLICY_DENY, FROM, pod, frame)
    v = out.verdict
    assert (v.verdict, v.match_type, v.rule_cookie) == (-DROP_POLICY_DENY, match, 0xDE1)
    assert conns(pod) == []


def test_deny_of_one_port_leaves_other_ports_allowed(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, EGRESS, TCP, cookie=0xA11),
                       PolicyRule(0, EGRESS, TCP, 81, deny=True, cookie=0xDE1)],
                 ingress=False, egress=True)
    allowed = harness.run(FROM, egress_syn(dport=80))
    assert_forwarded(allowed, FROM, pod)
    assert (allowed.verdict.match_type, allowed.verdict.rule_cookie) == ("L3-Proto", 0xA11)
    denied = harness.run(FROM, egress_syn(dport=81))
    assert denied.drop.drop_reason == DROP_POLICY_DENY


# -- port ranges and ICMP types ------------------------------------------------------------

RANGE_RULE = PolicyRule(0, INGRESS, TCP, 8080, 8090, cookie=0x8080)


def test_port_range_becomes_lpm_prefixes():
    state = compute_map_state(POD_ID, [RANGE_RULE])
    blocks = sorted(k.port_range for k in state)
    assert blocks == [(8080, 8087), (8088, 8089), (8090, 8090)]


@pytest.mark.parametrize("port,allowed", [(8079, False), (8080, True), (8085, True),
                                          (8087, True), (8088, True), (8090, True),
                                          (8091, False)])
def test_port_range_edges(harness, pod, port, allowed):
    apply_policy(pod, [RANGE_RULE], ingress=True, egress=False)
    frame = ingress_syn(dport=port)
    out = harness.run(TO, frame)
    v = out.verdict
    assert v.policy_port == port
    if allowed:
        assert_forwarded(out, TO, pod)
        assert (v.verdict, v.match_type, v.rule_cookie) == (0, "L4-Only", 0x8080)
        assert only_conn(pod, TCP).dport == port
    else:
        assert_dropped(out, DROP_POLICY, TO, pod, frame)
        assert (v.verdict, v.match_type) == (-DROP_POLICY, "none")


@pytest.mark.parametrize("icmp_type,allowed", [(pk.ICMP_ECHO, True), (pk.ICMP_TIMESTAMP, False)],
                         ids=["echo-request", "timestamp"])
def test_icmp_type_rule(harness, pod, icmp_type, allowed):
    apply_policy(pod, [PolicyRule(0, EGRESS, ICMP, pk.ICMP_ECHO, cookie=0x1C)],
                 ingress=False, egress=True)
    frame = pk.icmp(POD_IP, PEER_IP, icmp_type)
    out = harness.run(FROM, frame)
    v = out.verdict
    assert (v.policy_port, v.packet.protocol, v.packet.icmp_type) == (icmp_type, ICMP, icmp_type)
    if allowed:
        assert_forwarded(out, FROM, pod)
        assert (v.verdict, v.match_type, v.rule_cookie) == (0, "L4-Only", 0x1C)
        assert only_conn(pod, ICMP).direction == "OUT"
    else:
        assert_dropped(out, DROP_POLICY, FROM, pod, frame)


MATCH_CASES = {
    "L3-L4": PolicyRule(PEER_IDENTITY, EGRESS, TCP, 80, cookie=0x101),
    "L4-Only": PolicyRule(0, EGRESS, TCP, 80, cookie=0x102),
    "L3-Proto": PolicyRule(PEER_IDENTITY, EGRESS, TCP, cookie=0x103),
    "Proto-Only": PolicyRule(0, EGRESS, TCP, cookie=0x104),
    "L3-Only": PolicyRule(PEER_IDENTITY, EGRESS, cookie=0x105),
    "all": PolicyRule(0, EGRESS, cookie=0x106),
}


@pytest.mark.parametrize("match,rule", MATCH_CASES.items(), ids=MATCH_CASES.keys())
def test_policy_verdict_reports_match_type_and_cookie(harness, pod, match, rule):
    apply_policy(pod, [rule], ingress=False, egress=True)
    out = harness.run(FROM, egress_syn())
    assert out.retval == TC_ACT_OK
    v = out.verdict
    assert (v.match_type, v.rule_cookie, v.verdict) == (match, rule.cookie, 0)
    assert (v.packet.src_ip, v.packet.dst_ip, v.packet.dst_port) == (POD_IP, PEER_IP, 80)


def test_l3_allow_wins_a_tie_with_any_identity_allow(harness, pod):
    apply_policy(pod, [PolicyRule(0, EGRESS, TCP, 80, cookie=0x1),
                       PolicyRule(PEER_IDENTITY, EGRESS, TCP, 80, cookie=0x2)],
                 ingress=False, egress=True)
    v = harness.run(FROM, egress_syn()).verdict
    assert (v.match_type, v.rule_cookie) == ("L3-L4", 0x2)


def test_longer_port_prefix_wins_between_allows(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, EGRESS, TCP, cookie=0x1),
                       PolicyRule(0, EGRESS, TCP, 80, cookie=0x2)],
                 ingress=False, egress=True)
    v = harness.run(FROM, egress_syn()).verdict
    assert (v.match_type, v.rule_cookie) == ("L4-Only", 0x2)


# -- XDP prefilter ---------------------------------------------------------------------

DENIED_CIDR = "10.250.0.0/16"


@pytest.mark.parametrize("src,verdict", [("10.250.3.4", XDP_DROP), ("10.250.255.255", XDP_DROP),
                                         ("10.251.0.1", XDP_PASS), (PEER_IP, XDP_PASS)])
def test_prefilter(harness, maps, src, verdict):
    maps.prefilter.deny(DENIED_CIDR)
    frame = pk.tcp(src, POD_IP, 40000, 80)
    out = harness.run(XDP, frame)
    if verdict == XDP_DROP:
        assert_dropped(out, DROP_POLICY_DENY, XDP, maps, frame)
        assert out.drop.src_identity == IDENTITY_WORLD
        assert out.drop.packet.src_ip == src
    else:
        assert out.retval == XDP_PASS
        assert out.events == []
        assert maps.metrics.list() == []


def test_prefilter_drops_fragments_of_denied_sources(harness, maps):
    maps.prefilter.deny(DENIED_CIDR)
    for more, offset in ((True, 0), (False, 8)):
        frame = pk.ipv4_fragment("10.250.3.4", POD_IP, more_fragments=more, offset=offset)
        assert harness.run(XDP, frame).drop.drop_reason == DROP_POLICY_DENY
        frame = pk.ipv4_fragment(PEER_IP, POD_IP, more_fragments=more, offset=offset)
        assert harness.run(XDP, frame).retval == XDP_PASS


def test_prefilter_removal_lets_source_pass(harness, maps):
    maps.prefilter.deny(DENIED_CIDR)
    frame = pk.tcp("10.250.3.4", POD_IP, 40000, 80)
    assert harness.run(XDP, frame).retval == XDP_DROP
    assert maps.prefilter.allow(DENIED_CIDR)
    assert harness.run(XDP, frame).retval == XDP_PASS


@pytest.mark.parametrize("frame", [
    pk.arp_request("10.250.3.4", POD_IP),
    pk.ethertype_only(pk.ETH_P_IPV6, b"\x60" + b"\x00" * 39),
    pk.ipv4_cut(pk.tcp("10.250.3.4", POD_IP, 1, 2), 10),
    pk.ipv4_with_ihl("10.250.3.4", POD_IP, 4),
], ids=["arp", "ipv6", "short-ip", "bad-ihl"])
def test_prefilter_passes_what_it_cannot_judge(harness, maps, frame):
    maps.prefilter.deny(DENIED_CIDR)
    out = harness.run(XDP, frame)
    assert out.retval == XDP_PASS
    assert out.events == []


# -- TCP state and lifetimes --------------------------------------------------------------

def expires_in(maps, protocol=TCP) -> int:
    return only_conn(maps, protocol).expires_in


def assert_lifetime(maps, timeout: int, protocol=TCP):
    # The datapath stamped now + timeout; a second may have ticked since.
    left = expires_in(maps, protocol)
    assert timeout - 2 <= left <= timeout, f"expires in {left}s, expected ~{timeout}s"


def test_tcp_lifetimes_through_a_connection(harness, pod):
    assert harness.run(FROM, egress_syn(flags="S")).retval == TC_ACT_OK
    assert_lifetime(pod, CT_TIMEOUT_SYN)
    assert not only_conn(pod, TCP).flags & CT_F_SEEN_NON_SYN

    assert harness.run(TO, pk.tcp(PEER_IP, POD_IP, 80, 40000, "SA")).retval == TC_ACT_OK
    assert_lifetime(pod, CT_TIMEOUT_SYN)  # SYN-ACK still carries SYN

    assert harness.run(FROM, egress_syn(flags="A")).retval == TC_ACT_OK
    assert_lifetime(pod, CT_TIMEOUT_TCP)
    assert only_conn(pod, TCP).flags & CT_F_SEEN_NON_SYN

    assert harness.run(FROM, egress_syn(flags="FA")).retval == TC_ACT_OK
    assert_lifetime(pod, CT_TIMEOUT_TCP)  # one side closing is not closed
    assert only_conn(pod, TCP).flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING) == CT_F_TX_CLOSING

    assert harness.run(TO, pk.tcp(PEER_IP, POD_IP, 80, 40000, "FA")).retval == TC_ACT_OK
    assert_lifetime(pod, CT_TIMEOUT_CLOSE)
    conn = only_conn(pod, TCP)
    assert conn.flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING) == CT_F_TX_CLOSING | CT_F_RX_CLOSING
    assert (conn.tx_flags_seen, conn.rx_flags_seen) == (0x13, 0x13)  # SYN|ACK|FIN both ways


@pytest.mark.parametrize("rst_side", [FROM, TO], ids=["pod-resets", "peer-resets"])
def test_tcp_rst_closes_connection(harness, pod, rst_side):
    assert harness.run(FROM, egress_syn(flags="S")).retval == TC_ACT_OK
    assert harness.run(FROM, egress_syn(flags="A")).retval == TC_ACT_OK
    assert_lifetime(pod, CT_TIMEOUT_TCP)
    rst = egress_syn(flags="R") if rst_side == FROM else pk.tcp(PEER_IP, POD_IP, 80, 40000, "R")
    assert harness.run(rst_side, rst).retval == TC_ACT_OK
    assert_lifetime(pod, CT_TIMEOUT_CLOSE)


def test_syn_after_close_starts_the_connection_over(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, EGRESS, TCP, 80, cookie=4)],
                 ingress=False, egress=True)
    harness.run(FROM, egress_syn(flags="S"))
    harness.run(FROM, egress_syn(flags="R"))
    assert_lifetime(pod, CT_TIMEOUT_CLOSE)
    out = harness.run(FROM, egress_syn(flags="S"))
    assert out.retval == TC_ACT_OK
    assert out.verdict.verdict == 0  # the reused tuple went through policy again
    assert out.trace.ct_state == "new"
    conn = only_conn(pod, TCP)
    assert conn.tx_packets == 1 and conn.flags == 0
    assert_lifetime(pod, CT_TIMEOUT_SYN)


def test_tcp_picked_up_mid_stream_is_established_lifetime(harness, pod):
    assert harness.run(FROM, egress_syn(flags="A")).retval == TC_ACT_OK
    assert_lifetime(pod, CT_TIMEOUT_TCP)


@pytest.mark.parametrize("protocol", [UDP, ICMP])
def test_non_tcp_lifetime(harness, pod, protocol):
    frame = pk.udp(POD_IP, PEER_IP, 5000, 53) if protocol == UDP else pk.icmp(POD_IP, PEER_IP)
    assert harness.run(FROM, frame).retval == TC_ACT_OK
    assert_lifetime(pod, CT_TIMEOUT_ANY, protocol)
    assert conns(pod, TCP) == []


# -- counters --------------------------------------------------------------------------

def test_counters(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, EGRESS, UDP, 53, cookie=0xC0)],
                 ingress=True, egress=True)
    out1 = pk.udp(POD_IP, PEER_IP, 5353, 53, b"a" * 10)
    out2 = pk.udp(POD_IP, PEER_IP, 5353, 53, b"b" * 100)
    back = pk.udp(PEER_IP, POD_IP, 53, 5353, b"c" * 300)
    for program, frame in ((FROM, out1), (FROM, out2), (TO, back)):
        assert harness.run(program, frame).retval == TC_ACT_OK

    conn = only_conn(pod, UDP)
    assert (conn.tx_packets, conn.tx_bytes) == (2, len(out1) + len(out2))
    assert (conn.rx_packets, conn.rx_bytes) == (1, len(back))

    egress = pod.metrics.get(0, reasons.DIR_EGRESS)
    ingress = pod.metrics.get(0, reasons.DIR_INGRESS)
    assert (egress.packets, egress.bytes) == (2, len(out1) + len(out2))
    assert (ingress.packets, ingress.bytes) == (1, len(back))

    # The policy entry counts the packets it decided: only the connection's first.
    key = PolicyMapKey(POD_ID, PEER_IDENTITY, EGRESS, UDP, 53, 16)
    entry = pod.policy.entries(POD_ID)[key]
    assert (entry.packets, entry.bytes) == (1, len(out1))

    # Drops are counted per reason and direction, apart from forwarded packets.
    denied = pk.udp(PEER_IP, POD_IP, 53, 9999)
    for _ in range(3):
        assert harness.run(TO, denied).retval == TC_ACT_SHOT
    dropped = pod.metrics.get(DROP_POLICY, reasons.DIR_INGRESS)
    assert (dropped.packets, dropped.bytes) == (3, 3 * len(denied))
    assert pod.metrics.get(0, reasons.DIR_INGRESS).packets == 1


# -- truncated and malformed frames --------------------------------------------------------

# Frames the kernel may refuse to turn into an skb for a tc test run: since Linux 6.x
# BPF_PROG_TEST_RUN wants the whole network header an IPv4/IPv6 ethertype announces (EINVAL
# otherwise), as no device would hand tc such a frame either. The same header checks
# (ipv4_parse) are still run on these bytes through XDP below, which accepts them.
KERNEL_MAY_REFUSE = {
    "ethernet-only": (pk.ethertype_only(pk.ETH_P_IP), DROP_INVALID),
    "short-ip-header": (pk.ipv4_cut(pk.tcp(POD_IP, PEER_IP, 40000, 80), 10), DROP_INVALID),
    "ip-header-19-bytes": (pk.ipv4_cut(pk.tcp(POD_IP, PEER_IP, 40000, 80), 19), DROP_INVALID),
}

MALFORMED = {
    # name: (frame, drop reason)
    "ihl-4": (pk.ipv4_with_ihl(POD_IP, PEER_IP, 4), DROP_INVALID),
    "ihl-0": (pk.ipv4_with_ihl(POD_IP, PEER_IP, 0), DROP_INVALID),
    "ihl-past-end": (pk.ipv4_with_ihl(POD_IP, PEER_IP, 15), DROP_INVALID),
    "version-6-in-ipv4": (pk.ipv4_with_version(POD_IP, PEER_IP, 6), DROP_INVALID),
    "truncated-tcp": (pk.ipv4_header_with_truncated_l4(POD_IP, PEER_IP, TCP, 10),
                      DROP_CT_INVALID_HDR),
    "tcp-no-header": (pk.ipv4_header_with_truncated_l4(POD_IP, PEER_IP, TCP, 0),
                      DROP_CT_INVALID_HDR),
    "truncated-udp": (pk.ipv4_header_with_truncated_l4(POD_IP, PEER_IP, UDP, 4),
                      DROP_CT_INVALID_HDR),
    "truncated-icmp": (pk.ipv4_header_with_truncated_l4(POD_IP, PEER_IP, ICMP, 4),
                       DROP_CT_INVALID_HDR),
    "first-fragment": (pk.ipv4_fragment(POD_IP, PEER_IP, more_fragments=True, offset=0),
                       DROP_FRAG_NOSUPPORT),
    "later-fragment": (pk.ipv4_fragment(POD_IP, PEER_IP, more_fragments=False, offset=8),
                       DROP_FRAG_NOSUPPORT),
    "ipv6": (pk.ethertype_only(pk.ETH_P_IPV6, b"\x60" + b"\x00" * 39), DROP_UNKNOWN_L3),
    "unknown-ethertype": (pk.ethertype_only(0x88B5, b"\x00" * 46), DROP_UNKNOWN_L3),
}


def _for_direction(frame: bytes, program: str) -> bytes:
    """The egress frames go pod -> peer; for ingress swap the IPv4 addresses so the pod is
    the destination (only where the header is long enough to hold them)."""
    if program == FROM or len(frame) < pk.ETH_HLEN + 20 or frame[12:14] != b"\x08\x00":
        return frame
    buf = bytearray(frame)
    s, d = pk.ETH_HLEN + 12, pk.ETH_HLEN + 16
    buf[s:s + 4], buf[d:d + 4] = frame[d:d + 4], frame[s:s + 4]
    return bytes(buf)


@pytest.mark.parametrize("program", [FROM, TO], ids=["egress", "ingress"])
@pytest.mark.parametrize("frame,reason", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frame_has_defined_drop_reason(harness, pod, program, frame, reason):
    frame = _for_direction(frame, program)
    out = harness.run(program, frame)
    assert_dropped(out, reason, program, pod, frame)
    assert out.of_type("policy-verdict") == []
    assert conns(pod) == []


@pytest.mark.parametrize("program", [FROM, TO], ids=["egress", "ingress"])
@pytest.mark.parametrize("frame,reason", KERNEL_MAY_REFUSE.values(),
                         ids=KERNEL_MAY_REFUSE.keys())
def test_short_ip_header_is_refused_or_dropped(harness, pod, program, frame, reason):
    try:
        out = harness.run(program, frame)
    except OSError as e:
        # The kernel builds no skb from it: no tc program can be handed this frame.
        assert e.errno == errno.EINVAL
        assert harness.collector.drain() == []
        return
    assert_dropped(out, reason, program, pod, frame)


@pytest.mark.parametrize("program", [FROM, TO])
def test_arp_passes_untouched(harness, pod, program):
    apply_policy(pod, [], ingress=True, egress=True)  # even fully default-deny
    frame = pk.arp_request(POD_IP, PEER_IP)
    out = harness.run(program, frame)
    assert out.retval == TC_ACT_OK
    assert out.events == []
    assert pod.metrics.list() == []
    assert out.data[: len(frame)] == frame


@pytest.mark.parametrize("size", [1, 8, 13])
@pytest.mark.parametrize("program", [FROM, TO, XDP])
def test_runt_ethernet_frame_never_reaches_a_program(datapath, event_collector, program, size):
    """The kernel refuses a test frame shorter than an Ethernet header (EINVAL), for tc and
    XDP alike, as no device hands one to either; that refusal is the defined outcome. The
    programs' own check (eth_load_proto) is what keeps the verifier satisfied."""
    with pytest.raises(OSError) as err:
        libbpf.prog_test_run(datapath.fd(program), b"\x02" * size)
    assert err.value.errno == errno.EINVAL
    assert event_collector.drain() == []


# struct xdp_md as BPF_PROG_TEST_RUN takes it: data, data_end, data_meta, ingress_ifindex,
# rx_queue_index, egress_ifindex. Bytes before `data` become metadata: a bigger buffer cannot
# smuggle a runt frame past the kernel either.
XDP_MD = struct.Struct("=6I")


def test_runt_ethernet_frame_behind_xdp_metadata_is_refused(datapath, event_collector):
    frame = b"\x02" * 16
    ctx = XDP_MD.pack(4, len(frame), 0, 0, 0, 0)  # 12 bytes visible to the program
    with pytest.raises(OSError) as err:
        libbpf.prog_test_run(datapath.fd(XDP), frame, ctx=ctx)
    assert err.value.errno == errno.EINVAL
    assert event_collector.drain() == []


@pytest.mark.parametrize("meta", [0, 4, 32])
def test_xdp_sees_only_the_frame_after_metadata(harness, maps, meta):
    """With metadata in front, the prefilter still reads the source at the right offset."""
    maps.prefilter.deny(DENIED_CIDR)
    frame = b"\xee" * meta + pk.tcp("10.250.3.4", POD_IP, 40000, 80)
    ctx = XDP_MD.pack(meta, len(frame), 0, 0, 0, 0)
    retval, _, _ = libbpf.prog_test_run(harness.datapath.fd(XDP), frame, ctx=ctx)
    assert retval == XDP_DROP
    drops = harness.collector.drain()
    assert [e.drop_reason for e in drops] == [DROP_POLICY_DENY]
    assert drops[0].length == len(frame) - meta
