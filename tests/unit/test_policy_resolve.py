"""Policy objects -> resolved PolicyRules for one endpoint, as a table of cases."""

from ipaddress import ip_network

import pytest
import yaml

from cilium_py.agent.policy.api import CCNP, CNP, NETWORK_POLICY, parse_policy
from cilium_py.agent.policy.mapstate import MapEntry, compute_map_state
from cilium_py.agent.policy.repository import PolicyRepository
from cilium_py.agent.policy.resolve import EndpointContext, resolve
from cilium_py.datapath.maps.policy import PolicyMapKey

NS = "k8s:io.kubernetes.pod.namespace"
TEAM = "k8s:io.cilium.k8s.namespace.labels.team"

C8 = 1 << 24 | 1     # 10.0.0.0/8
C16 = 1 << 24 | 2    # 10.1.0.0/16
C192 = 1 << 24 | 3   # 192.168.0.0/16
C192X = 1 << 24 | 4  # 192.168.1.0/24
C1111 = 1 << 24 | 5  # 1.1.1.1/32
CIDR_IDS = {"10.0.0.0/8": C8, "10.1.0.0/16": C16, "192.168.0.0/16": C192, "192.168.1.0/24": C192X,
            "1.1.1.1/32": C1111, "0.0.0.0/0": 1 << 24 | 6}

