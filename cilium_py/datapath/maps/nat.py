"""ciliumpy_snat_v4_external: the NAT table of connections through the node's devices
(bpf/lib/nat.h): NodePort, LoadBalancer, externalIP and hostPort connections.

Each translated connection has two entries, keyed by a packet's tuple as it is on the wire:
OUT (the client's packet arriving: client -> frontend) and IN (the backend's reply: backend
-> client, or backend -> node:port when the source was SNATed). The value is the tuple that
packet is rewritten to.
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

from cilium_py.vocab import protocol_name

from .base import BpfMap, be16, be32
from .conntrack import TUPLE_F_IN, CtTuple4, monotonic_seconds

NAT_F_SERVICE = 1  # the destination was load-balanced to a backend
NAT_F_SNAT = 2     # the source was translated to a node address and allocated port

FLAG_NAMES = {NAT_F_SERVICE: "Service", NAT_F_SNAT: "SNAT"}


class NatEntry4(ctypes.Structure):
    _fields_ = [
        ("created", ctypes.c_uint64),
        ("backend_id", ctypes.c_uint32),
        ("rev_nat_index", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("to_saddr", be32),
        ("to_daddr", be32),
        ("to_sport", be16),
        ("to_dport", be16),
        ("pad2", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class NatMapping:
    """One direction of a translated connection: the packet seen, what it becomes."""

    protocol: int
    direction: str  # "OUT" (client -> frontend) or "IN" (backend's reply)
    saddr: ipaddress.IPv4Address
    sport: int
    daddr: ipaddress.IPv4Address
    dport: int
    to_saddr: ipaddress.IPv4Address
    to_sport: int
    to_daddr: ipaddress.IPv4Address
    to_dport: int
    flags: int
    backend_id: int
    service_id: int
    created: int       # seconds of CLOCK_MONOTONIC
    age: int           # seconds since created

    @property
    def flag_names(self) -> list[str]:
        return [name for bit, name in FLAG_NAMES.items() if self.flags & bit]

    @property
    def snat(self) -> bool:
        return bool(self.flags & NAT_F_SNAT)

    def line(self) -> str:
        """One line in the spirit of `cilium bpf nat list`."""
        return (f"{protocol_name(self.protocol)} {self.direction} {self.saddr}:{self.sport} -> "
                f"{self.daddr}:{self.dport} XLATE {self.to_saddr}:{self.to_sport} -> "
                f"{self.to_daddr}:{self.to_dport} Created={self.age}sec ago "
                f"Flags=[ {' '.join(self.flag_names)} ] RevNAT={self.service_id} "
                f"BackendID={self.backend_id}")

    def to_dict(self) -> dict:
        return {"protocol": protocol_name(self.protocol), "direction": self.direction,
                "source": f"{self.saddr}:{self.sport}",
                "destination": f"{self.daddr}:{self.dport}",
                "translated_source": f"{self.to_saddr}:{self.to_sport}",
                "translated_destination": f"{self.to_daddr}:{self.to_dport}",
                "flags": self.flag_names, "service_id": self.service_id,
                "backend_id": self.backend_id, "created": self.created, "age": self.age}


class NatMap(BpfMap):
    NAME = "ciliumpy_snat_v4_external"
    KEY = CtTuple4
    VALUE = NatEntry4

    def mappings(self, now: int | None = None) -> list[NatMapping]:
        now = monotonic_seconds() if now is None else now
        out = []
        for k, v in self.items():
            out.append(NatMapping(
                protocol=k.nexthdr, direction="IN" if k.flags & TUPLE_F_IN else "OUT",
                saddr=ipaddress.IPv4Address(k.saddr), sport=k.sport,
                daddr=ipaddress.IPv4Address(k.daddr), dport=k.dport,
                to_saddr=ipaddress.IPv4Address(v.to_saddr), to_sport=v.to_sport,
                to_daddr=ipaddress.IPv4Address(v.to_daddr), to_dport=v.to_dport,
                flags=v.flags, backend_id=v.backend_id, service_id=v.rev_nat_index,
                created=v.created, age=now - v.created))
        return sorted(out, key=lambda m: (m.protocol, m.direction != "OUT", int(m.saddr), m.sport,
                                          int(m.daddr), m.dport))

    def flush(self) -> int:
        """Removes every mapping; returns how many entries went. Connections in flight lose
        their translation (a new packet of theirs is balanced again)."""
        return self.clear()

    def remove_service(self, service_id: int) -> int:
        """Removes the mappings of one service (both directions)."""
        doomed = [k for k, v in self.items() if v.rev_nat_index == service_id]
        return sum(self.delete(k) for k in doomed)
