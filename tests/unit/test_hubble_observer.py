"""The Observer gRPC server over a flow ring, in-process on a unix socket: history
selection, follow, filters, status, nodes, bad requests, many and slow clients."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.api.observer import observer_pb2 as O
from cilium_py.hubble.api.observer import observer_pb2_grpc
from cilium_py.hubble.observer import ObserverServer, parse_listen_address
from cilium_py.hubble.ring import FlowRing

BASE_NS = 1_700_000_000 * 1_000_000_000


def make_flow(i: int, *, pod="web-1", verdict=F.FORWARDED) -> F.Flow:
    f = F.Flow(verdict=verdict, node_name="node-a", uuid=f"flow-{i}")
    f.time.FromNanoseconds(BASE_NS + i * 1_000_000_000)
    f.source.pod_name, f.source.namespace = pod, "shop"
    f.destination.pod_name, f.destination.namespace = "db-1", "store"
    f.l4.TCP.destination_port = 80
    return f


@pytest.fixture
def ring():
    return FlowRing(100)


@pytest.fixture
def server(ring, tmp_path):
    srv = ObserverServer(ring, "node-a", unix_socket=str(tmp_path / "hubble.sock"),
                         tcp_address="127.0.0.1:0")
    srv.start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(f"unix://{server.unix_socket}")
    yield observer_pb2_grpc.ObserverStub(channel)
    channel.close()


def uuids(responses) -> list[str]:
    return [r.flow.uuid for r in responses if r.HasField("flow")]


def test_last_n_first_n_and_all(ring, stub):
    ring.write([make_flow(i) for i in range(10)])
    last = list(stub.GetFlows(O.GetFlowsRequest(number=3)))
    assert uuids(last) == ["flow-7", "flow-8", "flow-9"]
    assert all(r.node_name == "node-a" and r.time == r.flow.time for r in last)
    assert uuids(stub.GetFlows(O.GetFlowsRequest(number=2, first=True))) == ["flow-0", "flow-1"]
    assert len(uuids(stub.GetFlows(O.GetFlowsRequest()))) == 10


def test_since_and_until_select_by_flow_time(ring, stub):
    ring.write([make_flow(i) for i in range(10)])
    req = O.GetFlowsRequest()
    req.since.FromNanoseconds(BASE_NS + 3 * 1_000_000_000)
    req.until.FromNanoseconds(BASE_NS + 5 * 1_000_000_000)
    assert uuids(stub.GetFlows(req)) == ["flow-3", "flow-4", "flow-5"]


def test_filters_apply_to_history(ring, stub):
    ring.write([make_flow(i, pod="web-1" if i % 2 else "api-1",
                          verdict=F.DROPPED if i % 3 == 0 else F.FORWARDED) for i in range(10)])
    req = O.GetFlowsRequest(whitelist=[F.FlowFilter(source_pod=["shop/web"])],
                            blacklist=[F.FlowFilter(verdict=[F.DROPPED])])
    assert uuids(stub.GetFlows(req)) == ["flow-1", "flow-5", "flow-7"]


def test_follow_sees_new_flows_promptly(ring, stub):
    ring.write([make_flow(0)])
    stream = stub.GetFlows(O.GetFlowsRequest(follow=True), timeout=10)
    try:
        writer = threading.Timer(0.05, ring.write, args=([make_flow(1)],))
        writer.start()
        started = time.monotonic()
        first = next(stream)
        assert first.flow.uuid == "flow-1"  # following alone sends no history
        assert time.monotonic() - started < 1.0
    finally:
        stream.cancel()


def test_follow_with_history(ring, stub):
    ring.write([make_flow(i) for i in range(5)])
    stream = stub.GetFlows(O.GetFlowsRequest(number=2, follow=True), timeout=10)
    try:
        got = [next(stream).flow.uuid, next(stream).flow.uuid]
        ring.write([make_flow(5)])
        got.append(next(stream).flow.uuid)
        assert got == ["flow-3", "flow-4", "flow-5"]
    finally:
        stream.cancel()


@pytest.mark.parametrize("request_,message", [
    (O.GetFlowsRequest(first=True, follow=True), "first cannot be combined with follow"),
    (O.GetFlowsRequest(whitelist=[F.FlowFilter(source_ip=["not-an-ip"])]),
     "invalid filter: source_ip: 'not-an-ip'"),
    (O.GetFlowsRequest(blacklist=[F.FlowFilter(destination_port=["99999"])]), "out of range"),
])
def test_bad_requests_are_invalid_argument(stub, request_, message):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GetFlows(request_))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_server_status_nodes_and_namespaces(ring, stub, server):
    ring.write([make_flow(i) for i in range(150)])
    status = stub.ServerStatus(O.ServerStatusRequest())
    assert (status.num_flows, status.max_flows, status.seen_flows) == (100, 100, 150)
    assert status.uptime_ns > 0 and status.num_connected_nodes.value == 1
    (node,) = stub.GetNodes(O.GetNodesRequest()).nodes
    assert node.name == "node-a" and node.num_flows == 100 and node.seen_flows == 150
    assert node.state == 1  # NODE_CONNECTED
    assert server.tcp_port > 0
    tcp = observer_pb2_grpc.ObserverStub(grpc.insecure_channel(f"127.0.0.1:{server.tcp_port}"))
    assert tcp.ServerStatus(O.ServerStatusRequest()).seen_flows == 150


def test_namespaces_of_recent_flows(ring, stub):
    recent = make_flow(0)
    recent.time.FromNanoseconds(time.time_ns())
    ring.write([make_flow(1), recent])
    names = [n.namespace for n in stub.GetNamespaces(O.GetNamespacesRequest()).namespaces]
    assert names == ["shop", "store"]


def test_two_followers_and_a_slow_reader(tmp_path):
    """Fast followers get every flow; a follower that stops reading only hurts itself:
    it is told how many flows it lost and then continues with the newest."""
    ring = FlowRing(50)
    srv = ObserverServer(ring, "node-a", unix_socket=str(tmp_path / "h.sock"))
    srv.start()
    channel = grpc.insecure_channel(f"unix://{srv.unix_socket}")
    stub = observer_pb2_grpc.ObserverStub(channel)
    # Big flows, so the transport's buffers hold only a few hundred of them for the
    # reader that does not read.
    padding = [f"k8s:padding-{i}={'x' * 40}" for i in range(200)]
    try:
        fast = [stub.GetFlows(O.GetFlowsRequest(follow=True), timeout=60) for _ in range(2)]
        slow = stub.GetFlows(O.GetFlowsRequest(follow=True), timeout=60)
        _wait_for(lambda: srv.service.active_streams == 3)
        total = 1000
        results = [[] for _ in fast]

        def consume(stream, out):
            for resp in stream:
                out.append(resp.flow.uuid)
                if len(out) >= total:
                    return

        threads = [threading.Thread(target=consume, args=(s, r)) for s, r in zip(fast, results)]
        for t in threads:
            t.start()
        for start in range(0, total, 10):
            batch = [make_flow(i) for i in range(start, start + 10)]
            for f in batch:
                f.source.labels.extend(padding)
            ring.write(batch)
            # The fast readers keep up with the writer; the slow one does not read at all.
            _wait_for(lambda: all(len(out) >= start + 10 for out in results))
        for t in threads:
            t.join(timeout=20)
        for out in results:
            assert out == [f"flow-{i}" for i in range(total)]
        # The slow reader starts reading only now, far behind the 50-flow ring.
        seen_lost = 0
        got = []
        for resp in slow:
            if resp.HasField("lost_events"):
                assert resp.lost_events.source == F.HUBBLE_RING_BUFFER
                seen_lost += resp.lost_events.num_events_lost
            else:
                got.append(resp.flow.uuid)
            if got and got[-1] == f"flow-{total - 1}":
                break
        assert seen_lost > 0
        assert seen_lost + len(got) == total
        assert got[0] == "flow-0" and got == sorted(got, key=lambda u: int(u.split("-")[1]))
    finally:
        channel.close()
        srv.stop(grace=0)


def test_a_client_leaving_mid_stream_leaves_the_server_healthy(ring, stub, server):
    ring.write([make_flow(i) for i in range(50)])
    stream = stub.GetFlows(O.GetFlowsRequest(follow=True, number=50), timeout=10)
    next(stream)
    stream.cancel()
    _wait_for(lambda: server.service.active_streams == 0)
    assert stub.ServerStatus(O.ServerStatusRequest()).num_flows == 50
    assert len(uuids(stub.GetFlows(O.GetFlowsRequest(number=5)))) == 5


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.parametrize("address,expected", [
    (":4244", "0.0.0.0:4244"), ("127.0.0.1:0", "127.0.0.1:0"), ("/run/x.sock", "unix:///run/x.sock"),
    ("unix:///run/x.sock", "unix:///run/x.sock"),
])
def test_listen_addresses(address, expected):
    assert parse_listen_address(address) == expected


@pytest.mark.parametrize("address", ["4244", "host:port", ":99999"])
def test_bad_listen_addresses(address):
    with pytest.raises(ValueError, match="listen address"):
        parse_listen_address(address)


def test_a_live_socket_of_another_server_is_not_taken(server, ring):
    second = ObserverServer(ring, "node-b", unix_socket=server.unix_socket)
    with pytest.raises(OSError, match="another Hubble server listens"):
        second.start()
    # The first server still answers on its socket.
    stub = observer_pb2_grpc.ObserverStub(grpc.insecure_channel(f"unix://{server.unix_socket}"))
    assert stub.ServerStatus(O.ServerStatusRequest()).max_flows == 100


def test_a_stale_socket_file_is_replaced(tmp_path, ring):
    import socket as socket_

    path = tmp_path / "stale.sock"
    stale = socket_.socket(socket_.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    srv = ObserverServer(ring, "node-a", unix_socket=str(path))
    srv.start()
    srv.stop(grace=0)


def test_a_busy_tcp_port_is_a_clear_error(server, ring, tmp_path):
    busy = ObserverServer(ring, "node-b", unix_socket=str(tmp_path / "other.sock"),
                          tcp_address=f"127.0.0.1:{server.tcp_port}")
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.tcp_port}"):
        busy.start()
