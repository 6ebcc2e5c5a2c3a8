"""Datapath event records -> flow.Flow, enriched with what the agent knows.

The parser reads the raw `struct event` bytes (bpf/lib/events.h) with one precompiled
struct instead of going through the ctypes mirror and MonitorEvent: at 100k events/s
every microsecond per record is a tenth of a core. Names come from a NodeView
(cilium_py/hubble/nodeview.py: the agent's endpoints, identities, policies and services);
what it returns is cached per address until its `generation` changes, so a steady stream
of flows between the same pods costs dictionary lookups, not label formatting.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from cilium_py.datapath.maps.events import (
    EVENT_DROP,
    EVENT_POLICY_VERDICT,
    EVENT_TRACE,
    PV_FLAG_EGRESS,
    PV_MATCH_SHIFT,
    EventRecord,
)
from google.protobuf.timestamp_pb2 import Timestamp as _Timestamp

from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.nodeview import NodeView, NullNodeView

# The fixed part of struct event, in the C field order; the captured packet follows.
_HEAD = struct.Struct("<BBHIIHH" "IIHBBIHBb2sBBiI")
PACKET_OFFSET = EventRecord.data.offset
assert _HEAD.size == PACKET_OFFSET, "struct event changed: update parser._HEAD"

ETH_HLEN = 14
ETH_P_IP = b"\x08\x00"
DIR_INGRESS, DIR_EGRESS = 1, 2          # METRIC_DIR_* in the drop record's reason byte
TRACE_TO_ENDPOINT, TRACE_FROM_ENDPOINT = 0, 5
CT_REPLY = 2

# Datapath observation point -> TraceObservationPoint: only to-endpoint differs (0 -> 101).
OBSERVATION_POINTS = {TRACE_TO_ENDPOINT: F.TO_ENDPOINT, TRACE_FROM_ENDPOINT: F.FROM_ENDPOINT}

IDENTITY_WORLD = 2


def _tcp_flags(bits: int) -> F.TCPFlags:
    return F.TCPFlags(FIN=bool(bits & 1), SYN=bool(bits & 2), RST=bool(bits & 4),
                      PSH=bool(bits & 8), ACK=bool(bits & 16), URG=bool(bits & 32),
                      ECE=bool(bits & 64), CWR=bool(bits & 128), NS=bool(bits & 256))


# Every combination of the flags byte plus NS, built once: copying one message is cheaper
# than nine field assignments per packet.
_TCP_FLAGS = [_tcp_flags(bits) for bits in range(512)]


class ParseError(ValueError):
    """A record the parser cannot turn into a flow (short, unknown type); counted, skipped."""


class UUIDs:
    """Unique flow IDs in UUID form: a random prefix per process and a counter.
    uuid4() per flow would cost about a third of the whole parse."""

    def __init__(self):
        head = os.urandom(8).hex()
        self._prefix = f"{head[:8]}-{head[8:12]}-4{head[13:16]}-{'89ab'[os.urandom(1)[0] & 3]}"
        self._count = int.from_bytes(os.urandom(2), "big") << 32

    def next(self) -> str:
        self._count += 1
        c = self._count
        return f"{self._prefix}{(c >> 48) & 0xfff:03x}-{c & 0xffffffffffff:012x}"


class Parser:
    def __init__(self, node_name: str, node_view: NodeView | None = None):
        self.node_name = node_name
        self.node_view = node_view or NullNodeView()
        self.uuids = UUIDs()
        self.parsed = 0
        self.errors = 0
        self._generation = None
        self._endpoints: dict[tuple[str, int], F.Endpoint] = {}
        self._policies: dict[int, F.Policy | None] = {}
        self._services: dict[tuple[str, int, int], F.Service | None] = {}
        # Policy-verdict cookies by packet, so the drop that follows a deny verdict for the
        # same packet can name the policy (the drop record has no room for the cookie).
        self._recent_denies: dict[tuple, tuple[int, int]] = {}

    # -- caches ---------------------------------------------------------------------

    def _check_generation(self) -> None:
        generation = self.node_view.generation
        if generation != self._generation:
            self._generation = generation
            self._endpoints.clear()
            self._policies.clear()
            self._services.clear()

    def _endpoint(self, ip: str, identity: int) -> F.Endpoint:
        key = (ip, identity)
        ep = self._endpoints.get(key)
        if ep is not None:
            return ep
        info = self.node_view.endpoint_by_ip(ip) if ip else None
        if info is not None:
            ep = F.Endpoint(ID=info.id, identity=info.identity, namespace=info.namespace,
                            pod_name=info.pod_name, labels=info.labels)
        else:
            if not identity and ip:
                identity = self.node_view.identity_by_ip(ip) or IDENTITY_WORLD
            ep = F.Endpoint(identity=identity, labels=self.node_view.identity_labels(identity))
        if len(self._endpoints) > 65536:
            self._endpoints.clear()
        self._endpoints[key] = ep
        return ep

    def _policy(self, cookie: int) -> F.Policy | None:
        if cookie in self._policies:
            return self._policies[cookie]
        ref = self.node_view.policy_by_cookie(cookie) if cookie else None
        policy = F.Policy(name=ref.name, namespace=ref.namespace, kind=ref.kind) if ref else None
        self._policies[cookie] = policy
        return policy

    def _service(self, ip: str, port: int, proto: int) -> F.Service | None:
        key = (ip, port, proto)
        if key in self._services:
            return self._services[key]
        found = self.node_view.service_by_frontend(ip, port, proto)
        svc = F.Service(name=found[0], namespace=found[1]) if found else None
        if len(self._services) > 65536:
            self._services.clear()
        self._services[key] = svc
        return svc

    # -- parsing --------------------------------------------------------------------

    def parse(self, raw: bytes, now_ns: int | None = None) -> F.Flow:
        """One record to a Flow; raises ParseError for records that are not events."""
        self._check_generation()
        return self._parse(raw, now_ns)

    def _parse(self, raw: bytes, now_ns: int | None = None) -> F.Flow:
        if len(raw) < PACKET_OFFSET:
            raise ParseError(f"event record of {len(raw)} bytes, need at least {PACKET_OFFSET}")
        (kind, subtype, source, _hash, len_orig, len_cap, _version, src_label, dst_label, _dst_id,
         reason, flags, ifindex, _line, _file, _ext, _dport, _proto, _pad, verdict,
         cookie) = _HEAD.unpack_from(raw)
        if kind not in (EVENT_DROP, EVENT_TRACE, EVENT_POLICY_VERDICT):
            raise ParseError(f"unknown event type {kind}")

        seconds, nanos = divmod(time.time_ns() if now_ns is None else now_ns, 1_000_000_000)
        flow = F.Flow(Type=F.L3_L4, node_name=self.node_name, uuid=self.uuids.next(),
                      time=_Timestamp(seconds=seconds, nanos=nanos),
                      event_type=F.CiliumEventType(
                          type=kind, sub_type=0 if kind == EVENT_POLICY_VERDICT else subtype),
                      interface=F.NetworkInterface(index=ifindex))

        pkt = raw[PACKET_OFFSET:PACKET_OFFSET + min(len_cap, len(raw) - PACKET_OFFSET)]
        tuple_ = self._layer34(flow, pkt)
        src_ip, dst_ip, proto, sport, dport = tuple_

        if kind == EVENT_DROP:
            flow.verdict = F.DROPPED
            flow.drop_reason = subtype
            flow.drop_reason_desc = subtype
            direction = F.INGRESS if reason == DIR_INGRESS else (
                F.EGRESS if reason == DIR_EGRESS else F.TRAFFIC_DIRECTION_UNKNOWN)
            flow.traffic_direction = direction
            # The drop follows the deny verdict of the same packet; name its policy.
            denied = self._recent_denies.pop((tuple_, direction), None)
            if denied is not None and denied[0] == subtype:
                self._add_policy(flow, direction, denied[1], allowed=False)
        elif kind == EVENT_TRACE:
            flow.verdict = F.FORWARDED
            flow.trace_observation_point = OBSERVATION_POINTS.get(subtype, F.UNKNOWN_POINT)
            flow.trace_reason = reason + 1
            is_reply = reason == CT_REPLY
            flow.is_reply.value = is_reply
            flow.reply = is_reply
            # A pod sending is egress, unless it is answering a connection made to it.
            from_endpoint = subtype == TRACE_FROM_ENDPOINT
            flow.traffic_direction = F.EGRESS if from_endpoint != is_reply else F.INGRESS
        else:
            egress = bool(flags & PV_FLAG_EGRESS)
            direction = F.EGRESS if egress else F.INGRESS
            flow.traffic_direction = direction
            flow.policy_match_type = (flags >> PV_MATCH_SHIFT) & 0x7
            flow.is_reply.value = False
            if verdict == 0:
                flow.verdict = F.FORWARDED
                self._add_policy(flow, direction, cookie, allowed=True)
            else:
                flow.verdict = F.DROPPED
                flow.drop_reason = -verdict
                flow.drop_reason_desc = -verdict
                self._add_policy(flow, direction, cookie, allowed=False)
                if len(self._recent_denies) > 1024:
                    self._recent_denies.clear()
                self._recent_denies[(tuple_, direction)] = (-verdict, cookie)
            # The verdict record carries the remote identity; the local side is the endpoint.
            if egress:
                src_label, dst_label = 0, src_label
            else:
                dst_label = 0

        flow.source.CopyFrom(self._endpoint(src_ip, src_label))
        flow.destination.CopyFrom(self._endpoint(dst_ip, dst_label))
        if proto in (6, 17, 132):
            svc = self._service(dst_ip, dport, proto)
            if svc is not None:
                flow.destination_service.CopyFrom(svc)
        self.parsed += 1
        return flow

    def _add_policy(self, flow: F.Flow, direction: int, cookie: int, *, allowed: bool) -> None:
        policy = self._policy(cookie)
        if policy is None:
            return
        if direction == F.EGRESS:
            (flow.egress_allowed_by if allowed else flow.egress_denied_by).append(policy)
        else:
            (flow.ingress_allowed_by if allowed else flow.ingress_denied_by).append(policy)

    @staticmethod
    def _layer34(flow: F.Flow, pkt: bytes) -> tuple:
        """Fills IP and l4 from the captured bytes, as far as they go."""
        if len(pkt) < ETH_HLEN + 20 or pkt[12:14] != ETH_P_IP:
            return ("", "", 0, 0, 0)
        ihl = (pkt[ETH_HLEN] & 0x0F) * 4
        proto = pkt[ETH_HLEN + 9]
        src = socket.inet_ntoa(pkt[26:30])
        dst = socket.inet_ntoa(pkt[30:34])
        ip = flow.IP
        ip.source, ip.destination, ip.ipVersion = src, dst, F.IPv4
        l4 = ETH_HLEN + ihl
        sport = dport = 0
        if proto == 6 and len(pkt) >= l4 + 14:
            sport, dport = struct.unpack_from("!HH", pkt, l4)
            tcp = flow.l4.TCP
            tcp.source_port, tcp.destination_port = sport, dport
            tcp.flags.CopyFrom(_TCP_FLAGS[pkt[l4 + 13] | (pkt[l4 + 12] & 1) << 8])
        elif proto == 17 and len(pkt) >= l4 + 4:
            sport, dport = struct.unpack_from("!HH", pkt, l4)
            udp = flow.l4.UDP
            udp.source_port, udp.destination_port = sport, dport
        elif proto == 132 and len(pkt) >= l4 + 4:
            sport, dport = struct.unpack_from("!HH", pkt, l4)
            sctp = flow.l4.SCTP
            sctp.source_port, sctp.destination_port = sport, dport
        elif proto == 1 and len(pkt) >= l4 + 2:
            icmp = flow.l4.ICMPv4
            icmp.type, icmp.code = pkt[l4], pkt[l4 + 1]
            if pkt[l4] in (0, 8) and len(pkt) >= l4 + 6:
                sport = struct.unpack_from("!H", pkt, l4 + 4)[0]  # echo ID, as conntrack keys it
        return (src, dst, proto, sport, dport)

    def parse_batch(self, records: list[bytes]) -> list[F.Flow]:
        """Flows for the records that parse; the others are counted in `errors`."""
        out = []
        self._check_generation()  # once per batch: enrichment changes land between batches
        parse = self._parse
        for raw in records:
            try:
                out.append(parse(raw))
            except ParseError:
                self.errors += 1
        return out
