"""The operator against the real API server: leader election on a Lease, cluster-pool IPAM on
CiliumNodes, identity GC on CiliumIdentities and CiliumEndpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cilium_py.k8s.client import ApiError, Kube
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


def test_the_command_leads_and_releases_the_lease_on_sigterm(control_plane, kube, namespace, cilium_crds):
    argv = [sys.executable, "-m", "cilium_py.cli.main", "operator", "--kubeconfig",
            control_plane.admin_kubeconfig, "--namespace", namespace,
            "--leader-election-lease-duration", "3s", "--leader-election-renew-deadline", "2s",
            "--leader-election-retry-period", "250ms", "--identity-gc-interval", "0"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo}

    def holder():
        return lease_spec(kube, namespace)["holderIdentity"] if kube.get_or_none(
            "Lease", LEASE_NAME, namespace) else None

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The holder identity is hostname_pid_random: this process's.
        assert poll(lambda: f"_{proc.pid}_" in (holder() or "") or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read()
    assert holder() == "", output          # released on the way out
    assert "started leading" in output and "stopped leading: stopping" in output


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



# -- cluster-pool IPAM on CiliumNodes ------------------------------------------------------

POOL_CIDR = "10.77.0.0/22"     # four /24 blocks
SCOPE = "ciliumpy.test/scope"  # the label that keeps each test's objects its own


@pytest.fixture
def cilium_nodes(kube):
    """Creates labelled CiliumNodes (cluster-scoped: deleted after the test)."""
    created = []

    def make(name: str, scope: str, pod_cidrs=None) -> dict:
        spec = {"ipam": {"podCIDRs": list(pod_cidrs)}} if pod_cidrs else {}
        created.append(name)
        return kube.create("CiliumNode", {"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                                          "metadata": {"name": name, "labels": {SCOPE: scope}},
                                          "spec": spec})
    yield make
    for name in created:
        kube.delete("CiliumNode", name, missing_ok=True)


def ipam_config(namespace: str, **overrides) -> OperatorConfig:
    from cilium_py.operator.ipam import ClusterPool

    settings = dict(namespace=namespace, leader_election=ELECTION,
                    pool=ClusterPool.parse([POOL_CIDR], 24), identity_gc_interval=0,
                    install_crds=False, resync_interval=1.0, label_selector=f"{SCOPE}={namespace}")
    settings.update(overrides)
    return OperatorConfig(**settings)


def pod_cidrs(kube, name):
    return tuple(((kube.get("CiliumNode", name).get("spec") or {}).get("ipam") or {}).get("podCIDRs") or ())


def ipam_error(kube, name):
    from cilium_py.operator.ipam import operator_error

    return operator_error(kube.get("CiliumNode", name))


def test_ipam_gives_four_nodes_the_pool_then_reports_exhaustion_and_reuses_a_freed_block(
        control_plane, kube, namespace, cilium_crds, cilium_nodes, operators):
    # No resync within the test: every pass after the first is the watch's doing.
    op = Operator(control_plane.admin(), ipam_config(namespace, install_crds=True, resync_interval=600))
    operators.append(op)
    op.start()
    assert poll(op.crds_installed.is_set, 60)   # installed already: found unchanged
    names = [f"{namespace}-n{i}" for i in range(1, 6)]
    for name in names[:4]:
        cilium_nodes(name, namespace)
    assert poll(lambda: all(pod_cidrs(kube, n) for n in names[:4]), 30)
    given = {n: pod_cidrs(kube, n) for n in names[:4]}
    assert sorted(c for (c,) in given.values()) == ["10.77.0.0/24", "10.77.1.0/24", "10.77.2.0/24",
                                                    "10.77.3.0/24"]
    assert all(ipam_error(kube, n) == "" for n in names[:4])

    cilium_nodes(names[4], namespace)
    assert poll(lambda: "exhausted" in ipam_error(kube, names[4]), 30)
    assert pod_cidrs(kube, names[4]) == ()
    assert POOL_CIDR in ipam_error(kube, names[4])

    freed = given[names[1]]
    kube.delete("CiliumNode", names[1])
    assert poll(lambda: pod_cidrs(kube, names[4]) == freed, 30)
    assert poll(lambda: ipam_error(kube, names[4]) == "", 30)

    # A new leader (this one stopped) rebuilds the allocation from the nodes: nothing moves.
    op.stop()
    before = {n: pod_cidrs(kube, n) for n in names if n != names[1]}
    successor = Operator(control_plane.admin(), ipam_config(namespace))
    operators.append(successor)
    successor.start()
    assert poll(lambda: successor.term is not None and successor.term.ipam.stats.passes >= 1, 30)
    assert {n: pod_cidrs(kube, n) for n in before} == before
    assert successor.term.ipam.stats.spec_writes == 0


def test_ipam_reports_claims_outside_the_pool_or_clashing_and_leaves_them(
        control_plane, kube, namespace, cilium_crds, cilium_nodes, operators):
    first, clash, outside = (f"{namespace}-{s}" for s in ("first", "clash", "outside"))
    cilium_nodes(first, namespace, ["10.77.2.0/24"])
    op = Operator(control_plane.admin(), ipam_config(namespace))
    operators.append(op)
    op.start()
    assert poll(lambda: op.term is not None and op.term.ipam.stats.passes >= 1, 30)
    cilium_nodes(clash, namespace, ["10.77.2.0/24"])
    cilium_nodes(outside, namespace, ["10.88.0.0/24"])
    assert poll(lambda: ipam_error(kube, clash) == f"podCIDR 10.77.2.0/24 is already allocated to node {first}", 30)
    assert poll(lambda: "outside the cluster pool" in ipam_error(kube, outside), 30)
    assert pod_cidrs(kube, clash) == ("10.77.2.0/24",) and pod_cidrs(kube, outside) == ("10.88.0.0/24",)
    assert ipam_error(kube, first) == ""
    assert op.term.ipam.allocator.owners() == {"10.77.2.0/24": first}


# -- identity GC ---------------------------------------------------------------------------

HEARTBEAT = "io.cilium.heartbeat"


@pytest.fixture
def identities(kube):
    """Creates CiliumIdentities with numbers of this test's own (cluster-scoped: deleted after)."""
    import random

    created = []

    def make(scope: str) -> str:
        while True:
            name = str(random.randint(100_000, 16_000_000))
            try:
                kube.create("CiliumIdentity", {
                    "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
                    "metadata": {"name": name, "labels": {SCOPE: scope,
                                                          "io.kubernetes.pod.namespace": scope}},
                    "security-labels": {"k8s:app": f"app-{name}",
                                        "k8s:io.kubernetes.pod.namespace": scope}})
            except ApiError as e:
                if e.conflict:   # a number someone else has: draw another
                    continue
                raise
            created.append(name)
            return name
    yield make
    for name in created:
        kube.delete("CiliumIdentity", name, missing_ok=True)


