"""CiliumIdentity garbage collection, as Cilium's operator does it in CRD mode.

Every run (`--identity-gc-interval`, default 15m; 0 turns it off):

1. Identities referenced by a CiliumEndpoint (`status.identity.id`) are alive now. So is an
   identity seen for the first time, and one that changed since the last run other than by
   our own write (an agent creating it, or un-marking it: Cilium's "every upsert marks it
   alive"). The record of when each was last alive is in memory: a new leader starts with
   every identity alive, so nothing is deleted before a full timeout under the new leader.
2. An identity not alive for `--identity-heartbeat-timeout` (default 30m) and not marked gets
   the annotation `io.cilium.heartbeat` (RFC 3339 time, nanoseconds) by an update.
3. One already marked and still not alive on a later run is deleted with preconditions
   {uid, resourceVersion} of what this run listed: an agent that un-marked it meanwhile has
   moved the resourceVersion, and the delete fails (409) instead of removing an identity in
   use.
4. A marked identity that is alive again loses its mark (the agent normally does this; doing
   it here too means a later deletion always follows a fresh mark and a full run between).

Nothing is decided without the CiliumEndpoints: when they cannot be listed, the run does
nothing. The decision (`plan`) is pure; `IdentityGC` lists, plans and applies.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum

from cilium_py.k8s.client import ApiError

log = logging.getLogger(__name__)

HEARTBEAT_ANNOTATION = "io.cilium.heartbeat"
DEFAULT_GC_INTERVAL = 15 * 60.0
DEFAULT_HEARTBEAT_TIMEOUT = 30 * 60.0


def rfc3339_nano(t: float) -> str:
    """Go's RFC3339Nano in UTC (trailing zeros of the fraction dropped, as Go does)."""
    whole = int(t)
    nanos = int(round((t - whole) * 1e9))
    if nanos >= 10**9:
        whole, nanos = whole + 1, nanos - 10**9
    stamp = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


@dataclass(frozen=True)
class IdentityView:
    """What the GC reads of a CiliumIdentity."""

    name: str
    uid: str
    resource_version: str
    marked: bool

    @classmethod
    def of(cls, doc: dict) -> "IdentityView":
        meta = doc.get("metadata") or {}
        return cls(str(meta.get("name") or ""), str(meta.get("uid") or ""),
                   str(meta.get("resourceVersion") or ""),
                   HEARTBEAT_ANNOTATION in (meta.get("annotations") or {}))


def referenced_identities(endpoints: Iterable[dict]) -> set[str]:
    """The identity names (decimal ids) CiliumEndpoints name in status.identity.id."""
    names = set()
    for cep in endpoints:
        ident = ((cep.get("status") or {}).get("identity") or {}).get("id")
        if isinstance(ident, bool) or ident is None:
            continue
        try:
            names.add(str(int(ident)))
        except (TypeError, ValueError):
            continue
    return names


class Action(Enum):
    MARK = "mark"
    UNMARK = "unmark"
    DELETE = "delete"


@dataclass(frozen=True)
class Decision:
    action: Action
    identity: IdentityView


@dataclass
class Heartbeats:
    """When each identity was last alive, and the resourceVersion last seen of it."""

    last_alive: dict[str, float] = field(default_factory=dict)
    seen_version: dict[str, str] = field(default_factory=dict)
    our_versions: dict[str, str] = field(default_factory=dict)   # what our last write produced

    def wrote(self, name: str, resource_version: str) -> None:
        self.our_versions[name] = resource_version


def plan(identities: Iterable[IdentityView], referenced: set[str], heartbeats: Heartbeats,
         now: float, timeout: float) -> list[Decision]:
    """This run's decisions; updates `heartbeats` (aliveness) as it goes."""
    decisions: list[Decision] = []
    present = set()
    for ident in sorted(identities, key=lambda i: i.name):
        present.add(ident.name)
        seen = heartbeats.seen_version.get(ident.name)
        changed_by_others = (seen is None or (ident.resource_version != seen and
                             ident.resource_version != heartbeats.our_versions.get(ident.name)))
        if ident.name in referenced or changed_by_others:
            heartbeats.last_alive[ident.name] = now
        heartbeats.seen_version[ident.name] = ident.resource_version
        alive = now - heartbeats.last_alive[ident.name] <= timeout
        if alive:
            if ident.marked:
                decisions.append(Decision(Action.UNMARK, ident))
        elif ident.marked:
            decisions.append(Decision(Action.DELETE, ident))
        else:
            decisions.append(Decision(Action.MARK, ident))
    for book in (heartbeats.last_alive, heartbeats.seen_version, heartbeats.our_versions):
        for name in [n for n in book if n not in present]:
            del book[name]
    return decisions


