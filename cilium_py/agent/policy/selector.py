"""Label selectors as policies write them, matched against source-prefixed label sets.

Identity labels carry their source ("k8s:app", "reserved:host"). A selector key written
without a source, or with the "any" source, matches the key under every source, because
users write `app: web` and mean the Kubernetes label; a key with a source matches only
that source, so "reserved:host" cannot be spoofed by a pod label named "host".
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cilium_py.agent.errors import ValidationError

IN, NOT_IN, EXISTS, DOES_NOT_EXIST = "In", "NotIn", "Exists", "DoesNotExist"
OPERATORS = (IN, NOT_IN, EXISTS, DOES_NOT_EXIST)

# Sources a selector may name; anything else is a typo that would silently match nothing.
SOURCES = frozenset({"k8s", "any", "reserved", "cidr", "container", "unspec", "fqdn"})
ANY_SOURCE = "any"

K8S_NAMESPACE_KEY = "k8s:io.kubernetes.pod.namespace"
K8S_NAMESPACE_LABELS_PREFIX = "k8s:io.cilium.k8s.namespace.labels."

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class PolicyError(ValidationError):
    """Invalid policy input. The field is a path inside the object, such as
    "spec.ingress[0].toPorts[0].ports[1].port"; the store fills in source and object."""

    def __init__(self, field: str, message: str):
        super().__init__("", "", field, message)


def check_label_key(key: str, path: str) -> None:
    """Kubernetes qualified-name syntax: [dns-subdomain/]name, name at most 63 chars."""
    if not isinstance(key, str) or not key:
        raise PolicyError(path, "label key must be a non-empty string")
    prefix, _, name = key.rpartition("/")
    if "/" in key:
        if not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix):
            raise PolicyError(path, f"label key {key!r}: prefix must be a lowercase DNS subdomain")
    if len(name) > 63 or not _NAME.match(name):
        raise PolicyError(path, f"label key {key!r}: name must be at most 63 characters, "
                                "alphanumeric, '-', '_' or '.', starting and ending alphanumeric")


def check_label_value(value, path: str) -> None:
    if not isinstance(value, str):
        raise PolicyError(path, f"label value must be a string, not {type(value).__name__} "
                                f"{value!r} (quote it in YAML)")
    if value and (len(value) > 63 or not _NAME.match(value)):
        raise PolicyError(path, f"label value {value!r} must be at most 63 characters, "
                                "alphanumeric, '-', '_' or '.', starting and ending alphanumeric")


def _split_key(key: str, path: str, allow_source: bool) -> tuple[str | None, str]:
    if not isinstance(key, str) or not key:
        raise PolicyError(path, "label key must be a non-empty string")
    source, sep, name = key.partition(":")
    if not sep:
        check_label_key(key, path)
        return None, key
    if not allow_source:
        raise PolicyError(path, f"label key {key!r}: ':' is not allowed in a Kubernetes label key")
    if source not in SOURCES:
        raise PolicyError(path, f"label key {key!r}: unknown label source {source!r} "
                                f"(one of {', '.join(sorted(SOURCES))})")
    if source == "cidr":
        # IPv6 CIDR labels spell ':' as '-' so the source separator stays unambiguous.
        try:
            ipaddress.ip_network(name.replace("-", ":"), strict=False)
        except ValueError:
            raise PolicyError(path, f"label key {key!r}: {name!r} is not a CIDR") from None
    else:
        check_label_key(name, path)
    return (None if source == ANY_SOURCE else source), name


@dataclass(frozen=True)
class Requirement:
    """source None = any source. values is sorted, for a canonical, hashable form."""

    key: str
    operator: str
    values: tuple[str, ...] = ()
    source: str | None = None

    def _values_of(self, labels: Mapping[str, str]) -> list[str]:
        if self.source is not None:
            full = f"{self.source}:{self.key}"
            return [labels[full]] if full in labels else []
        found = []
        for label, value in labels.items():
            _, sep, name = label.partition(":")
            if (name if sep else label) == self.key:
                found.append(value)
        return found

    def matches(self, labels: Mapping[str, str]) -> bool:
        found = self._values_of(labels)
        if self.operator == EXISTS:
            return bool(found)
        if self.operator == DOES_NOT_EXIST:
            return not found
        if self.operator == IN:
            return any(v in self.values for v in found)
        return not any(v in self.values for v in found)

    def sort_key(self):
        return (self.key, self.source or "", self.operator, self.values)

    def __str__(self) -> str:
        key = f"{self.source}:{self.key}" if self.source else self.key
        if self.operator == IN and len(self.values) == 1:
            return f"{key}={self.values[0]}"
        if self.operator == EXISTS:
            return key
        if self.operator == DOES_NOT_EXIST:
            return f"!{key}"
        return f"{key} {self.operator} ({','.join(self.values)})"


def requirement(full_key: str, operator: str, values=()) -> Requirement:
    """Builds a requirement from a trusted "source:key" (or bare key) written by our code."""
    source, sep, name = full_key.partition(":")
    if not sep:
        return Requirement(full_key, operator, tuple(sorted(set(values))))
    return Requirement(name, operator, tuple(sorted(set(values))),
                       None if source == ANY_SOURCE else source)


@dataclass(frozen=True)
class LabelSelector:
    """An AND of requirements; no requirements selects every label set."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, obj, path: str, *, allow_source: bool = True) -> LabelSelector | None:
        """None (not given) stays None, so callers can tell "absent" from "{}" (all).
        allow_source=False is for Kubernetes objects, whose keys cannot carry a source."""
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise PolicyError(path, "must be a label selector object (matchLabels, matchExpressions)")
        unknown = sorted(set(obj) - {"matchLabels", "matchExpressions"})
        if unknown:
            # A typo such as "matchLabel" would otherwise leave an empty selector: everything.
            raise PolicyError(f"{path}.{unknown[0]}", "unknown field (expected matchLabels or matchExpressions)")
        reqs: list[Requirement] = []
        labels = obj.get("matchLabels")
        if labels is not None:
            if not isinstance(labels, dict):
                raise PolicyError(f"{path}.matchLabels", "must be a map of label key to value")
            for key, value in labels.items():
                kpath = f"{path}.matchLabels[{key}]"
                source, name = _split_key(key, kpath, allow_source)
                check_label_value(value, kpath)
                reqs.append(Requirement(name, IN, (value,), source))
        exprs = obj.get("matchExpressions")
        if exprs is not None:
            if not isinstance(exprs, list):
                raise PolicyError(f"{path}.matchExpressions", "must be a list")
            for i, expr in enumerate(exprs):
                reqs.append(_parse_expression(expr, f"{path}.matchExpressions[{i}]", allow_source))
        return cls(_canonical(reqs))

    @classmethod
    def all(cls) -> LabelSelector:
        return cls(())

    def is_empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def with_requirements(self, *reqs: Requirement) -> LabelSelector:
        return LabelSelector(_canonical(set(self.requirements) | set(reqs)))

    def map_keys(self, source: str, prefix: str = "") -> LabelSelector:
        """Re-homes bare Kubernetes keys: podSelector keys become "k8s:<key>", and
        namespaceSelector keys the namespace labels Cilium copies onto every pod."""
        return LabelSelector(_canonical(
            Requirement(prefix + r.key, r.operator, r.values, source) for r in self.requirements))

    def mentions(self, full_key: str) -> bool:
        """Whether any requirement is about full_key ("k8s:x"), counting source-less ones."""
        source, _, name = full_key.partition(":")
        return any(r.key == name and r.source in (None, source) for r in self.requirements)

    def mentions_source(self, source: str) -> bool:
        return any(r.source == source for r in self.requirements)

    def __str__(self) -> str:
        return "{" + ", ".join(str(r) for r in self.requirements) + "}"