RESERVED = {1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init", 6: "remote-node", 7: "kube-apiserver"}
WEB, CLIENT, CLIENT_DEV, DB = 256, 257, 258, 259
IDENTITIES = {
    **{i: {f"reserved:{n}": ""} for i, n in RESERVED.items()},
    WEB: {"k8s:app": "web", "k8s:tier": "front", NS: "prod", TEAM: "a"},
    CLIENT: {"k8s:app": "client", NS: "prod", TEAM: "a"},
    CLIENT_DEV: {"k8s:app": "client", NS: "dev", TEAM: "b"},
    DB: {"k8s:app": "db", "k8s:tier": "back", NS: "prod", TEAM: "a"},
}
PODS = {WEB, CLIENT, CLIENT_DEV, DB}
WEB_EP = EndpointContext(IDENTITIES[WEB], "prod", {"http": (8080, 6), "dns": (53, 17)})

TCP, UDP, SCTP, ICMP = 6, 17, 132, 1


def I(ident, proto=0, port=0, end=0, deny=False):  # noqa: E743 - short, like E
    return ("ingress", ident, proto, port, end, deny)


def E(ident, proto=0, port=0, end=0, deny=False):
    return ("egress", ident, proto, port, end, deny)


HOST_OK = I(1)


def kind_of(doc):
    return {"np": NETWORK_POLICY, "cnp": CNP, "ccnp": CCNP}[doc]


def run(policies, endpoint=WEB_EP, identities=IDENTITIES, peer_named_ports=None):
    repo = PolicyRepository()
    for i, (kind, spec) in enumerate(policies):
        body = yaml.safe_load(spec) if isinstance(spec, str) else spec
        if "spec" not in body and "specs" not in body:
            body = {"spec": body}
        ns = "" if kind == "ccnp" else "prod"
        repo.upsert((kind_of(kind), ns, f"p{i}"), parse_policy(kind_of(kind), ns, f"p{i}", body))
    return repo, resolve(endpoint, repo, identities, lambda p: CIDR_IDS[str(p)], peer_named_ports)


def flat(policy):
    return {(r.direction, r.identity, r.protocol, r.port, r.end_port, r.deny) for r in policy.rules}


CASES = [
    # --- Kubernetes NetworkPolicy ---
    ("np podSelector peer is same-namespace", [("np", """
podSelector: {matchLabels: {app: web}}
ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
""")], True, False, {HOST_OK, I(CLIENT)}),
    ("np namespaceSelector peer", [("np", """
podSelector: {}
ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]
""")], True, False, {HOST_OK, I(CLIENT_DEV)}),
    ("np empty namespaceSelector is every pod, not host or world", [("np", """
podSelector: {}
ingress: [{from: [{namespaceSelector: {}}]}]
""")], True, False, {HOST_OK} | {I(p) for p in PODS}),
    ("np podSelector AND namespaceSelector", [("np", """
podSelector: {}
ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: client}}},
                  {namespaceSelector: {}, podSelector: {matchExpressions: [{key: tier, operator: In, values: [back]}]}}]}]
""")], True, False, {HOST_OK, I(CLIENT_DEV), I(DB)}),
    ("np ipBlock with except", [("np", """
podSelector: {}
ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]
""")], True, False, {HOST_OK, I(C8)}),
    ("np ports: default TCP, UDP, SCTP, whole protocol", [("np", """
podSelector: {}
ingress: [{ports: [{port: 80}, {protocol: UDP, port: 53}, {protocol: SCTP, port: 9}, {protocol: UDP}]}]
""")], True, False, {HOST_OK, I(0, TCP, 80), I(0, UDP, 53), I(0, SCTP, 9), I(0, UDP)}),
    ("np endPort", [("np", """
podSelector: {}
egress: [{to: [{podSelector: {matchLabels: {app: db}}}], ports: [{port: 8000, endPort: 8100}]}]
""")], True, True, {HOST_OK, E(DB, TCP, 8000, 8100)}),
    ("np named ports resolve on the selected pod; unknown or wrong protocol give nothing", [("np", """
podSelector: {}
ingress: [{ports: [{port: http}, {port: dns, protocol: UDP}, {port: nope}, {port: http, protocol: UDP}]}]
""")], True, False, {HOST_OK, I(0, TCP, 8080), I(0, UDP, 53)}),
    ("np policyTypes default: egress rules enforce egress too, ingress becomes deny-all", [("np", """
podSelector: {}
egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]
""")], True, True, {HOST_OK, E(DB)}),
    ("np explicit Egress with no rules denies all egress, leaves ingress open", [("np", """
podSelector: {}
policyTypes: [Egress]
""")], False, True, set()),
    ("np empty from and empty rule allow every peer", [("np", """
podSelector: {}
ingress: [{from: []}]
egress: [{}]
""")], True, True, {HOST_OK, I(0), E(0)}),
    ("np only isolates the pods it selects", [("np", """
podSelector: {matchLabels: {app: db}}
ingress: []
""")], False, False, set()),
    ("np policies are additive", [("np", "{podSelector: {}, ingress: [{ports: [{port: 80}]}]}"),
                                  ("np", "{podSelector: {}, ingress: [{ports: [{port: 443}]}]}")],
     True, False, {HOST_OK, I(0, TCP, 80), I(0, TCP, 443)}),
    # --- CiliumNetworkPolicy ---
    ("cnp endpointSelector In/NotIn/Exists/DoesNotExist selects", [("cnp", """
endpointSelector:
  matchExpressions:
  - {key: app, operator: In, values: [web, api]}
  - {key: app, operator: NotIn, values: [db]}
  - {key: tier, operator: Exists}
  - {key: legacy, operator: DoesNotExist}
ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]
""")], True, False, {HOST_OK, I(CLIENT)}),
    ("cnp endpointSelector not matching leaves the endpoint alone", [("cnp", """
endpointSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}
ingress: [{}]
""")], False, False, set()),
    ("cnp fromEndpoints naming a namespace crosses namespaces", [("cnp", """
endpointSelector: {}
ingress:
- fromEndpoints: [{matchLabels: {app: client, k8s:io.kubernetes.pod.namespace: dev}}]
- fromEndpoints: [{matchLabels: {app: client}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
- fromEndpoints: [{}]
  toPorts: [{ports: [{port: "81", protocol: TCP}]}]
""")], True, False, {HOST_OK, I(CLIENT_DEV), I(CLIENT, TCP, 80)} | {I(p, TCP, 81) for p in PODS - {CLIENT_DEV}}),
    ("cnp fromCIDR and fromCIDRSet with except", [("cnp", """
endpointSelector: {}
ingress:
- fromCIDR: [1.1.1.1/32]
- fromCIDRSet: [{cidr: 192.168.0.0/16, except: [192.168.1.0/24]}]
""")], True, False, {HOST_OK, I(C1111), I(C192)}),
    ("cnp entities", [("cnp", """
endpointSelector: {}
ingress: [{fromEntities: [host, remote-node, health, init, unmanaged, kube-apiserver]}]
egress:
- toEntities: [world]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
- toEntities: [all]
  toPorts: [{ports: [{port: "53", protocol: UDP}]}]
""")], True, True, {I(1), I(6), I(4), I(5), I(3), I(7), E(2, TCP, 443), E(0, UDP, 53)}),
    ("cnp cluster entity is every non-world identity", [("cnp", """
endpointSelector: {}
egress: [{toEntities: [cluster]}]
""")], False, True, {E(i) for i in IDENTITIES if i != 2}),
    ("cnp toPorts ANY is TCP, UDP and SCTP; ports-only rule is every peer", [("cnp", """
endpointSelector: {}
egress: [{toPorts: [{ports: [{port: "53"}, {port: "8080", endPort: 8081, protocol: ANY}]}]}]
""")], False, True, {E(0, TCP, 53), E(0, UDP, 53), E(0, SCTP, 53),
                     E(0, TCP, 8080, 8081), E(0, UDP, 8080, 8081), E(0, SCTP, 8080, 8081)}),
    ("cnp icmps, IPv6 family ignored", [("cnp", """
endpointSelector: {}
ingress:
- fromEndpoints: [{matchLabels: {app: client}}]
  icmps: [{fields: [{type: EchoRequest}, {type: 3, family: IPv4}, {type: EchoRequest, family: IPv6}]}]
- icmps: [{fields: [{type: 128, family: IPv6}]}]
""")], True, False, {HOST_OK, I(CLIENT, ICMP, 8), I(CLIENT, ICMP, 3)}),
    ("cnp empty ingress rule is deny-all", [("cnp", "{endpointSelector: {}, ingress: [{}]}")],
     True, False, {HOST_OK}),
    ("cnp ingressDeny beats a NetworkPolicy allow", [
        ("np", "{podSelector: {}, ingress: [{}]}"),
        ("cnp", """
endpointSelector: {}
ingressDeny: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "22", protocol: TCP}]}]},
              {fromEntities: [host]}]
""")], True, False, {I(0), HOST_OK, I(1, deny=True), I(CLIENT, TCP, 22, deny=True)}),
    ("cnp egressDeny with enableDefaultDeny false keeps egress open", [("cnp", """
endpointSelector: {}
enableDefaultDeny: {egress: false}
egressDeny: [{toCIDRSet: [{cidr: 10.0.0.0/8}]}]
""")], False, True, {E(0), E(C8, deny=True)}),
    ("cnp deny-only policy isolates its direction", [("cnp", """
endpointSelector: {}
egressDeny: [{toEntities: [world]}]
""")], False, True, {E(2, deny=True)}),
    ("cnp specs list: each spec applies on its own", [("cnp", {"specs": [
        {"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "db"}}]}]},
        {"endpointSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"fromEntities": ["world"]}]},
        {"endpointSelector": {}, "egress": [{"toEndpoints": [{"matchLabels": {"app": "db"}}]}]},
    ]})], True, True, {HOST_OK, I(DB), E(DB)}),
    ("ccnp is cluster-wide on subject and peers; {} is the wildcard", [("ccnp", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints: [{matchLabels: {app: client}}]
egress:
- toEndpoints: [{}]
  toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")], True, True, {HOST_OK, I(CLIENT), I(CLIENT_DEV), E(0, TCP, 5432)}),
]


@pytest.mark.parametrize("name,policies,ingress,egress,expected", CASES, ids=[c[0] for c in CASES])
def test_resolve(name, policies, ingress, egress, expected):
    _, policy = run(policies)
    assert (policy.ingress_enforced, policy.egress_enforced) == (ingress, egress)
    assert flat(policy) == expected


def test_cidrs_lists_every_prefix_including_excepts():
    _, policy = run([("np", """
podSelector: {}
ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]
""")])
    assert policy.cidrs == {ip_network("10.0.0.0/8"): C8, ip_network("10.1.0.0/16"): C16}


def test_cidr_peer_covers_narrower_prefixes_of_other_policies():
    db_only = ("cnp", "{endpointSelector: {matchLabels: {app: db}}, egress: [{toCIDR: [10.1.0.0/16, 192.168.0.0/16]}]}")
    _, policy = run([("cnp", "{endpointSelector: {}, egress: [{toCIDR: [10.0.0.0/8]}]}"), db_only])
    assert flat(policy) == {E(C8), E(C16)}
    assert set(policy.cidrs.values()) == {C8, C16, C192}, "the ipcache needs every policy's prefixes"
    _, policy = run([("cnp", "{endpointSelector: {}, egress: [{toEntities: [world]}]}"), db_only])
    assert flat(policy) == {E(2), E(C16), E(C192)}, "world covers every CIDR identity"


def test_cidr_identities_passed_in_are_covered_too():
    idents = {**IDENTITIES, C16: {"cidr:10.1.0.0/16": ""}}
    _, policy = run([("cnp", "{endpointSelector: {}, egress: [{toCIDR: [10.0.0.0/8]}]}")], identities=idents)
    assert flat(policy) == {E(C8), E(C16)}


def test_zero_prefix_covers_world():
    _, policy = run([("cnp", "{endpointSelector: {}, egress: [{toCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]}]}")])
    assert flat(policy) == {E(CIDR_IDS["0.0.0.0/0"]), E(2)}


def test_egress_named_ports_use_peer_ports():
    peer_ports = {DB: {"pg": (5432, TCP)}, CLIENT: {"pg": (6432, TCP)}}
    _, policy = run([("cnp", """
endpointSelector: {}
egress:
- toEndpoints: [{matchLabels: {app: db}}, {matchLabels: {app: client}}, {matchLabels: {tier: front}}]
  toPorts: [{ports: [{port: pg, protocol: TCP}]}]
- toPorts: [{ports: [{port: pg}]}]
""")], peer_named_ports=peer_ports)
    assert flat(policy) == {E(DB, TCP, 5432), E(CLIENT, TCP, 6432), E(0, TCP, 5432), E(0, TCP, 6432)}
    _, policy = run([("cnp", "{endpointSelector: {}, egress: [{toPorts: [{ports: [{port: pg}]}]}]}")])
    assert flat(policy) == set(), "without peer ports a named egress port allows nothing"


def test_deny_wins_in_map_state_and_cookies_name_policies():
    repo, policy = run([("np", "{podSelector: {}, ingress: [{ports: [{port: 22}]}]}"),
                        ("cnp", "{endpointSelector: {}, ingressDeny: [{fromEndpoints: [{matchLabels: {app: client}}]}]}")])
    state = compute_map_state(9, policy.rules)
    deny_cookie = repo.cookie((CNP, "prod", "p1"))
    assert repo.cookie_name(deny_cookie) == "CiliumNetworkPolicy prod/p1"
    assert state[PolicyMapKey(9, CLIENT, "ingress", 0, 0, 0)] == MapEntry(True, deny_cookie)
    assert state[PolicyMapKey(9, 0, "ingress", TCP, 22, 16)] == MapEntry(False, repo.cookie((NETWORK_POLICY, "prod", "p0")))
    # In policy-name order, whatever order they arrived in.
    assert policy.selected_by == ["CiliumNetworkPolicy prod/p1", "NetworkPolicy prod/p0"]


def test_allow_localhost_can_be_turned_off():
    repo, _ = run([("np", "{podSelector: {}}")])
    policy = resolve(WEB_EP, repo, IDENTITIES, lambda p: 0, allow_localhost=False)
    assert policy.ingress_enforced and policy.rules == []


# --- repository ---------------------------------------------------------------------------

def rules(spec, name="p"):
    return parse_policy(CNP, "prod", name, {"spec": yaml.safe_load(spec)})


def test_repository_revision_cookies_and_affected_selectors():
    repo = PolicyRepository()
    key = (CNP, "prod", "p")
    first = rules("{endpointSelector: {matchLabels: {app: web}}, ingress: [{}]}")
    affected = repo.upsert(key, first)
    assert affected == {first[0].subject} and repo.revision == 1
    cookie = repo.cookie(key)
    assert repo.upsert(key, list(first)) == set() and repo.revision == 1, "no change, no new revision"

    second = rules("{endpointSelector: {matchLabels: {app: db}}, ingress: [{}]}")
    assert repo.upsert(key, second) == {first[0].subject, second[0].subject}
    assert repo.revision == 2 and repo.cookie(key) == cookie
    assert repo.policy_keys_selecting(IDENTITIES[DB]) == {key}
    assert repo.policy_keys_selecting(IDENTITIES[WEB]) == set()
    assert repo.rules_selecting(IDENTITIES[DB]) == second

    other = (CCNP, "", "q")
    repo.upsert(other, parse_policy(CCNP, "", "q", {"spec": {"endpointSelector": {}, "egress": [{"toCIDR": ["1.1.1.1/32"]}]}}))
    assert repo.cookie(other) != cookie and repo.cookie_name(repo.cookie(other)) == "CiliumClusterwideNetworkPolicy q"
    assert repo.cidr_prefixes() == {ip_network("1.1.1.1/32")}

    assert repo.delete(key) == {second[0].subject} and repo.revision == 4
    assert repo.delete(key) == set() and repo.revision == 4
    assert key not in repo and len(repo) == 1
    assert repo.cookie_name(cookie) == "CiliumNetworkPolicy prod/p", "late verdicts still have a name"
    repo.upsert(key, second)
    assert repo.cookie(key) == cookie, "re-created policy keeps its cookie"
