"""The typed, immutable objects the sources build and the store holds, and one parser per
kind that builds them.

Every source (the manifests directory, a Kubernetes list/watch later) and `ciliumpy policy
validate` call `parse_object`: validation happens once, at the boundary, and nothing past
it reads a raw document. A parser never changes the document it is given; the defaults the
API server would fill in (the namespace, port protocols, a Service port's targetPort) are
filled into the object instead.

Errors are InvalidObject (a ValidationError) listing every problem of the object, each
naming the source, the object and the field path.
"""

from __future__ import annotations

from collections.abc import Callable

from cilium_py.agent.errors import InvalidObject
from cilium_py.agent.objects.base import DEFAULT_NAMESPACE, Key, Labels, Resource, describe, fail
from cilium_py.agent.objects.cilium import (
    CiliumEndpoint,
    CiliumIdentity,
    CiliumNode,
    CiliumNodeAddress,
    NamedPort,
    parse_cilium_endpoint,
    parse_cilium_identity,
    parse_cilium_node,
)
from cilium_py.agent.objects.core import (
    ContainerPort,
    Namespace,
    Node,
    NodeAddress,
    Pod,
    parse_namespace,
    parse_node,
    parse_pod,
)
from cilium_py.agent.objects.policy import (
    POLICY_CLASSES,
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    NetworkPolicy,
    Policy,
    parse_cilium_clusterwide_network_policy,
    parse_cilium_network_policy,
    parse_network_policy,
)
from cilium_py.agent.objects.service import (
    SERVICE_NAME_LABEL,
    EndpointSlice,
    Service,
    ServicePort,
    SliceEndpoint,
    SlicePort,
    parse_endpoint_slice,
    parse_service,
)

Parser = Callable[..., Resource]

# kind -> its parser, in the order a controller wants them applied: a pod's namespace and
# the policies that select it are stored before the pod, and the identities that remote
# endpoints carry before those endpoints.
PARSERS: dict[str, Parser] = {
    "Namespace": parse_namespace,
    "Node": parse_node,
    "CiliumNode": parse_cilium_node,
    "CiliumIdentity": parse_cilium_identity,
    "CiliumEndpoint": parse_cilium_endpoint,
    "CiliumClusterwideNetworkPolicy": parse_cilium_clusterwide_network_policy,
    "CiliumNetworkPolicy": parse_cilium_network_policy,
    "NetworkPolicy": parse_network_policy,
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Pod": parse_pod,
}
CLASSES: dict[str, type[Resource]] = {
    "Namespace": Namespace, "Node": Node, "CiliumNode": CiliumNode,
    "CiliumIdentity": CiliumIdentity, "CiliumEndpoint": CiliumEndpoint, **POLICY_CLASSES, "Service": Service,
    "EndpointSlice": EndpointSlice, "Pod": Pod,
}
KIND_ORDER = {kind: i for i, kind in enumerate(PARSERS)}


def parse_object(doc, source: str, where: str = "object") -> Resource:
    """The typed object for one document, by its kind. `where` names the document in errors
    until its name is known (e.g. "document 2"). Raises InvalidObject."""
    if not isinstance(doc, dict):
        fail(source, where, "", f"a manifest must be a mapping, not {type(doc).__name__}")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        fail(source, where, "kind", "is required")
    parser = PARSERS.get(kind)
    if parser is None:
        fail(source, f"{where} ({kind})", "kind", f"unknown kind {kind!r}; supported: {', '.join(sorted(PARSERS))}")
    return parser(doc, source, where)


__all__ = [
    "CLASSES", "DEFAULT_NAMESPACE", "KIND_ORDER", "PARSERS", "SERVICE_NAME_LABEL",
    "CiliumClusterwideNetworkPolicy", "CiliumEndpoint", "CiliumIdentity", "CiliumNetworkPolicy",
    "CiliumNode", "CiliumNodeAddress", "ContainerPort", "EndpointSlice", "NamedPort",
    "InvalidObject", "Key", "Labels", "Namespace", "NetworkPolicy", "Node", "NodeAddress", "Pod",
    "Policy", "Resource", "Service", "ServicePort", "SliceEndpoint", "SlicePort", "describe",
    "parse_cilium_clusterwide_network_policy", "parse_cilium_endpoint", "parse_cilium_identity",
    "parse_cilium_network_policy", "parse_cilium_node", "parse_endpoint_slice",
    "parse_namespace", "parse_network_policy", "parse_node", "parse_object", "parse_pod", "parse_service",
]
