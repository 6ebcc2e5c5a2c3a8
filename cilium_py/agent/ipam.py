"""Pod address allocation from the node's pod CIDR (host-scope IPAM, like Cilium's
cluster-pool mode seen from one node). Allocations persist in a state file, so a restarted
agent gives every pod the address it had."""

from __future__ import annotations

import ipaddress
import json
import os
import threading


class IPAMExhausted(RuntimeError):
    pass


class IPAM:
    def __init__(self, cidr, reserved=(), state_file: str | None = None):
        self.cidr = ipaddress.IPv4Network(cidr)
        self.reserved = {ipaddress.IPv4Address(ip) for ip in reserved}
        self.reserved |= {self.cidr.network_address, self.cidr.broadcast_address}
        self.state_file = state_file
        self._owners: dict[str, ipaddress.IPv4Address] = {}
        self._lock = threading.Lock()
        if state_file and os.path.exists(state_file):
            with open(state_file) as f:
                self._owners = {k: ipaddress.IPv4Address(v) for k, v in json.load(f).items()}

    def allocate(self, owner: str) -> ipaddress.IPv4Address:
        """The owner's address: the one it already has, or the lowest free one."""
        with self._lock:
            if owner in self._owners:
                return self._owners[owner]
            used = set(self._owners.values()) | self.reserved
            for ip in self.cidr.hosts():
                if ip not in used:
                    self._owners[owner] = ip
                    self._save()
                    return ip
        raise IPAMExhausted(f"no free address left in {self.cidr}")

    def release(self, owner: str) -> None:
        with self._lock:
            if self._owners.pop(owner, None) is not None:
                self._save()

    def allocated(self) -> dict[str, ipaddress.IPv4Address]:
        with self._lock:
            return dict(self._owners)

    def _save(self) -> None:
        if not self.state_file:
            return
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({k: str(v) for k, v in self._owners.items()}, f)
        os.replace(tmp, self.state_file)
