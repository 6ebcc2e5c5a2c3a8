from ipaddress import ip_network

import pytest
import yaml

from cilium_py.agent.policy.api import CCNP, CNP, NETWORK_POLICY, CIDRPeer, PortSpec, parse_policy
from cilium_py.agent.policy.selector import PolicyError
from cilium_py.vocab import ICMP, SCTP, TCP, UDP

WEB_PROD = {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "prod"}
WEB_DEV = {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "dev"}


def np(spec):
    return parse_policy(NETWORK_POLICY, "prod", "p", {"spec": yaml.safe_load(spec) if isinstance(spec, str) else spec})


def cnp(spec, kind=CNP, key="spec"):
    ns = "" if kind == CCNP else "prod"
    return parse_policy(kind, ns, "p", {key: yaml.safe_load(spec) if isinstance(spec, str) else spec})


# --- NetworkPolicy ------------------------------------------------------------------------

def test_np_policy_types_default_ingress_only():
    [r] = np({"podSelector": {}})
    assert (r.ingress_default_deny, r.egress_default_deny) == (True, None)


def test_np_policy_types_default_adds_egress_when_egress_rules_exist():
    [r] = np({"podSelector": {}, "egress": [{}]})
    assert (r.ingress_default_deny, r.egress_default_deny) == (True, True)


def test_np_explicit_egress_only_drops_ingress_rules():
    [r] = np({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]})
    assert r.ingress == () and r.ingress_default_deny is None and r.egress_default_deny is True


def test_np_subject_is_namespaced():
    [r] = np({"podSelector": {"matchLabels": {"app": "web"}}})
    assert r.selects(WEB_PROD) and not r.selects(WEB_DEV)


def test_np_ports_default_tcp_and_protocols():
    [r] = np("""
podSelector: {}
ingress:
- ports: [{port: 80}, {protocol: UDP, port: 53}, {protocol: SCTP}, {port: http}, {port: 8000, endPort: 8100}]
""")
    assert r.ingress[0].ports == (PortSpec(TCP, 80), PortSpec(UDP, 53), PortSpec(SCTP), PortSpec(TCP, 0, 0, "http"),
                                  PortSpec(TCP, 8000, 8100))
    assert r.ingress[0].all_peers and not r.ingress[0].all_ports


def test_np_empty_from_means_all_peers_and_ipblock_except():
    [r] = np("""
podSelector: {}
ingress:
- from: []
- from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
""")
    assert r.ingress[0].all_peers and r.ingress[0].all_ports
    assert r.ingress[1].cidrs == (CIDRPeer(ip_network("10.0.0.0/8"), (ip_network("10.1.0.0/16"),)),)
    assert not r.ingress[1].all_peers


def test_np_ipv6_block_is_ignored_but_still_counts_as_given():
    [r] = np({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/8"}}]}]})
    assert r.ingress[0].cidrs == () and not r.ingress[0].all_peers


@pytest.mark.parametrize("spec,field,fragment", [
    ({"podSelector": {}, "ingres": []}, "spec.ingres", "unknown field"),
    ({"podSelector": {}, "policyTypes": ["ingress"]}, "spec.policyTypes[0]", "Ingress or Egress"),
    ({"podSelector": {"matchLabels": {"k8s:app": "x"}}}, "spec.podSelector.matchLabels[k8s:app]", "':'"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]", "needs podSelector"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "spec.ingress[0].from[0].ipBlock", "cannot be combined"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "not a valid CIDR"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "must be a CIDR"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "required"),
    ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}]}]},
     "spec.egress[0].to[0].ipBlock.except[0]", "strict subset"),
    ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]},
     "spec.egress[0].to[0].ipBlock.except[0]", "strict subset"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "spec.ingress[0].ports[0].protocol", "TCP, UDP or SCTP"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "tcp"}]}]}, "spec.ingress[0].ports[0].protocol", "TCP, UDP or SCTP"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}, "spec.ingress[0].ports[0].port", "out of range 1-65535"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}, "spec.ingress[0].ports[0].port", "out of range"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "Bad_Name"}]}]}, "spec.ingress[0].ports[0].port", "port name"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort", "numeric port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]}, "spec.ingress[0].ports[0].endPort", "numeric port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "spec.ingress[0].ports[0].endPort", "below"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 65536}]}]}, "spec.ingress[0].ports[0].endPort", "65535"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": "100"}]}]}, "spec.ingress[0].ports[0].endPort", "integer"),
    ({"podSelector": {}, "ingress": {"from": []}}, "spec.ingress", "list"),
])
def test_np_validation_errors(spec, field, fragment):
    with pytest.raises(PolicyError) as e:
        np(spec)
    assert e.value.field == field, e.value.message
    assert fragment in e.value.message


def test_np_needs_spec_and_namespace():
    with pytest.raises(PolicyError) as e:
        parse_policy(NETWORK_POLICY, "prod", "p", {"metadata": {}})
    assert e.value.field == "spec"
    with pytest.raises(PolicyError) as e:
        parse_policy(NETWORK_POLICY, None, "p", {"spec": {}})
    assert e.value.field == "metadata.namespace"


