"""Wire compatibility of our Hubble API with Cilium's, checked against the facts tables.

The tables below are transcribed by hand from /work/shared/reference/cilium-facts.md
(§12.2 Observer messages, §12.3 flow.Flow and its parts, §12.4 FlowFilter, §5 DropReason).
They are deliberately NOT derived from hubble/proto or from the generated descriptors: from
them we build an independent descriptor pool ("the facts pool") that stands in for an
upstream Hubble client. Messages built with our generated classes must decode in the facts
pool with every value intact and no unknown fields, and the other way round. A renumbered
field shows up as an unknown field (or as a value in the wrong field), a retyped one as a
descriptor mismatch in the per-field comparison.

Where the facts give a field's number but not its scalar type (e.g. most FlowFilter fields,
CiliumEventType, Policy), the type is the one Hubble's public API documents; such entries are
marked "type: upstream API" below. Enum value spellings the facts mark UNVERIFIED (TraceReason 0,
relay.NodeState) are compared by number only.
"""

from __future__ import annotations

import copy
import os

import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    field_mask_pb2,
    json_format,
    message_factory,
    timestamp_pb2,
    unknown_fields,
    wrappers_pb2,
)

from cilium_py.hubble.api.flow import flow_pb2
from cilium_py.hubble.api.observer import observer_pb2
from cilium_py.hubble.api.relay import relay_pb2

FDP = descriptor_pb2.FieldDescriptorProto

# ---------------------------------------------------------------------------------------------
# The facts table
# ---------------------------------------------------------------------------------------------

STRING, BOOL, INT32, UINT32, UINT64, DOUBLE = "string", "bool", "int32", "uint32", "uint64", "double"
MSG, ENUM = "message", "enum"
OPT, REP = "optional", "repeated"

TIMESTAMP = ".google.protobuf.Timestamp"
BOOL_VALUE = ".google.protobuf.BoolValue"
INT32_VALUE = ".google.protobuf.Int32Value"
UINT32_VALUE = ".google.protobuf.UInt32Value"
FIELD_MASK = ".google.protobuf.FieldMask"

