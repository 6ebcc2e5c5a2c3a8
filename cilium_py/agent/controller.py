"""The control plane of one node: from the store's objects to endpoints, identities and
policy-map state.

Store callbacks run on per-object queues and only record that something changed; one
regeneration thread then brings the node to the desired state, coalescing bursts of
changes. Every change bumps the policy revision; each endpoint records the revision its
maps realize, so `policy wait` and `lab apply` can wait for enforcement.

Only what changed is written: PolicyWriter diffs each endpoint's entries against the map,
and identities, addresses and endpoints are created or released as pods come and go.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from cilium_py.agent.endpoints import EndpointHandle, EndpointManager
from cilium_py.agent.errors import ValidationError
from cilium_py.agent.identity import IdentityAllocator
from cilium_py.agent.ipam import IPAM
from cilium_py.agent.labels import endpoint_labels, format_labels, labels_key
from cilium_py.agent.objects import Pod
from cilium_py.agent.policy.mapstate import PolicyWriter
from cilium_py.agent.policy.repository import PolicyRepository
from cilium_py.agent.policy.resolve import NAMESPACE_KEY, EndpointContext, PeerIndex, resolve
from cilium_py.agent.policy.selector import IN
from cilium_py.agent.store import Resource, Store
from cilium_py.datapath import netns
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.ipcache import IPCacheMap
from cilium_py.vocab import protocol_name

log = logging.getLogger(__name__)

POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


@dataclass
class LocalEndpoint:
    pod_key: str                    # "namespace/name"
    handle: EndpointHandle
    labels: dict
    identity: int
    named_ports: dict
    container_ports: list           # [(port, "TCP"|"UDP"|"SCTP")]
    realized_revision: int = 0
    ingress_enforced: bool = False
    egress_enforced: bool = False
    rule_count: int = 0
    state: str = "ready"
    error: str = ""


@dataclass
class ControllerStatus:
    runs: int = 0
    failures: int = 0
    last_error: str = ""
    last_success: float = 0.0


@dataclass
class ControlPlaneConfig:
    datapath: DatapathConfig
    node_netns: str
    router_ip: str
    pod_cidr: str
    state_dir: str
    lab: bool = False          # start listeners for containerPorts and adopt pods without nodeName
    node_ips: tuple = ()


def describe(res: Resource) -> str:
    """How errors and views name an object: "Kind namespace/name" or "Kind name"."""
    return f"{res.kind} {res.namespace + '/' if res.namespace else ''}{res.name}"


def pod_ports(pod: Pod) -> tuple[dict, list]:
    return pod.named_ports, [(p.port, protocol_name(p.protocol)) for p in pod.ports]


class ControlPlane:
    def __init__(self, config: ControlPlaneConfig, store: Store):
        self.config = config
        self.store = store
        os.makedirs(config.state_dir, exist_ok=True)
        self.identities = IdentityAllocator(os.path.join(config.state_dir, "identities.json"))
        self.ipam = IPAM(config.pod_cidr, reserved=[config.router_ip],
                         state_file=os.path.join(config.state_dir, "ipam.json"))
        self.repo = PolicyRepository()
        self.manager = EndpointManager(config.datapath, config.node_netns, config.router_ip)
        self.writer = PolicyWriter(self.manager.policy, self.manager.endpoints)
        self.ipcache = IPCacheMap(config.datapath.pin_dir)
        self.endpoints: dict[str, LocalEndpoint] = {}
        self._by_namespace: dict[str, set[str]] = {}  # namespace -> endpoint keys
        self.rejected: dict[tuple, ValidationError] = {}
        self.source_errors_fn = lambda: []  # the agent points this at its sources' errors
        # Called with the pod keys whose endpoints a regeneration created, changed or
        # removed (the service manager derives backends and hostPorts from them).
        self.endpoint_listeners: list = []
        self.services = None  # the service manager, when the agent runs one
        self.controllers: dict[str, ControllerStatus] = {}
        self.revision = 1
        # Bumped after every regeneration: readers that cache what endpoints, identities
        # or policies say (Hubble's flow enrichment) drop their caches when it moves.
        self.generation = 0
        # What changed since the last regeneration; the loop takes and clears these.
        self._dirty_pods: set[str] = set()
        self._dirty_namespaces: set[str] = set()
        self._dirty_selectors: set = set()
        self._first_run = True
        self._cidr_ids: dict[ipaddress.IPv4Network, int] = {}
        self._released_labels: dict[int, dict] = {}  # identities gone in this regeneration
        self._lock = threading.RLock()
        self._dirty = threading.Event()
        self._realized = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        store.subscribe(self._on_change)

    # -- events ---------------------------------------------------------------------

    def _on_change(self, event: str, old: Resource | None, new: Resource | None) -> None:
        res = new or old
        if res.kind in POLICY_KINDS:
            affected = self._on_policy(event, res)
            with self._lock:
                self._dirty_selectors |= affected
        elif res.kind == "Pod":
            with self._lock:
                self._dirty_pods.add(f"{res.namespace}/{res.name}")
        elif res.kind == "Namespace":
            with self._lock:
                self._dirty_namespaces.add(res.name)
        else:
            return  # Services, EndpointSlices and Nodes matter to later issues
        with self._lock:
            self.revision += 1
        self._dirty.set()

    def _on_policy(self, event: str, res: Resource) -> set:
        """Updates the repository; returns the subject selectors whose endpoints need a new
        resolution (those of the old and of the new version of the policy)."""
        key = res.key
        if event == "delete":
            self.rejected.pop(key, None)
            return self.repo.delete(key)
        self.rejected.pop(key, None)
        return self.repo.upsert(key, res.rules)  # parsed by the source: only valid policies get here

    # -- regeneration -----------------------------------------------------------------

    def start(self) -> None:
        self._dirty.set()
        self._thread = threading.Thread(target=self._loop, name="regeneration", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            self.store.wait_idle(5.0)  # let queued object changes land before reading the store
            with self._lock:
                revision = self.revision
            status = self.controllers.setdefault("policy-regeneration", ControllerStatus())
            status.runs += 1
            try:
                self.regenerate(revision)
                status.last_success = time.time()
                status.last_error = ""
            except Exception as e:  # noqa: BLE001 - report, keep the agent, retry on next change
                status.failures += 1
                status.last_error = str(e)
                log.exception("regeneration failed")
                time.sleep(0.2)
                self._dirty.set()

    def _is_ours(self, pod: Pod) -> bool:
        assigned = pod.node_name
        return assigned == self.config.datapath.node or (assigned is None and self.config.lab)

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

    def regenerate(self, revision: int) -> None:
        """Brings the endpoints a change can affect to the desired state:
        pods that changed (or whose namespace did), endpoints a changed policy selects, and
        endpoints whose policies name a peer identity that appeared or went away. Everything
        else keeps its map state untouched, so the cost follows the change, not the node."""
        with self._lock:
            dirty_pods, self._dirty_pods = self._dirty_pods, set()
            namespaces, self._dirty_namespaces = self._dirty_namespaces, set()
            selectors, self._dirty_selectors = self._dirty_selectors, set()
            full = self._first_run
            self._first_run = False
        if full or namespaces:
            pods = self._node_pods()
        else:
            pods = self._node_pods_of(dirty_pods)
        if full:
            dirty_pods |= set(pods) | set(self.endpoints)
            for key in [k for k in self.ipam.allocated() if k not in pods]:
                self._remove_stale(key)  # left by an agent that stopped before the pod went away
        dirty_pods |= {k for k in pods if k.split("/")[0] in namespaces}

        before = set(self.identities.all())
        to_resolve: set[str] = set()
        for key in dirty_pods:
            if key not in pods:
                if key in self.endpoints:
                    self._remove_endpoint(key)
                continue
            try:
                self._ensure_endpoint(key, pods[key])
                to_resolve.add(key)
                status = self.controllers.get(f"endpoint-{key}")
                if status is not None and status.last_error:
                    status.last_error = ""  # recovered
                    status.last_success = time.time()
            except Exception as e:  # noqa: BLE001 - one pod failing must not stop the others
                status = self.controllers.setdefault(f"endpoint-{key}", ControllerStatus())
                status.failures += 1
                status.last_error = str(e)
                log.exception("endpoint %s failed; retrying", key)
                self._retry_later(key)
        for listener in self.endpoint_listeners:
            listener(dirty_pods)
        identities = self.identities.all()
        changed_ids = before ^ set(identities)
        changed_labels = [identities.get(i) or self._released_labels.get(i) for i in changed_ids]
        subjects = set(selectors) | self._subjects_with_peers([l for l in changed_labels if l])
        for selector in subjects:
            to_resolve |= self._endpoints_selected(selector, to_resolve)
        self._apply_policy(revision, to_resolve, identities)
        self._released_labels.clear()
        # Allocations a previous agent persisted but no pod claimed on this run.
        self.identities.forget_unused()
        self.generation += 1

    def _retry_later(self, key: str, delay: float = 1.0) -> None:
        with self._lock:
            self._dirty_pods.add(key)
        timer = threading.Timer(delay, self._dirty.set)
        timer.daemon = True
        timer.start()

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

    @staticmethod
    def _rule_peers_match(rule, labels_list: list) -> bool:
        for direction in ("ingress", "egress"):
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
        ip = self.ipam.allocate(key)
        name = key.replace("/", "-")
        handle = self.manager.adopt(name, ip, identity) or self.manager.create(name, ip, identity)
        self.endpoints[key] = LocalEndpoint(key, handle, labels, identity, named, ports)
        self._by_namespace.setdefault(pod.namespace, set()).add(key)
        if self.config.lab:
            self._start_listener(key, handle, ports)
        self.controllers.setdefault(f"endpoint-{key}", ControllerStatus()).runs += 1

    def _remove_endpoint(self, key: str) -> None:
        ep = self.endpoints.pop(key)
        self._by_namespace.get(key.split("/")[0], set()).discard(key)
        self._stop_listener(key)
        self._delete_endpoint(key)
        self._release_identity(ep)
        self.ipam.release(key)
        self.controllers.pop(f"endpoint-{key}", None)

    def _release_identity(self, ep: LocalEndpoint) -> None:
        self._released_labels[ep.identity] = ep.labels
        self.identities.release(ep.labels)

    def _remove_stale(self, key: str) -> None:
        self._stop_listener(key)
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

    def _apply_policy(self, revision: int, keys: set[str], identities: dict) -> None:
        peer_ports: dict[int, dict] = {}
        for ep in self.endpoints.values():
            peer_ports.setdefault(ep.identity, {}).update(ep.named_ports)
        # One index for the whole pass: each peer selector meets the identities once.
        peers = PeerIndex(identities, self._cidr_identity, self.repo.cidr_prefixes())
        for key in keys:
            ep = self.endpoints.get(key)
            if ep is None:
                continue
            ctx = EndpointContext(labels=ep.labels, namespace=ep.pod_key.split("/")[0],
                                  named_ports=ep.named_ports)
            policy = resolve(ctx, self.repo, identities, self._cidr_identity,
                             peer_named_ports=peer_ports, peers=peers)
            for prefix, identity in policy.cidrs.items():
                self.ipcache.upsert(prefix, identity)
            self.writer.apply(ep.handle.ip, ep.handle.endpoint_id, policy.rules,
                              enforce_ingress=policy.ingress_enforced,
                              enforce_egress=policy.egress_enforced)
            ep.ingress_enforced, ep.egress_enforced = policy.ingress_enforced, policy.egress_enforced
            ep.rule_count = len(policy.rules)
        used = {ipaddress.IPv4Network(p) for p in self.repo.cidr_prefixes()}
        for prefix in [p for p in self._cidr_ids if p not in used]:
            self.ipcache.remove(prefix)
            self.identities.release_cidr(prefix)
            del self._cidr_ids[prefix]
        with self._realized:
            for ep in self.endpoints.values():
                ep.realized_revision = revision
            self._realized_revision = revision
            self._realized.notify_all()

    # -- waiting ----------------------------------------------------------------------

    def realized_revision(self) -> int:
        return getattr(self, "_realized_revision", 0)

    def wait_for_revision(self, revision: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._realized:
            while self.realized_revision() < revision:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._realized.wait(left)
        return True

    # -- lab listeners ----------------------------------------------------------------

    def _pidfile(self, key: str) -> str:
        return os.path.join(self.config.state_dir, "listeners", key.replace("/", "_") + ".pid")

    def _start_listener(self, key: str, handle: EndpointHandle, ports: list) -> None:
        pidfile = self._pidfile(key)
        if os.path.exists(pidfile) and _alive(_read_pid(pidfile)):
            return  # started by an earlier agent; it keeps serving across the restart
        args = [sys.executable, "-m", "cilium_py.lab.listener", "--name", key]
        for port, proto in ports:
            if proto in ("TCP", "UDP"):
                args += [f"--{proto.lower()}", str(port)]
        if len(args) == 5:
            return
        # A session of its own: the listener outlives an agent restart, as a container would.
        proc = netns.popen(handle.netns, args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           start_new_session=True, text=True)
        # The pod counts as ready once its ports listen, so `lab up` never returns into
        # connections refused by a listener still importing Python.
        ready = proc.stdout.readline().strip() == "ready"
        proc.stdout.close()
        if not ready:
            raise RuntimeError(f"listener for {key} exited before listening (ports {ports})")
        os.makedirs(os.path.dirname(pidfile), exist_ok=True)
        with open(pidfile, "w") as f:
            f.write(str(proc.pid))

    def _stop_listener(self, key: str) -> None:
        pidfile = self._pidfile(key)
        if not os.path.exists(pidfile):
            return
        pid = _read_pid(pidfile)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
        os.unlink(pidfile)

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
            "status": ep.state, "netns": ep.handle.netns, "interface": ep.handle.host_ifname,
            "ifindex": ep.handle.ifindex,
        }

    def policy_view(self) -> dict:
        return {
            "revision": self.revision,
            "realized_revision": self.realized_revision(),
            "policies": [{"kind": k[0], "namespace": k[1], "name": k[2]} for k in self.repo.keys()],
            "rejected": [e.to_dict() for e in self.rejected.values()]
                        + [e.to_dict() for e in self.source_errors_fn()],
        }

    def close(self) -> None:
        self.manager.close()
        self.ipcache.close()


def _read_pid(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
