"""Where the service manager's changes go: the pinned lb maps, or memory (tests).

The manager computes a change set (`LBChanges`) and a writer applies it in the one order
that keeps the datapath consistent at every step:

1. backends the new slots name,
2. reverse-NAT entries of new service IDs,
3. Maglev tables (they name only backends that exist from step 1 until step 8),
4. backend slots, then the master entries whose counts make them reachable,
5. removed frontends (master first, so nothing reaches their slots) and surplus slots,
6. Maglev tables and 7. reverse-NAT and NAT entries of service IDs that are gone,
8. backends no service names any more.

`BpfWriter` writes each step with one BPF_MAP_UPDATE_BATCH / DELETE_BATCH per map,
building the packed keys and values with numpy instead of one ctypes object per entry.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from cilium_py.datapath import libbpf
from cilium_py.datapath.maps.base import numpy_dtype
from cilium_py.datapath.maps.lb import (
    ALGORITHM_SHIFT,
    AFFINITY_TIMEOUT_MASK,
    Backend,
    BackendsMap,
    Frontend,
    Lb4Backend,
    Lb4Key,
    Lb4ReverseNat,
    Lb4Service,
    MaglevMap,
    RevNatMap,
    ServiceEntry,
    ServicesMap,
)
from cilium_py.datapath.maps.nat import NatMap

log = logging.getLogger(__name__)


class FE(NamedTuple):
    """A frontend in one scope, as the services map keys it: the packed form the manager
    and the writers use (lb.Frontend is the API form; building those costs more)."""

    address: int         # IPv4 as an int
    port: int
    proto: int
    scope: int

    def frontend(self) -> Frontend:
        return Frontend(ipaddress.IPv4Address(self.address), self.port, self.proto, self.scope)

    @classmethod
    def of(cls, fe: Frontend) -> "FE":
        return cls(int(fe.address), fe.port, fe.proto, fe.scope)


class SlotWrite(NamedTuple):
    frontend: FE
    slot: int            # 1..count
    backend_id: int
    service_id: int


class BackendWrite(NamedTuple):
    backend_id: int
    address: int         # IPv4 as an int
    port: int
    proto: int
    state: int           # BE_STATE_*
    local: bool

    def backend(self) -> Backend:
        return Backend(self.backend_id, ipaddress.IPv4Address(self.address), self.port, self.proto,
                       self.state, self.local)


class MasterWrite(NamedTuple):
    frontend: FE
    service_id: int
    count: int           # active backends in slots 1..count
    flags: int
    affinity_timeout: int
    algorithm: int
    qcount: int = 0


@dataclass
class LBChanges:
    backends: list[BackendWrite] = field(default_factory=list)
    revnat: list[tuple[int, ipaddress.IPv4Address, int]] = field(default_factory=list)
    maglev: list[tuple[int, np.ndarray]] = field(default_factory=list)
    slots: list[SlotWrite] = field(default_factory=list)
    masters: list[MasterWrite] = field(default_factory=list)
    service_deletes: list[tuple[FE, int]] = field(default_factory=list)  # (frontend, slot)
    maglev_deletes: list[int] = field(default_factory=list)
    revnat_deletes: list[int] = field(default_factory=list)
    backend_deletes: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(self.counts().values())

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in
                ("backends", "revnat", "maglev", "slots", "masters", "service_deletes",
                 "maglev_deletes", "revnat_deletes", "backend_deletes")}

    def writes(self) -> int:
        return sum(self.counts().values())


@dataclass
class RealizedLB:
    """What the maps hold, read back at startup."""

    services: list[ServiceEntry] = field(default_factory=list)
    backends: list[BackendWrite] = field(default_factory=list)
    revnat: list[tuple[int, ipaddress.IPv4Address, int]] = field(default_factory=list)
    maglev: list[int] = field(default_factory=list)


class LBWriter(Protocol):
    def apply(self, changes: LBChanges) -> None: ...

    def dump(self) -> RealizedLB: ...

    def close(self) -> None: ...


# -- memory ---------------------------------------------------------------------------------

class MemoryWriter:
    """The maps as dicts, with every applied change set kept for inspection. It checks the
    ordering rules the datapath relies on, so a manager bug fails a unit test."""

    def __init__(self):
        self.services: dict[tuple[FE, int], tuple] = {}   # (fe, slot) -> value tuple
        self.backends: dict[int, Backend] = {}
        self.revnat: dict[int, tuple[ipaddress.IPv4Address, int]] = {}
        self.maglev: dict[int, np.ndarray] = {}
        self.applied: list[LBChanges] = []
        self.fail_next: Exception | None = None

    def apply(self, changes: LBChanges) -> None:
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err
        self.applied.append(changes)
        for be in changes.backends:
            self.backends[be.backend_id] = be.backend()
        for sid, addr, port in changes.revnat:
            self.revnat[sid] = (ipaddress.IPv4Address(addr), port)
        for sid, table in changes.maglev:
            missing = set(np.unique(table).tolist()) - set(self.backends)
            assert not missing, f"maglev table of {sid} names unknown backends {missing}"
            self.maglev[sid] = np.array(table, dtype=np.uint32)
        for w in changes.slots:
            assert w.backend_id in self.backends, f"slot {w} names an unknown backend"
            self.services[(w.frontend, w.slot)] = ("slot", w.backend_id, w.service_id)
        for m in changes.masters:
            for slot in range(1, m.count + m.qcount + 1):
                assert (m.frontend, slot) in self.services, f"master {m} before its slot {slot}"
            self.services[(m.frontend, 0)] = ("master", m)
        for fe, slot in changes.service_deletes:
            if slot:
                master = self.services.get((fe, 0))
                assert master is None or slot > master[1].count + master[1].qcount, \
                    f"slot {slot} of {fe} deleted while its master still counts it"
            self.services.pop((fe, slot), None)
        for sid in changes.maglev_deletes:
            self.maglev.pop(sid, None)
        for sid in changes.revnat_deletes:
            self.revnat.pop(sid, None)
        for bid in changes.backend_deletes:
            for value in self.services.values():
                assert value[0] != "slot" or value[1] != bid, f"backend {bid} deleted while a slot names it"
            self.backends.pop(bid, None)

    def entries(self) -> list[ServiceEntry]:
        out = []
        for (fe, slot), value in self.services.items():
            if slot:
                continue
            m = value[1]
            # A missing slot is skipped, as ServicesMap.list() does with the real map.
            ids = [self.services[(fe, s)][1] for s in range(1, m.count + m.qcount + 1)
                   if (fe, s) in self.services]
            out.append(ServiceEntry(fe.frontend(), m.service_id, ids, m.flags, m.affinity_timeout,
                                    m.algorithm, m.qcount))
        return sorted(out, key=lambda e: (e.service_id, e.frontend.scope))

    def entry(self, fe: Frontend) -> ServiceEntry | None:
        return next((e for e in self.entries() if e.frontend == fe), None)

    def slot_keys(self) -> set[tuple[Frontend, int]]:
        return {(fe.frontend(), slot) for fe, slot in self.services}

    def dump(self) -> RealizedLB:
        return RealizedLB(self.entries(), sorted(self.backends.values(), key=lambda b: b.backend_id),
                          [(sid, a, p) for sid, (a, p) in sorted(self.revnat.items())],
                          sorted(self.maglev))

    def close(self) -> None:
        pass


# -- the pinned maps ------------------------------------------------------------------------

# The batch layouts are the ctypes mirrors' own (byte order included), so a change to a
# mirror in maps/lb.py reaches the batch writer without a second edit here.
LB4_KEY = numpy_dtype(Lb4Key)
LB4_SERVICE = numpy_dtype(Lb4Service)
LB4_BACKEND = numpy_dtype(Lb4Backend)
LB4_REVNAT = numpy_dtype(Lb4ReverseNat)


def _keys(rows: list[tuple[FE, int]]) -> np.ndarray:
    keys = np.zeros(len(rows), LB4_KEY)
    if rows:
        keys["address"] = [fe.address for fe, _ in rows]
        keys["dport"] = [fe.port for fe, _ in rows]
        keys["backend_slot"] = [slot for _, slot in rows]
        keys["proto"] = [fe.proto for fe, _ in rows]
        keys["scope"] = [fe.scope for fe, _ in rows]
    return keys


class BpfWriter:
    """Applies change sets to the pinned lb maps of one node."""

    def __init__(self, pin_dir: str, maglev_table_size: int):
        self.services = ServicesMap.shared(pin_dir)
        self.backends = BackendsMap.shared(pin_dir)
        self.revnat = RevNatMap.shared(pin_dir)
        self.maglev = MaglevMap.shared(pin_dir, maglev_table_size)
        self.nat = NatMap.shared(pin_dir)
        self.batch_ops = True  # cleared if the kernel refuses batch operations

    def apply(self, c: LBChanges) -> None:
        if c.backends:
            values = np.zeros(len(c.backends), LB4_BACKEND)
            values["address"] = [b.address for b in c.backends]
            values["port"] = [b.port for b in c.backends]
            values["proto"] = [b.proto for b in c.backends]
            values["flags"] = [b.state for b in c.backends]
            values["local"] = [int(b.local) for b in c.backends]
            keys = np.array([b.backend_id for b in c.backends], np.uint32)
            self._update(self.backends, keys, values)
        if c.revnat:
            keys = np.array([sid for sid, _, _ in c.revnat], np.uint16)
            values = np.zeros(len(c.revnat), LB4_REVNAT)
            values["address"] = [int(ipaddress.IPv4Address(a)) for _, a, _ in c.revnat]
            values["port"] = [p for _, _, p in c.revnat]
            self._update(self.revnat, keys, values)
        for sid, table in c.maglev:
            self.maglev.set_table(sid, table)
        if c.slots or c.masters:
            # Slots first, masters after them, in one batch: the kernel applies a batch in
            # array order, so no master counts a slot that is not there yet.
            rows = [(w.frontend, w.slot) for w in c.slots] + [(m.frontend, 0) for m in c.masters]
            keys = _keys(rows)
            values = np.zeros(len(rows), LB4_SERVICE)
            n = len(c.slots)
            if n:
                values["backend_id"][:n] = [w.backend_id for w in c.slots]
                values["rev_nat_index"][:n] = [w.service_id for w in c.slots]
            if c.masters:
                for m in c.masters:
                    if not 0 <= m.affinity_timeout <= AFFINITY_TIMEOUT_MASK:
                        raise ValueError(f"affinity timeout {m.affinity_timeout}s does not fit 24 bits")
                values["backend_id"][n:] = [m.affinity_timeout | m.algorithm << ALGORITHM_SHIFT
                                            for m in c.masters]
                values["count"][n:] = [m.count for m in c.masters]
                values["rev_nat_index"][n:] = [m.service_id for m in c.masters]
                values["flags"][n:] = [m.flags & 0xFF for m in c.masters]
                values["flags2"][n:] = [m.flags >> 8 for m in c.masters]
                values["qcount"][n:] = [m.qcount for m in c.masters]
            self._update(self.services, keys, values)
        if c.service_deletes:
            self._delete(self.services, _keys(c.service_deletes))
        for sid in c.maglev_deletes:
            self.maglev.remove(sid)
        if c.revnat_deletes:
            self._delete(self.revnat, np.array(c.revnat_deletes, np.uint16))
            # NodePort connections carry their frontend in the NAT entries, not in the rev-NAT
            # map: without this a removed frontend would keep forwarding its open flows.
            gone = set(c.revnat_deletes)
            doomed = [k for k, v in self.nat.items() if v.rev_nat_index in gone]
            for key in doomed:
                self.nat.delete(key)
        if c.backend_deletes:
            self._delete(self.backends, np.array(c.backend_deletes, np.uint32))

    def _update(self, m, keys: np.ndarray, values: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys)
        values = np.ascontiguousarray(values)
        if self.batch_ops:
            try:
                libbpf.map_update_batch(m.fd, keys, values, len(keys))
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524) or getattr(e, "done", 0):
                    raise OSError(e.errno, f"{m.NAME}: {e.strerror}") from e
                log.info("%s: no batch updates (%s); writing one by one", m.NAME, e)
                self.batch_ops = False
        ksize, vsize = keys.dtype.itemsize, values.dtype.itemsize
        kbuf, vbuf = keys.view(np.uint8), values.view(np.uint8)
        for i in range(len(keys)):
            k = (ctypes.c_char * ksize).from_buffer(kbuf, i * ksize)
            v = (ctypes.c_char * vsize).from_buffer(vbuf, i * vsize)
            try:
                libbpf.map_update(m.fd, k, v)
            except OSError as e:
                raise OSError(e.errno, f"{m.NAME}: {e.strerror}") from e

    def _delete(self, m, keys: np.ndarray) -> None:
        """Deletes every key; keys that are already gone are no error."""
        keys = np.ascontiguousarray(keys)
        start = 0
        while start < len(keys) and self.batch_ops:
            chunk = keys[start:]
            try:
                libbpf.map_delete_batch(m.fd, chunk, len(chunk))
                return
            except OSError as e:
                done = getattr(e, "done", 0)
                if e.errno == errno.ENOENT:
                    start += done + 1  # that key was gone already: go on after it
                    continue
                if e.errno in (errno.EINVAL, errno.ENOTSUP, 524) and not done:
                    self.batch_ops = False
                    break
                raise OSError(e.errno, f"{m.NAME}: {e.strerror}") from e
        size = keys.dtype.itemsize
        buf = keys.view(np.uint8)
        for i in range(start, len(keys)):
            libbpf.map_delete(m.fd, (ctypes.c_char * size).from_buffer(buf, i * size))

    def dump(self) -> RealizedLB:
        return RealizedLB(self.services.list(), self.backends.list(), self.revnat.list(),
                          self.maglev.service_ids())

    def close(self) -> None:
        for m in (self.services, self.backends, self.revnat, self.maglev, self.nat):
            m.close()
