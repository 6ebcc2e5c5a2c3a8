"""Leader election through a coordination.k8s.io/v1 Lease, as Cilium's operator elects its
leader (`cilium-operator-resource-lock`; ours is `ciliumpy-operator-resource-lock`).

The rules, in the manner of client-go's lease lock:

* **Acquire.** No Lease: create it holding it (a 409 means another candidate created it
  first). A Lease held by no one (released) or expired (`renewTime + leaseDurationSeconds`
  before now): update it to hold it, with the resourceVersion read, so of two candidates
  only one update succeeds (the other gets 409 and keeps waiting). Otherwise wait and look
  again every retry period.
* **Renew.** The leader writes `renewTime` every retry period. It acts only while its last
  successful renewal is younger than the renew deadline (`is_leading()` is a time check, not
  a flag, so a renewal thread stuck in a request cannot keep it acting). As the renew deadline
  is shorter than the lease duration, the leader has stopped acting before any candidate can
  see the lease expired: never two leaders at once (on one clock; the times in the Lease are
  wall-clock times of the writer, so clocks skewed by more than the difference between the two
  durations would break this, as they would client-go's).
* **Lose.** A renewal that fails until the deadline, or a Lease found held by someone else,
  ends leading: `on_stopped_leading` runs (it must stop everything that acts), then the
  elector is a candidate again.
* **Release.** A clean stop stops acting first, then sets the holder empty (and the duration
  to 1 s), so a candidate takes over at its next retry instead of waiting out the lease.

Times in the Lease are MicroTime (RFC 3339 with microseconds, UTC).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum

from cilium_py.k8s.client import ApiError
from cilium_py.k8s.resources import resource

log = logging.getLogger(__name__)

LEASE_NAME = "ciliumpy-operator-resource-lock"
DEFAULT_NAMESPACE = "kube-system"
ACQUIRE_JITTER = 0.2   # candidates spread their retries by up to this fraction of the period


@dataclass(frozen=True)
class LeaderElectionConfig:
    """`--leader-election-lease-duration`, `-renew-deadline`, `-retry-period` (seconds)."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self):
        for name in ("lease_duration", "renew_deadline", "retry_period"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--leader-election-{name.replace('_', '-')} must be positive")
        if self.lease_duration < 1:
            raise ValueError("--leader-election-lease-duration must be at least 1s "
                             "(a Lease counts whole seconds)")
        if self.renew_deadline >= self.lease_duration:
            raise ValueError(f"--leader-election-renew-deadline ({self.renew_deadline:g}s) must be "
                             f"shorter than --leader-election-lease-duration ({self.lease_duration:g}s)")
        if self.retry_period * (1 + ACQUIRE_JITTER) >= self.renew_deadline:
            raise ValueError(f"--leader-election-retry-period ({self.retry_period:g}s) must be well "
                             f"shorter than --leader-election-renew-deadline ({self.renew_deadline:g}s)")

    @property
    def lease_duration_seconds(self) -> int:
        return math.ceil(self.lease_duration)


def new_identity() -> str:
    """A holder identity unique to this process: hostname, pid and a random part (a restarted
    process with a reused pid is still someone else)."""
    return f"{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(4)}"


def format_micro_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(value) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# -- the decision: pure, on the Lease document ---------------------------------------------

class Step(Enum):
    CREATE = "create"   # no Lease yet
    TAKE = "take"       # released or expired: update it to hold it
    RENEW = "renew"     # ours
    WAIT = "wait"       # someone else holds a valid lease


def lease_holder(lease: dict | None) -> str:
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def lease_expired(lease: dict, now: float) -> bool:
    """No holder, or its last renewal plus the lease duration is before `now`. A Lease whose
    times cannot be read counts as expired (it cannot prove anyone holds it)."""
    spec = lease.get("spec") or {}
    if not spec.get("holderIdentity"):
        return True
    renewed = parse_micro_time(spec.get("renewTime") or spec.get("acquireTime"))
    try:
        duration = float(spec.get("leaseDurationSeconds"))
    except (TypeError, ValueError):
        return True
    return renewed is None or renewed + duration < now


def next_step(lease: dict | None, identity: str, now: float) -> Step:
    if lease is None:
        return Step.CREATE
    if lease_holder(lease) == identity:
        return Step.RENEW
    return Step.TAKE if lease_expired(lease, now) else Step.WAIT


def lease_for(step: Step, lease: dict | None, *, name: str, namespace: str, identity: str,
              now: float, duration_seconds: int) -> dict:
    """The Lease to write for `step` (CREATE, TAKE or RENEW)."""
    stamp = format_micro_time(now)
    if step is Step.CREATE:
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"holderIdentity": identity, "leaseDurationSeconds": duration_seconds,
                         "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}}
    body = copy.deepcopy(lease)
    spec = body.setdefault("spec", {})
    if step is Step.TAKE:
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec["acquireTime"] = stamp
    spec.update(holderIdentity=identity, leaseDurationSeconds=duration_seconds, renewTime=stamp)
    return body


def released(lease: dict, now: float) -> dict:
    body = copy.deepcopy(lease)
    body.setdefault("spec", {}).update(holderIdentity="", leaseDurationSeconds=1,
                                       renewTime=format_micro_time(now))
    return body


# -- the elector ---------------------------------------------------------------------------

class LeaderElector:
    """Runs the election in its own thread (see the module docstring). The callbacks run in
    that thread: `on_started_leading` should start work and return; `on_stopped_leading` must
    have stopped it when it returns."""

    def __init__(self, kube, *, identity: str | None = None, namespace: str = DEFAULT_NAMESPACE,
                 config: LeaderElectionConfig = LeaderElectionConfig(), lease_name: str = LEASE_NAME,
                 on_started_leading: Callable[[], object] = lambda: None,
                 on_stopped_leading: Callable[[], object] = lambda: None,
                 wall_clock: Callable[[], float] = time.time):
        self.kube = kube
        self.identity = identity or new_identity()
        self.namespace = namespace
        self.config = config
        self.lease_name = lease_name
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._now = wall_clock
        self._res = resource("Lease")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._leading = False            # the callbacks' state (this thread only)
        self._valid_until = 0.0          # monotonic: act only before this
        self._lease: dict | None = None  # the last Lease read or written
        self.observed_holder = ""
        self.transitions = 0             # times this elector started leading

    # -- public ----------------------------------------------------------------------

    def is_leading(self) -> bool:
        return time.monotonic() < self._valid_until

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stops leading (callback first: stop acting), then releases the Lease when asked. With
        `release=False` the Lease runs out by itself, as when the process dies."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.renew_deadline + 30)
            self._thread = None
        was_leading = self._leading
        self._stop_leading("stopping")
        if release and was_leading:
            self._release()

    # -- loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                held = self._try_acquire_or_renew()
            except ApiError as e:
                held = None
                log.warning("leader election: %s", e)
            except Exception:  # noqa: BLE001 - the elector must keep running
                held = None
                log.exception("leader election failed")
            if held:
                self._valid_until = started + self.config.renew_deadline
                if not self._leading:
                    self._start_leading()
            elif held is False:
                # The Lease is someone else's: stop now, no need to wait for the deadline.
                self._valid_until = 0.0
                self._stop_leading(f"the lease is held by {self.observed_holder!r}")
            elif self._leading and not self.is_leading():
                self._stop_leading(f"could not renew the lease within {self.config.renew_deadline:g}s")
            period = self.config.retry_period
            if not self._leading:
                period *= 1 + random.random() * ACQUIRE_JITTER
            self._stop.wait(period)

    def _try_acquire_or_renew(self) -> bool | None:
        """True: we hold the lease now. False: someone else does. None: unknown (a refused
        update, an API error), decided by the deadline."""
        timeout = self._request_timeout()
        lease = self._get(timeout)
        now = self._now()
        step = next_step(lease, self.identity, now)
        self._observe(lease_holder(lease))
        if step is Step.WAIT:
            return False
        body = lease_for(step, lease, name=self.lease_name, namespace=self.namespace,
                         identity=self.identity, now=now,
                         duration_seconds=self.config.lease_duration_seconds)
        try:
            if step is Step.CREATE:
                written = self.kube.request("POST", self._res.path(self.namespace), body=body,
                                            timeout=timeout, what=f"create Lease {self._where()}")
            else:
                written = self.kube.request("PUT", self._res.path(self.namespace, self.lease_name),
                                            body=body, timeout=timeout,
                                            what=f"update Lease {self._where()}")
        except ApiError as e:
            if e.conflict:
                log.debug("leader election: %s: another candidate wrote first", step.value)
                return None
            raise
        self._lease = written
        self._observe(self.identity)
        return True

    def _request_timeout(self) -> float:
        """A leader's request must not outlive its deadline; a candidate's, its period."""
        if self._leading:
            return max(0.5, min(self.config.retry_period, self._valid_until - time.monotonic()))
        return max(0.5, self.config.retry_period)

    def _get(self, timeout: float) -> dict | None:
        try:
            lease = self.kube.request("GET", self._res.path(self.namespace, self.lease_name),
                                      timeout=timeout, what=f"get Lease {self._where()}")
        except ApiError as e:
            if e.not_found:
                return None
            raise
        self._lease = lease
        return lease

    def _observe(self, holder: str) -> None:
        if holder != self.observed_holder:
            log.info("leader election: %s is the leader%s", holder or "no one",
                     " (this operator)" if holder == self.identity else "")
            self.observed_holder = holder

    def _start_leading(self) -> None:
        self._leading = True
        self.transitions += 1
        log.info("leader election: %s started leading (%s)", self.identity, self._where())
        try:
            self._on_started()
        except Exception:  # noqa: BLE001 - a leader that cannot start work must not hold on
            log.exception("leader election: starting to lead failed; giving the lease up")
            self._valid_until = 0.0
            self._stop_leading("on_started_leading failed")
            self._release()

    def _stop_leading(self, why: str) -> None:
        if not self._leading:
            return
        self._leading = False
        self._valid_until = 0.0
        log.warning("leader election: %s stopped leading: %s", self.identity, why)
        try:
            self._on_stopped()
        except Exception:  # noqa: BLE001
            log.exception("leader election: on_stopped_leading failed")

    def _release(self) -> None:
        try:
            lease = self._get(self.config.retry_period)
            if lease is None or lease_holder(lease) != self.identity:
                return
            self.kube.request("PUT", self._res.path(self.namespace, self.lease_name),
                              body=released(lease, self._now()), timeout=self.config.retry_period,
                              what=f"release Lease {self._where()}")
            self._observe("")
        except ApiError as e:
            log.warning("leader election: releasing the lease failed (it expires in %ss): %s",
                        self.config.lease_duration_seconds, e)

    def _where(self) -> str:
        return f"{self.namespace}/{self.lease_name}"
