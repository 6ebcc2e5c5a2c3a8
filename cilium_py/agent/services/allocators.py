"""What the service manager hands out: service and backend IDs, and the ClusterIPs and
nodePorts of Services whose manifests give none.

IDs. A service ID (the rev-NAT index, u16) belongs to one frontend (address, port,
protocol); a backend ID (u32) belongs to one backend (address, port, protocol), shared by
every service that uses that backend. An ID is held while anything uses its key and
released only after the map entries carrying it are deleted. Released IDs are not handed
out again until the counter has gone round the whole range: conntrack and affinity
entries name backends by ID, and an ID reused right away could send such a connection to
a different backend. IDs of entries found in the pinned maps at startup are restored
first, so a restarted agent keeps every ID.

ClusterIPs and nodePorts. Kept across changes of the Service; a new one starts at a hash
of the Service's name and probes from there, so that agents that see the same Services
agree (with a cluster's API server this never runs: it fills them in). What is taken is
read from the manager's claims (claim -> owner), which the allocators never change: the
plan that uses an address claims it.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Hashable, Mapping

from cilium_py.agent.errors import ValidationError
from cilium_py.agent.objects import Service, ServicePort
from cilium_py.agent.services.parse import ServiceValidationError
from cilium_py.agent.services.plan import Owner, describe

SERVICE_ID_RANGE = (1, 0xFFFF)
BACKEND_ID_RANGE = (1, 0xFFFFFFFF)


class IDExhausted(RuntimeError):
    """Every ID of the range is in use."""


class IDAllocator:
    def __init__(self, what: str, first: int, last: int):
        self.what = what
        self.first, self.last = first, last
        self._next = first
        self._by_key: dict[Hashable, int] = {}
        self._by_id: dict[int, Hashable] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: Hashable) -> int | None:
        return self._by_key.get(key)

    def key_of(self, id_: int) -> Hashable | None:
        return self._by_id.get(id_)

    def acquire(self, key: Hashable) -> int:
        """The key's ID, allocating the next free one for a new key."""
        found = self._by_key.get(key)
        if found is not None:
            return found
        if len(self._by_id) > self.last - self.first:
            raise IDExhausted(f"all {self.last - self.first + 1} {self.what} IDs are in use")
        id_ = self._next
        while id_ in self._by_id:
            id_ = id_ + 1 if id_ < self.last else self.first
        self._next = id_ + 1 if id_ < self.last else self.first
        self._by_key[key] = id_
        self._by_id[id_] = key
        return id_

    def restore(self, key: Hashable, id_: int) -> bool:
        """Takes over an ID found in the maps; False when the ID or the key is taken
        already (a conflicting leftover, which the caller then removes)."""
        if not self.first <= id_ <= self.last or id_ in self._by_id or key in self._by_key:
            return False
        self._by_key[key] = id_
        self._by_id[id_] = key
        # New IDs continue after the highest restored one, not in the gaps before it.
        if id_ >= self._next:
            self._next = id_ + 1 if id_ < self.last else self.first
        return True

    def release(self, key: Hashable) -> int | None:
        id_ = self._by_key.pop(key, None)
        if id_ is not None:
            del self._by_id[id_]
        return id_

    def items(self):
        return self._by_key.items()


class ClusterIPAllocator:
    """ClusterIPs from the service CIDR, for Services that give none."""

    def __init__(self, service_cidr: str, claims: Mapping[tuple, Owner]):
        self.service_cidr = service_cidr
        self._net = ipaddress.IPv4Network(service_cidr)
        self._claims = claims

    def allocate(self, owner: Owner, previous: str, source: str) -> str:
        if previous and self._claims.get(("ip", previous)) == owner:
            return previous
        size = max(1, self._net.num_addresses - 2)
        start = zlib.crc32(f"{owner[1]}/{owner[2]}".encode()) % size
        base = int(self._net.network_address) + 1
        for i in range(min(size, 65536)):
            ip = str(ipaddress.IPv4Address(base + (start + i) % size))
            if ("ip", ip) not in self._claims:
                return ip
        raise ServiceValidationError([ValidationError(
            source, describe(owner), "spec.clusterIP",
            f"no free address found in {self.service_cidr}; set spec.clusterIP")])


class NodePortAllocator:
    """nodePorts from the node port range, for NodePort and LoadBalancer ports that give
    none. `taken`: the ports this Service uses already (given, or allocated to its
    earlier ports)."""

    def __init__(self, node_port_range: tuple[int, int], claims: Mapping[tuple, Owner]):
        self.low, self.high = node_port_range
        self._claims = claims

    def allocate(self, owner: Owner, spec: Service, port: ServicePort, previous: int | None,
                 taken: set[int]) -> int:
        lo, hi = self.low, self.high
        if previous and lo <= previous <= hi and previous not in taken and \
                self._claims.get(("nodeport", previous, port.protocol), owner) == owner:
            return previous
        size = hi - lo + 1
        start = zlib.crc32(f"{spec.namespace}/{spec.name}/{port.name}/{port.protocol}".encode()) % size
        for i in range(size):
            candidate = lo + (start + i) % size
            if candidate not in taken and ("nodeport", candidate, port.protocol) not in self._claims:
                return candidate
        raise ServiceValidationError([ValidationError(
            spec.source, spec.describe(), f"{port.path}.nodePort",
            f"no free nodePort left in {lo}-{hi}")])

