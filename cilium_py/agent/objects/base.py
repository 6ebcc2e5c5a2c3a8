"""What every stored object has (kind, namespace, name, labels, where it came from) and the
checks its parser shares with the other kinds: metadata, names, labels, port numbers.

A parser collects every problem of one object before it gives up, so a user fixes a file
in one pass; `InvalidObject` carries them all and describes the first.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import ClassVar

from cilium_py.agent.errors import InvalidObject, ValidationError
from cilium_py.vocab import K8S_PROTOCOLS

Key = tuple[str, str, str]   # (kind, namespace or "", name)

DEFAULT_NAMESPACE = "default"

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL = re.compile(_LABEL)
_DNS_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


class Labels(dict):
    """A label map that cannot change once built, so objects holding one are immutable
    and hashable; it still reads (and compares) as the plain dict callers expect."""

    __slots__ = ()

    def _immutable(self, *args, **kwargs):
        raise TypeError("object labels are immutable; build a new object instead")

    __setitem__ = __delitem__ = __ior__ = _immutable
    clear = pop = popitem = setdefault = update = _immutable

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return (Labels, (dict(self),))

    def __repr__(self) -> str:
        return f"Labels({dict.__repr__(self)})"


NO_LABELS = Labels()


@dataclass(frozen=True, kw_only=True)
class Resource:
    """The common base of the typed objects the sources build and the store holds."""

    kind: ClassVar[str] = ""
    namespaced: ClassVar[bool] = True
    api_version: ClassVar[str] = "v1"

    namespace: str | None
    name: str
    labels: Labels = NO_LABELS
    source: str = ""
    created: str = ""            # metadata.creationTimestamp: orders claims to the older object
    uid: str = ""                # metadata.uid: set by the API server (ownerReferences name it)

    def __post_init__(self):
        # Objects built in code (tests, benchmarks) may pass a plain dict; held as given it
        # would make the object mutable and unhashable.
        if type(self.labels) is not Labels:
            object.__setattr__(self, "labels", Labels(self.labels))

    @property
    def key(self) -> Key:
        return (self.kind, self.namespace or "", self.name)

    def describe(self) -> str:
        """"Kind ns/name", or "Kind name" for cluster-scoped objects."""
        return describe(self.kind, self.namespace, self.name)


def describe(kind: str, namespace: str | None, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


@dataclass(frozen=True)
class Meta:
    """What the shared metadata checks found, for the kind's parser to build on."""

    namespace: str | None
    name: str
    labels: Labels
    source: str
    created: str
    uid: str = ""

    @property
    def common(self) -> dict:
        return {"namespace": self.namespace, "name": self.name, "labels": self.labels,
                "source": self.source, "created": self.created, "uid": self.uid}