# message full name -> [(name, number, type, label, type_name)]
MESSAGES: dict[str, list[tuple[str, int, str, str, str]]] = {
    # §12.2 GetFlowsRequest (2 reserved; experimental 999 / extensions 150000 not served)
    "observer.GetFlowsRequest": [
        ("number", 1, UINT64, OPT, ""),
        ("follow", 3, BOOL, OPT, ""),
        ("blacklist", 5, MSG, REP, ".flow.FlowFilter"),
        ("whitelist", 6, MSG, REP, ".flow.FlowFilter"),
        ("since", 7, MSG, OPT, TIMESTAMP),
        ("until", 8, MSG, OPT, TIMESTAMP),
        ("first", 9, BOOL, OPT, ""),
        ("field_mask", 10, MSG, OPT, FIELD_MASK),
    ],
    # §12.2 GetFlowsResponse: oneof response_types {flow 1, node_status 2, lost_events 3}
    "observer.GetFlowsResponse": [
        ("flow", 1, MSG, OPT, ".flow.Flow"),
        ("node_status", 2, MSG, OPT, ".relay.NodeStatusEvent"),
        ("lost_events", 3, MSG, OPT, ".flow.LostEvent"),
        ("node_name", 1000, STRING, OPT, ""),
        ("time", 1001, MSG, OPT, TIMESTAMP),
    ],
    # §12.2 ServerStatusResponse
    "observer.ServerStatusResponse": [
        ("num_flows", 1, UINT64, OPT, ""),
        ("max_flows", 2, UINT64, OPT, ""),
        ("seen_flows", 3, UINT64, OPT, ""),
        ("uptime_ns", 4, UINT64, OPT, ""),
        ("num_connected_nodes", 5, MSG, OPT, UINT32_VALUE),
        ("num_unavailable_nodes", 6, MSG, OPT, UINT32_VALUE),
        ("unavailable_nodes", 7, STRING, REP, ""),
        ("version", 8, STRING, OPT, ""),
        ("flows_rate", 9, DOUBLE, OPT, ""),
    ],
    # §12.2 GetNodes / Node / TLS
    "observer.GetNodesResponse": [
        ("nodes", 1, MSG, REP, ".observer.Node"),
    ],
    "observer.Node": [
        ("name", 1, STRING, OPT, ""),
        ("version", 2, STRING, OPT, ""),
        ("address", 3, STRING, OPT, ""),
        ("state", 4, ENUM, OPT, ".relay.NodeState"),
        ("tls", 5, MSG, OPT, ".observer.TLS"),  # message name: upstream API
        ("uptime_ns", 6, UINT64, OPT, ""),
        ("num_flows", 7, UINT64, OPT, ""),
        ("max_flows", 8, UINT64, OPT, ""),
        ("seen_flows", 9, UINT64, OPT, ""),
    ],
    "observer.TLS": [
        ("enabled", 1, BOOL, OPT, ""),
        ("server_name", 2, STRING, OPT, ""),
    ],
    # §12.2 GetNamespacesResponse {namespaces = 1, repeated {cluster = 1, namespace = 2}}
    "observer.GetNamespacesResponse": [
        ("namespaces", 1, MSG, REP, ".observer.Namespace"),
    ],
    "observer.Namespace": [
        ("cluster", 1, STRING, OPT, ""),
        ("namespace", 2, STRING, OPT, ""),
    ],
    # §12.2 relay.NodeStatusEvent
    "relay.NodeStatusEvent": [
        ("state_change", 1, ENUM, OPT, ".relay.NodeState"),
        ("node_names", 2, STRING, REP, ""),
        ("message", 3, STRING, OPT, ""),
    ],
    # §12.3 flow.Flow: the fields we serve
    "flow.Flow": [
        ("time", 1, MSG, OPT, TIMESTAMP),
        ("verdict", 2, ENUM, OPT, ".flow.Verdict"),
        ("drop_reason", 3, UINT32, OPT, ""),
        ("ethernet", 4, MSG, OPT, ".flow.Ethernet"),
        ("IP", 5, MSG, OPT, ".flow.IP"),
        ("l4", 6, MSG, OPT, ".flow.Layer4"),
        ("source", 8, MSG, OPT, ".flow.Endpoint"),
        ("destination", 9, MSG, OPT, ".flow.Endpoint"),
        ("Type", 10, ENUM, OPT, ".flow.FlowType"),
        ("node_name", 11, STRING, OPT, ""),
        ("source_names", 13, STRING, REP, ""),
        ("destination_names", 14, STRING, REP, ""),
        ("reply", 16, BOOL, OPT, ""),
        ("event_type", 19, MSG, OPT, ".flow.CiliumEventType"),
        ("source_service", 20, MSG, OPT, ".flow.Service"),
        ("destination_service", 21, MSG, OPT, ".flow.Service"),
        ("traffic_direction", 22, ENUM, OPT, ".flow.TrafficDirection"),
        ("policy_match_type", 23, UINT32, OPT, ""),
        ("trace_observation_point", 24, ENUM, OPT, ".flow.TraceObservationPoint"),
        ("drop_reason_desc", 25, ENUM, OPT, ".flow.DropReason"),
        ("is_reply", 26, MSG, OPT, BOOL_VALUE),
        ("interface", 28, MSG, OPT, ".flow.NetworkInterface"),
        ("sock_xlate_point", 31, ENUM, OPT, ".flow.SocketTranslationPoint"),
        ("socket_cookie", 32, UINT64, OPT, ""),
        ("cgroup_id", 33, UINT64, OPT, ""),
        ("uuid", 34, STRING, OPT, ""),
        ("trace_reason", 36, ENUM, OPT, ".flow.TraceReason"),
        ("node_labels", 37, STRING, REP, ""),
        ("egress_allowed_by", 21001, MSG, REP, ".flow.Policy"),
        ("ingress_allowed_by", 21002, MSG, REP, ".flow.Policy"),
        ("egress_denied_by", 21004, MSG, REP, ".flow.Policy"),
        ("ingress_denied_by", 21005, MSG, REP, ".flow.Policy"),
    ],
    "flow.Ethernet": [
        ("source", 1, STRING, OPT, ""),
        ("destination", 2, STRING, OPT, ""),
    ],
    "flow.Endpoint": [
        ("ID", 1, UINT32, OPT, ""),
        ("identity", 2, UINT32, OPT, ""),
        ("namespace", 3, STRING, OPT, ""),
        ("labels", 4, STRING, REP, ""),
        ("pod_name", 5, STRING, OPT, ""),
        ("workloads", 6, MSG, REP, ".flow.Workload"),
        ("cluster_name", 7, STRING, OPT, ""),
    ],
    "flow.Workload": [
        ("name", 1, STRING, OPT, ""),
        ("kind", 2, STRING, OPT, ""),
    ],
    "flow.IP": [
        ("source", 1, STRING, OPT, ""),
        ("destination", 2, STRING, OPT, ""),
        ("ipVersion", 3, ENUM, OPT, ".flow.IPVersion"),
        ("encrypted", 4, BOOL, OPT, ""),
        ("source_xlated", 5, STRING, OPT, ""),
    ],
    # oneof protocol (VRRP 6 / IGMP 7 not served)
    "flow.Layer4": [
        ("TCP", 1, MSG, OPT, ".flow.TCP"),
        ("UDP", 2, MSG, OPT, ".flow.UDP"),
        ("ICMPv4", 3, MSG, OPT, ".flow.ICMPv4"),
        ("ICMPv6", 4, MSG, OPT, ".flow.ICMPv6"),
        ("SCTP", 5, MSG, OPT, ".flow.SCTP"),
    ],
    "flow.TCP": [
        ("source_port", 1, UINT32, OPT, ""),
        ("destination_port", 2, UINT32, OPT, ""),
        ("flags", 3, MSG, OPT, ".flow.TCPFlags"),
    ],
    "flow.TCPFlags": [
        ("FIN", 1, BOOL, OPT, ""),
        ("SYN", 2, BOOL, OPT, ""),
        ("RST", 3, BOOL, OPT, ""),
        ("PSH", 4, BOOL, OPT, ""),
        ("ACK", 5, BOOL, OPT, ""),
        ("URG", 6, BOOL, OPT, ""),
        ("ECE", 7, BOOL, OPT, ""),
        ("CWR", 8, BOOL, OPT, ""),
        ("NS", 9, BOOL, OPT, ""),
    ],
    "flow.UDP": [  # port types: upstream API
        ("source_port", 1, UINT32, OPT, ""),
        ("destination_port", 2, UINT32, OPT, ""),
    ],
    "flow.SCTP": [
        ("source_port", 1, UINT32, OPT, ""),
        ("destination_port", 2, UINT32, OPT, ""),
    ],
    "flow.ICMPv4": [
        ("type", 1, UINT32, OPT, ""),
        ("code", 2, UINT32, OPT, ""),
    ],
    "flow.ICMPv6": [
        ("type", 1, UINT32, OPT, ""),
        ("code", 2, UINT32, OPT, ""),
    ],
    "flow.Service": [
        ("name", 1, STRING, OPT, ""),
        ("namespace", 2, STRING, OPT, ""),
    ],
    "flow.CiliumEventType": [  # types: upstream API
        ("type", 1, INT32, OPT, ""),
        ("sub_type", 2, INT32, OPT, ""),
    ],
    "flow.NetworkInterface": [
        ("index", 1, UINT32, OPT, ""),
        ("name", 2, STRING, OPT, ""),
    ],
    "flow.Policy": [  # types: upstream API
        ("name", 1, STRING, OPT, ""),
        ("namespace", 2, STRING, OPT, ""),
        ("labels", 3, STRING, REP, ""),
        ("revision", 4, UINT64, OPT, ""),
        ("kind", 5, STRING, OPT, ""),
    ],
    "flow.LostEvent": [
        ("source", 1, ENUM, OPT, ".flow.LostEventSource"),
        ("num_events_lost", 2, UINT64, OPT, ""),
        ("cpu", 3, MSG, OPT, INT32_VALUE),
        ("first", 4, MSG, OPT, TIMESTAMP),
        ("last", 5, MSG, OPT, TIMESTAMP),
    ],
    # §12.4: the fields our proto serves; types: upstream API (reply: repeated bool per facts)
    "flow.FlowFilter": [
        ("source_ip", 1, STRING, REP, ""),
        ("source_pod", 2, STRING, REP, ""),
        ("destination_ip", 3, STRING, REP, ""),
        ("destination_pod", 4, STRING, REP, ""),
        ("verdict", 5, ENUM, REP, ".flow.Verdict"),
        ("event_type", 6, MSG, REP, ".flow.EventTypeFilter"),
        ("source_label", 10, STRING, REP, ""),
        ("destination_label", 11, STRING, REP, ""),
        ("protocol", 12, STRING, REP, ""),
        ("source_port", 13, STRING, REP, ""),
        ("destination_port", 14, STRING, REP, ""),
        ("reply", 15, BOOL, REP, ""),
        ("source_service", 16, STRING, REP, ""),
        ("destination_service", 17, STRING, REP, ""),
        ("source_identity", 19, UINT32, REP, ""),
        ("destination_identity", 20, UINT32, REP, ""),
        ("tcp_flags", 23, MSG, REP, ".flow.TCPFlags"),
        ("node_name", 24, STRING, REP, ""),
        ("ip_version", 25, ENUM, REP, ".flow.IPVersion"),
        ("uuid", 29, STRING, REP, ""),
        ("traffic_direction", 30, ENUM, REP, ".flow.TrafficDirection"),
        ("drop_reason_desc", 33, ENUM, REP, ".flow.DropReason"),
    ],
    "flow.EventTypeFilter": [
        ("type", 1, INT32, OPT, ""),
        ("match_sub_type", 2, BOOL, OPT, ""),
        ("sub_type", 3, INT32, OPT, ""),
    ],
}

ONEOFS: dict[str, dict[str, tuple[str, ...]]] = {
    "observer.GetFlowsResponse": {"response_types": ("flow", "node_status", "lost_events")},
    "flow.Layer4": {"protocol": ("TCP", "UDP", "ICMPv4", "ICMPv6", "SCTP")},
}

