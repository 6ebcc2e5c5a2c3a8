import pytest

from cilium_py.agent.labels import (
    RESERVED,
    RESERVED_IDS,
    endpoint_labels,
    format_labels,
    keep_pod_label,
    labels_key,
    parse_labels,
    reserved_id,
)


def test_endpoint_labels_adds_namespace_serviceaccount_cluster_and_namespace_labels():
    labels = endpoint_labels({"app": "web"}, "prod", {"team": "a"}, "api")
    assert labels == {
        "k8s:app": "web",
        "k8s:io.kubernetes.pod.namespace": "prod",
        "k8s:io.cilium.k8s.namespace.labels.team": "a",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod",
        "k8s:io.cilium.k8s.policy.serviceaccount": "api",
        "k8s:io.cilium.k8s.policy.cluster": "default",
    }


def test_service_account_defaults_and_cluster_is_configurable():
    labels = endpoint_labels({}, "default", None, None, cluster="lab")
    assert labels["k8s:io.cilium.k8s.policy.serviceaccount"] == "default"
    assert labels["k8s:io.cilium.k8s.policy.cluster"] == "lab"


@pytest.mark.parametrize("key", [
    "pod-template-hash", "pod-template-generation", "controller-revision-hash", "controller-uid",
    "statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index", "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name", "io.kubernetes.container.name", "kubernetes.io/hostname",
    "k8s.io/foo", "sigs.k8s.io/bar", "beta.kubernetes.io/arch", "topology.kubernetes.io/zone",
    "node-role.kubernetes.io/worker",
])
def test_default_filter_drops_per_replica_and_system_labels(key):
    assert not keep_pod_label(key)
    assert f"k8s:{key}" not in endpoint_labels({key: "x", "app": "web"}, "ns", {}, None)


@pytest.mark.parametrize("key", [
    "app", "tier", "job-name", "app.kubernetes.io/name", "app.kubernetes.io/part-of",
    "example.com/team", "mykubernetes.io.example/x",
])
def test_default_filter_keeps_workload_labels(key):
    assert keep_pod_label(key)


def test_pod_cannot_claim_another_namespace_or_service_account():
    labels = endpoint_labels({
        "io.kubernetes.pod.namespace": "kube-system",
        "io.cilium.k8s.policy.serviceaccount": "admin",
        "io.cilium.k8s.namespace.labels.team": "ops",
    }, "prod", {}, "web")
    assert labels["k8s:io.kubernetes.pod.namespace"] == "prod"
    assert labels["k8s:io.cilium.k8s.policy.serviceaccount"] == "web"
    assert "k8s:io.cilium.k8s.namespace.labels.team" not in labels


def test_labels_key_is_canonical():
    a = {"k8s:b": "2", "k8s:a": "1"}
    b = {"k8s:a": "1", "k8s:b": "2"}
    assert labels_key(a) == labels_key(b) == "k8s:a=1;k8s:b=2"
    assert labels_key({"k8s:a": "1"}) != labels_key({"k8s:a": "2"})
    assert labels_key({"reserved:host": ""}) == "reserved:host="


def test_format_and_parse_round_trip():
    labels = {"k8s:app": "web", "reserved:host": ""}
    assert format_labels(labels) == ["k8s:app=web", "reserved:host"]
    assert parse_labels(format_labels(labels)) == labels


def test_reserved_table():
    assert RESERVED[1] == {"reserved:host": ""}
    assert RESERVED[2] == {"reserved:world": ""}
    assert RESERVED[7] == {"reserved:kube-apiserver": ""}
    assert RESERVED[11] == {"reserved:overlay-to-encrypt": ""}
    assert sorted(RESERVED) == list(range(1, 12))
    assert RESERVED_IDS["remote-node"] == 6
    assert reserved_id({"reserved:health": ""}) == 4
    assert reserved_id({"reserved:health": "", "k8s:app": "x"}) is None
    assert reserved_id({"k8s:host": ""}) is None
