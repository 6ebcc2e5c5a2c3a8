"""ciliumpy_ipcache: IP/CIDR -> security identity, longest prefix wins (bpf/lib/ipcache.h)."""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

from .base import BpfMap, be32

IPCACHE_FAMILY_IPV4 = 1
# pad1 + cluster_id + family are matched exactly before the address bits.
IPCACHE_PREFIX_STATIC = 32


class IpcacheKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("pad1", ctypes.c_uint16),
        ("cluster_id", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("ip4", be32),
        ("ip6_rest", ctypes.c_uint8 * 12),
    ]


class RemoteEndpointInfo(ctypes.Structure):
    _fields_ = [
        ("sec_identity", ctypes.c_uint32),
        ("tunnel_endpoint", be32),
        ("node_id", ctypes.c_uint16),
        ("key", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    ]


@dataclass(frozen=True)
class IpcacheEntry:
    prefix: ipaddress.IPv4Network
    identity: int
    tunnel_endpoint: ipaddress.IPv4Address
    encrypt_key: int
    node_id: int


def _key(cidr) -> IpcacheKey:
    net = ipaddress.IPv4Network(cidr, strict=False)
    return IpcacheKey(prefixlen=IPCACHE_PREFIX_STATIC + net.prefixlen,
                      family=IPCACHE_FAMILY_IPV4, ip4=int(net.network_address))


class IPCacheMap(BpfMap):
    NAME = "ciliumpy_ipcache"
    KEY = IpcacheKey
    VALUE = RemoteEndpointInfo

    def upsert(self, cidr, identity: int) -> None:
        """`cidr` is an address (a /32) or a prefix."""
        self.update(_key(cidr), RemoteEndpointInfo(sec_identity=identity))

    def remove(self, cidr) -> bool:
        return self.delete(_key(cidr))

    def get(self, cidr) -> int | None:
        value = self.lookup(_key(cidr))
        return None if value is None else value.sec_identity

    def prefixes(self) -> list[ipaddress.IPv4Network]:
        return [e.prefix for e in self.list()]

    def list(self) -> list[IpcacheEntry]:
        entries = []
        for key, value in self.items():
            if key.family != IPCACHE_FAMILY_IPV4:
                continue
            net = ipaddress.IPv4Network((key.ip4, key.prefixlen - IPCACHE_PREFIX_STATIC))
            entries.append(IpcacheEntry(net, value.sec_identity,
                                        ipaddress.IPv4Address(value.tunnel_endpoint),
                                        value.key, value.node_id))
        return sorted(entries, key=lambda e: (int(e.prefix.network_address), e.prefix.prefixlen))
