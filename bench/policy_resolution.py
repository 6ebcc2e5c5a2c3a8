"""Full policy resolution: 500 policies over 1000 endpoints in 50 namespaces, pure Python
(no kernel). Identities come from IdentityAllocator (no state file) over
labels.endpoint_labels(...); the policies (NetworkPolicy with podSelector,
namespaceSelector, ipBlock/except, ports, endPort and named ports; CiliumNetworkPolicy with
fromEndpoints/toEndpoints, toPorts, fromEntities, ingressDeny, toCIDRSet; a few CCNPs) are
parsed with parse_policy into a PolicyRepository. Timed: resolve(...) + compute_map_state(...)
for every endpoint, median of 3 runs. Baseline: parsing the 500 policies (same run).

The cluster generator here is shared with bench/policy_change.py.
"""

from __future__ import annotations

import time
import zlib

from bench.common import Result, median

NAMESPACES = 50
PODS_PER_NAMESPACE = 20
POLICIES_PER_NAMESPACE = 10
RUNS = 3
TARGET_S = 2.0

TEAMS = ("payments", "search", "identity", "growth", "platform")
ENVS = ("prod", "staging", "dev")
# (app, tier, pods per version) -> 20 pods per namespace, 2 versions of each app
APPS = (("frontend", "web", 3), ("backend", "api", 3), ("worker", "api", 2),
        ("db", "data", 1), ("cache", "data", 1))
CONTAINER_PORTS = {
    "frontend": [("http", 8080, "TCP"), ("metrics", 9090, "TCP")],
    "backend": [("http", 8080, "TCP"), ("grpc", 50051, "TCP"), ("metrics", 9090, "TCP")],
    "worker": [("metrics", 9090, "TCP")],
    "db": [("pg", 5432, "TCP"), ("metrics", 9187, "TCP")],
    "cache": [("redis", 6379, "TCP")],
}


def ns_name(i: int) -> str:
    return f"ns-{i:02d}"


def namespace_labels(i: int) -> dict:
    return {"team": TEAMS[i % len(TEAMS)], "env": ENVS[i % len(ENVS)]}


def namespace_resources(count: int):
    from cilium_py.agent.objects import parse_namespace

    return [parse_namespace({"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": ns_name(i), "labels": namespace_labels(i)}}, "bench")
            for i in range(count)]


def pod_resource(ns: str, name: str, labels: dict, app: str, node: str | None):
    from cilium_py.agent.objects import parse_pod

    ports = [{"name": n, "containerPort": p, "protocol": proto}
             for n, p, proto in CONTAINER_PORTS[app]]
    spec = {"containers": [{"name": app, "image": f"example/{app}:1", "ports": ports}],
            "serviceAccountName": app}
    if node is not None:
        spec["nodeName"] = node
    return parse_pod({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
                      "spec": spec}, "bench")


def pod_resources(ns_index: int, per_namespace: int = PODS_PER_NAMESPACE, node: str | None = None):
    """`per_namespace` pods with app/tier/version labels plus per-replica labels
    (pod-template-hash) that the identity filter drops."""
    ns = ns_name(ns_index)
    out = []
    n = 0
    while len(out) < per_namespace:
        for app, tier, per_version in APPS:
            for version in ("v1", "v2"):
                for r in range(per_version):
                    if len(out) == per_namespace:
                        break
                    labels = {"app": app, "tier": tier, "version": version,
                              "app.kubernetes.io/part-of": f"shop-{ns_index % 7}",
                              "pod-template-hash": f"{zlib.crc32(f'{ns}{app}{version}'.encode()) % 10**8:08d}"}
                    out.append(pod_resource(ns, f"{app}-{version}-{r}-{n}", labels, app, node))
        n += 1
    return out


def _np(ns: str, name: str, spec: dict):
    return ("NetworkPolicy", ns, name, {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                        "metadata": {"name": name, "namespace": ns}, "spec": spec})


def _cnp(ns: str, name: str, spec: dict):
    return ("CiliumNetworkPolicy", ns, name, {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                                              "metadata": {"name": name, "namespace": ns}, "spec": spec})


def _ccnp(name: str, spec: dict):
    return ("CiliumClusterwideNetworkPolicy", None, name,
            {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
             "metadata": {"name": name}, "spec": spec})


