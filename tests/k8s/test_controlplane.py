"""The control plane the k8s tier runs on is the real thing: RBAC judges service
accounts, kube-controller-manager runs its controllers, and the pieces tests use to break
things (API server restart, etcd compaction, the proxy) do what they say."""

from __future__ import annotations

import pytest

from cilium_py.k8s.client import ApiError, Kube
from tests.unit.waiting import poll


def test_api_server_is_the_pinned_release(kube):
    assert kube.version()["gitVersion"] == "v1.35.4"


def test_rbac_refuses_a_service_account_without_roles(control_plane, namespace):
    path = control_plane.kubeconfig_for_service_account(namespace, "nobody")
    client = Kube(path)
    try:
        with pytest.raises(ApiError) as refused:
            client.list("Pod", namespace)
        assert refused.value.status == 403
    finally:
        client.close()


def test_controller_manager_runs_its_controllers(kube, namespace):
    # serviceaccount controller: every namespace gets its `default` account.
    assert poll(lambda: kube.get_or_none("ServiceAccount", "default", namespace) is not None, 30)
    # endpointslice controller: a Service with a selector gets its (empty) slice.
    kube.create("Service", {"apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": "web", "namespace": namespace},
                            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
    assert poll(lambda: kube.list_all("EndpointSlice", namespace,
                                      label_selector="kubernetes.io/service-name=web")[0], 30)


def test_break_connections_ends_a_running_watch(control_plane, kube, namespace, proxy, tmp_path):
    client = Kube(proxy.write_kubeconfig(control_plane.admin_kubeconfig, str(tmp_path / "proxied")))
    try:
        _, rv = client.list_all("ConfigMap", namespace)
        # A server-side timeout far beyond the test's: only the break can end this watch.
        stream = client.watch("ConfigMap", rv, namespace, timeout_seconds=3600)
        kube.create("ConfigMap", {"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "one", "namespace": namespace}})
        events = iter(stream)
        assert next(events)["object"]["metadata"]["name"] == "one"
        assert proxy.break_connections() >= 1
        try:
            for _ in events:  # whatever was already buffered, then the end of the stream
                pass
        except ApiError as e:
            assert e.status == 0  # the connection broke; the server refused nothing
    finally:
        client.close()


def test_restart_keeps_data_and_compaction_expires_old_versions(control_plane, kube, namespace):
    kube.create("ConfigMap", {"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": "kept", "namespace": namespace}})
    _, old_rv = kube.list_all("ConfigMap", namespace)
    kube.create("ConfigMap", {"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": "later", "namespace": namespace}})
    control_plane.compact_etcd()
    control_plane.restart_apiserver()
    assert kube.get("ConfigMap", "kept", namespace)["metadata"]["name"] == "kept"
    # The restarted API server's watch cache and etcd both forgot old_rv.
    with pytest.raises(ApiError) as gone:
        for _ in kube.watch("ConfigMap", old_rv, namespace, timeout_seconds=5):
            pass
    assert gone.value.gone