def _canonical(reqs) -> tuple[Requirement, ...]:
    return tuple(sorted(set(reqs), key=Requirement.sort_key))


def _parse_expression(expr, path: str, allow_source: bool) -> Requirement:
    if not isinstance(expr, dict):
        raise PolicyError(path, "must be an object with key, operator and values")
    unknown = sorted(set(expr) - {"key", "operator", "values"})
    if unknown:
        raise PolicyError(f"{path}.{unknown[0]}", "unknown field (expected key, operator, values)")
    if "key" not in expr:
        raise PolicyError(f"{path}.key", "is required")
    source, name = _split_key(expr["key"], f"{path}.key", allow_source)
    op = expr.get("operator")
    if op not in OPERATORS:
        raise PolicyError(f"{path}.operator", f"must be one of {', '.join(OPERATORS)}, not {op!r}")
    values = expr.get("values")
    if op in (IN, NOT_IN):
        if not isinstance(values, list) or not values:
            raise PolicyError(f"{path}.values", f"operator {op} needs a non-empty list of values")
        for j, v in enumerate(values):
            check_label_value(v, f"{path}.values[{j}]")
        return Requirement(name, op, tuple(sorted(set(values))), source)
    if values:
        raise PolicyError(f"{path}.values", f"must be empty for operator {op}")
    return Requirement(name, op, (), source)
