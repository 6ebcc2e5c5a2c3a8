"""The control plane the k8s tier runs on is the real thing: RBAC judges service
accounts, kube-controller-manager runs its controllers, the API server publishes its own
endpoints, and the pieces tests use to break things (API server restart, etcd compaction,
the proxy) do what they say."""

from __future__ import annotations

import json
import uuid

import pytest

from cilium_py import defaults
from cilium_py.k8s.client import ApiError, Kube
from cilium_py.lab.kube import ControlPlaneError, KubeControlPlane
from tests.unit.waiting import poll


def _config_map(namespace: str, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace}}


def test_api_server_is_the_pinned_release(kube):
    assert kube.version()["gitVersion"] == "v1.35.4"


def test_api_server_publishes_its_advertised_address_as_the_kubernetes_endpoints(control_plane, kube):
    def endpoints():
        found = kube.get_or_none("EndpointSlice", "kubernetes", "default")
        return found and [e["addresses"] for e in found.get("endpoints") or []]

    assert poll(lambda: endpoints() == [[control_plane.advertise_address]], 30)
    published = kube.get("EndpointSlice", "kubernetes", "default")
    assert [(p["name"], p["port"]) for p in published["ports"]] == [("https", control_plane.api_port)]


def test_rbac_refuses_a_service_account_until_a_role_allows_it(control_plane, namespace):
    client = Kube(control_plane.kubeconfig_for_service_account(namespace, "reader"))
    try:
        with pytest.raises(ApiError) as refused:
            client.list("Pod", namespace)
        assert refused.value.status == 403  # authenticated by its token, refused by RBAC
        grant = control_plane.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                 "metadata": {"name": "pod-reader", "namespace": namespace},
                 "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": "pod-reader", "namespace": namespace},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                 "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]}]}))
        assert grant.returncode == 0, grant.stderr

        def allowed() -> bool:
            try:
                return client.list("Pod", namespace)["items"] == []
            except ApiError as e:
                if e.status != 403:
                    raise
                return False
        assert poll(allowed, 30)
        with pytest.raises(ApiError) as still_refused:
            client.list("Pod", "default")
        assert still_refused.value.status == 403
    finally:
        client.close()