# Every field number the facts list for messages we serve only in part: a field our proto
# declares beyond the table above must at least carry the upstream number.
FACTS_ALL_NUMBERS: dict[str, dict[str, int]] = {
    "flow.Flow": {
        "time": 1, "verdict": 2, "drop_reason": 3, "ethernet": 4, "IP": 5, "l4": 6,
        "source": 8, "destination": 9, "Type": 10, "node_name": 11, "source_names": 13,
        "destination_names": 14, "l7": 15, "reply": 16, "event_type": 19,
        "source_service": 20, "destination_service": 21, "traffic_direction": 22,
        "policy_match_type": 23, "trace_observation_point": 24, "drop_reason_desc": 25,
        "is_reply": 26, "debug_capture_point": 27, "interface": 28, "proxy_port": 29,
        "trace_context": 30, "sock_xlate_point": 31, "socket_cookie": 32, "cgroup_id": 33,
        "uuid": 34, "auth_type": 35, "trace_reason": 36, "node_labels": 37, "file": 38,
        "tunnel": 39, "ip_trace_id": 40, "emitter": 41, "egress_allowed_by": 21001,
        "ingress_allowed_by": 21002, "egress_denied_by": 21004, "ingress_denied_by": 21005,
        "policy_log": 21006, "aggregate": 21007, "Summary": 100000, "extensions": 150000,
    },
    "flow.FlowFilter": {
        "source_ip": 1, "source_pod": 2, "destination_ip": 3, "destination_pod": 4,
        "verdict": 5, "event_type": 6, "source_fqdn": 7, "destination_fqdn": 8,
        "http_status_code": 9, "source_label": 10, "destination_label": 11, "protocol": 12,
        "source_port": 13, "destination_port": 14, "reply": 15, "source_service": 16,
        "destination_service": 17, "dns_query": 18, "source_identity": 19,
        "destination_identity": 20, "http_method": 21, "http_path": 22, "tcp_flags": 23,
        "node_name": 24, "ip_version": 25, "source_workload": 26, "destination_workload": 27,
        "trace_id": 28, "uuid": 29, "traffic_direction": 30, "http_url": 31,
        "http_header": 32, "drop_reason_desc": 33, "source_ip_xlated": 34, "interface": 35,
        "node_labels": 36, "source_cluster_name": 37, "destination_cluster_name": 38,
        "ip_trace_id": 39, "encrypted": 40, "experimental": 999,
    },
    "observer.GetFlowsRequest": {
        "number": 1, "follow": 3, "blacklist": 5, "whitelist": 6, "since": 7, "until": 8,
        "first": 9, "field_mask": 10, "experimental": 999, "extensions": 150000,
    },
    "flow.Layer4": {"TCP": 1, "UDP": 2, "ICMPv4": 3, "ICMPv6": 4, "SCTP": 5, "VRRP": 6,
                    "IGMP": 7},
}

RESERVED_NUMBERS: dict[str, set[int]] = {
    "flow.Flow": {7, 12, 17, 18},
    "observer.GetFlowsRequest": {2},
}

# enum full name -> [(value name, number)], first value 0
ENUMS: dict[str, list[tuple[str, int]]] = {
    "flow.Verdict": [
        ("VERDICT_UNKNOWN", 0), ("FORWARDED", 1), ("DROPPED", 2), ("ERROR", 3), ("AUDIT", 4),
        ("REDIRECTED", 5), ("TRACED", 6), ("TRANSLATED", 7),
    ],
    "flow.TrafficDirection": [
        ("TRAFFIC_DIRECTION_UNKNOWN", 0), ("INGRESS", 1), ("EGRESS", 2),
    ],
    "flow.TraceObservationPoint": [
        ("UNKNOWN_POINT", 0), ("TO_PROXY", 1), ("TO_HOST", 2), ("TO_STACK", 3),
        ("TO_OVERLAY", 4), ("FROM_ENDPOINT", 5), ("FROM_PROXY", 6), ("FROM_HOST", 7),
        ("FROM_STACK", 8), ("FROM_OVERLAY", 9), ("FROM_NETWORK", 10), ("TO_NETWORK", 11),
        ("FROM_CRYPTO", 12), ("TO_CRYPTO", 13), ("TO_ENDPOINT", 101),
    ],
    "flow.FlowType": [("UNKNOWN_TYPE", 0), ("L3_L4", 1), ("L7", 2), ("SOCK", 3)],
    "flow.TraceReason": [
        ("TRACE_REASON_UNKNOWN", 0), ("NEW", 1), ("ESTABLISHED", 2), ("REPLY", 3),
        ("RELATED", 4), ("SRV6_ENCAP", 6), ("SRV6_DECAP", 7),
    ],
    "flow.SocketTranslationPoint": [
        ("SOCK_XLATE_POINT_UNKNOWN", 0), ("SOCK_XLATE_POINT_PRE_DIRECTION_FWD", 1),
        ("SOCK_XLATE_POINT_POST_DIRECTION_FWD", 2), ("SOCK_XLATE_POINT_PRE_DIRECTION_REV", 3),
        ("SOCK_XLATE_POINT_POST_DIRECTION_REV", 4),
    ],
    "flow.IPVersion": [("IP_NOT_USED", 0), ("IPv4", 1), ("IPv6", 2)],
    "flow.LostEventSource": [
        ("UNKNOWN_LOST_EVENT_SOURCE", 0), ("PERF_EVENT_RING_BUFFER", 1),
        ("OBSERVER_EVENTS_QUEUE", 2), ("HUBBLE_RING_BUFFER", 3),
    ],
    # §5 (199-201 have UNVERIFIED names and are left out)
    "flow.DropReason": [
        ("DROP_REASON_UNKNOWN", 0), ("INVALID_SOURCE_MAC", 130),
        ("INVALID_DESTINATION_MAC", 131), ("INVALID_SOURCE_IP", 132), ("POLICY_DENIED", 133),
        ("INVALID_PACKET_DROPPED", 134), ("CT_TRUNCATED_OR_INVALID_HEADER", 135),
        ("CT_MISSING_TCP_ACK_FLAG", 136), ("CT_UNKNOWN_L4_PROTOCOL", 137),
        ("CT_CANNOT_CREATE_ENTRY_FROM_PACKET", 138), ("UNSUPPORTED_L3_PROTOCOL", 139),
        ("MISSED_TAIL_CALL", 140), ("ERROR_WRITING_TO_PACKET", 141),
        ("UNKNOWN_L4_PROTOCOL", 142), ("UNKNOWN_ICMPV4_CODE", 143),
        ("UNKNOWN_ICMPV4_TYPE", 144), ("UNKNOWN_ICMPV6_CODE", 145),
        ("UNKNOWN_ICMPV6_TYPE", 146), ("ERROR_RETRIEVING_TUNNEL_KEY", 147),
        ("ERROR_RETRIEVING_TUNNEL_OPTIONS", 148), ("INVALID_GENEVE_OPTION", 149),
        ("UNKNOWN_L3_TARGET_ADDRESS", 150), ("STALE_OR_UNROUTABLE_IP", 151),
        ("NO_MATCHING_LOCAL_CONTAINER_FOUND", 152), ("ERROR_WHILE_CORRECTING_L3_CHECKSUM", 153),
        ("ERROR_WHILE_CORRECTING_L4_CHECKSUM", 154), ("CT_MAP_INSERTION_FAILED", 155),
        ("INVALID_IPV6_EXTENSION_HEADER", 156), ("IP_FRAGMENTATION_NOT_SUPPORTED", 157),
        ("SERVICE_BACKEND_NOT_FOUND", 158), ("NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT", 160),
        ("FAILED_TO_INSERT_INTO_PROXYMAP", 161), ("REACHED_EDT_RATE_LIMITING_DROP_HORIZON", 162),
        ("UNKNOWN_CONNECTION_TRACKING_STATE", 163), ("LOCAL_HOST_IS_UNREACHABLE", 164),
        ("NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION", 165),
        ("UNSUPPORTED_L2_PROTOCOL", 166), ("NO_MAPPING_FOR_NAT_MASQUERADE", 167),
        ("UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE", 168), ("FIB_LOOKUP_FAILED", 169),
        ("ENCAPSULATION_TRAFFIC_IS_PROHIBITED", 170), ("INVALID_IDENTITY", 171),
        ("UNKNOWN_SENDER", 172), ("NAT_NOT_NEEDED", 173), ("IS_A_CLUSTERIP", 174),
        ("FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND", 175), ("FORBIDDEN_ICMPV6_MESSAGE", 176),
        ("DENIED_BY_LB_SRC_RANGE_CHECK", 177), ("SOCKET_LOOKUP_FAILED", 178),
        ("SOCKET_ASSIGN_FAILED", 179), ("PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL", 180),
        ("POLICY_DENY", 181), ("VLAN_FILTERED", 182), ("INVALID_VNI", 183),
        ("INVALID_TC_BUFFER", 184), ("NO_SID", 185), ("MISSING_SRV6_STATE", 186),
        ("NAT46", 187), ("NAT64", 188), ("AUTH_REQUIRED", 189), ("CT_NO_MAP_FOUND", 190),
        ("SNAT_NO_MAP_FOUND", 191), ("INVALID_CLUSTER_ID", 192),
        ("UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP", 193), ("NO_EGRESS_GATEWAY", 194),
        ("UNENCRYPTED_TRAFFIC", 195), ("TTL_EXCEEDED", 196), ("NO_NODE_ID", 197),
        ("DROP_RATE_LIMITED", 198), ("DROP_HOST_NOT_READY", 202), ("DROP_EP_NOT_READY", 203),
        ("DROP_NO_EGRESS_IP", 204), ("DROP_PUNT_PROXY", 205),
    ],
    "relay.NodeState": [
        ("UNKNOWN_NODE_STATE", 0), ("NODE_CONNECTED", 1), ("NODE_UNAVAILABLE", 2),
        ("NODE_GONE", 3), ("NODE_ERROR", 4),
    ],
}

