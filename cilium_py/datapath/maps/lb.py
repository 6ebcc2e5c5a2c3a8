"""The load-balancing maps (bpf/lib/lb.h): services, backends, reverse NAT, session
affinity, socket reverse NAT and Maglev tables.

Writers keep the datapath consistent while they work: a service's backend slots are
written before its master entry (whose count makes them reachable) and surplus slots are
removed after it; a Maglev table is a fresh inner map swapped into the outer map in one
update, so a lookup sees the old table or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
from dataclasses import dataclass, field

import numpy as np

from cilium_py.datapath import libbpf
from cilium_py.datapath.config import LB_ALGORITHMS as ALGORITHMS
from cilium_py.vocab import protocol_name

from .base import BpfMap, be16, be32

BPF_MAP_TYPE_ARRAY = 2

# Service flags (Cilium's ServiceFlags): bits 0-7 go to `flags`, 8-15 to `flags2`.
SVC_F_EXTERNAL_IPS = 1 << 0
SVC_F_NODEPORT = 1 << 1
SVC_F_EXT_LOCAL = 1 << 2
SVC_F_HOSTPORT = 1 << 3
SVC_F_AFFINITY = 1 << 4
SVC_F_LOADBALANCER = 1 << 5
SVC_F_ROUTABLE = 1 << 6
SVC_F_SOURCE_RANGE = 1 << 7
SVC_F_LOCAL_REDIRECT = 1 << 8
SVC_F_LOOPBACK = 1 << 11
SVC_F_INT_LOCAL = 1 << 12
SVC_F_TWO_SCOPES = 1 << 13

SCOPE_EXTERNAL, SCOPE_INTERNAL = 0, 1

BE_STATE_ACTIVE, BE_STATE_TERMINATING, BE_STATE_QUARANTINED, BE_STATE_MAINTENANCE = 0, 1, 2, 3
BACKEND_STATES = {BE_STATE_ACTIVE: "active", BE_STATE_TERMINATING: "terminating",
                  BE_STATE_QUARANTINED: "quarantined", BE_STATE_MAINTENANCE: "maintenance"}

# The master entry's algorithm byte; 0 defers to the datapath's compiled-in default.
ALGORITHM_DEFAULT = 0
ALGORITHM_RANDOM, ALGORITHM_MAGLEV = ALGORITHMS["random"], ALGORITHMS["maglev"]
AFFINITY_TIMEOUT_MASK = 0xFFFFFF
ALGORITHM_SHIFT = 24

FLAG_NAMES = ((SVC_F_NODEPORT, "NodePort"), (SVC_F_LOADBALANCER, "LoadBalancer"),
              (SVC_F_EXTERNAL_IPS, "ExternalIPs"), (SVC_F_HOSTPORT, "HostPort"),
              (SVC_F_EXT_LOCAL, "ExtLocal"), (SVC_F_INT_LOCAL, "IntLocal"),
              (SVC_F_AFFINITY, "SessionAffinity"), (SVC_F_ROUTABLE, "Routable"),
              (SVC_F_TWO_SCOPES, "TwoScopes"), (SVC_F_LOOPBACK, "Loopback"))


def flag_names(flags: int) -> list[str]:
    """Cilium calls a service without type bits ClusterIP."""
    names = [name for bit, name in FLAG_NAMES if flags & bit]
    if not flags & (SVC_F_NODEPORT | SVC_F_LOADBALANCER | SVC_F_EXTERNAL_IPS | SVC_F_HOSTPORT):
        names.insert(0, "ClusterIP")
    return names


class Lb4Key(ctypes.Structure):
    _fields_ = [
        ("address", be32),
        ("dport", be16),
        ("backend_slot", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class Lb4Service(ctypes.Structure):
    # backend_id in slots 1..count; in the master: affinity timeout | algorithm << 24.
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("count", ctypes.c_uint16),
        ("rev_nat_index", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("flags2", ctypes.c_uint8),
        ("qcount", ctypes.c_uint16),
    ]


class Lb4Backend(ctypes.Structure):
    _fields_ = [
        ("address", be32),
        ("port", be16),
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("cluster_id", ctypes.c_uint16),
        ("zone", ctypes.c_uint8),
        ("local", ctypes.c_uint8),
    ]


class Lb4ReverseNat(ctypes.Structure):
    _fields_ = [("address", be32), ("port", be16), ("pad", ctypes.c_uint16)]


class LbAffinityKey(ctypes.Structure):
    _fields_ = [
        ("client_id", ctypes.c_uint64),
        ("rev_nat_id", ctypes.c_uint16),
        ("netns_cookie", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    ]


class LbAffinityVal(ctypes.Structure):
    _fields_ = [("last_used", ctypes.c_uint64), ("backend_id", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class Lb4ReverseSkKey(ctypes.Structure):
    _fields_ = [("cookie", ctypes.c_uint64), ("address", be32), ("port", be16),
                ("pad", ctypes.c_uint16)]


class Lb4ReverseSk(ctypes.Structure):
    _fields_ = [("address", be32), ("port", be16), ("rev_nat_index", ctypes.c_uint16)]


@dataclass(frozen=True)
class Frontend:
    address: ipaddress.IPv4Address
    port: int
    proto: int                 # 6 TCP, 17 UDP
    scope: int = SCOPE_EXTERNAL

    def key(self, slot: int = 0) -> Lb4Key:
        return Lb4Key(address=int(self.address), dport=self.port, backend_slot=slot,
                      proto=self.proto, scope=self.scope)

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{protocol_name(self.proto)}" + ("/i" if self.scope == SCOPE_INTERNAL else "")


@dataclass
class ServiceEntry:
    """A frontend's master entry and its backend slots, as the datapath sees them."""

    frontend: Frontend
    service_id: int
    backend_ids: list[int] = field(default_factory=list)   # slots 1..count, in order
    flags: int = 0
    affinity_timeout: int = 0
    algorithm: int = ALGORITHM_DEFAULT
    qcount: int = 0


