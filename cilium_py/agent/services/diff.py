"""The difference between what the owners' plans want and what the lb maps hold.

`RealizedBooks` is the manager's record of the maps: what it wrote, or what restore.py
read back, with the service and backend IDs. `diff` compares the touched frontends and
backends of the plans with the books and returns the writes (`LBChanges`) and what they do
to the books (`Pending`), which `RealizedBooks.commit` records once the writer has applied
them; a failed write leaves the books as they were.

Backend slots keep their positions when backends come and go (a new backend fills a hole
or goes last; a removed one's slot takes the last backend), so a change writes few slots.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from cilium_py.agent.services.addr import ipv4_int
from cilium_py.agent.services.allocators import BACKEND_ID_RANGE, SERVICE_ID_RANGE, IDAllocator
from cilium_py.agent.services.endpoints import BackendKey
from cilium_py.agent.services.maglev import build_table
from cilium_py.agent.services.plan import FrontendKey, FrontendPlan, Owner
from cilium_py.agent.services.writer import FE, BackendWrite, LBChanges, MasterWrite, SlotWrite
from cilium_py.datapath.maps.lb import ALGORITHM_RANDOM, BE_STATE_ACTIVE, SCOPE_EXTERNAL, SCOPE_INTERNAL

# What the owners using a backend say about it: owner -> (state, local).
BackendRefs = Mapping[BackendKey, Mapping[Owner, tuple[int, bool]]]


class RealizedBooks:
    """What the lb maps hold, as far as the manager knows."""

    def __init__(self):
        self.service_ids = IDAllocator("service", *SERVICE_ID_RANGE)
        self.backend_ids = IDAllocator("backend", *BACKEND_ID_RANGE)
        # FE -> (service ID, slot backend IDs, flags, affinity timeout, algorithm, qcount)
        self.frontends: dict[FE, tuple] = {}
        self.backends: dict[int, tuple] = {}      # ID -> (address, port, proto, state, local)
        self.revnat: dict[int, tuple[str, int]] = {}
        self.maglev: dict[int, tuple] = {}         # service ID -> the table's backend signature
        # Leftovers a restore found under IDs nothing holds: deleted by the next diff.
        self.stale: list[tuple[str, int]] = []

    def commit(self, ch: LBChanges, pend: Pending) -> None:
        """Records what the writer has just written, and releases what is gone."""
        for fe, entry in pend.frontends.items():
            if entry is None:
                self.frontends.pop(fe, None)
            else:
                self.frontends[fe] = entry
        self.backends.update(pend.backends)
        for bid in ch.backend_deletes:
            self.backends.pop(bid, None)
        for key in pend.freed_backend_keys:
            self.backend_ids.release(key)
        for sid, a, port in ch.revnat:
            self.revnat[sid] = (str(ipaddress.IPv4Address(a)), port)
        for sid in ch.revnat_deletes:
            self.revnat.pop(sid, None)
        for sid, signature in pend.maglev_signatures.items():
            self.maglev[sid] = signature
        for sid in ch.maglev_deletes:
            self.maglev.pop(sid, None)
        for fkey in pend.freed_service_keys:
            self.service_ids.release(fkey)


@dataclass
class Pending:
    """What a change set does to the books once the writer has applied it."""

    frontends: dict = field(default_factory=dict)         # FE -> realized tuple | None
    backends: dict = field(default_factory=dict)          # backend ID -> realized row
    maglev_signatures: dict = field(default_factory=dict)
    freed_service_keys: list = field(default_factory=list)
    freed_backend_keys: list = field(default_factory=list)


def slot_order(old: list[int], active: list[int]) -> list[int]:
    """New slot contents: backends that stay keep their slot, new ones fill the holes of
    removed ones and then go last, and a hole still left takes the last backend."""
    wanted = set(active)
    slots: list[int | None] = [b if b in wanted else None for b in old]
    present = {b for b in slots if b is not None}
    fresh = iter([b for b in active if b not in present])
    for i, b in enumerate(slots):
        if b is None:
            nxt = next(fresh, None)
            if nxt is None:
                break
            slots[i] = nxt
    slots.extend(fresh)
    while slots and slots[-1] is None:
        slots.pop()
    for i in range(len(slots)):
        if i >= len(slots):
            break
        if slots[i] is None:
            slots[i] = slots.pop()
            while slots and slots[-1] is None:
                slots.pop()
    return slots


def diff(books: RealizedBooks, desired: Callable[[FrontendKey], FrontendPlan | None],
         backend_refs: BackendRefs, touched_fe: dict[FrontendKey, None], touched_be: dict[BackendKey, None],
         maglev_table_size: int, maglev_seed: str) -> tuple[LBChanges, Pending]:
    """The writes that bring the touched frontends and backends from the books to what is
    desired: `desired(key)` is the plan serving a frontend (None: nothing does), and
    `backend_refs` the owners using each backend. IDs for new keys are acquired here;
    the stale leftovers of a restore are deleted."""
    ch = LBChanges()
    pend = Pending()
    backend_ids: dict[BackendKey, int] = {}
    ids, realized_be = books.backend_ids, books.backends
    for key in touched_be:
        refs = backend_refs.get(key)
        bid = ids.get(key)
        if refs:
            if bid is None:
                bid = ids.acquire(key)
            if len(refs) == 1:
                (state, local), = refs.values()
            else:
                state = min(s for s, _ in refs.values())
                local = any(loc for _, loc in refs.values())
            row = (key[0], key[1], key[2], state, local)
            if realized_be.get(bid) != row:
                ch.backends.append(BackendWrite(bid, ipv4_int(key[0]), key[1], key[2], state, local))
                pend.backends[bid] = row
            backend_ids[key] = bid
        elif bid is not None:
            ch.backend_deletes.append(bid)
            pend.freed_backend_keys.append(key)

    realized = books.frontends
    tables: dict[tuple, np.ndarray] = {}

    def remove(fe: FE, old: tuple) -> None:
        ch.service_deletes.append((fe, 0))  # the master first: nothing reaches the slots after
        ch.service_deletes.extend([(fe, s) for s in range(1, len(old[1]) + 1)])
        pend.frontends[fe] = None

    for fkey in touched_fe:
        plan = desired(fkey)
        address, port, proto = ipv4_int(fkey[0]), fkey[1], fkey[2]
        ext = FE(address, port, proto, SCOPE_EXTERNAL)
        internal = FE(address, port, proto, SCOPE_INTERNAL)
        sid = books.service_ids.get(fkey)
        if plan is None:
            for fe in (ext, internal):
                old = realized.get(fe)
                if old is not None:
                    remove(fe, old)
                    if sid is None:
                        sid = old[0]
            if sid is not None:
                if sid in books.maglev:
                    ch.maglev_deletes.append(sid)
                if sid in books.revnat:
                    ch.revnat_deletes.append(sid)
                if books.service_ids.get(fkey) is not None:
                    pend.freed_service_keys.append(fkey)
            continue
        if sid is None:
            sid = books.service_ids.acquire(fkey)
        if books.revnat.get(sid) != (fkey[0], port):
            ch.revnat.append((sid, address, port))
        scopes = [(ext, plan.external)]
        if plan.internal is not None:
            scopes.append((internal, plan.internal))
        elif internal in realized:
            remove(internal, realized[internal])
        for fe, refs in scopes:
            old = realized.get(fe)
            old_ids = old[1] if old is not None else ()
            active = [backend_ids.get(r.key) or ids.get(r.key) for r in refs if r.state == BE_STATE_ACTIVE]
            slots = slot_order(old_ids, active) if old_ids else active
            moved = old is None or old[0] != sid
            for i, bid in enumerate(slots):
                if moved or i >= len(old_ids) or old_ids[i] != bid:
                    ch.slots.append(SlotWrite(fe, i + 1, bid, sid))
            # With two scopes Maglev serves the external (north-south) scope; in-node
            # clients pick at random from their own set.
            algorithm = plan.algorithm if fe.scope == SCOPE_EXTERNAL or not plan.maglev else ALGORITHM_RANDOM
            entry = (sid, tuple(slots), plan.flags, plan.affinity_timeout, algorithm, 0)
            if old != entry:
                if old is None or (old[0], len(old[1])) + old[2:] != (sid, len(slots)) + entry[2:]:
                    ch.masters.append(MasterWrite(fe, sid, len(slots), plan.flags,
                                                  plan.affinity_timeout, algorithm))
                if len(old_ids) > len(slots):
                    ch.service_deletes.extend([(fe, s) for s in range(len(slots) + 1, len(old_ids) + 1)])
                pend.frontends[fe] = entry
        # Maglev: one table per service ID, from the external scope's active backends.
        signature = None
        if plan.maglev:
            signature = tuple(sorted((r.name, backend_ids.get(r.key) or ids.get(r.key))
                                     for r in plan.external if r.state == BE_STATE_ACTIVE))
        if signature:
            if books.maglev.get(sid) != signature:
                table = tables.get(signature)
                if table is None:
                    table = tables[signature] = build_table(signature, maglev_table_size, maglev_seed)
                ch.maglev.append((sid, table))
                pend.maglev_signatures[sid] = signature
        elif sid in books.maglev:
            ch.maglev_deletes.append(sid)
    for kind, id_ in books.stale:
        if kind == "backend":
            ch.backend_deletes.append(id_)
            pend.freed_backend_keys.append(("stale", id_))
        else:
            if id_ in books.maglev:
                ch.maglev_deletes.append(id_)
            if id_ in books.revnat:
                ch.revnat_deletes.append(id_)
            pend.freed_service_keys.append(("stale", id_))
    books.stale = []
    return ch, pend
