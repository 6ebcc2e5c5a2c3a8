"""What Hubble may ask about the node it runs on: the one interface between flow
enrichment and the agent.

The parser names a flow's endpoints, identities, policies and services only through a
`NodeView`. The agent implements it over its control plane, service manager and ipcache
(cilium_py/agent/nodeview.py) and hands it to Hubble; tools and tests without an agent use
`NullNodeView` or an in-memory view of their own. Nothing in Hubble reaches into agent
objects, so either side can change its internals without the other noticing.

Answers may be cached by the caller until `generation` changes: an implementation must
move it whenever any answer may differ (endpoints regenerated, policies or Services
changed). It is any hashable value, compared for equality only.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from cilium_py.vocab import reserved_label


@dataclass(frozen=True)
class EndpointInfo:
    """An endpoint of this node, as a flow names it."""

    id: int
    identity: int
    namespace: str
    pod_name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class PolicyRef:
    """The policy a datapath cookie stands for."""

    name: str
    namespace: str
    kind: str


class ServiceRef(NamedTuple):
    """The Service a frontend address belongs to."""

    name: str
    namespace: str


class NodeView(Protocol):
    """Read-only questions about this node. Every method answers for one key and returns
    "unknown" (None, 0 or ()) rather than raising: a flow is still worth showing unnamed."""

    @property
    def generation(self) -> Hashable:
        """Changes whenever any answer below may change."""
        ...

    def endpoint_by_ip(self, ip: str) -> EndpointInfo | None:
        """The local endpoint holding this address."""
        ...

    def identity_by_ip(self, ip: str) -> int:
        """The security identity the datapath gives this address (the ipcache), 0 if none."""
        ...

    def identity_labels(self, identity: int) -> tuple[str, ...]:
        """The identity's labels as `source:key=value` strings (reserved ones included)."""
        ...

    def policy_by_cookie(self, cookie: int) -> PolicyRef | None:
        """The policy whose rule the datapath reported with this cookie."""
        ...

    def service_by_frontend(self, ip: str, port: int, protocol: int) -> ServiceRef | None:
        """The Service serving the frontend ip:port/protocol (IP protocol number)."""
        ...


def reserved_identity_labels(identity: int) -> tuple[str, ...]:
    """The label of a reserved identity (`reserved:host`, ...), () for any other."""
    label = reserved_label(identity)
    return (label,) if label else ()


class NullNodeView:
    """A node Hubble knows nothing about: flows carry addresses and identities only, and
    reserved identities their names."""

    generation = 0

    def endpoint_by_ip(self, ip: str) -> EndpointInfo | None:
        return None

    def identity_by_ip(self, ip: str) -> int:
        return 0

    def identity_labels(self, identity: int) -> tuple[str, ...]:
        return reserved_identity_labels(identity)

    def policy_by_cookie(self, cookie: int) -> PolicyRef | None:
        return None

    def service_by_frontend(self, ip: str, port: int, protocol: int) -> ServiceRef | None:
        return None
