"""One fd per pinned map per process: `SomeMap.shared(pin_dir)` handles share it, the last
close closes it, and the next `shared()` opens the pin again. Counted by the kernel's own
view of this process's fds (/proc/self/fdinfo), not by our bookkeeping."""

from __future__ import annotations

import os
import threading

import pytest

from cilium_py.agent.ctgc import ConntrackGC
from cilium_py.agent.metrics import read_events_lost
from cilium_py.datapath import libbpf
from cilium_py.datapath.maps.base import MapNotFound, shared_open_count
from cilium_py.datapath.maps.conntrack import ConntrackTables, CtTcpMap
from cilium_py.datapath.maps.events import EventsLostMap
from cilium_py.datapath.maps.ipcache import IPCacheMap
from cilium_py.datapath.maps.lb import MaglevMap

pytestmark = pytest.mark.bpf


class FdCount:
    """How many more fds this process holds on one pinned map than when this was made (the
    loaded datapath and the tier's fixtures hold some of their own)."""

    def __init__(self, cls, pin_dir: str):
        with cls(pin_dir) as m:
            self.map_id = libbpf.map_info(m.fd).id
        self.base = fds_on(self.map_id)

    def __call__(self) -> int:
        return fds_on(self.map_id) - self.base


def fds_on(ident: int) -> int:
    """How many of this process's fds refer to the BPF map with this id."""
    count = 0
    for name in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{name}") as f:
                if f"map_id:\t{ident}\n" in f.read():
                    count += 1
        except OSError:  # the fd listdir itself used, closed since
            continue
    return count


@pytest.fixture
def pin(datapath):
    pin_dir = datapath.config.pin_dir
    before = shared_open_count()
    yield pin_dir
    assert shared_open_count() == before, "a test left a shared handle open"


def test_two_shared_handles_use_one_fd(pin):
    opened = FdCount(IPCacheMap, pin)
    a, b = IPCacheMap.shared(pin), IPCacheMap.shared(pin)
    c = IPCacheMap.shared(os.path.join(pin, "."))  # the same directory, spelled differently
    try:
        assert a is not b and a.fd == b.fd == c.fd >= 0
        assert opened() == 1
        a.upsert("10.99.0.1", 4242)
        assert b.get("10.99.0.1") == 4242  # one map behind both handles
    finally:
        a.remove("10.99.0.1")
        for handle in (a, b, c):
            handle.close()
    assert opened() == 0


def test_the_last_close_closes_the_fd_and_the_next_shared_reopens(pin):
    opened = FdCount(EventsLostMap, pin)
    a, b = EventsLostMap.shared(pin), EventsLostMap.shared(pin)
    a.close()
    a.close()  # a second close of one handle does not count another user off
    assert a.fd == -1 and opened() == 1
    assert b.total() >= 0  # still usable
    b.close()
    assert opened() == 0
    with pytest.raises(OSError):
        b.total()  # a closed handle never reaches whatever fd number is reused
    with EventsLostMap.shared(pin) as c:
        assert opened() == 1 and c.total() >= 0
    assert opened() == 0


def test_a_shared_handle_and_a_private_open_are_separate(pin):
    opened = FdCount(CtTcpMap, pin)
    private = CtTcpMap(pin)
    with CtTcpMap.shared(pin) as shared:
        assert shared.fd != private.fd and opened() == 2
    private.close()
    assert opened() == 0


def test_agent_readers_borrow_the_fds_the_long_lived_users_hold(pin):
    """The conntrack GC keeps both tables open; a status-like read of them, and the metrics'
    events-lost read next to Hubble's kept handle, open nothing more."""
    tcp = FdCount(CtTcpMap, pin)
    lost = FdCount(EventsLostMap, pin)
    gc = ConntrackGC(pin, interval=3600)
    kept_lost = EventsLostMap.shared(pin)
    try:
        with ConntrackTables.shared(pin) as tables:
            assert tables.tcp.fd == gc.tables.tcp.fd and tcp() == 1
        read_events_lost(pin)
        assert lost() == 1
    finally:
        gc.stop()
        kept_lost.close()
    assert tcp() == lost() == 0


def test_extra_constructor_arguments_are_part_of_the_share(pin, datapath):
    size = datapath.config.maglev_table_size
    with MaglevMap.shared(pin, size) as a, MaglevMap.shared(pin, size) as b:
        assert a.fd == b.fd and a.table_size == size


def test_concurrent_shared_and_close_keep_one_consistent_fd(pin):
    opened = FdCount(IPCacheMap, pin)
    holder = IPCacheMap.shared(pin)  # keeps the fd open: every thread must get this one
    errors: list[BaseException] = []
    fds: set[int] = set()
    start = threading.Barrier(8)

    def worker():
        try:
            start.wait()
            for _ in range(300):
                with IPCacheMap.shared(pin) as m:
                    fds.add(m.fd)
                    m.get("10.99.0.2")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and fds == {holder.fd} and opened() == 1
    holder.close()
    assert opened() == 0

    # Without a holder the first open and the last close race each other: no handle may
    # find its fd closed under it (the lookups would fail), and none is left open.
    start = threading.Barrier(8)
    fds.clear()
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and opened() == 0


def test_a_missing_pin_registers_nothing(tmp_path):
    before = shared_open_count()
    with pytest.raises(MapNotFound):
        EventsLostMap.shared(str(tmp_path))
    assert shared_open_count() == before


def test_a_dropped_handle_is_released_by_the_garbage_collector(pin):
    opened = FdCount(EventsLostMap, pin)
    handle = EventsLostMap.shared(pin)
    assert opened() == 1
    del handle
    assert opened() == 0


def test_a_replaced_pin_is_opened_anew_and_the_old_map_stays_with_its_handles(bpf_root):
    """A datapath pinned again at the same place (a new map behind the same path): new
    users get the new map, handles on the old one keep it until they close."""
    root = os.path.join(bpf_root, "shared-replaced")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, EventsLostMap.NAME)

    def pin_new_map() -> int:
        fd = libbpf.map_create(2, "cpy_shared_test", 4, 8, 1)  # an array, as the layout wants
        try:
            libbpf.obj_pin(fd, path)
            return libbpf.map_info(fd).id
        finally:
            os.close(fd)

    first_id = pin_new_map()
    old = EventsLostMap.shared(root)
    try:
        os.unlink(path)
        second_id = pin_new_map()
        with EventsLostMap.shared(root) as new:
            assert libbpf.map_info(new.fd).id == second_id
            assert libbpf.map_info(old.fd).id == first_id and fds_on(first_id) == 1
    finally:
        old.close()
        os.unlink(path)
    assert fds_on(first_id) == fds_on(second_id) == 0
