"""ciliumpy's CRDs on the real API server: the installer is idempotent and repairs drift, the
schemas accept what the agent's parsers accept (Cilium's documented policy shapes, our
examples, the objects agents and operators write) and reject malformed input themselves,
naming the field, and printer columns, categories and the status subresource behave like
Cilium's.

Policies are written with strict field validation, as kubectl does by default: unknown
fields are then refused rather than pruned."""

from __future__ import annotations

import copy
import glob
import os
import uuid

import pytest
import yaml

from cilium_py.agent.objects import CiliumEndpoint, CiliumIdentity, CiliumNode, CiliumNodeAddress, NamedPort
from cilium_py.agent.objects import InvalidObject, parse_object
from cilium_py.k8s.client import ApiError
from cilium_py.k8s.resources import resource
from cilium_py.operator.crds import CREATED, UNCHANGED, UPDATED, CRDError, install_crds, load_crds
from cilium_py.vocab import TCP
from tests.k8s import policy_cases

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CNP, CCNP = "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"


@pytest.fixture(scope="module")
def installed(control_plane):
    kube = control_plane.admin()
    try:
        yield install_crds(kube, load_crds())
    finally:
        kube.close()


@pytest.fixture
def cluster_scoped(kube):
    """Cluster-scoped objects a test created, deleted after it: [(kind, name)]."""
    made: list[tuple[str, str]] = []
    yield made
    for kind, name in made:
        kube.delete(kind, name, missing_ok=True)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write(kube, doc: dict, *, dry_run: bool = False, strict: bool = True) -> dict:
    """POSTs doc; strict field validation refuses unknown fields (kubectl's default)."""
    res = resource(doc["kind"])
    query = {}
    if strict:
        query["fieldValidation"] = "Strict"
    if dry_run:
        query["dryRun"] = "All"
    return kube.request("POST", res.path(doc["metadata"].get("namespace")), body=doc, query=query,
                        what=f"create {doc['kind']} {doc['metadata']['name']}")


def policy(kind: str, name: str, body: dict, namespace: str | None) -> dict:
    meta = {"name": name, "namespace": namespace} if kind == CNP else {"name": name}
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, **copy.deepcopy(body)}


def rules_of(doc: dict):
    return parse_object(doc, "test").rules


# -- the installer -------------------------------------------------------------------------

def test_install_is_idempotent_and_every_crd_is_established(kube, installed):
    names = {c["metadata"]["name"] for c in load_crds()}
    assert set(installed) == names and set(installed.values()) <= {CREATED, UNCHANGED}
    assert install_crds(kube, load_crds()) == {name: UNCHANGED for name in names}
    for name in names:
        conditions = {c["type"]: c["status"] for c in kube.get("CustomResourceDefinition", name)["status"]["conditions"]}
        assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"


def test_kubectl_apply_of_the_crd_files_is_accepted(installed, control_plane):
    # The files equal the installer's definitions (tests/unit/test_operator_crds.py).
    applied = control_plane.kubectl("apply", "--dry-run=server", "-f", os.path.join(REPO, "operator", "crds"))
    assert applied.returncode == 0, applied.stderr
    assert len(applied.stdout.splitlines()) == len(installed)


def _renamed_crd(group: str) -> dict:
    # Our CNP CRD under a throwaway group, so the test owns it from creation to deletion.
    crd = copy.deepcopy(next(c for c in load_crds() if c["spec"]["names"]["kind"] == CNP))
    crd["spec"]["group"] = group
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
    return crd


def test_install_creates_updates_when_the_spec_differs_and_repairs_edits(kube):
    crd = _renamed_crd(f"{unique('t')}.ciliumpy.test")
    name = crd["metadata"]["name"]
    try:
        assert install_crds(kube, [crd]) == {name: CREATED}
        assert install_crds(kube, [crd]) == {name: UNCHANGED}
        wider = copy.deepcopy(crd)
        wider["spec"]["versions"][0]["additionalPrinterColumns"].append(
            {"name": "Description", "type": "string", "jsonPath": ".spec.description"})
        assert install_crds(kube, [wider]) == {name: UPDATED}
        stored = kube.get("CustomResourceDefinition", name)
        assert "Description" in [c["name"] for c in stored["spec"]["versions"][0]["additionalPrinterColumns"]]
        # Someone edits the CRD by hand: the next install puts ours back.
        kube.patch("CustomResourceDefinition", name, {"spec": {"names": {"shortNames": ["edited"]}}})
        assert install_crds(kube, [crd]) == {name: UPDATED}
        assert kube.get("CustomResourceDefinition", name)["spec"]["names"]["shortNames"] == ["cnp", "ciliumnp"]
        assert install_crds(kube, [crd]) == {name: UNCHANGED}
    finally:
        kube.delete("CustomResourceDefinition", name, missing_ok=True)


