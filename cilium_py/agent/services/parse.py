"""Service, EndpointSlice and Pod (hostPort) objects parsed into the typed model the
service manager works from, with every error naming the object and the field.

Parsing checks everything it relies on even though the manifests source checks some of
it already: the bodies may come from another source (the Kubernetes API), and a Service
the datapath cannot serve as written is rejected, never served differently. IPv6
addresses are the one input accepted and ignored (the datapath carries IPv4 only), as
the policy parser does.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from cilium_py.agent.errors import ValidationError
from cilium_py.agent.services.addr import ipv4_int
from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.store import Resource
from cilium_py.datapath.maps.lb import ALGORITHM_DEFAULT, ALGORITHMS
from cilium_py.datapath.reasons import protocol_name

TCP, UDP, SCTP = 6, 17, 132
PROTOCOLS = {"TCP": TCP, "UDP": UDP}
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
TRAFFIC_POLICIES = ("Cluster", "Local")
SESSION_AFFINITIES = ("None", "ClientIP")
DEFAULT_AFFINITY_TIMEOUT = 10800   # 3 h, as Kubernetes and Cilium
MAX_AFFINITY_TIMEOUT = 86400       # Kubernetes' limit for timeoutSeconds
LB_ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SCTP_UNSUPPORTED = "SCTP is not supported by the kube-proxy replacement; use TCP or UDP"

_PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


# -- the model ----------------------------------------------------------------------------
# Immutable records as NamedTuples: a large cluster has tens of thousands of Services and
# hundreds of thousands of endpoints, and a NamedTuple is built several times faster than
# a frozen dataclass.

class ServicePort(NamedTuple):
    name: str
    port: int
    protocol: int                 # 6 / 17
    target_port: int | str        # a number, or a container port name
    node_port: int = 0            # 0: none given (allocated for NodePort/LoadBalancer)
    index: int = 0                # position in spec.ports, for error fields

    @property
    def path(self) -> str:
        return f"spec.ports[{self.index}]"


class ServiceSpec(NamedTuple):
    namespace: str
    name: str
    source: str
    type: str
    cluster_ip: str | None        # None: none given (allocated); "" with headless
    headless: bool
    ports: tuple[ServicePort, ...]
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    selector: tuple[tuple[str, str], ...] | None = None   # None: no selector
    affinity_timeout: int = 0     # seconds; 0 = no session affinity
    etp_local: bool = False
    itp_local: bool = False
    algorithm: int = ALGORITHM_DEFAULT   # from the annotation; 0 = the agent's default
    allocate_lb_node_ports: bool = True
    created: str = ""             # metadata.creationTimestamp, orders claims at startup

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def load_balanced(self) -> bool:
        """ExternalName and headless Services are DNS matters: nothing to load-balance."""
        return self.type != "ExternalName" and not self.headless

    @property
    def has_node_ports(self) -> bool:
        return self.type == "NodePort" or self.type == "LoadBalancer"

    def describe(self) -> str:
        return f"Service {self.namespace}/{self.name}"


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


class SliceSpec(NamedTuple):
    namespace: str
    name: str
    source: str
    service: str                  # the Service (same namespace) it belongs to
    address_type: str
    endpoints: tuple[SliceEndpoint, ...] = ()
    ports: tuple[SlicePort, ...] = ()

    @property
    def service_key(self) -> tuple[str, str]:
        return (self.namespace, self.service)


class HostPort(NamedTuple):
    host_port: int
    container_port: int
    protocol: int
    host_ip: str | None           # None: every node address
    path: str                     # the containerPorts entry, for messages


@dataclass
class Problems:
    """What parsing found: errors reject the object, warnings say what was ignored."""

    errors: list[ValidationError] = field(default_factory=list)
    warnings: list[ValidationError] = field(default_factory=list)


class _Checker:
    """Collects field errors of one object, so a user sees all of them at once."""

    def __init__(self, res: Resource):
        self.res = res
        self.obj = res.describe()
        self.errors: list[ValidationError] = []
        self.warnings: list[ValidationError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(ValidationError(self.res.source, self.obj, path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(ValidationError(self.res.source, self.obj, path, message))

    def raise_if_errors(self) -> None:
        if self.errors:
            raise ServiceValidationError(self.errors, self.warnings)


class ServiceValidationError(ValidationError):
    """An object that cannot be served; `errors` holds every problem, the exception
    itself describes the first."""

    def __init__(self, errors: list[ValidationError], warnings: list[ValidationError] = ()):
        first = errors[0]
        super().__init__(first.source, first.obj, first.field, first.message)
        self.errors = list(errors)
        self.warnings = list(warnings)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _port_error(value) -> str | None:
    if not _is_int(value):
        return f"must be an integer port number, not {value!r}"
    if not 1 <= value <= 65535:
        return f"{value} is not in 1-65535"
    return None


def _ipv4(value) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The parsed address (IPv4 via the fast path), None when `value` is no address."""
    n = ipv4_int(value)
    if n is not None:
        return ipaddress.IPv4Address(n)
    try:
        return ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _protocol(c: _Checker, value, path: str) -> int | None:
    proto = "TCP" if value is None else value
    if proto == "SCTP":
        c.error(path, SCTP_UNSUPPORTED)
        return None
    if proto not in PROTOCOLS:
        c.error(path, f"{proto!r} is not a supported protocol; use TCP or UDP")
        return None
    return PROTOCOLS[proto]


