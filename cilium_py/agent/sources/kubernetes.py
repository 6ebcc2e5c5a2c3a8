"""The Kubernetes source: the objects of a cluster, listed and watched through the API server,
in the same store the manifests source feeds. Everything after the source is shared.

One reflector thread per kind, in the manner of client-go's:

* **List** page by page (`limit`, continue tokens), without a resourceVersion, so the answer
  is the current state. A continue token that expired (410) restarts the list from the
  first page. The list *replaces* what the store holds of that kind: objects missing from
  it are deleted, which is how deletions missed while not watching are reconciled.
* **Watch** from the list's resourceVersion with bookmarks, recording the resourceVersion of
  every event and bookmark. A watch the server ends (its timeout) is re-opened at once from
  the last one; a broken connection, a 5xx or a 429 re-opens it from the last one after a
  backoff (0.2 s doubling to 30 s, reset by the next event or list); 410 Gone, as the answer
  to the request or as an ERROR event in the stream, means the server no longer has that
  history: relist. Any other refusal (403, 404, ...) relists after the backoff.
* A kind whose collection the server does not serve (404 on the list: its CRD is not
  installed) is "absent": nothing of it in the store, logged once, and listed again with
  the same backoff until it appears.
* Kinds without a parser in cilium_py.agent.objects are skipped (logged once).

Every object goes through its kind's parser, as in the manifests source, with the same rule
for mistakes: an object whose new version is rejected keeps its last valid version in the
store (an object never valid is not stored), and `errors` names the object and the field.

Pods: with `node_name`, only the pods scheduled to that node are watched (field selector
`spec.nodeName=<node>`), as Cilium's agent does. The endpoint controller handles only its
node's pods; the service manager derives backends from pods only with
`derive_endpoint_slices`, which is off with this source (the endpointslice controller
publishes slices); remote pods' identities come from CiliumEndpoints. Without `node_name`
every pod is watched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from cilium_py.agent.errors import InvalidObject, ValidationError
from cilium_py.agent.objects import PARSERS, describe, parse_object
from cilium_py.agent.reconcile import Backoff
from cilium_py.agent.store import Key, Resource, Store
from cilium_py.k8s.client import ApiError, Kube, WatchStream
from cilium_py.k8s.resources import WATCHED_KINDS, ApiResource, resource

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
PAGE_SIZE = 500
WATCH_TIMEOUT = 300   # seconds the server keeps one watch open

# Connection states, as `ciliumpy status` shows them.
LISTING, WATCHING, BACKOFF, ABSENT, SKIPPED, STOPPED = (
    "listing", "watching", "backoff", "absent", "skipped", "stopped")


class ObjectError(ValidationError):
    """A rejected object; `key` is its store key."""

    def __init__(self, source: str, obj: str, field: str, message: str, key: Key):
        self.key = key
        super().__init__(source, obj, field, message)


class _Stopped(Exception):
    pass


class Reflector:
    """Lists and watches one kind into the store (see the module docstring)."""

    def __init__(self, kube: Kube, store: Store, kind: str, *, source: str = SOURCE,
                 field_selector: str = "", page_size: int = PAGE_SIZE,
                 watch_timeout: int = WATCH_TIMEOUT, on_listed=None):
        self.kube, self.store, self.kind = kube, store, kind
        self.res: ApiResource = resource(kind)
        self.source = source
        self.field_selector = field_selector
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.synced = threading.Event()
        self._on_listed = on_listed or (lambda: None)
        self._stop = threading.Event()
        self._backoff = Backoff()
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None
        # What this reflector put in the store, and the objects it currently rejects.
        self._current: dict[Key, Resource] = {}
        self._errors: dict[Key, list[ValidationError]] = {}
        self.state = STOPPED
        self.resource_version = ""
        self.last_event: float | None = None   # wall-clock time of the last event or bookmark
        self.events = 0          # ADDED, MODIFIED and DELETED events
        self.bookmarks = 0
        self.lists = 0           # completed lists (the first one included)
        self.relists = 0         # lists after the first (410, refused watches, absent kinds)
        self.list_restarts = 0   # lists restarted because a continue token expired
        self.list_pages = 0      # pages of the last completed list
        self.watches = 0         # watch requests opened
        self.expired = 0         # watches answered 410 Gone (each followed by a relist)
        self.last_error = ""

    # -- thread ----------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"k8s-{self.kind}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Tells the thread to end and wakes it from a watch; stop() waits for it."""
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.state = STOPPED

    def _run(self) -> None:
        absent_logged = False
        while not self._stop.is_set():
            try:
                self.state = LISTING
                try:
                    self._list()
                except ApiError as e:
                    if not e.not_found:
                        raise
                    if not absent_logged:
                        log.warning("%s are not served by the API server (CRD not installed?); "
                                    "retrying with backoff", self.res.plural)
                        absent_logged = True
                    self.last_error = str(e)
                    self.state = ABSENT
                    self._replace([], {})   # no collection, no objects
                    self.synced.set()
                    self._pause()
                    continue
                if absent_logged:
                    log.info("%s are served now", self.res.plural)
                    absent_logged = False
                self._watch_until_relist()
            except _Stopped:
                break
            except ApiError as e:
                self._failed(e)
                try:
                    self._pause()
                except _Stopped:
                    break
            except Exception as e:  # noqa: BLE001 - the reflector must keep running
                log.exception("kubernetes source: %s failed", self.res.plural)
                self._failed(e)
                try:
                    self._pause()
                except _Stopped:
                    break
        self.state = STOPPED

    def _failed(self, e: Exception) -> None:
        self.last_error = str(e)
        self.state = BACKOFF
        log.warning("kubernetes source: %s: %s", self.res.plural, e)

    def _pause(self) -> None:
        if self._stop.wait(self._backoff.next()):
            raise _Stopped

    # -- list ------------------------------------------------------------------------

    def _list(self) -> None:
        if self.lists:
            self.relists += 1
        items: list[dict] = []
        token = ""
        pages = 0
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                page = self.kube.list(self.kind, limit=self.page_size, continue_token=token,
                                      field_selector=self.field_selector)
            except ApiError as e:
                if not (token and e.gone):
                    raise
                # The token outlived the server's history: start over at the current state.
                log.info("kubernetes source: %s: continue token expired, listing again", self.res.plural)
                self.list_restarts += 1
                items, token, pages = [], "", 0
                continue
            pages += 1
            items += page.get("items") or []
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                break
        self._replace(items, meta)
        self.lists += 1
        self.list_pages = pages
        self._backoff.reset()
        self.last_error = ""
        self._on_listed()
        self.synced.set()

    def _replace(self, items: list[dict], meta: dict) -> None:
        """Makes the store's objects of this kind those of the list."""
        current: dict[Key, Resource] = {}
        errors: dict[Key, list[ValidationError]] = {}
        for doc in items:
            doc.setdefault("kind", self.res.kind)
            doc.setdefault("apiVersion", self.res.api_version)
            key, res, errs = self._parse(doc)
            if res is not None:
                current[key] = res
            elif key in self._current:
                current[key] = self._current[key]
            if errs:
                errors[key] = errs
        for key in set(self._current) - set(current):
            self.store.delete(key)
        for key, res in current.items():
            self.store.upsert(res)
        with self._lock:
            self._current, self._errors = current, self._mark_kept(errors, current)
        self.resource_version = str(meta.get("resourceVersion") or "")

    # -- watch -----------------------------------------------------------------------

    def _watch_until_relist(self) -> None:
        """Watches (re-opening ended and broken watches) until a relist is needed."""
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._watch_once()
            except ApiError as e:
                if e.gone:
                    self.expired += 1
                    log.info("kubernetes source: %s: resourceVersion %s is gone, relisting",
                             self.res.plural, self.resource_version)
                    self.last_error = str(e)
                    return
                if not e.retryable:
                    raise   # the caller backs off and relists
                self._failed(e)
                self._pause()

    def _watch_once(self) -> None:
        stream = self.kube.watch(self.kind, self.resource_version, timeout_seconds=self.watch_timeout,
                                 field_selector=self.field_selector)
        with self._lock:
            self._stream = stream
        if self._stop.is_set():   # stop() ran before the stream was registered
            stream.close()
            raise _Stopped
        self.watches += 1
        self.state = WATCHING
        opened, seen = time.monotonic(), 0
        try:
            for event in stream:
                self._handle(event)
                seen += 1
        finally:
            with self._lock:
                self._stream = None
        if self._stop.is_set():
            raise _Stopped
        # The server ended the watch (its timeout): the caller opens the next one at once,
        # unless watches end as soon as they open, which must not spin.
        if not seen and time.monotonic() - opened < 1.0:
            self.state = BACKOFF
            self._pause()

    def _handle(self, event: dict) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        self.last_event = time.time()
        self._backoff.reset()
        self.last_error = ""
        if kind == "BOOKMARK":
            self.bookmarks += 1
        elif kind in ("ADDED", "MODIFIED"):
            self.events += 1
            self._apply(obj)
        elif kind == "DELETED":
            self.events += 1
            self._delete(self._key(meta))
        else:
            log.warning("kubernetes source: %s: unexpected watch event type %r", self.res.plural, kind)
        if rv:
            self.resource_version = str(rv)

    def _apply(self, doc: dict) -> None:
        key, res, errs = self._parse(doc)
        with self._lock:
            if res is not None:
                self._current[key] = res
                self._errors.pop(key, None)
            else:
                self._errors.update(self._mark_kept({key: errs}, self._current))
        if res is not None:
            self.store.upsert(res)
        else:
            for e in errs:
                log.warning("kubernetes source: rejected: %s", e)

    def _delete(self, key: Key) -> None:
        with self._lock:
            self._errors.pop(key, None)
            known = self._current.pop(key, None)
        if known is not None:
            self.store.delete(key)

    # -- parsing ---------------------------------------------------------------------

    def _key(self, meta: dict) -> Key:
        namespace = str(meta.get("namespace") or "") if self.res.namespaced else ""
        return (self.res.kind, namespace, str(meta.get("name") or ""))

    def _parse(self, doc: dict) -> tuple[Key, Resource | None, list[ValidationError]]:
        key = self._key(doc.get("metadata") or {})
        try:
            res = parse_object(doc, self.source)
        except InvalidObject as e:
            return key, None, [ObjectError(err.source, err.obj, err.field, err.message, key)
                               for err in e.errors]
        except Exception as e:  # noqa: BLE001 - a parser bug must not stop the source
            log.exception("parser failed on %s", describe(*key))
            return key, None, [ObjectError(self.source, describe(*key), "",
                                           f"internal error while validating the object: {e}", key)]
        return key, res, []

    def _mark_kept(self, errors: dict[Key, list[ValidationError]],
                   stored: dict[Key, Resource]) -> dict[Key, list[ValidationError]]:
        """The errors, saying so for objects whose previous valid version stays stored."""
        out = {}
        for key, errs in errors.items():
            if key in stored:
                errs = [ObjectError(e.source, e.obj, e.field,
                                    e.message + " (the previous valid version stays in effect)", key)
                        for e in errs]
            out[key] = errs
        return out

    # -- views -----------------------------------------------------------------------

    def errors(self) -> list[ValidationError]:
        with self._lock:
            return [e for key in sorted(self._errors) for e in self._errors[key]]

    def status(self) -> dict:
        with self._lock:
            objects, rejected = len(self._current), len(self._errors)
        return {"state": self.state, "synced": self.synced.is_set(), "objects": objects,
                "rejected": rejected, "resource_version": self.resource_version,
                "last_event": self.last_event, "events": self.events, "bookmarks": self.bookmarks,
                "lists": self.lists, "relists": self.relists, "list_restarts": self.list_restarts,
                "list_pages": self.list_pages,
                "watches": self.watches, "expired": self.expired, "last_error": self.last_error,
                "field_selector": self.field_selector}


