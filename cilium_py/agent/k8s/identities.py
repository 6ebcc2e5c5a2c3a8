"""Cluster-wide identities as CiliumIdentity objects (Cilium's CRD identity mode): the same
label set has the same number on every node, because every node reads and writes them in
the API server.

An object is named by its number in decimal, holds the full label set under
`security-labels` ("k8s:app": "web", source prefix included) and, for `kubectl get ciliumid
-l`, the pod namespace as the metadata label `io.kubernetes.pod.namespace`.

Acquiring a label set nobody on this node holds yet:

1. an identity that already has these labels is adopted: from the objects the Kubernetes
   source put in the store, else from the API server (a list narrowed by the namespace
   label, in case the store lags); with several (duplicates made elsewhere), the lowest;
2. else numbers in [256, 65535] are tried in a pseudo-random order *seeded by the label
   set*: spread evenly over the range, so unrelated label sets rarely meet, but the same
   on every node, so two agents racing for one label set try the same number first. The
   store and the API are checked again before each create;
3. the create is the arbiter. 409 AlreadyExists means the number is taken: if the object
   holding it has our labels, another agent won the race and we adopt theirs; otherwise
   the next number of the sequence is tried. A number is never given to two label sets
   (the API server keeps names unique), and two racing agents end with one identity.

   (Cilium leases a truly random number and accepts the duplicates a race can give; a
   seeded order removes them at no cost. One window remains: an identity the operator's
   GC deletes between two racing agents' probes of its number can make them settle on
   different numbers. The GC only deletes identities no endpoint used for its whole
   heartbeat timeout, so this needs a label set that comes back just as it is collected.)

An adopted identity carrying the operator's `io.cilium.heartbeat` annotation (marked for
deletion, cluster-facts 4.2) is un-marked by an update, which also makes a concurrent
GC delete (preconditioned on the resourceVersion) fail; so is an identity this node holds
when the store shows it marked. An identity this node holds that disappears from the
cluster is created again under the same number.

Releasing the last reference only forgets the identity locally: other nodes may use it;
the operator's GC deletes identities no CiliumEndpoint refers to.

CIDR identities (local scope, 1<<24 | n) stay node-local and are never stored in the
API: they are delegated to a file-backed allocator in the node's state directory, so they
survive restarts like everything the pinned maps hold.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Mapping

from cilium_py.agent.identity import IdentityAllocator, IdentityError, IdentityExhaustedError
from cilium_py.agent.labels import NAMESPACE_LABEL, RESERVED, SOURCE_K8S, Labels, labels_key, reserved_id
from cilium_py.agent.reconcile import ControllerStatus, Reconciler
from cilium_py.k8s.client import ApiError
from cilium_py.vocab import ACTIVE_RESERVED_IDENTITIES, FIRST_CLUSTER_IDENTITY

log = logging.getLogger(__name__)

KIND = "CiliumIdentity"
MAX_CLUSTER_ID = 65535
HEARTBEAT_ANNOTATION = "io.cilium.heartbeat"
NAMESPACE_LABEL_KEY = f"{SOURCE_K8S}:{NAMESPACE_LABEL}"
MAX_PROBES = 64     # numbers tried before giving up: with half the range in use, 64 misses is 2**-64
RESTORE = "restore"


class IdentityAllocationError(IdentityError):
    """The API server refused or could not be reached; `retryable` says whether trying
    again later can help (the control plane's backoff retries either way)."""

    def __init__(self, message: str, retryable: bool):
        self.retryable = retryable
        super().__init__(message)


def identity_object(ident: int, labels: Mapping[str, str]) -> dict:
    """The CiliumIdentity document for `ident` and its labels."""
    meta: dict = {"name": str(ident)}
    namespace = labels.get(NAMESPACE_LABEL_KEY)
    if namespace:
        meta["labels"] = {NAMESPACE_LABEL: namespace}
    return {"apiVersion": "cilium.io/v2", "kind": KIND, "metadata": meta,
            "security-labels": dict(labels)}


def probe_order(key: str, low: int = FIRST_CLUSTER_IDENTITY, high: int = MAX_CLUSTER_ID,
                count: int = MAX_PROBES) -> list[int]:
    """The numbers a label set tries, in order: pseudo-random, and the same on every node."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    span = high - low + 1
    return rng.sample(range(low, high + 1), min(count, span))


def _doc_labels(doc: dict) -> dict | None:
    raw = doc.get("security-labels")
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        return None
    return dict(raw)


class CRDIdentityAllocator:
    """IdentityAllocator's interface (agent/identity.py) over CiliumIdentity objects.

    `kube` is a cilium_py.k8s.client.Kube; `store`, when given, is the store the Kubernetes
    source fills with CiliumIdentity objects (indexed here as they come and go);
    `cidr_state_file` keeps the node-local CIDR identities across restarts."""

    def __init__(self, kube, store=None, *, cidr_state_file: str | None = None,
                 min_id: int = FIRST_CLUSTER_IDENTITY, max_id: int = MAX_CLUSTER_ID,
                 max_probes: int = MAX_PROBES):
        self.kube = kube
        self._local = IdentityAllocator(cidr_state_file)   # CIDR identities only
        self._min_id, self._max_id, self._max_probes = min_id, max_id, max_probes
        self._lock = threading.RLock()          # the tables below
        self._alloc_lock = threading.Lock()     # one allocation at a time (they are rare)
        self._known: dict[int, dict] = {}       # every identity of the cluster we know of
        self._by_key: dict[str, set[int]] = {}
        self._held: dict[str, int] = {}         # label key -> the identity this node uses
        self._refs: dict[int, int] = {}
        self._revision = 0
        self.adopted = 0                        # identities another agent created first
        self.created = 0
        self.conflicts = 0                      # creates answered 409
        self.status = ControllerStatus()
        self._restorer = Reconciler("identity-restore", self._restore, (RESTORE,))
        self._store = store
        if store is not None:
            store.subscribe(self._on_change)

    # -- lifecycle (the restorer re-creates held identities deleted in the cluster) ---------

    def start(self) -> None:
        self._restorer.start()

    def stop(self) -> None:
        self._restorer.stop()

    @property
    def controllers(self) -> dict[str, ControllerStatus]:
        return {"identity-allocation": self.status, "identity-restore": self._restorer.status}

    # -- the store's view of the cluster -----------------------------------------------------

    def _on_change(self, event: str, old, new) -> None:
        res = new or old
        if res.kind != KIND:
            return
        if new is not None:
            self._learn(new.identity, dict(new.security_labels))
            if new.heartbeat:
                with self._lock:
                    held = new.identity in self._refs
                if held:   # marked for deletion while this node uses it: un-mark it
                    self._restorer.mark(RESTORE, new.identity)
            return
        with self._lock:
            held = old.identity in self._refs
            if not held:
                self._forget(old.identity)
        if held:
            log.warning("CiliumIdentity %d (in use on this node) was deleted; creating it again",
                        old.identity)
            self._restorer.mark(RESTORE, old.identity)

    def _learn(self, ident: int, labels: dict) -> None:
        with self._lock:
            if self._known.get(ident) == labels:
                return
            self._forget(ident)
            self._known[ident] = labels
            self._by_key.setdefault(labels_key(labels), set()).add(ident)
            self._revision += 1

    def _forget(self, ident: int) -> None:
        labels = self._known.pop(ident, None)
        if labels is None:
            return
        key = labels_key(labels)
        ids = self._by_key.get(key, set())
        ids.discard(ident)
        if not ids:
            self._by_key.pop(key, None)
        self._revision += 1

    def _known_with(self, key: str) -> int | None:
        with self._lock:
            ids = self._by_key.get(key)
            return min(ids) if ids else None

    # -- cluster identities ------------------------------------------------------------------

    def acquire(self, labels: Mapping[str, str]) -> int:
        if not labels:
            raise ValueError("cannot allocate an identity for an empty label set")
        reserved = reserved_id(labels)
        if reserved is not None:
            return reserved
        key = labels_key(labels)
        with self._lock:
            ident = self._held.get(key)
            if ident is not None:
                self._refs[ident] += 1
                return ident
        with self._alloc_lock:
            with self._lock:   # allocated by another thread while we waited
                ident = self._held.get(key)
                if ident is not None:
                    self._refs[ident] += 1
                    return ident
            try:
                ident = self._allocate(dict(labels), key)
            except ApiError as e:
                self.status.failed(str(e))
                raise IdentityAllocationError(f"cannot allocate an identity for {key}: {e}",
                                              e.retryable) from None
            self.status.succeeded()
            with self._lock:
                self._held[key] = ident
                self._refs[ident] = 1
                self._learn(ident, dict(labels))
                self._revision += 1
            return ident

    def release(self, labels: Mapping[str, str]) -> bool:
        """Drops one reference; True when that was the last one on this node. The object
        stays: other nodes may use it, and the operator's GC removes it when none does."""
        if reserved_id(labels) is not None:
            return False
        key = labels_key(labels)
        with self._lock:
            ident = self._held.get(key)
            if ident is None:
                log.warning("release of labels without an identity: %s", key)
                return False
            self._refs[ident] -= 1
            if self._refs[ident] > 0:
                return False
            del self._held[key], self._refs[ident]
            self._revision += 1
            return True

    def _allocate(self, labels: dict, key: str) -> int:
        existing = self._known_with(key)
        if existing is None:
            existing = self._find_in_api(labels, key)
        if existing is not None:
            return self._adopt(existing, labels, key)
        for candidate in probe_order(key, self._min_id, self._max_id, self._max_probes):
            # Checked again before each create: it may have arrived in the store meanwhile.
            existing = self._known_with(key)
            if existing is not None:
                return self._adopt(existing, labels, key)
            with self._lock:
                if self._known.get(candidate) not in (None, labels):
                    continue   # known to hold another label set
            try:
                self.kube.create(KIND, identity_object(candidate, labels))
            except ApiError as e:
                if not e.conflict:
                    raise
                self.conflicts += 1
                theirs = self.kube.get_or_none(KIND, str(candidate))
                if theirs is None:
                    continue   # deleted meanwhile; the next number will do
                their_labels = _doc_labels(theirs)
                if their_labels is not None:
                    self._learn(candidate, their_labels)
                if their_labels == labels:
                    log.info("identity %d for %s was created by another agent; adopted", candidate, key)
                    return self._adopt(candidate, labels, key, theirs)
                continue
            self.created += 1
            log.info("created CiliumIdentity %d for %s", candidate, key)
            return candidate
        raise IdentityExhaustedError(
            f"no free cluster identity for {key}: {self._max_probes} numbers of "
            f"{self._min_id}-{self._max_id} tried, all taken")

    def _find_in_api(self, labels: dict, key: str) -> int | None:
        namespace = labels.get(NAMESPACE_LABEL_KEY, "")
        selector = f"{NAMESPACE_LABEL}={namespace}" if namespace else ""
        items, _ = self.kube.list_all(KIND, label_selector=selector)
        found = []
        for doc in items:
            name = (doc.get("metadata") or {}).get("name", "")
            their = _doc_labels(doc)
            if their is None or not name.isdigit():
                continue
            self._learn(int(name), their)
            if their == labels:
                found.append(int(name))
        return min(found) if found else None

    def _adopt(self, ident: int, labels: dict, key: str, doc: dict | None = None) -> int:
        """Uses an existing identity; un-marks it when the GC marked it for deletion."""
        self.adopted += 1
        if not self._unmark(ident, doc):
            # Deleted between finding and adopting: allocate from scratch.
            with self._lock:
                self._forget(ident)
            return self._allocate(labels, key)
        return ident

    def _unmark(self, ident: int, doc: dict | None = None) -> bool:
        """Removes the GC's heartbeat mark from the identity if it has one (an update, so a
        GC delete preconditioned on the marked version fails). False if it does not exist."""
        for _ in range(5):
            doc = doc if doc is not None else self.kube.get_or_none(KIND, str(ident))
            if doc is None:
                return False
            annotations = (doc.get("metadata") or {}).get("annotations") or {}
            if HEARTBEAT_ANNOTATION not in annotations:
                return True
            del annotations[HEARTBEAT_ANNOTATION]
            try:
                self.kube.replace(KIND, doc)
                log.info("identity %d was marked for deletion; un-marked", ident)
                return True
            except ApiError as e:
                if not (e.conflict or e.not_found):
                    raise
                doc = None   # changed or deleted meanwhile: look again
        raise ApiError(409, "Conflict", f"CiliumIdentity {ident} kept changing while being un-marked")

    def _restore(self, dirty: dict, revision: int) -> None:
        """Held identities as they must be in the cluster: re-created (same number) when
        deleted, un-marked when the GC marked them."""
        for ident in sorted(dirty[RESTORE]):
            with self._lock:
                if ident not in self._refs:
                    continue
                labels = self._known.get(ident)
            if labels is None:
                continue
            try:
                if not self._unmark(ident):
                    self.kube.create(KIND, identity_object(ident, labels))
                    log.info("re-created CiliumIdentity %d", ident)
            except ApiError as e:
                if e.conflict:
                    continue   # back already (the store will say with which labels)
                self._restorer.requeue(RESTORE, ident)
                log.warning("cannot restore CiliumIdentity %d: %s", ident, e)

    # -- node-local CIDR identities: never in the API ----------------------------------------

    def acquire_cidr(self, prefix) -> int:
        return self._local.acquire_cidr(prefix)

    def release_cidr(self, prefix) -> bool:
        return self._local.release_cidr(prefix)

    def cidr_identities(self):
        return self._local.cidr_identities()

    # -- queries -----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision + self._local.revision

    @property
    def save_error(self) -> str | None:
        return self._local.save_error

    def lookup(self, ident: int) -> Labels | None:
        if ident in RESERVED:
            return dict(RESERVED[ident])
        with self._lock:
            if ident in self._known:
                return dict(self._known[ident])
        return self._local.lookup(ident)

    def lookup_labels(self, labels: Mapping[str, str]) -> int | None:
        reserved = reserved_id(labels)
        if reserved is not None:
            return reserved
        key = labels_key(labels)
        with self._lock:
            held = self._held.get(key)
        return held if held is not None else self._known_with(key)

    def all(self) -> dict[int, Labels]:
        """Reserved identities and every cluster identity known (this node's and others'),
        the set policy selectors are matched against."""
        out = {i: dict(RESERVED[i]) for i in ACTIVE_RESERVED_IDENTITIES}
        with self._lock:
            out.update((i, dict(labels)) for i, labels in self._known.items())
        return out

    def refcount(self, ident: int) -> int:
        with self._lock:
            if ident in self._refs:
                return self._refs[ident]
        return self._local.refcount(ident)

    def held(self) -> dict[int, dict]:
        """The identities this node's endpoints use."""
        with self._lock:
            return {i: dict(self._known.get(i, {})) for i in self._refs}

    def forget_unused(self) -> list[int]:
        """CIDR identities reloaded from the state file that no policy named again. (Cluster
        identities are not kept across restarts here: they live in the API server.)"""
        return self._local.forget_unused()

    def view(self) -> dict:
        with self._lock:
            held, known = len(self._refs), len(self._known)
        return {"mode": "crd", "held": held, "known": known, "created": self.created,
                "adopted": self.adopted, "conflicts": self.conflicts,
                "last_error": self.status.last_error}


__all__ = ["CRDIdentityAllocator", "IdentityAllocationError", "identity_object", "probe_order"]
