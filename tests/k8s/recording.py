"""A Kube client that notes every request it sends as RBAC sees it (verb, group, resource,
namespace, name) with the status of the answer, so a test running a component's real code
under its ServiceAccount can say which requests the component made and whether RBAC let
each through, instead of finding a 403 swallowed by a retry loop."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cilium_py.k8s import rbac
from cilium_py.k8s.client import ApiError, Kube


@dataclass(frozen=True)
class Request:
    verb: str
    group: str
    resource: str       # plural or plural/subresource
    namespace: str
    name: str
    status: int

    def grant(self) -> rbac.Grant:
        return (self.group, self.resource, self.verb, self.name)


def attributes(method: str, path: str, query: dict) -> tuple[str, str, str, str, str] | None:
    """(verb, group, resource, namespace, name) of a resource request; None for the
    others (/version, discovery), which RBAC judges as non-resource URLs."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    plural, name, sub = rest[0], rest[1] if len(rest) > 1 else "", rest[2] if len(rest) > 2 else ""
    if method == "GET":
        verb = "get" if name else ("watch" if str(query.get("watch")) in ("1", "true") else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]
    return verb, group, f"{plural}/{sub}" if sub else plural, namespace, name


class RecordingKube(Kube):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.requests: list[Request] = []

    def _send(self, method, path, query, headers, body, timeout, what):
        attrs = attributes(method, path, query)
        try:
            resp = super()._send(method, path, query, headers, body, timeout, what)
        except ApiError as e:
            self._note(attrs, e.status)
            raise
        self._note(attrs, resp.status)
        return resp

    def _note(self, attrs, status: int) -> None:
        if attrs is not None:
            with self._lock:
                self.requests.append(Request(*attrs, status))

    def refused(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.status == 403]

    def beyond(self, component: rbac.Component) -> list[Request]:
        """Requests the component's table does not grant (whatever the server answered)."""
        cluster = rbac.grants(component.cluster)
        home = cluster | rbac.grants(component.namespaced)
        with self._lock:
            return [r for r in self.requests
                    if not rbac.allows(home if r.namespace == component.namespace else cluster,
                                       r.group, r.resource, r.verb, r.name)]

    def unused(self, component: rbac.Component, skip=frozenset()) -> list[rbac.Grant]:
        """Grants of the component's table no recorded request needed (a grant limited to
        names counts only when one of them was asked for)."""
        with self._lock:
            asked = {r.grant() for r in self.requests}
        asked_any = {grant[:3] for grant in asked}
        table = rbac.grants(component.cluster) | rbac.grants(component.namespaced)
        return sorted(g for g in table - set(skip) if (g not in asked if g[3] else g[:3] not in asked_any))

    def verbs(self) -> set[tuple[str, str, str]]:
        with self._lock:
            return {(r.group, r.resource, r.verb) for r in self.requests}
