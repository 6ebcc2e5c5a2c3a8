"""Security-relevant labels of an endpoint, and the reserved identities.

A label set maps "source:key" to a value ("k8s:app" -> "web", "reserved:host" -> ""). Only
labels that say what a workload *is* may take part: labels that change per rollout, per
replica or per Job run (pod-template-hash, controller-uid, pod-name...) would give every
replica its own identity, so policies written against the Deployment would stop matching
and the identity space would fill up. The default filter below follows Cilium's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cilium_py import vocab

Labels = dict[str, str]

SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
SOURCE_ANY = "any"

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
# The API server stamps this label on every Namespace; NetworkPolicies select namespaces
# by it, so the lab (which has no API server) adds it the same way.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

# Per-rollout / per-replica / per-run labels: exact keys.
_DROPPED_KEYS = frozenset({
    "pod-template-hash",
    "pod-template-generation",
    "controller-revision-hash",
    "controller-uid",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
    "batch.kubernetes.io/controller-uid",
})
# Kubernetes-owned label domains: the system writes these, they describe scheduling and
# bookkeeping rather than the workload.
_DROPPED_DOMAINS = ("kubernetes.io", "k8s.io")
# Recommended, user-set application labels live under a Kubernetes domain but do say
# what a workload is.
_KEPT_DOMAINS = ("app.kubernetes.io",)

# id -> name; `reserved:<name>` is the identity's only label.
RESERVED_NAMES = vocab.RESERVED_IDENTITY_NAMES
RESERVED: dict[int, Labels] = {i: {f"{SOURCE_RESERVED}:{n}": ""} for i, n in RESERVED_NAMES.items()}
RESERVED_IDS = vocab.RESERVED_IDENTITY_IDS

HOST = vocab.IDENTITY_HOST
WORLD = vocab.IDENTITY_WORLD
UNMANAGED = vocab.IDENTITY_UNMANAGED
HEALTH = vocab.IDENTITY_HEALTH
INIT = vocab.IDENTITY_INIT
REMOTE_NODE = vocab.IDENTITY_REMOTE_NODE
KUBE_APISERVER = vocab.IDENTITY_KUBE_APISERVER


def _domain(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else ""


def _under(domain: str, roots: Iterable[str]) -> bool:
    return any(domain == r or domain.endswith("." + r) for r in roots)


def keep_pod_label(key: str) -> bool:
    """Cilium's default filter for one pod label key (without source)."""
    if key in _DROPPED_KEYS:
        return False
    # io.kubernetes.* and io.cilium.k8s.* are the agent's own derived labels; a pod
    # carrying them itself could claim another namespace or service account.
    if key.startswith("io.kubernetes") or key.startswith("io.cilium.k8s."):
        return False
    domain = _domain(key)
    if domain and _under(domain, _KEPT_DOMAINS):
        return True
    return not (domain and _under(domain, _DROPPED_DOMAINS))


def endpoint_labels(
    pod_labels: Mapping[str, str] | None,
    namespace: str,
    namespace_labels: Mapping[str, str] | None,
    service_account: str | None,
    cluster: str = "default",
) -> Labels:
    """The identity-relevant labels of a pod, all with the "k8s:" source."""
    out: Labels = {}
    for key, value in (pod_labels or {}).items():
        if keep_pod_label(key):
            out[f"{SOURCE_K8S}:{key}"] = value
    ns_labels = dict(namespace_labels or {})
    ns_labels[NAMESPACE_NAME_LABEL] = namespace
    # Namespace labels are kept whole (including kubernetes.io/ ones): namespaceSelectors
    # match on them, and they change per namespace, not per replica.
    for key, value in ns_labels.items():
        out[f"{SOURCE_K8S}:{NAMESPACE_LABELS_PREFIX}{key}"] = value
    out[f"{SOURCE_K8S}:{NAMESPACE_LABEL}"] = namespace
    out[f"{SOURCE_K8S}:{SERVICE_ACCOUNT_LABEL}"] = service_account or "default"
    out[f"{SOURCE_K8S}:{CLUSTER_LABEL}"] = cluster
    return out


def labels_key(labels: Mapping[str, str]) -> str:
    """Canonical form: equal label sets give equal strings, whatever the insertion order.
    Label keys and values cannot contain ';' or '=' (the manifest validation and the
    Kubernetes API both reject them), so the string is unambiguous."""
    return ";".join(f"{k}={labels[k]}" for k in sorted(labels))


def format_labels(labels: Mapping[str, str]) -> list[str]:
    """Sorted "source:key=value" strings; a label with an empty value prints as just its
    key ("reserved:host"), as Cilium shows it."""
    return [f"{k}={v}" if v else k for k, v in sorted(labels.items())]


def parse_labels(items: Iterable[str]) -> Labels:
    """Inverse of format_labels."""
    out: Labels = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def reserved_id(labels: Mapping[str, str]) -> int | None:
    """The reserved identity whose label set is exactly `labels`, if any."""
    if len(labels) != 1:
        return None
    (key, value), = labels.items()
    source, _, name = key.partition(":")
    if source != SOURCE_RESERVED or value:
        return None
    return RESERVED_IDS.get(name)
