"""Names for the numbers the datapath reports: drop reasons (Hubble's DropReason enum),
directions, trace observation points, conntrack states and policy match types.

Each number's C side is a #define in bpf/lib/ (drop_reasons.h, common.h, events.h,
policy.h); tests/unit/test_c_vocab.py parses those headers and checks these tables against
them, so a reason added on one side only fails a test.
"""

from __future__ import annotations

from typing import NamedTuple

from cilium_py import vocab

# Protocol names are shared with the agent and the CLI (cilium_py/vocab.py); kept here for
# the callers that have always imported the helper from this module.
protocol_name = vocab.protocol_name


class DropReason(NamedTuple):
    number: int        # what crosses the wire to Hubble
    define: str        # its #define in bpf/lib/drop_reasons.h
    name: str          # Hubble's DropReason enum name
    description: str   # as `cilium monitor` prints it; "" where it prints the name


# The reasons our programs can produce, plus those the next issues will.
DROP_REASON_TABLE = (
    DropReason(0, "REASON_FORWARDED", "FORWARDED", ""),
    DropReason(132, "DROP_INVALID_SIP", "INVALID_SOURCE_IP", "Invalid source ip"),
    DropReason(133, "DROP_POLICY", "POLICY_DENIED", "Policy denied"),
    DropReason(134, "DROP_INVALID", "INVALID_PACKET_DROPPED", "Invalid packet"),
    DropReason(135, "DROP_CT_INVALID_HDR", "CT_TRUNCATED_OR_INVALID_HEADER",
               "CT: Truncated or invalid header"),
    DropReason(137, "DROP_CT_UNKNOWN_PROTO", "CT_UNKNOWN_L4_PROTOCOL", ""),
    DropReason(139, "DROP_UNKNOWN_L3", "UNSUPPORTED_L3_PROTOCOL", "Unsupported L3 protocol"),
    DropReason(141, "DROP_WRITE_ERROR", "ERROR_WRITING_TO_PACKET", ""),
    DropReason(152, "DROP_UNKNOWN_TARGET", "NO_MATCHING_LOCAL_CONTAINER_FOUND",
               "No matching local container found"),
    DropReason(153, "DROP_CSUM_L3", "ERROR_WHILE_CORRECTING_L3_CHECKSUM", ""),
    DropReason(154, "DROP_CSUM_L4", "ERROR_WHILE_CORRECTING_L4_CHECKSUM", ""),
    DropReason(155, "DROP_CT_CREATE_FAILED", "CT_MAP_INSERTION_FAILED", "CT: Map insertion failed"),
    DropReason(157, "DROP_FRAG_NOSUPPORT", "IP_FRAGMENTATION_NOT_SUPPORTED", "Fragmentation needed"),
    DropReason(158, "DROP_NO_SERVICE", "SERVICE_BACKEND_NOT_FOUND", "Service backend not found"),
    DropReason(167, "DROP_NAT_NO_MAPPING", "NO_MAPPING_FOR_NAT_MASQUERADE",
               "No mapping for NAT masquerade"),
    DropReason(169, "DROP_FIB_LOOKUP", "FIB_LOOKUP_FAILED", "FIB lookup failed"),
    DropReason(181, "DROP_POLICY_DENY", "POLICY_DENY", "Policy denied by denylist"),
)
DROP_REASONS = {r.number: r.name for r in DROP_REASON_TABLE}
DROP_DESCRIPTIONS = {r.number: r.description for r in DROP_REASON_TABLE if r.description}

POLICY_DENIED = 133
POLICY_DENY = 181

# METRIC_DIR_* (bpf/lib/common.h): the direction byte of metrics keys and drop records.
DIR_UNKNOWN, DIR_INGRESS, DIR_EGRESS, DIR_SERVICE = 0, 1, 2, 3
DIRECTIONS = {DIR_UNKNOWN: "UNKNOWN", DIR_INGRESS: "INGRESS", DIR_EGRESS: "EGRESS",
              DIR_SERVICE: "SERVICE"}

# Trace observation points in Cilium's numbering, which is what a trace record's subtype and
# Hubble's event_type.sub_type carry. Our datapath emits TRACE_TO_ENDPOINT and
# TRACE_FROM_ENDPOINT (bpf/lib/events.h); the rest name what other agents' flows carry.
TRACE_TO_ENDPOINT, TRACE_FROM_ENDPOINT = 0, 5
TRACE_POINTS = {
    TRACE_TO_ENDPOINT: "to-endpoint", 1: "to-proxy", 2: "to-host", 3: "to-stack",
    4: "to-overlay", TRACE_FROM_ENDPOINT: "from-endpoint", 6: "from-proxy", 7: "from-host",
    8: "from-stack", 9: "from-overlay", 10: "from-network", 11: "to-network",
    12: "from-crypto", 13: "to-crypto",
}
# TRACE_REASON_* (bpf/lib/events.h): the conntrack verdict a trace record carries.
CT_NEW, CT_ESTABLISHED, CT_REPLY, CT_RELATED = 0, 1, 2, 3
CT_STATES = {CT_NEW: "new", CT_ESTABLISHED: "established", CT_REPLY: "reply",
             CT_RELATED: "related"}
# POLICY_MATCH_* (bpf/lib/policy.h), spelled as Cilium's monitor prints them.
MATCH_TYPES = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto",
               6: "Proto-Only"}
# Cilium's monitor message types, the numbers in a flow's event_type.type; our datapath
# emits drop, trace and policy-verdict (EVENT_* in bpf/lib/events.h).
MESSAGE_TYPES = {1: "drop", 2: "debug", 3: "capture", 4: "trace", 5: "policy-verdict",
                 7: "trace-sock", 129: "l7", 130: "agent"}


def drop_reason_name(reason: int) -> str:
    return DROP_REASONS.get(reason, f"REASON_{reason}")


def drop_description(reason: int) -> str:
    return DROP_DESCRIPTIONS.get(reason, drop_reason_name(reason))


def direction_name(direction: int) -> str:
    return DIRECTIONS.get(direction, str(direction))
