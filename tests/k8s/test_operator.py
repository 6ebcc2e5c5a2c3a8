"""The operator against the real API server: leader election on a Lease, cluster-pool IPAM on
CiliumNodes, identity GC on CiliumIdentities and CiliumEndpoints."""

from __future__ import annotations

import threading
import time

import pytest

from cilium_py.k8s.client import Kube
from cilium_py.operator.app import Operator, OperatorConfig
from cilium_py.operator.leader import LEASE_NAME, LeaderElectionConfig, parse_micro_time
from tests.unit.waiting import poll

# Short, and in the proportions of Cilium's 15 s / 10 s / 2 s.
ELECTION = LeaderElectionConfig(lease_duration=3.0, renew_deadline=2.0, retry_period=0.25)


def leader_only_config(namespace: str, **overrides) -> OperatorConfig:
    return OperatorConfig(namespace=namespace, leader_election=ELECTION, pool=None,
                          identity_gc_interval=0, install_crds=False, **overrides)


class LeaderWatch:
    """Samples who leads every few milliseconds, in the background, to catch two leaders at
    once if it ever happens."""

    def __init__(self, operators):
        self.operators = operators
        self.overlaps = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.samples += 1
            if sum(op.is_leading() for op in self.operators) > 1:
                self.overlaps += 1

    def stop(self):
        self._stop.set()
        self._thread.join()


def lease_spec(kube, namespace):
    return kube.get("Lease", LEASE_NAME, namespace)["spec"]


@pytest.fixture
def operators():
    started = []
    yield started
    for op in started:
        op.stop()
        op.kube.close()


def test_one_leader_and_a_released_lease_is_taken_over_at_once(control_plane, kube, namespace, operators):
    a = Operator(control_plane.admin(), leader_only_config(namespace))
    b = Operator(control_plane.admin(), leader_only_config(namespace))
    operators += [a, b]
    a.start()
    b.start()
    watch = LeaderWatch([a, b])
    try:
        assert poll(lambda: a.is_leading() or b.is_leading(), 30)
        leader, standby = (a, b) if a.is_leading() else (b, a)
        assert lease_spec(kube, namespace)["holderIdentity"] == leader.identity
        # The standby sees the leader, and a renewal later it still waits.
        assert poll(lambda: standby.elector.observed_holder == leader.identity, 10)
        renewed = lease_spec(kube, namespace)["renewTime"]
        assert poll(lambda: lease_spec(kube, namespace)["renewTime"] != renewed, 10)
        assert not standby.is_leading()

        before = lease_spec(kube, namespace)
        stopped = time.monotonic()
        leader.stop()                      # clean stop: releases the lease
        assert not leader.is_leading()
        assert poll(standby.is_leading, 30)
        handover = time.monotonic() - stopped
    finally:
        watch.stop()
    after = lease_spec(kube, namespace)
    assert after["holderIdentity"] == standby.identity
    assert after["leaseTransitions"] == before["leaseTransitions"] + 1
    # Taken before the old lease would have run out: the release, not the expiry, let it in.
    assert parse_micro_time(after["acquireTime"]) < (parse_micro_time(before["renewTime"])
                                                     + before["leaseDurationSeconds"])
    assert watch.overlaps == 0 and watch.samples > 0
    print(f"\nhandover after a release: {handover:.2f}s")


def test_a_leader_cut_off_stops_before_the_next_one_starts(control_plane, kube, namespace, proxy,
                                                           tmp_path, operators):
    cut_off = Operator(Kube(proxy.write_kubeconfig(control_plane.admin_kubeconfig,
                                                   str(tmp_path / "proxied"))),
                       leader_only_config(namespace))
    operators.append(cut_off)
    stopped_leading = threading.Event()
    cut_off.elector._on_stopped = lambda: (cut_off._stopped_leading(), stopped_leading.set())
    cut_off.start()
    assert poll(cut_off.is_leading, 30)
    standby = Operator(control_plane.admin(), leader_only_config(namespace))
    operators.append(standby)
    standby.start()
    assert poll(lambda: standby.elector.observed_holder == cut_off.identity, 30)

    watch = LeaderWatch([cut_off, standby])
    try:
        before = lease_spec(kube, namespace)
        proxy.pause()                       # the leader's connections break and are refused
        paused = time.monotonic()
        assert poll(standby.is_leading, 60)
        handover = time.monotonic() - paused
    finally:
        watch.stop()
    assert stopped_leading.is_set() and not cut_off.is_leading()
    after = lease_spec(kube, namespace)
    assert after["holderIdentity"] == standby.identity
    # Taken only once the lease had run out (its last renewal was `before`'s or later).
    assert parse_micro_time(after["acquireTime"]) > (parse_micro_time(before["renewTime"])
                                                     + before["leaseDurationSeconds"])
    assert watch.overlaps == 0 and watch.samples > 0
    print(f"\nhandover from a cut-off leader: {handover:.2f}s "
          f"(lease {ELECTION.lease_duration:g}s, renew deadline {ELECTION.renew_deadline:g}s)")

    proxy.resume()   # back on the network: a candidate again, not a second leader
    assert poll(lambda: cut_off.elector.observed_holder == standby.identity, 30)
    assert not cut_off.is_leading()

