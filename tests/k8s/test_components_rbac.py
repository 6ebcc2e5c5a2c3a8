"""The agent's and the operator's real Kubernetes code, each with a token of its own
ServiceAccount under the roles operator/*.yaml install: every request they make is recorded,
none may be refused (403) or fall outside cilium_py/k8s/rbac.py's table, and each run needs
every grant of its component's table, so the roles hold nothing the code does not use.

* the agent's Kubernetes source alone: lists and watches every kind the agent reads;
* the agent's whole Kubernetes mode on the in-memory datapath backend: CiliumNode
  registration (again after a deletion), identity allocation and un-marking,
  CiliumEndpoints (created, patched, deleted), policy status;
* the whole operator (CRD install, Lease, IPAM, identity GC), scoped by a label to this
  test's objects; its CRD create runs under its role in test_manifests_rbac.py."""

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


def _pod(namespace: str, name: str, node: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none",
                                                       "ports": [{"containerPort": 80}]}]}}


def _valid(kube, kind: str, name: str, namespace: str | None = None) -> bool:
    doc = kube.get_or_none(kind, name, namespace)
    conditions = ((doc or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Valid" for c in conditions)


# -- the agent ----------------------------------------------------------------------------------

def test_agent_source_lists_and_watches_every_kind_within_its_role(installed, kube, namespace):
    from cilium_py.agent.sources.kubernetes import WATCHING, KubernetesSource
    from cilium_py.agent.store import Store
    from cilium_py.k8s.resources import WATCHED_KINDS, resource

    node = f"rbac-{uuid.uuid4().hex[:6]}"
    kube.create("Pod", _pod(namespace, "web", node, "web"), namespace)
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


def test_agent_kubernetes_mode_stays_within_its_role(installed, kube, namespace, tmp_path, cluster_objects):
    from cilium_py.agent.backend import memory_backend
    from cilium_py.agent.controller import ControlPlaneConfig
    from cilium_py.agent.k8s.identities import HEARTBEAT_ANNOTATION
    from cilium_py.agent.k8s.wiring import KubernetesMode
    from cilium_py.datapath.config import DatapathConfig
    from cilium_py.k8s.resources import WATCHED_KINDS, resource

    node = f"rbac-{uuid.uuid4().hex[:6]}"
    ccnp = f"rbac-{uuid.uuid4().hex[:6]}"
    # A CiliumNode left with other addresses (updated), a CiliumEndpoint left by an earlier
    # run of the agent (its create conflicts: patched instead).
    kube.create("CiliumNode", {"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                               "metadata": {"name": node}, "spec": {"addresses": []}})
    cluster_objects.append(("CiliumNode", node))
    kube.create("CiliumEndpoint", {"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
                                   "metadata": {"name": "web-1", "namespace": namespace},
                                   "status": {"id": 1}}, namespace)
    kube.create("Pod", _pod(namespace, "web-1", node, "web"), namespace)
    kube.create("CiliumNetworkPolicy", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}]}]}}, namespace)
    kube.create("CiliumClusterwideNetworkPolicy", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": ccnp},
        "spec": {"endpointSelector": {"matchLabels": {"app": "nothing-" + ccnp}},
                 "ingress": [{"fromEntities": ["cluster"]}]}})
    cluster_objects.append(("CiliumClusterwideNetworkPolicy", ccnp))

    with recording_client_as(installed, rbac.AGENT) as client:
        mode = KubernetesMode(
            client, ControlPlaneConfig(datapath=DatapathConfig(node=node, bpf_root="/nonexistent"),
                                       node_netns="mem", router_ip="", pod_cidr="10.203.0.0/24",
                                       state_dir=str(tmp_path / "state"), node_ips=("10.203.255.1",)),
            node_name=node, backend_for=lambda router_ip: memory_backend(), sync_timeout=60)
        try:
            mode.start()
            source = mode.source
            assert sorted(source.reflectors) == sorted(WATCHED_KINDS), f"not watched: {source.skipped}"
            until(client, lambda: all(r.watches for r in source.reflectors.values()), 60)
            # The pod's endpoint published (create conflicted: patch), its identity allocated.
            until(client, lambda: ((kube.get_or_none("CiliumEndpoint", "web-1", namespace) or {})
                                 .get("status") or {}).get("identity"), 60)
            ident = str(kube.get("CiliumEndpoint", "web-1", namespace)["status"]["identity"]["id"])
            cluster_objects.append(("CiliumIdentity", ident))
            until(client, lambda: _valid(kube, "CiliumNetworkPolicy", "web", namespace), 60)
            until(client, lambda: _valid(kube, "CiliumClusterwideNetworkPolicy", ccnp), 60)
            # The pod goes: so does its endpoint, and the node stops holding its identity.
            # (Graceful deletion would wait for a kubelet, and there is none.)
            kube.request("DELETE", resource("Pod").path(namespace, "web-1"),
                         body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
            until(client, lambda: kube.get_or_none("CiliumEndpoint", "web-1", namespace) is None, 60)
            until(client, lambda: mode.identities.refcount(int(ident)) == 0, 30)
            # The operator marks the unused identity for deletion; a new pod of the same
            # labels makes the agent use it again, un-marking it.
            kube.patch("CiliumIdentity", ident,
                       {"metadata": {"annotations": {HEARTBEAT_ANNOTATION: "2026-01-01T00:00:00Z"}}})
            kube.create("Pod", _pod(namespace, "web-2", node, "web"), namespace)
            until(client, lambda: HEARTBEAT_ANNOTATION not in (kube.get("CiliumIdentity", ident)["metadata"]
                                                             .get("annotations") or {}), 60)
            # A CiliumNode deleted under the agent is registered again.
            created = kube.get("CiliumNode", node)["metadata"]["uid"]
            kube.delete("CiliumNode", node)
            until(client, lambda: (kube.get_or_none("CiliumNode", node) or {"metadata": {"uid": created}})
                        ["metadata"]["uid"] != created, 60)
            errors = {k: r.last_error for k, r in source.reflectors.items() if r.last_error}
            assert not errors
        finally:
            mode.stop()
            mode.close()
        assert not client.refused()
        assert not client.beyond(rbac.AGENT)
        for kind in WATCHED_KINDS:
            res = resource(kind)
            assert {(res.group, res.plural, "list"), (res.group, res.plural, "watch")} <= client.verbs()
        assert not client.unused(rbac.AGENT)


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
