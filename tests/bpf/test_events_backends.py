"""The perf-buffer event backend (`--events perf`) delivers the same records as the ring
buffer, and losses are counted rather than silent."""

import pytest

from cilium_py.datapath import loader, testrun
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.events import EventsLostMap
from cilium_py.datapath.monitor import EventReader

from . import packets as pk

pytestmark = pytest.mark.bpf


@pytest.fixture(scope="module")
def perf_datapath(bpf_root):
    loaded = loader.load(DatapathConfig(node="perftest", bpf_root=bpf_root, events="perf"),
                         pin_programs=False)
    yield loaded
    loaded.close()


def test_perf_buffer_delivers_drop_events(perf_datapath):
    events = []
    reader = EventReader(perf_datapath, events.append)
    # A source address no endpoint owns: INVALID_SOURCE_IP at the pod's egress.
    frame = pk.tcp("10.244.77.7", "10.244.77.8", 40000, 80)
    result = testrun.run(perf_datapath.fd("cil_from_container"), frame)
    assert result.retval == testrun.TC_ACT_SHOT
    reader.poll_once(100)
    assert [(e.type, e.drop_reason, e.packet.dst_port) for e in events] == [("drop", 132, 80)]
    assert reader.perf_lost == 0 and reader.decode_errors == 0


def test_lost_events_are_counted(bpf_root):
    """A perf buffer nobody has opened refuses every record: each one is counted as lost."""
    unread = loader.load(DatapathConfig(node="losttest", bpf_root=bpf_root, events="perf"),
                         pin_programs=False)
    lost = EventsLostMap(unread.config.pin_dir)
    try:
        before = lost.total()
        testrun.run(unread.fd("cil_from_container"), pk.tcp("10.244.77.7", "10.244.77.8", 40000, 80),
                    repeat=10)
        assert lost.total() - before == 10
    finally:
        lost.close()
        unread.close()


def test_ring_buffer_through_bcc_where_the_mmap_reader_is_not_supported(bpf_root, monkeypatch):
    """Off x86 the reader falls back to BCC's ring-buffer callbacks; same records."""
    from cilium_py.datapath.ringbuf import RingBufferConsumer

    loaded = loader.load(DatapathConfig(node="bccring", bpf_root=bpf_root), pin_programs=False)
    try:
        monkeypatch.setattr(RingBufferConsumer, "supported", staticmethod(lambda: False))
        events = []
        reader = EventReader(loaded, events.append)
        assert reader._ring is None
        testrun.run(loaded.fd("cil_from_container"), pk.tcp("10.244.77.7", "10.244.77.8", 40000, 80))
        reader.poll_once(100)
        assert [(e.type, e.drop_reason) for e in events] == [("drop", 132)]
    finally:
        loaded.close()
