"""The install manifests (operator/*.yaml) on a real API server: accepted as they are, and
the roles they create give each component's ServiceAccount exactly cilium_py/k8s/rbac.py's
table, as the server's own authorizer answers for a real token of that account."""

from __future__ import annotations

import uuid

import pytest
import yaml

from cilium_py.k8s import rbac
from cilium_py.k8s.client import Kube
from cilium_py.k8s.resources import RESOURCES
from tests.k8s.install import MANIFESTS, client_as, installed_manifests, recording_client_as

REVIEWS = "/apis/authorization.k8s.io/v1"


@pytest.fixture(scope="module")
def installed(control_plane):
    with installed_manifests(control_plane):
        yield control_plane


def allowed(client: Kube, verb: str, group: str, res: str, *, namespace: str = "", name: str = "") -> bool:
    """The API server's answer (SelfSubjectAccessReview) for the client's own token."""
    plural, _, subresource = res.partition("/")
    attributes = {"verb": verb, "group": group, "resource": plural, "subresource": subresource,
                  "namespace": namespace, "name": name}
    review = client.request("POST", f"{REVIEWS}/selfsubjectaccessreviews", body={
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes}})
    return bool(review["status"].get("allowed"))


def server_rules(client: Kube, namespace: str) -> set[rbac.Grant]:
    """Every resource grant the server holds for the client in `namespace` (its
    SelfSubjectRulesReview), cluster-wide ones included."""
    review = client.request("POST", f"{REVIEWS}/selfsubjectrulesreviews", body={
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace}})
    status = review["status"]
    assert not status.get("incomplete"), status.get("evaluationError")
    return rbac.rule_grants(status.get("resourceRules") or [], "SelfSubjectRulesReview")


def _namespaced(group: str, res: str) -> bool:
    plural = res.partition("/")[0]
    return next(r for r in RESOURCES.values() if r.group == group and r.plural == plural).namespaced


def test_server_accepts_the_manifests_in_a_dry_run(control_plane):
    done = control_plane.kubectl("apply", "--dry-run=server", "-f", str(MANIFESTS))
    assert done.returncode == 0, done.stderr
    # Every document went through the server's validation and admission.
    documents = [d for p in MANIFESTS.glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d]
    assert done.stdout.count("(server dry run)") == len(documents), done.stdout


def test_applied_manifests_are_all_there(installed, kube):
    sa = kube.get("ServiceAccount", rbac.AGENT.service_account, rbac.NAMESPACE)
    assert sa["metadata"]["name"] == "ciliumpy"
    ds = installed.kubectl("get", "-n", rbac.NAMESPACE, "daemonset/ciliumpy", "-o",
                           "jsonpath={.spec.template.spec.serviceAccountName}")
    assert ds.returncode == 0 and ds.stdout == "ciliumpy", ds.stderr
    dep = installed.kubectl("get", "-n", rbac.NAMESPACE, "deployment/ciliumpy-operator", "-o",
                            "jsonpath={.spec.replicas}")
    assert dep.returncode == 0 and dep.stdout == "2", dep.stderr
    assert kube.get("ConfigMap", "ciliumpy-config", rbac.NAMESPACE)["data"]["config.yaml"]


