"""Service and EndpointSlice: what a Service asks to be served and where its endpoints are.

The parsers check what the API server would (and Cilium's own annotation); what only this
node's datapath and flags decide (SCTP, the NodePort range) is the service manager's to
check, so the same object is valid everywhere and served wherever it can be. IPv6
addresses are accepted and left out: the datapath carries IPv4 only.

The records inside are NamedTuples: a large cluster has tens of thousands of Services and
hundreds of thousands of endpoints, and a NamedTuple is built several times faster than a
frozen dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from cilium_py.agent.objects.base import (
    Checker,
    Resource,
    dns_label,
    ip_address,
    is_int,
    list_of_mappings,
    mapping,
    parse_meta,
    port_name,
    port_number,
    protocol,
    required_spec,
)
from cilium_py.agent.services.addr import ipv4_int
from cilium_py.datapath.config import LB_ALGORITHMS
from cilium_py.vocab import protocol_name

SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
NODE_PORT_TYPES = ("NodePort", "LoadBalancer")
TRAFFIC_POLICIES = ("Cluster", "Local")
SESSION_AFFINITIES = ("None", "ClientIP")
DEFAULT_AFFINITY_TIMEOUT = 10800   # 3 h, as Kubernetes and Cilium
MAX_AFFINITY_TIMEOUT = 86400       # Kubernetes' limit for timeoutSeconds
LB_ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
ALGORITHM_DEFAULT = 0              # no annotation: the agent's --bpf-lb-algorithm
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")


# -- Service -------------------------------------------------------------------------------

class ServicePort(NamedTuple):
    name: str
    port: int
    protocol: int                 # IP protocol number (cilium_py.vocab)
    target_port: int | str        # a number, or a container port name
    node_port: int = 0            # 0: none given (allocated for NodePort/LoadBalancer)
    index: int = 0                # position in spec.ports, for error fields

    @property
    def path(self) -> str:
        return f"spec.ports[{self.index}]"


@dataclass(frozen=True, kw_only=True)
class Service(Resource):
    kind = "Service"

    type: str = "ClusterIP"
    cluster_ip: str | None = None  # None: none given (allocated); "" with headless
    headless: bool = False
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    selector: tuple[tuple[str, str], ...] | None = None   # None: no selector
    affinity_timeout: int = 0     # seconds; 0 = no session affinity
    etp_local: bool = False
    itp_local: bool = False
    algorithm: int = ALGORITHM_DEFAULT   # from the annotation
    allocate_lb_node_ports: bool = True

    @property
    def service_key(self) -> tuple[str, str]:
        """(namespace, name): how EndpointSlices and the service manager refer to it."""
        return (self.namespace or "", self.name)

    @property
    def load_balanced(self) -> bool:
        """ExternalName and headless Services are DNS matters: nothing to load-balance."""
        return self.type != "ExternalName" and not self.headless

    @property
    def has_node_ports(self) -> bool:
        return self.type in NODE_PORT_TYPES


def parse_service(doc, source: str, where: str = "object") -> Service:
    meta, c = parse_meta(Service, doc, source, where)
    spec = required_spec(c, doc, "ports")
    svc_type = spec.get("type", "ClusterIP")
    if svc_type not in SERVICE_TYPES:
        c.error("spec.type", f"{svc_type!r} is not a Service type; use {', '.join(SERVICE_TYPES)}")
        svc_type = "ClusterIP"
    cluster_ip, headless = _cluster_ip(c, spec)
    ports = _service_ports(c, spec, svc_type, headless)
    external_ips = _address_list(c, spec.get("externalIPs"), "spec.externalIPs")
    lb_ips: list[str] = []
    if svc_type == "LoadBalancer":
        if spec.get("loadBalancerIP"):
            lb_ips += _address_list(c, [spec["loadBalancerIP"]], "spec.loadBalancerIP", single=True)
        status = mapping(c, doc.get("status"), "status")
        balancer = mapping(c, status.get("loadBalancer"), "status.loadBalancer")
        for i, entry in list_of_mappings(c, balancer.get("ingress"), "status.loadBalancer.ingress"):
            if entry.get("ip"):
                for ip in _address_list(c, [entry["ip"]], f"status.loadBalancer.ingress[{i}].ip", single=True):
                    if ip not in lb_ips:
                        lb_ips.append(ip)
    selector = _selector(c, spec.get("selector"))
    affinity = _affinity(c, spec)
    etp = _traffic_policy(c, spec, "externalTrafficPolicy")
    itp = _traffic_policy(c, spec, "internalTrafficPolicy")
    algorithm = _algorithm(c, doc["metadata"].get("annotations"))
    allocate = spec.get("allocateLoadBalancerNodePorts", True)
    if not isinstance(allocate, bool):
        c.error("spec.allocateLoadBalancerNodePorts", f"must be true or false, not {allocate!r}")
    c.raise_if_errors()
    return Service(**meta.common, type=svc_type, cluster_ip=cluster_ip, headless=headless,
                   ports=tuple(ports), external_ips=tuple(external_ips), lb_ips=tuple(lb_ips),
                   selector=selector, affinity_timeout=affinity, etp_local=etp, itp_local=itp,
                   algorithm=algorithm, allocate_lb_node_ports=allocate is not False)


def _cluster_ip(c: Checker, spec: dict) -> tuple[str | None, bool]:
    value = spec.get("clusterIP")
    ips = spec.get("clusterIPs")
    if ips is not None and not isinstance(ips, list):
        c.error("spec.clusterIPs", "must be a list of addresses")
        ips = None
    if value in (None, "") and ips:
        value = ips[0]
    if value == "None":
        return "", True
    if value in (None, ""):
        return None, False
    ip = ip_address(value)
    if ip is None:
        c.error("spec.clusterIP", f"{value!r} is not an IP address (or \"None\" for a headless Service)")
        return None, False
    if ip.version == 6:
        # The IPv4 family of a dual-stack Service, if any, is served; IPv6 is not carried.
        v4 = [x for x in ips or [] if (a := ip_address(x)) is not None and a.version == 4]
        return (v4[0] if v4 else ""), False
    if ips and ips[0] != value:
        c.error("spec.clusterIPs", f"the first entry {ips[0]!r} must equal spec.clusterIP {value!r}")
    return str(ip), False


def _address_list(c: Checker, value, path: str, single: bool = False) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        c.error(path, "must be a list of IP addresses")
        return []
    out = []
    for i, item in enumerate(value):
        where = path if single else f"{path}[{i}]"
        ip = ip_address(item)
        if ip is None:
            c.error(where, f"{item!r} is not an IP address")
        elif ip.version == 4 and str(ip) not in out:
            if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
                c.error(where, f"{item} cannot be a service address")
            else:
                out.append(str(ip))
    return out


def _service_ports(c: Checker, spec: dict, svc_type: str, headless: bool) -> list[ServicePort]:
    raw = spec.get("ports")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        c.error("spec.ports", "must be a list")
        return []
    if not raw and not headless and svc_type != "ExternalName":
        c.error("spec.ports", "a Service needs at least one port")
        return []
    out: list[ServicePort] = []
    names: dict[str, int] = {}
    seen: dict[tuple[int, int], int] = {}
    node_ports: dict[tuple[int, int], int] = {}
    for i, port in enumerate(raw):
        path = f"spec.ports[{i}]"
        if not isinstance(port, dict):
            c.error(path, "must be a mapping")
            continue
        name = port.get("name") or ""
        if name and (msg := dns_label(name, "port name")):
            c.error(f"{path}.name", msg)
        elif len(raw) > 1 and not name:
            c.error(f"{path}.name", "is required when a Service has several ports")
        elif isinstance(name, str) and name in names:
            c.error(f"{path}.name", f"{name!r} is already the name of spec.ports[{names[name]}]")
        if isinstance(name, str):
            names.setdefault(name, i)
        number = port.get("port")
        if number is None:
            c.error(f"{path}.port", "is required")
            continue
        if msg := port_number(number):
            c.error(f"{path}.port", msg)
            continue
        proto = protocol(c, port.get("protocol"), f"{path}.protocol")
        if proto is None:
            continue
        if (number, proto) in seen:
            c.error(f"{path}.port",
                    f"{number}/{protocol_name(proto)} is already spec.ports[{seen[(number, proto)]}]")
            continue
        seen[(number, proto)] = i
        target = port.get("targetPort", number)   # the API server's default
        msg = (port_name(target) and f"{target!r} is neither a port number nor a port name") \
            if isinstance(target, str) else port_number(target)
        if msg:
            c.error(f"{path}.targetPort", msg)
            continue
        node_port = port.get("nodePort") or 0
        if node_port:
            if msg := port_number(node_port):
                c.error(f"{path}.nodePort", msg)
                continue
            if svc_type not in NODE_PORT_TYPES:
                c.error(f"{path}.nodePort", f"may only be set for type NodePort or LoadBalancer, not {svc_type}")
                continue
            if (node_port, proto) in node_ports:
                c.error(f"{path}.nodePort", f"{node_port}/{protocol_name(proto)} is already the nodePort of "
                                            f"spec.ports[{node_ports[(node_port, proto)]}]")
                continue
            node_ports[(node_port, proto)] = i
        out.append(ServicePort(name=name, port=number, protocol=proto, target_port=target,
                               node_port=node_port, index=i))
    return out


def _selector(c: Checker, value) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        c.error("spec.selector", "must map label keys to string values")
        return None
    # An empty selector selects nothing: the API server drops it, so Kubernetes' endpoint
    # controller sees no selector at all.
    return tuple(sorted(value.items())) or None


def _affinity(c: Checker, spec: dict) -> int:
    affinity = spec.get("sessionAffinity", "None")
    if affinity not in SESSION_AFFINITIES:
        c.error("spec.sessionAffinity", f"{affinity!r} must be None or ClientIP")
        return 0
    if affinity == "None":
        return 0
    config = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
    timeout = config.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT) if isinstance(config, dict) else None
    if not is_int(timeout) or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        c.error("spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                f"{timeout!r} must be an integer number of seconds in 1-{MAX_AFFINITY_TIMEOUT}")
        return 0
    return timeout


def _traffic_policy(c: Checker, spec: dict, key: str) -> bool:
    value = spec.get(key, "Cluster")
    if value not in TRAFFIC_POLICIES:
        c.error(f"spec.{key}", f"{value!r} must be Cluster or Local")
        return False
    return value == "Local"


def _algorithm(c: Checker, annotations) -> int:
    if not isinstance(annotations, dict) or LB_ALGORITHM_ANNOTATION not in annotations:
        return ALGORITHM_DEFAULT
    value = annotations[LB_ALGORITHM_ANNOTATION]
    if value not in LB_ALGORITHMS:
        c.error(f"metadata.annotations[{LB_ALGORITHM_ANNOTATION}]",
                f"{value!r} is not a load-balancing algorithm; use {' or '.join(LB_ALGORITHMS)}")
        return ALGORITHM_DEFAULT
    return LB_ALGORITHMS[value]


# -- EndpointSlice -------------------------------------------------------------------------

class SliceEndpoint(NamedTuple):
    address: str
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None = None


class SlicePort(NamedTuple):
    name: str
    port: int
    protocol: int


@dataclass(frozen=True, kw_only=True)
class EndpointSlice(Resource):
    kind = "EndpointSlice"
    api_version = "discovery.k8s.io/v1"

    service: str = ""             # the Service (same namespace) it belongs to
    address_type: str = "IPv4"
    endpoints: tuple[SliceEndpoint, ...] = ()   # IPv4 slices only: the datapath carries no other
    ports: tuple[SlicePort, ...] = ()

    @property
    def service_key(self) -> tuple[str, str]:
        return (self.namespace or "", self.service)


def parse_endpoint_slice(doc, source: str, where: str = "object") -> EndpointSlice:
    meta, c = parse_meta(EndpointSlice, doc, source, where)
    service = meta.labels.get(SERVICE_NAME_LABEL)
    if not service:
        c.error(f"metadata.labels[{SERVICE_NAME_LABEL}]",
                "is required: it names the Service these endpoints belong to")
    address_type = doc.get("addressType")
    if address_type not in ADDRESS_TYPES:
        c.error("addressType", f"{address_type!r} must be IPv4, IPv6 or FQDN")
    ports = []
    for i, port in list_of_mappings(c, doc.get("ports") or [], "ports"):
        path = f"ports[{i}]"
        number = port.get("port")
        if msg := port_number(number):
            c.error(f"{path}.port", msg)
            continue
        proto = protocol(c, port.get("protocol") or None, f"{path}.protocol")
        if proto is None:
            continue
        name = port.get("name") or ""
        if not isinstance(name, str):
            c.error(f"{path}.name", "must be a string")
            continue
        ports.append(SlicePort(name, number, proto))
    endpoints = _slice_endpoints(c, doc.get("endpoints") or [], address_type == "IPv4")
    c.raise_if_errors()
    return EndpointSlice(**meta.common, service=service, address_type=address_type,
                         endpoints=tuple(endpoints), ports=tuple(ports))


def _slice_endpoints(c: Checker, raw, ipv4: bool) -> list[SliceEndpoint]:
    if not isinstance(raw, list):
        c.error("endpoints", "must be a list")
        return []
    endpoints = []
    # The hot loop of a large cluster: exact type checks, no helper calls per field.
    for i, ep in enumerate(raw):
        if type(ep) is not dict:
            c.error(f"endpoints[{i}]", "must be a mapping")
            continue
        addresses = ep.get("addresses")
        if type(addresses) is not list or not addresses:
            c.error(f"endpoints[{i}].addresses", "needs at least one address")
            continue
        conditions = ep.get("conditions")
        if conditions is None:
            ready, serving, terminating = True, True, False
        elif type(conditions) is not dict:
            c.error(f"endpoints[{i}].conditions", "must be a mapping")
            continue
        else:
            r, s_, t = conditions.get("ready"), conditions.get("serving"), conditions.get("terminating")
            for n, v in (("ready", r), ("serving", s_), ("terminating", t)):
                if v is not None and type(v) is not bool:
                    c.error(f"endpoints[{i}].conditions.{n}", f"must be true or false, not {v!r}")
            # Unknown readiness counts as ready, as in Kubernetes; serving follows ready.
            ready = r is not False
            serving = ready if s_ is None else s_
            terminating = t is True
        if not ipv4:
            continue
        # Consumers use the first address (the API says they are fungible).
        address = addresses[0]
        if ipv4_int(address) is None:
            c.error(f"endpoints[{i}].addresses[0]", f"{address!r} is not an IPv4 address")
            continue
        node_name = ep.get("nodeName")
        endpoints.append(SliceEndpoint(address, ready, serving, terminating,
                                       node_name if type(node_name) is str else None))
    return endpoints


__all__ = ["ALGORITHM_DEFAULT", "DEFAULT_AFFINITY_TIMEOUT", "EndpointSlice",
           "LB_ALGORITHM_ANNOTATION", "SERVICE_NAME_LABEL", "Service", "ServicePort", "SliceEndpoint",
           "SlicePort", "parse_endpoint_slice", "parse_service"]
