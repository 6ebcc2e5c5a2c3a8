"""Policy objects (NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy) parsed
into one internal rule model, with every error naming the field that caused it.

Everything the engine cannot enforce is rejected, never skipped: an ignored deny, or an
ignored peer list next to a `toPorts`, would make a policy allow more than its author wrote.
Unknown fields are rejected for the same reason: a typo such as `fromEndpoint` would
otherwise leave a rule with ports and no peers, which means every peer.

The only input accepted and then ignored is IPv6 (CIDRs, ICMPv6): the datapath carries
IPv4 only, so there is no IPv6 traffic for such a rule to widen or narrow. A peer or port
list whose every entry was IPv6 still counts as given, so it selects nothing rather than
falling back to "all".
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from ipaddress import IPv4Network

from cilium_py.agent.policy.selector import (
    EXISTS,
    IN,
    K8S_NAMESPACE_KEY,
    LabelSelector,
    PolicyError,
    requirement,
)
from cilium_py import vocab
from cilium_py.vocab import (
    CILIUM_PROTOCOLS,
    EGRESS,
    ICMP,
    INGRESS,
    K8S_PROTOCOLS,
    NETWORK_POLICY,
    POLICY_KINDS as KINDS,
)

# The short names the policy package and its tests use for the Cilium kinds.
CNP, CCNP = vocab.CILIUM_NETWORK_POLICY, vocab.CILIUM_CLUSTERWIDE_NETWORK_POLICY

MAX_PORTS = 40
MAX_ICMP_FIELDS = 40

ENTITIES = frozenset({"all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "remote-node",
                      "health", "init", "ingress", "unmanaged", "kube-apiserver", "none"})

ICMPV4_TYPES = {
    "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
    "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
    "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
ICMPV6_TYPES = {
    "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
    "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131, "MulticastListenerDone": 132, "RouterSolicitation": 133,
    "RouterAdvertisement": 134, "NeighborSolicitation": 135, "NeighborAdvertisement": 136,
    "RedirectMessage": 137, "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139,
    "ICMPNodeInformationResponse": 140, "InverseNeighborDiscoverySolicitation": 141,
    "InverseNeighborDiscoveryAdvertisement": 142, "HomeAgentAddressDiscoveryRequest": 144,
    "HomeAgentAddressDiscoveryReply": 145, "MobilePrefixSolicitation": 146,
    "MobilePrefixAdvertisement": 147, "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158, "ExtendedEchoRequest": 160,
    "ExtendedEchoReply": 161,
}

NOT_ENFORCED_L7 = "L7 policy is not enforced yet; the whole policy is rejected"
NOT_ENFORCED_FQDN = "toFQDNs (DNS-based) policy is not enforced yet; the whole policy is rejected"

_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


@dataclass(frozen=True)
class PortSpec:
    """protocol ANY (0) stands for TCP, UDP and SCTP; port 0 for every port. A named port
    (name set, port 0) is resolved per endpoint. ICMP carries the ICMP type in port."""

    protocol: int
    port: int = 0
    end_port: int = 0
    name: str = ""


@dataclass(frozen=True)
class CIDRPeer:
    cidr: IPv4Network
    excepts: tuple[IPv4Network, ...] = ()


@dataclass(frozen=True)
class PeerRule:
    """One ingress/egress(/deny) entry: (any of the peers) AND (any of the ports).
    all_peers/all_ports distinguish "not given" from "given, but nothing enforceable left"."""

    deny: bool = False
    all_peers: bool = True
    endpoints: tuple[LabelSelector, ...] = ()
    cidrs: tuple[CIDRPeer, ...] = ()
    entities: tuple[str, ...] = ()
    all_ports: bool = True
    ports: tuple[PortSpec, ...] = ()
    path: str = ""


@dataclass(frozen=True)
class Rule:
    """One spec of a policy object. *_default_deny: None = this rule says nothing about that
    direction; True = it isolates the endpoint; False = it adds entries without isolating."""

    kind: str
    namespace: str
    name: str
    subject: LabelSelector
    ingress: tuple[PeerRule, ...] = ()
    egress: tuple[PeerRule, ...] = ()
    ingress_default_deny: bool | None = None
    egress_default_deny: bool | None = None
    path: str = "spec"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    def selects(self, labels) -> bool:
        return self.subject.matches(labels)

    def entries(self, direction: str) -> tuple[PeerRule, ...]:
        return self.ingress if direction == INGRESS else self.egress

    def default_deny(self, direction: str) -> bool | None:
        return self.ingress_default_deny if direction == INGRESS else self.egress_default_deny

    def cidr_prefixes(self) -> set[IPv4Network]:
        out = set()
        for entry in self.ingress + self.egress:
            for peer in entry.cidrs:
                out.add(peer.cidr)
                out.update(peer.excepts)
        return out


def selects(rule: Rule, labels) -> bool:
    return rule.selects(labels)


def policy_name(kind: str, namespace: str | None, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def parse_policy(kind: str, namespace: str | None, name: str, body: dict) -> list[Rule]:
    """body is the whole object (apiVersion, kind, metadata, spec/specs)."""
    if kind not in KINDS:
        raise PolicyError("kind", f"unknown policy kind {kind!r} (one of {', '.join(KINDS)})")
    if not isinstance(body, dict):
        raise PolicyError("", "policy must be an object")
    if kind == CCNP:
        namespace = ""
    elif not namespace:
        raise PolicyError("metadata.namespace", f"a {kind} is namespaced and needs a namespace")
    if kind == NETWORK_POLICY:
        return [_parse_network_policy(namespace, name, body)]
    return _parse_cilium_policy(kind, namespace, name, body)


# --- shared helpers -----------------------------------------------------------------------

def _obj(value, path: str, allowed: set[str], unsupported: dict[str, str] | None = None) -> dict:
    if not isinstance(value, dict):
        raise PolicyError(path, "must be an object")
    for field in value:
        if unsupported and field in unsupported:
            raise PolicyError(f"{path}.{field}", unsupported[field])
        if field not in allowed:
            raise PolicyError(f"{path}.{field}", f"unknown field (expected one of {', '.join(sorted(allowed))})")
    return value


def _list(value, path: str, max_items: int | None = None) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(path, "must be a list")
    if max_items is not None and len(value) > max_items:
        raise PolicyError(path, f"at most {max_items} items are allowed, got {len(value)}")
    return value


def _bool(value, path: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise PolicyError(path, f"must be true or false, not {value!r}")


def _parse_cidr(value, path: str, *, bare_ip: bool) -> IPv4Network | None:
    """None for an IPv6 CIDR (validated, then ignored: the datapath is IPv4-only)."""
    if not isinstance(value, str) or (not bare_ip and "/" not in value):
        raise PolicyError(path, f"must be a CIDR such as 10.0.0.0/8, not {value!r}")
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise PolicyError(path, f"{value!r} is not a valid CIDR") from None
    return net if net.version == 4 else None


def _parse_cidr_with_except(cidr_value, excepts, path: str, cidr_field: str, except_field: str,
                            *, bare_ip: bool) -> CIDRPeer | None:
    if cidr_value is None:
        raise PolicyError(f"{path}.{cidr_field}", "is required")
    cidr_path = f"{path}.{cidr_field}"
    cidr = _parse_cidr(cidr_value, cidr_path, bare_ip=bare_ip)
    full = ipaddress.ip_network(cidr_value, strict=False)
    out = []
    for i, ex_value in enumerate(_list(excepts, f"{path}.{except_field}")):
        ex_path = f"{path}.{except_field}[{i}]"
        _parse_cidr(ex_value, ex_path, bare_ip=bare_ip)
        ex = ipaddress.ip_network(ex_value, strict=False)
        if ex.version != full.version or not ex.subnet_of(full) or ex.prefixlen <= full.prefixlen:
            raise PolicyError(ex_path, f"{ex_value} must be a strict subset of {cidr_field} {cidr_value}")
        if cidr is not None:
            out.append(ex)
    if cidr is None:
        return None
    return CIDRPeer(cidr, tuple(sorted(set(out))))


def _parse_port_value(value, path: str, *, allow_zero: bool) -> tuple[int, str]:
    """(number, "") or (0, name)."""
    if isinstance(value, bool):
        raise PolicyError(path, f"must be a port number or name, not {value!r}")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        low = 0 if allow_zero else 1
        if not low <= value <= 65535:
            raise PolicyError(path, f"port {value} is out of range {low}-65535")
        return value, ""
    if isinstance(value, str):
        if (len(value) > 15 or not _SVC_NAME.match(value) or "--" in value
                or not any(c.isalpha() for c in value)):
            raise PolicyError(path, f"{value!r} is neither a port number nor a valid port name "
                                    "(at most 15 lowercase letters, digits and '-', with a letter)")
        return 0, value
    raise PolicyError(path, f"must be a port number or name, not {value!r}")


def _parse_end_port(value, port: int, name: str, path: str, port_path: str) -> int:
    if value is None or value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(path, f"endPort must be an integer, not {value!r}")
    if name:
        raise PolicyError(path, f"endPort needs a numeric port, but {port_path} is the named port {name!r}")
    if not port:
        raise PolicyError(path, f"endPort needs a numeric port in {port_path}")
    if value > 65535:
        raise PolicyError(path, f"endPort {value} is above 65535")
    if value < port:
        raise PolicyError(path, f"endPort {value} is below port {port}")
    return 0 if value == port else value


# --- Kubernetes NetworkPolicy -------------------------------------------------------------

def _namespace_is(namespace: str):
    return requirement(K8S_NAMESPACE_KEY, IN, [namespace])


def _parse_network_policy(namespace: str, name: str, body: dict) -> Rule:
    if "spec" not in body:
        raise PolicyError("spec", "is required")
    spec = _obj(body["spec"], "spec", {"podSelector", "policyTypes", "ingress", "egress"})
    pod_sel = LabelSelector.parse(spec.get("podSelector"), "spec.podSelector", allow_source=False)
    subject = (pod_sel or LabelSelector.all()).map_keys("k8s").with_requirements(_namespace_is(namespace))

    ingress_raw = _list(spec.get("ingress"), "spec.ingress")
    egress_raw = _list(spec.get("egress"), "spec.egress")
    if spec.get("policyTypes") is None:
        types = {"Ingress"} | ({"Egress"} if egress_raw else set())
    else:
        types = set()
        for i, t in enumerate(_list(spec["policyTypes"], "spec.policyTypes")):
            if t not in ("Ingress", "Egress"):
                raise PolicyError(f"spec.policyTypes[{i}]", f"must be Ingress or Egress, not {t!r}")
            types.add(t)

    ingress = tuple(_parse_np_rule(r, f"spec.ingress[{i}]", "from", namespace)
                    for i, r in enumerate(ingress_raw))
    egress = tuple(_parse_np_rule(r, f"spec.egress[{i}]", "to", namespace)
                   for i, r in enumerate(egress_raw))
    # Rules of a direction missing from policyTypes do not apply: Kubernetes ignores them.
    return Rule(
        kind=NETWORK_POLICY, namespace=namespace, name=name, subject=subject,
        ingress=ingress if "Ingress" in types else (),
        egress=egress if "Egress" in types else (),
        ingress_default_deny=True if "Ingress" in types else None,
        egress_default_deny=True if "Egress" in types else None,
    )


def _parse_np_rule(raw, path: str, peers_field: str, namespace: str) -> PeerRule:
    rule = _obj(raw, path, {peers_field, "ports"})
    peers_raw = _list(rule.get(peers_field), f"{path}.{peers_field}")
    endpoints, cidrs = [], []
    for i, peer in enumerate(peers_raw):
        ppath = f"{path}.{peers_field}[{i}]"
        sel, cidr = _parse_np_peer(peer, ppath, namespace)
        if sel is not None:
            endpoints.append(sel)
        if cidr is not None:
            cidrs.append(cidr)
    ports_raw = _list(rule.get("ports"), f"{path}.ports")
    ports = tuple(_parse_np_port(p, f"{path}.ports[{i}]") for i, p in enumerate(ports_raw))
    return PeerRule(
        all_peers=not peers_raw, endpoints=tuple(endpoints), cidrs=tuple(cidrs),
        all_ports=not ports_raw, ports=ports, path=path,
    )


def _parse_np_peer(raw, path: str, namespace: str):
    peer = _obj(raw, path, {"podSelector", "namespaceSelector", "ipBlock"})
    pod = LabelSelector.parse(peer.get("podSelector"), f"{path}.podSelector", allow_source=False)
    ns = LabelSelector.parse(peer.get("namespaceSelector"), f"{path}.namespaceSelector", allow_source=False)
    block = peer.get("ipBlock")
    if block is not None:
        if pod is not None or ns is not None:
            raise PolicyError(f"{path}.ipBlock", "ipBlock cannot be combined with podSelector or namespaceSelector")
        block = _obj(block, f"{path}.ipBlock", {"cidr", "except"})
        return None, _parse_cidr_with_except(block.get("cidr"), block.get("except"), f"{path}.ipBlock",
                                             "cidr", "except", bare_ip=False)
    if pod is None and ns is None:
        raise PolicyError(path, "a peer needs podSelector, namespaceSelector or ipBlock")
    sel = (pod or LabelSelector.all()).map_keys("k8s")
    if ns is None:
        sel = sel.with_requirements(_namespace_is(namespace))
    else:
        # Namespace labels are copied onto each pod's identity under this prefix; requiring
        # the namespace label to exist keeps reserved identities (host, world) out of `{}`.
        sel = LabelSelector(sel.requirements + ns.map_keys("k8s", "io.cilium.k8s.namespace.labels.").requirements)
        sel = sel.with_requirements(requirement(K8S_NAMESPACE_KEY, EXISTS))
    return sel, None


def _parse_np_port(raw, path: str) -> PortSpec:
    port = _obj(raw, path, {"protocol", "port", "endPort"})
    proto_name = port.get("protocol", "TCP")
    if proto_name not in K8S_PROTOCOLS:
        raise PolicyError(f"{path}.protocol", f"must be TCP, UDP or SCTP, not {proto_name!r}")
    number, name = 0, ""
    if port.get("port") is not None:
        number, name = _parse_port_value(port["port"], f"{path}.port", allow_zero=False)
    end = _parse_end_port(port.get("endPort"), number, name, f"{path}.endPort", f"{path}.port")
    return PortSpec(K8S_PROTOCOLS[proto_name], number, end, name)


# --- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy ---------------------------------

_RULE_FIELDS = {"endpointSelector", "ingress", "ingressDeny", "egress", "egressDeny", "labels",
                "enableDefaultDeny", "description", "log"}
_RULE_UNSUPPORTED = {"nodeSelector": "nodeSelector (host policy) is not supported; use endpointSelector"}
_COMMON_PEER_UNSUPPORTED = {
    "authentication": "mutual authentication is not supported",
}
_INGRESS_FIELDS = {"fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "toPorts", "icmps"}
_INGRESS_UNSUPPORTED = {
    **_COMMON_PEER_UNSUPPORTED,
    "fromRequires": "fromRequires is not supported (removed from Cilium)",
    "fromGroups": "fromGroups (cloud provider groups) is not supported",
    "fromNodes": "fromNodes is not supported",
}
_EGRESS_FIELDS = {"toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toPorts", "icmps"}
_EGRESS_UNSUPPORTED = {
    **_COMMON_PEER_UNSUPPORTED,
    "toFQDNs": NOT_ENFORCED_FQDN,
    "toRequires": "toRequires is not supported (removed from Cilium)",
    "toServices": "toServices is not supported",
    "toGroups": "toGroups (cloud provider groups) is not supported",
    "toNodes": "toNodes is not supported",
}
_PORT_RULE_UNSUPPORTED = {
    "rules": NOT_ENFORCED_L7,
    "terminatingTLS": "TLS interception is not supported (" + NOT_ENFORCED_L7 + ")",
    "originatingTLS": "TLS interception is not supported (" + NOT_ENFORCED_L7 + ")",
    "serverNames": "serverNames (SNI) is not supported (" + NOT_ENFORCED_L7 + ")",
    "listener": "listener (Envoy) is not supported (" + NOT_ENFORCED_L7 + ")",
}


def _parse_cilium_policy(kind: str, namespace: str, name: str, body: dict) -> list[Rule]:
    has_spec, has_specs = body.get("spec") is not None, body.get("specs") is not None
    if has_spec and has_specs:
        raise PolicyError("specs", "give either spec or specs, not both")
    if not has_spec and not has_specs:
        raise PolicyError("spec", "is required (or specs, a list of rules)")
    if has_spec:
        return [_parse_cilium_rule(kind, namespace, name, body["spec"], "spec")]
    specs = _list(body["specs"], "specs")
    if not specs:
        raise PolicyError("specs", "must list at least one rule")
    return [_parse_cilium_rule(kind, namespace, name, s, f"specs[{i}]") for i, s in enumerate(specs)]


def _parse_cilium_rule(kind: str, namespace: str, name: str, raw, path: str) -> Rule:
    spec = _obj(raw, path, _RULE_FIELDS, _RULE_UNSUPPORTED)
    subject = LabelSelector.parse(spec.get("endpointSelector"), f"{path}.endpointSelector")
    if subject is None:
        raise PolicyError(f"{path}.endpointSelector", "is required")
    if namespace:
        subject = subject.with_requirements(_namespace_is(namespace))

    _list(spec.get("labels"), f"{path}.labels")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise PolicyError(f"{path}.description", "must be a string")
    if spec.get("log") is not None:
        _obj(spec["log"], f"{path}.log", {"value"})

    dd = spec.get("enableDefaultDeny")
    dd_in = dd_eg = None
    if dd is not None:
        dd = _obj(dd, f"{path}.enableDefaultDeny", {"ingress", "egress"})
        dd_in = _bool(dd.get("ingress"), f"{path}.enableDefaultDeny.ingress")
        dd_eg = _bool(dd.get("egress"), f"{path}.enableDefaultDeny.egress")

    ingress = []
    for section, deny in (("ingress", False), ("ingressDeny", True)):
        for i, r in enumerate(_list(spec.get(section), f"{path}.{section}")):
            ingress.append(_parse_cilium_peer_rule(r, f"{path}.{section}[{i}]", INGRESS, deny, namespace))
    egress = []
    for section, deny in (("egress", False), ("egressDeny", True)):
        for i, r in enumerate(_list(spec.get(section), f"{path}.{section}")):
            egress.append(_parse_cilium_peer_rule(r, f"{path}.{section}[{i}]", EGRESS, deny, namespace))

    return Rule(
        kind=kind, namespace=namespace, name=name, subject=subject,
        ingress=tuple(ingress), egress=tuple(egress),
        ingress_default_deny=_default_deny(dd_in, bool(ingress)),
        egress_default_deny=_default_deny(dd_eg, bool(egress)),
        path=path,
    )


def _default_deny(explicit: bool | None, has_rules: bool) -> bool | None:
    # Deny rules count as rules of their direction, as in Cilium: a policy holding only
    # ingressDeny isolates ingress unless it says enableDefaultDeny.ingress: false.
    if has_rules:
        return True if explicit is None else explicit
    # An explicit true with no rules isolates (deny all); an explicit false alone adds nothing.
    return True if explicit else None


def _peer_selector(raw, path: str, namespace: str) -> LabelSelector:
    sel = LabelSelector.parse(raw, path)
    if sel is None:
        raise PolicyError(path, "must be a label selector object")
    # A namespaced policy talks about its own namespace unless the selector names one;
    # selectors of reserved identities (host, world...) have no namespace to add.
    if namespace and not sel.mentions(K8S_NAMESPACE_KEY) and not sel.mentions_source("reserved"):
        sel = sel.with_requirements(_namespace_is(namespace))
    return sel


def _parse_cilium_peer_rule(raw, path: str, direction: str, deny: bool, namespace: str) -> PeerRule:
    if direction == INGRESS:
        rule = _obj(raw, path, _INGRESS_FIELDS, _INGRESS_UNSUPPORTED)
        f_ep, f_cidr, f_set, f_ent = "fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities"
    else:
        rule = _obj(raw, path, _EGRESS_FIELDS, _EGRESS_UNSUPPORTED)
        f_ep, f_cidr, f_set, f_ent = "toEndpoints", "toCIDR", "toCIDRSet", "toEntities"

    endpoints = tuple(_peer_selector(s, f"{path}.{f_ep}[{i}]", namespace)
                      for i, s in enumerate(_list(rule.get(f_ep), f"{path}.{f_ep}")))
    cidrs = []
    cidr_raw = _list(rule.get(f_cidr), f"{path}.{f_cidr}")
    for i, c in enumerate(cidr_raw):
        net = _parse_cidr(c, f"{path}.{f_cidr}[{i}]", bare_ip=True)
        if net is not None:
            cidrs.append(CIDRPeer(net))
    set_raw = _list(rule.get(f_set), f"{path}.{f_set}")
    for i, c in enumerate(set_raw):
        cpath = f"{path}.{f_set}[{i}]"
        c = _obj(c, cpath, {"cidr", "except"}, {
            "cidrGroupRef": "cidrGroupRef (CiliumCIDRGroup) is not supported",
            "cidrGroupSelector": "cidrGroupSelector (CiliumCIDRGroup) is not supported"})
        peer = _parse_cidr_with_except(c.get("cidr"), c.get("except"), cpath, "cidr", "except", bare_ip=True)
        if peer is not None:
            cidrs.append(peer)
    ent_raw = _list(rule.get(f_ent), f"{path}.{f_ent}")
    for i, e in enumerate(ent_raw):
        if e not in ENTITIES:
            raise PolicyError(f"{path}.{f_ent}[{i}]", f"unknown entity {e!r} (one of {', '.join(sorted(ENTITIES))})")

    ports: list[PortSpec] = []
    to_ports = _list(rule.get("toPorts"), f"{path}.toPorts")
    for i, pr in enumerate(to_ports):
        ports.extend(_parse_port_rule(pr, f"{path}.toPorts[{i}]", deny))
    icmps = _list(rule.get("icmps"), f"{path}.icmps")
    for i, ic in enumerate(icmps):
        ports.extend(_parse_icmp_rule(ic, f"{path}.icmps[{i}]"))

    peers_given = bool(endpoints or cidr_raw or set_raw or ent_raw)
    l4_given = bool(to_ports or icmps)
    # Cilium: a rule with only ports applies to every peer, but a rule with neither peers
    # nor ports ({}) selects nothing, which is how "ingress: [{}]" means deny-all.
    return PeerRule(
        deny=deny, all_peers=not peers_given and l4_given,
        endpoints=endpoints, cidrs=tuple(dict.fromkeys(cidrs)), entities=tuple(dict.fromkeys(ent_raw)),
        all_ports=not l4_given, ports=tuple(dict.fromkeys(ports)), path=path,
    )


def _parse_port_rule(raw, path: str, deny: bool) -> list[PortSpec]:
    unsupported = dict(_PORT_RULE_UNSUPPORTED)
    if deny:
        unsupported["rules"] = "deny rules cannot carry L7 rules; " + NOT_ENFORCED_L7
    rule = _obj(raw, path, {"ports"}, unsupported)
    out = []
    for i, p in enumerate(_list(rule.get("ports"), f"{path}.ports", MAX_PORTS)):
        ppath = f"{path}.ports[{i}]"
        p = _obj(p, ppath, {"port", "endPort", "protocol"})
        proto_name = p.get("protocol") or "ANY"
        if proto_name not in CILIUM_PROTOCOLS:
            raise PolicyError(f"{ppath}.protocol", f"must be ANY, TCP, UDP or SCTP, not {proto_name!r} "
                                                   "(ICMP goes in icmps)")
        number, name = 0, ""
        if p.get("port") is not None:
            number, name = _parse_port_value(p["port"], f"{ppath}.port", allow_zero=True)
        end = _parse_end_port(p.get("endPort"), number, name, f"{ppath}.endPort", f"{ppath}.port")
        out.append(PortSpec(CILIUM_PROTOCOLS[proto_name], number, end, name))
    return out


def _parse_icmp_rule(raw, path: str) -> list[PortSpec]:
    rule = _obj(raw, path, {"fields"})
    out = []
    for i, f in enumerate(_list(rule.get("fields"), f"{path}.fields", MAX_ICMP_FIELDS)):
        fpath = f"{path}.fields[{i}]"
        f = _obj(f, fpath, {"type", "family"})
        family = f.get("family") or "IPv4"
        if family not in ("IPv4", "IPv6"):
            raise PolicyError(f"{fpath}.family", f"must be IPv4 or IPv6, not {family!r}")
        names = ICMPV4_TYPES if family == "IPv4" else ICMPV6_TYPES
        t = f.get("type")
        if isinstance(t, str) and t.isdigit():
            t = int(t)
        if t is None:
            raise PolicyError(f"{fpath}.type", "is required")
        if isinstance(t, bool) or not isinstance(t, (int, str)):
            raise PolicyError(f"{fpath}.type", f"must be a number 0-255 or a type name, not {t!r}")
        if isinstance(t, int):
            if not 0 <= t <= 255:
                raise PolicyError(f"{fpath}.type", f"ICMP type {t} is out of range 0-255")
        elif t not in names:
            raise PolicyError(f"{fpath}.type", f"unknown {family} ICMP type name {t!r} "
                                               f"(one of {', '.join(sorted(names))})")
        else:
            t = names[t]
        if family == "IPv4":
            out.append(PortSpec(ICMP, t))
    return out