def frontend(address, port: int, proto: int, scope: int = SCOPE_EXTERNAL) -> Frontend:
    return Frontend(ipaddress.IPv4Address(address), port, proto, scope)


class ServicesMap(BpfMap):
    NAME = "ciliumpy_lb4_services"
    KEY = Lb4Key
    VALUE = Lb4Service

    def upsert(self, entry: ServiceEntry, previous_count: int | None = None) -> None:
        """Writes the slots, then the master entry, then removes slots beyond the new count.
        `previous_count` (the old master's count + qcount) saves a lookup when known."""
        if not 0 <= entry.affinity_timeout <= AFFINITY_TIMEOUT_MASK:
            raise ValueError(f"affinity timeout {entry.affinity_timeout}s does not fit 24 bits")
        fe = entry.frontend
        if previous_count is None:
            old = self.lookup(fe.key(0))
            previous_count = (old.count + old.qcount) if old is not None else 0
        for slot, backend_id in enumerate(entry.backend_ids, start=1):
            self.update(fe.key(slot), Lb4Service(backend_id=backend_id,
                                                 rev_nat_index=entry.service_id))
        count = len(entry.backend_ids) - entry.qcount
        master = Lb4Service(
            backend_id=entry.affinity_timeout | entry.algorithm << ALGORITHM_SHIFT,
            count=count, rev_nat_index=entry.service_id, flags=entry.flags & 0xFF,
            flags2=entry.flags >> 8, qcount=entry.qcount)
        self.update(fe.key(0), master)
        for slot in range(len(entry.backend_ids) + 1, previous_count + 1):
            self.delete(fe.key(slot))

    def remove(self, fe: Frontend) -> bool:
        old = self.lookup(fe.key(0))
        if old is None:
            return False
        self.delete(fe.key(0))  # the master first: nothing reaches the slots after this
        for slot in range(1, old.count + old.qcount + 1):
            self.delete(fe.key(slot))
        return True

    def get(self, fe: Frontend) -> ServiceEntry | None:
        master = self.lookup(fe.key(0))
        if master is None:
            return None
        return self._entry(fe, master, {s: self.lookup(fe.key(s)) for s in
                                        range(1, master.count + master.qcount + 1)})

    @staticmethod
    def _entry(fe: Frontend, master: Lb4Service, slots: dict) -> ServiceEntry:
        ids = [slots[s].backend_id for s in sorted(slots) if slots[s] is not None]
        return ServiceEntry(frontend=fe, service_id=master.rev_nat_index, backend_ids=ids,
                            flags=master.flags | master.flags2 << 8,
                            affinity_timeout=master.backend_id & AFFINITY_TIMEOUT_MASK,
                            algorithm=master.backend_id >> ALGORITHM_SHIFT, qcount=master.qcount)

    def list(self) -> list[ServiceEntry]:
        masters, slots = {}, {}
        for key, value in self.items():
            fe = Frontend(ipaddress.IPv4Address(key.address), key.dport, key.proto, key.scope)
            if key.backend_slot == 0:
                masters[fe] = value
            else:
                slots.setdefault(fe, {})[key.backend_slot] = value
        out = []
        for fe, master in masters.items():
            mine = slots.get(fe, {})
            wanted = {s: mine.get(s) for s in range(1, master.count + master.qcount + 1)}
            out.append(self._entry(fe, master, wanted))
        return sorted(out, key=lambda e: (e.service_id, int(e.frontend.address), e.frontend.port,
                                          e.frontend.proto, e.frontend.scope))


@dataclass(frozen=True)
class Backend:
    backend_id: int
    address: ipaddress.IPv4Address
    port: int
    proto: int
    state: int = BE_STATE_ACTIVE
    local: bool = False

    @property
    def state_name(self) -> str:
        return BACKEND_STATES.get(self.state, str(self.state))


