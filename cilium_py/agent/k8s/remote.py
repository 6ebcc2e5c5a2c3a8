"""Addresses this node learns from the cluster, into the ipcache (agent/ipcache.py):

* **Other nodes' pods**, from their CiliumEndpoints: each IPv4 address -> the endpoint's
  identity, under the `custom-resource` source (below this node's own endpoints and
  addresses, above what policies generate). CiliumEndpoints whose node address is one of
  this node's are skipped: this node's pods are claimed by its endpoint manager, with more
  authority. An endpoint without an identity or a node yet is not claimed; when the
  CiliumEndpoint goes, so do its addresses. Two CiliumEndpoints naming one address (a pod
  moved, the old object not collected yet): the newest claim holds, the other takes over
  when it goes.
* **The API server's own endpoints**, from the EndpointSlices of the `default/kubernetes`
  Service: each address -> the reserved `kube-apiserver` identity (7) under the `k8s`
  source, so that rules with `toEntities: [kube-apiserver]` (resolved to identity 7 in
  agent/policy/resolve.py) match its traffic. An API server running on this node's own
  address stays `host` (the local source wins), as Cilium's host identity does.

Both are store subscribers: what the Kubernetes source lists and watches arrives as
upserts and deletes of the typed objects (agent/objects/cilium.py, service.py).
"""

from __future__ import annotations

import ipaddress
import logging
import threading

from cilium_py.agent.ipcache import SOURCE_CUSTOM_RESOURCE, SOURCE_KUBERNETES
from cilium_py.vocab import IDENTITY_KUBE_APISERVER

log = logging.getLogger(__name__)

API_SERVER_SERVICE = ("default", "kubernetes")


def _ipv4(addresses) -> set[str]:
    out = set()
    for a in addresses:
        try:
            if ipaddress.ip_address(a).version == 4:
                out.add(str(a))
        except ValueError:
            continue
    return out


class _Claims:
    """Who claims which address under one ipcache source: the latest claim holds, earlier
    ones come back when it is withdrawn."""

    def __init__(self, ipcache, source: str):
        self.ipcache, self.source = ipcache, source
        self._lock = threading.Lock()
        self._by_owner: dict[object, tuple[set[str], int]] = {}
        self._by_ip: dict[str, dict[object, int]] = {}   # insertion order = claim order

    def set(self, owner, ips: set[str], identity: int | None) -> None:
        with self._lock:
            old_ips, old_identity = self._by_owner.pop(owner, (set(), None))
            new_ips = ips if identity is not None else set()
            for ip in old_ips - new_ips:
                self._withdraw(owner, ip)
            for ip in new_ips:
                claims = self._by_ip.setdefault(ip, {})
                if owner in claims and claims[owner] == identity:
                    continue
                claims.pop(owner, None)
                claims[owner] = identity
                self.ipcache.upsert(ip, identity, self.source)
            if new_ips:
                self._by_owner[owner] = (set(new_ips), identity)

    def _withdraw(self, owner, ip: str) -> None:
        claims = self._by_ip.get(ip, {})
        was_latest = bool(claims) and next(reversed(claims)) == owner
        claims.pop(owner, None)
        if not claims:
            self._by_ip.pop(ip, None)
            self.ipcache.remove(ip, self.source)
        elif was_latest:
            self.ipcache.upsert(ip, claims[next(reversed(claims))], self.source)

    def addresses(self) -> dict[str, int]:
        with self._lock:
            return {ip: claims[next(reversed(claims))] for ip, claims in sorted(self._by_ip.items())}


class RemoteEndpoints:
    """Other nodes' CiliumEndpoints -> the ipcache. `local_node_ips`: this node's addresses
    (CiliumEndpoints placed there are this node's own)."""

    def __init__(self, store, ipcache, local_node_ips=()):
        self.local_node_ips = set(local_node_ips)
        self._claims = _Claims(ipcache, SOURCE_CUSTOM_RESOURCE)
        store.subscribe(self._on_change)

    def _on_change(self, event: str, old, new) -> None:
        res = new or old
        if res.kind != "CiliumEndpoint":
            return
        owner = res.key
        if new is None or new.node_ip is None or new.node_ip in self.local_node_ips:
            self._claims.set(owner, set(), None)
            return
        self._claims.set(owner, _ipv4(new.ipv4), new.identity)

    def addresses(self) -> dict[str, int]:
        """IP -> identity, as claimed (for status and tests)."""
        return self._claims.addresses()


class APIServerEndpoints:
    """The addresses of default/kubernetes's EndpointSlices -> reserved:kube-apiserver."""

    def __init__(self, store, ipcache):
        self._claims = _Claims(ipcache, SOURCE_KUBERNETES)
        store.subscribe(self._on_change)

    def _on_change(self, event: str, old, new) -> None:
        res = new or old
        if res.kind != "EndpointSlice":
            return
        if new is None or (new.namespace, new.service) != API_SERVER_SERVICE:
            self._claims.set(res.key, set(), None)   # gone, or (relabelled) no longer its slice
        else:
            self._claims.set(res.key, _ipv4(e.address for e in new.endpoints), IDENTITY_KUBE_APISERVER)

    def addresses(self) -> list[str]:
        return sorted(self._claims.addresses())


__all__ = ["APIServerEndpoints", "RemoteEndpoints"]
