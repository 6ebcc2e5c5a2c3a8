"""Kubernetes mode, assembled: the Kubernetes source into the store, the CiliumNode
registration (and the pod CIDR it gives), the control plane on CiliumIdentity-backed
identities, the CiliumEndpoint writer, the policy status writer and the cluster's
addresses in the ipcache. The daemon builds one `KubernetesMode` instead of the manifests
source; the k8s test tier builds it over the in-memory backend.

Start order, and why:

1. the source lists everything once (waited for, up to `sync_timeout`): a control plane
   that started on a half-filled store would remove endpoints and entries only to put them
   back a moment later;
2. the CiliumNode is registered and the pod CIDR taken from it (waiting for the operator
   when none was given): IPAM and the router address need it;
3. the control plane and its writers subscribe to the store (the ipcache claims of remote
   endpoints are in before the control plane's first pass prunes the ipcache), then start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

from cilium_py.agent.controller import ControlPlane, ControlPlaneConfig
from cilium_py.agent.k8s.endpoints import EndpointPublisher
from cilium_py.agent.k8s.identities import CRDIdentityAllocator
from cilium_py.agent.k8s.node import NodeRegistration
from cilium_py.agent.k8s.policystatus import PolicyStatusWriter
from cilium_py.agent.k8s.remote import APIServerEndpoints, RemoteEndpoints
from cilium_py.agent.store import Store

log = logging.getLogger(__name__)

SYNC_TIMEOUT = 120.0        # seconds to wait for the first list of every kind
POD_CIDR_TIMEOUT = 300.0    # seconds to wait for the operator's pod CIDR


class KubernetesMode:
    """`control_config`: the control plane's settings except what the CiliumNode gives
    (pod_cidr, router_ip: given ones win); `backend_for(router_ip)` builds its NodeBackend;
    `source_factory(kube, store, node_name)` the source (default: KubernetesSource)."""

    def __init__(self, kube, control_config: ControlPlaneConfig, *, node_name: str,
                 backend_for: Callable, hooks=None, source_factory: Callable | None = None,
                 sync_timeout: float = SYNC_TIMEOUT, pod_cidr_timeout: float = POD_CIDR_TIMEOUT):
        self.kube = kube
        self.node_name = node_name
        self.control_config = control_config
        self._backend_for = backend_for
        self._hooks = hooks
        self._source_factory = source_factory or _kubernetes_source
        self.sync_timeout = sync_timeout
        self.pod_cidr_timeout = pod_cidr_timeout
        self.store = Store()
        self.source = None
        self.registration: NodeRegistration | None = None
        self.identities: CRDIdentityAllocator | None = None
        self.control: ControlPlane | None = None
        self.endpoints: EndpointPublisher | None = None
        self.policy_status: PolicyStatusWriter | None = None
        self.remote: RemoteEndpoints | None = None
        self.apiserver: APIServerEndpoints | None = None

    def start(self) -> ControlPlane:
        cfg = self.control_config
        self.source = self._source_factory(self.kube, self.store, self.node_name)
        self.source.start()
        if not self.source.wait_synced(self.sync_timeout):
            log.warning("kubernetes source: not every kind listed after %.0f s; starting anyway "
                        "(see `ciliumpy status`)", self.sync_timeout)
        self.registration = NodeRegistration(self.kube, self.store, node_name=self.node_name,
                                             node_ips=cfg.node_ips, router_ip=cfg.router_ip,
                                             pod_cidr=cfg.pod_cidr)
        self.registration.register()
        pod_cidr = self.registration.wait_for_pod_cidr(self.pod_cidr_timeout)
        router_ip = self.registration.router_ip
        control_config = dataclasses.replace(cfg, pod_cidr=pod_cidr, router_ip=router_ip,
                                             node_name=self.node_name)
        os.makedirs(cfg.state_dir, exist_ok=True)
        self.identities = CRDIdentityAllocator(
            self.kube, self.store, cidr_state_file=os.path.join(cfg.state_dir, "cidr-identities.json"))
        backend = self._backend_for(router_ip)
        self.control = ControlPlane(control_config, self.store, backend, hooks=self._hooks,
                                    identities=self.identities)
        self.control.source_errors_fn = lambda: self.source.errors
        node_ip = cfg.node_ips[0] if cfg.node_ips else ""
        self.endpoints = EndpointPublisher(self.kube, self.control, node_ip=node_ip)
        self.policy_status = PolicyStatusWriter(self.kube, self.store, self.control, lambda: self.source.errors)
        self.remote = RemoteEndpoints(self.store, backend.ipcache, cfg.node_ips)
        self.apiserver = APIServerEndpoints(self.store, backend.ipcache)
        self.store.wait_idle(30.0)
        self.identities.start()
        self.endpoints.start()
        self.policy_status.start()
        self.registration.start()
        self.control.start()
        return self.control

    def stop(self) -> None:
        for part in (self.source, self.control, self.endpoints, self.policy_status,
                     self.registration, self.identities):
            if part is not None:
                part.stop()

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        self.store.close()

    @property
    def controllers(self) -> dict:
        out = {}
        for name, part in (("ciliumendpoint-sync", self.endpoints), ("policy-status", self.policy_status),
                           ("ciliumnode-registration", self.registration)):
            if part is not None:
                out[name] = part.reconciler.status
        if self.identities is not None:
            out.update(self.identities.controllers)
        return out

    def status(self) -> dict:
        """The "kubernetes" section of `ciliumpy status`."""
        out = dict(self.source.status()) if self.source is not None else {}
        if self.registration is not None:
            out["ciliumnode"] = self.registration.status()
        if self.identities is not None:
            out["identities"] = self.identities.view()
        if self.endpoints is not None:
            out["ciliumendpoints"] = self.endpoints.status()
        if self.policy_status is not None:
            out["policy_status"] = self.policy_status.status()
        if self.remote is not None:
            out["remote_endpoints"] = len(self.remote.addresses())
        if self.apiserver is not None:
            out["kube_apiserver"] = self.apiserver.addresses()
        return out


def _kubernetes_source(kube, store: Store, node_name: str):
    from cilium_py.agent.sources.kubernetes import KubernetesSource

    return KubernetesSource(kube, store, node_name=node_name)


__all__ = ["KubernetesMode"]
