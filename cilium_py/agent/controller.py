"""The control plane of one node: from the store's objects to endpoints, identities and
policy-map state.

Store callbacks run on per-object queues and only mark what changed; one reconcile loop
(agent/reconcile.py) then brings the node to the desired state, coalescing bursts of
changes. Every change bumps the policy revision; each endpoint records the revision its
maps realize, so `policy wait` and `lab apply` can wait for enforcement.

Only what changed is written: PolicyWriter diffs each endpoint's entries against the map,
and identities, addresses and endpoints are created or released as pods come and go.

Failures are never silent and never open: an endpoint whose policy cannot be written (its
share of the policy map exceeded, a full map, a kernel error) keeps its previous policy,
or denies everything if it never had one (endpoints are created closed), is marked
not-ready with the reason, and is retried with the loop's backoff; `policy wait` names it.

Everything the controller drives on the node goes through a NodeBackend (agent/backend.py):
the kernel in the agent, memory in the unit tests.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from dataclasses import dataclass

from cilium_py.agent.backend import NodeBackend, kernel_backend
from cilium_py.agent.endpoints import EndpointHandle
from cilium_py.agent.hooks import EndpointHooks
from cilium_py.agent.identity import IdentityAllocator
from cilium_py.agent.ipam import IPAM
from cilium_py.agent.ipcache import SOURCE_GENERATED
from cilium_py.agent.labels import endpoint_labels, format_labels, labels_key
from cilium_py.agent.objects import Pod
from cilium_py.agent.policy.mapstate import PolicyRealizeError, PolicyWriter
from cilium_py.agent.policy.repository import PolicyRepository
from cilium_py.agent.policy.resolve import NAMESPACE_KEY, EndpointContext, PeerIndex, resolve
from cilium_py.agent.policy.selector import IN
from cilium_py.agent.reconcile import ControllerStatus, Reconciler
from cilium_py.agent.store import Resource, Store
from cilium_py.datapath.config import DatapathConfig
from cilium_py.vocab import EGRESS, INGRESS, POLICY_KINDS, protocol_name

log = logging.getLogger(__name__)

READY, NOT_READY = "ready", "not-ready"
PODS, NAMESPACES, SELECTORS = "pods", "namespaces", "selectors"
WORLD_ENTITIES = frozenset({"world", "world-ipv4"})  # cover every CIDR identity (resolve.py)


@dataclass
class LocalEndpoint:
    pod_key: str                    # "namespace/name"
    handle: EndpointHandle
    labels: dict
    identity: int
    named_ports: dict
    container_ports: list           # [(port, "TCP"|"UDP"|"SCTP")]
    realized_revision: int = 0
    ingress_enforced: bool = True   # created closed: denies until its policy is written
    egress_enforced: bool = True
    rule_count: int = 0
    state: str = NOT_READY
    error: str = ""
    has_policy: bool = False        # some policy was realized at least once


@dataclass
class ControlPlaneConfig:
    datapath: DatapathConfig
    node_netns: str
    router_ip: str
    pod_cidr: str
    state_dir: str
    lab: bool = False          # adopt pods without nodeName (their listeners: the lab's hooks)
    node_ips: tuple = ()
    policy_map_max: int = 16384  # --bpf-policy-map-max: entries one endpoint may have
    node_name: str = ""        # the pods' spec.nodeName on this node ("": the datapath's node)

    @property
    def pod_node_name(self) -> str:
        return self.node_name or self.datapath.node


def pod_ports(pod: Pod) -> tuple[dict, list]:
    return pod.named_ports, [(p.port, protocol_name(p.protocol)) for p in pod.ports]


class ControlPlane:
    def __init__(self, config: ControlPlaneConfig, store: Store, backend: NodeBackend | None = None,
                 hooks: EndpointHooks | None = None, identities=None):
        """`identities`: the allocator (IdentityAllocator's interface); by default the
        node's file-backed one. In Kubernetes mode the agent passes the CiliumIdentity one
        (agent/k8s/identities.py)."""
        self.config = config
        self.store = store
        self.hooks = hooks or EndpointHooks()
        os.makedirs(config.state_dir, exist_ok=True)
        self.identities = identities if identities is not None else IdentityAllocator(
            os.path.join(config.state_dir, "identities.json"))
        self.ipam = IPAM(config.pod_cidr, reserved=[config.router_ip],
                         state_file=os.path.join(config.state_dir, "ipam.json"))
        self.repo = PolicyRepository()
        self.backend = backend or kernel_backend(config.datapath, config.node_netns, config.router_ip)
        self.manager = self.backend.endpoints
        self.ipcache = self.backend.ipcache
        self.writer = PolicyWriter(self.backend.policy_map, self.backend.endpoint_map,
                                   budget=config.policy_map_max)
        self.endpoints: dict[str, LocalEndpoint] = {}
        self._by_namespace: dict[str, set[str]] = {}  # namespace -> endpoint keys
        self.source_errors_fn = lambda: []  # the agent points this at its sources' errors
        # Called with the pod keys whose endpoints a regeneration created, changed or
        # removed (the service manager derives backends and hostPorts from them).
        self.endpoint_listeners: list = []
        self.reconciler = Reconciler("policy-regeneration", self.regenerate,
                                     (PODS, NAMESPACES, SELECTORS), store=store)
        self.controllers: dict[str, ControllerStatus] = {"policy-regeneration": self.reconciler.status}
        # Bumped after every regeneration: readers that cache what endpoints, identities
        # or policies say (Hubble's flow enrichment) drop their caches when it moves.
        self.generation = 0
        self._first_run = True
        self._cidr_ids: dict[ipaddress.IPv4Network, int] = {}
        self._cidr_prefixes_seen: frozenset = frozenset()
        # The identities (id -> labels) the last pass resolved against: what came or went
        # since, by this node's pods or (Kubernetes mode) other nodes', is the difference.
        self._identities_seen: dict[int, dict] = {}
        self._lock = threading.RLock()
        store.subscribe(self._on_change)

    @property
    def revision(self) -> int:
        return self.reconciler.revision

    # -- events ---------------------------------------------------------------------

    def _on_change(self, event: str, old: Resource | None, new: Resource | None) -> None:
        res = new or old
        if res.kind in POLICY_KINDS:
            # Not under the regeneration lock: the repository has its own, and a store
            # worker must not wait out a long pass.
            self.reconciler.mark(SELECTORS, *self._on_policy(event, res))
        elif res.kind == "Pod":
            self.reconciler.mark(PODS, f"{res.namespace}/{res.name}")
        elif res.kind == "Namespace":
            self.reconciler.mark(NAMESPACES, res.name)
        elif res.kind == "CiliumIdentity":
            # Another node's identity came or went: the next pass sees it in the allocator
            # (which indexes these objects) and resolves the rules whose peers it matches.
            self.reconciler.bump()
        # Services, EndpointSlices and Nodes are the service manager's

    def _on_policy(self, event: str, res: Resource) -> set:
        """Updates the repository; returns the subject selectors whose endpoints need a new
        resolution (those of the old and of the new version of the policy)."""
        key = res.key
        if event == "delete":
            return self.repo.delete(key)
        return self.repo.upsert(key, res.rules)  # parsed by the source: only valid policies get here

    # -- regeneration -----------------------------------------------------------------

    def start(self) -> None:
        self.reconciler.start()

    def stop(self) -> None:
        self.reconciler.stop()

    def _is_ours(self, pod: Pod) -> bool:
        assigned = pod.node_name
        return assigned == self.config.pod_node_name or (assigned is None and self.config.lab)

    def _node_pods(self) -> dict[str, Resource]:
        return {f"{p.namespace}/{p.name}": p for p in self.store.list("Pod") if self._is_ours(p)}

    def _node_pods_of(self, keys) -> dict[str, Resource]:
        """The pods behind these keys that are ours, read one by one: a change to one pod
        must not cost a walk over the whole store."""
        pods = {}
        for key in keys:
            namespace, _, name = key.partition("/")
            pod = self.store.get(("Pod", namespace, name))
            if pod is not None and self._is_ours(pod):
                pods[key] = pod
        return pods

    def _endpoints_selected(self, selector, skip: set) -> set[str]:
        """Endpoint keys a subject selector matches. Namespaced policies pin the namespace,
        so only that namespace's endpoints are tested."""
        candidates = self.endpoints.keys()
        for req in selector.requirements:
            if req.key == NAMESPACE_KEY and req.operator == IN and req.source in (None, "k8s"):
                candidates = [k for ns in req.values for k in self._by_namespace.get(ns, ())]
                break
        return {k for k in candidates if k not in skip and selector.matches(self.endpoints[k].labels)}

    def _namespace_labels(self, namespace: str) -> dict:
        ns = self.store.get(("Namespace", "", namespace))
        return dict(ns.labels) if ns is not None else {}  # endpoint_labels adds the name label

    def regenerate(self, dirty: dict, revision: int) -> None:
        """Brings the endpoints a change can affect to the desired state:
        pods that changed (or whose namespace did), endpoints a changed policy selects, and
        endpoints whose policies name a peer identity that appeared or went away. Everything
        else keeps its map state untouched, so the cost follows the change, not the node."""
        with self._lock:
            try:
                self._regenerate(set(dirty[PODS]), dirty[NAMESPACES], dirty[SELECTORS], revision)
            except BaseException:
                # What this pass learnt on the way (identities that came or went, the CIDR
                # set) is not in the dirty sets it gives back: the retry resolves everything.
                self._first_run = True
                raise

    def _regenerate(self, dirty_pods: set, namespaces: set, selectors: set, revision: int) -> None:
        full = self._first_run
        if full or namespaces:
            pods = self._node_pods()
        else:
            pods = self._node_pods_of(dirty_pods)
        if full:
            dirty_pods |= set(pods) | set(self.endpoints)
            for key in [k for k in self.ipam.allocated() if k not in pods]:
                self._remove_stale(key)  # left by an agent that stopped before the pod went away
        dirty_pods |= {k for k in pods if k.split("/")[0] in namespaces}

        to_resolve: set[str] = set()
        for key in dirty_pods:
            if key not in pods:
                if key in self.endpoints:
                    self._remove_endpoint(key)
                continue
            try:
                self._ensure_endpoint(key, pods[key])
                to_resolve.add(key)
            except Exception as e:  # noqa: BLE001 - one pod failing must not stop the others
                self._endpoint_failed(key, f"endpoint: {e}")
                log.exception("endpoint %s failed; retrying", key)
        identities = self.identities.all()
        seen = self._identities_seen
        changed_ids = set(seen) ^ set(identities)
        changed_labels = [identities.get(i) or seen.get(i) for i in changed_ids]
        subjects = set(selectors) | self._subjects_with_peers([l for l in changed_labels if l])
        # A CIDR peer or the world entity covers every CIDR identity the repository names,
        # including those of other policies: when that set moves, their endpoints must be
        # resolved again, or they keep entries for an identity that was just released (and
        # may be handed to another prefix).
        cidr_prefixes = frozenset(self.repo.cidr_prefixes())
        if cidr_prefixes != self._cidr_prefixes_seen:
            subjects |= self._subjects_covering_cidrs()
            self._cidr_prefixes_seen = cidr_prefixes
        for selector in subjects:
            to_resolve |= self._endpoints_selected(selector, to_resolve)
        readiness_moved = self._apply_policy(revision, to_resolve, identities)
        # After the policy pass: an endpoint serves (is a backend) only once it is ready.
        for listener in self.endpoint_listeners:
            listener(dirty_pods | readiness_moved)
        self._identities_seen = identities
        # Allocations a previous agent persisted but no pod claimed on this run.
        self.identities.forget_unused()
        if full:
            # Everything this node knows is claimed now: what else the pinned ipcache holds
            # was written for pods or policies that went away while no agent ran.
            self.ipcache.prune()
        self._first_run = False
        self.generation += 1

    def _endpoint_failed(self, key: str, error: str) -> None:
        """Marks the endpoint not-ready with the reason and retries it after its backoff."""
        status = self.controllers.setdefault(f"endpoint-{key}", ControllerStatus())
        status.runs += 1
        status.failed(error)
        ep = self.endpoints.get(key)
        if ep is not None:
            ep.state, ep.error = NOT_READY, error
        self.reconciler.requeue(PODS, key)

    def _endpoint_succeeded(self, key: str) -> None:
        status = self.controllers.setdefault(f"endpoint-{key}", ControllerStatus())
        status.runs += 1
        status.succeeded()
        self.reconciler.succeeded(PODS, key)

    def _subjects_with_peers(self, labels_list: list) -> set:
        """Subject selectors of the rules that have a peer an identity with one of these
        label sets would match: that identity appearing or leaving changes their map state.
        One pass over the rules, not one per endpoint."""
        if not labels_list:
            return set()
        subjects = set()
        for key in self.repo.keys():
            for rule in self.repo.get(key) or ():
                if self._rule_peers_match(rule, labels_list):
                    subjects.add(rule.subject)
        return subjects

    def _subjects_covering_cidrs(self) -> set:
        subjects = set()
        for key in self.repo.keys():
            for rule in self.repo.get(key) or ():
                if any(peer.cidrs or not WORLD_ENTITIES.isdisjoint(peer.entities)
                       for direction in (INGRESS, EGRESS) for peer in rule.entries(direction)):
                    subjects.add(rule.subject)
        return subjects

    @staticmethod
    def _rule_peers_match(rule, labels_list: list) -> bool:
        for direction in (INGRESS, EGRESS):
            for peer in rule.entries(direction):
                # Of the entities only `cluster` grows with pods; host, world and the other
                # reserved ones are fixed identities.
                if "cluster" in peer.entities:
                    return True
                if any(sel.matches(labels) for sel in peer.endpoints for labels in labels_list):
                    return True
        return False

    def _ensure_endpoint(self, key: str, pod: Pod) -> None:
        labels = endpoint_labels(pod.labels, pod.namespace, self._namespace_labels(pod.namespace),
                                 pod.service_account)
        named, ports = pod_ports(pod)
        ep = self.endpoints.get(key)
        if ep is not None:
            if labels_key(labels) != labels_key(ep.labels):
                identity = self.identities.acquire(labels)
                self.manager.set_identity(ep.handle.ip, identity)
                self._release_identity(ep)
                ep.labels, ep.identity = labels, identity
            ep.named_ports, ep.container_ports = named, ports
            return
        identity = self.identities.acquire(labels)
        try:
            ip = self.ipam.allocate(key)
            name = key.replace("/", "-")
            handle = self.manager.adopt(name, ip, identity) or self.manager.create(
                name, ip, identity, closed=True)
        except BaseException:
            self.identities.release(labels)
            raise
        ep = LocalEndpoint(key, handle, labels, identity, named, ports)
        # Adopted from an earlier agent: its entries (read back by the writer) are a policy.
        ep.has_policy = self.writer.entry_count(handle.endpoint_id) > 0
        current = self.backend.endpoint_map.get(handle.ip)
        if current is not None:  # created closed, or what the earlier agent left
            ep.ingress_enforced, ep.egress_enforced = current.ingress_enforced, current.egress_enforced
        self.endpoints[key] = ep
        self._by_namespace.setdefault(pod.namespace, set()).add(key)
        self.hooks.endpoint_created(key, handle, ports)

    def _remove_endpoint(self, key: str) -> None:
        ep = self.endpoints.pop(key)
        self._by_namespace.get(key.split("/")[0], set()).discard(key)
        self.hooks.endpoint_removed(key)
        self._delete_endpoint(key)
        self._release_identity(ep)
        self.ipam.release(key)
        self.controllers.pop(f"endpoint-{key}", None)

    def _release_identity(self, ep: LocalEndpoint) -> None:
        self.identities.release(ep.labels)

    def _remove_stale(self, key: str) -> None:
        self.hooks.endpoint_removed(key)
        self._delete_endpoint(key)
        self.ipam.release(key)

    def _delete_endpoint(self, key: str) -> None:
        endpoint_id = self.manager.delete(key.replace("/", "-"))
        if endpoint_id is not None:
            self.writer.forget(endpoint_id)  # the teardown removed its entries

    def _cidr_identity(self, prefix) -> int:
        prefix = ipaddress.IPv4Network(prefix)
        if prefix not in self._cidr_ids:
            self._cidr_ids[prefix] = self.identities.acquire_cidr(prefix)
        return self._cidr_ids[prefix]

    def _apply_policy(self, revision: int, keys: set[str], identities: dict) -> set[str]:
        """Resolves and writes the policy of these endpoints; returns those whose readiness
        changed."""
        peer_ports: dict[int, dict] = {}
        for ep in self.endpoints.values():
            peer_ports.setdefault(ep.identity, {}).update(ep.named_ports)
        # One index for the whole pass: each peer selector meets the identities once.
        peers = PeerIndex(identities, self._cidr_identity, self.repo.cidr_prefixes())
        failed: set[str] = set()
        was_ready = {k: ep.state == READY for k, ep in self.endpoints.items() if k in keys}
        for key in sorted(keys):
            ep = self.endpoints.get(key)
            if ep is None:
                continue
            ctx = EndpointContext(labels=ep.labels, namespace=ep.pod_key.split("/")[0],
                                  named_ports=ep.named_ports)
            policy = resolve(ctx, self.repo, identities, self._cidr_identity,
                             peer_named_ports=peer_ports, peers=peers)
            # Below a pod's own /32 or the node's addresses (SOURCE_LOCAL wins): a rule naming
            # them never takes their identity away.
            for prefix, identity in policy.cidrs.items():
                self.ipcache.upsert(prefix, identity, SOURCE_GENERATED)
            try:
                self.writer.apply(ep.handle.ip, ep.handle.endpoint_id, policy.rules,
                                  enforce_ingress=policy.ingress_enforced,
                                  enforce_egress=policy.egress_enforced)
            except PolicyRealizeError as e:
                failed.add(key)
                self._endpoint_failed(key, f"policy not realized, {self._fail_closed(ep, policy)}: {e}")
                log.error("endpoint %s: %s", key, ep.error)
                continue
            ep.ingress_enforced, ep.egress_enforced = policy.ingress_enforced, policy.egress_enforced
            ep.rule_count = len(policy.rules)
            ep.has_policy = True
            ep.state, ep.error = READY, ""
            self._endpoint_succeeded(key)
        # The CIDR identities in the ipcache follow the rules, not which endpoints happened to
        # be resolved in this pass: the same policies give the same ipcache, however reached.
        used = {ipaddress.IPv4Network(p) for p in self.repo.cidr_prefixes()}
        # (Unchanged claims cost a dict lookup: the owner writes only what moves.)
        for prefix in sorted(used):
            self.ipcache.upsert(prefix, self._cidr_identity(prefix), SOURCE_GENERATED)
        # A failed endpoint may still hold entries for a prefix no rule names any more: its
        # identity is kept until every endpoint is realized, so the number is never handed
        # to another prefix under an old allow.
        releasable = [p for p in self._cidr_ids if p not in used] if not failed and all(
            ep.state == READY for ep in self.endpoints.values()) else []
        for prefix in releasable:
            self.ipcache.remove(prefix, SOURCE_GENERATED)
            self.identities.release_cidr(prefix)
            del self._cidr_ids[prefix]
        for key, ep in self.endpoints.items():
            if ep.state == READY and key not in failed:
                ep.realized_revision = revision
        return {k for k, ready in was_ready.items()
                if k in self.endpoints and (self.endpoints[k].state == READY) != ready}

    def _fail_closed(self, ep: LocalEndpoint, policy) -> str:
        """After a failed write the endpoint's entries are what they were. A direction the
        new policy enforces and the old state did not would be open: it is switched to
        enforcing with none of the new policy's entries, i.e. denying everything. Returns
        what the endpoint does now, in words."""
        was = {INGRESS: ep.ingress_enforced, EGRESS: ep.egress_enforced}
        wanted = {INGRESS: policy.ingress_enforced, EGRESS: policy.egress_enforced}
        closed = [d for d in (INGRESS, EGRESS) if wanted[d] and not was[d]]
        if closed or not ep.has_policy:
            ep.ingress_enforced = was[INGRESS] or wanted[INGRESS]
            ep.egress_enforced = was[EGRESS] or wanted[EGRESS]
            self.backend.endpoint_map.set_policy_enforcement(
                ep.handle.ip, ingress=ep.ingress_enforced, egress=ep.egress_enforced)
        if not ep.has_policy:
            return "denying all traffic"  # created closed, never realized
        kept = [d for d in (INGRESS, EGRESS) if was[d]]
        said = [f"denying all {' and '.join(closed)} traffic"] if closed else []
        said += [f"previous {' and '.join(kept)} policy kept"] if kept else []
        return ", ".join(said)

    # -- waiting ----------------------------------------------------------------------

    def realized_revision(self) -> int:
        return self.reconciler.realized_revision

    def wait_for_revision(self, revision: int, timeout: float) -> bool:
        return self.reconciler.wait_for_revision(revision, timeout)

    def endpoint_states(self) -> dict[str, int]:
        with self._lock:
            states = [ep.state for ep in self.endpoints.values()]
        return {state: states.count(state) for state in set(states)}

    def failed_endpoints(self) -> dict[str, str]:
        """Endpoints that do not enforce the current policy, with the reason."""
        with self._lock:
            return {k: ep.error for k, ep in sorted(self.endpoints.items()) if ep.state != READY}

    # -- views for the API ------------------------------------------------------------

    def endpoint_views(self) -> list[dict]:
        with self._lock:
            eps = list(self.endpoints.values())
        return [self.endpoint_view(ep) for ep in sorted(eps, key=lambda e: e.handle.endpoint_id)]

    def endpoint_view(self, ep: LocalEndpoint) -> dict:
        return {
            "id": ep.handle.endpoint_id, "pod": ep.pod_key, "identity": ep.identity,
            "labels": format_labels(ep.labels), "ipv4": str(ep.handle.ip),
            "policy_enforcement": {"ingress": ep.ingress_enforced, "egress": ep.egress_enforced},
            "policy_revision": ep.realized_revision, "policy_entries": ep.rule_count,
            "status": ep.state, "error": ep.error, "netns": ep.handle.netns,
            "interface": ep.handle.host_ifname, "ifindex": ep.handle.ifindex,
        }

    def policy_view(self) -> dict:
        return {
            "revision": self.revision,
            "realized_revision": self.realized_revision(),
            "failed_endpoints": self.failed_endpoints(),
            "policies": [{"kind": k[0], "namespace": k[1], "name": k[2]} for k in self.repo.keys()],
            "rejected": [e.to_dict() for e in self.source_errors_fn()],
        }

    # -- read-only accessors (the node view Hubble is given: agent/nodeview.py) -------

    def local_endpoints(self) -> list[LocalEndpoint]:
        """This node's endpoints now. A copy taken without the lock, so a reader on the
        event path never waits for a regeneration (which adds and removes entries)."""
        return list(dict(self.endpoints).values())

    def identity_labels(self, identity: int) -> dict | None:
        """The labels of an allocated (or reserved) identity, None if it is unknown."""
        return self.identities.lookup(identity)

    def policy_by_cookie(self, cookie: int) -> tuple[str, str, str] | None:
        """(kind, namespace, name) of the policy the datapath reports with this cookie."""
        return self.repo.cookie_key(cookie)

    def close(self) -> None:
        self.backend.close()
