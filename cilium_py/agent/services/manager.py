"""The service manager: Services, EndpointSlices, Pods (hostPorts, selectors) and Nodes
from the store, turned into the lb maps of this node.

Desired state is planned per *owner*: a Service, or a Pod with hostPorts. An owner's
plan says which frontends it serves (address, port, protocol, flags, backends per
scope) and which unique resources it claims: ClusterIPs, nodePorts and frontends. A
claim held by another owner rejects the plan (the first owner keeps working, the later
one is reported and retried when the claim is released); an invalid object is rejected
with every field at fault, and its previous valid plan stays in effect.

Only owners touched by a change are re-planned, and only the frontends and backends of
those owners are compared with what the maps hold, so the cost of a sync follows the
change, not the number of services. The comparison is against the realized state (what
this manager wrote, or read back from the pinned maps at startup), so leftovers of an
earlier agent are removed and a failed write is repaired by re-reading the maps.

IDs: a service ID per frontend (address, port, protocol), a backend ID per backend
(address, port, protocol), both kept while in use and reused only after the whole range
went round (see ids.py). Backend slots keep their positions when backends come and go
(a new backend fills a hole or goes last; a removed one's slot takes the last backend),
so a change writes few slots.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cilium_py.agent.errors import ValidationError
from cilium_py.agent.services import endpoints as eps
from cilium_py.agent.services.addr import ipv4_int
from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.services.endpoints import BackendKey, BackendRef, PodAddresses, PodInfo
from cilium_py.agent.services.ids import BACKEND_ID_RANGE, SERVICE_ID_RANGE, IDAllocator, IDExhausted
from cilium_py.agent.services.maglev import build_table
from cilium_py.agent.services.parse import (
    SERVICE_NAME_LABEL,
    ServiceSpec,
    ServiceValidationError,
    SliceSpec,
    parse_endpoint_slice,
    parse_service,
    pod_host_ports,
)
from cilium_py.agent.services.writer import FE, BackendWrite, LBChanges, LBWriter, MasterWrite, SlotWrite
from cilium_py.agent.store import Resource, Store
from cilium_py.datapath.maps.lb import (
    ALGORITHM_DEFAULT,
    ALGORITHM_MAGLEV,
    ALGORITHM_RANDOM,
    ALGORITHMS,
    BACKEND_STATES,
    BE_STATE_ACTIVE,
    SCOPE_EXTERNAL,
    SCOPE_INTERNAL,
    SVC_F_AFFINITY,
    SVC_F_EXT_LOCAL,
    SVC_F_EXTERNAL_IPS,
    SVC_F_HOSTPORT,
    SVC_F_INT_LOCAL,
    SVC_F_LOADBALANCER,
    SVC_F_NODEPORT,
    SVC_F_ROUTABLE,
    SVC_F_TWO_SCOPES,
    flag_names,
)
from cilium_py.datapath.reasons import protocol_name

log = logging.getLogger(__name__)

SYNC_RETRY_MIN, SYNC_RETRY_MAX = 0.2, 30.0  # seconds between attempts after a failed sync

SERVICE, HOSTPORT, SLICE = "Service", "HostPort", "EndpointSlice"
Owner = tuple[str, str, str]            # (SERVICE | HOSTPORT, namespace, name)
FrontendKey = tuple[str, int, int]      # (address, port, protocol)
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
# NodePorts and hostPorts without hostIP also get a frontend at 0.0.0.0:port, as in
# Cilium: the datapath serves it at any node address and at loopback (127.0.0.1:nodePort
# from the node and its pods), while the per-address frontends win where they exist.
WILDCARD = "0.0.0.0"


class FrontendPlan(NamedTuple):
    key: FrontendKey
    type: str                           # ClusterIP, NodePort, LoadBalancer, ExternalIPs, HostPort
    flags: int
    affinity_timeout: int
    algorithm: int                      # written to the master; 0 = the agent default
    maglev: bool                        # the effective algorithm is Maglev
    external: tuple[BackendRef, ...]    # scope external (the only one without TWO_SCOPES)
    internal: tuple[BackendRef, ...] | None = None
    port_name: str = ""


@dataclass
class OwnerPlan:
    owner: Owner
    frontends: dict[FrontendKey, FrontendPlan] = field(default_factory=dict)
    claims: dict[tuple, str] = field(default_factory=dict)        # claim -> field defining it
    backends: dict[BackendKey, tuple[int, bool]] = field(default_factory=dict)
    cluster_ip: str = ""
    node_ports: dict[tuple[str, int], int] = field(default_factory=dict)  # (port name, proto) -> nodePort

    def __eq__(self, other):
        return (isinstance(other, OwnerPlan) and self.frontends == other.frontends
                and self.claims == other.claims and self.backends == other.backends)

    def entry_count(self) -> int:
        """Service-map entries the plan needs: a master per scope plus its slots."""
        cached = self.__dict__.get("_entries")
        if cached is not None:
            return cached
        n = 0
        for fp in self.frontends.values():
            n += 1 + sum(r.state == BE_STATE_ACTIVE for r in fp.external)
            if fp.internal is not None:
                n += 1 + sum(r.state == BE_STATE_ACTIVE for r in fp.internal)
        self.__dict__["_entries"] = n
        return n


def _claim_text(claim: tuple) -> str:
    if claim[0] == "ip":
        return f"ClusterIP {claim[1]}"
    if claim[0] == "nodeport":
        return f"nodePort {claim[1]}/{protocol_name(claim[2])}"
    return f"frontend {claim[1]}:{claim[2]}/{protocol_name(claim[3])}"


def _describe(owner: Owner) -> str:
    kind = "Pod" if owner[0] == HOSTPORT else owner[0]
    return f"{kind} {owner[1]}/{owner[2]}"


def _numeric(ref: BackendRef):
    """Display order: by address as a number (10.0.0.9 before 10.0.0.10)."""
    return (ipv4_int(ref.key[0]), ref.key[1], ref.key[2])


def _slot_order(old: list[int], active: list[int]) -> list[int]:
    """New slot contents: backends that stay keep their slot, new ones fill the holes of
    removed ones and then go last, and a hole still left takes the last backend."""
    wanted = set(active)
    slots: list[int | None] = [b if b in wanted else None for b in old]
    present = {b for b in slots if b is not None}
    fresh = iter([b for b in active if b not in present])
    for i, b in enumerate(slots):
        if b is None:
            nxt = next(fresh, None)
            if nxt is None:
                break
            slots[i] = nxt
    slots.extend(fresh)
    while slots and slots[-1] is None:
        slots.pop()
    for i in range(len(slots)):
        if i >= len(slots):
            break
        if slots[i] is None:
            slots[i] = slots.pop()
            while slots and slots[-1] is None:
                slots.pop()
    return slots


@contextlib.contextmanager
def _gc_paused():
    """A full sync allocates hundreds of thousands of small objects; every few hundred
    of them the cyclic collector would walk the whole heap (the store's objects too),
    which more than doubled a 10,000-service sync. Nothing in a sync makes cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class _Pending:
    """What a change set does to the manager's books once the writer has applied it."""

    realized: dict = field(default_factory=dict)          # FE -> realized tuple | None
    backends: dict = field(default_factory=dict)          # backend ID -> realized row
    maglev_signatures: dict = field(default_factory=dict)
    freed_service_keys: list = field(default_factory=list)
    freed_backend_keys: list = field(default_factory=list)


class ServiceManager:
    def __init__(self, store: Store, writer: LBWriter, config: ServiceConfig,
                 pods: PodAddresses | None = None, socket_lb: bool = False,
                 acceleration: str = "disabled", resync_interval: float = 300.0):
        self.store = store
        # How often the loop re-reads the maps and repairs what differs from its books
        # (entries changed or removed behind the agent's back).
        self.resync_interval = resync_interval
        self.writer = writer
        self.config = config
        self.pods = pods or PodAddresses()
        self.socket_lb = socket_lb
        self.acceleration = acceleration
        self._lock = threading.RLock()        # the books: plans, claims, realized state
        self._dirty_lock = threading.Lock()   # what changed since the last sync (held briefly)
        # desired state
        self._plans: dict[Owner, OwnerPlan] = {}
        self._claims: dict[tuple, Owner] = {}
        self._backend_refs: dict[BackendKey, dict[Owner, tuple[int, bool]]] = {}
        self._specs: dict[tuple[str, str], ServiceSpec] = {}      # applied Service specs
        self._parsed: dict[Owner, tuple[Resource, object]] = {}   # parse cache by resource
        self._slices: dict[tuple[str, str], SliceSpec] = {}       # (ns, name) -> slice
        self._slices_by_service: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._pods: dict[str, dict[str, PodInfo]] = {}            # namespace -> name -> info
        self._selector_services: dict[str, set[Owner]] = {}       # namespace -> Services with selectors
        self._entry_count = 0
        # problems
        self._errors: dict[Owner | tuple, list[ValidationError]] = {}
        self._warnings: dict[Owner | tuple, list[ValidationError]] = {}
        self._blocked: dict[Owner, set[tuple]] = {}
        # realized state
        self._service_ids = IDAllocator("service", *SERVICE_ID_RANGE)
        self._backend_ids = IDAllocator("backend", *BACKEND_ID_RANGE)
        # FE -> (service ID, slot backend IDs, flags, affinity timeout, algorithm, qcount)
        self._realized: dict[FE, tuple] = {}
        self._realized_backends: dict[int, tuple] = {}   # ID -> (address, port, proto, state, local)
        self._realized_revnat: dict[int, tuple[str, int]] = {}
        self._realized_maglev: dict[int, tuple] = {}
        self._needs_restore = True
        self._stale: list[tuple[str, int]] = []
        # change tracking
        self._dirty_owners: set[Owner] = set()
        self._dirty_slices: set[tuple[str, str]] = set()
        self._dirty_pods: set[tuple[str, str]] = set()
        self._dirty_node = False
        self.revision = 1
        self._realized_revision = 0
        self.generation = 0
        self.syncs = 0
        self.failures = 0
        self.last_error = ""
        self.last_changes: dict[str, int] = {}
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe = store.subscribe(self._on_change)

    # -- events -------------------------------------------------------------------------

    def _on_change(self, event: str, old: Resource | None, new: Resource | None) -> None:
        res = new or old
        kind = res.kind
        ns = res.namespace or ""
        with self._dirty_lock:
            if kind == "Service":
                self._dirty_owners.add((SERVICE, ns, res.name))
            elif kind == "EndpointSlice":
                self._dirty_slices.add((ns, res.name))
            elif kind == "Pod":
                self._dirty_pods.add((ns, res.name))
            elif kind == "Node":
                if res.name != self.config.node:
                    return
                self._dirty_node = True
            else:
                return
            self.revision += 1
        self._wake.set()

    def pods_changed(self, keys) -> None:
        """The node's endpoints changed (addresses appeared or went): pods whose backends
        or hostPorts depend on them are re-planned. `keys` are "namespace/name"."""
        self.pods.invalidate()
        with self._dirty_lock:
            for key in keys:
                ns, _, name = key.partition("/")
                self._dirty_pods.add((ns, name))
            if keys:
                self.revision += 1
        if keys:
            self._wake.set()

    # -- the loop -----------------------------------------------------------------------

    def start(self, before_first_sync: Callable[[], object] | None = None) -> None:
        """Syncs from a thread whenever something changed. `before_first_sync` runs first
        (the agent waits there for its endpoints, so backends of a restarted agent are
        not removed and written again)."""
        self._wake.set()
        self._thread = threading.Thread(target=self._loop, args=(before_first_sync,),
                                        name="services", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._unsubscribe()

    def _loop(self, before_first_sync) -> None:
        if before_first_sync is not None:
            try:
                before_first_sync()
            except Exception:  # noqa: BLE001 - go on without the wait
                log.exception("services: waiting before the first sync failed")
        backoff = SYNC_RETRY_MIN
        while not self._stop.is_set():
            if not self._wake.wait(self.resync_interval):
                self._needs_restore = True  # nothing changed for a while: check for drift
            if self._stop.is_set():
                return
            self._wake.clear()
            self.store.wait_idle(5.0)
            try:
                self.sync()
                backoff = SYNC_RETRY_MIN
            except Exception as e:  # noqa: BLE001 - report, repair on the next pass
                log.exception("services: sync failed; re-reading the maps and retrying in %.1fs",
                              backoff)
                self.last_error = str(e)
                # Doubling up to a limit: a lasting failure (a full map) must not spin.
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, SYNC_RETRY_MAX)
                self._wake.set()

    def wait_for_revision(self, revision: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._realized_revision < revision:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def realized_revision(self) -> int:
        return self._realized_revision

    # -- sync ---------------------------------------------------------------------------

    def sync(self) -> LBChanges:
        """Plans what changed and writes the difference; returns what was written."""
        with self._lock:
            with self._dirty_lock:
                revision = self.revision
                dirty = (self._dirty_slices, self._dirty_pods, self._dirty_node, self._dirty_owners)
                self._dirty_slices, self._dirty_pods = set(), set()
                self._dirty_node, self._dirty_owners = False, set()
            self.syncs += 1
            try:
                with _gc_paused():
                    changes = self._sync(*dirty)
            except Exception as e:
                self.failures += 1
                self.last_error = str(e)
                # The next sync re-reads the maps and compares every plan with them, and
                # re-plans what this one was given.
                self._needs_restore = True
                with self._dirty_lock:
                    self._dirty_slices |= dirty[0]
                    self._dirty_pods |= dirty[1]
                    self._dirty_node |= dirty[2]
                    self._dirty_owners |= dirty[3]
                raise
            self.last_error = ""
        with self._cond:
            self._realized_revision = max(self._realized_revision, revision)
            self._cond.notify_all()
        return changes

    def _sync(self, slices: set, pods: set, node: bool, owners: set) -> LBChanges:
        # Ordered sets (dicts): IDs are handed out in the order owners and their frontends
        # were planned, so the same manifests give the same IDs.
        touched_fe: dict[FrontendKey, None] = {}
        touched_be: dict[BackendKey, None] = {}
        if self._needs_restore:
            self._restore()
            for plan in self._plans.values():
                touched_fe.update(dict.fromkeys(plan.frontends))
            touched_fe.update(dict.fromkeys((str(ipaddress.IPv4Address(fe.address)), fe.port, fe.proto)
                                            for fe in self._realized))
            touched_be.update(dict.fromkeys(self._backend_refs))
            touched_be.update(dict.fromkeys(row[:3] for row in self._realized_backends.values()))
        pending = owners | self._absorb_dirty(slices, pods, node)
        rounds = 0
        while pending:
            released: set[tuple] = set()
            for owner in sorted(pending, key=self._order):
                old = self._plans.get(owner)
                new = self._replan(owner, old)
                if new is False or new == old:
                    continue
                released |= self._swap(owner, old, new)
                for plan in (new, old):
                    if plan is not None:
                        touched_fe.update(dict.fromkeys(plan.frontends))
                        touched_be.update(dict.fromkeys(plan.backends))
            # Owners that waited for a claim released in this round get it now.
            pending = {o for o, wanted in self._blocked.items() if wanted & released}
            rounds += 1
            if rounds > 100:
                log.error("services: claims still moving after 100 rounds; continuing next sync")
                with self._dirty_lock:
                    self._dirty_owners |= pending
                self._wake.set()
                break
        changes, pending_books = self._changes(touched_fe, touched_be)
        if changes:
            self.writer.apply(changes)
            self.generation += 1
        self._commit(changes, pending_books)
        self.last_changes = changes.counts()
        return changes

    def _absorb_dirty(self, slices: set, pods: set, node: bool) -> set[Owner]:
        """Takes in changed slices, pods and the node; returns the owners to re-plan."""
        dirty: set[Owner] = set()
        for key in slices:
            old = self._slices.pop(key, None)
            if old is not None:
                self._slices_by_service.get(old.service_key, set()).discard(key)
                dirty.add((SERVICE,) + old.service_key)
            self._errors.pop((SLICE,) + key, None)
            self._warnings.pop((SLICE,) + key, None)
            res = self.store.get((SLICE, key[0], key[1]))
            if res is None:
                continue
            try:
                spec, warnings = parse_endpoint_slice(res)
            except ServiceValidationError as e:
                self._errors[(SLICE,) + key] = e.errors
                service = (res.labels or {}).get(SERVICE_NAME_LABEL)
                if service:
                    # Its endpoints are gone from the service until the slice is fixed.
                    dirty.add((SERVICE, key[0], service))
                continue
            if warnings:
                self._warnings[(SLICE,) + key] = warnings
            self._slices[key] = spec
            self._slices_by_service.setdefault(spec.service_key, set()).add(key)
            dirty.add((SERVICE,) + spec.service_key)
        for ns, name in pods:
            res = self.store.get(("Pod", ns, name))
            known = self._pods.setdefault(ns, {})
            if res is None:
                known.pop(name, None)
            else:
                known[name] = PodInfo.from_resource(res)
            dirty.add((HOSTPORT, ns, name))
            if self.config.derive_endpoint_slices:
                dirty |= self._selector_services.get(ns, set())
        if node:
            # Node addresses carry NodePort and hostPort frontends: re-plan those owners.
            dirty |= set(self._plans) | set(self._blocked)
        return dirty

    def _order(self, owner: Owner):
        # Services first (hostPorts never take a claim from a Service on a sync), then by
        # age, so claims go to the older object as the API server would have decided.
        created = ""
        spec = self._specs.get(owner[1:]) if owner[0] == SERVICE else None
        if spec is not None:
            created = spec.created
        else:
            res = self.store.get(("Service" if owner[0] == SERVICE else "Pod", owner[1], owner[2]))
            if res is not None:
                created = str((res.body.get("metadata") or {}).get("creationTimestamp") or "")
        return (owner[0] != SERVICE, created == "", created, owner)

    # -- planning -----------------------------------------------------------------------

    def _replan(self, owner: Owner, old: OwnerPlan | None):
        """The owner's new plan, None when it is gone, or False when it is rejected (its
        old plan stays)."""
        try:
            new = self._plan(owner, old)
        except ServiceValidationError as e:
            self._reject(owner, old, e.errors)
            self._warnings[owner] = e.warnings
            return False
        except IDExhausted as e:
            self._reject(owner, old, [ValidationError("", _describe(owner), "", str(e))])
            return False
        if new is None:
            self._errors.pop(owner, None)
            self._warnings.pop(owner, None)
            self._blocked.pop(owner, None)
            return None
        taken = {c: f for c, f in new.claims.items() if self._claims.get(c, owner) != owner}
        if taken:
            # One error per field: a nodePort taken also takes its frontends, say it once.
            by_field: dict[str, tuple] = {}
            for c, f in sorted(taken.items(), key=lambda i: (i[0][0] == "fe", i[1])):
                by_field.setdefault(f, c)
            errors = [ValidationError(self._source(owner), _describe(owner), f,
                                      f"{_claim_text(c)} is already used by {_describe(self._claims[c])}; "
                                      f"this object is rejected until it is free")
                      for f, c in sorted(by_field.items())]
            self._reject(owner, old, errors)
            self._blocked[owner] = set(taken)
            return False
        grow = new.entry_count() - (old.entry_count() if old else 0)
        if self._entry_count + grow > self.config.lb_map_max:
            self._reject(owner, old, [ValidationError(
                self._source(owner), _describe(owner), "",
                f"the services map is full: {self._entry_count} of {self.config.lb_map_max} entries "
                f"used and this object needs {new.entry_count()} (raise --bpf-lb-map-max)")])
            self._blocked[owner] = {("capacity",)}
            return False
        new_backends = sum(1 for k in new.backends if k not in self._backend_refs)
        if len(self._backend_refs) + new_backends > self.config.lb_map_max:
            self._reject(owner, old, [ValidationError(
                self._source(owner), _describe(owner), "",
                f"the backends map is full: {len(self._backend_refs)} of {self.config.lb_map_max} "
                f"backends used and this object adds {new_backends} (raise --bpf-lb-map-max)")])
            self._blocked[owner] = {("capacity",)}
            return False
        self._errors.pop(owner, None)
        self._blocked.pop(owner, None)
        return new

    def _reject(self, owner: Owner, old: OwnerPlan | None, errors: list[ValidationError]) -> None:
        if old is not None:
            note = " (its previous version stays in effect)"
            errors = [ValidationError(e.source, e.obj, e.field, e.message + note) for e in errors]
        self._errors[owner] = errors
        for e in errors:
            log.warning("services: rejected %s", e)

    def _source(self, owner: Owner) -> str:
        res = self.store.get(("Service" if owner[0] == SERVICE else "Pod", owner[1], owner[2]))
        return res.source if res is not None else ""

    def _plan(self, owner: Owner, old: OwnerPlan | None) -> OwnerPlan | None:
        if owner[0] == SERVICE:
            res = self.store.get(("Service", owner[1], owner[2]))
            if res is None:
                self._forget_spec(owner)
                return None
            cached = self._parsed.get(owner)
            if cached is not None and cached[0] is res:
                spec, warnings = cached[1]
            else:
                spec, warnings = parse_service(res, self.config)  # raises for bad input
                self._parsed[owner] = (res, (spec, warnings))
            self._warnings[owner] = warnings
            plan = self._plan_service(owner, spec, old)
            self._specs[owner[1:]] = spec
            selectors = self._selector_services.setdefault(owner[1], set())
            if spec.selector is not None:
                selectors.add(owner)
            else:
                selectors.discard(owner)
            return plan
        res = self.store.get(("Pod", owner[1], owner[2]))
        if res is None:
            self._errors.pop((HOSTPORT + "-fields",) + owner[1:], None)
            return None
        return self._plan_host_ports(owner, res)

    def _forget_spec(self, owner: Owner) -> None:
        self._specs.pop(owner[1:], None)
        self._parsed.pop(owner, None)
        self._selector_services.get(owner[1], set()).discard(owner)

    def _backends_of(self, spec: ServiceSpec) -> dict[int, list[BackendRef]]:
        slice_keys = self._slices_by_service.get(spec.key)
        if slice_keys:
            return eps.from_slices(spec, [self._slices[k] for k in sorted(slice_keys)],
                                   self.config.node, self.pods)
        if spec.selector is not None and self.config.derive_endpoint_slices:
            candidates = self._pods.get(spec.namespace, {}).values()
            return eps.from_pods(spec, candidates, self.config.node, self.pods)
        return {}

    def _plan_service(self, owner: Owner, spec: ServiceSpec, old: OwnerPlan | None) -> OwnerPlan:
        plan = OwnerPlan(owner)
        if not spec.load_balanced:
            return plan
        cluster_ip = spec.cluster_ip
        if cluster_ip is None:
            cluster_ip = self._allocate_cluster_ip(owner, old)
        if cluster_ip:
            plan.cluster_ip = cluster_ip
            plan.claims[("ip", cluster_ip)] = "spec.clusterIP"
        backends = self._backends_of(spec)
        common = SVC_F_AFFINITY if spec.affinity_timeout else 0
        algorithm = spec.algorithm
        effective = algorithm or ALGORITHMS[self.config.algorithm]
        maglev = effective == ALGORITHM_MAGLEV
        two_scopes = spec.etp_local != spec.itp_local
        scoped = ((SVC_F_EXT_LOCAL if spec.etp_local else 0) | (SVC_F_INT_LOCAL if spec.itp_local else 0)
                  | (SVC_F_TWO_SCOPES if two_scopes else 0) | SVC_F_ROUTABLE | common)
        # Explicit nodePorts of this Service are taken before any port is allocated.
        taken_node_ports = {sp.node_port for sp in spec.ports if sp.node_port}
        for sp in spec.ports:
            refs = tuple(backends.get(sp.index, ()))
            local = tuple(r for r in refs if r.local)
            ext = local if spec.etp_local else refs
            internal = local if spec.itp_local else refs

            def add(address: str, port: int, kind: str, flags: int, path: str,
                    external=ext, two=two_scopes) -> None:
                key = (address, port, sp.protocol)
                if key in plan.frontends:
                    raise ServiceValidationError([ValidationError(
                        spec.source, spec.describe(), path,
                        f"frontend {address}:{port}/{protocol_name(sp.protocol)} is already "
                        f"defined by this Service as {plan.frontends[key].type}")])
                plan.frontends[key] = FrontendPlan(
                    key, kind, flags, spec.affinity_timeout, algorithm, maglev, external,
                    internal if two else None, sp.name)
                plan.claims[("fe",) + key] = path

            if cluster_ip:
                # ClusterIPs are east-west only: internalTrafficPolicy decides, one scope.
                add(cluster_ip, sp.port, "ClusterIP",
                    common | (SVC_F_INT_LOCAL if spec.itp_local else 0), "spec.clusterIP",
                    external=internal, two=False)
            if spec.has_node_ports:
                node_port = sp.node_port
                if not node_port and (spec.type == "NodePort" or spec.allocate_lb_node_ports):
                    node_port = self._allocate_node_port(owner, spec, sp, old, taken_node_ports)
                if node_port:
                    taken_node_ports.add(node_port)
                    plan.node_ports[(sp.name, sp.protocol)] = node_port
                    plan.claims[("nodeport", node_port, sp.protocol)] = f"{sp.path}.nodePort"
                    for ip in self._node_ips() + [WILDCARD]:
                        add(ip, node_port, "NodePort", SVC_F_NODEPORT | scoped, f"{sp.path}.nodePort")
            for i, ip in enumerate(spec.external_ips):
                add(ip, sp.port, "ExternalIPs", SVC_F_EXTERNAL_IPS | scoped, f"spec.externalIPs[{i}]")
            for ip in spec.lb_ips:
                add(ip, sp.port, "LoadBalancer", SVC_F_LOADBALANCER | scoped, "status.loadBalancer.ingress")
        for fp in plan.frontends.values():
            for refs in (fp.external, fp.internal or ()):
                for r in refs:
                    prev = plan.backends.get(r.key)
                    plan.backends[r.key] = (r.state, r.local) if prev is None else (
                        min(prev[0], r.state), prev[1] or r.local)
        # Backends of the service that no frontend uses (ETP/ITP Local on a node without
        # local backends) still get an entry: conntrack may hold connections to them.
        for refs in backends.values():
            for r in refs:
                plan.backends.setdefault(r.key, (r.state, r.local))
        return plan

    def _node_ips(self) -> list[str]:
        ips = list(self.config.node_ips)
        node = self.store.get(("Node", "", self.config.node))
        if node is not None:
            for addr in ((node.body.get("status") or {}).get("addresses") or []):
                if isinstance(addr, dict) and addr.get("type") in ("InternalIP", "ExternalIP"):
                    try:
                        ip = str(ipaddress.IPv4Address(addr.get("address")))
                    except ValueError:
                        continue
                    if ip not in ips:
                        ips.append(ip)
        return ips

    def _allocate_node_port(self, owner, spec: ServiceSpec, sp, old: OwnerPlan | None, taken: set) -> int:
        """A nodePort for a port that has none. Kept across changes of the Service; a new
        one starts at a hash of namespace/name/port so that agents that see the same
        Services agree (with a cluster's API server this never runs: it fills them in)."""
        lo, hi = self.config.node_port_range
        previous = old.node_ports.get((sp.name, sp.protocol)) if old else None
        if previous and lo <= previous <= hi and previous not in taken and \
                self._claims.get(("nodeport", previous, sp.protocol), owner) == owner:
            return previous
        size = hi - lo + 1
        start = zlib.crc32(f"{spec.namespace}/{spec.name}/{sp.name}/{sp.protocol}".encode()) % size
        for i in range(size):
            port = lo + (start + i) % size
            if port not in taken and ("nodeport", port, sp.protocol) not in self._claims:
                return port
        raise ServiceValidationError([ValidationError(
            spec.source, spec.describe(), f"{sp.path}.nodePort",
            f"no free nodePort left in {self.config.node_port_range_text}")])

    def _allocate_cluster_ip(self, owner: Owner, old: OwnerPlan | None) -> str:
        """A ClusterIP for a Service whose manifest gives none, from the service CIDR, by
        the same hash-then-probe rule as nodePorts."""
        if old is not None and old.cluster_ip and self._claims.get(("ip", old.cluster_ip)) == owner:
            return old.cluster_ip
        net = ipaddress.IPv4Network(self.config.service_cidr)
        size = max(1, net.num_addresses - 2)
        start = zlib.crc32(f"{owner[1]}/{owner[2]}".encode()) % size
        base = int(net.network_address) + 1
        for i in range(min(size, 65536)):
            ip = str(ipaddress.IPv4Address(base + (start + i) % size))
            if ("ip", ip) not in self._claims:
                return ip
        raise ServiceValidationError([ValidationError(
            self._source(owner), _describe(owner), "spec.clusterIP",
            f"no free address found in {self.config.service_cidr}; set spec.clusterIP")])

    def _plan_host_ports(self, owner: Owner, res: Resource) -> OwnerPlan | None:
        ports, errors, warnings = pod_host_ports(res, self.config)
        key = owner[1:]
        if warnings:
            self._warnings[owner] = warnings
        else:
            self._warnings.pop(owner, None)
        plan = OwnerPlan(owner)
        if errors:
            # The valid hostPorts are served; the invalid ones are reported.
            self._errors[(HOSTPORT + "-fields",) + key] = errors
        else:
            self._errors.pop((HOSTPORT + "-fields",) + key, None)
        if not ports:
            return plan
        info = self._pods.get(owner[1], {}).get(owner[2]) or PodInfo.from_resource(res)
        ip = info.status_ip if info.node_name == self.config.node else None
        ip = ip or self.pods.pod_ip(owner[1], owner[2])
        if ip is None or info.terminating:
            return plan  # not (yet) a pod of this node: no hostPort here
        for hp in ports:
            backend = BackendRef((ip, hp.container_port, hp.protocol), BE_STATE_ACTIVE, True)
            for address in ([hp.host_ip] if hp.host_ip else self._node_ips() + [WILDCARD]):
                fkey = (address, hp.host_port, hp.protocol)
                if fkey in plan.frontends:
                    continue
                plan.frontends[fkey] = FrontendPlan(
                    fkey, "HostPort", SVC_F_HOSTPORT | SVC_F_ROUTABLE, 0, ALGORITHM_DEFAULT,
                    self.config.algorithm == "maglev", (backend,), None, str(hp.host_port))
                plan.claims[("fe",) + fkey] = f"{hp.path}.hostPort"
            plan.backends[backend.key] = (BE_STATE_ACTIVE, True)
        return plan

    def _swap(self, owner: Owner, old: OwnerPlan | None, new: OwnerPlan | None) -> set[tuple]:
        """Makes `new` the owner's plan; returns the claims it released."""
        released = set()
        if old is not None:
            self._entry_count -= old.entry_count()
            for c in old.claims:
                if new is None or c not in new.claims:
                    if self._claims.get(c) == owner:
                        del self._claims[c]
                        released.add(c)
            for key in old.backends:
                refs = self._backend_refs.get(key)
                if refs is not None:
                    refs.pop(owner, None)
                    if not refs:
                        del self._backend_refs[key]
        if new is None or not (new.frontends or new.claims or new.backends):
            self._plans.pop(owner, None)  # nothing to serve (most pods: no hostPorts)
        else:
            self._plans[owner] = new
            self._entry_count += new.entry_count()
            for c in new.claims:
                self._claims[c] = owner
            for key, value in new.backends.items():
                self._backend_refs.setdefault(key, {})[owner] = value
        if old is not None and (new is None or old.entry_count() > new.entry_count()
                                or len(old.backends) > len(new.backends)):
            released.add(("capacity",))
        return released

    # -- the difference -----------------------------------------------------------------

    def _changes(self, touched_fe: dict[FrontendKey, None],
                 touched_be: dict[BackendKey, None]) -> tuple[LBChanges, _Pending]:
        ch = LBChanges()
        pend = _Pending()
        backend_ids: dict[BackendKey, int] = {}
        all_refs, ids, realized_be = self._backend_refs, self._backend_ids, self._realized_backends
        for key in touched_be:
            refs = all_refs.get(key)
            bid = ids.get(key)
            if refs:
                if bid is None:
                    bid = ids.acquire(key)
                if len(refs) == 1:
                    (state, local), = refs.values()
                else:
                    state = min(s for s, _ in refs.values())
                    local = any(loc for _, loc in refs.values())
                row = (key[0], key[1], key[2], state, local)
                if realized_be.get(bid) != row:
                    ch.backends.append(BackendWrite(bid, ipv4_int(key[0]), key[1], key[2], state, local))
                    pend.backends[bid] = row
                backend_ids[key] = bid
            elif bid is not None:
                ch.backend_deletes.append(bid)
                pend.freed_backend_keys.append(key)

        realized = self._realized
        tables: dict[tuple, np.ndarray] = {}

        def remove(fe: FE, old: tuple) -> None:
            ch.service_deletes.append((fe, 0))  # the master first: nothing reaches the slots after
            ch.service_deletes.extend([(fe, s) for s in range(1, len(old[1]) + 1)])
            pend.realized[fe] = None

        for fkey in touched_fe:
            owner = self._claims.get(("fe",) + fkey)
            plan = self._plans[owner].frontends.get(fkey) if owner is not None else None
            address, port, proto = ipv4_int(fkey[0]), fkey[1], fkey[2]
            ext = FE(address, port, proto, SCOPE_EXTERNAL)
            internal = FE(address, port, proto, SCOPE_INTERNAL)
            sid = self._service_ids.get(fkey)
            if plan is None:
                for fe in (ext, internal):
                    old = realized.get(fe)
                    if old is not None:
                        remove(fe, old)
                        if sid is None:
                            sid = old[0]
                if sid is not None:
                    if sid in self._realized_maglev:
                        ch.maglev_deletes.append(sid)
                    if sid in self._realized_revnat:
                        ch.revnat_deletes.append(sid)
                    if self._service_ids.get(fkey) is not None:
                        pend.freed_service_keys.append(fkey)
                continue
            if sid is None:
                sid = self._service_ids.acquire(fkey)
            if self._realized_revnat.get(sid) != (fkey[0], port):
                ch.revnat.append((sid, address, port))
            scopes = [(ext, plan.external)]
            if plan.internal is not None:
                scopes.append((internal, plan.internal))
            elif internal in realized:
                remove(internal, realized[internal])
            for fe, refs in scopes:
                old = realized.get(fe)
                old_ids = old[1] if old is not None else ()
                active = [backend_ids.get(r.key) or ids.get(r.key) for r in refs if r.state == BE_STATE_ACTIVE]
                slots = _slot_order(old_ids, active) if old_ids else active
                moved = old is None or old[0] != sid
                for i, bid in enumerate(slots):
                    if moved or i >= len(old_ids) or old_ids[i] != bid:
                        ch.slots.append(SlotWrite(fe, i + 1, bid, sid))
                # With two scopes Maglev serves the external (north-south) scope; in-node
                # clients pick at random from their own set.
                algorithm = plan.algorithm if fe.scope == SCOPE_EXTERNAL or not plan.maglev else ALGORITHM_RANDOM
                entry = (sid, tuple(slots), plan.flags, plan.affinity_timeout, algorithm, 0)
                if old != entry:
                    if old is None or (old[0], len(old[1])) + old[2:] != (sid, len(slots)) + entry[2:]:
                        ch.masters.append(MasterWrite(fe, sid, len(slots), plan.flags,
                                                      plan.affinity_timeout, algorithm))
                    if len(old_ids) > len(slots):
                        ch.service_deletes.extend([(fe, s) for s in range(len(slots) + 1, len(old_ids) + 1)])
                    pend.realized[fe] = entry
            # Maglev: one table per service ID, from the external scope's active backends.
            signature = None
            if plan.maglev:
                signature = tuple(sorted((r.name, backend_ids.get(r.key) or ids.get(r.key))
                                         for r in plan.external if r.state == BE_STATE_ACTIVE))
            if signature:
                if self._realized_maglev.get(sid) != signature:
                    table = tables.get(signature)
                    if table is None:
                        table = tables[signature] = build_table(
                            signature, self.config.maglev_table_size, self.config.maglev_seed)
                    ch.maglev.append((sid, table))
                    pend.maglev_signatures[sid] = signature
            elif sid in self._realized_maglev:
                ch.maglev_deletes.append(sid)
        # Leftovers a restore found under IDs nothing holds (held by tombstones until now).
        for kind, id_ in self._stale:
            if kind == "backend":
                ch.backend_deletes.append(id_)
                pend.freed_backend_keys.append(("stale", id_))
            else:
                if id_ in self._realized_maglev:
                    ch.maglev_deletes.append(id_)
                if id_ in self._realized_revnat:
                    ch.revnat_deletes.append(id_)
                pend.freed_service_keys.append(("stale", id_))
        self._stale = []
        return ch, pend

    def _commit(self, ch: LBChanges, pend: _Pending) -> None:
        """Records what the writer has just written, and releases what is gone."""
        for fe, entry in pend.realized.items():
            if entry is None:
                self._realized.pop(fe, None)
            else:
                self._realized[fe] = entry
        self._realized_backends.update(pend.backends)
        for bid in ch.backend_deletes:
            self._realized_backends.pop(bid, None)
        for key in pend.freed_backend_keys:
            self._backend_ids.release(key)
        for sid, a, port in ch.revnat:
            self._realized_revnat[sid] = (str(ipaddress.IPv4Address(a)), port)
        for sid in ch.revnat_deletes:
            self._realized_revnat.pop(sid, None)
        for sid, signature in pend.maglev_signatures.items():
            self._realized_maglev[sid] = signature
        for sid in ch.maglev_deletes:
            self._realized_maglev.pop(sid, None)
        for fkey in pend.freed_service_keys:
            self._service_ids.release(fkey)

    def _restore(self) -> None:
        """Reads what the maps hold: the realized state the next diff starts from, and
        the IDs to keep. Planned IDs that the maps do not show are kept as allocated."""
        realized = self.writer.dump()
        # Maglev tables are not read back (a table is 64 KiB); one this manager wrote and
        # the map still holds keeps its signature, others are rewritten.
        known_tables = self._realized_maglev
        self._realized = {}
        self._realized_backends = {}
        self._realized_revnat = {}
        self._realized_maglev = {}
        self._stale = []
        for be in realized.backends:
            key = (str(be.address), be.port, be.proto)
            self._realized_backends[be.backend_id] = key + (be.state, be.local)
            if self._backend_ids.get(key) is None:
                self._backend_ids.restore(key, be.backend_id)
            if self._backend_ids.get(key) != be.backend_id and self._backend_ids.key_of(be.backend_id) is None:
                # A second ID for a known backend: deleted, and its ID held until then.
                self._backend_ids.restore(("stale", be.backend_id), be.backend_id)
                self._stale.append(("backend", be.backend_id))
        for entry in realized.services:
            fe = entry.frontend
            self._realized[FE.of(fe)] = (entry.service_id, tuple(entry.backend_ids), entry.flags,
                                         entry.affinity_timeout, entry.algorithm, entry.qcount)
            key = (str(fe.address), fe.port, fe.proto)
            if self._service_ids.get(key) is None:
                self._service_ids.restore(key, entry.service_id)
        for sid, a, port in realized.revnat:
            self._realized_revnat[sid] = (str(a), port)
        for sid in realized.maglev:
            self._realized_maglev[sid] = known_tables.get(sid, ("unknown",))
        for sid in sorted(set(self._realized_revnat) | set(self._realized_maglev)):
            if self._service_ids.key_of(sid) is None:
                self._service_ids.restore(("stale", sid), sid)
                self._stale.append(("service", sid))
        self._needs_restore = False
        log.info("services: maps hold %d frontends, %d backends", len(self._realized),
                 len(self._realized_backends))

    # -- views --------------------------------------------------------------------------

    def frontend_service(self, ip: str, port: int, protocol: int) -> tuple[str, str] | None:
        """(name, namespace) of the Service serving this frontend, for Hubble."""
        owner = self._claims.get(("fe", ip, port, protocol))
        if owner is None or owner[0] != SERVICE:
            return None
        return owner[2], owner[1]

    def _backend_view(self, r: BackendRef) -> dict:
        addr, port, proto = r.key
        return {"id": self._backend_ids.get(r.key), "address": addr, "port": port,
                "protocol": protocol_name(proto), "state": BACKEND_STATES.get(r.state, str(r.state)),
                "local": r.local}

    def _frontend_view(self, owner: Owner, fp: FrontendPlan) -> dict:
        addr, port, proto = fp.key
        algorithm = ALGORITHM_NAMES.get(fp.algorithm) or f"{self.config.algorithm} (default)"
        view = {
            "id": self._service_ids.get(fp.key),
            "frontend": f"{addr}:{port}/{protocol_name(proto)}",
            "address": addr, "port": port, "protocol": protocol_name(proto),
            "type": fp.type, "flags": flag_names(fp.flags),
            "namespace": owner[1], "name": owner[2],
            "kind": "Pod" if owner[0] == HOSTPORT else "Service", "port_name": fp.port_name,
            "algorithm": algorithm, "session_affinity_timeout": fp.affinity_timeout,
            "backends": [self._backend_view(r) for r in sorted(fp.external, key=_numeric)],
        }
        if fp.internal is not None:
            view["internal_backends"] = [self._backend_view(r) for r in sorted(fp.internal, key=_numeric)]
        return view

    def service_views(self) -> list[dict]:
        with self._lock:
            views = [self._frontend_view(owner, fp) for owner, plan in self._plans.items()
                     for fp in plan.frontends.values()]
        return sorted(views, key=lambda v: (v["id"] or 0, v["frontend"]))

    def service_view(self, service_id: int) -> dict | None:
        with self._lock:
            key = self._service_ids.key_of(service_id)
            owner = self._claims.get(("fe",) + key) if key is not None else None
            if owner is None:
                return None
            return self._frontend_view(owner, self._plans[owner].frontends[key])

    def problems(self) -> dict[str, list[dict]]:
        with self._lock:
            errors = [e.to_dict() for errs in self._errors.values() for e in errs]
            warnings = [e.to_dict() for ws in self._warnings.values() for e in ws]
            for (ns, svc), keys in self._slices_by_service.items():
                if keys and (SERVICE, ns, svc) not in self._plans and (SERVICE, ns, svc) not in self._errors:
                    for key in sorted(keys):
                        sl = self._slices[key]
                        warnings.append(ValidationError(
                            sl.source, f"EndpointSlice {ns}/{key[1]}", f"metadata.labels[{SERVICE_NAME_LABEL}]",
                            f"Service {ns}/{svc} does not exist (yet); its endpoints are kept and "
                            f"used when it appears").to_dict())
        key = lambda d: (d["object"], d["field"])  # noqa: E731
        return {"rejected": sorted(errors, key=key), "warnings": sorted(warnings, key=key)}

    def status(self) -> dict:
        with self._lock:
            counts = {"services": sum(1 for o in self._plans if o[0] == SERVICE),
                      "frontends": len(self._service_ids), "backends": len(self._backend_ids),
                      "rejected": sum(len(v) for v in self._errors.values())}
            types = sorted({fp.type for plan in self._plans.values() for fp in plan.frontends.values()})
        return {
            "enabled": True,
            "socket_lb": self.socket_lb,
            "node_port_range": self.config.node_port_range_text,
            "node_port_addresses": self._node_ips(),
            "algorithm": self.config.algorithm,
            "maglev_table_size": self.config.maglev_table_size,
            "acceleration": self.acceleration,
            "session_affinity": True,
            "protocols": ["TCP", "UDP"],
            "service_types_in_use": types,
            "revision": self.revision, "realized_revision": self.realized_revision,
            "syncs": self.syncs, "failures": self.failures, "last_error": self.last_error,
            **counts,
        }

    def close(self) -> None:
        self.writer.close()
