"""This node's CiliumNode: the agent registers itself, and takes its pod CIDR from it.

* Registration creates (or updates) the CiliumNode named after the Kubernetes node, with
  `spec.addresses`: an `InternalIP` per node address (--node-ip) and the
  `CiliumInternalIP`, the router address the pods use as their gateway (on cilium_host).
  Only these fields (and, see below, the pod CIDR) are the agent's: everything else, the
  operator's `spec.ipam.podCIDRs` first, is kept as the API server has it. Updates are
  read-modify-write with the object's resourceVersion, retried on conflicts, so a
  concurrent write of the operator is never lost (Cilium's agent has get, create and update
  on ciliumnodes; no patch).
* The pod CIDR: with `--pod-cidr` given, that one, and it is written to
  `spec.ipam.podCIDRs` (an explicit setting wins over the operator's). Otherwise the first
  IPv4 CIDR of `spec.ipam.podCIDRs` once the operator (cluster-pool IPAM) has written one;
  until then the agent waits, and its status says what for. Without an explicit router
  address the router gets the first address of the pod CIDR.
* While the agent runs, a CiliumNode that is deleted or whose addresses someone changed is
  written again (a reconcile loop with backoff, agent/reconcile.py).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

from cilium_py.agent.reconcile import Reconciler
from cilium_py.k8s.client import ApiError

log = logging.getLogger(__name__)

KIND = "CiliumNode"
NODE = "node"
INTERNAL_IP, CILIUM_INTERNAL_IP = "InternalIP", "CiliumInternalIP"
REGISTERING, WAITING, READY = "registering", "waiting-for-pod-cidr", "ready"
UPDATE_ATTEMPTS = 10


class NodeRegistrationError(RuntimeError):
    pass


def first_ipv4_cidr(cidrs) -> str | None:
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if net.version == 4:
            return str(net)
    return None


class NodeRegistration:
    def __init__(self, kube, store, *, node_name: str, node_ips=(), router_ip: str = "",
                 pod_cidr: str = ""):
        if not node_name:
            raise NodeRegistrationError("the Kubernetes node name is required (--k8s-node-name "
                                        "or K8S_NODE_NAME)")
        self.kube = kube
        self.store = store
        self.node_name = node_name
        self.node_ips = tuple(node_ips)
        self.explicit_pod_cidr = str(ipaddress.IPv4Network(pod_cidr)) if pod_cidr else ""
        self.explicit_router_ip = router_ip
        self.pod_cidr = self.explicit_pod_cidr
        self.state = REGISTERING
        self.message = f"registering CiliumNode {node_name}"
        self.writes = 0
        self._changed = threading.Event()
        self.reconciler = Reconciler("ciliumnode-registration", self._reconcile, (NODE,))
        store.subscribe(self._on_change)

    # -- the node's addresses ---------------------------------------------------------------

    @property
    def router_ip(self) -> str:
        if self.explicit_router_ip:
            return self.explicit_router_ip
        if self.pod_cidr:
            return str(next(ipaddress.IPv4Network(self.pod_cidr).hosts()))
        return ""

    def desired_addresses(self) -> list[dict]:
        out = [{"type": INTERNAL_IP, "ip": ip} for ip in self.node_ips]
        if self.router_ip:
            out.append({"type": CILIUM_INTERNAL_IP, "ip": self.router_ip})
        return out

    # -- registration --------------------------------------------------------------------------

    def register(self) -> dict:
        """Creates or updates the CiliumNode; returns the object as written. Raises ApiError."""
        for _ in range(UPDATE_ATTEMPTS):
            current = self.kube.get_or_none(KIND, self.node_name)
            if current is None:
                body = {"apiVersion": "cilium.io/v2", "kind": KIND,
                        "metadata": {"name": self.node_name}, "spec": self._apply_spec({})}
                try:
                    written = self.kube.create(KIND, body)
                except ApiError as e:
                    if e.conflict:
                        continue   # created meanwhile (by the operator?): update that one
                    raise
                self.writes += 1
                log.info("registered CiliumNode %s", self.node_name)
                return written
            spec = current.get("spec") or {}
            wanted = self._apply_spec(spec)
            if wanted == spec:
                return current
            current["spec"] = wanted
            try:
                written = self.kube.replace(KIND, current)
            except ApiError as e:
                if e.conflict or e.not_found:
                    continue   # changed or deleted meanwhile: read it again
                raise
            self.writes += 1
            return written
        raise ApiError(409, "Conflict", f"CiliumNode {self.node_name} kept changing while being updated")

    def _apply_spec(self, spec: dict) -> dict:
        out = {k: v for k, v in spec.items()}
        out["addresses"] = self.desired_addresses()
        if self.explicit_pod_cidr:
            ipam = dict(out.get("ipam") or {})
            ipam["podCIDRs"] = [self.explicit_pod_cidr]
            out["ipam"] = ipam
        return out

    def wait_for_pod_cidr(self, timeout: float, api_poll: float = 2.0) -> str:
        """The node's pod CIDR: the explicit one, or the operator's once it is written.
        Raises NodeRegistrationError after `timeout` s without one."""
        if self.explicit_pod_cidr:
            self._ready()
            return self.pod_cidr
        self.state = WAITING
        self.message = (f"waiting for the operator to allocate a pod CIDR "
                        f"(spec.ipam.podCIDRs of CiliumNode {self.node_name})")
        log.info("%s", self.message)
        deadline = time.monotonic() + timeout
        next_api = 0.0
        while True:
            cidr = self._stored_pod_cidr()
            if cidr is None and time.monotonic() >= next_api:
                # The store may lag (or the source not watch CiliumNodes): ask the API too.
                next_api = time.monotonic() + api_poll
                try:
                    doc = self.kube.get_or_none(KIND, self.node_name)
                except ApiError as e:
                    log.warning("cannot read CiliumNode %s: %s", self.node_name, e)
                    doc = None
                if doc is not None:
                    cidr = first_ipv4_cidr(((doc.get("spec") or {}).get("ipam") or {}).get("podCIDRs") or [])
            if cidr is not None:
                self.pod_cidr = cidr
                self._ready()
                return cidr
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodeRegistrationError(
                    f"no pod CIDR after {timeout:.0f} s: CiliumNode {self.node_name} has no IPv4 "
                    f"spec.ipam.podCIDRs. Is the operator running with cluster-pool IPAM, or give "
                    f"--pod-cidr")
            self._changed.wait(min(left, api_poll))
            self._changed.clear()

    def _ready(self) -> None:
        self.state = READY
        self.message = f"pod CIDR {self.pod_cidr}, router {self.router_ip}"
        # The router address may be known only now: write it.
        self.reconciler.mark(NODE, self.node_name)

    def _stored_pod_cidr(self) -> str | None:
        node = self.store.get((KIND, "", self.node_name))
        return first_ipv4_cidr(node.pod_cidrs) if node is not None else None

    # -- keeping it registered -------------------------------------------------------------------

    def start(self) -> None:
        self.reconciler.start()

    def stop(self) -> None:
        self.reconciler.stop()

    def _on_change(self, event: str, old, new) -> None:
        res = new or old
        if res.kind != KIND or res.name != self.node_name:
            return
        self._changed.set()
        if new is None:
            log.warning("CiliumNode %s was deleted; registering again", self.node_name)
            self.reconciler.mark(NODE, self.node_name)
            return
        cidr = first_ipv4_cidr(new.pod_cidrs)
        if self.state == READY and not self.explicit_pod_cidr and cidr and cidr != self.pod_cidr:
            log.warning("CiliumNode %s: pod CIDR changed from %s to %s; pods keep their addresses "
                        "until the agent restarts", self.node_name, self.pod_cidr, cidr)
        have = [{"type": a.type, "ip": a.ip} for a in new.addresses]
        if have != self.desired_addresses():
            self.reconciler.mark(NODE, self.node_name)

    def _reconcile(self, dirty: dict, revision: int) -> None:
        if dirty[NODE]:
            self.register()   # an ApiError: the loop retries with its backoff

    def status(self) -> dict:
        return {"name": self.node_name, "state": self.state, "message": self.message,
                "pod_cidr": self.pod_cidr, "router_ip": self.router_ip,
                "addresses": self.desired_addresses(), "writes": self.writes,
                "last_error": self.reconciler.status.last_error}


__all__ = ["NodeRegistration", "NodeRegistrationError", "first_ipv4_cidr"]