def test_controller_manager_runs_its_controllers(kube, namespace):
    # serviceaccount controller: every namespace gets its `default` account.
    assert poll(lambda: kube.get_or_none("ServiceAccount", "default", namespace) is not None, 30)
    # root CA publisher: every namespace gets the CA bundle pods verify the API server with.
    assert poll(lambda: kube.get_or_none("ConfigMap", "kube-root-ca.crt", namespace) is not None, 30)
    # endpointslice controller: a Service with a selector gets its (empty) slice.
    kube.create("Service", {"apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": "web", "namespace": namespace},
                            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
    assert poll(lambda: kube.list_all("EndpointSlice", namespace,
                                      label_selector="kubernetes.io/service-name=web")[0], 30)


def test_each_controller_runs_with_its_own_service_account(kube):
    accounts = {sa["metadata"]["name"] for sa in kube.list_all("ServiceAccount", "kube-system")[0]}
    assert {"endpointslice-controller", "namespace-controller", "service-account-controller",
            "generic-garbage-collector", "root-ca-cert-publisher"} <= accounts, sorted(accounts)


def test_namespace_controller_deletes_a_namespace_with_its_content(kube):
    name = "t-del-" + uuid.uuid4().hex[:8]
    kube.create("Namespace", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        kube.create("ConfigMap", _config_map(name, "content"))
        kube.delete("Namespace", name)
        # Only the namespace controller empties a terminating namespace and removes its
        # `kubernetes` finalizer; without it the namespace stays Terminating for ever.
        assert poll(lambda: kube.get_or_none("Namespace", name) is None, 60)
        assert kube.list_all("ConfigMap", name)[0] == []
    finally:
        kube.delete("Namespace", name, missing_ok=True)


def test_restart_keeps_the_data(control_plane, kube, namespace):
    created = kube.create("ConfigMap", _config_map(namespace, "kept"))
    seconds = control_plane.restart_apiserver()
    assert seconds > 0 and control_plane.timings["kube-apiserver restart"] == seconds
    assert kube.get("ConfigMap", "kept", namespace)["metadata"]["uid"] == created["metadata"]["uid"]


def test_a_graceful_restart_ends_watches_cleanly_and_a_crash_breaks_them(control_plane, kube, namespace):
    # Nothing carries the label: the controllers' own writes in the namespace stay out.
    quiet = "ciliumpy.test/none=1"
    _, rv = kube.list_all("ConfigMap", namespace, label_selector=quiet)
    graceful = kube.watch("ConfigMap", rv, namespace, timeout_seconds=120, label_selector=quiet)
    control_plane.restart_apiserver()
    assert [e["type"] for e in graceful if e["type"] != "BOOKMARK"] == []  # ended, no error
    _, rv = kube.list_all("ConfigMap", namespace, label_selector=quiet)
    crashed = kube.watch("ConfigMap", rv, namespace, timeout_seconds=120, label_selector=quiet)
    control_plane.restart_apiserver(crash=True)
    with pytest.raises(ApiError) as broken:
        list(crashed)
    assert broken.value.status == 0 and broken.value.retryable


def test_compaction_forgets_older_revisions_in_etcd(control_plane, kube, namespace):
    old = kube.create("ConfigMap", _config_map(namespace, "old"))
    revision = int(old["metadata"]["resourceVersion"])
    key = f"/registry/configmaps/{namespace}/old"
    assert control_plane.etcd_get(key, revision).get("kvs")
    kube.create("ConfigMap", _config_map(namespace, "newer"))
    compacted_at = control_plane.compact_etcd()
    assert compacted_at > revision
    with pytest.raises(ControlPlaneError, match="compacted"):
        control_plane.etcd_get(key, revision)
    assert control_plane.etcd_get(key).get("kvs")  # the current version stays


def test_a_watch_from_before_compaction_and_restart_is_gone(control_plane, kube, namespace):
    kube.create("ConfigMap", _config_map(namespace, "kept"))
    _, old_rv = kube.list_all("ConfigMap", namespace)
    kube.create("ConfigMap", _config_map(namespace, "later"))
    control_plane.compact_etcd()
    control_plane.restart_apiserver()
    # The restarted API server's watch cache and etcd both forgot old_rv.
    with pytest.raises(ApiError) as gone:
        for _ in kube.watch("ConfigMap", old_rv, namespace, timeout_seconds=5):
            pass
    assert gone.value.gone


def test_break_connections_ends_a_running_watch(control_plane, kube, namespace, proxy, tmp_path):
    client = Kube(proxy.write_kubeconfig(control_plane.admin_kubeconfig, str(tmp_path / "proxied")))
    try:
        mine = "ciliumpy.test/proxied=1"  # the root CA publisher's ConfigMap stays out
        _, rv = client.list_all("ConfigMap", namespace, label_selector=mine)
        # A server-side timeout far beyond the test's: only the break can end this watch.
        stream = client.watch("ConfigMap", rv, namespace, timeout_seconds=3600, label_selector=mine)
        kube.create("ConfigMap", {**_config_map(namespace, "one"), "metadata": {
            "name": "one", "namespace": namespace, "labels": {"ciliumpy.test/proxied": "1"}}})
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


def test_a_paused_proxy_refuses_requests_until_resumed(control_plane, proxy, tmp_path):
    client = Kube(proxy.write_kubeconfig(control_plane.admin_kubeconfig, str(tmp_path / "proxied")),
                  timeout=5.0)
    try:
        assert client.version()["gitVersion"] == "v1.35.4"
        proxy.pause()
        with pytest.raises(ApiError) as unreachable:
            client.version()
        assert unreachable.value.status == 0 and unreachable.value.retryable

        def answers() -> bool:
            try:
                return client.version()["gitVersion"] == "v1.35.4"
            except ApiError:
                return False
        proxy.resume()
        assert poll(answers, 10)
    finally:
        client.close()


def test_a_component_that_fails_to_start_is_named_with_its_log(control_plane, tmp_path):
    plane = KubeControlPlane(str(tmp_path / "broken"), advertise_address="not-an-address")
    with pytest.raises(ControlPlaneError) as failed:
        plane.start()
    message = str(failed.value)
    assert message.startswith("kube-apiserver exited during start")
    assert "not-an-address" in message and "kube-apiserver.log" in message
    assert not any(c.running() for c in plane.components())  # etcd was stopped again
    plane.stop()  # idempotent


def test_a_missing_binary_says_to_run_make_setup(monkeypatch, tmp_path):
    monkeypatch.setattr(defaults, "TOOLS_BIN", str(tmp_path))
    with pytest.raises(ControlPlaneError, match=r"etcd is missing: run `make setup`"):
        KubeControlPlane(str(tmp_path / "work")).start()