class Checker:
    """Collects the field errors of one object."""

    def __init__(self, source: str, obj: str, key: Key | None):
        self.source, self.obj, self.key = source, obj, key
        self.errors: list[ValidationError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(ValidationError(self.source, self.obj, path, message))

    def raise_if_errors(self) -> None:
        if self.errors:
            raise InvalidObject(self.errors, self.key)


def fail(source: str, obj: str, path: str, message: str, key: Key | None = None):
    raise InvalidObject([ValidationError(source, obj, path, message)], key)


# -- field checks (each returns an error message or None) ----------------------------------

def is_int(value) -> bool:
    # bool is an int in Python, but `port: true` is a YAML mistake, not port 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _dns_name(value, what: str, pattern: re.Pattern, limit: int, rule: str) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string"
    if len(value) > limit or not pattern.fullmatch(value):
        return f"{value!r} is not a valid {what}: {rule}"
    return None


def dns_label(value, what: str = "name") -> str | None:
    return _dns_name(value, what, _DNS_LABEL, 63, "at most 63 lowercase letters, digits and '-', "
                                                  "starting and ending with a letter or digit")


def dns_subdomain(value, what: str = "name") -> str | None:
    return _dns_name(value, what, _DNS_SUBDOMAIN, 253, "lowercase letters, digits, '-' and '.', "
                                                       "starting and ending with a letter or digit")


def dns1035(value, what: str = "name") -> str | None:
    """Service names become DNS names of their own, so Kubernetes holds them to RFC 1035."""
    if msg := dns_label(value, what):
        return msg
    if not _DNS1035_LABEL.fullmatch(value):
        return f"{value!r} is not a valid Service name: it must start with a letter"
    return None


def port_number(value) -> str | None:
    if not is_int(value):
        return f"must be an integer port number, not {value!r}"
    if not 1 <= value <= 65535:
        return f"{value} is not in 1-65535"
    return None


def port_name(value) -> str | None:
    """A container port name (IANA service name syntax), as named ports refer to them."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > 15:
        return f"{value!r} is longer than 15 characters"
    if not _IANA_SVC_NAME.fullmatch(value) or "--" in value:
        return (f"{value!r} is not a valid port name: lowercase letters, digits and single '-', "
                "starting and ending with a letter or digit")
    if not re.search(r"[a-z]", value):
        return f"{value!r} is not a valid port name: it needs at least one letter"
    return None


def protocol(c: Checker, value, path: str) -> int | None:
    """A Kubernetes protocol name (TCP when absent) to its number."""
    name = "TCP" if value is None else value
    if not isinstance(name, str) or name not in K8S_PROTOCOLS:
        c.error(path, f"{name!r} is not a supported protocol: use TCP, UDP or SCTP")
        return None
    return K8S_PROTOCOLS[name]


def ip_address(value) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def required_spec(c: Checker, doc: dict, what: str) -> dict:
    """The object's spec, which its kind cannot do without: when it is not a mapping, this
    raises with every error found so far."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        c.error("spec", f"a {c.key[0]} needs a spec with {what}")
        c.raise_if_errors()
    return spec


def mapping(c: Checker, value, path: str) -> dict:
    """`value` when it is a mapping; {} (after an error) when it is anything but absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        c.error(path, "must be a mapping")
        return {}
    return value


def list_of_mappings(c: Checker, value, path: str) -> list[tuple[int, dict]]:
    """The (index, item) pairs of a list of mappings; errors for everything else."""
    if value is None:
        return []
    if not isinstance(value, list):
        c.error(path, "must be a list")
        return []
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            out.append((i, item))
        else:
            c.error(f"{path}[{i}]", "must be a mapping")
    return out


def label_errors(labels, path: str) -> list[tuple[str, str]]:
    # Identities are keyed by "key=value;..." strings, so only well-formed labels may in.
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return [(path, "must be a mapping of label keys to string values")]
    errors = []
    for key, value in labels.items():
        where = f"{path}.{key}"
        if not isinstance(key, str):
            errors.append((where, "label keys must be strings"))
            continue
        prefix, _, name = key.rpartition("/")
        if prefix and dns_subdomain(prefix, "label prefix"):
            errors.append((where, f"{prefix!r} is not a valid label prefix (a DNS subdomain)"))
        elif len(name) > 63 or not _LABEL_NAME.fullmatch(name):
            errors.append((where, f"{key!r} is not a valid label key"))
        elif not isinstance(value, str):
            errors.append((where, f"label values must be strings; quote {value!r}"))
        elif value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
            errors.append((where, f"{value!r} is not a valid label value: at most 63 letters, "
                                  "digits, '-', '_' and '.', starting and ending with a letter or digit"))
    return errors


# -- metadata ------------------------------------------------------------------------------

def parse_meta(cls: type[Resource], doc, source: str, where: str) -> tuple[Meta, Checker]:
    """Checks what every object of `cls`'s kind needs (a mapping, the kind's apiVersion, a
    valid name and namespace, valid labels). Errors that leave the object without a name
    raise at once; the rest go to the returned Checker, which the kind's parser adds to."""
    kind = cls.kind
    if not isinstance(doc, dict):
        fail(source, where, "", f"a manifest must be a mapping, not {type(doc).__name__}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        fail(source, f"{where} ({kind})", "metadata", "is required (with at least a name)")
    name = meta.get("name")
    if name is None or name == "":
        fail(source, f"{where} ({kind})", "metadata.name", "is required")
    if msg := (dns1035 if kind == "Service" else dns_label if kind == "Namespace" else dns_subdomain)(name):
        fail(source, f"{where} ({kind})", "metadata.name", msg)
    namespace = None
    if cls.namespaced:
        namespace = meta.get("namespace") or DEFAULT_NAMESPACE
        if msg := dns_label(namespace, "namespace"):
            fail(source, f"{where} ({kind} {name})", "metadata.namespace", msg)
    key: Key = (kind, namespace or "", name)
    c = Checker(source, describe(kind, namespace, name), key)
    if doc.get("apiVersion") != cls.api_version:
        c.error("apiVersion", f"{kind} is served as {cls.api_version!r}, not {doc.get('apiVersion')!r}")
    raw_labels = meta.get("labels")
    for path, message in label_errors(raw_labels, "metadata.labels"):
        c.error(path, message)
    labels = Labels(raw_labels) if isinstance(raw_labels, dict) and raw_labels else NO_LABELS
    created = meta.get("creationTimestamp")
    uid = meta.get("uid")
    return Meta(namespace, name, labels, source, "" if created is None else str(created),
                uid if isinstance(uid, str) else ""), c
