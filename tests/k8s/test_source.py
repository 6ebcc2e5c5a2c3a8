"""The Kubernetes source against the real API server: paginated lists, every event kind,
watches resumed after broken connections without losing events, a forced 410 that makes it
relist (and reconcile deletions it missed), an API server restart, kinds whose CRD is not
installed, and objects our parsers reject keeping their last valid version.

Each test uses its own namespace and object names and its own source (and store); the
objects of other tests in the shared cluster may be listed too, so assertions look at this
test's objects only."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import pytest

from cilium_py.agent import objects
from cilium_py.agent.objects.base import Resource, parse_meta
from cilium_py.agent.sources.kubernetes import ABSENT, BACKOFF, WATCHING, KubernetesSource
from cilium_py.agent.store import Store
from cilium_py.k8s import resources
from cilium_py.k8s.client import Kube
from cilium_py.k8s.resources import ApiResource
from tests.unit.waiting import poll

WAIT = float(__import__("os").environ.get("K8S_WAIT", 30))   # seconds a condition may take on a loaded machine (never a timed assertion)


def netpol(namespace: str, name: str, port: int = 80) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": {"app": name}}, "ingress": [{"ports": [{"port": port}]}]}}


def np_port(store: Store, namespace: str, name: str) -> int | None:
    res = store.get(("NetworkPolicy", namespace, name))
    return None if res is None else res.rules[0].ingress[0].ports[0].port


def pod(namespace: str, name: str, node: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "scratch",
                                                       "ports": [{"containerPort": 8080, "name": "http"}]}]}}


def service(namespace: str, name: str, port: int = 80, annotations: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
            "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": "http"}]}}


@pytest.fixture
def started():
    """Starts sources and stops them at the end, also when the test fails."""
    running: list[tuple[KubernetesSource, Store]] = []

    def start(kube: Kube, kinds=("NetworkPolicy",), **kwargs) -> tuple[KubernetesSource, Store]:
        store = Store()
        source = KubernetesSource(kube, store, kinds, **kwargs)
        running.append((source, store))
        source.start()
        assert source.wait_synced(WAIT), source.status()
        return source, store

    yield start
    for source, store in running:
        source.stop()
        store.close()


@pytest.fixture
def proxied(control_plane, proxy, tmp_path):
    """The proxy and a Kube client whose connections go through it."""
    kube = Kube(proxy.write_kubeconfig(control_plane.admin_kubeconfig, str(tmp_path / "kubeconfig")))
    yield proxy, kube
    kube.close()


def test_initial_list_is_paginated(kube, namespace, started):
    names = [f"np-{i}" for i in range(7)]
    for i, name in enumerate(names):
        kube.create("NetworkPolicy", netpol(namespace, name, 1000 + i))
    source, store = started(kube, page_size=3)
    assert {r.name for r in store.list("NetworkPolicy") if r.namespace == namespace} == set(names)
    assert np_port(store, namespace, "np-6") == 1006
    status = source.status()["resources"]["NetworkPolicy"]
    assert status["list_pages"] >= 3 and status["lists"] == 1 and status["relists"] == 0
    assert status["resource_version"]
    assert poll(lambda: source.status()["resources"]["NetworkPolicy"]["state"] == WATCHING, WAIT)


def test_add_modify_delete_reach_the_store(kube, namespace, started):
    node = f"node-{uuid.uuid4().hex[:6]}"
    # Pods need their namespace's default ServiceAccount (the controller manager's doing).
    assert poll(lambda: kube.get_or_none("ServiceAccount", "default", namespace) is not None, WAIT)
    source, store = started(kube, kinds=("Namespace", "NetworkPolicy", "Service", "EndpointSlice", "Pod"),
                            node_name=node)
    assert store.get(("Namespace", "", namespace)) is not None

    kube.create("NetworkPolicy", netpol(namespace, "web", 80))
    kube.create("Service", service(namespace, "web"))
    kube.create("Pod", pod(namespace, "mine", node))
    kube.create("Pod", pod(namespace, "elsewhere", "some-other-node"))
    assert poll(lambda: np_port(store, namespace, "web") == 80, WAIT)
    assert poll(lambda: store.get(("Service", namespace, "web")) is not None, WAIT)
    assert poll(lambda: store.get(("Pod", namespace, "mine")) is not None, WAIT)
    svc = store.get(("Service", namespace, "web"))
    assert svc.cluster_ip and svc.source == "kubernetes"   # allocated by the API server
    # The endpointslice controller's slice, as it writes it, passes our parser.
    assert poll(lambda: any(s.service == "web" for s in store.list("EndpointSlice") if s.namespace == namespace),
                WAIT)

    # Modified: a new port for the policy, a label for the namespace, a status for the pod.
    kube.patch("NetworkPolicy", "web", {"spec": {"ingress": [{"ports": [{"port": 8080}]}]}}, namespace)
    kube.patch("Namespace", namespace, {"metadata": {"labels": {"team": "blue"}}})
    kube.patch("Pod", "mine", {"status": {"podIP": "10.244.7.7", "phase": "Running",
                                          "conditions": [{"type": "Ready", "status": "True"}]}},
               namespace, subresource="status")
    assert poll(lambda: np_port(store, namespace, "web") == 8080, WAIT)
    assert poll(lambda: store.get(("Namespace", "", namespace)).labels.get("team") == "blue", WAIT)
    assert poll(lambda: (store.get(("Pod", namespace, "mine")).ip, store.get(("Pod", namespace, "mine")).ready)
                == ("10.244.7.7", True), WAIT)

    # Deleted.
    kube.delete("NetworkPolicy", "web", namespace)
    kube.delete("Service", "web", namespace)
    assert poll(lambda: store.get(("NetworkPolicy", namespace, "web")) is None, WAIT)
    assert poll(lambda: store.get(("Service", namespace, "web")) is None, WAIT)
    # A pod on a node is deleted gracefully: terminating first (no kubelet here finishes
    # it), then gone when deleted without grace.
    kube.delete("Pod", "mine", namespace)
    assert poll(lambda: store.get(("Pod", namespace, "mine")).terminating, WAIT)
    kube.request("DELETE", resources.resource("Pod").path(namespace, "mine"),
                 body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
    assert poll(lambda: store.get(("Pod", namespace, "mine")) is None, WAIT)

    # Only this node's pods are watched.
    assert store.get(("Pod", namespace, "elsewhere")) is None
    status = source.status()
    assert status["resources"]["Pod"]["field_selector"] == f"spec.nodeName={node}"
    assert status["resources"]["NetworkPolicy"]["events"] >= 3
    assert status["resources"]["NetworkPolicy"]["last_event"] is not None
    assert status["api_server"]["version"].startswith("v1.")


def test_broken_watch_resumes_without_losing_events(kube, namespace, started, proxied):
    tcp, via_proxy = proxied
    kube.create("NetworkPolicy", netpol(namespace, "doomed"))
    source, store = started(via_proxy)
    assert store.get(("NetworkPolicy", namespace, "doomed")) is not None
    before = source.status()["resources"]["NetworkPolicy"]

    # While the source is cut off (its connections broken, new ones refused), objects come,
    # change and go.
    tcp.pause()
    kube.create("NetworkPolicy", netpol(namespace, "new-a", 81))
    kube.create("NetworkPolicy", netpol(namespace, "new-b", 82))
    kube.patch("NetworkPolicy", "new-b", {"spec": {"ingress": [{"ports": [{"port": 83}]}]}}, namespace)
    kube.delete("NetworkPolicy", "doomed", namespace)
    tcp.resume()

    assert poll(lambda: np_port(store, namespace, "new-a") == 81 and np_port(store, namespace, "new-b") == 83
                and store.get(("NetworkPolicy", namespace, "doomed")) is None, WAIT), source.status()
    after = source.status()["resources"]["NetworkPolicy"]
    # Resumed from the last resourceVersion: the missed events were replayed, no relist.
    assert after["relists"] == before["relists"] and after["watches"] > before["watches"]
    assert after["events"] >= before["events"] + 4


def test_410_relists_and_removes_objects_deleted_meanwhile(control_plane, kube, namespace, started, proxied):
    tcp, via_proxy = proxied
    for name in ("keep", "gone-1", "gone-2"):
        kube.create("NetworkPolicy", netpol(namespace, name))
    source, store = started(via_proxy)
    assert store.get(("NetworkPolicy", namespace, "gone-1")) is not None
    before = source.status()["resources"]["NetworkPolicy"]

    tcp.pause()
    kube.delete("NetworkPolicy", "gone-1", namespace)
    kube.delete("NetworkPolicy", "gone-2", namespace)
    kube.create("NetworkPolicy", netpol(namespace, "born", 90))
    # The deletes leave etcd's history and the restarted API server's watch cache starts
    # after them: a watch from the source's resourceVersion can only answer 410.
    control_plane.compact_etcd()
    control_plane.restart_apiserver()
    tcp.resume()

    assert poll(lambda: store.get(("NetworkPolicy", namespace, "gone-1")) is None
                and store.get(("NetworkPolicy", namespace, "gone-2")) is None
                and np_port(store, namespace, "born") == 90, WAIT), source.status()
    assert store.get(("NetworkPolicy", namespace, "keep")) is not None
    after = source.status()["resources"]["NetworkPolicy"]
    assert after["relists"] > before["relists"] and after["expired"] > before["expired"]


def test_api_server_stopped_backs_off_then_resyncs(control_plane, kube, namespace, started):
    kube.create("NetworkPolicy", netpol(namespace, "before"))
    source, store = started(kube)
    state = lambda: source.status()["resources"]["NetworkPolicy"]  # noqa: E731

    control_plane.stop_apiserver()
    try:
        assert poll(lambda: state()["state"] == BACKOFF and state()["last_error"], WAIT), state()
    finally:
        control_plane.start_apiserver()
    kube.create("NetworkPolicy", netpol(namespace, "after", 91))
    kube.delete("NetworkPolicy", "before", namespace)
    assert poll(lambda: np_port(store, namespace, "after") == 91
                and store.get(("NetworkPolicy", namespace, "before")) is None, WAIT), state()
    assert poll(lambda: state()["state"] == WATCHING, WAIT)


def test_rejected_object_keeps_its_last_valid_version(kube, namespace, started):
    source, store = started(kube, kinds=("Service",))
    bad = {"service.cilium.io/lb-algorithm": "fastest"}   # the API server has no opinion on it
    kube.create("Service", service(namespace, "web", 80))
    assert poll(lambda: store.get(("Service", namespace, "web")) is not None, WAIT)

    kube.patch("Service", "web", {"metadata": {"annotations": bad}, "spec": {"ports": [
        {"port": 81, "targetPort": "http"}]}}, namespace)
    key = ("Service", namespace, "web")
    assert poll(lambda: any(e.key == key for e in source.errors), WAIT)
    [error] = [e for e in source.errors if e.key == key]
    assert error.obj == f"Service {namespace}/web"
    assert error.field == "metadata.annotations[service.cilium.io/lb-algorithm]"
    assert "'fastest'" in error.message and "previous valid version stays in effect" in error.message
    assert store.get(key).ports[0].port == 80     # the last valid version
    assert source.status()["resources"]["Service"]["rejected"] == 1

    # An object never valid is not stored; fixing it stores it and clears the error.
    kube.create("Service", service(namespace, "never", 80, annotations=bad))
    never = ("Service", namespace, "never")
    assert poll(lambda: any(e.key == never for e in source.errors), WAIT)
    assert store.get(never) is None
    assert "previous valid version" not in next(e for e in source.errors if e.key == never).message
    kube.patch("Service", "never", {"metadata": {"annotations": {"service.cilium.io/lb-algorithm": "maglev"}}},
               namespace)
    assert poll(lambda: store.get(never) is not None and not any(e.key == never for e in source.errors), WAIT)

    # Deleting the rejected object takes its last valid version and its error away.
    kube.delete("Service", "web", namespace)
    assert poll(lambda: store.get(key) is None and not any(e.key == key for e in source.errors), WAIT)


# -- a kind whose CRD is not installed yet -------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Widget(Resource):
    kind = "Widget"
    api_version = "test.ciliumpy.io/v1"


def parse_widget(doc, source: str, where: str = "object") -> Widget:
    meta, c = parse_meta(Widget, doc, source, where)
    c.raise_if_errors()
    return Widget(**meta.common)


def widget_crd(group: str) -> dict:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"widgets.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                         "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


def test_absent_crd_is_retried_quietly_until_installed(kube, namespace, started, monkeypatch, caplog):
    # A group of its own, so no other test's CRDs are involved.
    group = f"t{uuid.uuid4().hex[:8]}.ciliumpy.io"
    monkeypatch.setitem(resources.RESOURCES, "Widget", ApiResource("Widget", group, "v1", "widgets", True))
    monkeypatch.setitem(objects.PARSERS, "Widget", parse_widget)
    monkeypatch.setattr(Widget, "api_version", f"{group}/v1")
    caplog.set_level(logging.INFO, logger="cilium_py.agent.sources.kubernetes")
    source, store = started(kube, kinds=("Widget", "NetworkPolicy"))
    status = lambda: source.status()["resources"]["Widget"]  # noqa: E731
    assert status()["state"] == ABSENT and status()["synced"]   # synced: there is nothing to list
    kube.create("NetworkPolicy", netpol(namespace, "unaffected"))
    assert poll(lambda: np_port(store, namespace, "unaffected") == 80, WAIT)

    kube.create("CustomResourceDefinition", widget_crd(group))
    try:
        # Served a moment after the CRD is created; the source finds it on a retry.
        assert poll(lambda: _create_widget(kube, group, namespace), WAIT)
        assert poll(lambda: store.get(("Widget", namespace, "w1")) is not None, WAIT), status()
        assert status()["state"] == WATCHING and status()["lists"] == 1
    finally:
        kube.delete("CustomResourceDefinition", f"widgets.{group}", missing_ok=True)
    absent_logs = [r for r in caplog.records if "not served" in r.getMessage() and "widgets" in r.getMessage()]
    assert len(absent_logs) == 1   # logged once, however many retries


def _create_widget(kube: Kube, group: str, namespace: str) -> bool:
    try:
        kube.create("Widget", {"apiVersion": f"{group}/v1", "kind": "Widget",
                               "metadata": {"name": "w1", "namespace": namespace}}, namespace)
        return True
    except Exception as e:  # noqa: BLE001 - 404 until the CRD is established
        if getattr(e, "status", 0) == 409:
            return True
        return False


def test_status_renders_in_the_cli(kube, namespace, started, capsys):
    from cilium_py.cli.agentapi import _print_kubernetes

    kube.create("NetworkPolicy", netpol(namespace, "seen"))
    source, store = started(kube, kinds=("NetworkPolicy", "CiliumIdentity"))
    assert poll(lambda: source.status()["resources"]["NetworkPolicy"]["state"] == WATCHING, WAIT)
    _print_kubernetes(source.status())
    out = capsys.readouterr().out
    assert "Kubernetes:" in out and source.status()["api_server"]["version"] in out
    assert "NetworkPolicy" in out and "watching" in out


def test_stop_ends_every_reflector_promptly(kube, started):
    source, store = started(kube, kinds=("Namespace", "NetworkPolicy"))
    threads = [r._thread for r in source.reflectors.values()]
    source.stop()
    assert all(not t.is_alive() for t in threads)
    assert {r["state"] for r in source.status()["resources"].values()} == {"stopped"}



def test_expired_continue_token_restarts_the_list(control_plane, kube, namespace, started):
    """Between two pages the API server forgets the list's resourceVersion (etcd compacted
    past it, the watch cache restarted): the next page is 410 and the list starts over."""

    class ForgetsBetweenPages(Kube):
        forgot = False

        def list(self, kind, namespace=None, *, continue_token="", **kwargs):
            if continue_token and not self.forgot:
                self.forgot = True
                kube.create("NetworkPolicy", netpol(namespace_, "late", 99))
                control_plane.compact_etcd()
                control_plane.restart_apiserver()
            return super().list(kind, namespace, continue_token=continue_token, **kwargs)

    namespace_ = namespace
    for i in range(5):
        kube.create("NetworkPolicy", netpol(namespace, f"np-{i}"))
    client = ForgetsBetweenPages(control_plane.admin_kubeconfig)
    try:
        source, store = started(client, page_size=2)
        assert client.forgot
        status = source.status()["resources"]["NetworkPolicy"]
        assert status["list_restarts"] == 1 and status["lists"] == 1
        # The restarted list is the state after the change, the late object included.
        assert {r.name for r in store.list("NetworkPolicy") if r.namespace == namespace} == \
            {f"np-{i}" for i in range(5)} | {"late"}
    finally:
        client.close()


def test_every_watched_kind_syncs_once_the_crds_are_installed(kube, namespace, started):
    from cilium_py.operator.crds import install_crds, load_crds

    install_crds(kube, load_crds())   # idempotent: other tests may have installed them
    source, store = started(kube, kinds=resources.WATCHED_KINDS, node_name="n-source")
    assert poll(lambda: {r["state"] for r in source.status()["resources"].values()} == {WATCHING}, WAIT), \
        source.status()
    number = 256 + uuid.uuid4().int % (2 ** 24 - 256)
    kube.create("CiliumIdentity", {"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
                                   "metadata": {"name": str(number)},
                                   "security-labels": {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": namespace}})
    try:
        kube.create("CiliumNetworkPolicy", {
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}]}})
        assert poll(lambda: store.get(("CiliumIdentity", "", str(number))) is not None, WAIT)
        assert store.get(("CiliumIdentity", "", str(number))).identity == number
        assert poll(lambda: store.get(("CiliumNetworkPolicy", namespace, "web")) is not None, WAIT)
        assert source.errors == [] or all(e.key[1] != namespace for e in source.errors)
    finally:
        kube.delete("CiliumIdentity", str(number), missing_ok=True)
    assert poll(lambda: store.get(("CiliumIdentity", "", str(number))) is None, WAIT)
