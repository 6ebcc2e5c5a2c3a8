"""ciliumpy_ct4_global (TCP) and ciliumpy_ct_any4_global (the rest): connection tracking
(bpf/lib/conntrack.h). A tuple is stored as its first packet saw it, flagged with the
direction (OUT at a pod's egress, IN at its ingress) it was created in. Service entries
(TUPLE_F_SERVICE) are the per-packet load balancer's: the tuple a pod sent to a frontend,
holding the backend that connection was given instead of a source identity."""

from __future__ import annotations

import ctypes
import ipaddress
import time
from dataclasses import dataclass

from cilium_py.datapath.reasons import protocol_name

from .base import BpfMap, be16, be32

TUPLE_F_OUT, TUPLE_F_IN, TUPLE_F_RELATED, TUPLE_F_SERVICE = 0, 1, 2, 4

CT_F_RX_CLOSING = 1 << 0
CT_F_TX_CLOSING = 1 << 1
CT_F_SEEN_NON_SYN = 1 << 4

FLAG_NAMES = {CT_F_RX_CLOSING: "RxClosing", CT_F_TX_CLOSING: "TxClosing",
              CT_F_SEEN_NON_SYN: "SeenNonSyn"}


class CtTuple4(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("daddr", be32),
        ("saddr", be32),
        ("dport", be16),
        ("sport", be16),
        ("nexthdr", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    ]


class _CtEntrySource(ctypes.Union):
    # Ordinary entries: the source identity; service entries: the backend ID.
    _fields_ = [("src_sec_id", ctypes.c_uint32), ("backend_id", ctypes.c_uint32)]


class CtEntry(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("rx_packets", ctypes.c_uint64),
        ("rx_bytes", ctypes.c_uint64),
        ("tx_packets", ctypes.c_uint64),
        ("tx_bytes", ctypes.c_uint64),
        ("lifetime", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("rev_nat_index", be16),
        ("ifindex", ctypes.c_uint16),
        ("tx_flags_seen", ctypes.c_uint8),
        ("rx_flags_seen", ctypes.c_uint8),
        ("u", _CtEntrySource),
        ("last_tx_report", ctypes.c_uint32),
        ("last_rx_report", ctypes.c_uint32),
    ]


def monotonic_seconds() -> int:
    """The datapath's clock: whole seconds of CLOCK_MONOTONIC (bpf_ktime_get_ns)."""
    return int(time.clock_gettime(time.CLOCK_MONOTONIC))


@dataclass(frozen=True)
class Connection:
    protocol: int
    direction: str  # "OUT" (created at a pod's egress) or "IN"
    saddr: ipaddress.IPv4Address
    sport: int
    daddr: ipaddress.IPv4Address
    dport: int
    lifetime: int
    expires_in: int
    flags: int
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    rx_flags_seen: int
    tx_flags_seen: int
    src_identity: int
    ifindex: int
    rev_nat_index: int
    service: bool = False  # a service entry: the tuple a pod sent to a frontend
    backend_id: int = 0    # service entries: the backend the connection was given

    @property
    def flag_names(self) -> list[str]:
        return [name for bit, name in FLAG_NAMES.items() if self.flags & bit]

    def line(self) -> str:
        """One line like `cilium bpf ct list global`."""
        service = f" service BackendID={self.backend_id}" if self.service else ""
        return (f"{protocol_name(self.protocol)} {self.direction} {self.saddr}:{self.sport} -> "
                f"{self.daddr}:{self.dport}{service} expires={self.expires_in} "
                f"RxPackets={self.rx_packets} RxBytes={self.rx_bytes} "
                f"RxFlagsSeen={self.rx_flags_seen:#04x} TxPackets={self.tx_packets} "
                f"TxBytes={self.tx_bytes} TxFlagsSeen={self.tx_flags_seen:#04x} "
                f"Flags={self.flags:#06x} [ {' '.join(self.flag_names)} ] "
                f"RevNAT={self.rev_nat_index} SourceSecurityID={self.src_identity} "
                f"IfIndex={self.ifindex}")


class _CtMap(BpfMap):
    KEY = CtTuple4
    VALUE = CtEntry

    def connections(self, now: int | None = None) -> list[Connection]:
        now = monotonic_seconds() if now is None else now
        out = []
        for k, v in self.items():
            service = bool(k.flags & TUPLE_F_SERVICE)
            out.append(Connection(
                protocol=k.nexthdr, direction="IN" if k.flags & TUPLE_F_IN else "OUT",
                saddr=ipaddress.IPv4Address(k.saddr), sport=k.sport,
                daddr=ipaddress.IPv4Address(k.daddr), dport=k.dport,
                lifetime=v.lifetime, expires_in=v.lifetime - now, flags=v.flags,
                rx_packets=v.rx_packets, rx_bytes=v.rx_bytes, tx_packets=v.tx_packets,
                tx_bytes=v.tx_bytes, rx_flags_seen=v.rx_flags_seen,
                tx_flags_seen=v.tx_flags_seen, src_identity=0 if service else v.src_sec_id,
                ifindex=v.ifindex, rev_nat_index=v.rev_nat_index, service=service,
                backend_id=v.backend_id if service else 0))
        return out

    def gc(self, now: int | None = None) -> int:
        """Deletes expired entries; returns how many."""
        now = monotonic_seconds() if now is None else now
        removed = 0
        for key, value in self.items():
            # Compare as signed: an entry refreshed between our read and now is not expired.
            if value.lifetime < now and self.delete(key):
                removed += 1
        return removed


class CtTcpMap(_CtMap):
    NAME = "ciliumpy_ct4_global"


class CtAnyMap(_CtMap):
    NAME = "ciliumpy_ct_any4_global"


class ConntrackTables:
    """Both global tables, used together by the CLI and the GC. `ConntrackTables(root)`
    opens private fds; `ConntrackTables.shared(root)` handles on the process's shared ones."""

    def __init__(self, root: str, *, shared: bool = False):
        def open_table(cls):
            return cls.shared(root) if shared else cls(root)

        self.tcp = open_table(CtTcpMap)
        try:
            self.any = open_table(CtAnyMap)
        except BaseException:
            self.tcp.close()
            raise

    @classmethod
    def shared(cls, root: str) -> ConntrackTables:
        return cls(root, shared=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def connections(self) -> list[Connection]:
        now = monotonic_seconds()
        conns = self.tcp.connections(now) + self.any.connections(now)
        return sorted(conns, key=lambda c: (c.protocol, int(c.saddr), c.sport, int(c.daddr), c.dport, c.direction))

    def flush(self) -> int:
        return self.tcp.clear() + self.any.clear()

    def gc(self) -> int:
        now = monotonic_seconds()
        return self.tcp.gc(now) + self.any.gc(now)

    def close(self) -> None:
        self.tcp.close()
        self.any.close()