def test_install_names_a_crd_whose_names_are_not_accepted(kube):
    group = f"{unique('t')}.ciliumpy.test"
    first = _renamed_crd(group)
    clash = copy.deepcopy(first)          # same kind under another plural: the kind is taken
    clash["spec"]["names"].update(plural="otherpolicies", singular="otherpolicy", shortNames=["opol"])
    clash["metadata"]["name"] = f"otherpolicies.{group}"
    try:
        install_crds(kube, [first])
        with pytest.raises(CRDError) as refused:
            install_crds(kube, [clash], timeout=30)
        assert f"otherpolicies.{group}" in str(refused.value) and "names not accepted" in str(refused.value)
        assert not refused.value.retryable
    finally:
        for crd in (first, clash):
            kube.delete("CustomResourceDefinition", crd["metadata"]["name"], missing_ok=True)


# -- policies: what the server accepts, what it refuses ------------------------------------

@pytest.mark.parametrize("kind", [CNP, CCNP])
@pytest.mark.parametrize("case,body", policy_cases.VALID, ids=[c for c, _ in policy_cases.VALID])
def test_valid_policies_are_stored_and_read_back_as_written(kube, installed, namespace, cluster_scoped,
                                                            kind, case, body):
    doc = policy(kind, unique(case), body, namespace)
    stored = write(kube, doc)
    if kind == CCNP:
        cluster_scoped.append((kind, doc["metadata"]["name"]))
    # Nothing was pruned or changed on the way: the agent reads the policy that was written.
    assert rules_of(stored) == rules_of(doc)
    assert {k: stored[k] for k in body} == body


def _example_policies() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "examples", "**", "*.yaml"), recursive=True)):
        for doc in yaml.safe_load_all(open(path)):
            if isinstance(doc, dict) and doc.get("kind") in (CNP, CCNP):
                out.append((f"{os.path.relpath(path, REPO)}:{doc['metadata']['name']}", doc))
    return out


def test_every_example_policy_is_accepted(kube, installed, namespace):
    examples = _example_policies()
    assert examples
    for where, doc in examples:
        doc = copy.deepcopy(doc)
        if doc["kind"] == CNP:
            doc["metadata"]["namespace"] = namespace
        stored = write(kube, doc, dry_run=True)
        assert rules_of(stored) == rules_of(doc), where


@pytest.mark.parametrize("kind", [CNP, CCNP])
@pytest.mark.parametrize("case,body,field", policy_cases.REJECTED, ids=[c for c, _, _ in policy_cases.REJECTED])
def test_malformed_policies_are_refused_by_the_server_naming_the_field(kube, installed, namespace, kind, case,
                                                                       body, field):
    with pytest.raises(ApiError) as refused:
        write(kube, policy(kind, case, body, namespace), dry_run=True)
    assert refused.value.status in (400, 422), refused.value
    assert field in refused.value.message


@pytest.mark.parametrize("case,body,why", policy_cases.AGENT_ONLY, ids=[c for c, _, _ in policy_cases.AGENT_ONLY])
def test_what_only_the_agent_refuses_is_stored_whole_for_it_to_refuse(kube, installed, namespace, case, body, why):
    doc = policy(CNP, case, body, namespace)
    stored = write(kube, doc, dry_run=True)
    assert {k: stored[k] for k in body} == body, why        # kept whole, not pruned
    with pytest.raises(InvalidObject):
        parse_object(stored, "test")


def test_a_misspelled_spec_is_refused_even_without_strict_validation(kube, installed, namespace):
    # A lenient client's unknown fields are pruned; at the top that leaves no rule at all,
    # which the schema refuses instead of storing an empty policy.
    doc = policy(CNP, "typo", {"spce": {"endpointSelector": {}}}, namespace)
    with pytest.raises(ApiError) as refused:
        write(kube, doc, strict=False, dry_run=True)
    assert "exactly one of spec and specs" in refused.value.message


# -- identities, endpoints, nodes ----------------------------------------------------------

def _identity(number: int) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
            "metadata": {"name": str(number), "labels": {"io.kubernetes.pod.namespace": "shop"}},
            "security-labels": {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "shop",
                                "k8s:io.cilium.k8s.policy.serviceaccount": "default"}}


def _free_identity_number() -> int:
    return 256 + uuid.uuid4().int % (2 ** 24 - 256)


def test_identity_is_stored_and_parses_to_its_number_and_labels(kube, installed, cluster_scoped):
    number = _free_identity_number()
    write(kube, _identity(number))
    cluster_scoped.append(("CiliumIdentity", str(number)))
    ident = parse_object(kube.get("CiliumIdentity", str(number)), "api")
    assert isinstance(ident, CiliumIdentity) and ident.identity == number
    assert ident.security_labels == _identity(number)["security-labels"]
    listed, _ = kube.list_all("CiliumIdentity", label_selector="io.kubernetes.pod.namespace=shop")
    assert str(number) in [i["metadata"]["name"] for i in listed]


