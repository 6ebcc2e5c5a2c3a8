"""The one reconcile loop: marks coalesce into one pass, a failed pass puts its keys back
and retries after a doubling backoff that resets on success, a key requeued alone comes
back on its own, revisions are realized in order, PermanentError waits for the next
change, and the resync hook runs when nothing changes."""

from __future__ import annotations

import threading

import pytest

from cilium_py.agent.reconcile import RETRY_MAX, RETRY_MIN, Backoff, PermanentError, Reconciler

from .waiting import poll


class Recorder:
    """A controller that records each pass and fails as told."""

    def __init__(self):
        self.passes: list[tuple[dict, int]] = []
        self.fail: list[Exception] = []   # raised by the next passes, in order

    def __call__(self, dirty, revision):
        self.passes.append(({k: set(v) for k, v in dirty.items()}, revision))
        if self.fail:
            raise self.fail.pop(0)
        return len(self.passes)


@pytest.fixture
def rec():
    return Recorder()


def test_marks_coalesce_into_one_pass_that_realizes_their_revision(rec):
    r = Reconciler("t", rec, ("pods", "policies"))
    assert (r.revision, r.realized_revision) == (1, 0)
    r.mark("pods", "a")
    r.mark("pods", "b", "a")
    last = r.mark("policies", "p")
    assert last == r.revision == 4
    assert r.run_once() == 1
    assert rec.passes == [({"pods": {"a", "b"}, "policies": {"p"}}, 4)]
    assert r.realized_revision == 4
    r.run_once()  # nothing marked since: an empty pass
    assert rec.passes[1] == ({"pods": set(), "policies": set()}, 4)


def test_a_failed_pass_puts_its_keys_back_and_reports(rec):
    r = Reconciler("t", rec, ("pods",))
    r.mark("pods", "a")
    rec.fail = [OSError(28, "No space left on device")]
    with pytest.raises(OSError):
        r.run_once()
    assert r.realized_revision == 0
    assert (r.status.runs, r.status.failures, r.status.consecutive_failures) == (1, 1, 1)
    assert "No space" in r.status.last_error
    r.mark("pods", "b")
    r.run_once()
    assert rec.passes[-1] == ({"pods": {"a", "b"}}, 3)
    assert (r.status.consecutive_failures, r.status.last_error) == (0, "")
    assert r.realized_revision == 3
    assert r.status.last_success > 0


def test_backoff_doubles_to_the_limit_per_key_and_resets():
    b = Backoff()
    delays = [b.next() for _ in range(10)]
    assert delays[:4] == [RETRY_MIN, 2 * RETRY_MIN, 4 * RETRY_MIN, 8 * RETRY_MIN]
    assert delays[-1] == RETRY_MAX and max(delays) == RETRY_MAX
    assert b.next("other") == RETRY_MIN  # keys back off independently
    b.reset()
    assert b.next() == RETRY_MIN
    assert b.next("other") == 2 * RETRY_MIN


def test_the_loop_retries_a_failed_pass_after_the_backoff(rec):
    r = Reconciler("t", rec, ("pods",))
    rec.fail = [RuntimeError("map busy")]
    r.start()
    try:
        revision = r.mark("pods", "a")
        assert r.wait_for_revision(revision, 10)
        assert [d["pods"] for d, _ in rec.passes if "a" in d["pods"]][-1] == {"a"}
        assert r.status.failures == 1 and r.status.consecutive_failures == 0
    finally:
        r.stop()


def retry_delays(caplog) -> list[str]:
    return [r.getMessage().rsplit(" ", 1)[-1] for r in caplog.records if "retrying in" in r.getMessage()]


def test_the_loop_backoff_doubles_while_failing_and_resets_after_a_success(rec, caplog):
    r = Reconciler("t", rec, ("pods",))
    rec.fail = [RuntimeError("busy"), RuntimeError("still busy")]
    first = r.mark("pods", "a")
    r.start()
    try:
        assert r.wait_for_revision(first, 10)
        assert retry_delays(caplog) == [f"{RETRY_MIN:.1f}s", f"{2 * RETRY_MIN:.1f}s"]
        rec.fail = [RuntimeError("busy again")]
        assert r.wait_for_revision(r.mark("pods", "b"), 10)
        assert retry_delays(caplog)[-1] == f"{RETRY_MIN:.1f}s"  # from the shortest again
        assert r.status.failures == 3
    finally:
        r.stop()


