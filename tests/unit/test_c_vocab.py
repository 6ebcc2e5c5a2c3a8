"""The numbers the C datapath and the Python side must agree on, read from the headers in
bpf/lib/ and the entry files and compared with the Python tables, in both directions where
both sides list the whole set. Text only: no compiler, no privileges."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cilium_py import vocab
from cilium_py.datapath import programs, reasons
from cilium_py.datapath.maps import events, policy
from cilium_py.hubble.api.flow import flow_pb2 as F

BPF = Path(__file__).resolve().parents[2] / "bpf"
_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)\s+(\d+)\b", re.MULTILINE)


def defines(header: str, prefix: str = "") -> dict[str, int]:
    """Every `#define NAME <integer>` of a bpf/lib header whose name starts with prefix."""
    text = (BPF / "lib" / header).read_text()
    return {name: int(value) for name, value in _DEFINE.findall(text) if name.startswith(prefix)}


def test_defines_parser_reads_a_header():
    assert defines("common.h")["IDENTITY_WORLD"] == 2


# -- drop reasons ----------------------------------------------------------------------------

def test_drop_reasons_header_and_table_agree_both_ways():
    c_side = {**defines("drop_reasons.h", "DROP_"), **defines("drop_reasons.h", "REASON_")}
    py_side = {r.define: r.number for r in reasons.DROP_REASON_TABLE}
    assert sorted(set(c_side) - set(py_side)) == [], "defined in drop_reasons.h, not in reasons.py"
    assert sorted(set(py_side) - set(c_side)) == [], "in reasons.py, not in drop_reasons.h"
    assert c_side == py_side


def test_no_drop_reason_is_defined_outside_drop_reasons_h():
    elsewhere = [f"{path.relative_to(BPF)}: {name}"
                 for path in sorted(BPF.rglob("*.[ch]")) if path.name != "drop_reasons.h"
                 for name, _ in _DEFINE.findall(path.read_text()) if name.startswith("DROP_")]
    assert elsewhere == []


def test_drop_reason_names_are_hubbles():
    # 0 is no drop but the metrics key of forwarded packets (Hubble: DROP_REASON_UNKNOWN).
    for r in reasons.DROP_REASON_TABLE[1:]:
        assert F.DropReason.Name(r.number) == r.name, r
    assert reasons.DROP_REASON_TABLE[0].number == 0
    assert len({r.number for r in reasons.DROP_REASON_TABLE}) == len(reasons.DROP_REASON_TABLE)


# -- directions, trace points, conntrack states, match types ------------------------------

def test_metric_directions_both_ways():
    c_side = {name.removeprefix("METRIC_DIR_"): n for name, n in defines("common.h", "METRIC_DIR_").items()}
    assert c_side == {name: n for n, name in reasons.DIRECTIONS.items()}
    assert (reasons.DIR_INGRESS, reasons.DIR_EGRESS) == (c_side["INGRESS"], c_side["EGRESS"])


def test_trace_observation_points_the_datapath_emits_are_named():
    """reasons.TRACE_POINTS is Cilium's whole numbering; the datapath emits two of them."""
    c_side = {name.removeprefix("TRACE_"): n for name, n in defines("events.h", "TRACE_").items()
              if not name.startswith(("TRACE_REASON_", "TRACE_PAYLOAD_"))}
    assert c_side == {"TO_ENDPOINT": reasons.TRACE_TO_ENDPOINT,
                      "FROM_ENDPOINT": reasons.TRACE_FROM_ENDPOINT}
    for name, number in c_side.items():
        assert reasons.TRACE_POINTS[number] == name.lower().replace("_", "-")


def test_trace_reasons_are_the_conntrack_states_both_ways():
    c_side = {name.removeprefix("TRACE_REASON_").lower(): n
              for name, n in defines("events.h", "TRACE_REASON_").items()}
    assert c_side == {name: n for n, name in reasons.CT_STATES.items()}
    assert reasons.CT_REPLY == c_side["reply"]