@pytest.mark.parametrize("change,field", [
    (lambda d: d.pop("security-labels"), "security-labels: Required value"),
    (lambda d: d["metadata"].update(name="5"), "metadata.name"),            # the reserved `health`
    (lambda d: d["metadata"].update(name="web"), "metadata.name"),
    (lambda d: d["security-labels"].update(app="web"), "security-labels"),  # no source:
    (lambda d: d["security-labels"].update({"k8s:tier": 3}), "security-labels.k8s:tier"),
], ids=["no-security-labels", "reserved-number", "not-a-number", "label-without-source", "label-not-a-string"])
def test_malformed_identities_are_refused_naming_the_field(kube, installed, change, field):
    doc = _identity(_free_identity_number())
    change(doc)
    with pytest.raises(ApiError) as refused:
        write(kube, doc, dry_run=True)
    assert field in refused.value.message


def _endpoint(namespace: str) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
            "metadata": {"name": "web-1", "namespace": namespace},
            "status": {"id": 1234, "state": "ready",
                       "identity": {"id": 12345, "labels": ["k8s:app=web"]},
                       "networking": {"addressing": [{"ipv4": "10.244.1.5"}], "node": "10.245.1.1"},
                       "encryption": {"key": 0},
                       "named-ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                       "policy": {"ingress": {"enforcing": True, "state": "enforcing"},
                                  "egress": {"enforcing": False, "state": "non-enforcing"}},
                       "external-identifiers": {"k8s-namespace": namespace, "k8s-pod-name": "web-1"},
                       "service-account": "default"}}


def test_endpoint_status_is_written_with_the_object_itself(kube, installed, namespace, control_plane):
    write(kube, _endpoint(namespace))
    stored = kube.get("CiliumEndpoint", "web-1", namespace)
    assert stored["status"] == _endpoint(namespace)["status"]    # no status subresource drops it
    assert parse_object(stored, "api") == CiliumEndpoint(
        namespace=namespace, name="web-1", source="api", created=stored["metadata"]["creationTimestamp"],
        uid=stored["metadata"]["uid"],
        endpoint_id=1234, identity=12345, ipv4=("10.244.1.5",), node_ip="10.245.1.1", state="ready",
        named_ports=(NamedPort("http", 80, TCP),), encryption_key=0)
    with pytest.raises(ApiError) as missing:
        kube.get("CiliumEndpoint", "web-1", namespace, subresource="status")
    assert missing.value.not_found
    shown = control_plane.kubectl("get", "cep", "-n", namespace, check=True).stdout
    header, row = shown.splitlines()
    assert header.split() == ["NAME", "SECURITY", "IDENTITY", "ENDPOINT", "STATE", "IPV4", "IPV6"]
    assert row.split() == ["web-1", "12345", "ready", "10.244.1.5"]


@pytest.mark.parametrize("change,field", [
    (lambda s: s["networking"]["addressing"][0].update(ipv4="10.244.1.300"), "status.networking.addressing[0].ipv4"),
    (lambda s: s["networking"].update(node="node-1"), "status.networking.node"),
    (lambda s: s["identity"].update(id="web"), "status.identity.id"),
    (lambda s: s.update(state="happy"), "status.state"),
    (lambda s: s["named-ports"][0].update(port=70000), "status.named-ports[0].port"),
    (lambda s: s["policy"]["ingress"].pop("enforcing"), "status.policy.ingress.enforcing"),
], ids=["bad-ipv4", "node-not-an-ip", "identity-not-a-number", "unknown-state", "port-above-range",
        "enforcing-missing"])
def test_malformed_endpoints_are_refused_naming_the_field(kube, installed, namespace, change, field):
    doc = _endpoint(namespace)
    change(doc["status"])
    with pytest.raises(ApiError) as refused:
        write(kube, doc, dry_run=True)
    assert field in refused.value.message


def _node(name: str) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": name},
            "spec": {"addresses": [{"type": "InternalIP", "ip": "10.245.1.1"},
                                   {"type": "CiliumInternalIP", "ip": "10.244.1.1"}],
                     "health": {"ipv4": "10.244.1.9"},
                     "ipam": {"podCIDRs": ["10.244.1.0/24"]}}}