def test_requeue_brings_one_key_back_while_the_revision_is_realized():
    seen = []
    bad_attempts = []

    def reconcile(dirty, revision):
        seen.append(set(dirty["eps"]))
        if "bad" in dirty["eps"]:
            bad_attempts.append(revision)
            if len(bad_attempts) == 1:
                r.requeue("eps", "bad")
            else:
                r.succeeded("eps", "bad")

    r = Reconciler("t", reconcile, ("eps",))
    r.start()
    try:
        revision = r.mark("eps", "good", "bad")
        assert r.wait_for_revision(revision, 10)  # realized for everyone else
        assert poll(lambda: len(bad_attempts) == 2)
        assert seen[-1] == {"bad"}   # only the requeued key came back
        assert r.realized_revision == revision
        assert r.requeue("eps", "bad") == RETRY_MIN  # succeeded() reset its backoff
    finally:
        r.stop()


def test_requeue_delays_double_for_a_key_that_keeps_failing():
    r = Reconciler("t", lambda d, rev: None, ("eps",))
    assert [r.requeue("eps", "x") for _ in range(3)] == [RETRY_MIN, 2 * RETRY_MIN, 4 * RETRY_MIN]
    assert r.requeue("eps", "y") == RETRY_MIN
    # Held back until the backoff is over, not retried by the next pass of other changes.
    assert r.take()[0] == {"eps": set()}
    assert poll(lambda: r.pending("eps") == {"x", "y"})


def test_wait_for_revision_times_out_and_wakes_waiters(rec):
    r = Reconciler("t", rec, ("pods",))
    revision = r.mark("pods", "a")
    assert not r.wait_for_revision(revision, 0.01)
    result = []
    waiter = threading.Thread(target=lambda: result.append(r.wait_for_revision(revision, 10)))
    waiter.start()
    r.run_once()
    waiter.join(10)
    assert result == [True]
    assert r.wait_for_revision(revision - 1, 0)  # an older revision is realized too


def test_a_permanent_error_waits_for_the_next_change(rec):
    r = Reconciler("t", rec, ("pods",))
    rec.fail = [PermanentError("spec.ports[0].port: must be a number")]
    first = r.mark("pods", "a")  # before start: one wake, one pass
    r.start()
    try:
        assert poll(lambda: r.status.failures == 1)
        # Long enough for several retries under the backoff; none may come.
        threading.Event().wait(4 * RETRY_MIN)
        assert r.status.runs == 1 and not r.wait_for_revision(first, 0)
        second = r.mark("pods", "b")
        assert r.wait_for_revision(second, 10)
        assert rec.passes[-1][0] == {"pods": {"a", "b"}}
    finally:
        r.stop()


def test_a_pass_holds_the_given_lock():
    lock = threading.RLock()
    free_elsewhere = []

    def reconcile(dirty, revision):
        probe = threading.Thread(target=lambda: free_elsewhere.append(lock.acquire(blocking=False)))
        probe.start()
        probe.join()

    r = Reconciler("t", reconcile, ("pods",), lock=lock)
    r.run_once()
    assert free_elsewhere == [False]


def test_passes_from_two_threads_realize_in_order():
    entered = threading.Event()
    release = threading.Event()
    order = []

    def reconcile(dirty, revision):
        order.append(("start", revision))
        if len(order) == 1:
            entered.set()
            release.wait(10)
        order.append(("end", revision))

    r = Reconciler("t", reconcile, ("pods",))
    r.mark("pods", "a")
    first = threading.Thread(target=r.run_once)
    first.start()
    assert entered.wait(10)
    r.mark("pods", "b")
    second = threading.Thread(target=r.run_once)
    second.start()
    release.set()
    first.join(10), second.join(10)
    assert order == [("start", 2), ("end", 2), ("start", 3), ("end", 3)]


def test_resync_hook_runs_when_nothing_changes_and_a_pass_follows(rec):
    resyncs = []
    r = Reconciler("t", rec, ("pods",), resync_interval=0.05, on_resync=lambda: resyncs.append(len(rec.passes)))
    r.start()
    try:
        assert poll(lambda: len(resyncs) >= 2)
        assert poll(lambda: len(rec.passes) > resyncs[0])  # the hook is followed by a pass
    finally:
        r.stop()


def test_before_first_runs_before_the_first_pass_and_may_fail(rec):
    calls = []

    def before_first():
        calls.append(len(rec.passes))
        raise RuntimeError("endpoints not restored")

    r = Reconciler("t", rec, ("pods",))
    r.start(before_first)
    try:
        assert r.wait_for_revision(r.mark("pods", "a"), 10)
        assert calls == [0]
    finally:
        r.stop()


def test_the_loop_waits_for_the_store_before_a_pass(rec):
    class Store:
        idle_waits = 0

        def wait_idle(self, timeout):
            Store.idle_waits += 1

    r = Reconciler("t", rec, ("pods",), store=Store())
    r.start()
    try:
        assert r.wait_for_revision(r.mark("pods", "a"), 10)
        assert Store.idle_waits >= 1
    finally:
        r.stop()