# (enum, number) whose spelling the facts mark UNVERIFIED: compared by number only.
UNVERIFIED_ENUM_NAMES: set[tuple[str, int]] = {("flow.TraceReason", 0)} | {
    ("relay.NodeState", n) for n in range(5)
}

# Drop reasons the brief requires at minimum (guards against the table above being trimmed).
REQUIRED_DROP_REASONS = {0, 132, 133, 134, 135, 152, 155, 157, 158, 181}

FILES = {  # package -> (file name, dependencies)
    "flow": ("flow/flow.proto",
             ["google/protobuf/timestamp.proto", "google/protobuf/wrappers.proto"]),
    "relay": ("relay/relay.proto", []),
    "observer": ("observer/observer.proto",
                 ["google/protobuf/field_mask.proto", "google/protobuf/timestamp.proto",
                  "google/protobuf/wrappers.proto", "flow/flow.proto", "relay/relay.proto"]),
}

_TYPES = {STRING: FDP.TYPE_STRING, BOOL: FDP.TYPE_BOOL, INT32: FDP.TYPE_INT32,
          UINT32: FDP.TYPE_UINT32, UINT64: FDP.TYPE_UINT64, DOUBLE: FDP.TYPE_DOUBLE,
          MSG: FDP.TYPE_MESSAGE, ENUM: FDP.TYPE_ENUM}
_LABELS = {OPT: FDP.LABEL_OPTIONAL, REP: FDP.LABEL_REPEATED}
_TYPE_NAMES = {v: k for k, v in _TYPES.items()}
_LABEL_NAMES = {v: k for k, v in _LABELS.items()}

# Our generated stubs, by package.
OURS = {"flow": flow_pb2, "relay": relay_pb2, "observer": observer_pb2}


# ---------------------------------------------------------------------------------------------
# Building the facts pool
# ---------------------------------------------------------------------------------------------

def build_facts_pool(messages=MESSAGES, enums=ENUMS, oneofs=ONEOFS) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for wk in (timestamp_pb2, wrappers_pb2, field_mask_pb2):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wk.DESCRIPTOR.serialized_pb))
    for package in ("flow", "relay", "observer"):  # dependency order
        name, deps = FILES[package]
        fdp = descriptor_pb2.FileDescriptorProto(
            name=name, package=package, syntax="proto3", dependency=deps)
        for full, fields in messages.items():
            pkg, msg_name = full.split(".", 1)
            if pkg != package:
                continue
            mdp = fdp.message_type.add(name=msg_name)
            oneof_index = {}
            for i, (oneof, members) in enumerate(oneofs.get(full, {}).items()):
                mdp.oneof_decl.add(name=oneof)
                oneof_index.update({m: i for m in members})
            for fname, number, ftype, label, type_name in fields:
                f = mdp.field.add(name=fname, number=number, type=_TYPES[ftype],
                                  label=_LABELS[label])
                if type_name:
                    f.type_name = type_name
                if fname in oneof_index:
                    f.oneof_index = oneof_index[fname]
        for full, values in enums.items():
            pkg, enum_name = full.split(".", 1)
            if pkg != package:
                continue
            edp = fdp.enum_type.add(name=enum_name)
            for vname, number in values:
                edp.value.add(name=vname, number=number)
        pool.Add(fdp)
    return pool


FACTS_POOL = build_facts_pool()


def facts_class(full_name: str, pool=FACTS_POOL):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


# ---------------------------------------------------------------------------------------------
# Checking helpers
# ---------------------------------------------------------------------------------------------

def unknown_field_report(msg, path: str | None = None) -> list[str]:
    """Every unknown field in msg and its nested messages, as readable strings."""
    path = path or msg.DESCRIPTOR.full_name
    out = [f"{path}: unknown field #{f.field_number} (wire type {f.wire_type})"
           for f in unknown_fields.UnknownFieldSet(msg)]
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.is_repeated:
            for i, item in enumerate(value):
                out += unknown_field_report(item, f"{path}.{fd.name}[{i}]")
        else:
            out += unknown_field_report(value, f"{path}.{fd.name}")
    return out


def undeclared_enum_values(msg, path: str | None = None) -> list[str]:
    """Open proto3 enums keep unknown numbers as ints; list any value the pool doesn't name."""
    path = path or msg.DESCRIPTOR.full_name
    out = []
    for fd, value in msg.ListFields():
        items = list(value) if fd.is_repeated else [value]
        for i, item in enumerate(items):
            where = f"{path}.{fd.name}" + (f"[{i}]" if fd.is_repeated else "")
            if fd.enum_type is not None and item not in fd.enum_type.values_by_number:
                out.append(f"{where}: {item} is not a value of {fd.enum_type.full_name}")
            elif fd.message_type is not None:
                out += undeclared_enum_values(item, where)
    return out


def as_dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     use_integers_for_enums=True)


