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

import dataclasses
import errno
import ipaddress
from dataclasses import dataclass

from cilium_py.agent.endpoints import EndpointHandle, EndpointManager
from cilium_py.agent.ipcache import SOURCE_LOCAL, IPCache, prefix_of
from cilium_py.datapath.maps.endpoints import (
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    Endpoint,
)
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
    """IP -> endpoint, with EndpointMap's methods and flags."""

    def __init__(self):
        self.data: dict[ipaddress.IPv4Address, Endpoint] = {}

    def upsert(self, ip, *, endpoint_id: int, ifindex: int, identity: int,
               mac: str = "00:00:00:00:00:00", node_mac: str = "00:00:00:00:00:00",
               flags: int = 0) -> None:
        ip = ipaddress.IPv4Address(ip)
        self.data[ip] = Endpoint(ip, endpoint_id, ifindex, identity, mac, node_mac, flags)

    def get(self, ip) -> Endpoint | None:
        return self.data.get(ipaddress.IPv4Address(ip))

    def remove(self, ip) -> bool:
        return self.data.pop(ipaddress.IPv4Address(ip), None) is not None

    def set_policy_enforcement(self, ip, *, ingress: bool, egress: bool) -> None:
        ep = self.get(ip)
        if ep is None:
            raise KeyError(f"no endpoint with IP {ip}")
        flags = ep.flags & ~(ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS)
        flags |= (ENDPOINT_F_POLICY_INGRESS if ingress else 0) | (ENDPOINT_F_POLICY_EGRESS if egress else 0)
        self.data[ep.ip] = dataclasses.replace(ep, flags=flags)


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


class MapEndpoints:
    """Endpoints as map entries only, no namespaces or devices: over the in-memory maps in
    unit tests, or over the pinned maps with every endpoint on one device (`ifindex`), as
    BPF_PROG_TEST_RUN runs programs on loopback."""

    def __init__(self, endpoint_map, ipcache: IPCache, policy_map, ifindex: int = 0):
        self.endpoint_map = endpoint_map
        self.ipcache = ipcache
        self.policy_map = policy_map
        self.ifindex = ifindex
        self.handles: dict[str, EndpointHandle] = {}

    def _allocate_id(self) -> int:
        used = {h.endpoint_id for h in self.handles.values()}
        return next(i for i in range(1, 65536) if i not in used)

    def create(self, name: str, ip, identity: int, *, closed: bool = False) -> EndpointHandle:
        ip = ipaddress.IPv4Address(ip)
        endpoint_id = self._allocate_id()
        flags = (ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS) if closed else 0
        self.endpoint_map.upsert(ip, endpoint_id=endpoint_id, ifindex=self.ifindex,
                                 identity=identity, flags=flags)
        self.ipcache.upsert(ip, identity, SOURCE_LOCAL)
        handle = EndpointHandle(name, endpoint_id, ip, identity, f"map-{name}", f"lxc{endpoint_id}",
                           self.ifindex)
        self.handles[name] = handle
        return handle

    def adopt(self, name: str, ip, identity: int):
        return None  # nothing of it survives a restart

    def set_identity(self, ip, identity: int) -> None:
        ep = self.endpoint_map.get(ip)
        self.endpoint_map.upsert(ip, endpoint_id=ep.endpoint_id, ifindex=ep.ifindex,
                                 identity=identity, flags=ep.flags)
        self.ipcache.upsert(ip, identity, SOURCE_LOCAL)

    def delete(self, name: str) -> int | None:
        handle = self.handles.pop(name, None)
        if handle is None:
            return None
        self.endpoint_map.remove(handle.ip)
        self.ipcache.remove(handle.ip, SOURCE_LOCAL)
        for key in self.policy_map.entries(handle.endpoint_id):
            self.policy_map.remove(key)
        return handle.endpoint_id

    def close(self) -> None:
        pass


def memory_backend(policy_map_max_entries: int = 65536) -> NodeBackend:
    policy_map = MemoryPolicyMap(policy_map_max_entries)
    endpoint_map = MemoryEndpointMap()
    ipcache = IPCache(MemoryIPCacheMap())
    return NodeBackend(MapEndpoints(endpoint_map, ipcache, policy_map), policy_map,
                       endpoint_map, ipcache)


def pinned_maps_backend(pin_dir: str, ifindex: int) -> NodeBackend:
    """The pinned maps of a loaded datapath with map-only endpoints on `ifindex`."""
    from cilium_py.datapath.maps.endpoints import EndpointMap
    from cilium_py.datapath.maps.ipcache import IPCacheMap
    from cilium_py.datapath.maps.policy import PolicyMap

    policy_map, endpoint_map = PolicyMap.shared(pin_dir), EndpointMap.shared(pin_dir)
    ipcache = IPCache(IPCacheMap.shared(pin_dir))
    endpoints = MapEndpoints(endpoint_map, ipcache, policy_map, ifindex)

    def close():
        for m in (policy_map, endpoint_map, ipcache.map):
            m.close()

    endpoints.close = close
    return NodeBackend(endpoints, policy_map, endpoint_map, ipcache)
