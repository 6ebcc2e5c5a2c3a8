"""Hubble's parser on the records the real datapath emits: one case per record type and
verdict, run with BPF_PROG_TEST_RUN, each checking the Flow a user would see.

With CILIUMPY_RECORD_HUBBLE_EVENTS=1 the records of these cases are written to
tests/unit/data/hubble_events.json, the fixture of the unprivileged parser tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cilium_py.agent.policy.mapstate import PolicyRule
from cilium_py.datapath.maps.policy import EGRESS, INGRESS
from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.nodeview import EndpointInfo, PolicyRef
from cilium_py.hubble.parser import Parser

from . import packets as pk
from .test_verdicts import (
    FROM,
    PEER_IDENTITY,
    PEER_IP,
    POD_ID,
    POD_IDENTITY,
    POD_IP,
    TO,
    WORLD_IP,
    apply_policy,
    egress_syn,
    ingress_syn,
    pod,  # noqa: F401 - the fixture
)

pytestmark = [pytest.mark.bpf]

FIXTURE = Path(__file__).parent.parent / "unit" / "data" / "hubble_events.json"
RECORDED: dict[str, list[str]] = {}

POD_LABELS = ("k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop")
PEER_LABELS = ("k8s:app=db", "k8s:io.kubernetes.pod.namespace=shop")
ALLOW_COOKIE, DENY_COOKIE = 7, 9


class LabEnricher:
    """What an agent would know about the pod under test, its peer and two policies."""

    generation = 1

    def endpoint_by_ip(self, ip):
        if ip == POD_IP:
            return EndpointInfo(POD_ID, POD_IDENTITY, "shop", "web-1", POD_LABELS)
        return None

    def identity_by_ip(self, ip):
        return PEER_IDENTITY if ip == PEER_IP else 0

    def identity_labels(self, identity):
        return {PEER_IDENTITY: PEER_LABELS, 2: ("reserved:world",)}.get(identity, ())

    def policy_by_cookie(self, cookie):
        return {ALLOW_COOKIE: PolicyRef("allow-web", "shop", "CiliumNetworkPolicy"),
                DENY_COOKIE: PolicyRef("deny-db", "shop", "CiliumNetworkPolicy")}.get(cookie)

    def service_by_frontend(self, ip, port, protocol):
        return None


def flows_of(name: str, out) -> list[F.Flow]:
    if os.environ.get("CILIUMPY_RECORD_HUBBLE_EVENTS"):
        RECORDED[name] = [r.hex() for r in out.records]
    parser = Parser("bpftest", LabEnricher())
    flows = parser.parse_batch(out.records)
    assert parser.errors == 0
    return flows


@pytest.fixture(scope="module", autouse=True)
def record_fixture():
    yield
    if RECORDED:
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(RECORDED, indent=1, sort_keys=True) + "\n")


def assert_pod(ep: F.Endpoint):
    assert (ep.ID, ep.identity, ep.namespace, ep.pod_name) == (POD_ID, POD_IDENTITY, "shop", "web-1")
    assert list(ep.labels) == list(POD_LABELS)


def assert_peer(ep: F.Endpoint):
    assert (ep.ID, ep.identity, ep.pod_name) == (0, PEER_IDENTITY, "")
    assert list(ep.labels) == list(PEER_LABELS)


def test_allowed_egress_gives_a_verdict_and_a_trace(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, EGRESS, 6, 80, cookie=ALLOW_COOKIE)],
                 ingress=False, egress=True)
    verdict, trace = flows_of("allowed_egress_tcp", harness.run(FROM, egress_syn()))
    assert verdict.event_type.type == 5 and trace.event_type.type == 4
    assert verdict.verdict == F.FORWARDED
    assert verdict.traffic_direction == F.EGRESS
    assert verdict.policy_match_type == 2  # L3-L4
    assert [(p.name, p.namespace, p.kind) for p in verdict.egress_allowed_by] == [
        ("allow-web", "shop", "CiliumNetworkPolicy")]
    assert not verdict.ingress_allowed_by and not verdict.egress_denied_by
    for flow in (verdict, trace):
        assert_pod(flow.source)
        assert_peer(flow.destination)
        assert (flow.IP.source, flow.IP.destination, flow.IP.ipVersion) == (POD_IP, PEER_IP, F.IPv4)
        assert (flow.l4.TCP.source_port, flow.l4.TCP.destination_port) == (40000, 80)
        assert flow.l4.TCP.flags.SYN and not flow.l4.TCP.flags.ACK
        assert flow.node_name == "bpftest" and flow.Type == F.L3_L4
    assert trace.verdict == F.FORWARDED
    assert trace.trace_observation_point == F.FROM_ENDPOINT
    assert trace.event_type.sub_type == 5
    assert trace.trace_reason == F.NEW
    assert trace.HasField("is_reply") and not trace.is_reply.value
    assert trace.traffic_direction == F.EGRESS
    assert verdict.uuid != trace.uuid


def test_default_deny_ingress_drop(harness, pod):
    apply_policy(pod, [], ingress=True, egress=False)
    flows = flows_of("default_deny_ingress_tcp", harness.run(TO, ingress_syn()))
    verdict, drop = flows
    assert verdict.verdict == F.DROPPED and verdict.drop_reason_desc == F.POLICY_DENIED
    assert verdict.policy_match_type == 0
    assert drop.verdict == F.DROPPED
    assert drop.drop_reason_desc == F.POLICY_DENIED and drop.drop_reason == 133
    assert drop.event_type.type == 1 and drop.event_type.sub_type == 133
    assert drop.traffic_direction == F.INGRESS
    assert not drop.HasField("is_reply")  # a drop is judged before reply or not matters
    assert not drop.ingress_denied_by  # nothing denied it: nothing allowed it
    assert_peer(drop.source)
    assert_pod(drop.destination)


def test_explicit_deny_names_the_policy_on_the_drop(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, EGRESS, 6, 80, cookie=ALLOW_COOKIE),
                       PolicyRule(0, EGRESS, 6, 80, deny=True, cookie=DENY_COOKIE)],
                 ingress=False, egress=True)
    verdict, drop = flows_of("explicit_deny_egress_tcp", harness.run(FROM, egress_syn()))
    assert verdict.drop_reason_desc == drop.drop_reason_desc == F.POLICY_DENY
    for flow in (verdict, drop):
        assert [(p.name, p.namespace) for p in flow.egress_denied_by] == [("deny-db", "shop")]
        assert not flow.egress_allowed_by
    assert drop.traffic_direction == F.EGRESS


def test_reply_trace_is_a_reply_in_the_other_direction(harness, pod):
    apply_policy(pod, [PolicyRule(PEER_IDENTITY, INGRESS, 6, 80, cookie=ALLOW_COOKIE)],
                 ingress=True, egress=True)
    harness.run(TO, ingress_syn())
    reply = flows_of("reply_egress_tcp",
                     harness.run(FROM, pk.tcp(POD_IP, PEER_IP, 80, 40000, "SA")))
    assert len(reply) == 1
    trace = reply[0]
    assert trace.trace_reason == F.REPLY and trace.is_reply.value
    # The pod answers a connection made to it: the flow belongs to its ingress.
    assert trace.traffic_direction == F.INGRESS
    assert trace.l4.TCP.flags.SYN and trace.l4.TCP.flags.ACK


def test_udp_to_world_and_icmp(harness, pod):
    udp = flows_of("udp_to_world", harness.run(FROM, pk.udp(POD_IP, WORLD_IP, 5353, 53)))
    (trace,) = udp
    assert (trace.l4.UDP.source_port, trace.l4.UDP.destination_port) == (5353, 53)
    assert trace.destination.identity == 2
    assert list(trace.destination.labels) == ["reserved:world"]
    icmp = flows_of("icmp_echo_egress", harness.run(FROM, pk.icmp(POD_IP, PEER_IP)))
    (trace,) = icmp
    assert (trace.l4.ICMPv4.type, trace.l4.ICMPv4.code) == (8, 0)


def test_invalid_source_drop(harness, pod):
    flows = flows_of("invalid_source_drop", harness.run(FROM, pk.tcp("10.244.1.77", PEER_IP, 1, 2)))
    (drop,) = flows
    assert drop.drop_reason_desc == F.INVALID_SOURCE_IP
    assert drop.source.identity == 0 or drop.source.identity == 2