def cross_decode(msg, pool=FACTS_POOL):
    """Serialize one of our messages and decode it with the same-named class of `pool`."""
    cls = facts_class(msg.DESCRIPTOR.full_name, pool)
    return cls.FromString(msg.SerializeToString())


def assert_survives(ours, pool=FACTS_POOL):
    theirs = cross_decode(ours, pool)
    assert unknown_field_report(theirs) == []
    assert undeclared_enum_values(theirs) == []
    assert as_dict(theirs) == as_dict(ours)
    # JSON speaks enum names: those must agree too.
    assert json_format.MessageToDict(theirs) == json_format.MessageToDict(ours)
    # And back: what the facts pool re-encodes, our classes read unchanged.
    back = type(ours).FromString(theirs.SerializeToString(deterministic=True))
    assert unknown_field_report(back) == []
    assert back == ours
    return theirs


def our_message_proto(full_name: str) -> descriptor_pb2.DescriptorProto:
    pkg, name = full_name.split(".", 1)
    fdp = descriptor_pb2.FileDescriptorProto()
    OURS[pkg].DESCRIPTOR.CopyToProto(fdp)
    for m in fdp.message_type:
        if m.name == name:
            return m
    raise LookupError(full_name)


def our_enum_proto(full_name: str) -> descriptor_pb2.EnumDescriptorProto:
    pkg, name = full_name.split(".", 1)
    fdp = descriptor_pb2.FileDescriptorProto()
    OURS[pkg].DESCRIPTOR.CopyToProto(fdp)
    for e in fdp.enum_type:
        if e.name == name:
            return e
    raise LookupError(full_name)


def _describe(type_: int, label: int, type_name: str) -> str:
    return f"{_LABEL_NAMES.get(label, label)} {_TYPE_NAMES.get(type_, type_)} {type_name}".strip()


def message_problems(full_name: str, table=MESSAGES, oneofs=ONEOFS) -> list[str]:
    """Differences between the facts table and our generated descriptor for one message."""
    try:
        ours = our_message_proto(full_name)
    except LookupError:
        return [f"{full_name}: not declared in our proto"]
    by_name = {f.name: f for f in ours.field}
    problems = []
    for fname, number, ftype, label, type_name in table[full_name]:
        f = by_name.get(fname)
        if f is None:
            problems.append(f"{full_name}.{fname} (#{number}): missing from our proto")
            continue
        if f.number != number:
            problems.append(f"{full_name}.{fname}: number {f.number} in our proto, "
                            f"{number} in the facts")
        want = _describe(_TYPES[ftype], _LABELS[label], type_name)
        got = _describe(f.type, f.label, f.type_name)
        if want != got:
            problems.append(f"{full_name}.{fname} (#{number}): our type is '{got}', "
                            f"the facts say '{want}'")
    for oneof, members in oneofs.get(full_name, {}).items():
        idx = [i for i, o in enumerate(ours.oneof_decl) if o.name == oneof]
        if not idx:
            problems.append(f"{full_name}: oneof {oneof} missing from our proto")
            continue
        ours_members = {f.name for f in ours.field
                        if f.HasField("oneof_index") and f.oneof_index == idx[0]}
        if set(members) - ours_members:
            problems.append(f"{full_name}: oneof {oneof} lacks "
                            f"{sorted(set(members) - ours_members)} in our proto")
    # Fields we declare beyond the table must at least carry the upstream number.
    table_names = {t[0] for t in table[full_name]}
    known = FACTS_ALL_NUMBERS.get(full_name, {})
    reserved = RESERVED_NUMBERS.get(full_name, set())
    for f in ours.field:
        if f.number in reserved:
            problems.append(f"{full_name}.{f.name}: uses #{f.number}, reserved upstream")
        if f.name in table_names:
            continue
        if f.name not in known:
            problems.append(f"{full_name}.{f.name} (#{f.number}): declared in our proto but "
                            "unknown to the facts")
        elif known[f.name] != f.number:
            problems.append(f"{full_name}.{f.name}: number {f.number} in our proto, "
                            f"{known[f.name]} in the facts")
    return problems


def enum_problems(full_name: str, enums=ENUMS) -> list[str]:
    try:
        ours = our_enum_proto(full_name)
    except LookupError:
        return [f"{full_name}: not declared in our proto"]
    by_number = {v.number: v.name for v in ours.value}
    by_name = {v.name: v.number for v in ours.value}
    problems = []
    for vname, number in enums[full_name]:
        if (full_name, number) in UNVERIFIED_ENUM_NAMES:
            if number not in by_number:
                problems.append(f"{full_name}: no value numbered {number} in our proto")
            continue
        if vname not in by_name:
            where = (f" (our #{number} is {by_number[number]})" if number in by_number else "")
            problems.append(f"{full_name}.{vname} = {number}: missing from our proto{where}")
        elif by_name[vname] != number:
            problems.append(f"{full_name}.{vname}: {by_name[vname]} in our proto, "
                            f"{number} in the facts")
    table_numbers = {n: v for v, n in enums[full_name]}
    for v in ours.value:
        if v.number not in table_numbers:
            problems.append(f"{full_name}.{v.name} = {v.number}: declared in our proto but "
                            "not in the facts")
        elif ((full_name, v.number) not in UNVERIFIED_ENUM_NAMES
              and table_numbers[v.number] != v.name):
            problems.append(f"{full_name}: our #{v.number} is {v.name}, the facts say "
                            f"{table_numbers[v.number]}")
    return problems


# ---------------------------------------------------------------------------------------------
# Realistic messages, built with OUR classes
# ---------------------------------------------------------------------------------------------

def _ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def drop_flow() -> flow_pb2.Flow:
    """A TCP SYN denied at ingress by a deny policy (monitor type 1 = drop)."""
    return flow_pb2.Flow(
        time=_ts(1_767_225_600, 123_456_789),
        uuid="5b7e1b3c-0f0d-4a7e-9a3e-4c1d2f6a0b11",
        verdict=flow_pb2.DROPPED,
        drop_reason=133,
        drop_reason_desc=flow_pb2.POLICY_DENIED,
        ethernet=flow_pb2.Ethernet(source="0a:58:0a:f4:00:05", destination="0a:58:0a:f4:00:09"),
        IP=flow_pb2.IP(source="10.244.0.5", destination="10.244.0.9",
                       ipVersion=flow_pb2.IPv4),
        l4=flow_pb2.Layer4(TCP=flow_pb2.TCP(source_port=41234, destination_port=8080,
                                            flags=flow_pb2.TCPFlags(SYN=True))),
        source=flow_pb2.Endpoint(
            ID=1234, identity=48213, namespace="shop", pod_name="frontend-7c9f-x2k4q",
            labels=["k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=shop"],
            workloads=[flow_pb2.Workload(name="frontend", kind="Deployment")],
            cluster_name="default"),
        destination=flow_pb2.Endpoint(
            ID=2201, identity=51007, namespace="shop", pod_name="db-0",
            labels=["k8s:app=db", "k8s:io.kubernetes.pod.namespace=shop"],
            workloads=[flow_pb2.Workload(name="db", kind="StatefulSet")]),
        Type=flow_pb2.L3_L4,
        node_name="kind-worker",
        node_labels=["kubernetes.io/hostname=kind-worker"],
        reply=False,
        is_reply=wrappers_pb2.BoolValue(value=False),
        event_type=flow_pb2.CiliumEventType(type=1, sub_type=133),
        traffic_direction=flow_pb2.INGRESS,
        interface=flow_pb2.NetworkInterface(index=7, name="lxc1a2b3c"),
        ingress_denied_by=[flow_pb2.Policy(
            name="deny-frontend-to-db", namespace="shop", kind="CiliumNetworkPolicy",
            revision=42,
            labels=["k8s:io.cilium.k8s.policy.name=deny-frontend-to-db",
                    "k8s:io.cilium.k8s.policy.namespace=shop"])],
    )


