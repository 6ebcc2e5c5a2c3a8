"""Hubble's parser on recorded datapath event records (tests/unit/data/hubble_events.json,
written by tests/bpf/test_hubble_parse.py from real BPF_PROG_TEST_RUN output), the ring,
and the Flow protobuf round trips. No privileges needed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from google.protobuf import json_format

from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.nodeview import EndpointInfo, NullNodeView, PolicyRef
from cilium_py.hubble.parser import PACKET_OFFSET, ParseError, Parser
from cilium_py.hubble.ring import FlowRing

RECORDS = {name: [bytes.fromhex(h) for h in hexes] for name, hexes in
           json.loads((Path(__file__).parent / "data" / "hubble_events.json").read_text()).items()}

POD_IP, PEER_IP = "10.244.1.10", "10.244.2.20"
POD_ID, POD_IDENTITY, PEER_IDENTITY = 101, 10101, 20202


class Enricher:
    def __init__(self):
        self.generation = 1
        self.pod_name = "web-1"
        self.endpoint_calls = 0

    def endpoint_by_ip(self, ip):
        self.endpoint_calls += 1
        if ip == POD_IP:
            return EndpointInfo(POD_ID, POD_IDENTITY, "shop", self.pod_name, ("k8s:app=web",))
        return None

    def identity_by_ip(self, ip):
        return PEER_IDENTITY if ip == PEER_IP else 0

    def identity_labels(self, identity):
        return {PEER_IDENTITY: ("k8s:app=db",), 2: ("reserved:world",)}.get(identity, ())

    def policy_by_cookie(self, cookie):
        return {7: PolicyRef("allow-web", "shop", "CiliumNetworkPolicy"),
                9: PolicyRef("deny-db", "shop", "CiliumNetworkPolicy")}.get(cookie)

    def service_by_frontend(self, ip, port, protocol):
        return ("db", "shop") if (ip, port, protocol) == (PEER_IP, 80, 6) else None


def parse(name: str, enricher=None) -> list[F.Flow]:
    parser = Parser("node-a", enricher or Enricher())
    flows = parser.parse_batch(RECORDS[name])
    assert parser.errors == 0
    return flows


def test_trace_record():
    (trace,) = parse("udp_to_world")
    assert trace.verdict == F.FORWARDED and trace.event_type.type == 4
    assert trace.trace_observation_point == F.FROM_ENDPOINT
    assert trace.traffic_direction == F.EGRESS and trace.trace_reason == F.NEW
    assert (trace.source.pod_name, trace.source.ID, trace.source.identity) == ("web-1", POD_ID, POD_IDENTITY)
    assert (trace.destination.identity, list(trace.destination.labels)) == (2, ["reserved:world"])
    assert (trace.l4.UDP.source_port, trace.l4.UDP.destination_port) == (5353, 53)
    assert trace.node_name == "node-a" and trace.Type == F.L3_L4
    assert trace.interface.index == 1


def test_policy_verdict_allowed_record_names_policy_and_service():
    verdict, trace = parse("allowed_egress_tcp")
    assert verdict.event_type.type == 5 and verdict.verdict == F.FORWARDED
    assert verdict.policy_match_type == 2
    assert [p.name for p in verdict.egress_allowed_by] == ["allow-web"]
    assert verdict.destination.identity == PEER_IDENTITY
    assert (verdict.destination_service.name, verdict.destination_service.namespace) == ("db", "shop")
    assert trace.l4.TCP.flags.SYN


def test_policy_verdict_denied_record_and_drop_record():
    verdict, drop = parse("default_deny_ingress_tcp")
    assert verdict.verdict == drop.verdict == F.DROPPED
    assert drop.drop_reason_desc == F.POLICY_DENIED and drop.event_type.sub_type == 133
    assert drop.traffic_direction == F.INGRESS
    assert drop.destination.pod_name == "web-1" and drop.source.identity == PEER_IDENTITY


def test_explicit_deny_drop_carries_the_policy_of_its_verdict():
    verdict, drop = parse("explicit_deny_egress_tcp")
    assert drop.drop_reason_desc == F.POLICY_DENY
    assert [p.name for p in drop.egress_denied_by] == [p.name for p in verdict.egress_denied_by] == ["deny-db"]


def test_drop_without_its_verdict_names_no_policy():
    parser = Parser("node-a", Enricher())
    drop = parser.parse(RECORDS["explicit_deny_egress_tcp"][1])
    assert drop.drop_reason_desc == F.POLICY_DENY and not drop.egress_denied_by


def test_reply_and_icmp_records():
    (reply,) = parse("reply_egress_tcp")
    assert reply.is_reply.value and reply.traffic_direction == F.INGRESS
    (icmp,) = parse("icmp_echo_egress")
    assert (icmp.l4.ICMPv4.type, icmp.l4.ICMPv4.code) == (8, 0)


def test_invalid_source_drop_record():
    (drop,) = parse("invalid_source_drop")
    assert drop.drop_reason_desc == F.INVALID_SOURCE_IP and drop.traffic_direction == F.EGRESS


def test_without_enrichment_flows_carry_addresses_and_identities():
    (trace,) = parse("udp_to_world", NullNodeView())
    assert trace.source.pod_name == "" and trace.source.identity == POD_IDENTITY
    assert trace.IP.source == POD_IP


def test_enrichment_is_cached_until_the_generation_changes():
    enricher = Enricher()
    parser = Parser("node-a", enricher)
    parser.parse_batch(RECORDS["udp_to_world"] * 50)
    calls = enricher.endpoint_calls
    assert calls <= 2
    enricher.pod_name, enricher.generation = "web-2", 2
    (flow,) = parser.parse_batch(RECORDS["udp_to_world"])
    assert flow.source.pod_name == "web-2"


@pytest.mark.parametrize("raw,message", [
    (b"", "0 bytes"),
    (b"\x01" * (PACKET_OFFSET - 1), "need at least"),
    (bytes([99]) + bytes(PACKET_OFFSET + 10), "unknown event type 99"),
])
def test_bad_records_raise_and_are_counted(raw, message):
    parser = Parser("node-a")
    with pytest.raises(ParseError, match=message):
        parser.parse(raw)
    assert parser.parse_batch([raw, RECORDS["udp_to_world"][0]]) and parser.errors == 1


def test_truncated_packet_still_gives_a_flow():
    raw = RECORDS["udp_to_world"][0]
    cut = bytearray(raw[:PACKET_OFFSET + 20])
    struct.pack_into("<H", cut, 12, 20)  # len_cap: 20 bytes captured, not enough for IPv4
    flow = Parser("node-a").parse(bytes(cut))
    assert flow.IP.source == "" and not flow.l4.WhichOneof("protocol")


def test_flow_round_trips_through_bytes_and_json():
    for flows in map(parse, RECORDS):
        for flow in flows:
            assert F.Flow.FromString(flow.SerializeToString()) == flow
            assert json_format.Parse(json_format.MessageToJson(flow), F.Flow()) == flow


def test_uuids_are_unique_and_uuid_shaped():
    flows = Parser("n").parse_batch(RECORDS["udp_to_world"] * 1000)
    ids = [f.uuid for f in flows]
    assert len(set(ids)) == 1000
    import uuid
    assert all(uuid.UUID(i).version == 4 for i in ids[:10])


# -- the ring ----------------------------------------------------------------------

def _flows(n: int) -> list[F.Flow]:
    return Parser("n").parse_batch(RECORDS["udp_to_world"] * n)


def test_ring_keeps_the_last_capacity_flows_and_counts_all():
    ring = FlowRing(10)
    flows = _flows(25)
    ring.write(flows)
    entries, lost = ring.read_after(None)
    assert len(ring) == 10 and ring.seen_flows == 25 and lost == 0
    assert [e.event.uuid for e in entries] == [f.uuid for f in flows[-10:]]


def test_a_reader_that_falls_behind_learns_how_many_it_missed():
    ring = FlowRing(10)
    ring.write(_flows(5))
    seq = ring.last_seq
    ring.write(_flows(23))
    entries, lost = ring.read_after(seq)
    assert lost == 13 and len(entries) == 10


def test_ring_capacity_is_checked():
    with pytest.raises(ValueError, match="capacity"):
        FlowRing(0)
    assert FlowRing().capacity == 4095
