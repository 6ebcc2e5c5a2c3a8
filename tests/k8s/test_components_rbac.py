"""The agent's and the operator's real Kubernetes code, each with a token of its own
ServiceAccount under the roles operator/*.yaml install: every request they make is recorded,
none may be refused (403) or fall outside cilium_py/k8s/rbac.py's table.

Here: the agent's Kubernetes source, which lists and watches every kind the agent reads, and
the whole operator (CRD install, Lease, IPAM, identity GC, scoped by a label to this test's
objects), which must also need every grant of its table. (The CRD installer's create runs
under the operator's role in test_manifests_rbac.py.)"""

from __future__ import annotations

import uuid

import pytest

from cilium_py.k8s import rbac
from tests.k8s.install import installed_manifests, recording_client_as
from tests.unit.waiting import poll

SCOPE = "rbac-test.ciliumpy.io/scope"


@pytest.fixture
def cluster_objects(kube):
    """Cluster-scoped objects a test creates: deleted after it."""
    made: list[tuple[str, str]] = []
    yield made
    for kind, name in made:
        kube.delete(kind, name, missing_ok=True)


@pytest.fixture(scope="module")
def installed(control_plane):
    with installed_manifests(control_plane):
        yield control_plane


def until(client, condition, timeout: float = 60) -> None:
    """Waits for `condition`, failing at once (naming the requests) when RBAC refuses one."""
    poll(lambda: condition() or client.refused(), timeout)
    refused = client.refused()
    assert not refused, f"refused by RBAC: {refused}"
    assert condition()


# -- the agent ----------------------------------------------------------------------------------

def test_agent_source_lists_and_watches_every_kind_within_its_role(installed, kube, namespace):
    from cilium_py.agent.sources.kubernetes import WATCHING, KubernetesSource
    from cilium_py.agent.store import Store
    from cilium_py.k8s.resources import WATCHED_KINDS, resource

    node = f"rbac-{uuid.uuid4().hex[:6]}"
    kube.create("Pod", {"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "web", "namespace": namespace, "labels": {"app": "web"}},
                        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}},
                namespace)
    store = Store()
    with recording_client_as(installed, rbac.AGENT) as client:
        source = KubernetesSource(client, store, node_name=node)
        source.start()
        try:
            assert sorted(source.reflectors) == sorted(WATCHED_KINDS), f"not watched: {source.skipped}"
            until(client, lambda: source.wait_synced(0) and all(
                r.state == WATCHING for r in source.reflectors.values()))
            assert store.get(("Pod", namespace, "web")) is not None
            assert not {k: r.last_error for k, r in source.reflectors.items() if r.last_error}
        finally:
            source.stop()
            store.close()
        assert not client.beyond(rbac.AGENT)
        for kind in WATCHED_KINDS:
            res = resource(kind)
            assert {(res.group, res.plural, "list"), (res.group, res.plural, "watch")} <= client.verbs(), kind


# -- the operator ------------------------------------------------------------------------------

def test_operator_stays_within_its_role(installed, kube, namespace, cluster_objects):
    from cilium_py.operator.app import Operator, OperatorConfig
    from cilium_py.operator.ipam import ClusterPool, operator_error
    from cilium_py.operator.leader import LeaderElectionConfig

    scope = namespace
    # Another component's leader Lease in the same namespace: the operator must leave it be.
    foreign = f"other-{uuid.uuid4().hex[:6]}"
    kube.create("Lease", {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                          "metadata": {"name": foreign, "namespace": rbac.NAMESPACE},
                          "spec": {"holderIdentity": "someone"}}, rbac.NAMESPACE)
    kube.delete("Lease", rbac.OPERATOR_LEASE, rbac.NAMESPACE, missing_ok=True)   # this test's own
    nodes = {f"{scope}-a": None, f"{scope}-outside": ["10.99.0.0/24"]}
    for name, cidrs in nodes.items():
        spec = {"ipam": {"podCIDRs": cidrs}} if cidrs else {}
        kube.create("CiliumNode", {"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                                   "metadata": {"name": name, "labels": {SCOPE: scope}}, "spec": spec})
        cluster_objects.append(("CiliumNode", name))
    unused = str(7_000_000 + int(uuid.uuid4().int % 1_000_000))
    kube.create("CiliumIdentity", {"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
                                   "metadata": {"name": unused, "labels": {SCOPE: scope}},
                                   "security-labels": {"k8s:app": "gone"}})
    cluster_objects.append(("CiliumIdentity", unused))

    config = OperatorConfig(
        namespace=rbac.NAMESPACE, pool=ClusterPool.parse(["10.204.0.0/16"], 24),
        leader_election=LeaderElectionConfig(lease_duration=3.0, renew_deadline=2.0, retry_period=0.25),
        identity_gc_interval=0.2, identity_heartbeat_timeout=0.5, resync_interval=1.0,
        label_selector=f"{SCOPE}={scope}")
    try:
        with recording_client_as(installed, rbac.OPERATOR) as client:
            operator = Operator(client, config)
            operator.start()
            try:
                until(client, operator.is_leading, 60)
                a = f"{scope}-a"
                until(client, lambda: (kube.get("CiliumNode", a).get("spec") or {}).get("ipam", {}).get("podCIDRs"), 60)
                until(client, lambda: "outside" in operator_error(kube.get("CiliumNode", f"{scope}-outside")), 60)
                until(client, lambda: kube.get_or_none("CiliumIdentity", unused) is None, 60)
                assert operator.crds_installed.is_set()
                # Renewed at least once: get and update of its own Lease.
                until(client, lambda: sum(1 for r in client.requests
                                        if r.grant() == ("coordination.k8s.io", "leases", "update",
                                                         rbac.OPERATOR_LEASE)) >= 2, 30)
            finally:
                operator.stop()
            assert not client.refused()
            assert not client.beyond(rbac.OPERATOR)
            # Every grant used but creating CRDs: they exist already here (the CRD test of
            # test_manifests_rbac.py runs the installer's create under this role).
            assert not client.unused(rbac.OPERATOR,
                               skip={("apiextensions.k8s.io", "customresourcedefinitions", "create", "")})
            assert kube.get("Lease", foreign, rbac.NAMESPACE)["spec"]["holderIdentity"] == "someone"
    finally:
        kube.delete("Lease", foreign, rbac.NAMESPACE, missing_ok=True)
        kube.delete("Lease", rbac.OPERATOR_LEASE, rbac.NAMESPACE, missing_ok=True)