def trace_flow() -> flow_pb2.Flow:
    """A DNS reply delivered to an endpoint (monitor type 4 = trace), over IPv6/UDP."""
    return flow_pb2.Flow(
        time=_ts(1_767_225_601, 5),
        uuid="0d2c9a1e-7f44-4e55-8a8b-1f3e5d7c9b21",
        verdict=flow_pb2.FORWARDED,
        IP=flow_pb2.IP(source="fd00:10:96::a", destination="fd00:10:244::5",
                       ipVersion=flow_pb2.IPv6, encrypted=True, source_xlated="fd00:10:244::7"),
        l4=flow_pb2.Layer4(UDP=flow_pb2.UDP(source_port=53, destination_port=50123)),
        source=flow_pb2.Endpoint(ID=300, identity=102, namespace="kube-system",
                                 pod_name="coredns-5d78c9869d-abcde",
                                 labels=["k8s:k8s-app=kube-dns"]),
        destination=flow_pb2.Endpoint(ID=1234, identity=48213, namespace="shop",
                                      pod_name="frontend-7c9f-x2k4q",
                                      labels=["k8s:app=frontend"]),
        Type=flow_pb2.L3_L4,
        node_name="kind-worker",
        source_names=["kube-dns.kube-system.svc.cluster.local"],
        destination_names=["frontend.shop.svc.cluster.local"],
        reply=True,
        is_reply=wrappers_pb2.BoolValue(value=True),
        event_type=flow_pb2.CiliumEventType(type=4, sub_type=0),
        source_service=flow_pb2.Service(name="kube-dns", namespace="kube-system"),
        destination_service=flow_pb2.Service(name="frontend", namespace="shop"),
        traffic_direction=flow_pb2.EGRESS,
        trace_observation_point=flow_pb2.TO_ENDPOINT,
        trace_reason=flow_pb2.ESTABLISHED,
        sock_xlate_point=flow_pb2.SOCK_XLATE_POINT_POST_DIRECTION_REV,
        socket_cookie=0x1122334455667788,
        cgroup_id=9_876_543_210,
        interface=flow_pb2.NetworkInterface(index=3, name="cilium_host"),
    )


def policy_verdict_flow() -> flow_pb2.Flow:
    """An ICMPv4 echo allowed at egress (monitor type 5 = policy verdict)."""
    return flow_pb2.Flow(
        time=_ts(1_767_225_602),
        verdict=flow_pb2.FORWARDED,
        IP=flow_pb2.IP(source="10.244.0.5", destination="10.244.1.17",
                       ipVersion=flow_pb2.IPv4),
        l4=flow_pb2.Layer4(ICMPv4=flow_pb2.ICMPv4(type=8, code=0)),
        source=flow_pb2.Endpoint(ID=1234, identity=48213, namespace="shop",
                                 labels=["k8s:app=frontend"]),
        destination=flow_pb2.Endpoint(identity=2, labels=["reserved:world"]),
        Type=flow_pb2.L3_L4,
        node_name="kind-worker",
        is_reply=wrappers_pb2.BoolValue(value=False),
        event_type=flow_pb2.CiliumEventType(type=5, sub_type=0),
        traffic_direction=flow_pb2.EGRESS,
        policy_match_type=1,
        egress_allowed_by=[
            flow_pb2.Policy(name="allow-ping", namespace="shop", kind="CiliumNetworkPolicy",
                            revision=7, labels=["k8s:io.cilium.k8s.policy.name=allow-ping"]),
            flow_pb2.Policy(name="allow-all-egress", kind="CiliumClusterwideNetworkPolicy",
                            revision=7),
        ],
    )


def sctp_and_icmpv6_flows() -> list[flow_pb2.Flow]:
    return [
        flow_pb2.Flow(verdict=flow_pb2.AUDIT, drop_reason_desc=flow_pb2.POLICY_DENY,
                      l4=flow_pb2.Layer4(SCTP=flow_pb2.SCTP(source_port=3868,
                                                            destination_port=3868)),
                      egress_denied_by=[flow_pb2.Policy(name="no-sctp")],
                      ingress_allowed_by=[flow_pb2.Policy(name="sctp-in")]),
        flow_pb2.Flow(verdict=flow_pb2.DROPPED,
                      drop_reason_desc=flow_pb2.SERVICE_BACKEND_NOT_FOUND,
                      l4=flow_pb2.Layer4(ICMPv6=flow_pb2.ICMPv6(type=128, code=0)),
                      trace_observation_point=flow_pb2.FROM_NETWORK,
                      Type=flow_pb2.SOCK, trace_reason=flow_pb2.SRV6_DECAP),
    ]


def all_tcp_flags() -> flow_pb2.TCPFlags:
    return flow_pb2.TCPFlags(FIN=True, SYN=True, RST=True, PSH=True, ACK=True, URG=True,
                             ECE=True, CWR=True, NS=True)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_table_covers_what_the_brief_requires():
    drop = {n for _, n in ENUMS["flow.DropReason"]}
    assert REQUIRED_DROP_REASONS <= drop
    assert {n for _, n in ENUMS["relay.NodeState"]} == {0, 1, 2, 3, 4}
    for full in MESSAGES:
        numbers = [t[1] for t in MESSAGES[full]]
        assert len(numbers) == len(set(numbers)), f"{full}: duplicate number in the table"


# (1) our classes -> facts pool

def test_drop_flow_decodes_upstream():
    theirs = assert_survives(drop_flow())
    assert theirs.verdict == 2 and theirs.drop_reason == 133
    assert theirs.drop_reason_desc == 133
    assert theirs.DESCRIPTOR.fields_by_name["drop_reason_desc"].enum_type \
        .values_by_number[theirs.drop_reason_desc].name == "POLICY_DENIED"
    assert theirs.l4.WhichOneof("protocol") == "TCP"
    assert theirs.l4.TCP.flags.SYN and not theirs.l4.TCP.flags.ACK
    assert theirs.l4.TCP.destination_port == 8080
    # is_reply = false is "known, not a reply": the wrapper must be present.
    assert theirs.HasField("is_reply") and theirs.is_reply.value is False
    assert theirs.event_type.type == 1
    assert list(theirs.source.labels) == ["k8s:app=frontend",
                                          "k8s:io.kubernetes.pod.namespace=shop"]
    assert theirs.source.workloads[0].kind == "Deployment"
    assert theirs.ingress_denied_by[0].name == "deny-frontend-to-db"
    assert theirs.ingress_denied_by[0].revision == 42
    assert theirs.traffic_direction == 1 and theirs.interface.name == "lxc1a2b3c"
    assert theirs.time.nanos == 123_456_789


