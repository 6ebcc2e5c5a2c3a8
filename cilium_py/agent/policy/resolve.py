"""One endpoint's policy: the rules selecting it, with peers turned into identities and
named ports into numbers, ready for compute_map_state.

Decisions where Kubernetes and Cilium leave room:
* A direction is enforced once any selecting rule speaks about it. If none of them asks for
  default deny (enableDefaultDeny: false), an allow-all entry keeps the direction open while
  the deny entries still apply: the datapath looks at no entry of an unenforced direction.
* The node's own host (identity 1) is allowed ingress whenever ingress is enforced, for
  every policy kind, as Cilium's allow-localhost default does in Kubernetes, so kubelet
  probes keep working; an explicit deny from host still wins.
* An empty endpoint selector (CCNP `fromEndpoints: [{}]`) is the any-identity entry 0,
  Cilium's L3 wildcard: it covers world too.
* A CIDR peer covers its own identity and every narrower CIDR identity (from any policy in
  the repository, or labelled cidr:<prefix> in identities) outside its excepts, because the
  ipcache maps an address to its longest prefix, which may come from another policy;
  0.0.0.0/0 and the world entity also cover reserved:world (2).
* Named ports: ingress resolves against the endpoint's own ports. Egress needs the peer's
  ports: they come from peer_named_ports (identity -> name -> (port, protocol)); a peer
  without an entry for the name gets nothing, and an any-identity peer gets every port any
  peer names that way. A named port whose protocol differs from the rule's gets nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from cilium_py.agent.policy.api import ANY, SCTP, TCP, UDP, CIDRPeer, PeerRule, PortSpec
from cilium_py.agent.policy.mapstate import PolicyRule
from cilium_py.agent.policy.selector import IN
from cilium_py.agent.policy.repository import PolicyRepository
from cilium_py.datapath.maps.policy import EGRESS, INGRESS

HOST, WORLD = 1, 2
ENTITY_IDS = {"host": {1}, "unmanaged": {3}, "health": {4}, "init": {5}, "remote-node": {6},
              "kube-apiserver": {7}, "ingress": {8}, "none": set(), "world-ipv6": set()}
WORLD_IDS = frozenset({2, 9, 10})
LOCAL_CIDR_SCOPE = 1 << 24
NAMESPACE_KEY = "io.kubernetes.pod.namespace"

NamedPorts = dict[str, tuple[int, int]]


@dataclass
class EndpointContext:
    labels: dict[str, str]
    namespace: str = ""
    named_ports: NamedPorts = field(default_factory=dict)


@dataclass
class EndpointPolicy:
    ingress_enforced: bool
    egress_enforced: bool
    rules: list[PolicyRule]
    cidrs: dict[IPv4Network, int]
    # Names of the selecting policies and the repository revision this was computed from.
    selected_by: list[str] = field(default_factory=list)
    revision: int = 0


def _cidr_of(labels: Mapping[str, str]) -> IPv4Network | None:
    for key in labels:
        if key.startswith("cidr:"):
            try:
                net = ipaddress.ip_network(key[5:], strict=False)
            except ValueError:
                continue
            if net.version == 4:
                return net
    return None


class PeerIndex:
    """Peers to identities for one snapshot of the identities and the repository's
    prefixes. Selector results are memoized, so resolving many endpoints against the same
    snapshot matches each selector against the identities once (a selector cache, as in
    Cilium), not once per endpoint. Build a new index when identities change."""

    def __init__(self, identities: Mapping[int, Mapping[str, str]], cidr_identity, prefixes):
        self.identities = identities
        self._by_selector: dict = {}
        self._cluster: set[int] | None = None
        self._by_namespace: dict[str, list] | None = None
        self.cidrs: dict[IPv4Network, int] = {}
        self.known: dict[IPv4Network, set[int]] = {}
        for ident, labels in identities.items():
            net = _cidr_of(labels)
            if net is not None:
                self.known.setdefault(net, set()).add(ident)
        # Allocate every prefix first, so a wide peer sees the narrow ones of the same pass.
        for prefix in sorted(prefixes, key=lambda n: (n.prefixlen, n)):
            ident = cidr_identity(prefix)
            self.cidrs[prefix] = ident
            self.known.setdefault(prefix, set()).add(ident)

    def _is_cidr(self, ident: int, labels) -> bool:
        return ident >= LOCAL_CIDR_SCOPE or _cidr_of(labels) is not None

    def of_selector(self, selector) -> set[int]:
        if selector.is_empty():
            return {0}
        found = self._by_selector.get(selector)
        if found is None:
            found = {i for i, labels in self._candidates(selector)
                     if i != 0 and selector.matches(labels)}
            self._by_selector[selector] = found
        return found

    def _candidates(self, selector):
        """Identities a selector can match: those of its namespaces when it pins the
        namespace (every CNP peer and NetworkPolicy pod peer does), else all of them."""
        for req in selector.requirements:
            if req.key == NAMESPACE_KEY and req.operator == IN and req.source in (None, "k8s"):
                if self._by_namespace is None:
                    self._by_namespace = {}
                    for i, labels in self.identities.items():
                        ns = labels.get("k8s:" + NAMESPACE_KEY)
                        self._by_namespace.setdefault(ns, []).append((i, labels))
                return [pair for ns in req.values for pair in self._by_namespace.get(ns, ())]
        return self.identities.items()

    def of_cidr(self, peer: CIDRPeer) -> set[int]:
        out = {self.cidrs[peer.cidr]}
        for prefix, idents in self.known.items():
            if prefix.subnet_of(peer.cidr) and not any(prefix.subnet_of(e) for e in peer.excepts):
                out |= idents
        if peer.cidr.prefixlen == 0:
            out.add(WORLD)
        return out

    def of_entity(self, name: str) -> set[int]:
        if name == "all":
            return {0}
        if name in ("world", "world-ipv4"):
            return {WORLD} | {i for ids in self.known.values() for i in ids}
        if name == "cluster":
            if self._cluster is None:
                self._cluster = {i for i, labels in self.identities.items()
                                 if i != 0 and i not in WORLD_IDS and not self._is_cidr(i, labels)}
            return self._cluster
        return set(ENTITY_IDS[name])

    def of_rule(self, entry: PeerRule) -> set[int]:
        if entry.all_peers:
            return {0}
        out: set[int] = set()
        for sel in entry.endpoints:
            out |= self.of_selector(sel)
        for peer in entry.cidrs:
            out |= self.of_cidr(peer)
        for name in entry.entities:
            out |= self.of_entity(name)
        # The wildcard already covers every identity; listing them too only costs entries.
        return {0} if 0 in out else out


def _protocols(protocol: int) -> tuple[int, ...]:
    return (TCP, UDP, SCTP) if protocol == ANY else (protocol,)


def _named(spec: PortSpec, ports: Mapping[str, tuple[int, int]]) -> tuple[int, int] | None:
    found = ports.get(spec.name)
    if found is None:
        return None
    number, proto = found
    if spec.protocol not in (ANY, proto):
        return None
    return number, proto


def _expand(entry: PeerRule, direction: str, cookie: int, peers: set[int],
            endpoint: EndpointContext, peer_named_ports: Mapping[int, NamedPorts]) -> set[PolicyRule]:
    out: set[PolicyRule] = set()
    if not peers:
        return out

    def add(ident, proto=0, port=0, end=0):
        out.add(PolicyRule(ident, direction, proto, port, end if end != port else 0, entry.deny, cookie))

    if entry.all_ports:
        for ident in peers:
            add(ident)
        return out
    for spec in entry.ports:
        if not spec.name:
            for ident in peers:
                for proto in _protocols(spec.protocol):
                    add(ident, proto, spec.port, spec.end_port)
        elif direction == INGRESS:
            found = _named(spec, endpoint.named_ports)
            if found:
                for ident in peers:
                    add(ident, found[1], found[0])
        else:
            for ident in peers:
                sources = peer_named_ports.values() if ident == 0 else [peer_named_ports.get(ident, {})]
                for ports in sources:
                    found = _named(spec, ports)
                    if found:
                        add(ident, found[1], found[0])
    return out


def resolve(endpoint: EndpointContext, repo: PolicyRepository,
            identities: Mapping[int, Mapping[str, str]],
            cidr_identity: Callable[[IPv4Network], int],
            peer_named_ports: Mapping[int, NamedPorts] | None = None,
            *, allow_localhost: bool = True, peers: PeerIndex | None = None) -> EndpointPolicy:
    """cidr_identity is called for every prefix in the repository on every call: the caller
    keeps it idempotent (the allocator's acquire is refcounted). The result's cidrs holds
    all those prefixes, which is what the ipcache needs. Pass `peers` (one PeerIndex built
    for the current identities) when resolving many endpoints in a row."""
    # Read before the rules: a policy changing meanwhile makes the result look older than
    # it is, so the caller recomputes, never newer, which would skip a needed recompute.
    revision = repo.revision
    selected = repo.selecting(endpoint.labels)
    # Every prefix of every policy, not only the selecting ones: each gets an ipcache entry,
    # which changes the identity of its addresses for all endpoints, so a wider CIDR peer
    # or the world entity of this endpoint must cover it too.
    if peers is None:
        peers = PeerIndex(identities, cidr_identity, repo.cidr_prefixes())
    named = peer_named_ports or {}

    rules: set[PolicyRule] = set()
    enforced = {}
    for direction in (INGRESS, EGRESS):
        deciding = [(c, r) for c, r in selected if r.default_deny(direction) is not None]
        enforced[direction] = bool(deciding)
        if not deciding:
            continue
        if not any(r.default_deny(direction) for _, r in deciding):
            rules.add(PolicyRule(0, direction, cookie=deciding[0][0]))
        if direction == INGRESS and allow_localhost:
            rules.add(PolicyRule(HOST, INGRESS))
        for cookie, rule in deciding:
            for entry in rule.entries(direction):
                rules |= _expand(entry, direction, cookie, peers.of_rule(entry), endpoint, named)

    names = list(dict.fromkeys(repo.cookie_name(c) for c, _ in selected))
    # Between rules of the same entry the later policy's cookie wins (map state keeps the
    # last): ranked by policy name, never by cookie number, which follows arrival order.
    rank = {c: i for i, (c, _) in enumerate(selected)}
    return EndpointPolicy(
        ingress_enforced=enforced[INGRESS],
        egress_enforced=enforced[EGRESS],
        rules=sorted(rules, key=lambda r: (r.direction, r.identity, r.protocol, r.port,
                                           r.end_port, r.deny, rank.get(r.cookie, -1))),
        cidrs=dict(sorted(peers.cidrs.items())),
        selected_by=names,
        revision=revision,
    )
