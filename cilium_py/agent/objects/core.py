"""Namespace, Node and Pod: the objects endpoints, identities and hostPorts come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from cilium_py.agent.objects.base import (
    Checker,
    Resource,
    dns_label,
    dns_subdomain,
    ip_address,
    list_of_mappings,
    mapping,
    parse_meta,
    port_number,
    port_name,
    protocol,
    required_spec,
)

# -- Namespace -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Namespace(Resource):
    kind = "Namespace"
    namespaced = False


def parse_namespace(doc, source: str, where: str = "object") -> Namespace:
    meta, c = parse_meta(Namespace, doc, source, where)
    c.raise_if_errors()
    return Namespace(**meta.common)


# -- Node ----------------------------------------------------------------------------------

class NodeAddress(NamedTuple):
    type: str                     # InternalIP, ExternalIP, Hostname...
    address: str


@dataclass(frozen=True, kw_only=True)
class Node(Resource):
    kind = "Node"
    namespaced = False

    addresses: tuple[NodeAddress, ...] = ()

    def ipv4_addresses(self, types=("InternalIP", "ExternalIP")) -> list[str]:
        """The node's IPv4 addresses of these types, in the order the object lists them
        (other address types, such as Hostname, hold names, not addresses)."""
        out = []
        for addr in self.addresses:
            if addr.type in types:
                ip = ip_address(addr.address)
                if ip is not None and ip.version == 4 and str(ip) not in out:
                    out.append(str(ip))
        return out


def parse_node(doc, source: str, where: str = "object") -> Node:
    meta, c = parse_meta(Node, doc, source, where)
    status = mapping(c, doc.get("status"), "status")
    addresses = []
    for i, addr in list_of_mappings(c, status.get("addresses"), "status.addresses"):
        kind, value = addr.get("type"), addr.get("address")
        if not isinstance(kind, str) or not kind:
            c.error(f"status.addresses[{i}].type", "must be a non-empty string")
        elif not isinstance(value, str) or not value:
            c.error(f"status.addresses[{i}].address", "must be a non-empty string")
        else:
            addresses.append(NodeAddress(kind, value))
    c.raise_if_errors()
    return Node(**meta.common, addresses=tuple(addresses))


# -- Pod -----------------------------------------------------------------------------------

class ContainerPort(NamedTuple):
    name: str                     # "" when unnamed
    port: int                     # containerPort
    protocol: int                 # IP protocol number (cilium_py.vocab)
    host_port: int = 0            # 0: none
    host_ip: str | None = None    # None: every node address
    path: str = ""                # "spec.containers[i].ports[j]", for messages


@dataclass(frozen=True, kw_only=True)
class Pod(Resource):
    kind = "Pod"

    node_name: str | None = None
    service_account: str = "default"
    ports: tuple[ContainerPort, ...] = ()   # every container's ports, in manifest order
    ip: str | None = None                   # status.podIP (the lab's pods have no status)
    ready: bool | None = None               # None: no status to say
    terminating: bool = False               # metadata.deletionTimestamp is set

    @property
    def named_ports(self) -> dict[str, tuple[int, int]]:
        """name -> (port, protocol). Parsing guarantees a name means one port."""
        return {p.name: (p.port, p.protocol) for p in self.ports if p.name}

    @property
    def host_ports(self) -> tuple[ContainerPort, ...]:
        return tuple(p for p in self.ports if p.host_port)

    def matches(self, selector: tuple[tuple[str, str], ...]) -> bool:
        labels = self.labels
        return all(labels.get(k) == v for k, v in selector)

    def container_port(self, target: int | str, protocol: int) -> int | None:
        """A Service targetPort (a number, or a container port name) resolved on this pod."""
        if isinstance(target, int):
            return target
        for p in self.ports:
            if p.name == target and p.protocol == protocol:
                return p.port
        return None


def parse_pod(doc, source: str, where: str = "object") -> Pod:
    meta, c = parse_meta(Pod, doc, source, where)
    spec = required_spec(c, doc, "containers")
    for opt in ("nodeName", "serviceAccountName"):
        if opt in spec and (msg := dns_subdomain(spec[opt], opt)):
            c.error(f"spec.{opt}", msg)
    ports = _container_ports(c, spec.get("containers"))
    ip, ready = _pod_status(c, doc.get("status"))
    c.raise_if_errors()
    node_name = spec.get("nodeName")
    return Pod(**meta.common, node_name=node_name or None,
               service_account=spec.get("serviceAccountName") or "default",
               ports=tuple(ports), ip=ip, ready=ready,
               terminating=bool(doc["metadata"].get("deletionTimestamp")))


def _container_ports(c: Checker, containers) -> list[ContainerPort]:
    if not isinstance(containers, list) or not containers:
        c.error("spec.containers", "a Pod needs at least one container")
        return []
    out = []
    # A named port must mean one port: policies and Services resolve names through the
    # pod, and an ambiguous name would be a rule we cannot enforce as written.
    named: dict[str, tuple[int, int, str]] = {}
    for ci, container in enumerate(containers):
        cpath = f"spec.containers[{ci}]"
        if not isinstance(container, dict):
            c.error(cpath, "must be a mapping")
            continue
        if msg := dns_label(container.get("name"), "container name"):
            c.error(f"{cpath}.name", msg)
        for pi, port in list_of_mappings(c, container.get("ports"), f"{cpath}.ports"):
            path = f"{cpath}.ports[{pi}]"
            number = port.get("containerPort")
            if number is None:
                c.error(f"{path}.containerPort", "is required")
            elif msg := port_number(number):
                c.error(f"{path}.containerPort", msg)
                number = None
            proto = protocol(c, port.get("protocol"), f"{path}.protocol")
            name = port.get("name")
            if name is not None:
                if msg := port_name(name):
                    c.error(f"{path}.name", msg)
                    name = None
                else:
                    first = named.setdefault(name, (number, proto, path))
                    if first[2] != path and first[:2] != (number, proto):
                        c.error(f"{path}.name", f"port name {name!r} is already used by "
                                                f"{first[2]} for a different port")
            host_port = port.get("hostPort")
            if host_port in (None, 0):
                host_port = 0
            elif msg := port_number(host_port):
                c.error(f"{path}.hostPort", msg)
                host_port = 0
            host_ip = port.get("hostIP") or None
            if host_ip is not None:
                ip = ip_address(host_ip)
                if ip is None:
                    c.error(f"{path}.hostIP", f"{host_ip!r} is not an IP address")
                host_ip = str(ip) if ip is not None else None
            if number is not None and proto is not None:
                out.append(ContainerPort(name or "", number, proto, host_port, host_ip, path))
    return out


def _pod_status(c: Checker, status) -> tuple[str | None, bool | None]:
    if status is None:
        return None, None
    if not isinstance(status, dict):
        c.error("status", "must be a mapping")
        return None, None
    ip = status.get("podIP") or None
    if ip is not None:
        addr = ip_address(ip)
        if addr is None:
            c.error("status.podIP", f"{ip!r} is not an IP address")
            ip = None
        else:
            ip = str(addr)
    ready = None
    for i, cond in list_of_mappings(c, status.get("conditions"), "status.conditions"):
        if cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
    if ready is None:
        ready = status.get("phase") == "Running"
    return ip, ready


__all__ = ["ContainerPort", "Namespace", "Node", "NodeAddress", "Pod",
           "parse_namespace", "parse_node", "parse_pod"]