@pytest.fixture(scope="module")
def baseline(installed):
    """What any ServiceAccount may do without roles of its own (self reviews, discovery)."""
    namespace = "t-" + uuid.uuid4().hex[:8]
    admin = installed.admin()
    admin.create("Namespace", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        with client_as(installed, namespace, "nobody") as nobody:
            yield {ns: server_rules(nobody, ns) for ns in (rbac.NAMESPACE, namespace)}, namespace
    finally:
        admin.delete("Namespace", namespace, missing_ok=True)
        admin.close()


@pytest.mark.parametrize("component", rbac.COMPONENTS, ids=lambda c: c.service_account)
def test_service_account_gets_exactly_the_table(installed, baseline, component):
    """The server's own list of what the account may do, less what every account may do,
    is the table: in its namespace cluster-wide and namespaced grants, elsewhere only the
    cluster-wide ones."""
    base, elsewhere = baseline
    with client_as(installed, component.namespace, component.service_account) as client:
        home = server_rules(client, component.namespace) - base[rbac.NAMESPACE]
        assert home == rbac.grants(component.cluster) | rbac.grants(component.namespaced)
        other = server_rules(client, elsewhere) - base[elsewhere]
        assert other == rbac.grants(component.cluster)


@pytest.mark.parametrize("component", rbac.COMPONENTS, ids=lambda c: c.service_account)
def test_every_verb_of_the_table_is_allowed(installed, namespace, component):
    with client_as(installed, component.namespace, component.service_account) as client:
        refused = []
        for group, res, verb, name in sorted(rbac.grants(component.cluster)):
            ns = namespace if _namespaced(group, res) else ""
            if not allowed(client, verb, group, res, namespace=ns, name=name):
                refused.append((verb, group, res, ns, name))
            if name and allowed(client, verb, group, res, namespace=ns, name="not-" + name):
                refused.append(("allowed beyond its resourceNames", verb, group, res, name))
        for group, res, verb, name in sorted(rbac.grants(component.namespaced)):
            if not allowed(client, verb, group, res, namespace=component.namespace, name=name):
                refused.append((verb, group, res, component.namespace, name))
            if allowed(client, verb, group, res, namespace=namespace, name=name):
                refused.append(("allowed outside its namespace", verb, group, res, namespace))
        assert not refused


# What neither component may do: the things a compromised agent or operator would want.
FORBIDDEN = [
    ("delete", "", "pods", True, ""),
    ("create", "", "pods", True, ""),
    ("create", "", "pods/exec", True, ""),
    ("get", "", "secrets", True, ""),
    ("list", "", "secrets", True, ""),
    ("create", "", "secrets", True, ""),
    ("patch", "", "nodes", False, ""),
    ("delete", "", "namespaces", False, ""),
    ("update", "networking.k8s.io", "networkpolicies", True, ""),
    ("delete", "cilium.io", "ciliumnetworkpolicies", True, ""),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", False, ""),
    ("update", "coordination.k8s.io", "leases", True, "kube-controller-manager"),
    ("update", "apiextensions.k8s.io", "customresourcedefinitions", False, "widgets.example.com"),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions", False, "ciliumnodes.cilium.io"),
]
AGENT_FORBIDDEN = [
    ("delete", "cilium.io", "ciliumidentities", False, ""),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions", False, ""),
    ("create", "coordination.k8s.io", "leases", True, ""),
]
OPERATOR_FORBIDDEN = [
    ("create", "cilium.io", "ciliumidentities", False, ""),
    ("delete", "cilium.io", "ciliumendpoints", True, ""),
    ("delete", "cilium.io", "ciliumnodes", False, ""),
    ("list", "", "pods", True, ""),
]


@pytest.mark.parametrize("component, forbidden", [(rbac.AGENT, FORBIDDEN + AGENT_FORBIDDEN),
                                                  (rbac.OPERATOR, FORBIDDEN + OPERATOR_FORBIDDEN)],
                         ids=lambda c: getattr(c, "service_account", ""))
def test_what_a_component_must_not_do_is_denied(installed, namespace, component, forbidden):
    with client_as(installed, component.namespace, component.service_account) as client:
        granted = [(verb, group, res, name) for verb, group, res, namespaced, name in forbidden
                   for ns in ((rbac.NAMESPACE, namespace) if namespaced else ("",))
                   if allowed(client, verb, group, res, namespace=ns, name=name)]
        assert not granted


def test_kubectl_auth_can_i_agrees(installed, namespace):
    """The way a user checks it: `kubectl auth can-i` with the account's kubeconfig."""
    path = installed.kubeconfig_for_service_account(rbac.NAMESPACE, rbac.AGENT.service_account)
    yes = installed.kubectl("auth", "can-i", "watch", "endpointslices.discovery.k8s.io", "-n", namespace,
                            kubeconfig=path)
    assert (yes.returncode, yes.stdout.strip()) == (0, "yes"), yes.stderr
    status = installed.kubectl("auth", "can-i", "patch", "ciliumnetworkpolicies.cilium.io", "--subresource=status",
                               "-n", namespace, kubeconfig=path)
    assert status.stdout.strip() == "yes", status.stderr
    no = installed.kubectl("auth", "can-i", "delete", "pods", "-n", namespace, kubeconfig=path)
    assert (no.returncode, no.stdout.strip()) == (1, "no")
    path = installed.kubeconfig_for_service_account(rbac.NAMESPACE, rbac.OPERATOR.service_account)
    lease = installed.kubectl("auth", "can-i", "update", f"leases/{rbac.OPERATOR_LEASE}", "-n", rbac.NAMESPACE,
                              kubeconfig=path)
    assert lease.stdout.strip() == "yes", lease.stderr
    other = installed.kubectl("auth", "can-i", "update", "leases/kube-scheduler", "-n", rbac.NAMESPACE,
                              kubeconfig=path)
    assert other.stdout.strip() == "no"



# -- the components' own code under their roles ----------------------------------------------

def test_operator_installs_the_crds_under_its_role(installed, kube):
    """The CRD installer as the operator runs it: one CRD missing (create), one changed by
    someone (update, after a dry-run update), the others as they are (get, dry run)."""
    from cilium_py.operator import crds
    from tests.unit.waiting import poll

    missing, changed = "ciliumendpoints.cilium.io", "ciliumnodes.cilium.io"
    kube.delete("CustomResourceDefinition", missing)
    assert poll(lambda: kube.get_or_none("CustomResourceDefinition", missing) is None, 60)
    kube.patch("CustomResourceDefinition", changed, {"spec": {"names": {"shortNames": ["cn"]}}})
    with recording_client_as(installed, rbac.OPERATOR) as client:
        results = crds.install_crds(client, crds.load_crds())
        assert not client.refused()
        assert not client.beyond(rbac.OPERATOR)
        assert {("apiextensions.k8s.io", "customresourcedefinitions", v)
                for v in ("create", "get", "update")} <= client.verbs()
    assert results[missing] == crds.CREATED and results[changed] == crds.UPDATED
    assert {results[n] for n in rbac.CRD_NAMES if n not in (missing, changed)} == {crds.UNCHANGED}


def test_recorder_names_requests_as_rbac_does():
    from tests.k8s.recording import attributes

    assert attributes("GET", "/api/v1/namespaces", {}) == ("list", "", "namespaces", "", "")
    assert attributes("GET", "/api/v1/pods", {"watch": "1"}) == ("watch", "", "pods", "", "")
    assert attributes("GET", "/api/v1/namespaces/a/pods/p", {}) == ("get", "", "pods", "a", "p")
    assert attributes("PATCH", "/apis/cilium.io/v2/namespaces/a/ciliumnetworkpolicies/x/status", {}) == (
        "patch", "cilium.io", "ciliumnetworkpolicies/status", "a", "x")
    assert attributes("PUT", "/apis/cilium.io/v2/ciliumnodes/n/status", {}) == (
        "update", "cilium.io", "ciliumnodes/status", "", "n")
    assert attributes("DELETE", "/apis/cilium.io/v2/ciliumidentities", {}) == (
        "deletecollection", "cilium.io", "ciliumidentities", "", "")
    assert attributes("GET", "/version", {}) is None


def test_recorder_sees_a_refusal(installed):
    from cilium_py.k8s.client import ApiError

    with recording_client_as(installed, rbac.AGENT) as client:
        with pytest.raises(ApiError):
            client.delete("CiliumNetworkPolicy", "x", "default")
        [request] = client.refused()
        assert request.grant() == ("cilium.io", "ciliumnetworkpolicies", "delete", "x")
        assert client.beyond(rbac.AGENT) == [request]
