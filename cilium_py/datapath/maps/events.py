"""ciliumpy_events (ring or perf buffer) record layout and ciliumpy_events_lost, the per-CPU
count of records the buffer had no room for (bpf/lib/events.h).

EventRecord is the one mirror of `struct event` (checked field by field against the
compiled layout in tests/bpf/test_layout.py). The monitor decodes records through it; the
Hubble parser, which cannot afford ctypes per record, unpacks them with a struct.Struct
that record_struct() derives from the mirror's offsets.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence

from cilium_py.datapath.reasons import MESSAGE_TYPES

from .base import BpfMap, be16

EVENT_DROP = 1
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5
EVENT_TYPES = {t: MESSAGE_TYPES[t] for t in (EVENT_DROP, EVENT_TRACE, EVENT_POLICY_VERDICT)}
EVENT_VERSION = 1

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


def _field(mirror: type, dotted: str) -> tuple[int, type]:
    """Offset and ctypes type of a field of a (nested) mirror, named like "hdr.type"."""
    offset, tp = 0, mirror
    for part in dotted.split("."):
        types = dict(spec[:2] for spec in getattr(tp, "_fields_", ()))
        if part not in types:
            raise ValueError(f"{mirror.__name__} has no field {dotted!r}")
        offset += getattr(tp, part).offset
        tp = types[part]
    return offset, tp


def record_struct(mirror: type, names: Sequence[str]) -> struct.Struct:
    """A struct.Struct whose unpack_from() returns the named little-endian integer fields of
    `mirror`, in the given order (which must be the order of their offsets), skipping the
    bytes between them. A field moved or resized in the mirror moves here too."""
    fmt, end = ["<"], 0
    for name in names:
        offset, tp = _field(mirror, name)
        code = getattr(tp, "_type_", None)
        if (not isinstance(code, str) or getattr(tp, "__ctype_le__", None) is not tp
                or struct.calcsize("<" + code) != ctypes.sizeof(tp)):
            raise ValueError(f"{mirror.__name__}.{name} is not a little-endian integer field")
        if offset < end:
            raise ValueError(f"{mirror.__name__}.{name} at offset {offset} is listed after a "
                             f"field that ends at {end}: list fields in offset order")
        if offset > end:
            fmt.append(f"{offset - end}x")
        fmt.append(code)
        end = offset + ctypes.sizeof(tp)
    return struct.Struct("".join(fmt))