def endpoint_using(kube, namespace: str, identity: str) -> None:
    kube.create("CiliumEndpoint", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
        "metadata": {"name": f"pod-{identity}", "namespace": namespace},
        "status": {"identity": {"id": int(identity)},
                   "networking": {"addressing": [{"ipv4": "10.77.0.10"}]}}}, namespace)


def annotations(kube, name):
    doc = kube.get_or_none("CiliumIdentity", name)
    return None if doc is None else (doc["metadata"].get("annotations") or {})


def test_identity_gc_deletes_an_unused_identity_after_the_grace_and_keeps_a_referenced_one(
        control_plane, kube, namespace, cilium_crds, identities, operators):
    unused, used = identities(namespace), identities(namespace)
    endpoint_using(kube, namespace, used)
    op = Operator(control_plane.admin(), OperatorConfig(
        namespace=namespace, leader_election=ELECTION, pool=None, install_crds=False,
        identity_gc_interval=0.2, identity_heartbeat_timeout=1.0, label_selector=f"{SCOPE}={namespace}"))
    operators.append(op)
    op.start()
    # The GC counts a delete once the API server has answered it, so the object can be gone
    # a moment before the count moves: wait for both.
    assert poll(lambda: annotations(kube, unused) is None and op.term.gc.stats.deleted == 1, 60)
    stats = op.term.gc.stats
    assert stats.marked >= 1 and stats.deleted == 1      # marked on one run, deleted on a later one
    assert stats.runs >= 3
    assert annotations(kube, used) is not None and HEARTBEAT not in annotations(kube, used)


def test_identity_gc_delete_fails_safely_when_an_agent_unmarks_it_meanwhile(
        control_plane, kube, namespace, cilium_crds, identities):
    from cilium_py.operator.identitygc import Action, IdentityGC

    name = identities(namespace)
    gc = IdentityGC(kube, interval=1, heartbeat_timeout=30, label_selector=f"{SCOPE}={namespace}")
    t0 = time.time()
    assert gc.run_once(now=t0) == []                        # first sight: alive
    marked = gc.run_once(now=t0 + 31)
    assert [(d.action, d.identity.name) for d in marked] == [(Action.MARK, name)]
    stamp = annotations(kube, name)[HEARTBEAT]
    assert stamp.endswith("Z") and stamp.startswith(time.strftime("%Y-", time.gmtime(t0 + 31)))

    decisions = gc.plan(now=t0 + 32)
    assert [(d.action, d.identity.name) for d in decisions] == [(Action.DELETE, name)]
    # An agent takes a reference meanwhile: it removes the mark (a new resourceVersion).
    doc = kube.get("CiliumIdentity", name)
    del doc["metadata"]["annotations"][HEARTBEAT]
    kube.replace("CiliumIdentity", doc)
    gc.apply(decisions, now=t0 + 32)
    assert annotations(kube, name) is not None, "deleted although an agent un-marked it"
    assert HEARTBEAT not in annotations(kube, name)
    assert gc.stats.conflicts == 1 and gc.stats.deleted == 0
    # The agent's change counts as alive: the next run decides nothing.
    assert gc.run_once(now=t0 + 33) == []
