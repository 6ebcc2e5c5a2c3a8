"""The service manager: Services, EndpointSlices, Pods (hostPorts, selectors) and Nodes
from the store, turned into the lb maps of this node.

Desired state is planned per *owner*: a Service, or a Pod with hostPorts (plan.py). A
plan's claims on unique resources (ClusterIPs, nodePorts, frontends) are checked here: a
claim held by another owner rejects the plan (the first owner keeps working, the later
one is reported and retried when the claim is released); an invalid object is rejected
with every field at fault, and its previous valid plan stays in effect. Missing
ClusterIPs, nodePorts and the service and backend IDs come from allocators.py.

Only owners touched by a change are re-planned, and only the frontends and backends of
those owners are compared with what the maps hold (diff.py), so the cost of a sync
follows the change, not the number of services. The comparison is against the realized
state (what this manager wrote, or read back from the pinned maps by restore.py at start,
after a failed write and every resync interval), so leftovers of an earlier agent are
removed and a failed write or an entry changed behind the agent's back is repaired.

Store events only mark what changed; the passes run on the agent's one reconcile loop
(reconcile.py), with its retry rule.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

from cilium_py.agent.errors import ValidationError
from cilium_py.agent.objects import SERVICE_NAME_LABEL, EndpointSlice, Pod, Resource, Service
from cilium_py.agent.reconcile import Dirty, Reconciler
from cilium_py.agent.services import endpoints as eps
from cilium_py.agent.services.addr import ipv4_int
from cilium_py.agent.services.allocators import ClusterIPAllocator, IDExhausted, NodePortAllocator
from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.services.diff import RealizedBooks, diff
from cilium_py.agent.services.endpoints import BackendKey, BackendRef, PodAddresses
from cilium_py.agent.services.parse import (
    HostPort,
    ServiceValidationError,
    check_service,
    host_ports,
    slice_warnings,
)
from cilium_py.agent.services.plan import (
    HOSTPORT,
    SERVICE,
    SLICE,
    FrontendKey,
    FrontendPlan,
    Owner,
    OwnerPlan,
    claim_text,
    describe,
    plan_host_ports,
    plan_service,
)
from cilium_py.agent.services.restore import restore
from cilium_py.agent.services.writer import LBChanges, LBWriter
from cilium_py.agent.store import Store
from cilium_py.datapath.maps.lb import ALGORITHMS, BACKEND_STATES, flag_names
from cilium_py.datapath.reasons import protocol_name

log = logging.getLogger(__name__)

ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
# The reconciler's dirty sets: Service owners, EndpointSlices and Pods by (namespace,
# name), and the node (its addresses carry NodePort and hostPort frontends).
OWNERS, SLICES, PODS, NODE = "owners", "slices", "pods", "node"


class CheckedPod(NamedTuple):
    host_ports: list[HostPort]
    errors: list[ValidationError]      # hostPorts this node cannot serve (the others are served)
    warnings: list[ValidationError]


def _numeric(ref: BackendRef):
    """Display order: by address as a number (10.0.0.9 before 10.0.0.10)."""
    return (ipv4_int(ref.key[0]), ref.key[1], ref.key[2])


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


class ServiceManager:
    """One node's Services: store events in, lb map writes out (through `writer`), views
    and problems for the API. Thread-safe: passes and views take one lock."""

    def __init__(self, store: Store, writer: LBWriter, config: ServiceConfig,
                 pods: PodAddresses | None = None, socket_lb: bool = False,
                 acceleration: str = "disabled", resync_interval: float = 300.0):
        """`resync_interval`: how often, with nothing changing, the maps are re-read and
        what differs from the books is repaired."""
        self.store = store
        self.writer = writer
        self.config = config
        self.pods = pods or PodAddresses()
        self.socket_lb = socket_lb
        self.acceleration = acceleration
        self._lock = threading.RLock()        # the books: plans, claims, realized state
        # desired state
        self._plans: dict[Owner, OwnerPlan] = {}
        self._claims: dict[tuple, Owner] = {}
        self._backend_refs: dict[BackendKey, dict[Owner, tuple[int, bool]]] = {}
        self._specs: dict[tuple[str, str], Service] = {}          # applied Services
        self._checked: dict[tuple, tuple[Resource, object]] = {}  # _check's cache by object version
        self._slices: dict[tuple[str, str], EndpointSlice] = {}   # (ns, name) -> slice
        self._slices_by_service: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._pods: dict[str, dict[str, Pod]] = {}                # namespace -> name -> pod
        self._selector_services: dict[str, set[Owner]] = {}       # namespace -> Services with selectors
        self._entry_count = 0
        self._cluster_ips = ClusterIPAllocator(config.service_cidr, self._claims)
        self._node_ports = NodePortAllocator(config.node_port_range, self._claims)
        # problems
        self._errors: dict[Owner | tuple, list[ValidationError]] = {}
        self._warnings: dict[Owner | tuple, list[ValidationError]] = {}
        self._blocked: dict[Owner, set[tuple]] = {}
        # realized state
        self._books = RealizedBooks()
        self._needs_restore = True
        self.generation = 0
        self.last_changes: dict[str, int] = {}
        self._reconciler = Reconciler("services", self._reconcile, (OWNERS, SLICES, PODS, NODE),
                                      store=store, resync_interval=resync_interval,
                                      on_resync=self.repair_from_maps, lock=self._lock)
        self._unsubscribe = store.subscribe(self._on_change)

    # -- events -------------------------------------------------------------------------

    def _on_change(self, event: str, old: Resource | None, new: Resource | None) -> None:
        res = new or old
        kind = res.kind
        ns = res.namespace or ""
        if kind == "Service":
            self._reconciler.mark(OWNERS, (SERVICE, ns, res.name))
        elif kind == SLICE:
            self._reconciler.mark(SLICES, (ns, res.name))
        elif kind == "Pod":
            self._reconciler.mark(PODS, (ns, res.name))
        elif kind == "Node" and res.name == self.config.node:
            self._reconciler.mark(NODE, True)

    def pods_changed(self, keys) -> None:
        """The node's endpoints changed (addresses appeared or went): pods whose backends
        or hostPorts depend on them are re-planned. `keys` are "namespace/name"."""
        self.pods.invalidate()
        pods = [(ns, name) for ns, _, name in (key.partition("/") for key in keys)]
        if pods:
            self._reconciler.mark(PODS, *pods)

    def repair_from_maps(self) -> None:
        """The next sync re-reads the maps and compares every plan with them (the loop
        asks for it every resync interval)."""
        self._needs_restore = True

    # -- the loop -----------------------------------------------------------------------

    def start(self, before_first_sync: Callable[[], object] | None = None) -> None:
        """Syncs from a thread whenever something changed. `before_first_sync` runs first
        (the agent waits there for its endpoints, so backends of a restarted agent are
        not removed and written again)."""
        self._reconciler.start(before_first_sync)

    def stop(self) -> None:
        self._reconciler.stop()
        self._unsubscribe()

    @property
    def revision(self) -> int:
        return self._reconciler.revision

    @property
    def realized_revision(self) -> int:
        return self._reconciler.realized_revision

    def wait_for_revision(self, revision: int, timeout: float) -> bool:
        return self._reconciler.wait_for_revision(revision, timeout)

    @property
    def syncs(self) -> int:
        return self._reconciler.status.runs

    @property
    def controller_status(self):
        """The services loop's status, listed with the agent's other controllers."""
        return self._reconciler.status

    @property
    def failures(self) -> int:
        return self._reconciler.status.failures

    @property
    def last_error(self) -> str:
        return self._reconciler.status.last_error

    # -- sync ---------------------------------------------------------------------------

    def sync(self) -> LBChanges:
        """Plans what changed and writes the difference, in the caller's thread; returns
        what was written."""
        return self._reconciler.run_once()

    def _reconcile(self, dirty: Dirty, revision: int) -> LBChanges:
        try:
            with _gc_paused():
                return self._sync(dirty[SLICES], dirty[PODS], bool(dirty[NODE]), dirty[OWNERS])
        except Exception:
            # The reconciler puts back what this pass was given; the next one also
            # re-reads the maps, as the write may have been half done.
            self._needs_restore = True
            raise

    def _sync(self, slices: set, pods: set, node: bool, owners: set) -> LBChanges:
        # Ordered sets (dicts): IDs are handed out in the order owners and their frontends
        # were planned, so the same manifests give the same IDs.
        touched_fe: dict[FrontendKey, None] = {}
        touched_be: dict[BackendKey, None] = {}
        if self._needs_restore:
            held_frontends, held_backends = restore(self._books, self.writer.dump())
            self._needs_restore = False
            for plan in self._plans.values():
                touched_fe.update(dict.fromkeys(plan.frontends))
            touched_fe.update(dict.fromkeys(held_frontends))
            touched_be.update(dict.fromkeys(self._backend_refs))
            touched_be.update(dict.fromkeys(held_backends))
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
                self._reconciler.put_back({OWNERS: pending})
                self._reconciler.wake()
                break
        changes, pending_books = diff(self._books, self._desired_frontend, self._backend_refs,
                                      touched_fe, touched_be, self.config.maglev_table_size,
                                      self.config.maglev_seed)
        if changes:
            self.writer.apply(changes)
            self.generation += 1
        self._books.commit(changes, pending_books)
        self.last_changes = changes.counts()
        return changes

    def _desired_frontend(self, key: FrontendKey) -> FrontendPlan | None:
        owner = self._claims.get(("fe",) + key)
        return self._plans[owner].frontends.get(key) if owner is not None else None

    # -- reading objects ----------------------------------------------------------------

    def _check(self, obj: Resource):
        """The one place the store's (already parsed, valid) objects are checked against
        this node's datapath and flags (parse.py), cached per object version:
        Service -> warnings, raising ServiceValidationError for what this node cannot
        serve; EndpointSlice -> warnings; Pod -> CheckedPod."""
        cached = self._checked.get(obj.key)
        if cached is not None and cached[0] is obj:
            return cached[1]
        if isinstance(obj, Service):
            checked = check_service(obj, self.config)
        elif isinstance(obj, EndpointSlice):
            checked = slice_warnings(obj)
        elif isinstance(obj, Pod):
            checked = CheckedPod(*host_ports(obj, self.config))
        else:
            raise ValueError(f"the service manager checks no {obj.kind} objects")
        self._checked[obj.key] = (obj, checked)
        return checked

    def _node_ips(self) -> list[str]:
        ips = list(self.config.node_ips)
        node = self.store.get(("Node", "", self.config.node))
        if node is not None:
            ips.extend(ip for ip in node.ipv4_addresses() if ip not in ips)
        return ips

    # -- what changed -------------------------------------------------------------------

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
            spec = self.store.get((SLICE, key[0], key[1]))
            if spec is None:
                self._checked.pop((SLICE,) + key, None)
                continue
            warnings = self._check(spec)
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
                self._checked.pop(("Pod", ns, name), None)
            else:
                known[name] = res
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
                created = res.created
        return (owner[0] != SERVICE, created == "", created, owner)

    # -- planning and claims ------------------------------------------------------------

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
            self._reject(owner, old, [ValidationError("", describe(owner), "", str(e))])
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
            errors = [ValidationError(self._source(owner), describe(owner), f,
                                      f"{claim_text(c)} is already used by {describe(self._claims[c])}; "
                                      f"this object is rejected until it is free")
                      for f, c in sorted(by_field.items())]
            self._reject(owner, old, errors)
            self._blocked[owner] = set(taken)
            return False
        grow = new.entry_count() - (old.entry_count() if old else 0)
        if self._entry_count + grow > self.config.lb_map_max:
            return self._reject_full(owner, old, f"the services map is full: {self._entry_count} of "
                                     f"{self.config.lb_map_max} entries used and this object needs "
                                     f"{new.entry_count()}")
        new_backends = sum(1 for k in new.backends if k not in self._backend_refs)
        if len(self._backend_refs) + new_backends > self.config.lb_map_max:
            return self._reject_full(owner, old, f"the backends map is full: {len(self._backend_refs)} of "
                                     f"{self.config.lb_map_max} backends used and this object adds "
                                     f"{new_backends}")
        self._errors.pop(owner, None)
        self._blocked.pop(owner, None)
        return new

    def _reject_full(self, owner: Owner, old: OwnerPlan | None, message: str) -> bool:
        """Rejects a plan the maps have no room for; it is retried when room is released."""
        self._reject(owner, old, [ValidationError(self._source(owner), describe(owner), "",
                                                  f"{message} (raise --bpf-lb-map-max)")])
        self._blocked[owner] = {("capacity",)}
        return False

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
            spec = self.store.get(("Service", owner[1], owner[2]))
            if spec is None:
                self._forget_spec(owner)
                return None
            self._warnings[owner] = self._check(spec)  # raises for what this node cannot serve
            plan = plan_service(owner, spec, self._backends_of(spec), self.config, self._node_ips(),
                                self._cluster_ips, self._node_ports, old)
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
        self._checked.pop(("Service",) + owner[1:], None)
        self._selector_services.get(owner[1], set()).discard(owner)

    def _backends_of(self, spec: Service) -> dict[int, list[BackendRef]]:
        slice_keys = self._slices_by_service.get(spec.service_key)
        if slice_keys:
            return eps.from_slices(spec, [self._slices[k] for k in sorted(slice_keys)],
                                   self.config.node, self.pods)
        if spec.selector is not None and self.config.derive_endpoint_slices:
            candidates = self._pods.get(spec.namespace, {}).values()
            return eps.from_pods(spec, candidates, self.config.node, self.pods)
        return {}

    def _plan_host_ports(self, owner: Owner, pod: Pod) -> OwnerPlan:
        checked = self._check(pod)
        key = owner[1:]
        if checked.warnings:
            self._warnings[owner] = checked.warnings
        else:
            self._warnings.pop(owner, None)
        if checked.errors:
            # The hostPorts this node can serve are served; the others are reported.
            self._errors[(HOSTPORT + "-fields",) + key] = checked.errors
        else:
            self._errors.pop((HOSTPORT + "-fields",) + key, None)
        if not checked.host_ports:
            return OwnerPlan(owner)
        ip = pod.ip if pod.node_name == self.config.node else None
        ip = ip or self.pods.pod_ip(owner[1], owner[2])
        if ip is None or pod.terminating:
            return OwnerPlan(owner)  # not (yet) a pod of this node: no hostPort here
        return plan_host_ports(owner, checked.host_ports, ip, self.config, self._node_ips())

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
        if new is None or new.empty:
            self._plans.pop(owner, None)
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

    # -- views --------------------------------------------------------------------------

    def frontend_service(self, ip: str, port: int, protocol: int) -> tuple[str, str] | None:
        """(name, namespace) of the Service serving this frontend, for Hubble."""
        owner = self._claims.get(("fe", ip, port, protocol))
        if owner is None or owner[0] != SERVICE:
            return None
        return owner[2], owner[1]

    def _backend_view(self, r: BackendRef) -> dict:
        addr, port, proto = r.key
        return {"id": self._books.backend_ids.get(r.key), "address": addr, "port": port,
                "protocol": protocol_name(proto), "state": BACKEND_STATES.get(r.state, str(r.state)),
                "local": r.local}

    def _frontend_view(self, owner: Owner, fp: FrontendPlan) -> dict:
        addr, port, proto = fp.key
        algorithm = ALGORITHM_NAMES.get(fp.algorithm) or f"{self.config.algorithm} (default)"
        view = {
            "id": self._books.service_ids.get(fp.key),
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
            key = self._books.service_ids.key_of(service_id)
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
                      "frontends": len(self._books.service_ids), "backends": len(self._books.backend_ids),
                      "rejected": sum(len(v) for v in self._errors.values())}
            types = sorted({fp.type for plan in self._plans.values() for fp in plan.frontends.values()})
            node_ips = self._node_ips()
        return {
            "enabled": True,
            "socket_lb": self.socket_lb,
            "node_port_range": self.config.node_port_range_text,
            "node_port_addresses": node_ips,
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