def test_node_spec_and_status_are_stored_and_parse(kube, installed, cluster_scoped, control_plane):
    name = unique("node")
    created = write(kube, _node(name))
    cluster_scoped.append(("CiliumNode", name))
    kube.patch("CiliumNode", name, {"status": {"ipam": {"operator-status": {"error": "pool exhausted"},
                                                        "pod-cidrs": {"10.244.1.0/24": {"status": "in-use"}}}}},
               subresource="status")
    node = parse_object(kube.get("CiliumNode", name), "api")
    assert node == CiliumNode(
        namespace=None, name=name, source="api", created=created["metadata"]["creationTimestamp"],
        uid=created["metadata"]["uid"], addresses=(CiliumNodeAddress("InternalIP", "10.245.1.1"), CiliumNodeAddress("CiliumInternalIP", "10.244.1.1")),
        pod_cidrs=("10.244.1.0/24",), health_ipv4="10.244.1.9", operator_error="pool exhausted")
    header, row = control_plane.kubectl("get", "cn", name, check=True).stdout.splitlines()
    assert header.split()[:3] == ["NAME", "CILIUMINTERNALIP", "INTERNALIP"]
    assert row.split()[:3] == [name, "10.244.1.1", "10.245.1.1"]


@pytest.mark.parametrize("change,field", [
    (lambda s: s["ipam"].update(podCIDRs=["10.244.1.1/24"]), "spec.ipam.podCIDRs[0]"),
    (lambda s: s["ipam"].update(podCIDRs="10.244.1.0/24"), "spec.ipam.podCIDRs"),
    (lambda s: s["addresses"][0].update(ip="10.245.1.300"), "spec.addresses[0].ip"),
    (lambda s: s["addresses"][0].update(type="Magic"), "spec.addresses[0].type"),
    (lambda s: s["health"].update(ipv4="fd00::9"), "spec.health.ipv4"),
], ids=["pod-cidr-host-bits", "pod-cidrs-a-string", "address-not-an-ip", "unknown-address-type", "health-not-ipv4"])
def test_malformed_nodes_are_refused_naming_the_field(kube, installed, change, field):
    doc = _node(unique("node"))
    change(doc["spec"])
    with pytest.raises(ApiError) as refused:
        write(kube, doc, dry_run=True)
    assert field in refused.value.message


# -- policy status: the subresource and the Valid column ------------------------------------

def _valid(status: str, message: str) -> dict:
    return {"conditions": [{"type": "Valid", "status": status, "reason": "Checked", "message": message,
                            "lastTransitionTime": "2026-12-02T10:00:00Z"}]}


def test_status_and_spec_are_written_apart(kube, installed, namespace):
    body = {"spec": {"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}}
    created = write(kube, policy(CNP, "web", body, namespace))
    # Through /status: the status changes, a spec sent along is ignored.
    after_status = kube.patch(CNP, "web", {"status": _valid("True", "ok"), "spec": {"description": "ignored"}},
                              namespace, subresource="status")
    assert after_status["status"] == _valid("True", "ok")
    assert after_status["spec"] == body["spec"]
    assert after_status["metadata"]["generation"] == created["metadata"]["generation"]
    # Through the object: the spec changes, a status sent along is ignored.
    after_spec = kube.patch(CNP, "web", {"spec": {"description": "now"}, "status": _valid("False", "ignored")},
                            namespace)
    assert after_spec["spec"]["description"] == "now"
    assert after_spec["status"] == _valid("True", "ok")
    assert after_spec["metadata"]["generation"] == created["metadata"]["generation"] + 1


def test_conditions_are_keyed_by_type(kube, installed, namespace):
    write(kube, policy(CNP, "web", {"spec": {"endpointSelector": {}}}, namespace))
    twice = {"conditions": _valid("True", "a")["conditions"] + _valid("False", "b")["conditions"]}
    with pytest.raises(ApiError) as refused:
        kube.patch(CNP, "web", {"status": twice}, namespace, subresource="status")
    assert "status.conditions[1]" in refused.value.message and "Duplicate" in refused.value.message


def test_kubectl_shows_the_valid_column_and_finds_policies_by_short_name_and_category(
        kube, installed, namespace, cluster_scoped, control_plane):
    write(kube, policy(CNP, "web", {"spec": {"endpointSelector": {}}}, namespace))
    kube.patch(CNP, "web", {"status": _valid("True", "ok")}, namespace, subresource="status")
    header, row = control_plane.kubectl("get", "cnp", "-n", namespace, check=True).stdout.splitlines()
    assert header.split() == ["NAME", "AGE", "VALID"]
    assert row.split()[0] == "web" and row.split()[-1] == "True"
    name = unique("ccnp")
    write(kube, policy(CCNP, name, {"spec": {"endpointSelector": {}}}, None))
    cluster_scoped.append((CCNP, name))
    header, row = control_plane.kubectl("get", "ccnp", name, check=True).stdout.splitlines()
    assert header.split() == ["NAME", "VALID"] and row.split() == [name]     # no status yet
    listed = control_plane.kubectl("get", "ciliumpolicy", "-n", namespace, "-o", "name", check=True).stdout.split()
    assert f"ciliumnetworkpolicy.cilium.io/web" in listed