def test_trace_flow_decodes_upstream():
    theirs = assert_survives(trace_flow())
    assert theirs.l4.WhichOneof("protocol") == "UDP"
    assert theirs.l4.UDP.source_port == 53
    assert theirs.trace_observation_point == 101
    assert theirs.trace_reason == 2
    assert theirs.is_reply.value is True and theirs.reply is True
    assert theirs.IP.ipVersion == 2 and theirs.IP.encrypted
    assert theirs.destination_service.name == "frontend"
    assert theirs.socket_cookie == 0x1122334455667788 and theirs.sock_xlate_point == 4


def test_policy_verdict_flow_decodes_upstream():
    theirs = assert_survives(policy_verdict_flow())
    assert theirs.l4.WhichOneof("protocol") == "ICMPv4"
    assert theirs.l4.ICMPv4.type == 8
    assert theirs.event_type.type == 5
    assert [p.name for p in theirs.egress_allowed_by] == ["allow-ping", "allow-all-egress"]
    assert theirs.egress_allowed_by[1].kind == "CiliumClusterwideNetworkPolicy"
    assert theirs.policy_match_type == 1 and theirs.traffic_direction == 2


@pytest.mark.parametrize("flow", sctp_and_icmpv6_flows(), ids=["sctp", "icmpv6"])
def test_other_flows_decode_upstream(flow):
    assert_survives(flow)


def test_every_tcp_flag_decodes_upstream():
    flow = flow_pb2.Flow(l4=flow_pb2.Layer4(TCP=flow_pb2.TCP(flags=all_tcp_flags())))
    theirs = assert_survives(flow)
    flags = theirs.l4.TCP.flags
    assert all(getattr(flags, n) for n in ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE",
                                           "CWR", "NS"))


@pytest.mark.parametrize("make", [drop_flow, trace_flow, policy_verdict_flow],
                         ids=["drop", "trace", "policy-verdict"])
def test_flow_response_decodes_upstream(make):
    resp = observer_pb2.GetFlowsResponse(flow=make(), node_name="kind-worker",
                                         time=_ts(1_767_225_603, 9))
    theirs = assert_survives(resp)
    assert theirs.WhichOneof("response_types") == "flow"
    assert theirs.node_name == "kind-worker" and theirs.time.nanos == 9


def test_lost_events_response_decodes_upstream():
    resp = observer_pb2.GetFlowsResponse(
        lost_events=flow_pb2.LostEvent(
            source=flow_pb2.HUBBLE_RING_BUFFER, num_events_lost=17,
            cpu=wrappers_pb2.Int32Value(value=3), first=_ts(1_767_225_600),
            last=_ts(1_767_225_610)),
        node_name="kind-worker", time=_ts(1_767_225_611))
    theirs = assert_survives(resp)
    assert theirs.WhichOneof("response_types") == "lost_events"
    assert theirs.lost_events.source == 3 and theirs.lost_events.num_events_lost == 17
    assert theirs.lost_events.cpu.value == 3
    assert theirs.lost_events.last.seconds == 1_767_225_610


def test_node_status_response_decodes_upstream():
    resp = observer_pb2.GetFlowsResponse(
        node_status=relay_pb2.NodeStatusEvent(state_change=relay_pb2.NODE_UNAVAILABLE,
                                              node_names=["kind-worker2"], message="timeout"),
        node_name="kind-worker")
    theirs = assert_survives(resp)
    assert theirs.WhichOneof("response_types") == "node_status"
    assert theirs.node_status.state_change == 2


def test_server_status_decodes_upstream():
    status = observer_pb2.ServerStatusResponse(
        num_flows=4095, max_flows=4095, seen_flows=123_456, uptime_ns=86_400_000_000_000,
        num_connected_nodes=wrappers_pb2.UInt32Value(value=1),
        num_unavailable_nodes=wrappers_pb2.UInt32Value(value=0),
        unavailable_nodes=["kind-worker2"], version="v1.19.4-ciliumpy", flows_rate=12.5)
    theirs = assert_survives(status)
    assert theirs.uptime_ns == 86_400_000_000_000 and theirs.flows_rate == 12.5
    assert theirs.HasField("num_unavailable_nodes") and theirs.num_unavailable_nodes.value == 0
    assert theirs.num_connected_nodes.value == 1


def test_get_nodes_decodes_upstream():
    resp = observer_pb2.GetNodesResponse(nodes=[
        observer_pb2.Node(name="kind-worker", version="v1.19.4-ciliumpy",
                          address="172.18.0.3:4244", state=relay_pb2.NODE_CONNECTED,
                          tls=observer_pb2.TLS(enabled=True, server_name="kind-worker.hubble"),
                          uptime_ns=5_000_000_000, num_flows=10, max_flows=4095,
                          seen_flows=99),
        observer_pb2.Node(name="kind-worker2", state=relay_pb2.NODE_GONE),
    ])
    theirs = assert_survives(resp)
    assert theirs.nodes[0].state == 1 and theirs.nodes[0].tls.server_name == "kind-worker.hubble"
    assert theirs.nodes[0].seen_flows == 99 and theirs.nodes[1].state == 3


def test_get_namespaces_decodes_upstream():
    resp = observer_pb2.GetNamespacesResponse(namespaces=[
        observer_pb2.Namespace(cluster="default", namespace="shop")])
    theirs = assert_survives(resp)
    assert theirs.namespaces[0].namespace == "shop"


# (2) facts pool -> our classes

def test_get_flows_request_from_upstream_client():
    Req = facts_class("observer.GetFlowsRequest")
    Filter = facts_class("flow.FlowFilter")
    ETF = facts_class("flow.EventTypeFilter")
    Flags = facts_class("flow.TCPFlags")
    Ts = facts_class("google.protobuf.Timestamp")
    Mask = facts_class("google.protobuf.FieldMask")
    req = Req(
        number=100, follow=True, first=False,
        since=Ts(seconds=1_767_225_000), until=Ts(seconds=1_767_226_000, nanos=5),
        field_mask=Mask(paths=["time", "verdict", "source.pod_name"]),
        whitelist=[
            Filter(source_ip=["10.244.0.0/16"], destination_ip=["10.96.0.10"],
                   source_pod=["shop/frontend-"], destination_pod=["kube-system/"],
                   verdict=[2, 4], event_type=[ETF(type=1), ETF(type=4, match_sub_type=True,
                                                              sub_type=0)],
                   source_label=["k8s:app=frontend"], destination_label=["app in (db, api)"],
                   protocol=["tcp", "udp"], source_port=["41234"], destination_port=["53"],
                   reply=[False], source_service=["shop/frontend"],
                   destination_service=["kube-system/kube-dns"], source_identity=[48213],
                   destination_identity=[102], tcp_flags=[Flags(SYN=True), Flags(RST=True)],
                   node_name=["kind-*"], ip_version=[1, 2], uuid=["5b7e1b3c"],
                   traffic_direction=[1], drop_reason_desc=[133, 181]),
            Filter(verdict=[1]),
        ],
        blacklist=[Filter(source_identity=[1], destination_port=["4244"], reply=[True])],
    )
    ours = observer_pb2.GetFlowsRequest.FromString(req.SerializeToString())
    assert unknown_field_report(ours) == []
    assert undeclared_enum_values(ours) == []
    assert as_dict(ours) == as_dict(req)
    assert json_format.MessageToDict(ours) == json_format.MessageToDict(req)
    w = ours.whitelist[0]
    assert list(w.verdict) == [flow_pb2.DROPPED, flow_pb2.AUDIT]
    assert list(w.drop_reason_desc) == [flow_pb2.POLICY_DENIED, flow_pb2.POLICY_DENY]
    assert w.event_type[1].match_sub_type and w.event_type[1].sub_type == 0
    assert w.tcp_flags[0].SYN and w.tcp_flags[1].RST
    assert list(w.reply) == [False] and list(ours.blacklist[0].reply) == [True]
    assert list(w.ip_version) == [flow_pb2.IPv4, flow_pb2.IPv6]
    assert list(w.traffic_direction) == [flow_pb2.INGRESS]
    assert ours.number == 100 and ours.follow and ours.until.seconds == 1_767_226_000
    assert list(ours.field_mask.paths) == ["time", "verdict", "source.pod_name"]
    assert list(ours.blacklist[0].source_identity) == [1]


