"""CiliumIdentity, CiliumEndpoint and CiliumNode: what other nodes and the operator publish
about identities, pods and nodes, as the agent reads them back from the API server.

The API server already holds these to the CRD schemas (operator/crds/), but a parser does
not trust that: an object written before a schema change, or by a client that skipped
validation, must not put a wrong identity or address into the datapath. The vocabularies
below are the ones the CRD schemas are generated from (cilium_py.operator.schemas).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple

from cilium_py.agent.objects.base import (
    NO_LABELS,
    Checker,
    Labels,
    Resource,
    ip_address,
    is_int,
    list_of_mappings,
    mapping,
    parse_meta,
    port_name,
    port_number,
    protocol,
)
from cilium_py.vocab import FIRST_CLUSTER_IDENTITY, LOCAL_IDENTITY_SCOPE

CILIUM_API_VERSION = "cilium.io/v2"

# Cluster identities are the only ones stored as CiliumIdentities: reserved ones (below
# 256) are fixed on every node, and local-scope ones (CIDRs, from 1<<24) never leave it.
# An object naming a reserved number would claim, say, `health` for a pod's labels.
MIN_STORED_IDENTITY = FIRST_CLUSTER_IDENTITY
MAX_STORED_IDENTITY = LOCAL_IDENTITY_SCOPE - 1
# A CiliumEndpoint may carry any identity below the local scope, reserved ones included
# (the health endpoint is identity 4).
MAX_ENDPOINT_IDENTITY = LOCAL_IDENTITY_SCOPE - 1

HEARTBEAT_ANNOTATION = "io.cilium.heartbeat"

ENDPOINT_STATES = ("creating", "waiting-for-identity", "not-ready", "waiting-to-regenerate",
                   "regenerating", "restoring", "ready", "disconnecting", "disconnected", "invalid")
POLICY_ENFORCEMENT_STATES = ("enforcing", "non-enforcing", "disabled")
# Address types that hold names rather than IP addresses.
NAME_ADDRESS_TYPES = ("Hostname", "ExternalDNS", "InternalDNS")
NODE_ADDRESS_TYPES = ("Hostname", "ExternalIP", "InternalIP", "ExternalDNS", "InternalDNS",
                      "CiliumInternalIP")
POD_CIDR_STATES = ("released", "depleted", "in-use")
IP_RELEASE_STATES = ("marked-for-release", "ready-for-release", "do-not-release", "released")
MAX_ENCRYPTION_KEY = 255      # the datapath keeps the key index in a u8

_IDENTITY_NAME = re.compile(r"[1-9][0-9]*")
_LABEL_SOURCE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


# -- CiliumIdentity ------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CiliumIdentity(Resource):
    """One cluster identity: its number (the object's name) and its labels, each keyed
    "source:key" ("k8s:app")."""

    kind = "CiliumIdentity"
    namespaced = False
    api_version = CILIUM_API_VERSION

    identity: int
    security_labels: Labels = NO_LABELS
    heartbeat: str = ""           # set by the operator's GC: the identity is marked for deletion

    def __post_init__(self):
        super().__post_init__()
        if type(self.security_labels) is not Labels:
            object.__setattr__(self, "security_labels", Labels(self.security_labels))


def parse_cilium_identity(doc, source: str, where: str = "object") -> CiliumIdentity:
    meta, c = parse_meta(CiliumIdentity, doc, source, where)
    identity = 0
    if not _IDENTITY_NAME.fullmatch(meta.name):
        c.error("metadata.name", f"{meta.name!r} is not a numeric identity: the name must be the "
                                 "identity in decimal, without leading zeros")
    else:
        identity = int(meta.name)
        if not MIN_STORED_IDENTITY <= identity <= MAX_STORED_IDENTITY:
            c.error("metadata.name", f"identity {identity} is not a cluster identity "
                                     f"({MIN_STORED_IDENTITY}-{MAX_STORED_IDENTITY})")
    raw = doc.get("security-labels")
    labels: dict[str, str] = {}
    if raw is None:
        c.error("security-labels", "is required: the identity's labels, keyed source:key")
    elif not isinstance(raw, dict):
        c.error("security-labels", "must be a mapping of source:key to value")
    else:
        for key, value in raw.items():
            if msg := _security_label_error(key, value):
                c.error(f"security-labels.{key}", msg)
            else:
                labels[key] = value
    heartbeat = (doc["metadata"].get("annotations") or {}).get(HEARTBEAT_ANNOTATION, "")
    if not isinstance(heartbeat, str):
        c.error(f"metadata.annotations.{HEARTBEAT_ANNOTATION}", "must be a string")
        heartbeat = ""
    c.raise_if_errors()
    return CiliumIdentity(**meta.common, identity=identity, security_labels=Labels(labels),
                          heartbeat=heartbeat)


def _security_label_error(key, value) -> str | None:
    if not isinstance(key, str):
        return "label keys must be strings"
    source, sep, name = key.partition(":")
    if not sep or not name or not _LABEL_SOURCE.fullmatch(source):
        return f"{key!r} is not a source:key label (such as k8s:app)"
    if not isinstance(value, str):
        return f"label values must be strings, not {value!r}"
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        return (f"{value!r} is not a valid label value: at most 63 letters, digits, '-', '_' and '.', "
                "starting and ending with a letter or digit")
    return None


# -- CiliumEndpoint ------------------------------------------------------------------------

class NamedPort(NamedTuple):
    name: str
    port: int
    protocol: int                 # IP protocol number (cilium_py.vocab)


@dataclass(frozen=True, kw_only=True)
class CiliumEndpoint(Resource):
    """A pod's endpoint as its node published it: where the pod's addresses live (node_ip,
    the tunnel endpoint towards them) and which identity they carry."""

    kind = "CiliumEndpoint"
    api_version = CILIUM_API_VERSION

    endpoint_id: int | None = None
    identity: int | None = None           # None: the node has not given it one yet
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    node_ip: str | None = None            # None: not placed on a node (skipped for the ipcache)
    state: str | None = None
    named_ports: tuple[NamedPort, ...] = ()
    encryption_key: int | None = None     # None: the node's default key

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.ipv4 + self.ipv6


def parse_cilium_endpoint(doc, source: str, where: str = "object") -> CiliumEndpoint:
    meta, c = parse_meta(CiliumEndpoint, doc, source, where)
    status = mapping(c, doc.get("status"), "status")
    endpoint_id = _optional_int(c, status.get("id"), "status.id", 0, 2**63 - 1)
    ident = mapping(c, status.get("identity"), "status.identity")
    identity = _optional_int(c, ident.get("id"), "status.identity.id", 1, MAX_ENDPOINT_IDENTITY)
    ipv4, ipv6, node_ip = _networking(c, status.get("networking"))
    state = status.get("state")
    if state is not None and state not in ENDPOINT_STATES:
        c.error("status.state", f"{state!r} is not an endpoint state (one of {', '.join(ENDPOINT_STATES)})")
        state = None
    named_ports = _named_ports(c, status.get("named-ports"))
    encryption = mapping(c, status.get("encryption"), "status.encryption")
    key = _optional_int(c, encryption.get("key"), "status.encryption.key", 0, MAX_ENCRYPTION_KEY)
    c.raise_if_errors()
    return CiliumEndpoint(**meta.common, endpoint_id=endpoint_id, identity=identity, ipv4=ipv4,
                          ipv6=ipv6, node_ip=node_ip, state=state, named_ports=named_ports,
                          encryption_key=key)


def _networking(c: Checker, raw) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    net = mapping(c, raw, "status.networking")
    ipv4: list[str] = []
    ipv6: list[str] = []
    for i, pair in list_of_mappings(c, net.get("addressing"), "status.networking.addressing"):
        for family, out in (("ipv4", ipv4), ("ipv6", ipv6)):
            value = pair.get(family)
            if value in (None, ""):
                continue
            addr = ip_address(value)
            if addr is None or addr.version != (4 if family == "ipv4" else 6):
                c.error(f"status.networking.addressing[{i}].{family}",
                        f"{value!r} is not an {family.replace('ip', 'IP')} address")
            elif str(addr) not in out:
                out.append(str(addr))
    node_ip = net.get("node")
    if node_ip in (None, ""):
        node_ip = None
    elif (addr := ip_address(node_ip)) is None:
        c.error("status.networking.node", f"{node_ip!r} is not an IP address")
        node_ip = None
    else:
        node_ip = str(addr)
    return tuple(ipv4), tuple(ipv6), node_ip


def _named_ports(c: Checker, raw) -> tuple[NamedPort, ...]:
    out: dict[str, NamedPort] = {}
    for i, port in list_of_mappings(c, raw, "status.named-ports"):
        path = f"status.named-ports[{i}]"
        name, number = port.get("name"), port.get("port")
        bad = False
        if msg := port_name(name):
            c.error(f"{path}.name", msg)
            bad = True
        if msg := port_number(number):
            c.error(f"{path}.port", msg)
            bad = True
        proto = protocol(c, port.get("protocol"), f"{path}.protocol")
        if bad or proto is None:
            continue
        if name in out and out[name][1:] != (number, proto):
            c.error(f"{path}.name", f"port name {name!r} is listed twice for different ports")
            continue
        out[name] = NamedPort(name, number, proto)
    return tuple(out.values())


# -- CiliumNode ----------------------------------------------------------------------------

class CiliumNodeAddress(NamedTuple):
    type: str                     # InternalIP, CiliumInternalIP, ExternalIP, Hostname...
    ip: str                       # an address, or a name for the name types


@dataclass(frozen=True, kw_only=True)
class CiliumNode(Resource):
    """A node as Cilium sees it: its addresses, the pod CIDRs the operator gave it, where its
    health endpoint answers, and what the operator could not do for it."""

    kind = "CiliumNode"
    namespaced = False
    api_version = CILIUM_API_VERSION

    addresses: tuple[CiliumNodeAddress, ...] = ()
    pod_cidrs: tuple[str, ...] = ()       # spec.ipam.podCIDRs, normalized
    health_ipv4: str | None = None
    operator_error: str = ""              # status.ipam.operator-status.error

    def address(self, kind: str) -> str | None:
        """The first address of this type, None when the node lists none."""
        return next((a.ip for a in self.addresses if a.type == kind), None)


def parse_cilium_node(doc, source: str, where: str = "object") -> CiliumNode:
    meta, c = parse_meta(CiliumNode, doc, source, where)
    spec = mapping(c, doc.get("spec"), "spec")
    addresses = []
    for i, addr in list_of_mappings(c, spec.get("addresses"), "spec.addresses"):
        path = f"spec.addresses[{i}]"
        kind, value = addr.get("type"), addr.get("ip")
        if kind not in NODE_ADDRESS_TYPES:
            c.error(f"{path}.type", f"{kind!r} is not an address type (one of {', '.join(NODE_ADDRESS_TYPES)})")
        elif not isinstance(value, str) or not value:
            c.error(f"{path}.ip", "must be a non-empty string")
        elif kind in NAME_ADDRESS_TYPES:
            addresses.append(CiliumNodeAddress(kind, value))
        elif (ip := ip_address(value)) is None:
            c.error(f"{path}.ip", f"{value!r} is not an IP address, which a {kind} entry holds")
        else:
            addresses.append(CiliumNodeAddress(kind, str(ip)))
    ipam = mapping(c, spec.get("ipam"), "spec.ipam")
    pod_cidrs = []
    raw_cidrs = ipam.get("podCIDRs")
    if raw_cidrs is not None and not isinstance(raw_cidrs, list):
        c.error("spec.ipam.podCIDRs", "must be a list of CIDRs")
    for i, cidr in enumerate(raw_cidrs if isinstance(raw_cidrs, list) else []):
        try:
            if not isinstance(cidr, str) or "/" not in cidr:
                raise ValueError
            pod_cidrs.append(str(ipaddress.ip_network(cidr, strict=True)))
        except ValueError:
            c.error(f"spec.ipam.podCIDRs[{i}]", f"{cidr!r} is not a CIDR such as 10.244.1.0/24 "
                                                "(without host bits)")
    health = mapping(c, spec.get("health"), "spec.health")
    health_ipv4 = health.get("ipv4") or None
    if health_ipv4 is not None:
        ip = ip_address(health_ipv4)
        if ip is None or ip.version != 4:
            c.error("spec.health.ipv4", f"{health_ipv4!r} is not an IPv4 address")
            health_ipv4 = None
        else:
            health_ipv4 = str(ip)
    status = mapping(c, doc.get("status"), "status")
    status_ipam = mapping(c, status.get("ipam"), "status.ipam")
    op_status = mapping(c, status_ipam.get("operator-status"), "status.ipam.operator-status")
    error = op_status.get("error")
    if error is not None and not isinstance(error, str):
        c.error("status.ipam.operator-status.error", "must be a string")
        error = None
    c.raise_if_errors()
    return CiliumNode(**meta.common, addresses=tuple(addresses), pod_cidrs=tuple(pod_cidrs),
                      health_ipv4=health_ipv4, operator_error=error or "")


def _optional_int(c: Checker, value, path: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if not is_int(value):
        c.error(path, f"must be an integer, not {value!r}")
        return None
    if not low <= value <= high:
        c.error(path, f"{value} is not in {low}-{high}")
        return None
    return value


__all__ = [
    "CiliumEndpoint", "CiliumIdentity", "CiliumNode", "CiliumNodeAddress", "NamedPort",
    "parse_cilium_endpoint", "parse_cilium_identity", "parse_cilium_node",
]
