"""The agent's and the operator's real Kubernetes code, each with a token of its own
ServiceAccount under the roles operator/*.yaml install: every request they make is recorded,
none may be refused (403) or fall outside cilium_py/k8s/rbac.py's table.

Here: the agent's Kubernetes source, which lists and watches every kind the agent reads.
(The CRD installer runs under the operator's role in test_manifests_rbac.py.)"""

from __future__ import annotations

import uuid

import pytest

from cilium_py.k8s import rbac
from tests.k8s.install import installed_manifests, recording_client_as
from tests.unit.waiting import poll


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
