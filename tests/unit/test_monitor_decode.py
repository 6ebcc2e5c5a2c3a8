import ctypes

import pytest

from cilium_py.datapath.maps.events import EVENT_DROP, EVENT_POLICY_VERDICT, EVENT_TRACE, EventRecord
from cilium_py.datapath.monitor import EventDecodeError, decode, summarize_packet

# Ethernet + IPv4 + TCP SYN 10.244.1.2:40000 -> 10.244.1.3:80
TCP_SYN = bytes.fromhex(
    "02000000000102000000000208004500002800010000400600000af401020af40103"
    "9c40005000000000000000005002200000000000")


def record(kind, subtype=0, **fields) -> bytes:
    rec = EventRecord()
    rec.hdr.type, rec.hdr.subtype, rec.hdr.version = kind, subtype, 1
    rec.hdr.len_orig = rec.hdr.len_cap = len(TCP_SYN)
    ctypes.memmove(rec.data, TCP_SYN, len(TCP_SYN))
    for name, value in fields.items():
        setattr(rec, name, value)
    return bytes(rec)


def test_packet_summary():
    s = summarize_packet(TCP_SYN)
    assert (s.src_ip, s.src_port, s.dst_ip, s.dst_port, s.protocol) == ("10.244.1.2", 40000, "10.244.1.3", 80, 6)
    assert s.tcp_flags == ["SYN"]


def test_truncated_capture_gives_partial_summary():
    assert summarize_packet(TCP_SYN[:34]).src_port == 0
    assert summarize_packet(b"\x00" * 10).src_ip == ""


def test_drop_record():
    ev = decode(record(EVENT_DROP, 133, src_label=1002, dst_label=1001, dst_id=2, reason=1, ifindex=6))
    assert ev.type == "drop" and ev.drop_reason == 133 and ev.direction == "INGRESS"
    assert ev.to_dict()["drop_reason_name"] == "POLICY_DENIED"
    assert ev.line().startswith("xx drop (Policy denied)")
    assert "identity 1002->1001: 10.244.1.2:40000 -> 10.244.1.3:80 tcp SYN" in ev.line()


def test_trace_record():
    ev = decode(record(EVENT_TRACE, 0, src_label=1000, dst_label=1001, reason=2))
    assert (ev.observation_point, ev.ct_state) == ("to-endpoint", "reply")
    assert ev.line().startswith("-> endpoint")


def test_policy_verdict_record():
    ev = decode(record(EVENT_POLICY_VERDICT, 0, src_label=1000, flags=1 | (2 << 3), verdict=0,
                       dst_port=80, cookie=42))
    assert (ev.direction, ev.match_type, ev.policy_port, ev.rule_cookie) == ("INGRESS", "L3-L4", 80, 42)
    assert "action allow, match L3-L4" in ev.line()
    denied = decode(record(EVENT_POLICY_VERDICT, 0, flags=2, verdict=-181))
    assert denied.direction == "EGRESS" and "action deny" in denied.line()


def test_short_or_unknown_records_are_rejected():
    with pytest.raises(EventDecodeError, match="bytes"):
        decode(b"\x01" * 10)
    with pytest.raises(EventDecodeError, match="unknown event type"):
        decode(record(99))
