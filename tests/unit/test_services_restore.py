"""Reading the maps back into the books, alone: a restarted agent's books equal the ones
that wrote the maps (IDs kept, nothing to rewrite), Maglev tables it cannot read are
rewritten, and leftovers (a second ID for one backend, a rev-NAT entry nothing names)
become stale and are deleted by the next diff."""

from __future__ import annotations

import ipaddress

from cilium_py.agent.services.diff import RealizedBooks, diff
from cilium_py.agent.services.endpoints import BackendRef
from cilium_py.agent.services.maglev import DEFAULT_SEED
from cilium_py.agent.services.plan import FrontendPlan
from cilium_py.agent.services.restore import restore
from cilium_py.agent.services.writer import MemoryWriter
from cilium_py.datapath.maps import lb

WEB = ("Service", "shop", "web")
TCP = 6
CIP, MAGLEV_IP = ("10.96.0.10", 80, TCP), ("10.96.0.11", 80, TCP)
SIZE = 251
BACKENDS = (BackendRef(("10.244.1.5", 8080, TCP), lb.BE_STATE_ACTIVE, False),
            BackendRef(("10.244.1.6", 8080, TCP), lb.BE_STATE_ACTIVE, True))
DESIRED = {CIP: FrontendPlan(CIP, "ClusterIP", 0, 0, 0, False, BACKENDS),
           MAGLEV_IP: FrontendPlan(MAGLEV_IP, "ClusterIP", 0, 0, lb.ALGORITHM_MAGLEV, True, BACKENDS)}
REFS = {r.key: {WEB: (r.state, r.local)} for r in BACKENDS}


def sync(books: RealizedBooks, writer: MemoryWriter):
    changes, pending = diff(books, DESIRED.get, REFS, dict.fromkeys(DESIRED), dict.fromkeys(REFS),
                            SIZE, DEFAULT_SEED)
    writer.apply(changes)
    books.commit(changes, pending)
    return changes


def written() -> tuple[RealizedBooks, MemoryWriter]:
    books, writer = RealizedBooks(), MemoryWriter()
    sync(books, writer)
    return books, writer


def test_restored_books_equal_the_writers_and_nothing_is_rewritten_but_unread_tables():
    before, writer = written()
    after = RealizedBooks()
    frontends, backends = restore(after, writer.dump())
    assert (after.frontends, after.backends, after.revnat) == (before.frontends, before.backends, before.revnat)
    assert dict(after.service_ids.items()) == dict(before.service_ids.items())
    assert dict(after.backend_ids.items()) == dict(before.backend_ids.items())
    assert sorted(frontends) == sorted(DESIRED) and sorted(backends) == sorted(REFS)
    assert after.stale == []
    changes = sync(after, writer)
    # Only the Maglev table: a new agent cannot tell what a table holds without reading it.
    assert {k: v for k, v in changes.counts().items() if v} == {"maglev": 1}


def test_restoring_over_its_own_books_keeps_the_maglev_tables_it_wrote():
    books, writer = written()
    restore(books, writer.dump())
    assert not sync(books, writer)


def test_planned_ids_the_maps_do_not_show_stay_allocated():
    books, writer = written()
    planned = books.service_ids.acquire(("10.96.0.99", 80, TCP))
    restore(books, writer.dump())
    assert books.service_ids.get(("10.96.0.99", 80, TCP)) == planned


def test_leftovers_become_stale_and_the_next_diff_deletes_them():
    _, writer = written()
    known = next(iter(writer.backends.values()))
    duplicate = lb.Backend(900, known.address, known.port, known.proto, known.state, known.local)
    writer.backends[900] = duplicate
    writer.revnat[77] = (ipaddress.IPv4Address("10.96.0.77"), 80)
    books = RealizedBooks()
    restore(books, writer.dump())
    assert sorted(books.stale) == [("backend", 900), ("service", 77)]
    changes = sync(books, writer)
    assert changes.backend_deletes == [900] and changes.revnat_deletes == [77]
    assert 900 not in writer.backends and 77 not in writer.revnat
    assert books.backend_ids.key_of(900) is None and books.service_ids.key_of(77) is None
