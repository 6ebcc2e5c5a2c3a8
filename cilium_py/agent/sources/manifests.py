"""The manifests-directory source: the YAML a user would `kubectl apply`, read from files.

`parse_documents` turns one file's text into validated Resources plus errors that name
the file, the object (or, when the object cannot be named, its document number, counted
from 1) and the field. An invalid object is never stored; every other object of the same
file is.

`ManifestsSource` keeps the store equal to what the directory says, with these rules for
mistakes, chosen so that a typo never takes down running workloads or their policy:

* An object whose new version is invalid keeps its last valid version in the store, and
  the error says so. The same holds for every object of a file that no longer parses
  (YAML syntax error) or cannot be read.
* An object is identified by (kind, namespace, name), not by file: moving it to another
  file is at most an update of its `source`, never a delete and re-create.
* The same object defined twice: the definition from the file it was loaded from before
  wins (otherwise the first in file-name order) and the other is reported.
* Only *.yaml, *.yml and *.json files directly in the directory are read; names starting
  with "." are editor scratch files and are skipped.

Stored bodies get the defaults the API server would fill in for the fields we rely on:
metadata.namespace for namespaced kinds, the protocol of container and service ports, and
a service port's targetPort (its port).
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field

import yaml

from cilium_py.agent.errors import ValidationError
from cilium_py.agent.store import Key, Resource, Store

log = logging.getLogger(__name__)

# kind -> (apiVersion, namespaced)
KINDS: dict[str, tuple[str, bool]] = {
    "Namespace": ("v1", False),
    "Node": ("v1", False),
    "CiliumClusterwideNetworkPolicy": ("cilium.io/v2", False),
    "CiliumNetworkPolicy": ("cilium.io/v2", True),
    "NetworkPolicy": ("networking.k8s.io/v1", True),
    "Service": ("v1", True),
    "EndpointSlice": ("discovery.k8s.io/v1", True),
    "Pod": ("v1", True),
}
# Imported when first needed: the policy engine imports nothing from here, and the
# source still works (without policy validation) in a tree that lacks it.
POLICY_API = "cilium_py.agent.policy.api"
POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
# Applying in this order lets a controller find a pod's namespace and the policies that
# select it already stored (the store's workers still run keys in parallel).
_KIND_ORDER = {k: i for i, k in enumerate(KINDS)}
PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_NAMESPACE = "default"
SUFFIXES = (".yaml", ".yml", ".json")

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL = re.compile(_LABEL)
_DNS_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


class ManifestError(ValidationError):
    """A ValidationError that also carries the document number (from 1) and, when the
    object could be named, its store key."""

    def __init__(self, source: str, obj: str, field: str, message: str,
                 document: int = 0, key: Key | None = None):
        self.document = document
        self.key = key
        super().__init__(source, obj, field, message)


class ManifestSyntaxError(ManifestError):
    """The whole file failed to parse; none of its objects could be read."""


# -- field checks (each returns an error message or None) ----------------------------

def _dns_label(value, what: str = "name") -> str | None:
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string"
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        return (f"{value!r} is not a valid {what}: at most 63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit")
    return None


def _dns_subdomain(value, what: str = "name") -> str | None:
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string"
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        return (f"{value!r} is not a valid {what}: lowercase letters, digits, '-' and '.', "
                "starting and ending with a letter or digit")
    return None


# Service names become DNS names of their own, so Kubernetes holds them to RFC 1035.
def _dns1035(value, what: str = "name") -> str | None:
    if msg := _dns_label(value, what):
        return msg
    if not _DNS1035_LABEL.fullmatch(value):
        return f"{value!r} is not a valid Service name: it must start with a letter"
    return None


def _port_number(value) -> str | None:
    # bool is an int in Python, but `port: true` is a YAML mistake, not port 1.
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer port number, not {value!r}"
    if not 1 <= value <= 65535:
        return f"{value} is not in 1-65535"
    return None


def _port_name(value) -> str | None:
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


def _protocol(port: dict) -> str | None:
    proto = port.setdefault("protocol", "TCP")
    if proto not in PROTOCOLS:
        return f"{proto!r} is not a supported protocol: use TCP, UDP or SCTP"
    return None


def _label_errors(labels, path: str) -> list[tuple[str, str]]:
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
        if prefix and _dns_subdomain(prefix, "label prefix"):
            errors.append((where, f"{prefix!r} is not a valid label prefix (a DNS subdomain)"))
        elif len(name) > 63 or not _LABEL_NAME.fullmatch(name):
            errors.append((where, f"{key!r} is not a valid label key"))
        elif not isinstance(value, str):
            errors.append((where, f"label values must be strings; quote {value!r}"))
        elif value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
            errors.append((where, f"{value!r} is not a valid label value: at most 63 letters, "
                                  "digits, '-', '_' and '.', starting and ending with a letter or digit"))
    return errors


def _list_of_mappings(value, path: str, errors: list) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        errors.append((path, "must be a list"))
        return []
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            out.append(item)
        else:
            errors.append((f"{path}[{i}]", "must be a mapping"))
    return out


def _pod_errors(body: dict) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    spec = body.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "a Pod needs a spec with containers")]
    for opt in ("nodeName", "serviceAccountName"):
        if opt in spec and (msg := _dns_subdomain(spec[opt], opt)):
            errors.append((f"spec.{opt}", msg))
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        errors.append(("spec.containers", "a Pod needs at least one container"))
        return errors
    # A named port must mean one port: policies resolve names through the pod, and an
    # ambiguous name would be a policy we cannot enforce as written.
    named: dict[str, tuple[int, str, str]] = {}
    for ci, container in enumerate(containers):
        cpath = f"spec.containers[{ci}]"
        if not isinstance(container, dict):
            errors.append((cpath, "must be a mapping"))
            continue
        if msg := _dns_label(container.get("name"), "container name"):
            errors.append((f"{cpath}.name", msg))
        for pi, port in enumerate(_list_of_mappings(container.get("ports"), f"{cpath}.ports", errors)):
            ppath = f"{cpath}.ports[{pi}]"
            if "containerPort" not in port:
                errors.append((f"{ppath}.containerPort", "is required"))
            elif msg := _port_number(port["containerPort"]):
                errors.append((f"{ppath}.containerPort", msg))
            if msg := _protocol(port):
                errors.append((f"{ppath}.protocol", msg))
            if "name" not in port:
                continue
            if msg := _port_name(port["name"]):
                errors.append((f"{ppath}.name", msg))
                continue
            this = (port.get("containerPort"), port["protocol"], ppath)
            first = named.setdefault(port["name"], this)
            if first is not this and first[:2] != this[:2]:
                errors.append((f"{ppath}.name", f"port name {port['name']!r} is already used by "
                                                f"{first[2]} for a different port"))
    return errors


def _service_errors(body: dict) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    spec = body.get("spec")
    if spec is None:
        return errors
    if not isinstance(spec, dict):
        return [("spec", "must be a mapping")]
    ports = _list_of_mappings(spec.get("ports"), "spec.ports", errors)
    for pi, port in enumerate(ports):
        ppath = f"spec.ports[{pi}]"
        if "port" not in port:
            errors.append((f"{ppath}.port", "is required"))
        elif msg := _port_number(port["port"]):
            errors.append((f"{ppath}.port", msg))
        elif "targetPort" not in port:
            port["targetPort"] = port["port"]  # the API server's default
        if msg := _protocol(port):
            errors.append((f"{ppath}.protocol", msg))
        if "targetPort" in port:
            target = port["targetPort"]
            msg = _port_name(target) if isinstance(target, str) else _port_number(target)
            if msg:
                errors.append((f"{ppath}.targetPort", msg))
        if "nodePort" in port and (msg := _port_number(port["nodePort"])):
            errors.append((f"{ppath}.nodePort", msg))
        if len(ports) > 1 and (msg := _dns_label(port.get("name"), "port name")):
            errors.append((f"{ppath}.name", msg + " (required when a Service has several ports)"))
    return errors


_policy_api_missing_logged = False


def _policy_errors(kind: str, namespace: str | None, name: str, body: dict) -> list[tuple[str, str]]:
    global _policy_api_missing_logged
    try:
        api = importlib.import_module(POLICY_API)
    except ModuleNotFoundError as e:
        if e.name != POLICY_API:
            raise
        if not _policy_api_missing_logged:
            log.warning("policy engine not available; policies are stored without validation")
            _policy_api_missing_logged = True
        return []
    try:
        # A copy: what we store must be what the user wrote, whatever the parser does.
        api.parse_policy(kind, namespace, name, copy.deepcopy(body))
    except api.PolicyError as e:
        return [(getattr(e, "field", ""), getattr(e, "message", str(e)))]
    except Exception as e:  # noqa: BLE001 - a parser bug must not stop the source
        log.exception("policy parser failed on %s %s/%s", kind, namespace, name)
        return [("", f"internal error while validating the policy: {e}")]
    return []


_CHECKS = {"Pod": _pod_errors, "Service": _service_errors}
_NAME_CHECKS = {"Namespace": _dns_label, "Service": _dns1035}


# -- documents -------------------------------------------------------------------------

def _describe(kind: str, namespace: str | None, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def _parse_object(doc, source: str, where: str, document: int) -> tuple[Resource | None, list[ManifestError]]:
    def fail(field: str, message: str, obj: str = where, key: Key | None = None):
        return None, [ManifestError(source, obj, field, message, document, key)]

    if not isinstance(doc, dict):
        return fail("", f"a manifest must be a mapping, not {type(doc).__name__}")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        return fail("kind", "is required")
    if kind not in KINDS:
        return fail("kind", f"unknown kind {kind!r}; supported: {', '.join(sorted(KINDS))}",
                    f"{where} ({kind})")
    api_version, namespaced = KINDS[kind]
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return fail("metadata", "is required (with at least a name)", f"{where} ({kind})")
    name = meta.get("name")
    if name is None or name == "":
        return fail("metadata.name", "is required", f"{where} ({kind})")
    name_check = _NAME_CHECKS.get(kind, _dns_subdomain)
    if msg := name_check(name, "name"):
        return fail("metadata.name", msg, f"{where} ({kind})")
    namespace = None
    if namespaced:
        namespace = meta.get("namespace") or DEFAULT_NAMESPACE
        if msg := _dns_label(namespace, "namespace"):
            return fail("metadata.namespace", msg, f"{where} ({kind} {name})")
    obj = _describe(kind, namespace, name)
    key: Key = (kind, namespace or "", name)

    errors = []
    if doc.get("apiVersion") != api_version:
        errors.append(("apiVersion", f"{kind} is served as {api_version!r}, not {doc.get('apiVersion')!r}"))
    body = copy.deepcopy(doc)
    if namespaced:
        body["metadata"]["namespace"] = namespace
    errors += _label_errors(meta.get("labels"), "metadata.labels")
    if kind in _CHECKS:
        errors += _CHECKS[kind](body)
    if not errors and kind in POLICY_KINDS:
        errors += _policy_errors(kind, namespace, name, body)
    if errors:
        return None, [ManifestError(source, obj, f, m, document, key) for f, m in errors]
    labels = dict(meta.get("labels") or {})
    return Resource(kind, namespace, name, labels, body, source), []


def _syntax_error(source: str, e: Exception) -> ManifestSyntaxError:
    if isinstance(e, json.JSONDecodeError):
        text = f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
    elif isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        problem = "; ".join(p for p in (e.context, e.problem) if p)
        text = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    else:
        text = f"invalid YAML: {e}"
    return ManifestSyntaxError(source, "", "", text)


def parse_documents(text: str, source: str) -> tuple[list[Resource], list[ValidationError]]:
    """Parses a multi-document YAML text (JSON when `source` ends in .json: one object or a
    list). `kind: List` documents are expanded. The same object may appear twice in the
    result; ManifestsSource reports duplicates across the whole directory."""
    try:
        if source.endswith(".json"):
            loaded = json.loads(text)
            docs = loaded if isinstance(loaded, list) else [loaded]
        else:
            docs = list(yaml.safe_load_all(text))
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        return [], [_syntax_error(source, e)]

    resources: list[Resource] = []
    errors: list[ValidationError] = []
    for index, doc in enumerate(docs, start=1):
        if doc is None:  # an empty document, e.g. a trailing '---'
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items")
            if not isinstance(items, list):
                errors.append(ManifestError(source, f"document {index} (List)", "items", "must be a list", index))
                continue
            pieces = [(item, f"document {index} item {i}") for i, item in enumerate(items)]
        else:
            pieces = [(doc, f"document {index}")]
        for item, where in pieces:
            res, errs = _parse_object(item, source, where, index)
            if res is not None:
                resources.append(res)
            errors += errs
    return resources, errors


# -- the directory source --------------------------------------------------------------

@dataclass
class SyncResult:
    upserted: list[Key] = field(default_factory=list)
    deleted: list[Key] = field(default_factory=list)
    errors: list[ValidationError] = field(default_factory=list)


@dataclass
class _Definition:
    res: Resource
    kept: bool  # the previous version, standing in for an invalid or unreadable one


class ManifestsSource:
    def __init__(self, directory: str, store: Store):
        self.directory = directory
        self.store = store
        self.errors: list[ValidationError] = []
        self.syncs = 0
        self._current: dict[Key, Resource] = {}
        self._fingerprint: tuple | None = None
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _files(self) -> list[str]:
        names = sorted(n for n in os.listdir(self.directory)
                       if n.endswith(SUFFIXES) and not n.startswith("."))
        return [p for p in (os.path.join(self.directory, n) for n in names) if os.path.isfile(p)]

    def fingerprint(self) -> tuple:
        """Changes whenever a file is added, removed, replaced or rewritten."""
        out = []
        try:
            paths = self._files()
        except OSError as e:
            return (("error", str(e)),)
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append((path, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def sync_once(self) -> SyncResult:
        with self._sync_lock:
            return self._sync()

    def _sync(self) -> SyncResult:
        # Taken before reading, so a write racing with this pass shows up as a change
        # on the next poll and gets its own pass.
        self._fingerprint = self.fingerprint()
        result = SyncResult()
        errors: list[ValidationError] = []
        defs: dict[Key, list[_Definition]] = {}

        def keep_from(path: str) -> int:
            kept = [r for r in self._current.values() if r.source == path]
            for r in kept:
                defs.setdefault(r.key, []).append(_Definition(r, True))
            return len(kept)

        try:
            paths = self._files()
        except OSError as e:
            # Without a listing we cannot tell a deleted file from a vanished directory;
            # deleting every object would be the worst reading of it.
            errors.append(ValidationError(self.directory, "", "", f"cannot list the directory: {e}"))
            for path in {r.source for r in self._current.values()}:
                keep_from(path)
            paths = []

        for path in paths:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                continue  # removed since the listing: its objects go
            except (OSError, UnicodeDecodeError) as e:
                n = keep_from(path)
                errors.append(ManifestSyntaxError(path, "", "", f"cannot read the file: {e}{_kept_note(n)}"))
                continue
            resources, errs = parse_documents(text, path)
            for e in errs:
                if isinstance(e, ManifestSyntaxError):
                    n = keep_from(path)
                    errors.append(ManifestSyntaxError(e.source, e.obj, e.field, e.message + _kept_note(n)))
                    continue
                key = getattr(e, "key", None)
                if key is not None and key in self._current:
                    defs.setdefault(key, []).append(_Definition(self._current[key], True))
                errors.append(e)
            for r in resources:
                defs.setdefault(r.key, []).append(_Definition(r, False))

        desired: dict[Key, Resource] = {}
        kept_keys: set[Key] = set()
        duplicates: list[ValidationError] = []
        for key, candidates in defs.items():
            fresh = [d.res for d in candidates if not d.kept]
            if not fresh:
                desired[key] = candidates[0].res
                kept_keys.add(key)
                continue
            previous = self._current.get(key)
            winner = next((r for r in fresh if previous and r.source == previous.source), fresh[0])
            desired[key] = winner
            duplicates += [ManifestError(r.source, r.describe(), "",
                                         f"also defined in {winner.source}; this definition is ignored", key=key)
                           for r in fresh if r is not winner]

        # Say which invalid objects are still in effect in their previous version.
        final_errors = []
        for e in errors:
            key = getattr(e, "key", None)
            if key in kept_keys and not isinstance(e, ManifestSyntaxError):
                e = ManifestError(e.source, e.obj, e.field,
                                  e.message + " (the previous valid version stays in effect)", e.document, key)
            final_errors.append(e)
        final_errors += duplicates

        def order(k: Key):
            return (_KIND_ORDER.get(k[0], len(_KIND_ORDER)), k)

        for key in sorted(set(self._current) - set(desired), key=order, reverse=True):
            self.store.delete(key)
            result.deleted.append(key)
        for key in sorted(desired, key=order):
            if self._current.get(key) != desired[key]:
                self.store.upsert(desired[key])
                result.upserted.append(key)
        self._current = desired
        self.errors = final_errors
        self.syncs += 1
        result.errors = final_errors
        for e in final_errors:
            log.warning("manifest error: %s", e)
        if result.upserted or result.deleted:
            log.info("manifests %s: %d upserted, %d deleted, %d errors", self.directory,
                     len(result.upserted), len(result.deleted), len(final_errors))
        return result

    def start(self, interval: float = 0.2) -> None:
        """Loads the directory once (so the caller starts from a synced store), then
        watches it from a thread."""
        self.sync_once()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="manifests", daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                if self.fingerprint() != self._fingerprint:
                    self.sync_once()
            except Exception:  # noqa: BLE001 - keep watching; the next change may fix it
                log.exception("manifests sync of %s failed", self.directory)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _kept_note(n: int) -> str:
    if not n:
        return ""
    return f" (the {n} object{'s' if n != 1 else ''} last loaded from this file stay{'s' if n == 1 else ''} in effect)"
