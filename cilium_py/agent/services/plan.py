"""Planning: what one owner (a Service, or a Pod with hostPorts) wants in the lb maps.

An owner's plan lists the frontends it serves (address, port, protocol, flags, backends
per scope), the backends it uses and the unique resources it claims (ClusterIPs,
nodePorts, frontends). Planning is a pure function of the parsed object, its backends and
the node's addresses; whether the claims are free is the manager's business, and a
missing ClusterIP or nodePort comes from the allocators passed in (allocators.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from cilium_py.agent.errors import ValidationError
from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.services.endpoints import BackendKey, BackendRef
from cilium_py.agent.objects import Service
from cilium_py.agent.services.parse import HostPort, ServiceValidationError
from cilium_py.datapath.maps import lb
from cilium_py.datapath.reasons import protocol_name

if TYPE_CHECKING:
    from cilium_py.agent.services.allocators import ClusterIPAllocator, NodePortAllocator

SERVICE, HOSTPORT, SLICE = "Service", "HostPort", "EndpointSlice"
Owner = tuple[str, str, str]            # (SERVICE | HOSTPORT, namespace, name)
FrontendKey = tuple[str, int, int]      # (address, port, protocol)
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
            n += 1 + sum(r.state == lb.BE_STATE_ACTIVE for r in fp.external)
            if fp.internal is not None:
                n += 1 + sum(r.state == lb.BE_STATE_ACTIVE for r in fp.internal)
        self.__dict__["_entries"] = n
        return n

    @property
    def empty(self) -> bool:
        """Nothing to serve and nothing claimed (most pods: no hostPorts)."""
        return not (self.frontends or self.claims or self.backends)


def describe(owner: Owner) -> str:
    kind = "Pod" if owner[0] == HOSTPORT else owner[0]
    return f"{kind} {owner[1]}/{owner[2]}"


def claim_text(claim: tuple) -> str:
    if claim[0] == "ip":
        return f"ClusterIP {claim[1]}"
    if claim[0] == "nodeport":
        return f"nodePort {claim[1]}/{protocol_name(claim[2])}"
    return f"frontend {claim[1]}:{claim[2]}/{protocol_name(claim[3])}"


def plan_service(owner: Owner, spec: Service, backends: dict[int, list[BackendRef]],
                 config: ServiceConfig, node_ips: list[str], cluster_ips: ClusterIPAllocator,
                 node_ports: NodePortAllocator, old: OwnerPlan | None) -> OwnerPlan:
    """A Service's frontends: its ClusterIP, NodePorts on every node address (and the
    wildcard), externalIPs and load-balancer addresses, per port. `backends` are the
    Service's backends by port index. Raises ServiceValidationError for a frontend the
    Service defines twice, or when nothing is left to allocate."""
    plan = OwnerPlan(owner)
    if not spec.load_balanced:
        return plan
    cluster_ip = spec.cluster_ip
    if cluster_ip is None:
        cluster_ip = cluster_ips.allocate(owner, old.cluster_ip if old is not None else "", spec.source)
    if cluster_ip:
        plan.cluster_ip = cluster_ip
        plan.claims[("ip", cluster_ip)] = "spec.clusterIP"
    common = lb.SVC_F_AFFINITY if spec.affinity_timeout else 0
    algorithm = spec.algorithm
    effective = algorithm or lb.ALGORITHMS[config.algorithm]
    maglev = effective == lb.ALGORITHM_MAGLEV
    two_scopes = spec.etp_local != spec.itp_local
    scoped = ((lb.SVC_F_EXT_LOCAL if spec.etp_local else 0) | (lb.SVC_F_INT_LOCAL if spec.itp_local else 0)
              | (lb.SVC_F_TWO_SCOPES if two_scopes else 0) | lb.SVC_F_ROUTABLE | common)
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
                common | (lb.SVC_F_INT_LOCAL if spec.itp_local else 0), "spec.clusterIP",
                external=internal, two=False)
        if spec.has_node_ports:
            node_port = sp.node_port
            if not node_port and (spec.type == "NodePort" or spec.allocate_lb_node_ports):
                previous = old.node_ports.get((sp.name, sp.protocol)) if old else None
                node_port = node_ports.allocate(owner, spec, sp, previous, taken_node_ports)
            if node_port:
                taken_node_ports.add(node_port)
                plan.node_ports[(sp.name, sp.protocol)] = node_port
                plan.claims[("nodeport", node_port, sp.protocol)] = f"{sp.path}.nodePort"
                for ip in node_ips + [WILDCARD]:
                    add(ip, node_port, "NodePort", lb.SVC_F_NODEPORT | scoped, f"{sp.path}.nodePort")
        for i, ip in enumerate(spec.external_ips):
            add(ip, sp.port, "ExternalIPs", lb.SVC_F_EXTERNAL_IPS | scoped, f"spec.externalIPs[{i}]")
        for ip in spec.lb_ips:
            add(ip, sp.port, "LoadBalancer", lb.SVC_F_LOADBALANCER | scoped, "status.loadBalancer.ingress")
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


def plan_host_ports(owner: Owner, ports: list[HostPort], pod_ip: str | None,
                    config: ServiceConfig, node_ips: list[str]) -> OwnerPlan:
    """A local Pod's hostPorts: a frontend per hostPort on its hostIP, or on every node
    address and the wildcard, with the pod as the one (local) backend. `pod_ip` None: not
    a running pod of this node, so nothing is served here."""
    plan = OwnerPlan(owner)
    if pod_ip is None:
        return plan
    for hp in ports:
        backend = BackendRef((pod_ip, hp.container_port, hp.protocol), lb.BE_STATE_ACTIVE, True)
        for address in ([hp.host_ip] if hp.host_ip else node_ips + [WILDCARD]):
            fkey = (address, hp.host_port, hp.protocol)
            if fkey in plan.frontends:
                continue
            plan.frontends[fkey] = FrontendPlan(
                fkey, "HostPort", lb.SVC_F_HOSTPORT | lb.SVC_F_ROUTABLE, 0, lb.ALGORITHM_DEFAULT,
                config.algorithm == "maglev", (backend,), None, str(hp.host_port))
            plan.claims[("fe",) + fkey] = f"{hp.path}.hostPort"
        plan.backends[backend.key] = (lb.BE_STATE_ACTIVE, True)
    return plan