def test_unknown_kind():
    with pytest.raises(PolicyError) as e:
        parse_policy("Policy", "prod", "p", {"spec": {}})
    assert e.value.field == "kind"


# --- CiliumNetworkPolicy ------------------------------------------------------------------

def test_cnp_subject_gets_namespace_ccnp_does_not():
    [r] = cnp({"endpointSelector": {"matchLabels": {"app": "web"}}})
    assert r.selects(WEB_PROD) and not r.selects(WEB_DEV)
    [r] = cnp({"endpointSelector": {"matchLabels": {"app": "web"}}}, kind=CCNP)
    assert r.selects(WEB_PROD) and r.selects(WEB_DEV)


def test_cnp_peer_gets_namespace_unless_it_names_one_or_a_reserved_label():
    [r] = cnp("""
endpointSelector: {}
ingress:
- fromEndpoints:
  - {matchLabels: {app: web}}
  - {matchLabels: {k8s:io.kubernetes.pod.namespace: dev, app: web}}
  - {matchExpressions: [{key: io.kubernetes.pod.namespace, operator: Exists}]}
  - {matchLabels: {reserved:host: ""}}
""")
    a, b, c, d = r.ingress[0].endpoints
    assert a.matches(WEB_PROD) and not a.matches(WEB_DEV)
    assert b.matches(WEB_DEV) and not b.matches(WEB_PROD)
    assert c.matches(WEB_DEV) and c.matches(WEB_PROD)
    assert d.matches({"reserved:host": ""})


def test_cnp_default_deny_follows_rules_of_each_direction():
    [r] = cnp({"endpointSelector": {}, "ingressDeny": [{"fromEntities": ["world"]}]})
    assert (r.ingress_default_deny, r.egress_default_deny) == (True, None)
    [r] = cnp({"endpointSelector": {}, "egress": [{"toEntities": ["all"]}],
               "enableDefaultDeny": {"egress": False}})
    assert (r.ingress_default_deny, r.egress_default_deny) == (None, False)
    [r] = cnp({"endpointSelector": {}, "enableDefaultDeny": {"ingress": True}})
    assert r.ingress_default_deny is True


def test_cnp_empty_rule_selects_nothing_ports_only_rule_selects_every_peer():
    [r] = cnp("""
endpointSelector: {}
ingress:
- {}
- toPorts: [{ports: [{port: "80", protocol: TCP}]}]
- icmps: [{fields: [{type: EchoRequest}, {type: 0}, {type: 128, family: IPv6}]}]
- fromCIDR: [fd00::/8]
""")
    empty, ports, icmp, v6 = r.ingress
    assert not empty.all_peers and empty.all_ports
    assert ports.all_peers and ports.ports == (PortSpec(TCP, 80),)
    assert icmp.all_peers and icmp.ports == (PortSpec(ICMP, 8), PortSpec(ICMP, 0))
    assert not v6.all_peers and v6.cidrs == ()


def test_cnp_ports_any_named_ranges_and_cidrset():
    [r] = cnp("""
endpointSelector: {}
egress:
- toCIDR: [1.1.1.1, 10.0.0.0/8]
  toCIDRSet: [{cidr: 192.168.0.0/16, except: [192.168.1.0/24]}]
  toEntities: [kube-apiserver]
  toPorts: [{ports: [{port: "53"}, {port: dns, protocol: UDP}, {port: 8000, endPort: 8080, protocol: TCP}, {port: "0", protocol: SCTP}]}]
""")
    e = r.egress[0]
    assert e.cidrs == (CIDRPeer(ip_network("1.1.1.1/32")), CIDRPeer(ip_network("10.0.0.0/8")),
                       CIDRPeer(ip_network("192.168.0.0/16"), (ip_network("192.168.1.0/24"),)))
    assert e.entities == ("kube-apiserver",)
    assert e.ports == (PortSpec(0, 53), PortSpec(UDP, 0, 0, "dns"), PortSpec(TCP, 8000, 8080), PortSpec(SCTP, 0))


def test_cnp_specs_list_gives_one_rule_each():
    rules = cnp([{"endpointSelector": {"matchLabels": {"a": "1"}}}, {"endpointSelector": {}}], key="specs")
    assert len(rules) == 2 and rules[1].path == "specs[1]"