def namespace_policies(i: int, count: int = POLICIES_PER_NAMESPACE, api_port: int = 8080):
    """Up to 10 policies (kind, namespace, name, body) of namespace i; every 10th namespace
    replaces its last one with a CiliumClusterwideNetworkPolicy. `api_port` is what
    policy_change modifies."""
    ns = ns_name(i)
    other = ns_name((i + 1) % NAMESPACES)
    team = TEAMS[i % len(TEAMS)]
    octet = i % 5  # a handful of distinct CIDRs cluster-wide (each one is an identity)
    pols = [
        # 0: NP default deny ingress for the namespace
        _np(ns, "default-deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        # 1: NP backend from frontend of the namespace, numeric port (modified by policy_change)
        _np(ns, "backend-from-frontend", {
            "podSelector": {"matchLabels": {"app": "backend"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                         "ports": [{"protocol": "TCP", "port": api_port}]}]}),
        # 2: NP db from backend (named port) and from an ipBlock with except
        _np(ns, "db-ingress", {
            "podSelector": {"matchLabels": {"tier": "data"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchExpressions": [
                    {"key": "app", "operator": "In", "values": ["backend", "worker"]}]}}],
                 "ports": [{"protocol": "TCP", "port": "pg"}, {"protocol": "TCP", "port": "redis"}]},
                {"from": [{"ipBlock": {"cidr": f"10.{octet}.0.0/16",
                                       "except": [f"10.{octet}.128.0/17"]}}],
                 "ports": [{"protocol": "TCP", "port": 5432}]}]}),
        # 3: NP frontend from prod namespaces of the same team (namespaceSelector + podSelector)
        _np(ns, "frontend-from-team", {
            "podSelector": {"matchLabels": {"tier": "web"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": team}},
                                   "podSelector": {"matchLabels": {"app": "frontend"}}},
                                  {"namespaceSelector": {"matchLabels": {"env": "prod"}}}],
                         "ports": [{"protocol": "TCP", "port": 8080},
                                   {"protocol": "TCP", "port": 8443, "endPort": 8450}]}]}),
        # 4: NP egress of api tier: to data tier, DNS in ns-00, and a port range anywhere
        _np(ns, "api-egress", {
            "podSelector": {"matchLabels": {"tier": "api"}},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"podSelector": {"matchLabels": {"tier": "data"}}}],
                 "ports": [{"protocol": "TCP", "port": "pg"}, {"protocol": "TCP", "port": 6379}]},
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-00"}},
                         "podSelector": {"matchLabels": {"app": "cache"}}}],
                 "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                 "ports": [{"protocol": "TCP", "port": 30000, "endPort": 30999}]}]}),
        # 5: CNP metrics from monitoring (namespace other) and the host
        _cnp(ns, "metrics-scrape", {
            "endpointSelector": {},
            "ingress": [{"fromEndpoints": [{"matchLabels": {
                "k8s:io.kubernetes.pod.namespace": other, "app": "worker"}}],
                "toPorts": [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]},
                {"fromEntities": ["host", "remote-node"]}]}),
        # 6: CNP cache: deny frontend, allow api tier on 6379
        _cnp(ns, "cache-guard", {
            "endpointSelector": {"matchLabels": {"app": "cache"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"tier": "api"}}],
                         "toPorts": [{"ports": [{"port": "6379", "protocol": "TCP"}]}]}],
            "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}]}]}),
        # 7: CNP backend v2 canary: grpc from frontend v2 only, egress to db and a CIDR set
        _cnp(ns, "canary", {
            "endpointSelector": {"matchLabels": {"app": "backend", "version": "v2"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend", "version": "v2"}}],
                         "toPorts": [{"ports": [{"port": "50051", "protocol": "TCP"}]}]}],
            "egress": [{"toEndpoints": [{"matchLabels": {"app": "db"}}],
                        "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]},
                       {"toCIDRSet": [{"cidr": f"172.16.{octet}.0/24",
                                       "except": [f"172.16.{octet}.128/25"]}],
                        "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]}),
        # 8: CNP worker: cluster-wide peers by entity, deny a port range from world
        _cnp(ns, "worker", {
            "endpointSelector": {"matchLabels": {"app": "worker"}},
            "ingress": [{"fromEntities": ["cluster"],
                         "toPorts": [{"ports": [{"port": "9000", "endPort": 9010, "protocol": "TCP"}]}]}],
            "ingressDeny": [{"fromEntities": ["world"],
                             "toPorts": [{"ports": [{"port": "23", "protocol": "TCP"},
                                                   {"port": "2375", "endPort": 2376, "protocol": "TCP"}]}]}]}),
        # 9: NP frontend egress to backend of the namespace by named port
        _np(ns, "frontend-egress", {
            "podSelector": {"matchLabels": {"app": "frontend"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "backend"}}}],
                        "ports": [{"protocol": "TCP", "port": "http"},
                                  {"protocol": "TCP", "port": "grpc"}]}]}),
    ]
    if i % 10 == 9:
        pols[9] = _ccnp(f"ccnp-{i:02d}", {
            "endpointSelector": {"matchLabels": {"tier": "data",
                                                 "io.cilium.k8s.namespace.labels.team": team}},
            "ingress": [{"fromEntities": ["cluster"],
                         "toPorts": [{"ports": [{"port": "9187", "protocol": "TCP"}]}]}],
            "ingressDeny": [{"fromCIDR": [f"10.{octet}.200.0/24"]}]})
    return pols[:count]