class BackendsMap(BpfMap):
    NAME = "ciliumpy_lb4_backends"
    KEY = ctypes.c_uint32
    VALUE = Lb4Backend

    def upsert(self, be: Backend) -> None:
        self.update(ctypes.c_uint32(be.backend_id),
                    Lb4Backend(address=int(be.address), port=be.port, proto=be.proto,
                               flags=be.state, local=int(be.local)))

    def remove(self, backend_id: int) -> bool:
        return self.delete(ctypes.c_uint32(backend_id))

    @staticmethod
    def _backend(backend_id: int, v: Lb4Backend) -> Backend:
        return Backend(backend_id, ipaddress.IPv4Address(v.address), v.port, v.proto, v.flags,
                       bool(v.local))

    def get(self, backend_id: int) -> Backend | None:
        v = self.lookup(ctypes.c_uint32(backend_id))
        return None if v is None else self._backend(backend_id, v)

    def list(self) -> list[Backend]:
        return sorted((self._backend(k.value, v) for k, v in self.items()),
                      key=lambda b: b.backend_id)


class RevNatMap(BpfMap):
    NAME = "ciliumpy_lb4_reverse_nat"
    KEY = ctypes.c_uint16
    VALUE = Lb4ReverseNat

    def upsert(self, service_id: int, address, port: int) -> None:
        self.update(ctypes.c_uint16(service_id),
                    Lb4ReverseNat(address=int(ipaddress.IPv4Address(address)), port=port))

    def remove(self, service_id: int) -> bool:
        return self.delete(ctypes.c_uint16(service_id))

    def list(self) -> list[tuple[int, ipaddress.IPv4Address, int]]:
        return sorted((k.value, ipaddress.IPv4Address(v.address), v.port) for k, v in self.items())


class AffinityMap(BpfMap):
    NAME = "ciliumpy_lb4_affinity"
    KEY = LbAffinityKey
    VALUE = LbAffinityVal

    def list(self) -> list[dict]:
        out = []
        for k, v in self.items():
            client = (f"netns:{k.client_id}" if k.netns_cookie
                      else str(ipaddress.IPv4Address(int.from_bytes(
                          k.client_id.to_bytes(8, "little")[:4], "big"))))
            out.append({"client": client, "service_id": k.rev_nat_id, "backend_id": v.backend_id,
                        "last_used": v.last_used})
        return out

    def remove_service(self, service_id: int) -> int:
        doomed = [k for k in self.keys() if k.rev_nat_id == service_id]
        return sum(self.delete(k) for k in doomed)


def affinity_client_id(address) -> int:
    """The u64 whose memory image starts with the IPv4 address, as the datapath writes it."""
    return int.from_bytes(ipaddress.IPv4Address(address).packed + b"\0" * 4, "little")


class ReverseSkMap(BpfMap):
    NAME = "ciliumpy_lb4_reverse_sk"
    KEY = Lb4ReverseSkKey
    VALUE = Lb4ReverseSk


class MaglevMap(BpfMap):
    """ciliumpy_lb4_maglev: service ID -> an inner array (one entry: the table of M backend
    IDs). The outer map holds map IDs when read from user space."""

    NAME = "ciliumpy_lb4_maglev"
    KEY = ctypes.c_uint16
    VALUE = ctypes.c_uint32

    def __init__(self, root: str, table_size: int):
        super().__init__(root)
        self.table_size = table_size

    def set_table(self, service_id: int, table: np.ndarray) -> None:
        if table.shape != (self.table_size,):
            raise ValueError(f"a Maglev table has {self.table_size} entries, not {table.shape}")
        data = np.ascontiguousarray(table, dtype=np.uint32)
        inner = libbpf.map_create(BPF_MAP_TYPE_ARRAY, "cpy_maglev_inner", 4, 4 * self.table_size, 1)
        try:
            libbpf.map_update(inner, ctypes.c_uint32(0),
                              ctypes.c_char.from_buffer(data) if data.flags.writeable else
                              ctypes.c_char.from_buffer_copy(data.tobytes()))
            # The outer map takes a reference; our fd can go once the swap is done.
            libbpf.map_update(self.fd, ctypes.c_uint16(service_id), ctypes.c_uint32(inner))
        finally:
            os.close(inner)

    def get_table(self, service_id: int) -> np.ndarray | None:
        map_id = self.lookup(ctypes.c_uint16(service_id))
        if map_id is None:
            return None
        fd = libbpf.map_fd_by_id(map_id.value)
        try:
            out = np.zeros(self.table_size, dtype=np.uint32)
            if not libbpf.map_lookup(fd, ctypes.c_uint32(0), ctypes.c_char.from_buffer(out)):
                return None
            return out
        finally:
            os.close(fd)

    def remove(self, service_id: int) -> bool:
        return self.delete(ctypes.c_uint16(service_id))

    def service_ids(self) -> list[int]:
        return sorted(k.value for k in self.keys())
