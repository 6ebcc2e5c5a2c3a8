"""ciliumpy_lxc: the local endpoints, keyed by IP (bpf/lib/maps.h)."""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

from .base import BpfMap, be32

ENDPOINT_KEY_IPV4 = 1

ENDPOINT_F_HOST = 1
ENDPOINT_F_POLICY_INGRESS = 2
ENDPOINT_F_POLICY_EGRESS = 4


class EndpointKey(ctypes.Structure):
    _fields_ = [
        ("ip4", be32),
        ("ip6_rest", ctypes.c_uint8 * 12),
        ("family", ctypes.c_uint8),
        ("key", ctypes.c_uint8),
        ("cluster_id", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class EndpointInfo(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("unused", ctypes.c_uint16),
        ("lxc_id", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("mac", ctypes.c_uint64),
        ("node_mac", ctypes.c_uint64),
        ("sec_id", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


def mac_to_u64(mac: str) -> int:
    """The u64 whose memory image starts with the six MAC bytes, as the C side reads it."""
    raw = bytes(int(b, 16) for b in mac.split(":"))
    return int.from_bytes(raw + b"\0\0", "little")


def u64_to_mac(value: int) -> str:
    return ":".join(f"{b:02x}" for b in value.to_bytes(8, "little")[:6])


@dataclass(frozen=True)
class Endpoint:
    ip: ipaddress.IPv4Address
    endpoint_id: int
    ifindex: int
    identity: int
    mac: str
    node_mac: str
    flags: int

    @property
    def ingress_enforced(self) -> bool:
        return bool(self.flags & ENDPOINT_F_POLICY_INGRESS)

    @property
    def egress_enforced(self) -> bool:
        return bool(self.flags & ENDPOINT_F_POLICY_EGRESS)

    @property
    def is_host(self) -> bool:
        return bool(self.flags & ENDPOINT_F_HOST)


def _key(ip) -> EndpointKey:
    return EndpointKey(ip4=int(ipaddress.IPv4Address(ip)), family=ENDPOINT_KEY_IPV4)


class EndpointMap(BpfMap):
    NAME = "ciliumpy_lxc"
    KEY = EndpointKey
    VALUE = EndpointInfo

    def upsert(self, ip, *, endpoint_id: int, ifindex: int, identity: int, mac: str = "00:00:00:00:00:00",
               node_mac: str = "00:00:00:00:00:00", flags: int = 0) -> None:
        value = EndpointInfo(ifindex=ifindex, lxc_id=endpoint_id, flags=flags,
                             mac=mac_to_u64(mac), node_mac=mac_to_u64(node_mac), sec_id=identity)
        self.update(_key(ip), value)

    def get(self, ip) -> Endpoint | None:
        value = self.lookup(_key(ip))
        return None if value is None else self._decode(_key(ip), value)

    def remove(self, ip) -> bool:
        return self.delete(_key(ip))

    def set_policy_enforcement(self, ip, *, ingress: bool, egress: bool) -> None:
        key = _key(ip)
        value = self.lookup(key)
        if value is None:
            raise KeyError(f"no endpoint with IP {ip}")
        flags = value.flags & ~(ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS)
        flags |= (ENDPOINT_F_POLICY_INGRESS if ingress else 0) | (ENDPOINT_F_POLICY_EGRESS if egress else 0)
        value.flags = flags
        self.update(key, value)

    def list(self) -> list[Endpoint]:
        found = [self._decode(k, v) for k, v in self.items() if k.family == ENDPOINT_KEY_IPV4]
        return sorted(found, key=lambda e: e.endpoint_id)

    @staticmethod
    def _decode(key: EndpointKey, value: EndpointInfo) -> Endpoint:
        return Endpoint(ip=ipaddress.IPv4Address(key.ip4), endpoint_id=value.lxc_id,
                        ifindex=value.ifindex, identity=value.sec_id, mac=u64_to_mac(value.mac),
                        node_mac=u64_to_mac(value.node_mac), flags=value.flags)
