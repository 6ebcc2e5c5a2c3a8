import ctypes

import pytest

from cilium_py.datapath.maps.events import (
    EVENT_DROP,
    EVENT_POLICY_VERDICT,
    EVENT_TRACE,
    EventRecord,
    record_struct,
)
from cilium_py.datapath.monitor import EventDecodeError, decode, summarize_packet
from cilium_py.datapath.packet import decode_l3l4

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


# -- the shared L3/L4 decoder ------------------------------------------------------------------

# Ethernet + IPv4 + ICMP echo request 10.244.1.2 -> 10.244.1.3, identifier 0x1234, seq 1
ICMP_ECHO = bytes.fromhex(
    "02000000000102000000000208004500001c00010000400100000af401020af40103"
    "0800000012340001")


def test_decoder_reads_a_whole_tcp_header():
    assert decode_l3l4(TCP_SYN) == ("10.244.1.2", "10.244.1.3", 6, 40000, 80, 0x02, -1, -1)


def test_decoder_marks_what_a_short_capture_cut_off():
    # Ports captured, flags not; then not even the ports.
    assert decode_l3l4(TCP_SYN[:38])[3:6] == (40000, 80, -1)
    assert decode_l3l4(TCP_SYN[:34])[3:6] == (-1, -1, -1)
    assert decode_l3l4(TCP_SYN[:33]) is None
    assert decode_l3l4(TCP_SYN[:12] + b"\x86\xdd" + TCP_SYN[14:]) is None  # not IPv4


def test_decoder_keys_icmp_echo_by_its_identifier():
    assert decode_l3l4(ICMP_ECHO) == ("10.244.1.2", "10.244.1.3", 1, 0x1234, 0, -1, 8, 0)
    assert decode_l3l4(ICMP_ECHO[:36])[3:] == (0, 0, -1, 8, 0)  # type and code, no identifier


def test_monitor_summary_of_icmp_has_no_ports():
    s = summarize_packet(ICMP_ECHO)
    assert (s.protocol, s.icmp_type, s.icmp_code, s.src_port) == (1, 8, 0, 0)
    assert s.line() == "10.244.1.2 -> 10.244.1.3 icmp type 8 code 0"


# -- struct layouts derived from the mirror ----------------------------------------------------

def test_record_struct_reads_the_mirrors_fields():
    raw = record(EVENT_POLICY_VERDICT, 7, src_label=0x01020304, reason=9, flags=0x12,
                 ifindex=0x0A0B0C0D, verdict=-181, cookie=0xDEADBEEF)
    head = record_struct(EventRecord, ("hdr.type", "hdr.subtype", "hdr.len_cap", "src_label",
                                       "reason", "flags", "ifindex", "verdict", "cookie"))
    assert head.unpack_from(raw) == (EVENT_POLICY_VERDICT, 7, len(TCP_SYN), 0x01020304, 9, 0x12,
                                     0x0A0B0C0D, -181, 0xDEADBEEF)
    assert head.size == EventRecord.cookie.offset + 4


@pytest.mark.parametrize("names,error", [
    (("src_label", "hdr.type"), "offset order"),
    (("hdr.nope",), "no field 'hdr.nope'"),
    (("dst_port",), "not a little-endian integer"),  # __be16
    (("data",), "not a little-endian integer"),
])
def test_record_struct_refuses_what_it_cannot_unpack(names, error):
    with pytest.raises(ValueError, match=error):
        record_struct(EventRecord, names)
