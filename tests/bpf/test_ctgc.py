"""The agent's conntrack GC removes expired entries and keeps live ones."""

import ipaddress

import pytest

from cilium_py.agent.ctgc import ConntrackGC
from cilium_py.datapath.maps.conntrack import (
    ConntrackTables,
    CtEntry,
    CtTuple4,
    TUPLE_F_OUT,
    monotonic_seconds,
)

pytestmark = pytest.mark.bpf


def tuple4(sport: int, proto: int) -> CtTuple4:
    return CtTuple4(saddr=int(ipaddress.IPv4Address("10.244.9.2")),
                    daddr=int(ipaddress.IPv4Address("10.244.9.3")), sport=sport, dport=80,
                    nexthdr=proto, flags=TUPLE_F_OUT)


def test_gc_removes_only_expired_entries(datapath):
    tables = ConntrackTables(datapath.config.pin_dir)
    now = monotonic_seconds()
    tables.tcp.update(tuple4(1000, 6), CtEntry(lifetime=now - 5, tx_packets=1))
    tables.tcp.update(tuple4(1001, 6), CtEntry(lifetime=now + 500, tx_packets=1))
    tables.any.update(tuple4(1002, 17), CtEntry(lifetime=now - 1, tx_packets=1))
    gc = ConntrackGC(datapath.config.pin_dir, interval=3600)
    try:
        assert gc.run_once() == 2
        assert [c.sport for c in tables.connections()] == [1001]
        assert gc.removed_total == 2 and gc.runs == 1
    finally:
        gc.stop()
        tables.close()
