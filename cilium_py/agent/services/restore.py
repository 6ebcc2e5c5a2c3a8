"""Reading the pinned lb maps back into the manager's books: at startup (a restarted
agent keeps every ID and rewrites only what changed while none ran), after a failed
write, and every resync interval (entries changed or removed behind the agent's back).
"""

from __future__ import annotations

import ipaddress
import logging

from cilium_py.agent.services.diff import RealizedBooks
from cilium_py.agent.services.endpoints import BackendKey
from cilium_py.agent.services.plan import FrontendKey
from cilium_py.agent.services.writer import FE, RealizedLB

log = logging.getLogger(__name__)


def restore(books: RealizedBooks, maps: RealizedLB) -> tuple[list[FrontendKey], list[BackendKey]]:
    """Makes the books say what `maps` hold, and takes over the IDs found there; IDs held
    already (planned, but not in the maps) stay allocated. IDs that the maps hold twice
    or that nothing names any more go to `books.stale`, for the next diff to delete.
    Returns the frontends and backends the maps hold, which the next diff must compare."""
    # Maglev tables are not read back (a table is 64 KiB); one this manager wrote and
    # the map still holds keeps its signature, others are rewritten.
    known_tables = books.maglev
    books.frontends, books.backends, books.revnat, books.maglev = {}, {}, {}, {}
    books.stale = []
    ids = books.backend_ids
    for be in maps.backends:
        key = (str(be.address), be.port, be.proto)
        books.backends[be.backend_id] = key + (be.state, be.local)
        if ids.get(key) is None:
            ids.restore(key, be.backend_id)
        if ids.get(key) != be.backend_id and ids.key_of(be.backend_id) is None:
            # A second ID for a known backend: deleted, and its ID held until then.
            ids.restore(("stale", be.backend_id), be.backend_id)
            books.stale.append(("backend", be.backend_id))
    for entry in maps.services:
        fe = entry.frontend
        books.frontends[FE.of(fe)] = (entry.service_id, tuple(entry.backend_ids), entry.flags,
                                      entry.affinity_timeout, entry.algorithm, entry.qcount)
        key = (str(fe.address), fe.port, fe.proto)
        if books.service_ids.get(key) is None:
            books.service_ids.restore(key, entry.service_id)
    for sid, a, port in maps.revnat:
        books.revnat[sid] = (str(a), port)
    for sid in maps.maglev:
        books.maglev[sid] = known_tables.get(sid, ("unknown",))
    for sid in sorted(set(books.revnat) | set(books.maglev)):
        if books.service_ids.key_of(sid) is None:
            books.service_ids.restore(("stale", sid), sid)
            books.stale.append(("service", sid))
    log.info("services: maps hold %d frontends, %d backends", len(books.frontends), len(books.backends))
    frontends = [(str(ipaddress.IPv4Address(fe.address)), fe.port, fe.proto) for fe in books.frontends]
    backends = [row[:3] for row in books.backends.values()]
    return frontends, backends