# (3) per-field comparison of the table with our generated descriptors

@pytest.mark.parametrize("full_name", sorted(MESSAGES))
def test_our_message_matches_facts(full_name):
    problems = message_problems(full_name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("full_name", sorted(ENUMS))
def test_our_enum_matches_facts(full_name):
    problems = enum_problems(full_name)
    assert not problems, "\n".join(problems)


def test_observer_service_rpcs():
    svc = observer_pb2.DESCRIPTOR.services_by_name["Observer"]
    want = {"GetFlows": ("observer.GetFlowsRequest", "observer.GetFlowsResponse", True),
            "GetNodes": ("observer.GetNodesRequest", "observer.GetNodesResponse", False),
            "ServerStatus": ("observer.ServerStatusRequest", "observer.ServerStatusResponse",
                             False)}
    for name, (req, resp, stream) in want.items():
        m = svc.methods_by_name[name]
        assert (m.input_type.full_name, m.output_type.full_name) == (req, resp)
        assert m.server_streaming is stream and not m.client_streaming
    assert svc.full_name == "observer.Observer"


# (4) round trips of our own Flow

@pytest.mark.parametrize("make", [drop_flow, trace_flow, policy_verdict_flow],
                         ids=["drop", "trace", "policy-verdict"])
def test_flow_round_trips(make):
    flow = make()
    assert flow_pb2.Flow.FromString(flow.SerializeToString()) == flow
    text = json_format.MessageToJson(flow)
    assert json_format.Parse(text, flow_pb2.Flow()) == flow
    # An upstream client parsing our JSON (enum names, json_names) gets the same flow.
    theirs = json_format.Parse(text, facts_class("flow.Flow")())
    assert as_dict(theirs) == as_dict(flow)


# Stubs must be what hubble/proto says (otherwise (1)-(4) test stale code).

def _without_json_names(fdp):
    """protoc's descriptor sets carry json_name, the Python plugin's embedded ones don't."""
    def strip(messages):
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            strip(m.nested_type)
    strip(fdp.message_type)
    return fdp


def test_generated_stubs_are_fresh(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    import grpc_tools

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proto_dir = os.path.join(root, "hubble", "proto")
    out = tmp_path / "set.pb"
    rc = protoc.main(["protoc", f"-I{proto_dir}",
                      f"-I{os.path.join(os.path.dirname(grpc_tools.__file__), '_proto')}",
                      f"--descriptor_set_out={out}", "flow/flow.proto", "relay/relay.proto",
                      "observer/observer.proto"])
    assert rc == 0
    compiled = {f.name: _without_json_names(f) for f in
                descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    for mod in OURS.values():
        ours = _without_json_names(
            descriptor_pb2.FileDescriptorProto.FromString(mod.DESCRIPTOR.serialized_pb))
        assert ours == compiled[ours.name], (
            f"{ours.name}: generated stubs differ from hubble/proto; run "
            "`python -m cilium_py.hubble.protogen`")


# The harness can fail: a deliberately wrong table must be caught.

def _mutated(full_name: str, field: str, **change) -> dict:
    messages = copy.deepcopy(MESSAGES)
    rows = messages[full_name]
    for i, row in enumerate(rows):
        if row[0] == field:
            rows[i] = (change.get("name", row[0]), change.get("number", row[1]),
                       change.get("type", row[2]), row[3], row[4])
    return messages


def test_sanity_renumbered_field_is_detected():
    # drop_reason_desc 25 -> 2500: the 25 on the wire becomes an unknown field.
    bad = build_facts_pool(_mutated("flow.Flow", "drop_reason_desc", number=2500))
    theirs = cross_decode(drop_flow(), bad)
    report = unknown_field_report(theirs)
    assert report == ["flow.Flow: unknown field #25 (wire type 0)"]
    assert as_dict(theirs) != as_dict(drop_flow())
    with pytest.raises(AssertionError):
        assert_survives(drop_flow(), bad)

    # A nested message: Endpoint.pod_name 5 -> 15 shows up under source and destination.
    bad = build_facts_pool(_mutated("flow.Endpoint", "pod_name", number=15))
    report = unknown_field_report(cross_decode(drop_flow(), bad))
    assert report == ["flow.Flow.source: unknown field #5 (wire type 2)",
                      "flow.Flow.destination: unknown field #5 (wire type 2)"]

    # And the per-field comparison names the culprit.
    problems = message_problems("flow.Flow",
                                _mutated("flow.Flow", "drop_reason_desc", number=2500))
    assert problems == ["flow.Flow.drop_reason_desc: number 25 in our proto, "
                        "2500 in the facts"]


def test_sanity_swapped_or_retyped_field_is_detected():
    # Swapping two numbers leaves nothing unknown, but the values land in the wrong fields.
    swapped = copy.deepcopy(MESSAGES)
    swapped["flow.TCP"] = [("source_port", 2, UINT32, OPT, ""),
                           ("destination_port", 1, UINT32, OPT, ""),
                           ("flags", 3, MSG, OPT, ".flow.TCPFlags")]
    theirs = cross_decode(drop_flow(), build_facts_pool(swapped))
    assert unknown_field_report(theirs) == []
    assert theirs.l4.TCP.source_port == 8080
    assert as_dict(theirs) != as_dict(drop_flow())
    with pytest.raises(AssertionError):
        assert_survives(drop_flow(), build_facts_pool(swapped))
    assert message_problems("flow.TCP", swapped) == [
        "flow.TCP.source_port: number 1 in our proto, 2 in the facts",
        "flow.TCP.destination_port: number 2 in our proto, 1 in the facts"]

    # A retyped field is named by the per-field comparison.
    retyped = _mutated("flow.Policy", "revision", type=STRING)
    assert message_problems("flow.Policy", retyped) == [
        "flow.Policy.revision (#4): our type is 'optional uint64', "
        "the facts say 'optional string'"]

    # A renumbered enum value, and one the facts have but we lack.
    enums = copy.deepcopy(ENUMS)
    enums["flow.DropReason"] = [(n, 1330 if v == 133 else v) for n, v in enums["flow.DropReason"]]
    enums["flow.Verdict"].append(("NOT_IN_OURS", 99))
    assert enum_problems("flow.DropReason", enums) == [
        "flow.DropReason.POLICY_DENIED: 133 in our proto, 1330 in the facts",
        "flow.DropReason.POLICY_DENIED = 133: declared in our proto but not in the facts"]
    assert enum_problems("flow.Verdict", enums) == [
        "flow.Verdict.NOT_IN_OURS = 99: missing from our proto"]