def build_cluster(namespaces: int = NAMESPACES, per_namespace: int = PODS_PER_NAMESPACE):
    """(endpoints, allocator): endpoints are (namespace, labels, identity, named_ports)."""
    from cilium_py.agent.controller import pod_ports
    from cilium_py.agent.identity import IdentityAllocator
    from cilium_py.agent.labels import endpoint_labels

    alloc = IdentityAllocator()  # no state file
    ns_labels = {r.name: r.labels for r in namespace_resources(namespaces)}
    endpoints = []
    for i in range(namespaces):
        for pod in pod_resources(i, per_namespace):
            labels = endpoint_labels(pod.labels, pod.namespace, ns_labels[pod.namespace],
                                     pod.service_account)
            named, _ = pod_ports(pod)
            endpoints.append((pod.namespace, labels, alloc.acquire(labels), named))
    return endpoints, alloc


def parse_all(policies):
    from cilium_py.agent.objects import parse_object
    from cilium_py.agent.policy.repository import PolicyRepository

    repo = PolicyRepository()
    for _, _, _, body in policies:
        policy = parse_object(body, "bench")
        repo.upsert(policy.key, policy.rules)
    return repo


def resolve_all(endpoints, repo, alloc) -> tuple[int, int]:
    """resolve + compute_map_state for every endpoint; returns (map entries, rules)."""
    from cilium_py.agent.policy.mapstate import compute_map_state
    from cilium_py.agent.policy.resolve import EndpointContext, PeerIndex, resolve

    cidr_ids: dict = {}

    def cidr_identity(prefix):
        if prefix not in cidr_ids:
            cidr_ids[prefix] = alloc.acquire_cidr(prefix)
        return cidr_ids[prefix]

    identities = alloc.all()
    peer_ports: dict[int, dict] = {}
    for _, _, ident, named in endpoints:
        peer_ports.setdefault(ident, {}).update(named)
    entries = rules = 0
    # As the controller does: one selector cache for the pass over every endpoint.
    peers = PeerIndex(identities, cidr_identity, repo.cidr_prefixes())
    for endpoint_id, (ns, labels, _, named) in enumerate(endpoints, start=1):
        ctx = EndpointContext(labels=labels, namespace=ns, named_ports=named)
        policy = resolve(ctx, repo, identities, cidr_identity, peer_named_ports=peer_ports,
                         peers=peers)
        entries += len(compute_map_state(endpoint_id, policy.rules))
        rules += len(policy.rules)
    return entries, rules


def run(quick: bool = False) -> list[Result]:
    runs = 1 if quick else RUNS
    endpoints, alloc = build_cluster()
    policies = [p for i in range(NAMESPACES) for p in namespace_policies(i)]
    t0 = time.perf_counter()
    repo = parse_all(policies)
    parse_s = time.perf_counter() - t0
    samples = []
    entries = rules = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        entries, rules = resolve_all(endpoints, repo, alloc)
        samples.append(time.perf_counter() - t0)
    m = median(samples)
    kinds: dict[str, int] = {}
    for kind, *_ in policies:
        kinds[kind] = kinds.get(kind, 0) + 1
    n_ids = len(alloc.all())
    return [
        Result(f"policy_resolution: {len(policies)} policies x {len(endpoints)} endpoints",
               f"{m:.2f} s", f"{parse_s * 1000:.0f} ms parse", m / parse_s,
               f"<= {TARGET_S:.0f} s ({m / TARGET_S:.2f}x of target)", m <= TARGET_S,
               [f"resolve + compute_map_state for every endpoint, median of {runs} "
                f"({', '.join(f'{s:.2f}' for s in samples)} s); baseline = parse_policy of all "
                f"{len(policies)} policies into a PolicyRepository",
                f"{entries} map entries ({entries / len(endpoints):.1f}/endpoint) from {rules} rules; "
                f"{n_ids} identities (7 reserved); "
                + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())),
                f"ratio vs target: {m / TARGET_S:.2f}x of {TARGET_S:.0f} s"]),
    ]


if __name__ == "__main__":
    for row in run():
        print(row)