"""The load-balancing map wrappers against the session's real maps: slot ordering of
services, backends, reverse NAT and Maglev tables swapped in as inner maps."""

from __future__ import annotations

import numpy as np
import pytest

from cilium_py.datapath.maps.lb import (
    ALGORITHM_MAGLEV,
    BE_STATE_TERMINATING,
    SVC_F_AFFINITY,
    SVC_F_NODEPORT,
    SVC_F_TWO_SCOPES,
    Backend,
    BackendsMap,
    MaglevMap,
    RevNatMap,
    ServiceEntry,
    ServicesMap,
    flag_names,
    frontend,
)

pytestmark = [pytest.mark.bpf]


@pytest.fixture
def lb(datapath):
    maps = (ServicesMap(datapath.config.pin_dir), BackendsMap(datapath.config.pin_dir),
            RevNatMap(datapath.config.pin_dir),
            MaglevMap(datapath.config.pin_dir, datapath.config.maglev_table_size))
    for m in maps:
        m.clear()
    yield maps
    for m in maps:
        m.clear()
        m.close()


def test_service_slots_grow_and_shrink(lb):
    services, *_ = lb
    fe = frontend("10.96.0.10", 80, 6)
    services.upsert(ServiceEntry(fe, 7, [11, 12, 13], flags=SVC_F_NODEPORT | SVC_F_AFFINITY |
                                 SVC_F_TWO_SCOPES, affinity_timeout=10800,
                                 algorithm=ALGORITHM_MAGLEV))
    got = services.get(fe)
    assert (got.service_id, got.backend_ids, got.affinity_timeout, got.algorithm) == (
        7, [11, 12, 13], 10800, ALGORITHM_MAGLEV)
    assert got.flags == SVC_F_NODEPORT | SVC_F_AFFINITY | SVC_F_TWO_SCOPES
    assert flag_names(got.flags)[:2] == ["NodePort", "SessionAffinity"]
    services.upsert(ServiceEntry(fe, 7, [12]))
    assert services.get(fe).backend_ids == [12]
    assert len(services) == 2  # master + one slot: the surplus slots are gone
    assert [e.frontend for e in services.list()] == [fe]
    assert services.remove(fe) and len(services) == 0


def test_backends_and_rev_nat(lb):
    _, backends, revnat, _ = lb
    backends.upsert(Backend(5, frontend("10.244.1.5", 8080, 6).address, 8080, 6,
                            state=BE_STATE_TERMINATING, local=True))
    be = backends.get(5)
    assert (str(be.address), be.port, be.state_name, be.local) == ("10.244.1.5", 8080, "terminating", True)
    revnat.upsert(7, "10.96.0.10", 80)
    assert [(i, str(a), p) for i, a, p in revnat.list()] == [(7, "10.96.0.10", 80)]


def test_maglev_tables_are_swapped_whole(lb, datapath):
    *_, maglev = lb
    size = datapath.config.maglev_table_size
    first = np.arange(size, dtype=np.uint32) % 3 + 1
    maglev.set_table(7, first)
    assert np.array_equal(maglev.get_table(7), first)
    second = np.full(size, 9, dtype=np.uint32)
    maglev.set_table(7, second)
    assert np.array_equal(maglev.get_table(7), second)
    assert maglev.service_ids() == [7]
    with pytest.raises(ValueError, match="entries"):
        maglev.set_table(8, np.zeros(10, dtype=np.uint32))
    assert maglev.remove(7) and maglev.get_table(7) is None
