"""The operator process: install the CRDs, then, while it leads, run cluster-pool IPAM and
identity GC.

Every instance installs the CRDs (as Cilium's does, before the election: a standby must not
find them missing when it takes over). Leading is decided by the Lease (leader.py); on
starting to lead the controllers are built fresh, so a new leader rebuilds the allocation
from the CiliumNodes and starts the identity heartbeats from now; on stopping they are
stopped before anything else happens. Every write also asks `is_leading()`, a time check,
so a leader that cannot renew stops writing at its deadline even if a thread is slow to stop.

IPAM: a pass lists every CiliumNode; a watch on CiliumNodes prompts a pass at once, and a
pass runs every `resync_interval` regardless (see watch.py). Identity GC: one run per
`identity_gc_interval`, each listing CiliumEndpoints and CiliumIdentities.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from cilium_py.agent.reconcile import Backoff, Reconciler
from cilium_py.operator.identitygc import (DEFAULT_GC_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT,
                                           IdentityGC)
from cilium_py.operator.ipam import ClusterPool, IPAMController
from cilium_py.operator.leader import DEFAULT_NAMESPACE, LeaderElectionConfig, LeaderElector
from cilium_py.operator.watch import ChangeWatch
from cilium_py.signals import run_until_signalled

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 5.0   # seconds between IPAM passes with no change seen


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str = DEFAULT_NAMESPACE
    leader_election: LeaderElectionConfig = field(default_factory=LeaderElectionConfig)
    pool: ClusterPool | None = None               # None: IPAM off
    identity_gc_interval: float = DEFAULT_GC_INTERVAL   # 0: GC off
    identity_heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    resync_interval: float = RESYNC_INTERVAL
    install_crds: bool = True
    identity: str | None = None                   # the Lease holder id; default: unique
    # Limits the CiliumNodes and CiliumIdentities managed to those with these labels: for
    # tests sharing one API server (no flag; an operator manages the whole cluster).
    label_selector: str = ""


class _Term:
    """The controllers of one term as leader."""

    def __init__(self, kube, config: OperatorConfig, may_act):
        self.ipam = self.ipam_loop = self.node_watch = None
        if config.pool is not None:
            self.ipam = IPAMController(kube, config.pool, may_act=may_act,
                                       label_selector=config.label_selector)
            self.ipam_loop = Reconciler("operator-ipam", self.ipam.reconcile, ("nodes",),
                                        resync_interval=config.resync_interval)
            self.node_watch = ChangeWatch(kube, "CiliumNode", self.ipam_loop.bump,
                                          label_selector=config.label_selector)
        self.gc = IdentityGC(kube, interval=config.identity_gc_interval,
                             heartbeat_timeout=config.identity_heartbeat_timeout, may_act=may_act,
                             label_selector=config.label_selector)

    def start(self) -> None:
        if self.ipam_loop is not None:
            self.ipam_loop.start()
            self.node_watch.start()
        self.gc.start()

    def stop(self) -> None:
        if self.ipam_loop is not None:
            self.node_watch.stop()
            self.ipam_loop.stop()
        self.gc.stop()


class Operator:
    def __init__(self, kube, config: OperatorConfig = OperatorConfig()):
        self.kube = kube
        self.config = config
        self.elector = LeaderElector(kube, identity=config.identity, namespace=config.namespace,
                                     config=config.leader_election,
                                     on_started_leading=self._started_leading,
                                     on_stopped_leading=self._stopped_leading)
        self.term: _Term | None = None      # the controllers while leading
        self.crds_installed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def identity(self) -> str:
        return self.elector.identity

    def is_leading(self) -> bool:
        return self.elector.is_leading()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stops acting, then (release) hands the Lease back so a standby takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.elector.stop(release=release)

    def run_forever(self) -> None:
        run_until_signalled(self.start, self.stop)

    def _run(self) -> None:
        if self.config.install_crds:
            self._install_crds()
        if not self._stop.is_set():
            self.elector.start()

    def _install_crds(self) -> None:
        try:
            from cilium_py.operator import crds
        except ImportError:
            log.warning("CRD installation is not available in this build; expecting the CRDs "
                        "to be installed already")
            return
        backoff = Backoff(1.0, 30.0)
        while not self._stop.is_set():
            try:
                crds.install_crds(self.kube, crds.load_crds())
                self.crds_installed.set()
                return
            except Exception as e:  # noqa: BLE001 - ApiError, CRDError, a broken definition
                if not getattr(e, "retryable", False):
                    log.error("installing the CRDs failed, going on with what is installed: %s", e)
                    return
                delay = backoff.next()
                log.warning("installing the CRDs failed (%s); again in %.0fs", e, delay)
                self._stop.wait(delay)

    # -- leading ---------------------------------------------------------------------

    def _started_leading(self) -> None:
        self.term = _Term(self.kube, self.config, self.elector.is_leading)
        self.term.start()

    def _stopped_leading(self) -> None:
        term, self.term = self.term, None
        if term is not None:
            term.stop()

    def status(self) -> dict:
        term = self.term
        return {
            "identity": self.identity,
            "leading": self.is_leading(),
            "leader": self.elector.observed_holder,
            "ipam": vars(term.ipam.stats) if term and term.ipam else None,
            "identity_gc": vars(term.gc.stats) if term else None,
        }
