"""What the control plane drives on a node, behind one small interface, and an in-memory
implementation of it.

`NodeBackend` bundles the endpoint lifecycle (create, adopt, delete, change identity) and
the three maps the policy controller writes (policy entries, the endpoint map's
enforcement flags, the ipcache through its owner). The agent builds it over the kernel
(`kernel_backend`: veths, namespaces and pinned maps); tests build `memory_backend()`, so
regeneration, fail-closed handling and incremental-vs-fresh equality are tested without
root.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass

from cilium_py.agent.ipcache import SOURCE_LOCAL, IPCache, prefix_of
from cilium_py.datapath.maps.endpoints import ENDPOINT_F_POLICY_EGRESS, ENDPOINT_F_POLICY_INGRESS
from cilium_py.datapath.maps.policy import PolicyMapKey, PolicyMapValue


@dataclass
class NodeBackend:
    endpoints: object     # create/adopt/delete/set_identity/close, as EndpointManager
    policy_map: object    # put/remove/entries/max_entries, as PolicyMap
    endpoint_map: object  # set_policy_enforcement, as EndpointMap
    ipcache: IPCache

    def close(self) -> None:
        self.endpoints.close()


def kernel_backend(datapath_config, node_netns: str, router_ip, ipcache: IPCache | None = None
                   ) -> NodeBackend:
    from cilium_py.agent.endpoints import EndpointManager

    manager = EndpointManager(datapath_config, node_netns, router_ip, ipcache=ipcache)
    return NodeBackend(manager, manager.policy, manager.endpoints, manager.ipcache)


# -- in memory ----------------------------------------------------------------------------


class MemoryPolicyMap:
    """A policy map with the kernel's capacity rule: an insert into a full map fails with
    ENOSPC."""

    def __init__(self, max_entries: int = 65536):
        self.max_entries = max_entries
        self.data: dict[PolicyMapKey, PolicyMapValue] = {}
        self.fail_puts = 0  # tests: make the next N puts fail as a kernel error would

    def put(self, key: PolicyMapKey, *, deny: bool, cookie: int = 0) -> None:
        if self.fail_puts:
            self.fail_puts -= 1
            raise OSError(errno.EIO, "map update: injected failure")
        if key not in self.data and len(self.data) >= self.max_entries:
            raise OSError(errno.ENOSPC, "map update: No space left on device")
        self.data[key] = PolicyMapValue(deny, cookie)

    def remove(self, key: PolicyMapKey) -> bool:
        return self.data.pop(key, None) is not None

    def entries(self, endpoint_id: int | None = None) -> dict[PolicyMapKey, PolicyMapValue]:
        return dict(sorted((k, v) for k, v in self.data.items()
                           if endpoint_id is None or k.endpoint_id == endpoint_id))


class MemoryEndpointMap:
    """IP -> (endpoint id, identity, flags)."""

    def __init__(self):
        self.data: dict[ipaddress.IPv4Address, list] = {}

    def upsert(self, ip, *, endpoint_id: int, identity: int, flags: int = 0) -> None:
        self.data[ipaddress.IPv4Address(ip)] = [endpoint_id, identity, flags]

    def remove(self, ip) -> bool:
        return self.data.pop(ipaddress.IPv4Address(ip), None) is not None

    def set_policy_enforcement(self, ip, *, ingress: bool, egress: bool) -> None:
        entry = self.data.get(ipaddress.IPv4Address(ip))
        if entry is None:
            raise KeyError(f"no endpoint with IP {ip}")
        flags = entry[2] & ~(ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS)
        entry[2] = flags | (ENDPOINT_F_POLICY_INGRESS if ingress else 0) \
            | (ENDPOINT_F_POLICY_EGRESS if egress else 0)

    def enforcement(self, ip) -> tuple[bool, bool]:
        flags = self.data[ipaddress.IPv4Address(ip)][2]
        return bool(flags & ENDPOINT_F_POLICY_INGRESS), bool(flags & ENDPOINT_F_POLICY_EGRESS)


class MemoryIPCacheMap:
    def __init__(self):
        self.data: dict[ipaddress.IPv4Network, int] = {}

    def upsert(self, cidr, identity: int) -> None:
        self.data[prefix_of(cidr)] = identity

    def remove(self, cidr) -> bool:
        return self.data.pop(prefix_of(cidr), None) is not None

    def get(self, cidr) -> int | None:
        return self.data.get(prefix_of(cidr))

    def prefixes(self) -> list[ipaddress.IPv4Network]:
        return sorted(self.data, key=lambda p: (int(p.network_address), p.prefixlen))


@dataclass(frozen=True)
class MemoryHandle:
    """Mirrors EndpointHandle's fields that the control plane reads."""

    name: str
    endpoint_id: int
    ip: ipaddress.IPv4Address
    identity: int
    netns: str
    host_ifname: str
    ifindex: int


class MemoryEndpoints:
    """Endpoints as map entries only: IDs, the endpoint map and the ipcache, no devices."""

    def __init__(self, endpoint_map: MemoryEndpointMap, ipcache: IPCache, policy_map: MemoryPolicyMap):
        self.endpoint_map = endpoint_map
        self.ipcache = ipcache
        self.policy_map = policy_map
        self.handles: dict[str, MemoryHandle] = {}
        self.fail_create: set[str] = set()  # tests: names whose creation fails

    def _allocate_id(self) -> int:
        used = {h.endpoint_id for h in self.handles.values()}
        return next(i for i in range(1, 65536) if i not in used)

    def create(self, name: str, ip, identity: int, *, closed: bool = False) -> MemoryHandle:
        if name in self.fail_create:
            raise RuntimeError(f"endpoint {name}: injected failure")
        ip = ipaddress.IPv4Address(ip)
        endpoint_id = self._allocate_id()
        flags = (ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS) if closed else 0
        self.endpoint_map.upsert(ip, endpoint_id=endpoint_id, identity=identity, flags=flags)
        self.ipcache.upsert(ip, identity, SOURCE_LOCAL)
        handle = MemoryHandle(name, endpoint_id, ip, identity, f"mem-{name}", f"lxc{endpoint_id}",
                              1000 + endpoint_id)
        self.handles[name] = handle
        return handle

    def adopt(self, name: str, ip, identity: int):
        return None  # nothing survives a restart in memory

    def set_identity(self, ip, identity: int) -> None:
        entry = self.endpoint_map.data[ipaddress.IPv4Address(ip)]
        entry[1] = identity
        self.ipcache.upsert(ip, identity, SOURCE_LOCAL)

    def delete(self, name: str) -> int | None:
        handle = self.handles.pop(name, None)
        if handle is None:
            return None
        self.endpoint_map.remove(handle.ip)
        self.ipcache.remove(handle.ip, SOURCE_LOCAL)
        for key in [k for k in self.policy_map.data if k.endpoint_id == handle.endpoint_id]:
            del self.policy_map.data[key]
        return handle.endpoint_id

    def close(self) -> None:
        pass


def memory_backend(policy_map_max_entries: int = 65536) -> NodeBackend:
    policy_map = MemoryPolicyMap(policy_map_max_entries)
    endpoint_map = MemoryEndpointMap()
    ipcache = IPCache(MemoryIPCacheMap())
    return NodeBackend(MemoryEndpoints(endpoint_map, ipcache, policy_map), policy_map,
                       endpoint_map, ipcache)
