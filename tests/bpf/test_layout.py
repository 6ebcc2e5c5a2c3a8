"""Each ctypes mirror in cilium_py/datapath/maps/ against the layout clang gave the C struct.

BCC describes every table's key and leaf types from clang's record layout and builds ctypes
types from that description (`bpf[name].Key` / `.Leaf`). The mirrors must agree in size and
in the name, offset and size of every field: a field renamed or moved on either side fails.
Anonymous unions (BCC names them `__anon<N>`) are flattened into their members; nested named
structs are compared field by field under a dotted name.
"""

from __future__ import annotations

import ctypes
import os

import pytest

from cilium_py.datapath import libbpf

from cilium_py.datapath.bcc_import import import_bcc
from cilium_py.datapath.maps.conntrack import CtEntry, CtTuple4
from cilium_py.datapath.maps.endpoints import EndpointInfo, EndpointKey
from cilium_py.datapath.maps.events import EventHeader, EventRecord
from cilium_py.datapath.maps.ipcache import IpcacheKey, RemoteEndpointInfo
from cilium_py.datapath.maps.lb import (
    Lb4Backend,
    Lb4Key,
    Lb4ReverseNat,
    Lb4ReverseSk,
    Lb4ReverseSkKey,
    Lb4Service,
    LbAffinityKey,
    LbAffinityVal,
)
from cilium_py.datapath.maps.metrics import MetricsKey, MetricsValue
from cilium_py.datapath.maps.nat import NatEntry4
from cilium_py.datapath.maps.policy import PolicyEntry, PolicyKey
from cilium_py.datapath.maps.prefilter import Prefilter4Key
from cilium_py.datapath.monitor import RECORD_SIZE

pytestmark = [pytest.mark.bpf]

# (map, "Key" or "Leaf", mirror)
CASES = [
    ("ciliumpy_lxc", "Key", EndpointKey),
    ("ciliumpy_lxc", "Leaf", EndpointInfo),
    ("ciliumpy_ipcache", "Key", IpcacheKey),
    ("ciliumpy_ipcache", "Leaf", RemoteEndpointInfo),
    ("ciliumpy_policy", "Key", PolicyKey),
    ("ciliumpy_policy", "Leaf", PolicyEntry),
    ("ciliumpy_ct4_global", "Key", CtTuple4),
    ("ciliumpy_ct4_global", "Leaf", CtEntry),
    ("ciliumpy_ct_any4_global", "Key", CtTuple4),
    ("ciliumpy_ct_any4_global", "Leaf", CtEntry),
    ("ciliumpy_metrics", "Key", MetricsKey),
    ("ciliumpy_metrics", "Leaf", MetricsValue),
    ("ciliumpy_prefilter4", "Key", Prefilter4Key),
    ("ciliumpy_lb4_services", "Key", Lb4Key),
    ("ciliumpy_lb4_services", "Leaf", Lb4Service),
    ("ciliumpy_lb4_backends", "Leaf", Lb4Backend),
    ("ciliumpy_lb4_reverse_nat", "Leaf", Lb4ReverseNat),
    ("ciliumpy_lb4_affinity", "Key", LbAffinityKey),
    ("ciliumpy_lb4_affinity", "Leaf", LbAffinityVal),
    ("ciliumpy_lb4_reverse_sk", "Key", Lb4ReverseSkKey),
    ("ciliumpy_lb4_reverse_sk", "Leaf", Lb4ReverseSk),
    ("ciliumpy_snat_v4_external", "Key", CtTuple4),
    ("ciliumpy_snat_v4_external", "Leaf", NatEntry4),
    # The ring buffer has no key/leaf types; the per-CPU scratch an event is built in holds
    # exactly one struct event.
    ("ciliumpy_event_buf", "Leaf", EventRecord),
]

