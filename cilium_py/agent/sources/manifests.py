"""The manifests-directory source: the YAML a user would `kubectl apply`, read from files.

`parse_documents` turns one file's text into typed objects plus errors that name
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

Every document goes through its kind's parser (cilium_py.agent.objects), the same one
`ciliumpy policy validate` and every other source use; what is stored is the typed object
it builds, never the document, and the document is not changed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field

import yaml

from cilium_py.agent.errors import InvalidObject, ValidationError
from cilium_py.agent.objects import CLASSES, DEFAULT_NAMESPACE, KIND_ORDER, describe, parse_object
from cilium_py.agent.store import Key, Resource, Store

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


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


def _parse_object(doc, source: str, where: str, document: int) -> tuple[Resource | None, list[ManifestError]]:
    try:
        return parse_object(doc, source, where), []
    except InvalidObject as e:
        return None, [ManifestError(err.source, err.obj, err.field, err.message, document, e.key)
                      for err in e.errors]
    except Exception as e:  # noqa: BLE001 - a parser bug must not stop the source
        log.exception("parser failed on %s in %s", where, source)
        key = _guess_key(doc)
        obj = describe(*key) if key else where
        return None, [ManifestError(source, obj, "", f"internal error while validating the object: {e}",
                                    document, key)]


def _guess_key(doc) -> Key | None:
    """The store key a document names, for keeping its previous version in effect when
    its parser failed; None when it names none."""
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in CLASSES or not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    namespace = (meta.get("namespace") or DEFAULT_NAMESPACE) if CLASSES[kind].namespaced else ""
    return (kind, str(namespace), meta["name"])


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
            return (KIND_ORDER.get(k[0], len(KIND_ORDER)), k)

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
