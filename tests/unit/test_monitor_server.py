import json
import socket

import pytest

from cilium_py.agent import monitor_server
from cilium_py.agent.monitor_server import MonitorServer
from cilium_py.datapath.monitor import MonitorEvent, PacketSummary


def event(n: int) -> MonitorEvent:
    return MonitorEvent(type="drop", source=n, src_identity=1, dst_identity=2, dst_endpoint=3,
                        ifindex=4, length=60, packet=PacketSummary(), drop_reason=133)


@pytest.fixture
def server(tmp_path):
    srv = MonitorServer(str(tmp_path / "monitor.sock"))
    srv.start()
    yield srv
    srv.stop()


def connect(server) -> "socket.socket":
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(server.path)
    return sock


def test_client_is_greeted_then_gets_every_event(server):
    with connect(server) as sock, sock.makefile("r") as stream:
        assert json.loads(stream.readline()) == {"type": "hello"}
        for n in range(3):
            server.publish(event(n))
        got = [json.loads(stream.readline()) for _ in range(3)]
    assert [e["source"] for e in got] == [0, 1, 2]
    assert got[0]["drop_reason_name"] == "POLICY_DENIED"


def test_slow_client_loses_its_own_events_and_is_told(tmp_path):
    srv = MonitorServer(str(tmp_path / "unused.sock"))  # not started: no threads involved
    ours, theirs = socket.socketpair()
    slow = monitor_server._Client(ours)
    slow.queue.maxsize = 2
    srv._clients.append(slow)
    for n in range(5):
        srv.publish(event(n))  # must not block on the full queue
    assert slow.dropped == 3 and slow.queue.qsize() == 2
    slow.queue.maxsize = 0
    slow.queue.put(None)  # end of stream for the sender loop
    srv._send_loop(slow)
    with theirs, theirs.makefile("r") as stream:
        lines = [json.loads(line) for line in stream]
    assert lines[0] == {"type": "lost", "count": 3}
    assert [line["source"] for line in lines[1:]] == [0, 1]
