"""The `Valid` condition of CiliumNetworkPolicies and CiliumClusterwideNetworkPolicies,
written to their status subresource, so `kubectl get cnp` shows whether a policy is in
effect and `kubectl describe` says why not.

What is written, and why this shape:

* One condition, `type: Valid`, in `status.conditions` (the only condition type of the
  CRD, cluster-facts 3.5). `status: "True"`, reason `Accepted`, once the policy parsed and
  this node's control plane realized the revision that added it (its endpoints enforce
  it). `status: "False"`, reason `Invalid`, when the parser rejected the object's current
  version; the message names the object and the field (the Kubernetes source's `errors`),
  and says when the previous valid version stays in effect.
* The condition says the same on every node: whether a policy is valid does not depend on
  the node (every agent runs the same parser), and messages name no node. So agents agree
  instead of overwriting each other with their own view; per-node enforcement is visible
  in each node's CiliumEndpoints (`status.policy`) and in `ciliumpy policy get`. No
  per-node map (`status.nodes`, dropped by Cilium in 1.19) and no `derivativePolicies`
  (nothing here derives policies).
* An agent writes only when the condition differs from the one it wrote last (a restarted
  agent writes each policy's condition once), as a merge patch of the status subresource:
  the RBAC it needs is `patch` on `ciliumnetworkpolicies/status` and
  `ciliumclusterwidenetworkpolicies/status`, nothing else.

Rejections do not change the store (the rejected version is never stored), so the
Kubernetes source's errors are compared with the last ones seen once per resync interval.
"""

from __future__ import annotations

import datetime
import logging
import threading

from cilium_py.agent.objects.base import describe
from cilium_py.agent.reconcile import Reconciler
from cilium_py.k8s.client import ApiError
from cilium_py.vocab import CILIUM_CLUSTERWIDE_NETWORK_POLICY, CILIUM_NETWORK_POLICY

log = logging.getLogger(__name__)

KINDS = (CILIUM_NETWORK_POLICY, CILIUM_CLUSTERWIDE_NETWORK_POLICY)
POLICIES = "policies"
CONDITION = "Valid"
ACCEPTED, INVALID = "Accepted", "Invalid"
ACCEPTED_MESSAGE = "the policy was accepted and is enforced"
REALIZE_WAIT = 5.0     # seconds one pass waits for the control plane to realize a policy


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(valid: bool, message: str) -> dict:
    return {"type": CONDITION, "status": "True" if valid else "False",
            "reason": ACCEPTED if valid else INVALID, "message": message,
            "lastTransitionTime": _now()}


class PolicyStatusWriter:
    """`store`: the store the Kubernetes source fills; `control`: the ControlPlane (its
    revisions say when a policy is enforced); `errors_fn`: the source's current rejections
    (ValidationErrors with a store `key`)."""

    def __init__(self, kube, store, control, errors_fn, *, resync_interval: float = 1.0):
        self.kube = kube
        self.store = store
        self.control = control
        self.errors_fn = errors_fn
        self._lock = threading.Lock()
        self._covering: dict[tuple, int] = {}     # valid policy -> control revision that adds it
        self._rejections: dict[tuple, str] = {}   # rejected policy -> message
        self._written: dict[tuple, tuple] = {}    # policy -> (status, reason, message) written
        self.errors: dict[str, str] = {}
        self.writes = 0
        self.reconciler = Reconciler("policy-status", self._sync, (POLICIES,),
                                     resync_interval=resync_interval, on_resync=self._scan_errors)
        store.subscribe(self._on_change)

    def start(self) -> None:
        self._scan_errors()
        self.reconciler.start()

    def stop(self) -> None:
        self.reconciler.stop()

    # -- what changed -------------------------------------------------------------------

    def _on_change(self, event: str, old, new) -> None:
        res = new or old
        if res.kind not in KINDS:
            return
        with self._lock:
            if new is None:
                self._covering.pop(res.key, None)
                self._written.pop(res.key, None)
                return
            # The control plane subscribed first: its mark for this change is in the revision.
            self._covering[res.key] = self.control.revision
        self.reconciler.mark(POLICIES, res.key)

    def _scan_errors(self) -> None:
        rejections: dict[tuple, list[str]] = {}
        for e in self.errors_fn():
            key = getattr(e, "key", None)
            if key is not None and key[0] in KINDS:
                rejections.setdefault(tuple(key), []).append(str(e))
        current = {k: "; ".join(v) for k, v in rejections.items()}
        with self._lock:
            changed = {k for k in set(current) | set(self._rejections)
                       if current.get(k) != self._rejections.get(k)}
            self._rejections = current
            for key in changed - set(current):
                # Fixed or deleted: a re-created object starts without our condition.
                self._written.pop(key, None)
        if changed:
            self.reconciler.mark(POLICIES, *changed)

    # -- writing ------------------------------------------------------------------------

    def _sync(self, dirty: dict, revision: int) -> None:
        for key in sorted(dirty[POLICIES]):
            with self._lock:
                rejection = self._rejections.get(key)
                covering = self._covering.get(key)
            if rejection is not None:
                wanted = condition(False, rejection)
            elif covering is not None:
                if not self.control.wait_for_revision(covering, REALIZE_WAIT):
                    self.reconciler.requeue(POLICIES, key)
                    continue
                wanted = condition(True, ACCEPTED_MESSAGE)
            else:
                continue   # deleted, or never valid and no longer rejected
            self._write(key, wanted)

    def _write(self, key: tuple, wanted: dict) -> None:
        summary = (wanted["status"], wanted["reason"], wanted["message"])
        with self._lock:
            if self._written.get(key) == summary:
                return
        kind, namespace, name = key
        try:
            self.kube.patch(kind, name, {"status": {"conditions": [wanted]}}, namespace or None,
                            subresource="status")
        except ApiError as e:
            if e.not_found:
                return   # deleted meanwhile
            self.errors[describe(*key)] = str(e)
            delay = self.reconciler.requeue(POLICIES, key)
            log.warning("policy status of %s %s: %s (retrying in %.1fs)", kind, name, e, delay)
            return
        self.errors.pop(describe(*key), None)
        with self._lock:
            self._written[key] = summary
        self.writes += 1
        self.reconciler.succeeded(POLICIES, key)

    def status(self) -> dict:
        with self._lock:
            valid = sum(1 for s in self._written.values() if s[0] == "True")
            invalid = sum(1 for s in self._written.values() if s[0] == "False")
        return {"valid": valid, "invalid": invalid, "writes": self.writes,
                "errors": dict(sorted(self.errors.items()))}


__all__ = ["PolicyStatusWriter", "condition"]