def test_policy_match_types_both_ways():
    c_side = defines("policy.h", "POLICY_MATCH_")
    py_side = {"POLICY_MATCH_" + name.upper().replace("-", "_"): n
               for n, name in reasons.MATCH_TYPES.items()}
    assert c_side == py_side


def test_event_types_both_ways():
    c_side = {name: n for name, n in defines("events.h", "EVENT_").items()
              if name not in ("EVENT_VERSION",)}
    assert c_side == {"EVENT_" + name.upper().replace("-", "_"): n
                      for n, name in events.EVENT_TYPES.items()}
    for name, number in c_side.items():
        assert getattr(events, name) == number
        assert reasons.MESSAGE_TYPES[number] == events.EVENT_TYPES[number]


@pytest.mark.parametrize("header,name,value", [
    ("events.h", "EVENT_VERSION", events.EVENT_VERSION),
    ("events.h", "TRACE_PAYLOAD_LEN", events.TRACE_PAYLOAD_LEN),
    ("events.h", "PV_FLAG_INGRESS", events.PV_FLAG_INGRESS),
    ("events.h", "PV_FLAG_EGRESS", events.PV_FLAG_EGRESS),
    ("events.h", "PV_MATCH_SHIFT", events.PV_MATCH_SHIFT),
    ("policy.h", "POLICY_PREFIX_STATIC", policy.POLICY_PREFIX_STATIC),
    ("policy.h", "POLICY_F_DENY", policy.POLICY_F_DENY),
])
def test_single_constants(header, name, value):
    assert defines(header)[name] == value


# -- reserved identities ---------------------------------------------------------------------

def test_reserved_identities_in_common_h_are_vocabs():
    c_side = defines("common.h", "IDENTITY_")
    assert c_side, "common.h defines no IDENTITY_*"
    for name, number in c_side.items():
        assert getattr(vocab, name) == number, name
        if number:
            assert vocab.RESERVED_IDENTITY_NAMES[number] == name.removeprefix("IDENTITY_").lower()


def test_reserved_identity_constants_match_the_name_table():
    for number, name in vocab.RESERVED_IDENTITY_NAMES.items():
        constant = "IDENTITY_" + name.upper().replace("-", "_")
        if hasattr(vocab, constant):
            assert getattr(vocab, constant) == number
    assert vocab.RESERVED_IDENTITY_IDS == {n: i for i, n in vocab.RESERVED_IDENTITY_NAMES.items()}


# -- the program catalogue -------------------------------------------------------------------

_ENTRY_FUNCTION = re.compile(r"^int\s+(\w+)\s*\(", re.MULTILINE)


def test_program_catalogue_lists_every_entry_function_both_ways():
    in_c = {(name, path.name) for path in sorted(BPF.glob("bpf_*.c"))
            for name in _ENTRY_FUNCTION.findall(path.read_text())}
    assert in_c == {(p.name, p.source) for p in programs.PROGRAMS}
    assert set(programs.ENTRY_FILES) == {path.name for path in BPF.glob("bpf_*.c")}


def test_program_catalogue_attach_points_are_complete():
    for p in programs.PROGRAMS:
        if p.attach in (programs.ENDPOINT_TC, programs.DEVICE_TC):
            assert p.prog_type == "SCHED_CLS" and p.hook in (programs.TC_INGRESS, programs.TC_EGRESS)
        elif p.attach == programs.DEVICE_XDP:
            assert p.prog_type == "XDP" and p.attach_type == -1
        else:
            assert p.attach == programs.CGROUP_SOCK, p
            assert p.prog_type == "CGROUP_SOCK_ADDR" and p.hook and p.attach_type > 0
    # Both tc hooks of an endpoint and of a device have exactly one program.
    for table in (programs.ENDPOINT_TC_PROGRAMS, programs.DEVICE_TC_PROGRAMS):
        assert sorted(hook for _, hook in table) == [programs.TC_EGRESS, programs.TC_INGRESS]
