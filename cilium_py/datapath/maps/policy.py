"""ciliumpy_policy: per-endpoint L3/L4 policy entries in one LPM map (bpf/lib/policy.h).

A key is (endpoint, peer identity, direction, protocol, port prefix); identity 0 and protocol
0 are wildcards and a port prefix shorter than 16 bits covers an aligned block of ports.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import NamedTuple

from cilium_py.vocab import EGRESS, INGRESS

from .base import BpfMap, be16

POLICY_PREFIX_STATIC = 56  # sec_label + endpoint_id + egress
POLICY_F_DENY = 1


class PolicyKey(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("sec_label", ctypes.c_uint32),
        ("endpoint_id", ctypes.c_uint16),
        ("egress", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("dport", be16),
    ]


class PolicyEntry(ctypes.Structure):
    _fields_ = [
        ("proxy_port", be16),
        ("flags", ctypes.c_uint8),
        ("prefix_len", ctypes.c_uint8),
        ("cookie", ctypes.c_uint32),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


class PolicyMapKey(NamedTuple):
    """One entry's key in domain terms: `port`/`port_prefix` is an aligned block of ports
    (port_prefix 16 = one port, 0 = any port); protocol 0 = any protocol (and any port).
    A named tuple, not a dataclass: map state builds hundreds of thousands of these."""

    endpoint_id: int
    identity: int
    direction: str
    protocol: int
    port: int = 0
    port_prefix: int = 0

    @property
    def port_range(self) -> tuple[int, int]:
        if self.protocol == 0 or self.port_prefix == 0:
            return (0, 65535)
        size = 1 << (16 - self.port_prefix)
        return (self.port, self.port + size - 1)

    def to_c(self) -> PolicyKey:
        proto_bits = 8 if self.protocol else 0
        port_bits = self.port_prefix if self.protocol else 0
        return PolicyKey(prefixlen=POLICY_PREFIX_STATIC + proto_bits + port_bits,
                         sec_label=self.identity, endpoint_id=self.endpoint_id,
                         egress=1 if self.direction == EGRESS else 0,
                         protocol=self.protocol, dport=self.port if port_bits else 0)

    @classmethod
    def from_c(cls, key: PolicyKey) -> PolicyMapKey:
        bits = key.prefixlen - POLICY_PREFIX_STATIC
        return cls(key.endpoint_id, key.sec_label, EGRESS if key.egress else INGRESS,
                   key.protocol if bits >= 8 else 0, key.dport if bits > 8 else 0,
                   max(bits - 8, 0))


@dataclass(frozen=True)
class PolicyMapValue:
    deny: bool
    cookie: int = 0
    packets: int = 0
    bytes: int = 0


class PolicyMap(BpfMap):
    NAME = "ciliumpy_policy"
    KEY = PolicyKey
    VALUE = PolicyEntry

    def put(self, key: PolicyMapKey, *, deny: bool, cookie: int = 0) -> None:
        c_key = key.to_c()
        prefix = c_key.prefixlen - POLICY_PREFIX_STATIC
        self.update(c_key, PolicyEntry(flags=POLICY_F_DENY if deny else 0, prefix_len=prefix,
                                       cookie=cookie))

    def allow(self, endpoint_id: int, identity: int, port: int, protocol: int, direction: str,
              cookie: int = 0) -> None:
        """Allows one port (0 = any) of a protocol (0 = any) from/to an identity (0 = any)."""
        self.put(PolicyMapKey(endpoint_id, identity, direction, protocol, port, 16 if port else 0),
                 deny=False, cookie=cookie)

    def deny(self, endpoint_id: int, identity: int, port: int, protocol: int, direction: str,
             cookie: int = 0) -> None:
        self.put(PolicyMapKey(endpoint_id, identity, direction, protocol, port, 16 if port else 0),
                 deny=True, cookie=cookie)

    def remove(self, key: PolicyMapKey) -> bool:
        return self.delete(key.to_c())

    def entries(self, endpoint_id: int | None = None) -> dict[PolicyMapKey, PolicyMapValue]:
        out = {}
        for k, v in self.items():
            key = PolicyMapKey.from_c(k)
            if endpoint_id is None or key.endpoint_id == endpoint_id:
                out[key] = PolicyMapValue(bool(v.flags & POLICY_F_DENY), v.cookie, v.packets, v.bytes)
        return dict(sorted(out.items()))