# -- Service ------------------------------------------------------------------------------

def parse_service(res: Resource, config: ServiceConfig) -> tuple[ServiceSpec, list[ValidationError]]:
    """The Service as the datapath will serve it, and warnings about what was ignored.
    Raises ServiceValidationError listing every field that cannot be served."""
    c = _Checker(res)
    body = res.body or {}
    meta = body.get("metadata") or {}
    spec = body.get("spec")
    if not isinstance(spec, dict):
        c.error("spec", "a Service needs a spec with ports")
        c.raise_if_errors()
    svc_type = spec.get("type", "ClusterIP")
    if svc_type not in SERVICE_TYPES:
        c.error("spec.type", f"{svc_type!r} is not a Service type; use {', '.join(SERVICE_TYPES)}")
        svc_type = "ClusterIP"

    cluster_ip, headless = _cluster_ip(c, spec)
    ports = _service_ports(c, spec, svc_type, headless, config)
    external_ips = _address_list(c, spec.get("externalIPs"), "spec.externalIPs")
    lb_ips: list[str] = []
    if svc_type == "LoadBalancer":
        if spec.get("loadBalancerIP"):
            lb_ips += _address_list(c, [spec["loadBalancerIP"]], "spec.loadBalancerIP", single=True)
        ingress = ((body.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        if not isinstance(ingress, list):
            c.error("status.loadBalancer.ingress", "must be a list")
            ingress = []
        for i, entry in enumerate(ingress):
            if not isinstance(entry, dict):
                c.error(f"status.loadBalancer.ingress[{i}]", "must be a mapping")
            elif entry.get("ip"):
                for ip in _address_list(c, [entry["ip"]], f"status.loadBalancer.ingress[{i}].ip", single=True):
                    if ip not in lb_ips:
                        lb_ips.append(ip)
    selector = _selector(c, spec.get("selector"))
    affinity = _affinity(c, spec)
    etp = _traffic_policy(c, spec, "externalTrafficPolicy")
    itp = _traffic_policy(c, spec, "internalTrafficPolicy")
    algorithm = _algorithm(c, meta.get("annotations"))
    allocate = spec.get("allocateLoadBalancerNodePorts", True)
    if not isinstance(allocate, bool):
        c.error("spec.allocateLoadBalancerNodePorts", f"must be true or false, not {allocate!r}")
    c.raise_if_errors()
    created = meta.get("creationTimestamp") or ""
    return ServiceSpec(
        namespace=res.namespace or "default", name=res.name, source=res.source, type=svc_type,
        cluster_ip=cluster_ip, headless=headless, ports=tuple(ports),
        external_ips=tuple(external_ips), lb_ips=tuple(lb_ips), selector=selector,
        affinity_timeout=affinity, etp_local=etp, itp_local=itp, algorithm=algorithm,
        allocate_lb_node_ports=allocate is not False, created=str(created)), c.warnings


def _cluster_ip(c: _Checker, spec: dict) -> tuple[str | None, bool]:
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
    ip = _ipv4(value)
    if ip is None:
        c.error("spec.clusterIP", f"{value!r} is not an IP address (or \"None\" for a headless Service)")
        return None, False
    if ip.version == 6:
        # The IPv4 family of a dual-stack Service, if any, is served; IPv6 is not carried.
        v4 = [x for x in ips or [] if (a := _ipv4(x)) is not None and a.version == 4]
        return (v4[0] if v4 else ""), False
    if ips and ips[0] != value:
        c.error("spec.clusterIPs", f"the first entry {ips[0]!r} must equal spec.clusterIP {value!r}")
    return str(ip), False


def _address_list(c: _Checker, value, path: str, single: bool = False) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        c.error(path, "must be a list of IP addresses")
        return []
    out = []
    for i, item in enumerate(value):
        where = path if single else f"{path}[{i}]"
        ip = _ipv4(item)
        if ip is None:
            c.error(where, f"{item!r} is not an IP address")
        elif ip.version == 4 and str(ip) not in out:
            if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
                c.error(where, f"{item} cannot be a service address")
            else:
                out.append(str(ip))
    return out


def _service_ports(c: _Checker, spec: dict, svc_type: str, headless: bool,
                   config: ServiceConfig) -> list[ServicePort]:
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
        if name and (not isinstance(name, str) or len(name) > 63 or not _PORT_NAME.fullmatch(name)):
            c.error(f"{path}.name", f"{name!r} is not a valid port name: lowercase letters, digits and '-'")
        elif len(raw) > 1 and not name:
            c.error(f"{path}.name", "is required when a Service has several ports")
        elif name in names:
            c.error(f"{path}.name", f"{name!r} is already the name of spec.ports[{names[name]}]")
        names.setdefault(name, i)
        number = port.get("port")
        if number is None:
            c.error(f"{path}.port", "is required")
            continue
        if msg := _port_error(number):
            c.error(f"{path}.port", msg)
            continue
        proto = _protocol(c, port.get("protocol"), f"{path}.protocol")
        if proto is None:
            continue
        if (number, proto) in seen:
            c.error(f"{path}.port",
                    f"{number}/{protocol_name(proto)} is already spec.ports[{seen[(number, proto)]}]")
            continue
        seen[(number, proto)] = i
        target = port.get("targetPort", number)
        if isinstance(target, str) and not target.isdigit():
            if len(target) > 15 or not _PORT_NAME.fullmatch(target) or not re.search("[a-z]", target):
                c.error(f"{path}.targetPort", f"{target!r} is neither a port number nor a port name")
                continue
        else:
            target = int(target) if isinstance(target, str) else target
            if msg := _port_error(target):
                c.error(f"{path}.targetPort", msg)
                continue
        node_port = port.get("nodePort") or 0
        if node_port:
            if msg := _port_error(node_port):
                c.error(f"{path}.nodePort", msg)
                continue
            if svc_type not in ("NodePort", "LoadBalancer"):
                c.error(f"{path}.nodePort", f"may only be set for type NodePort or LoadBalancer, not {svc_type}")
                continue
            if not config.in_node_port_range(node_port):
                c.error(f"{path}.nodePort", f"{node_port} is outside the NodePort range "
                                            f"{config.node_port_range_text} (--node-port-range)")
                continue
            if (node_port, proto) in node_ports:
                c.error(f"{path}.nodePort", f"{node_port}/{protocol_name(proto)} is already the nodePort of "
                                            f"spec.ports[{node_ports[(node_port, proto)]}]")
                continue
            node_ports[(node_port, proto)] = i
        out.append(ServicePort(name=name, port=number, protocol=proto, target_port=target,
                               node_port=node_port, index=i))
    return out


def _selector(c: _Checker, value) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        c.error("spec.selector", "must map label keys to string values")
        return None
    # An empty selector selects nothing: the API server drops it, so Kubernetes' endpoint
    # controller sees no selector at all.
    return tuple(sorted(value.items())) or None


def _affinity(c: _Checker, spec: dict) -> int:
    affinity = spec.get("sessionAffinity", "None")
    if affinity not in SESSION_AFFINITIES:
        c.error("spec.sessionAffinity", f"{affinity!r} must be None or ClientIP")
        return 0
    if affinity == "None":
        return 0
    config = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
    timeout = config.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT) if isinstance(config, dict) else None
    if not _is_int(timeout) or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        c.error("spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                f"{timeout!r} must be an integer number of seconds in 1-{MAX_AFFINITY_TIMEOUT}")
        return 0
    return timeout


def _traffic_policy(c: _Checker, spec: dict, key: str) -> bool:
    value = spec.get(key, "Cluster")
    if value not in TRAFFIC_POLICIES:
        c.error(f"spec.{key}", f"{value!r} must be Cluster or Local")
        return False
    return value == "Local"


def _algorithm(c: _Checker, annotations) -> int:
    if not isinstance(annotations, dict) or LB_ALGORITHM_ANNOTATION not in annotations:
        return ALGORITHM_DEFAULT
    value = annotations[LB_ALGORITHM_ANNOTATION]
    if value not in ALGORITHMS:
        c.error(f"metadata.annotations[{LB_ALGORITHM_ANNOTATION}]",
                f"{value!r} is not a load-balancing algorithm; use {' or '.join(ALGORITHMS)}")
        return ALGORITHM_DEFAULT
    return ALGORITHMS[value]


# -- EndpointSlice ------------------------------------------------------------------------

def parse_endpoint_slice(res: Resource) -> tuple[SliceSpec, list[ValidationError]]:
    """Raises ServiceValidationError when the slice cannot be used. Slices of another
    address family (IPv6, FQDN) parse to a slice without endpoints."""
    c = _Checker(res)
    body = res.body or {}
    service = (res.labels or {}).get(SERVICE_NAME_LABEL)
    if not service:
        c.error(f"metadata.labels[{SERVICE_NAME_LABEL}]",
                "is required: it names the Service these endpoints belong to")
    address_type = body.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        c.error("addressType", f"{address_type!r} must be IPv4, IPv6 or FQDN")
    ports = []
    raw_ports = body.get("ports") or []
    if not isinstance(raw_ports, list):
        c.error("ports", "must be a list")
        raw_ports = []
    for i, port in enumerate(raw_ports):
        path = f"ports[{i}]"
        if not isinstance(port, dict):
            c.error(path, "must be a mapping")
            continue
        number = port.get("port")
        if msg := _port_error(number):
            c.error(f"{path}.port", msg)
            continue
        proto = port.get("protocol") or "TCP"
        if proto == "SCTP":
            continue  # no SCTP service can use it
        if proto not in PROTOCOLS:
            c.error(f"{path}.protocol", f"{proto!r} is not a supported protocol; use TCP or UDP")
            continue
        name = port.get("name") or ""
        if not isinstance(name, str):
            c.error(f"{path}.name", "must be a string")
            continue
        ports.append(SlicePort(name, number, PROTOCOLS[proto]))
    endpoints = []
    raw_eps = body.get("endpoints") or []
    if not isinstance(raw_eps, list):
        c.error("endpoints", "must be a list")
        raw_eps = []
    ipv4 = address_type == "IPv4"
    for i, ep in enumerate(raw_eps):
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
            bad = [(n, v) for n, v in (("ready", r), ("serving", s_), ("terminating", t))
                   if v is not None and type(v) is not bool]
            for n, v in bad:
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
    c.raise_if_errors()
    if address_type != "IPv4":
        c.warn("addressType", f"{address_type} endpoints are ignored: the datapath carries IPv4 only")
    return SliceSpec(namespace=res.namespace or "default", name=res.name, source=res.source,
                     service=service, address_type=address_type, endpoints=tuple(endpoints),
                     ports=tuple(ports)), c.warnings


# -- Pod hostPorts ------------------------------------------------------------------------

def pod_host_ports(res: Resource, config: ServiceConfig
                   ) -> tuple[list[HostPort], list[ValidationError], list[ValidationError]]:
    """The hostPorts of a Pod's containers: (usable, errors, warnings). A hostPort inside
    the NodePort range is ignored with a warning (it would shadow NodePorts)."""
    c = _Checker(res)
    out: list[HostPort] = []
    spec = (res.body or {}).get("spec") or {}
    for ci, container in enumerate(spec.get("containers") or []):
        if not isinstance(container, dict):
            continue
        for pi, port in enumerate(container.get("ports") or []):
            if not isinstance(port, dict) or "hostPort" not in port or port["hostPort"] in (None, 0):
                continue
            path = f"spec.containers[{ci}].ports[{pi}]"
            host_port = port["hostPort"]
            if msg := _port_error(host_port):
                c.error(f"{path}.hostPort", msg)
                continue
            container_port = port.get("containerPort")
            if msg := _port_error(container_port):
                c.error(f"{path}.containerPort", msg)
                continue
            proto = _protocol(c, port.get("protocol"), f"{path}.protocol")
            if proto is None:
                continue
            if config.in_node_port_range(host_port):
                c.warn(f"{path}.hostPort", f"{host_port} is inside the NodePort range "
                                           f"{config.node_port_range_text}; the hostPort is ignored")
                continue
            host_ip = port.get("hostIP") or None
            if host_ip is not None:
                ip = _ipv4(host_ip)
                if ip is None:
                    c.error(f"{path}.hostIP", f"{host_ip!r} is not an IP address")
                    continue
                if ip.version == 6:
                    continue
                host_ip = None if ip.is_unspecified else str(ip)
            out.append(HostPort(host_port, container_port, proto, host_ip, path))
    return out, c.errors, c.warnings