@pytest.mark.parametrize("body,field,fragment", [
    ({}, "spec", "required"),
    ({"spec": {"endpointSelector": {}}, "specs": [{"endpointSelector": {}}]}, "specs", "not both"),
    ({"specs": []}, "specs", "at least one"),
    ({"specs": [{"endpointSelector": {}}, {"ingress": []}]}, "specs[1].endpointSelector", "required"),
    ({"spec": {"nodeSelector": {}}}, "spec.nodeSelector", "not supported"),
    ({"spec": {"endpointSelector": {}, "ingres": []}}, "spec.ingres", "unknown field"),
    ({"spec": {"endpointSelector": {}, "enableDefaultDeny": {"ingress": "no"}}},
     "spec.enableDefaultDeny.ingress", "true or false"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"fromEndpoint": [{}], "toPorts": []}]}},
     "spec.ingress[0].fromEndpoint", "unknown field"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"fromEndpoints": ["web"]}]}},
     "spec.ingress[0].fromEndpoints[0]", "label selector"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"fromEntities": ["everyone"]}]}},
     "spec.ingress[0].fromEntities[0]", "unknown entity"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"fromCIDR": ["10.0.0.0/33"]}]}},
     "spec.ingress[0].fromCIDR[0]", "not a valid CIDR"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}]}},
     "spec.ingress[0].fromCIDRSet[0].except[0]", "strict subset"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"fromCIDRSet": [{"except": ["11.0.0.0/16"]}]}]}},
     "spec.ingress[0].fromCIDRSet[0].cidr", "required"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"fromCIDRSet": [{"cidrGroupRef": "x"}]}]}},
     "spec.ingress[0].fromCIDRSet[0].cidrGroupRef", "not supported"),
    ({"spec": {"endpointSelector": {}, "egress": [{"toServices": []}]}}, "spec.egress[0].toServices", "not supported"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"fromNodes": []}]}}, "spec.ingress[0].fromNodes", "not supported"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "ICMP"}]}]}]}},
     "spec.ingress[0].toPorts[0].ports[0].protocol", "icmps"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80"}, {"port": "99999"}]}]}]}},
     "spec.ingress[0].toPorts[0].ports[1].port", "out of range 0-65535"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "-1"}]}]}]}},
     "spec.ingress[0].toPorts[0].ports[0].port", "port name"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80", "endPort": 79}]}]}]}},
     "spec.ingress[0].toPorts[0].ports[0].endPort", "below"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "web", "endPort": 90}]}]}]}},
     "spec.ingress[0].toPorts[0].ports[0].endPort", "named port"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": str(p)} for p in range(41)]}]}]}},
     "spec.ingress[0].toPorts[0].ports", "at most 40"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"icmps": [{"fields": [{"type": 256}]}]}]}},
     "spec.ingress[0].icmps[0].fields[0].type", "0-255"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"icmps": [{"fields": [{"type": "Ping"}]}]}]}},
     "spec.ingress[0].icmps[0].fields[0].type", "unknown IPv4 ICMP type name"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"icmps": [{"fields": [{"type": "NeighborSolicitation"}]}]}]}},
     "spec.ingress[0].icmps[0].fields[0].type", "unknown IPv4 ICMP type name"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"icmps": [{"fields": [{"type": 8, "family": "IPv5"}]}]}]}},
     "spec.ingress[0].icmps[0].fields[0].family", "IPv4 or IPv6"),
    ({"spec": {"endpointSelector": {}, "ingress": [{"icmps": [{"fields": [{}]}]}]}},
     "spec.ingress[0].icmps[0].fields[0].type", "required"),
])
def test_cnp_validation_errors(body, field, fragment):
    with pytest.raises(PolicyError) as e:
        parse_policy(CNP, "prod", "p", body)
    assert e.value.field == field, e.value.message
    assert fragment in e.value.message


@pytest.mark.parametrize("rule,field", [
    ({"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET"}]}}]}, "spec.egress[0].toPorts[0].rules"),
    ({"toPorts": [{"ports": [{"port": "53"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}, "spec.egress[0].toPorts[0].rules"),
    ({"toPorts": [{"ports": [{"port": "9092"}], "rules": {"kafka": [{"topic": "t"}]}}]}, "spec.egress[0].toPorts[0].rules"),
    ({"toPorts": [{"ports": [{"port": "1"}], "rules": {"l7proto": "x", "l7": [{}]}}]}, "spec.egress[0].toPorts[0].rules"),
    ({"toFQDNs": [{"matchName": "example.com"}]}, "spec.egress[0].toFQDNs"),
])
def test_l7_and_fqdn_reject_the_whole_policy(rule, field):
    with pytest.raises(PolicyError) as e:
        parse_policy(CNP, "prod", "p", {"spec": {"endpointSelector": {}, "egress": [rule]}})
    assert e.value.field == field
    assert "not enforced yet" in e.value.message


def test_l7_in_second_spec_rejects_all_specs():
    body = {"specs": [{"endpointSelector": {}, "ingress": [{}]},
                      {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80"}],
                                                                         "rules": {"http": [{}]}}]}]}]}
    with pytest.raises(PolicyError) as e:
        parse_policy(CNP, "prod", "p", body)
    assert e.value.field == "specs[1].ingress[0].toPorts[0].rules"


def test_deny_rules_cannot_carry_l7():
    with pytest.raises(PolicyError) as e:
        cnp({"endpointSelector": {}, "ingressDeny": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]}]})
    assert e.value.field == "spec.ingressDeny[0].toPorts[0].rules" and "deny" in e.value.message


def test_error_str_names_field():
    with pytest.raises(PolicyError) as e:
        cnp({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80"}, {"port": "x_y"}]}]}]})
    assert str(e.value).startswith("spec.ingress[0].toPorts[0].ports[1].port: ")
