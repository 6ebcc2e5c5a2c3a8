"""The one writer of `ciliumpy_ipcache` in an agent: IP/CIDR -> identity, by source.

Several parts of the agent know something about an address: the endpoint manager (a pod
on this node), the daemon (the node's own addresses), the policy controller (CIDR
prefixes that rules name), later the Kubernetes source (remote pods). Each says what it
knows under its source; the map holds, per prefix, the identity of the source with the
highest precedence, as Cilium's ipcache does. So a CIDR rule naming a pod's own /32 never
overwrites the pod's identity, and when one source withdraws a prefix the next one's
identity comes back instead of the entry disappearing.
"""

from __future__ import annotations

import ipaddress
import threading

# Highest first, after Cilium's source precedence (local > kvstore/CRD > k8s > generated).
SOURCE_LOCAL = "local"                 # endpoints on this node and the node's own addresses
SOURCE_CUSTOM_RESOURCE = "custom-resource"  # CiliumEndpoints of other nodes
SOURCE_KUBERNETES = "k8s"
SOURCE_GENERATED = "generated"         # CIDR identities that policies need
PRECEDENCE = (SOURCE_LOCAL, SOURCE_CUSTOM_RESOURCE, SOURCE_KUBERNETES, SOURCE_GENERATED)
_RANK = {source: rank for rank, source in enumerate(PRECEDENCE)}

Prefix = ipaddress.IPv4Network


def prefix_of(cidr) -> Prefix:
    """An address is its /32; a prefix is normalized to its network address."""
    return ipaddress.IPv4Network(cidr, strict=False)


class IPCache:
    """`ipcache_map` needs upsert(prefix, identity), remove(prefix) and get(prefix): the
    pinned map (cilium_py.datapath.maps.ipcache.IPCacheMap) or an in-memory one."""

    def __init__(self, ipcache_map):
        self.map = ipcache_map
        self._lock = threading.Lock()
        self._by_prefix: dict[Prefix, dict[str, int]] = {}

    def upsert(self, cidr, identity: int, source: str) -> None:
        prefix = prefix_of(cidr)
        with self._lock:
            sources = self._by_prefix.setdefault(prefix, {})
            before = self._winner(sources)
            sources[source] = identity
            after = self._winner(sources)
            # Written even when unchanged in memory: the map may hold a leftover value from
            # an earlier agent for this prefix.
            if after != before or before is None:
                self.map.upsert(prefix, after)

    def remove(self, cidr, source: str) -> None:
        """Withdraws `source`'s claim; the next source's identity takes over, or the entry
        goes when none is left. A prefix nobody claimed in this process is a leftover of
        an earlier agent: it is removed from the map."""
        prefix = prefix_of(cidr)
        with self._lock:
            sources = self._by_prefix.get(prefix)
            if sources is None:
                self.map.remove(prefix)
                return
            before = self._winner(sources)
            sources.pop(source, None)
            after = self._winner(sources)
            if after is None:
                del self._by_prefix[prefix]
                self.map.remove(prefix)
            elif after != before:
                self.map.upsert(prefix, after)

    def identity(self, cidr) -> int | None:
        """The identity the map holds (or will hold) for exactly this prefix."""
        with self._lock:
            return self._winner(self._by_prefix.get(prefix_of(cidr), {}))

    def desired(self) -> dict[Prefix, int]:
        """What the map should hold: every claimed prefix and its winning identity."""
        with self._lock:
            return {p: self._winner(s) for p, s in self._by_prefix.items()}

    def prune(self) -> int:
        """Removes the map entries no source claims: what an earlier agent wrote for pods
        or policies that went away while no agent ran. Called once the control plane has
        claimed everything it knows (after its first full pass)."""
        removed = 0
        with self._lock:
            for prefix in self.map.prefixes():
                if prefix not in self._by_prefix:
                    self.map.remove(prefix)
                    removed += 1
        return removed

    @staticmethod
    def _winner(sources: dict[str, int]) -> int | None:
        if not sources:
            return None
        return sources[min(sources, key=lambda s: _RANK.get(s, len(PRECEDENCE)))]
