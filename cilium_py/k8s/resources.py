"""The Kubernetes resources ciliumpy reads or writes: one table from kind to where the API
server serves it. Every client path, RBAC rule and watch is derived from this table."""

from __future__ import annotations

from dataclasses import dataclass

CILIUM_GROUP = "cilium.io"
CILIUM_VERSION = "v2"


@dataclass(frozen=True)
class ApiResource:
    kind: str
    group: str          # "" for the core group
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        """The URL path of the collection (namespace None: across all namespaces), or of one
        object and its subresource."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


def _cilium(kind: str, plural: str, namespaced: bool) -> ApiResource:
    return ApiResource(kind, CILIUM_GROUP, CILIUM_VERSION, plural, namespaced)


RESOURCES: dict[str, ApiResource] = {r.kind: r for r in (
    ApiResource("Namespace", "", "v1", "namespaces", False),
    ApiResource("Pod", "", "v1", "pods", True),
    ApiResource("Node", "", "v1", "nodes", False),
    ApiResource("Service", "", "v1", "services", True),
    ApiResource("ServiceAccount", "", "v1", "serviceaccounts", True),
    ApiResource("ConfigMap", "", "v1", "configmaps", True),
    ApiResource("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True),
    ApiResource("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies", True),
    ApiResource("Lease", "coordination.k8s.io", "v1", "leases", True),
    ApiResource("CustomResourceDefinition", "apiextensions.k8s.io", "v1", "customresourcedefinitions", False),
    _cilium("CiliumNetworkPolicy", "ciliumnetworkpolicies", True),
    _cilium("CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies", False),
    _cilium("CiliumIdentity", "ciliumidentities", False),
    _cilium("CiliumEndpoint", "ciliumendpoints", True),
    _cilium("CiliumNode", "ciliumnodes", False),
)}

# What the agent's Kubernetes source lists and watches, in the order a controller wants
# them: namespaces and policies before the pods they apply to.
WATCHED_KINDS: tuple[str, ...] = (
    "Namespace", "Node", "CiliumNode", "CiliumIdentity", "CiliumClusterwideNetworkPolicy",
    "CiliumNetworkPolicy", "NetworkPolicy", "Service", "EndpointSlice", "Pod", "CiliumEndpoint",
)


def resource(kind: str) -> ApiResource:
    try:
        return RESOURCES[kind]
    except KeyError:
        raise KeyError(f"unknown Kubernetes kind {kind!r}; known: {', '.join(sorted(RESOURCES))}") from None