@dataclass
class GCStats:
    runs: int = 0
    skipped: int = 0       # runs without the CiliumEndpoints
    marked: int = 0
    unmarked: int = 0
    deleted: int = 0
    conflicts: int = 0     # deletes or updates refused because the identity changed
    last_error: str = ""


class IdentityGC:
    """One run at a time (`run_once`), or a loop every `interval` (`start`/`stop`).
    `may_act` is asked before every write (the leader's time check). `clock` gives wall time:
    tests pass their own to step through the timeout without waiting for it. `label_selector`
    limits the CiliumIdentities it manages (tests sharing one API server)."""

    def __init__(self, kube, *, interval: float = DEFAULT_GC_INTERVAL,
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
                 may_act: Callable[[], bool] = lambda: True, clock: Callable[[], float] = time.time,
                 label_selector: str = ""):
        self.kube = kube
        self.label_selector = label_selector
        self.interval = interval
        self.heartbeat_timeout = heartbeat_timeout
        self._may_act = may_act
        self._clock = clock
        self.heartbeats = Heartbeats()
        self.stats = GCStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one run -----------------------------------------------------------------------

    def plan(self, now: float | None = None) -> list[Decision] | None:
        """Lists and decides; None when the CiliumEndpoints could not be listed."""
        try:
            endpoints, _ = self.kube.list_all("CiliumEndpoint")
        except ApiError as e:
            self.stats.skipped += 1
            self.stats.last_error = f"identity GC skipped: cannot list CiliumEndpoints: {e}"
            log.warning("%s", self.stats.last_error)
            return None
        identities, _ = self.kube.list_all("CiliumIdentity", label_selector=self.label_selector)
        now = self._clock() if now is None else now
        return plan((IdentityView.of(d) for d in identities), referenced_identities(endpoints),
                    self.heartbeats, now, self.heartbeat_timeout)

    def apply(self, decisions: list[Decision], now: float | None = None) -> None:
        now = self._clock() if now is None else now
        for decision in decisions:
            if not self._may_act():
                return
            ident = decision.identity
            try:
                if decision.action is Action.DELETE:
                    self.kube.delete("CiliumIdentity", ident.name, preconditions={
                        "uid": ident.uid, "resourceVersion": ident.resource_version})
                    self.stats.deleted += 1
                    log.info("identity GC: deleted CiliumIdentity %s (unused for over %gs)",
                             ident.name, self.heartbeat_timeout)
                else:
                    self._annotate(ident, now if decision.action is Action.MARK else None)
            except ApiError as e:
                if e.conflict or e.not_found:
                    # Changed meanwhile (an agent un-marked it, or it is gone): safe to skip.
                    self.stats.conflicts += 1
                    log.info("identity GC: CiliumIdentity %s changed meanwhile, left alone (%s)",
                             ident.name, e.reason)
                    continue
                raise

    def _annotate(self, ident: IdentityView, marked_at: float | None) -> None:
        """Sets (marked_at) or removes (None) the heartbeat annotation by an update with the
        resourceVersion listed."""
        doc = copy.deepcopy(self.kube.get("CiliumIdentity", ident.name))
        meta = doc.setdefault("metadata", {})
        if meta.get("resourceVersion") != ident.resource_version or meta.get("uid") != ident.uid:
            raise ApiError(409, "Conflict", "changed since listed")
        annotations = meta.setdefault("annotations", {})
        if marked_at is not None:
            annotations[HEARTBEAT_ANNOTATION] = rfc3339_nano(marked_at)
        else:
            annotations.pop(HEARTBEAT_ANNOTATION, None)
        written = self.kube.replace("CiliumIdentity", doc)
        self.heartbeats.wrote(ident.name, str((written.get("metadata") or {}).get("resourceVersion")))
        if marked_at is not None:
            self.stats.marked += 1
            log.info("identity GC: CiliumIdentity %s unused for over %gs, marked for deletion",
                     ident.name, self.heartbeat_timeout)
        else:
            self.stats.unmarked += 1

    def run_once(self, now: float | None = None) -> list[Decision]:
        with self._lock:
            self.stats.runs += 1
            decisions = self.plan(now)
            if decisions is None:
                return []
            self.apply(decisions, now)
            self.stats.last_error = ""
            return decisions

    # -- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        if self.interval <= 0:
            log.info("identity GC is off (--identity-gc-interval 0)")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="identity-gc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        # The first run right away: it records every identity alive (nothing is decided on
        # it), so the timeout counts from the start of leading.
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as e:  # noqa: BLE001 - reported; the next run tries again
                self.stats.last_error = str(e)
                log.warning("identity GC run failed: %s", e)
            self._stop.wait(self.interval)
