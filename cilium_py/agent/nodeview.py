"""The agent's answer to Hubble's NodeView (cilium_py/hubble/nodeview.py): this node's
endpoints, identities and policies from the control plane, Service frontends from the
service manager, and address identities from the pinned ipcache.

The daemon builds one `AgentNodeView` from the parts it runs and hands it to Hubble. Each
part is optional: a datapath-only agent (no manifests source) has neither a control plane
nor a service manager, and its flows are named by the ipcache and reserved identities only.
"""

from __future__ import annotations

from collections.abc import Callable

from cilium_py.agent.labels import format_labels
from cilium_py.datapath.maps.ipcache import IPCacheMap
from cilium_py.hubble.nodeview import EndpointInfo, PolicyRef, ServiceRef, reserved_identity_labels


class AgentNodeView:
    """`control` is the ControlPlane (or anything with its generation, local_endpoints,
    identity_labels and policy_by_cookie), `services` the ServiceManager (generation,
    frontend_service), `ipcache_identity` a function from an address to the identity the
    datapath gives it."""

    def __init__(self, ipcache_identity: Callable[[str], int | None], control=None,
                 services=None, close: Callable[[], None] = lambda: None):
        self._ipcache_identity = ipcache_identity
        self._control = control
        self._services = services
        self._close = close
        self._by_ip: dict[str, EndpointInfo] = {}
        self._indexed_generation = None

    @classmethod
    def over_pinned_ipcache(cls, pin_dir: str, control=None, services=None) -> AgentNodeView:
        """The view the daemon uses: identities read from the node's pinned ipcache through
        the process's shared handle (released by close())."""
        ipcache = IPCacheMap.shared(pin_dir)
        return cls(ipcache.get, control, services, close=ipcache.close)

    @property
    def generation(self):
        return (self._control.generation if self._control is not None else 0,
                self._services.generation if self._services is not None else 0)

    def _index(self) -> None:
        # Rebuilt once per generation: every flow asks for two endpoints by address.
        generation = self.generation
        if generation == self._indexed_generation:
            return
        by_ip = {}
        for ep in self._control.local_endpoints():
            namespace, _, pod = ep.pod_key.partition("/")
            by_ip[str(ep.handle.ip)] = EndpointInfo(
                id=ep.handle.endpoint_id, identity=ep.identity, namespace=namespace,
                pod_name=pod, labels=tuple(format_labels(ep.labels)))
        self._by_ip, self._indexed_generation = by_ip, generation

    def endpoint_by_ip(self, ip: str) -> EndpointInfo | None:
        if self._control is None:
            return None
        self._index()
        return self._by_ip.get(ip)

    def identity_by_ip(self, ip: str) -> int:
        try:
            return self._ipcache_identity(ip) or 0
        except (OSError, ValueError):  # an unreadable map or a malformed address: unknown
            return 0

    def identity_labels(self, identity: int) -> tuple[str, ...]:
        reserved = reserved_identity_labels(identity)
        if reserved or self._control is None:
            return reserved
        labels = self._control.identity_labels(identity)
        return tuple(format_labels(labels)) if labels else ()

    def policy_by_cookie(self, cookie: int) -> PolicyRef | None:
        if self._control is None:
            return None
        key = self._control.policy_by_cookie(cookie)
        if not key:
            return None
        kind, namespace, name = key
        return PolicyRef(name=name, namespace=namespace or "", kind=kind)

    def service_by_frontend(self, ip: str, port: int, protocol: int) -> ServiceRef | None:
        if self._services is None:
            return None
        found = self._services.frontend_service(ip, port, protocol)
        return ServiceRef(*found) if found else None

    def close(self) -> None:
        self._close()