# Where a mirror deliberately spells a C union differently. The IPv6 room of the endpoint
# and ipcache keys is `union { __be32 ip4; __u8 ip6[16]; }` in C and `ip4` followed by
# `ip6_rest` (the 12 bytes ip6 has beyond ip4) in the mirror, so `ip4` keeps its byte order.
# Each entry: C field -> the mirror fields that together cover exactly its bytes.
SPLIT_UNION_FIELDS = {
    # union { backend_id; affinity_timeout; }: one u32 named after its slot meaning.
    Lb4Service: {"affinity_timeout": ("backend_id",)},
    EndpointKey: {"ip6": ("ip4", "ip6_rest")},
    IpcacheKey: {"ip6": ("ip4", "ip6_rest")},
}


def _is_record(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, (ctypes.Structure, ctypes.Union))


def flatten(tp, base: int = 0, prefix: str = "") -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of every field of a ctypes struct/union: anonymous members are
    lifted into their parent, named nested records add dotted names for their fields."""
    out: dict[str, tuple[int, int]] = {}
    anonymous = set(getattr(tp, "_anonymous_", ()))
    for spec in tp._fields_:
        name, ftype = spec[0], spec[1]
        desc = getattr(tp, name)
        offset = base + desc.offset
        if name in anonymous or name.startswith("__anon"):
            out.update(flatten(ftype, offset, prefix))
            continue
        out[prefix + name] = (offset, desc.size)
        if _is_record(ftype):
            out.update(flatten(ftype, offset, f"{prefix}{name}."))
    return out


def layout_problems(compiled, mirror) -> list[str]:
    """Every way `mirror` disagrees with `compiled`; empty when they agree."""
    problems = []
    if ctypes.sizeof(compiled) != ctypes.sizeof(mirror):
        problems.append(f"size: C {ctypes.sizeof(compiled)}, mirror {ctypes.sizeof(mirror)}")
    c_fields, m_fields = flatten(compiled), flatten(mirror)
    split = SPLIT_UNION_FIELDS.get(mirror, {})
    for c_name, parts in split.items():
        if c_name not in c_fields or any(p not in m_fields for p in parts):
            problems.append(f"split union field {c_name} -> {parts}: a side is missing")
            continue
        c_off, c_size = c_fields[c_name]
        spans = sorted(m_fields[p] for p in parts)
        contiguous = all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))
        covered = (spans[0][0], spans[-1][0] + spans[-1][1] - spans[0][0])
        if not contiguous or covered != (c_off, c_size):
            problems.append(f"{c_name} at {c_off}+{c_size} is not covered by {parts} {spans}")
    mirror_only_parts = {p for parts in split.values() for p in parts} - set(c_fields)
    for name in sorted(set(c_fields) - set(m_fields) - set(split)):
        problems.append(f"C field {name!r} has no field of that name in the mirror")
    for name in sorted(set(m_fields) - set(c_fields) - mirror_only_parts):
        problems.append(f"mirror field {name!r} does not exist in C")
    for name in sorted(set(c_fields) & set(m_fields)):
        if c_fields[name] != m_fields[name]:
            problems.append(f"{name}: C offset/size {c_fields[name]}, mirror {m_fields[name]}")
    return problems


@pytest.fixture(scope="module")
def compiled_types(datapath):
    """BCC's ctypes for each table. BCC 0.26 cannot name `signed char` (struct event's
    `__s8 ext_error`) when it builds them; teach it the type before the first lookup."""
    bpf_cls = import_bcc().BPF
    bpf_cls.str2ctype.setdefault("signed char", ctypes.c_byte)

    def get(map_name: str, which: str):
        tp = getattr(datapath.bpf[map_name.encode()], which)
        # Per-CPU tables give one value slot per CPU: an array of the struct.
        if isinstance(tp, type) and issubclass(tp, ctypes.Array):
            tp = tp._type_
        return tp

    return get


@pytest.mark.parametrize("map_name,which,mirror", CASES,
                         ids=[f"{m}.{w}:{t.__name__}" for m, w, t in CASES])
def test_mirror_matches_compiled_layout(compiled_types, map_name, which, mirror):
    compiled = compiled_types(map_name, which)
    assert layout_problems(compiled, mirror) == []


PINNED_CASES = [c for c in CASES if c[0] != "ciliumpy_event_buf"]  # the scratch is not pinned


@pytest.mark.parametrize("map_name,which,mirror", PINNED_CASES,
                         ids=[f"{m}.{w}" for m, w, _ in PINNED_CASES])
def test_pinned_map_has_mirror_sizes(datapath, map_name, which, mirror):
    fd = libbpf.obj_get(os.path.join(datapath.config.pin_dir, map_name))
    try:
        info = libbpf.map_info(fd)
    finally:
        os.close(fd)
    assert (info.key_size if which == "Key" else info.value_size) == ctypes.sizeof(mirror)


def test_event_record_is_what_the_ring_buffer_carries(compiled_types):
    """decode() refuses records shorter than the mirror: both must be struct event's size."""
    assert RECORD_SIZE == ctypes.sizeof(compiled_types("ciliumpy_event_buf", "Leaf"))