class KubernetesSource:
    """Reflectors for `kinds` (default: every kind the agent watches) into `store`."""

    def __init__(self, kube: Kube, store: Store, kinds: Iterable[str] = WATCHED_KINDS, *,
                 node_name: str = "", source: str = SOURCE, page_size: int = PAGE_SIZE,
                 watch_timeout: int = WATCH_TIMEOUT):
        self.kube = kube
        self.store = store
        self.node_name = node_name
        self.kinds = tuple(kinds)
        self.skipped = tuple(k for k in self.kinds if k not in PARSERS)
        self._version: dict = {}
        self._version_error = ""
        self._version_lock = threading.Lock()
        self.reflectors: dict[str, Reflector] = {}
        for kind in self.kinds:
            resource(kind)   # an unknown kind is a programming error: fail here, not in a thread
            if kind in self.skipped:
                continue
            selector = f"spec.nodeName={node_name}" if kind == "Pod" and node_name else ""
            self.reflectors[kind] = Reflector(kube, store, kind, source=source, field_selector=selector,
                                              page_size=page_size, watch_timeout=watch_timeout,
                                              on_listed=self._refresh_version)

    def start(self) -> None:
        if self.skipped:
            log.info("kubernetes source: no parser yet for %s; not watched", ", ".join(self.skipped))
        for r in self.reflectors.values():
            r.start()

    def stop(self) -> None:
        for r in self.reflectors.values():   # all at once, then wait for each
            r.request_stop()
        for r in self.reflectors.values():
            r.stop()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once every kind was listed once (an absent kind counts: its answer was that
        there is none), False after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self.reflectors.values():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.synced.wait(remaining):
                return False
        return True

    @property
    def errors(self) -> list[ValidationError]:
        return [e for r in self.reflectors.values() for e in r.errors()]

    def _refresh_version(self) -> None:
        # After each list: a restarted API server may be another version.
        try:
            version = self.kube.version()
        except ApiError as e:
            with self._version_lock:
                self._version_error = str(e)
            return
        with self._version_lock:
            self._version, self._version_error = version, ""

    def status(self) -> dict:
        with self._version_lock:
            version, version_error = dict(self._version), self._version_error
        resources = {kind: r.status() for kind, r in self.reflectors.items()}
        resources.update({kind: {"state": SKIPPED, "synced": False, "last_error": "no parser for this kind"}
                          for kind in self.skipped})
        return {"api_server": {"host": self.kube.host, "version": version.get("gitVersion", ""),
                               "version_error": version_error},
                "node_name": self.node_name,
                "synced": all(r.synced.is_set() for r in self.reflectors.values()),
                "resources": resources}


__all__ = ["ObjectError", "KubernetesSource", "Reflector"]
