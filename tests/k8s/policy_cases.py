"""CiliumNetworkPolicy bodies the CRD schema and the agent's parser must agree on: valid ones
both accept, malformed ones the API server itself rejects, naming the field. A few the
server accepts and only the agent refuses, each with the reason it is left to the agent.

The valid ones follow the policies Cilium's documentation teaches (label-based L3, L4
ports, CIDRs, entities, deny, several specs), written afresh for these tests."""

from __future__ import annotations

SPEC = "spec"

# (name, body without apiVersion/kind/metadata)
VALID: list[tuple[str, dict]] = [
    ("l3-labels", {"spec": {
        "description": "backends accept the frontends of their own namespace",
        "endpointSelector": {"matchLabels": {"role": "backend"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"role": "frontend"}}]}]}}),
    ("l3-expressions-and-sources", {"spec": {
        "endpointSelector": {"matchExpressions": [{"key": "k8s:tier", "operator": "In", "values": ["db", "cache"]}]},
        "ingress": [{"fromEndpoints": [
            {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "dev", "app": "web"}},
            {"matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "Exists"}]},
            {"matchExpressions": [{"key": "any:team", "operator": "NotIn", "values": ["red"]}]},
            {"matchLabels": {"reserved:host": ""}},
            {}]}]}}),
    ("l4-ports", {"spec": {
        "endpointSelector": {"matchLabels": {"app": "api"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                     "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}, {"port": 53, "protocol": "UDP"},
                                            {"port": "http"}, {"port": "9000", "endPort": 9100, "protocol": "TCP"},
                                            {"port": "0", "protocol": "SCTP"}, {"port": 443, "protocol": "ANY"}]}]}],
        "egress": [{"toPorts": [{"ports": [{"port": "dns-tcp", "protocol": "TCP"}]}]}]}}),
    ("cidr", {"spec": {
        "endpointSelector": {"matchLabels": {"app": "crawler"}},
        "egress": [{"toCIDR": ["10.20.0.0/16", "1.1.1.1", "fd00::/8"]},
                   {"toCIDRSet": [{"cidr": "172.16.0.0/12", "except": ["172.16.5.0/24", "172.17.0.0/16"]}]}],
        "ingress": [{"fromCIDRSet": [{"cidr": "10.0.0.0/8"}], "fromCIDR": ["192.168.7.0/24"]}]}}),
    ("entities", {"spec": {
        "endpointSelector": {},
        "egress": [{"toEntities": ["kube-apiserver", "cluster", "world", "host"]}],
        "ingress": [{"fromEntities": ["remote-node", "health"]}]}}),
    ("icmp", {"spec": {
        "endpointSelector": {},
        "ingress": [{"icmps": [{"fields": [{"type": 8}, {"type": "EchoRequest", "family": "IPv4"},
                                           {"type": "128", "family": "IPv6"},
                                           {"type": "NeighborSolicitation", "family": "IPv6"}]}]}]}}),
    ("deny", {"spec": {
        "endpointSelector": {"matchLabels": {"app": "frontend"}},
        "ingress": [{"fromEntities": ["all"], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}],
        "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "other"}}]}],
        "egressDeny": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}]}],
        "enableDefaultDeny": {"ingress": True, "egress": False}}}),
    ("deny-all-ingress", {"spec": {"endpointSelector": {}, "ingress": [{}]}}),
    ("specs", {"specs": [
        {"endpointSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"fromEndpoints": [{}]}],
         "labels": [{"key": "rule", "value": "first", "source": "user"}]},
        {"endpointSelector": {"matchLabels": {"app": "b"}}, "egress": [{"toEndpoints": [{}]}],
         "log": {"value": "b-egress"}}]}),
]

