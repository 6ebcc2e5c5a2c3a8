"""The observer.Observer gRPC service over the flow ring.

GetFlows streams pre-serialized GetFlowsResponse bytes: a flow is serialized once, by the
first client that sends it, and the bytes are shared with every other client (the
response is the flow field, then node_name and time, appended as raw protobuf fields).
Each stream runs on its own server thread and only reads the ring, so a client that stops
reading stalls its own stream and nothing else; when it falls a whole ring behind it gets
a LostEvent instead of the flows it missed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc

from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.api.observer import observer_pb2 as O
from cilium_py.hubble.api.relay import relay_pb2
from cilium_py.hubble.filters import FilterError, compile_filters
from cilium_py.hubble.ring import Entry, FlowRing

log = logging.getLogger(__name__)

SERVICE = "observer.Observer"
VERSION = "ciliumpy 0.1.0"
FOLLOW_POLL_SECONDS = 0.5    # how often a waiting follower checks that its client is still there
NAMESPACE_WINDOW_NS = 3600 * 1_000_000_000


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _socket_answers(path: str) -> bool:
    """Whether a live server owns the unix socket at `path` (a stale file refuses)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def parse_listen_address(address: str) -> str:
    """`unix:///path`, `/path`, `host:port` or `:port` -> a gRPC server address."""
    if address.startswith("unix:"):
        return address
    if address.startswith("/"):
        return "unix://" + address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {address!r} is not unix:///path, /path, host:port or :port")
    return f"{host or '0.0.0.0'}:{port}"


@dataclass
class ServerInfo:
    node_name: str
    address: str = ""
    started_ns: int = 0


class ObserverService:
    """The RPC implementations, independent of how the server is wired."""

    def __init__(self, ring: FlowRing, info: ServerInfo):
        self.ring = ring
        self.info = info
        self._node_field = _length_delimited(1000, info.node_name.encode())
        self._stopping = threading.Event()
        self.active_streams = 0
        self._lock = threading.Lock()

    # -- GetFlows -------------------------------------------------------------------

    def _wire(self, entry: Entry) -> bytes:
        wire = entry.wire
        if wire is None:
            event = entry.event
            if entry.is_flow:
                wire = (_length_delimited(1, event.SerializeToString()) + self._node_field +
                        _length_delimited(1001, event.time.SerializeToString()))
            else:
                resp = O.GetFlowsResponse(lost_events=event, node_name=self.info.node_name)
                resp.time.FromNanoseconds(entry.time_ns)
                wire = resp.SerializeToString()
            entry.wire = wire
        return wire

    @staticmethod
    def _lost(count: int) -> Entry:
        event = F.LostEvent(source=F.HUBBLE_RING_BUFFER, num_events_lost=count)
        return Entry(-1, event, time.time_ns())

    def get_flows(self, request: O.GetFlowsRequest, context):
        if request.first and request.follow:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first cannot be combined with follow")
        try:
            matches = compile_filters(request.whitelist, request.blacklist)
        except FilterError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid filter: {e}")
        since = request.since.ToNanoseconds() if request.HasField("since") else None
        until = request.until.ToNanoseconds() if request.HasField("until") else None
        if since is not None and until is not None and until < since:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "until is before since")

        def wanted(entry: Entry) -> bool:
            if not entry.is_flow:
                return True  # losses are always reported, whatever the filters
            if since is not None and entry.time_ns < since:
                return False
            if until is not None and entry.time_ns > until:
                return False
            return matches(entry.event)

        with self._lock:
            self.active_streams += 1
        try:
            entries, _ = self.ring.read_after(None)
            follow_from = entries[-1].seq if entries else self.ring.last_seq
            yield from self._history(request, entries, wanted, since)
            if request.follow:
                yield from self._follow(follow_from, wanted, until, context)
        finally:
            with self._lock:
                self.active_streams -= 1

    def _history(self, request, entries, wanted, since):
        number = request.number
        if request.follow and not number and since is None:
            return  # following without a history request: only what comes next
        if request.first:
            sent = 0
            for entry in entries:
                if wanted(entry):
                    yield self._wire(entry)
                    sent += 1
                    if number and sent >= number:
                        return
            return
        selected = [e for e in entries if wanted(e)]
        if number:
            selected = selected[-number:]
        for entry in selected:
            yield self._wire(entry)

    def _follow(self, seq, wanted, until, context):
        while not self._stopping.is_set() and context.is_active():
            if not self.ring.wait_after(seq, FOLLOW_POLL_SECONDS):
                continue
            entries, lost = self.ring.read_after(seq)
            if lost:
                yield self._wire(self._lost(lost))
            for entry in entries:
                if until is not None and entry.is_flow and entry.time_ns > until:
                    return
                if wanted(entry):
                    yield self._wire(entry)
            if entries:
                seq = entries[-1].seq

    # -- the other RPCs ---------------------------------------------------------------

    def _uptime_ns(self) -> int:
        return max(0, time.time_ns() - self.info.started_ns)

    def _flows_rate(self) -> float:
        """Flows per second over the last minute of the ring."""
        entries, _ = self.ring.read_after(None)
        cutoff = time.time_ns() - 60 * 1_000_000_000
        recent = sum(1 for e in entries if e.is_flow and e.time_ns >= cutoff)
        window = min(60.0, max(self._uptime_ns() / 1e9, 1.0))
        return recent / window

    def server_status(self, request, context) -> O.ServerStatusResponse:
        resp = O.ServerStatusResponse(num_flows=len(self.ring), max_flows=self.ring.capacity,
                                      seen_flows=self.ring.seen_flows, uptime_ns=self._uptime_ns(),
                                      version=VERSION, flows_rate=self._flows_rate())
        resp.num_connected_nodes.value = 1
        resp.num_unavailable_nodes.value = 0
        return resp

    def get_nodes(self, request, context) -> O.GetNodesResponse:
        node = O.Node(name=self.info.node_name, version=VERSION, address=self.info.address,
                      state=relay_pb2.NODE_CONNECTED, uptime_ns=self._uptime_ns(),
                      num_flows=len(self.ring), max_flows=self.ring.capacity,
                      seen_flows=self.ring.seen_flows)
        node.tls.enabled = False
        return O.GetNodesResponse(nodes=[node])

    def get_namespaces(self, request, context) -> O.GetNamespacesResponse:
        entries, _ = self.ring.read_after(None)
        cutoff = time.time_ns() - NAMESPACE_WINDOW_NS
        names = set()
        for e in entries:
            if e.is_flow and e.time_ns >= cutoff:
                names.update(ns for ns in (e.event.source.namespace, e.event.destination.namespace) if ns)
        return O.GetNamespacesResponse(namespaces=[O.Namespace(namespace=n) for n in sorted(names)])

    def stop(self) -> None:
        self._stopping.set()
        self.ring.close()


