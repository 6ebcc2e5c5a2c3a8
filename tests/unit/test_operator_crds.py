"""The CRDs: the committed operator/crds/*.yaml are exactly what cilium_py.operator.schemas
builds (so the files a user applies and the ones the operator installs are the same), they
carry the names, scopes, columns and subresources of Cilium's, their enums are the parsers'
vocabularies, and load_crds refuses what is not a CRD. The API server's verdicts on them
are tested in tests/k8s/test_crds.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cilium_py.agent.errors import InvalidObject
from cilium_py.agent.objects import cilium as objs
from cilium_py.agent.objects import parse_object
from cilium_py.agent.policy import api as policy_api
from cilium_py.operator import schemas
from cilium_py.operator.crds import load_crds
from tests.k8s import policy_cases

CRD_DIR = Path(__file__).resolve().parents[2] / "operator" / "crds"


def by_kind(crds) -> dict[str, dict]:
    return {c["spec"]["names"]["kind"]: c for c in crds}


def test_committed_files_are_the_generated_definitions():
    expected = {schemas.file_name(d): schemas.render(d) for d in schemas.definitions()}
    found = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    stale = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
    assert not stale, (f"operator/crds is out of date for {stale}: "
                       "run `python -m cilium_py.operator.schemas operator/crds`")


def test_load_crds_from_the_directory_equals_the_built_in_ones():
    def key(c):
        return c["metadata"]["name"]
    assert sorted(load_crds(CRD_DIR), key=key) == sorted(load_crds(), key=key)


@pytest.mark.parametrize("kind,plural,scope,short,categories,columns,status", [
    ("CiliumNetworkPolicy", "ciliumnetworkpolicies", "Namespaced", ["cnp", "ciliumnp"],
     ["cilium", "ciliumpolicy"], ["Age", "Valid"], True),
    ("CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies", "Cluster", ["ccnp"],
     ["cilium", "ciliumpolicy"], ["Valid"], True),
    ("CiliumEndpoint", "ciliumendpoints", "Namespaced", ["cep", "ciliumep"], ["cilium"],
     ["Security Identity", "Ingress Enforcement", "Egress Enforcement", "Endpoint State", "IPv4", "IPv6"], False),
    ("CiliumIdentity", "ciliumidentities", "Cluster", ["ciliumid"], ["cilium"], ["Namespace", "Age"], True),
    ("CiliumNode", "ciliumnodes", "Cluster", ["cn", "ciliumn"], ["cilium"],
     ["CiliumInternalIP", "InternalIP", "Age"], True),
])
def test_names_scope_columns_and_subresources(kind, plural, scope, short, categories, columns, status):
    crd = by_kind(load_crds())[kind]
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{plural}.cilium.io" and spec["group"] == "cilium.io"
    assert spec["names"]["plural"] == plural and spec["names"]["singular"] == kind.lower()
    assert spec["scope"] == scope
    assert spec["names"]["shortNames"] == short and spec["names"]["categories"] == categories
    [version] = spec["versions"]
    assert version["name"] == "v2" and version["served"] and version["storage"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == columns
    assert ("subresources" in version) == status


def _schema(kind: str) -> dict:
    return by_kind(load_crds())[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node, path=""):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


@pytest.mark.parametrize("kind", ["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "CiliumIdentity",
                                  "CiliumEndpoint", "CiliumNode"])
def test_top_level_is_closed(kind):
    # Unknown top-level fields are pruned or (strict clients) rejected, never kept.
    assert "x-kubernetes-preserve-unknown-fields" not in _schema(kind)


def test_policy_rule_bodies_keep_only_features_the_agent_refuses():
    # Kept whole: fields Cilium defines that the agent refuses. Everything else in a rule is
    # typed, so the server validates it; pruning a refused field instead would widen a rule.
    preserved = {path.rsplit("/properties/", 1)[-1].split("/")[0]
                 for path, node in _walk(_schema("CiliumNetworkPolicy")["properties"]["spec"])
                 if isinstance(node, dict) and node.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved == {"rules", "terminatingTLS", "originatingTLS", "listener", "authentication",
                         "fromGroups", "toGroups", "toFQDNs", "toServices"}


def test_policy_enums_are_the_parsers_vocabularies():
    spec = _schema("CiliumNetworkPolicy")["properties"]["spec"]["properties"]
    ingress = spec["ingress"]["items"]["properties"]
    port = ingress["toPorts"]["items"]["properties"]["ports"]["items"]["properties"]
    assert set(port["protocol"]["enum"]) == {"ANY", "TCP", "UDP", "SCTP"}
    assert set(ingress["fromEntities"]["items"]["enum"]) == policy_api.ENTITIES
    assert ingress["toPorts"]["items"]["properties"]["ports"]["maxItems"] == policy_api.MAX_PORTS
    assert spec["egressDeny"]["items"]["properties"].keys() == spec["egress"]["items"]["properties"].keys()
    cep = _schema("CiliumEndpoint")["properties"]["status"]["properties"]
    assert tuple(cep["state"]["enum"]) == objs.ENDPOINT_STATES


def test_identity_requires_security_labels():
    assert _schema("CiliumIdentity")["required"] == ["security-labels"]


def test_policy_status_conditions_are_a_map_keyed_by_type():
    conditions = _schema("CiliumNetworkPolicy")["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_load_crds_refuses_what_is_not_a_crd(tmp_path):
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ValueError, match=r"a.yaml document 1: not a apiextensions.k8s.io/v1 CustomResourceDefinition"):
        load_crds(tmp_path)
    (tmp_path / "a.yaml").write_text("kind: [\n")
    with pytest.raises(ValueError, match="a.yaml: invalid YAML"):
        load_crds(tmp_path)
    (tmp_path / "a.yaml").unlink()
    with pytest.raises(ValueError, match="holds no CustomResourceDefinitions"):
        load_crds(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_crds(tmp_path / "missing")


def _cnp(name: str, body: dict) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "prod"}, **body}


def test_the_parser_agrees_with_the_server_on_the_policy_cases():
    # The server's side of each case is tested in tests/k8s/test_crds.py.
    for name, body in policy_cases.VALID:
        parse_object(_cnp(name, body), "cases")
    for name, body, _ in policy_cases.REJECTED + policy_cases.AGENT_ONLY:
        if name in policy_cases.PARSER_IGNORES:
            continue
        with pytest.raises(InvalidObject):
            parse_object(_cnp(name, body), "cases")
