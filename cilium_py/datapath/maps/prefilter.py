"""ciliumpy_prefilter4: source CIDRs XDP drops on the node's devices (bpf/lib/prefilter.h)."""

from __future__ import annotations

import ctypes
import ipaddress

from .base import BpfMap, be32


class Prefilter4Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", be32)]


class PrefilterMap(BpfMap):
    NAME = "ciliumpy_prefilter4"
    KEY = Prefilter4Key
    VALUE = ctypes.c_uint8

    @staticmethod
    def _key(cidr) -> Prefilter4Key:
        net = ipaddress.IPv4Network(cidr, strict=True)
        return Prefilter4Key(prefixlen=net.prefixlen, addr=int(net.network_address))

    def deny(self, cidr) -> None:
        self.update(self._key(cidr), ctypes.c_uint8(1))

    def allow(self, cidr) -> bool:
        """Removes a CIDR from the deny list; False when it was not listed."""
        return self.delete(self._key(cidr))

    def list(self) -> list[ipaddress.IPv4Network]:
        nets = [ipaddress.IPv4Network((k.addr, k.prefixlen)) for k in self.keys()]
        return sorted(nets, key=lambda n: (int(n.network_address), n.prefixlen))