def _handler(service: ObserverService) -> grpc.GenericRpcHandler:
    identity = lambda b: b  # GetFlows yields serialized responses already  # noqa: E731
    return grpc.method_handlers_generic_handler(SERVICE, {
        "GetFlows": grpc.unary_stream_rpc_method_handler(
            service.get_flows, request_deserializer=O.GetFlowsRequest.FromString,
            response_serializer=identity),
        "ServerStatus": grpc.unary_unary_rpc_method_handler(
            service.server_status, request_deserializer=O.ServerStatusRequest.FromString,
            response_serializer=O.ServerStatusResponse.SerializeToString),
        "GetNodes": grpc.unary_unary_rpc_method_handler(
            service.get_nodes, request_deserializer=O.GetNodesRequest.FromString,
            response_serializer=O.GetNodesResponse.SerializeToString),
        "GetNamespaces": grpc.unary_unary_rpc_method_handler(
            service.get_namespaces, request_deserializer=O.GetNamespacesRequest.FromString,
            response_serializer=O.GetNamespacesResponse.SerializeToString),
    })


class ObserverServer:
    """The gRPC server: a unix socket (the default) and optionally a TCP address.

    `max_streams` bounds concurrent RPCs; each follower holds one server thread while
    it follows, so the pool is sized for many followers rather than for throughput.
    """

    def __init__(self, ring: FlowRing, node_name: str, *, unix_socket: str = "",
                 tcp_address: str = "", max_streams: int = 64):
        if not unix_socket and not tcp_address:
            raise ValueError("the Hubble server needs a unix socket or a TCP address")
        self.unix_socket = unix_socket
        self.tcp_address = tcp_address
        self.tcp_port = 0
        self.service = ObserverService(ring, ServerInfo(node_name=node_name,
                                                        address=tcp_address or unix_socket,
                                                        started_ns=time.time_ns()))
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_streams,
                                                              thread_name_prefix="hubble-rpc"),
                                   maximum_concurrent_rpcs=max_streams,
                                   # grpc shares ports by default: a second agent on the same
                                   # address would silently split the clients with the first.
                                   options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((_handler(self.service),))

    def start(self) -> None:
        """Raises OSError naming the address when a socket is taken or cannot be bound."""
        if self.unix_socket:
            os.makedirs(os.path.dirname(self.unix_socket) or ".", exist_ok=True)
            if os.path.exists(self.unix_socket):
                if _socket_answers(self.unix_socket):
                    raise OSError(f"another Hubble server listens on {self.unix_socket}; give this "
                                  f"agent its own --hubble-socket-path")
                os.unlink(self.unix_socket)  # left by an agent that is gone
            self._bind("unix://" + os.path.abspath(self.unix_socket), self.unix_socket)
        if self.tcp_address:
            self.tcp_port = self._bind(parse_listen_address(self.tcp_address), self.tcp_address)
        self._server.start()
        if self.unix_socket:
            os.chmod(self.unix_socket, 0o660)

    def _bind(self, address: str, shown: str) -> int:
        try:
            port = self._server.add_insecure_port(address)
        except RuntimeError as e:  # grpc's way of saying the bind failed
            raise OSError(f"Hubble cannot listen on {shown}: {e}") from None
        if not port:
            raise OSError(f"Hubble cannot listen on {shown}")
        return port

    def stop(self, grace: float = 1.0) -> None:
        self.service.stop()
        self._server.stop(grace).wait(grace + 1)
        if self.unix_socket and os.path.exists(self.unix_socket):
            os.unlink(self.unix_socket)
