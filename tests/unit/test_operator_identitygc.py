"""Identity GC decisions (pure: no API server)."""

from cilium_py.operator.identitygc import (Action, Heartbeats, IdentityView, plan,
                                           referenced_identities, rfc3339_nano)

TIMEOUT = 30.0


def ident(name, rv="1", marked=False):
    return IdentityView(name, f"uid-{name}", rv, marked)


def actions(decisions):
    return {(d.action, d.identity.name) for d in decisions}


def test_first_sight_counts_as_alive():
    hb = Heartbeats()
    assert plan([ident("300")], set(), hb, now=0, timeout=TIMEOUT) == []
    assert plan([ident("300")], set(), hb, now=TIMEOUT, timeout=TIMEOUT) == []   # not over it yet


def test_unused_identity_is_marked_then_deleted_on_a_later_run():
    hb = Heartbeats()
    plan([ident("300")], set(), hb, now=0, timeout=TIMEOUT)
    first = plan([ident("300")], set(), hb, now=TIMEOUT + 1, timeout=TIMEOUT)
    assert actions(first) == {(Action.MARK, "300")}
    hb.wrote("300", "2")   # our annotation's update
    second = plan([ident("300", rv="2", marked=True)], set(), hb, now=TIMEOUT + 2, timeout=TIMEOUT)
    assert actions(second) == {(Action.DELETE, "300")}
    # The delete is conditional on exactly what was listed.
    assert (second[0].identity.uid, second[0].identity.resource_version) == ("uid-300", "2")


def test_referenced_identity_is_never_marked():
    hb = Heartbeats()
    seen = set()
    for t in range(0, 200, 10):
        decisions = plan([ident("300"), ident("301")], {"300"}, hb, now=t, timeout=TIMEOUT)
        assert all(d.identity.name == "301" for d in decisions)
        seen |= actions(decisions)
    assert (Action.MARK, "301") in seen   # the unreferenced one was marked meanwhile


def test_a_marked_identity_used_again_is_unmarked_not_deleted():
    hb = Heartbeats()
    plan([ident("300")], set(), hb, now=0, timeout=TIMEOUT)
    plan([ident("300")], set(), hb, now=TIMEOUT + 1, timeout=TIMEOUT)
    hb.wrote("300", "2")
    got = plan([ident("300", rv="2", marked=True)], {"300"}, hb, now=TIMEOUT + 2, timeout=TIMEOUT)
    assert actions(got) == {(Action.UNMARK, "300")}


def test_a_change_by_someone_else_counts_as_alive():
    # An agent un-marked it (or touched it) between two runs: the clock starts again.
    hb = Heartbeats()
    plan([ident("300")], set(), hb, now=0, timeout=TIMEOUT)
    plan([ident("300")], set(), hb, now=TIMEOUT + 1, timeout=TIMEOUT)
    hb.wrote("300", "2")
    assert plan([ident("300", rv="3")], set(), hb, now=TIMEOUT + 2, timeout=TIMEOUT) == []
    assert actions(plan([ident("300", rv="3")], set(), hb, now=2 * TIMEOUT + 3, timeout=TIMEOUT)) == {
        (Action.MARK, "300")}


def test_our_own_write_does_not_count_as_alive():
    hb = Heartbeats()
    plan([ident("300")], set(), hb, now=0, timeout=TIMEOUT)
    plan([ident("300")], set(), hb, now=TIMEOUT + 1, timeout=TIMEOUT)
    hb.wrote("300", "2")
    # Without the record of our write, rv 2 would look like an agent's change.
    assert actions(plan([ident("300", rv="2", marked=True)], set(), hb, now=TIMEOUT + 2,
                        timeout=TIMEOUT)) == {(Action.DELETE, "300")}


def test_a_mark_found_at_first_sight_waits_a_full_timeout():
    # A new leader finds identities marked by the previous one: alive now, so unmarked.
    hb = Heartbeats()
    assert actions(plan([ident("300", marked=True)], set(), hb, now=0, timeout=TIMEOUT)) == {
        (Action.UNMARK, "300")}


def test_identities_gone_are_forgotten():
    hb = Heartbeats()
    plan([ident("300"), ident("301")], set(), hb, now=0, timeout=TIMEOUT)
    plan([ident("301")], set(), hb, now=1, timeout=TIMEOUT)
    assert set(hb.last_alive) == {"301"} and set(hb.seen_version) == {"301"}


def test_referenced_identities_from_ciliumendpoints():
    ceps = [{"status": {"identity": {"id": 300}}}, {"status": {"identity": {"id": "301"}}},
            {"status": {}}, {"status": {"identity": {"id": "x"}}}, {"status": {"identity": {"id": True}}},
            {}]
    assert referenced_identities(ceps) == {"300", "301"}


def test_rfc3339_nano_is_gos():
    assert rfc3339_nano(1_750_000_000.0) == "2025-06-15T15:06:40Z"
    assert rfc3339_nano(1_750_000_000.5) == "2025-06-15T15:06:40.5Z"
    assert rfc3339_nano(1_750_000_000.125) == "2025-06-15T15:06:40.125Z"
