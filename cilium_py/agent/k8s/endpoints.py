"""One CiliumEndpoint per local pod: how this node tells the cluster which identity a pod's
address carries (other nodes' ipcaches are built from these, agent/k8s/remote.py), and how
a user sees the endpoint's state with `kubectl get cep`.

The object has the pod's namespace and name and an ownerReference to the Pod (uid
included), so the garbage collector deletes it when the pod goes even while no agent runs.
Its whole payload is `status` (the CRD has no status subresource, as in Cilium), built
from the control plane's endpoint: `id`, `identity {id, labels}`, `networking
{addressing [{ipv4}], node}` (the node's InternalIP), `state` (ready, not-ready),
`policy {ingress, egress: {enforcing, state}}`, `named-ports`, `external-identifiers` and
`service-account`.

After every pass of the control plane the desired document of every local endpoint is
compared with the one of the pass before; only those that differ are marked, and a write
happens only when the document differs from the last one written. Writes run on their own
reconcile loop (agent/reconcile.py), one key per pod: a failed write is retried after its
key's backoff while the other pods' writes go on. Requests use the verbs Cilium's agent
has on CiliumEndpoints: create, patch (a JSON patch of metadata.ownerReferences and
status), delete.

A CiliumEndpoint of a local pod that disappears (the GC, after the pod was re-created
under the same name, or a user) is written again.
"""

from __future__ import annotations

import logging
import threading

from cilium_py.agent.labels import format_labels
from cilium_py.agent.reconcile import Reconciler
from cilium_py.k8s.client import JSON_PATCH, ApiError
from cilium_py.vocab import protocol_name

log = logging.getLogger(__name__)

KIND = "CiliumEndpoint"
PODS = "pods"


def _enforcement(enforcing: bool) -> dict:
    return {"enforcing": enforcing, "state": "enforcing" if enforcing else "non-enforcing"}


def endpoint_status(ep, node_ip: str, service_account: str = "") -> dict:
    """The CiliumEndpoint status of a control-plane endpoint (controller.LocalEndpoint)."""
    namespace, _, name = ep.pod_key.partition("/")
    networking: dict = {"addressing": [{"ipv4": str(ep.handle.ip)}]}
    if node_ip:
        networking["node"] = node_ip
    status = {
        "id": ep.handle.endpoint_id,
        "identity": {"id": ep.identity, "labels": format_labels(ep.labels)},
        "networking": networking,
        "state": ep.state,
        "policy": {"ingress": _enforcement(ep.ingress_enforced), "egress": _enforcement(ep.egress_enforced)},
        "external-identifiers": {"k8s-namespace": namespace, "k8s-pod-name": name, "pod-name": ep.pod_key},
    }
    ports = [{"name": n, "port": port, "protocol": protocol_name(proto)}
             for n, (port, proto) in sorted(ep.named_ports.items())]
    if ports:
        status["named-ports"] = ports
    if service_account:
        status["service-account"] = service_account
    return status


def owner_references(pod_name: str, pod_uid: str) -> list[dict]:
    if not pod_uid:
        return []
    return [{"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid,
             "blockOwnerDeletion": False}]


