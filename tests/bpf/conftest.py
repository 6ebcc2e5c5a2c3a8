"""Fixtures of the bpf tier: the session's datapath (tests/conftest.py), one event reader for
the whole session, and a clean slate of maps and events before every test.

BCC can open a ring buffer once per loaded object, so the reader is session-scoped; each
test sees only the events of its own runs because the autouse fixture drains and forgets
whatever is pending before the test starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cilium_py.datapath import testrun
from cilium_py.datapath.maps.conntrack import ConntrackTables
from cilium_py.datapath.maps.endpoints import EndpointMap
from cilium_py.datapath.maps.ipcache import IPCacheMap
from cilium_py.datapath.maps.metrics import MetricsMap
from cilium_py.datapath.maps.policy import PolicyMap
from cilium_py.datapath.maps.prefilter import PrefilterMap
from cilium_py.datapath.monitor import EventReader, MonitorEvent


class EventCollector:
    """Every event the datapath emits, decoded and raw, in order; `take()` returns and
    forgets them."""

    def __init__(self, datapath):
        self.events: list[MonitorEvent] = []
        self.records: list[bytes] = []
        self.reader = EventReader(datapath, self.events.append, on_batch=self.records.extend)

    def drain(self) -> list[MonitorEvent]:
        # The programs submit synchronously inside BPF_PROG_TEST_RUN: a non-blocking poll
        # after the run finds everything it emitted.
        self.reader.poll_once(0)
        return self.take()

    def take(self) -> list[MonitorEvent]:
        taken = list(self.events)
        self.events.clear()
        return taken

    def take_records(self) -> list[bytes]:
        taken = list(self.records)
        self.records.clear()
        return taken


@pytest.fixture(scope="session")
def event_collector(datapath):
    return EventCollector(datapath)


@dataclass
class Maps:
    endpoints: EndpointMap
    ipcache: IPCacheMap
    policy: PolicyMap
    ct: ConntrackTables
    prefilter: PrefilterMap
    metrics: MetricsMap

    def clear(self) -> None:
        for m in (self.endpoints, self.ipcache, self.policy, self.ct.tcp, self.ct.any,
                  self.prefilter, self.metrics):
            m.clear()

    def close(self) -> None:
        for m in (self.endpoints, self.ipcache, self.policy, self.prefilter, self.metrics):
            m.close()
        self.ct.close()


@dataclass
class Outcome:
    """One BPF_PROG_TEST_RUN: the program's return value and the events it emitted."""

    retval: int
    data: bytes
    events: list[MonitorEvent] = field(default_factory=list)
    records: list[bytes] = field(default_factory=list)  # the same events, as the buffer held them

    def of_type(self, kind: str) -> list[MonitorEvent]:
        return [e for e in self.events if e.type == kind]

    def _one(self, kind: str) -> MonitorEvent:
        found = self.of_type(kind)
        assert len(found) == 1, f"expected one {kind} event, got {self.events}"
        return found[0]

    @property
    def drop(self) -> MonitorEvent:
        return self._one("drop")

    @property
    def verdict(self) -> MonitorEvent:
        return self._one("policy-verdict")

    @property
    def trace(self) -> MonitorEvent:
        return self._one("trace")


class Harness:
    """Runs one program of the session's datapath on one frame and collects its events."""

    def __init__(self, datapath, collector: EventCollector, maps: Maps):
        self.datapath = datapath
        self.collector = collector
        self.maps = maps

    def run(self, program: str, frame: bytes) -> Outcome:
        before = self.collector.reader.decode_errors
        result = testrun.run(self.datapath.fd(program), frame)
        events = self.collector.drain()
        assert self.collector.reader.decode_errors == before, "an event failed to decode"
        return Outcome(result.retval, result.data, events, self.collector.take_records())


@pytest.fixture
def maps(datapath):
    opened = Maps(
        endpoints=EndpointMap(datapath.config.pin_dir),
        ipcache=IPCacheMap(datapath.config.pin_dir),
        policy=PolicyMap(datapath.config.pin_dir),
        ct=ConntrackTables(datapath.config.pin_dir),
        prefilter=PrefilterMap(datapath.config.pin_dir),
        metrics=MetricsMap(datapath.config.pin_dir),
    )
    yield opened
    opened.close()


@pytest.fixture(autouse=True)
def clean_datapath(datapath, maps, event_collector):
    """Every test starts from empty maps and no pending events, whatever ran before it."""
    maps.clear()
    event_collector.drain()
    event_collector.take_records()
    yield


@pytest.fixture
def harness(datapath, event_collector, maps) -> Harness:
    return Harness(datapath, event_collector, maps)
