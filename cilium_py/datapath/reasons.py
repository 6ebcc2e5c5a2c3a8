"""Names for the numbers the datapath reports: drop reasons (Hubble's DropReason enum),
directions, trace observation points, conntrack states and policy match types."""

from __future__ import annotations

# Only the reasons our programs can produce, plus those the next issues will; the number is
# what crosses the wire to Hubble, the name is Hubble's enum name.
DROP_REASONS = {
    0: "FORWARDED",
    132: "INVALID_SOURCE_IP",
    133: "POLICY_DENIED",
    134: "INVALID_PACKET_DROPPED",
    135: "CT_TRUNCATED_OR_INVALID_HEADER",
    137: "CT_UNKNOWN_L4_PROTOCOL",
    139: "UNSUPPORTED_L3_PROTOCOL",
    141: "ERROR_WRITING_TO_PACKET",
    152: "NO_MATCHING_LOCAL_CONTAINER_FOUND",
    153: "ERROR_WHILE_CORRECTING_L3_CHECKSUM",
    154: "ERROR_WHILE_CORRECTING_L4_CHECKSUM",
    155: "CT_MAP_INSERTION_FAILED",
    157: "IP_FRAGMENTATION_NOT_SUPPORTED",
    158: "SERVICE_BACKEND_NOT_FOUND",
    167: "NO_MAPPING_FOR_NAT_MASQUERADE",
    169: "FIB_LOOKUP_FAILED",
    181: "POLICY_DENY",
}

# Human descriptions as `cilium monitor` prints them.
DROP_DESCRIPTIONS = {
    132: "Invalid source ip",
    133: "Policy denied",
    134: "Invalid packet",
    135: "CT: Truncated or invalid header",
    139: "Unsupported L3 protocol",
    152: "No matching local container found",
    155: "CT: Map insertion failed",
    157: "Fragmentation needed",
    158: "Service backend not found",
    167: "No mapping for NAT masquerade",
    169: "FIB lookup failed",
    181: "Policy denied by denylist",
}

POLICY_DENIED = 133
POLICY_DENY = 181

DIR_UNKNOWN, DIR_INGRESS, DIR_EGRESS = 0, 1, 2
DIRECTIONS = {DIR_UNKNOWN: "UNKNOWN", DIR_INGRESS: "INGRESS", DIR_EGRESS: "EGRESS", 3: "SERVICE"}

TRACE_POINTS = {0: "to-endpoint", 5: "from-endpoint"}
CT_STATES = {0: "new", 1: "established", 2: "reply", 3: "related"}
MATCH_TYPES = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto",
               6: "Proto-Only"}
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}


def drop_reason_name(reason: int) -> str:
    return DROP_REASONS.get(reason, f"REASON_{reason}")


def drop_description(reason: int) -> str:
    return DROP_DESCRIPTIONS.get(reason, drop_reason_name(reason))


def direction_name(direction: int) -> str:
    return DIRECTIONS.get(direction, str(direction))


def protocol_name(proto: int) -> str:
    return PROTOCOLS.get(proto, str(proto))