class EndpointPublisher:
    """Keeps a CiliumEndpoint per endpoint of `control` (a ControlPlane). `kube` is a
    cilium_py.k8s.client.Kube; `node_ip` goes into status.networking.node."""

    def __init__(self, kube, control, *, node_ip: str):
        self.kube = kube
        self.control = control
        self.store = control.store
        self.node_ip = node_ip
        self._lock = threading.Lock()
        self._desired: dict[str, dict] = {}   # pod key -> {"owners": [...], "status": {...}}
        self._written: dict[str, dict] = {}   # pod key -> what the API server holds (as we wrote it)
        self.errors: dict[str, str] = {}      # pod key -> the last failed write
        self.writes = 0
        self.reconciler = Reconciler("ciliumendpoint-sync", self._sync, (PODS,))
        control.endpoint_listeners.append(self.endpoints_changed)
        self.store.subscribe(self._on_change, replay=False)

    def start(self) -> None:
        self.reconciler.start()

    def stop(self) -> None:
        self.reconciler.stop()

    # -- what changed -------------------------------------------------------------------

    def endpoints_changed(self, _keys=()) -> None:
        """Called by the control plane after each pass (with its lock held): marks the pods
        whose document differs from the pass before."""
        current = {}
        for key, ep in list(self.control.endpoints.items()):
            namespace, _, name = key.partition("/")
            pod = self.store.get(("Pod", namespace, name))
            current[key] = {"owners": owner_references(name, pod.uid if pod is not None else ""),
                            "status": endpoint_status(ep, self.node_ip,
                                                      pod.service_account if pod is not None else "")}
        with self._lock:
            changed = {k for k in set(self._desired) | set(current) if self._desired.get(k) != current.get(k)}
            self._desired = current
        if changed:
            self.reconciler.mark(PODS, *changed)

    def _on_change(self, event: str, old, new) -> None:
        res = new or old
        if res.kind != KIND or new is not None:
            return
        key = f"{res.namespace}/{res.name}"
        with self._lock:
            ours = key in self._desired
            self._written.pop(key, None)
        if ours:
            log.info("CiliumEndpoint %s was deleted while its pod is on this node; writing it again", key)
            self.reconciler.mark(PODS, key)

    # -- writing ------------------------------------------------------------------------

    def _sync(self, dirty: dict, revision: int) -> None:
        for key in sorted(dirty[PODS]):
            with self._lock:
                desired = self._desired.get(key)
                written = self._written.get(key)
            if desired == written:
                continue
            try:
                if desired is None:
                    self._delete(key)
                else:
                    self._write(key, desired, exists=written is not None)
            except ApiError as e:
                self.errors[key] = str(e)
                delay = self.reconciler.requeue(PODS, key)
                log.warning("CiliumEndpoint %s: %s (retrying in %.1fs)", key, e, delay)
                continue
            self.errors.pop(key, None)
            self.reconciler.succeeded(PODS, key)

    def _write(self, key: str, desired: dict, exists: bool) -> None:
        namespace, _, name = key.partition("/")
        if not exists:
            body = {"apiVersion": "cilium.io/v2", "kind": KIND,
                    "metadata": {"name": name, "namespace": namespace},
                    "status": desired["status"]}
            if desired["owners"]:
                body["metadata"]["ownerReferences"] = desired["owners"]
            try:
                self.kube.create(KIND, body)
                self._wrote(key, desired)
                return
            except ApiError as e:
                if not e.conflict:
                    raise
            # Left by an earlier run of the agent: brought up to date below.
        patch = [{"op": "add", "path": "/metadata/ownerReferences", "value": desired["owners"]},
                 {"op": "add", "path": "/status", "value": desired["status"]}]
        try:
            self.kube.patch(KIND, name, patch, namespace, content_type=JSON_PATCH)
        except ApiError as e:
            if not e.not_found:
                raise
            # Deleted since (by the GC or a user): created again on the next attempt.
            with self._lock:
                self._written.pop(key, None)
            raise
        self._wrote(key, desired)

    def _delete(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        self.kube.delete(KIND, name, namespace, missing_ok=True)
        with self._lock:
            self._written.pop(key, None)
        self.writes += 1

    def _wrote(self, key: str, desired: dict) -> None:
        with self._lock:
            self._written[key] = desired
        self.writes += 1

    def status(self) -> dict:
        with self._lock:
            desired, written = len(self._desired), sum(
                1 for k, d in self._desired.items() if self._written.get(k) == d)
        return {"endpoints": desired, "in_sync": written, "writes": self.writes,
                "errors": dict(sorted(self.errors.items()))}


__all__ = ["EndpointPublisher", "endpoint_status", "owner_references"]
