"""ciliumpy_events (ring or perf buffer) record layout and ciliumpy_events_lost, the per-CPU
count of records the buffer had no room for (bpf/lib/events.h)."""

from __future__ import annotations

import ctypes

from .base import BpfMap, be16

EVENT_DROP = 1
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5
EVENT_TYPES = {EVENT_DROP: "drop", EVENT_TRACE: "trace", EVENT_POLICY_VERDICT: "policy-verdict"}

TRACE_PAYLOAD_LEN = 128

PV_FLAG_INGRESS = 1
PV_FLAG_EGRESS = 2
PV_MATCH_SHIFT = 3


class EventHeader(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("subtype", ctypes.c_uint8),
        ("source", ctypes.c_uint16),
        ("hash", ctypes.c_uint32),
        ("len_orig", ctypes.c_uint32),
        ("len_cap", ctypes.c_uint16),
        ("version", ctypes.c_uint16),
    ]


class EventRecord(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("src_label", ctypes.c_uint32),
        ("dst_label", ctypes.c_uint32),
        ("dst_id", ctypes.c_uint16),
        ("reason", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("ifindex", ctypes.c_uint32),
        ("line", ctypes.c_uint16),
        ("file", ctypes.c_uint8),
        ("ext_error", ctypes.c_int8),
        ("dst_port", be16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("verdict", ctypes.c_int32),
        ("cookie", ctypes.c_uint32),
        ("data", ctypes.c_uint8 * TRACE_PAYLOAD_LEN),
    ]


class EventsLostMap(BpfMap):
    NAME = "ciliumpy_events_lost"
    KEY = ctypes.c_uint32
    VALUE = ctypes.c_uint64
    PERCPU = True

    def total(self) -> int:
        value = self.lookup(ctypes.c_uint32(0))
        return 0 if value is None else sum(value)
