"""What each ciliumpy component may do in the Kubernetes API, as RBAC grants it: one table per
component, kept next to the resource table it names kinds from (resources.py).

This is the one place the permissions are decided. The roles in the manifests a user applies
(operator/agent.yaml, operator/operator.yaml) must grant exactly what these tables say (a unit
test compares them both ways), and the k8s tier runs the agent's and the operator's code under
those roles against a real API server, recording every request, so a verb the code uses and
the table lacks fails a test there.

Each entry says why the component needs it: a verb nobody can explain is one to remove.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cilium_py.k8s.resources import CILIUM_GROUP, RESOURCES, WATCHED_KINDS, resource

# Verbs RBAC knows for resources (not the URL-only verbs of nonResourceURLs).
VERBS = frozenset({"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"})


@dataclass(frozen=True)
class Access:
    """Verbs on one resource (or one of its subresources), optionally only on named objects."""
    kind: str
    verbs: tuple[str, ...]
    why: str
    subresource: str = ""
    names: tuple[str, ...] = ()     # RBAC resourceNames; empty: every object

    def __post_init__(self):
        resource(self.kind)        # an unknown kind fails here, naming the known ones
        unknown = sorted(set(self.verbs) - VERBS)
        if unknown:
            raise ValueError(f"{self.kind}: unknown verb(s) {', '.join(unknown)}")
        if self.names and {"create", "list", "watch"} & set(self.verbs):
            # RBAC cannot restrict create by name (there is no name when it is authorized),
            # and a named list or watch only matches requests with a field selector on the name.
            raise ValueError(f"{self.kind}: create/list/watch cannot be limited to resourceNames")

    @property
    def group(self) -> str:
        return resource(self.kind).group

    @property
    def resource(self) -> str:
        """The resource as RBAC names it: plural, or plural/subresource."""
        plural = resource(self.kind).plural
        return f"{plural}/{self.subresource}" if self.subresource else plural


@dataclass(frozen=True)
class Component:
    """A component's ServiceAccount and what it may do: cluster-wide (its ClusterRole) and
    in its own namespace only (its Role)."""
    service_account: str
    namespace: str
    cluster: tuple[Access, ...]
    namespaced: tuple[Access, ...] = ()


NAMESPACE = "kube-system"
# The operator's leader-election Lease (cilium_py.operator.leader.LEASE_NAME).
OPERATOR_LEASE = "ciliumpy-operator-resource-lock"


def crd_name(kind: str) -> str:
    res = resource(kind)
    return f"{res.plural}.{res.group}"


# Our CustomResourceDefinitions: every cilium.io kind of the resource table.
CRD_NAMES: tuple[str, ...] = tuple(sorted(crd_name(k) for k, r in RESOURCES.items() if r.group == CILIUM_GROUP))


AGENT = Component(
    service_account="ciliumpy",
    namespace=NAMESPACE,
    cluster=(
        *(Access(kind, ("list", "watch"), "the Kubernetes source lists and watches it into the store")
          for kind in WATCHED_KINDS),
        Access("CiliumIdentity", ("create", "get", "update"),
               "allocates the identity of a new label set (create; on a clash reads the winner's "
               "labels), removes the operator's heartbeat mark from an identity it uses again"),
        Access("CiliumEndpoint", ("create", "patch", "delete"),
               "publishes the endpoints of its node's pods (identity, addresses, owner pod) and "
               "removes them with the pod"),
        Access("CiliumNode", ("create", "get", "update"),
               "registers its node (addresses) and reads the pod CIDR the operator allocated"),
        Access("CiliumNetworkPolicy", ("patch",), "reports whether a policy was accepted",
               subresource="status"),
        Access("CiliumClusterwideNetworkPolicy", ("patch",), "reports whether a policy was accepted",
               subresource="status"),
    ),
)

OPERATOR = Component(
    service_account="ciliumpy-operator",
    namespace=NAMESPACE,
    cluster=(
        Access("CustomResourceDefinition", ("create", "get"),
               "installs the CRDs and waits until they are established"),
        Access("CustomResourceDefinition", ("update",), "upgrades its own CRDs, no others",
               names=CRD_NAMES),
        Access("CiliumIdentity", ("list", "get", "update", "delete"),
               "identity GC: lists identities, marks unused ones (update after get), deletes "
               "marked ones with preconditions"),
        Access("CiliumEndpoint", ("list",), "identity GC: which identities endpoints still use"),
        Access("CiliumNode", ("list", "watch", "update"),
               "cluster-pool IPAM: lists nodes on every pass, a watch prompts a pass, writes podCIDRs"),
        Access("CiliumNode", ("update",), "cluster-pool IPAM: reports allocation errors",
               subresource="status"),
    ),
    namespaced=(
        Access("Lease", ("create",), "leader election: the first operator creates the Lease"),
        Access("Lease", ("get", "update"),
               "leader election: acquires, renews and releases its Lease; kube-system holds "
               "other components' leader Leases, which it must not touch",
               names=(OPERATOR_LEASE,)),
    ),
)

COMPONENTS: tuple[Component, ...] = (AGENT, OPERATOR)

# A grant in flat form: (apiGroup, resource[/subresource], verb, resourceName or "" for any).
Grant = tuple[str, str, str, str]


def grants(accesses: Iterable[Access]) -> set[Grant]:
    return {(a.group, a.resource, verb, name)
            for a in accesses for verb in a.verbs for name in (a.names or ("",))}


def rule_grants(rules: Iterable[dict], where: str = "rules") -> set[Grant]:
    """The grants of RBAC rules as a Role or ClusterRole holds them. Refuses what a table
    entry cannot express (wildcards, nonResourceURLs), naming the rule."""
    out: set[Grant] = set()
    for i, rule in enumerate(rules or ()):
        at = f"{where}[{i}]"
        if rule.get("nonResourceURLs"):
            raise ValueError(f"{at}: nonResourceURLs are not granted to ciliumpy's components")
        parts = {key: rule.get(key) or [] for key in ("apiGroups", "resources", "verbs")}
        for key, values in parts.items():
            if not values:
                raise ValueError(f"{at}: {key} is missing or empty")
            if "*" in values:
                raise ValueError(f"{at}: {key} has a wildcard")
        names = rule.get("resourceNames") or [""]
        out |= {(g, r, v, n) for g in parts["apiGroups"] for r in parts["resources"]
                for v in parts["verbs"] for n in names}
    return out


def rules(accesses: Iterable[Access]) -> list[dict]:
    """RBAC rules granting exactly `accesses`: the resources of one group that get the same
    verbs (and names) share a rule. The form the manifests are written in."""
    verbs_of: dict[tuple[str, str, tuple[str, ...]], set[str]] = {}
    for a in accesses:
        verbs_of.setdefault((a.group, a.resource, a.names), set()).update(a.verbs)
    shared: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[str]] = {}
    for (group, res, names), verbs in verbs_of.items():
        shared.setdefault((group, tuple(sorted(verbs)), names), []).append(res)
    out = []
    for (group, verbs, names), resources in sorted(shared.items()):
        rule = {"apiGroups": [group], "resources": sorted(resources), "verbs": list(verbs)}
        if names:
            rule["resourceNames"] = list(names)
        out.append(rule)
    return out


def allows(granted: set[Grant], group: str, res: str, verb: str, name: str = "") -> bool:
    return (group, res, verb, "") in granted or bool(name) and (group, res, verb, name) in granted


__all__ = ["AGENT", "COMPONENTS", "CRD_NAMES", "NAMESPACE", "OPERATOR", "Access", "Component", "Grant",
           "allows", "crd_name", "grants", "rule_grants", "rules"]
