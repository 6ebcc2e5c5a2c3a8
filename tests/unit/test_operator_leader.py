"""Leader election decisions on Lease documents (pure: no API server)."""

import pytest

from cilium_py.operator.leader import (LeaderElectionConfig, Step, format_micro_time, lease_expired,
                                       lease_for, lease_holder, new_identity, next_step,
                                       parse_micro_time, released)

T0 = 1_750_000_000.25


def lease(holder, renewed=T0, duration=15):
    return {"metadata": {"name": "lock", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                     "acquireTime": format_micro_time(renewed), "renewTime": format_micro_time(renewed),
                     "leaseTransitions": 2}}


def test_micro_time_round_trips():
    assert format_micro_time(T0) == "2025-06-15T15:06:40.250000Z"
    assert parse_micro_time(format_micro_time(T0)) == T0
    assert parse_micro_time("") is None and parse_micro_time("yesterday") is None


def test_identities_differ_per_elector():
    a, b = new_identity(), new_identity()
    assert a != b and a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0]   # same host and pid


def test_steps():
    assert next_step(None, "me", T0) is Step.CREATE
    assert next_step(lease("me"), "me", T0 + 100) is Step.RENEW       # ours, even if late
    assert next_step(lease("other"), "me", T0 + 15) is Step.WAIT      # valid through its last second
    assert next_step(lease("other"), "me", T0 + 15.001) is Step.TAKE  # renewTime + duration < now
    assert next_step(lease(""), "me", T0) is Step.TAKE                # released


def test_unreadable_lease_times_count_as_expired():
    broken = lease("other")
    broken["spec"]["renewTime"] = broken["spec"]["acquireTime"] = "not a time"
    assert lease_expired(broken, T0)
    broken = lease("other")
    broken["spec"]["leaseDurationSeconds"] = None
    assert lease_expired(broken, T0)


def test_take_keeps_the_resource_version_and_counts_a_transition():
    body = lease_for(Step.TAKE, lease("other"), name="lock", namespace="ns", identity="me",
                     now=T0 + 20, duration_seconds=15)
    assert body["metadata"]["resourceVersion"] == "7"     # the update is conditional on it
    spec = body["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("me", 3)
    assert spec["acquireTime"] == spec["renewTime"] == format_micro_time(T0 + 20)


def test_renew_moves_only_the_renew_time():
    before = lease("me")
    body = lease_for(Step.RENEW, before, name="lock", namespace="ns", identity="me",
                     now=T0 + 2, duration_seconds=15)
    assert body["spec"]["acquireTime"] == before["spec"]["acquireTime"]
    assert body["spec"]["renewTime"] == format_micro_time(T0 + 2)
    assert body["spec"]["leaseTransitions"] == 2
    assert before["spec"]["renewTime"] == format_micro_time(T0)   # the input is not changed


def test_create_holds_it():
    body = lease_for(Step.CREATE, None, name="lock", namespace="ns", identity="me", now=T0,
                     duration_seconds=15)
    assert body["metadata"] == {"name": "lock", "namespace": "ns"}
    assert lease_holder(body) == "me" and not lease_expired(body, T0 + 14)


def test_released_lease_is_free_at_once():
    body = released(lease("me"), T0)
    assert lease_holder(body) == "" and body["spec"]["leaseDurationSeconds"] == 1
    assert next_step(body, "other", T0) is Step.TAKE


@pytest.mark.parametrize("durations, words", [
    ((15, 15, 2), "--leader-election-renew-deadline (15s) must be shorter"),
    ((15, 10, 9), "--leader-election-retry-period (9s) must be well shorter"),
    ((0.5, 0.3, 0.1), "at least 1s"),
    ((15, 10, 0), "--leader-election-retry-period must be positive"),
])
def test_config_refuses_durations_that_allow_two_leaders(durations, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        LeaderElectionConfig(*durations)


def test_config_defaults_are_ciliums():
    c = LeaderElectionConfig()
    assert (c.lease_duration, c.renew_deadline, c.retry_period) == (15, 10, 2)
    assert LeaderElectionConfig(2.5, 1.5, 0.5).lease_duration_seconds == 3