# -- the check itself catches what it is for -------------------------------------------

def _variant(base, fields):
    attrs = {"_fields_": fields}
    if hasattr(base, "_pack_"):
        attrs["_pack_"] = base._pack_
    return type(f"Broken{base.__name__}", (ctypes.Structure,), attrs)


def test_check_catches_a_renamed_field(compiled_types):
    fields = [(("expiry" if n == "lifetime" else n), t) for n, t in CtEntry._fields_]
    broken = _variant(CtEntry, fields)
    broken._anonymous_ = CtEntry._anonymous_
    problems = layout_problems(compiled_types("ciliumpy_ct4_global", "Leaf"), broken)
    assert any("lifetime" in p for p in problems)
    assert any("expiry" in p for p in problems)


def test_check_catches_a_renamed_union_member(compiled_types):
    """ct_entry's union (src_sec_id / backend_id) is compared member by member."""
    union = type("BrokenSource", (ctypes.Union,),
                 {"_fields_": [("src_identity", ctypes.c_uint32), ("backend_id", ctypes.c_uint32)]})
    fields = [(n, union if n == "u" else t) for n, t in CtEntry._fields_]
    broken = type("BrokenCtEntry", (ctypes.Structure,), {"_anonymous_": ("u",), "_fields_": fields})
    problems = layout_problems(compiled_types("ciliumpy_ct4_global", "Leaf"), broken)
    assert any("src_sec_id" in p for p in problems)
    assert any("src_identity" in p for p in problems)


def test_check_catches_swapped_fields_of_equal_size(compiled_types):
    fields = list(CtTuple4._fields_)
    fields[0], fields[1] = fields[1], fields[0]  # saddr before daddr
    problems = layout_problems(compiled_types("ciliumpy_ct4_global", "Key"),
                               _variant(CtTuple4, fields))
    assert any(p.startswith("daddr") for p in problems)
    assert any(p.startswith("saddr") for p in problems)


def test_check_catches_a_moved_nested_field(compiled_types):
    hdr_fields = list(EventHeader._fields_)
    hdr_fields[4], hdr_fields[5] = hdr_fields[5], hdr_fields[4]  # version before len_cap
    broken_hdr = _variant(EventHeader, hdr_fields)
    fields = [(n, broken_hdr if n == "hdr" else t) for n, t in EventRecord._fields_]
    problems = layout_problems(compiled_types("ciliumpy_event_buf", "Leaf"),
                               _variant(EventRecord, fields))
    assert any(p.startswith("hdr.len_cap") for p in problems)


def test_check_catches_a_broken_union_split(compiled_types):
    fields = [(n, ctypes.c_uint8 * 8 if n == "ip6_rest" else t) for n, t in EndpointKey._fields_]
    broken = _variant(EndpointKey, fields)
    SPLIT_UNION_FIELDS[broken] = SPLIT_UNION_FIELDS[EndpointKey]
    try:
        problems = layout_problems(compiled_types("ciliumpy_lxc", "Key"), broken)
    finally:
        del SPLIT_UNION_FIELDS[broken]
    assert any("ip6" in p for p in problems)