# (name, body, the field path the server's message names)
REJECTED: list[tuple[str, dict, str]] = [
    ("port-above-range", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": 70000}]}]}]}}, "spec.ingress[0].toPorts[0].ports[0].port"),
    ("port-string-above-range", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "99999"}]}]}]}}, "spec.ingress[0].toPorts[0].ports[0].port"),
    ("port-a-list", {"spec": {"endpointSelector": {}, "egress": [
        {"toPorts": [{"ports": [{"port": [80]}]}]}]}}, "spec.egress[0].toPorts[0].ports[0].port"),
    ("port-bad-name", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "x_y"}]}]}]}}, "spec.ingress[0].toPorts[0].ports[0].port"),
    ("port-negative", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "-1"}]}]}]}}, "spec.ingress[0].toPorts[0].ports[0].port"),
    ("end-port-above-range", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "80", "endPort": 65536}]}]}]}}, "spec.ingress[0].toPorts[0].ports[0].endPort"),
    ("protocol-foo", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "80", "protocol": "FOO"}]}]}]}}, "spec.ingress[0].toPorts[0].ports[0].protocol"),
    ("protocol-icmp-in-toports", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "80", "protocol": "ICMP"}]}]}]}}, "spec.ingress[0].toPorts[0].ports[0].protocol"),
    ("too-many-ports", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": str(p)} for p in range(41)]}]}]}}, "spec.ingress[0].toPorts[0].ports"),
    ("unknown-top-level-field", {"spec": {"endpointSelector": {}}, "rules": []}, "rules"),
    ("unknown-rule-field", {"spec": {"endpointSelector": {}, "ingres": []}}, "spec.ingres"),
    ("unknown-peer-field", {"spec": {"endpointSelector": {}, "ingress": [
        {"fromEndpoint": [{}], "toPorts": [{"ports": [{"port": "80"}]}]}]}}, "spec.ingress[0].fromEndpoint"),
    ("selector-a-string", {"spec": {"endpointSelector": "app=web"}}, "spec.endpointSelector"),
    ("peer-selector-a-string", {"spec": {"endpointSelector": {}, "ingress": [{"fromEndpoints": ["web"]}]}},
     "spec.ingress[0].fromEndpoints[0]"),
    ("selector-unknown-field", {"spec": {"endpointSelector": {"matchLabel": {"app": "web"}}}},
     "spec.endpointSelector.matchLabel"),
    ("label-value-not-a-string", {"spec": {"endpointSelector": {"matchLabels": {"app": 5}}}},
     "spec.endpointSelector.matchLabels.app"),
    ("label-value-bad", {"spec": {"endpointSelector": {"matchLabels": {"app": "-web"}}}},
     "spec.endpointSelector.matchLabels.app"),
    ("expression-bad-operator", {"spec": {"endpointSelector": {"matchExpressions": [
        {"key": "app", "operator": "Equals", "values": ["a"]}]}}}, "spec.endpointSelector.matchExpressions[0].operator"),
    ("expression-in-without-values", {"spec": {"endpointSelector": {"matchExpressions": [
        {"key": "app", "operator": "In"}]}}}, "spec.endpointSelector.matchExpressions[0]"),
    ("expression-exists-with-values", {"spec": {"endpointSelector": {"matchExpressions": [
        {"key": "app", "operator": "Exists", "values": ["a"]}]}}}, "spec.endpointSelector.matchExpressions[0]"),
    ("expression-unknown-source", {"spec": {"endpointSelector": {"matchExpressions": [
        {"key": "kates:app", "operator": "Exists"}]}}}, "spec.endpointSelector.matchExpressions[0].key"),
    ("unknown-entity", {"spec": {"endpointSelector": {}, "ingress": [{"fromEntities": ["everyone"]}]}},
     "spec.ingress[0].fromEntities[0]"),
    ("cidr-bad", {"spec": {"endpointSelector": {}, "ingress": [{"fromCIDR": ["10.0.0.0/33"]}]}},
     "spec.ingress[0].fromCIDR[0]"),
    ("cidr-set-bad-except", {"spec": {"endpointSelector": {}, "egress": [
        {"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["ten"]}]}]}}, "spec.egress[0].toCIDRSet[0].except[0]"),
    ("icmp-type-above-range", {"spec": {"endpointSelector": {}, "ingress": [
        {"icmps": [{"fields": [{"type": 256}]}]}]}}, "spec.ingress[0].icmps[0].fields[0].type"),
    ("icmp-type-unknown-name", {"spec": {"endpointSelector": {}, "ingress": [
        {"icmps": [{"fields": [{"type": "Ping"}]}]}]}}, "spec.ingress[0].icmps[0].fields[0].type"),
    ("icmp-type-missing", {"spec": {"endpointSelector": {}, "ingress": [{"icmps": [{"fields": [{}]}]}]}},
     "spec.ingress[0].icmps[0].fields[0].type"),
    ("icmp-family-bad", {"spec": {"endpointSelector": {}, "ingress": [
        {"icmps": [{"fields": [{"type": 8, "family": "IPv5"}]}]}]}}, "spec.ingress[0].icmps[0].fields[0].family"),
    ("default-deny-not-bool", {"spec": {"endpointSelector": {}, "enableDefaultDeny": {"ingress": "no"}}},
     "spec.enableDefaultDeny.ingress"),
    ("description-not-a-string", {"spec": {"endpointSelector": {}, "description": ["a"]}}, "spec.description"),
    ("no-endpoint-selector", {"spec": {"ingress": [{}]}}, "spec"),
    ("spec-and-specs", {"spec": {"endpointSelector": {}}, "specs": [{"endpointSelector": {}}]}, "spec and specs"),
    ("neither-spec-nor-specs", {}, "spec and specs"),
    ("specs-empty", {"specs": []}, "specs"),
    ("specs-second-without-selector", {"specs": [{"endpointSelector": {}}, {"ingress": []}]}, "specs[1]"),
]

# Refused by the server, while the agent's parser lets it by: a top-level field it does not
# read (a typo of spec or specs leaves neither, which both refuse).
PARSER_IGNORES = {"unknown-top-level-field"}

# Accepted by the API server, refused by the agent (it sets the policy's Valid condition
# to False): (name, body, why the schema leaves it to the agent).
AGENT_ONLY: list[tuple[str, dict, str]] = [
    ("except-outside-cidr", {"spec": {"endpointSelector": {}, "ingress": [
        {"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}]}},
     "relates two fields inside lists: a CEL rule there is beyond the API server's cost budget"),
    ("end-port-below-port", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "80", "endPort": 79}]}]}]}}, "same"),
    ("ipv6-icmp-name-as-ipv4", {"spec": {"endpointSelector": {}, "ingress": [
        {"icmps": [{"fields": [{"type": "NeighborSolicitation"}]}]}]}}, "same: the name depends on family"),
    ("selector-key-bad", {"spec": {"endpointSelector": {"matchLabels": {"kates:app": "web"}}}},
     "map keys can only be checked by CEL, too costly in nested selectors"),
    ("to-fqdns", {"spec": {"endpointSelector": {}, "egress": [
        {"toFQDNs": [{"matchName": "example.com"}], "toPorts": [{"ports": [{"port": "443"}]}]}]}},
     "a Cilium feature not enforced yet: kept, not pruned, so the agent refuses it"),
    ("l7-rules", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET"}]}}]}]}}, "same"),
    ("node-selector", {"spec": {"nodeSelector": {}}}, "same (host policies)"),
    ("cidr-group-ref", {"spec": {"endpointSelector": {}, "ingress": [{"fromCIDRSet": [{"cidrGroupRef": "x"}]}]}},
     "same (CiliumCIDRGroup)"),
]
