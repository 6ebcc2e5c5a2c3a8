"""Every accepted policy, keyed by its object, with a revision and a cookie per policy.

The cookie is what policy-map entries carry so a verdict can name its policy. A key keeps
its cookie for the life of the agent, also across delete and re-create, so re-applying a
policy never rewrites map entries only to change their cookie, and a late verdict event of
a deleted policy is still named correctly.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from ipaddress import IPv4Network

from cilium_py.agent.policy.api import Rule, policy_name
from cilium_py.agent.policy.selector import LabelSelector


NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"


def key_name(key) -> str:
    if isinstance(key, tuple) and len(key) == 3:
        return policy_name(*key)
    return str(key)


class PolicyRepository:
    def __init__(self):
        # Store callbacks run on several worker threads at once.
        self._lock = threading.RLock()
        self._rules: dict[Hashable, tuple[Rule, ...]] = {}
        self._cookies: dict[Hashable, int] = {}
        self._names: dict[int, str] = {}
        self.revision = 0
        self._ordered: list = []
        self._ordered_at = -1

    def upsert(self, key, rules: Iterable[Rule]) -> set[LabelSelector]:
        """Returns the subject selectors of the old and new rules: the endpoints they match
        are the ones whose policy may have changed. Re-applying identical rules changes
        nothing, not even the revision."""
        new = tuple(rules)
        with self._lock:
            old = self._rules.get(key, ())
            if key in self._rules and old == new:
                return set()
            self._cookie_of(key)
            self._rules[key] = new
            self.revision += 1
            return {r.subject for r in old + new}

    def delete(self, key) -> set[LabelSelector]:
        with self._lock:
            old = self._rules.pop(key, None)
            if old is None:
                return set()
            self.revision += 1
            return {r.subject for r in old}

    def get(self, key) -> tuple[Rule, ...] | None:
        with self._lock:
            return self._rules.get(key)

    def keys(self) -> list:
        with self._lock:
            return sorted(self._rules, key=key_name)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._rules

    def __len__(self) -> int:
        with self._lock:
            return len(self._rules)

    def _cookie_of(self, key) -> int:
        cookie = self._cookies.get(key)
        if cookie is None:
            cookie = len(self._cookies) + 1
            self._cookies[key] = cookie
            self._names[cookie] = key_name(key)
        return cookie

    def cookie(self, key) -> int:
        with self._lock:
            return self._cookie_of(key)

    def cookie_key(self, cookie: int):
        """The (kind, namespace, name) key a cookie was given to, None when unknown."""
        with self._lock:
            for key, value in self._cookies.items():
                if value == cookie:
                    return key
            return None

    def cookie_name(self, cookie: int) -> str:
        with self._lock:
            return self._names.get(cookie, "")

    def selecting(self, labels) -> list[tuple[int, Rule]]:
        """(cookie, rule) for every rule whose subject matches labels, ordered by policy."""
        # A namespaced rule's subject requires its namespace: skip the others without
        # matching selectors (most rules of a big cluster live in other namespaces).
        namespace = labels.get(NAMESPACE_LABEL)
        with self._lock:
            # By policy name, not by cookie: cookies follow the order policies arrived in,
            # and where two policies write the same entry the one named last must win
            # however the node got here (incremental equals fresh, cookies included).
            # Sorted once per repository revision, not once per endpoint.
            if self._ordered_at != self.revision:
                self._ordered = sorted(((self._cookies[k], k, rules) for k, rules in self._rules.items()),
                                       key=lambda t: key_name(t[1]))
                self._ordered_at = self.revision
            items = self._ordered
        out = []
        for cookie, _, rules in items:
            out.extend((cookie, r) for r in rules
                       if (not r.namespace or r.namespace == namespace) and r.selects(labels))
        return out

    def rules_selecting(self, labels) -> list[Rule]:
        return [r for _, r in self.selecting(labels)]

    def policy_keys_selecting(self, labels) -> set:
        """Keys of the policies selecting labels: an endpoint needs recomputing when this
        set changes, or when a policy in it changes (upsert/delete return its selectors)."""
        with self._lock:
            return {k for k, rules in self._rules.items() if any(r.selects(labels) for r in rules)}

    def cidr_prefixes(self) -> set[IPv4Network]:
        """Every prefix any rule names, excepts included. A CIDR peer also covers the
        identities of narrower prefixes from other policies (see resolve), so allocating
        these before resolving makes the result independent of resolve order."""
        with self._lock:
            rules = [r for rs in self._rules.values() for r in rs]
        out: set[IPv4Network] = set()
        for r in rules:
            out |= r.cidr_prefixes()
        return out
