import pytest

from cilium_py.agent.policy.mapstate import (
    MapEntry,
    PolicyRule,
    PolicyRuleError,
    compute_map_state,
    port_range_prefixes,
)
from cilium_py.datapath.maps.policy import PolicyKey, PolicyMapKey


def covered(blocks):
    ports = set()
    for start, bits in blocks:
        ports.update(range(start, start + (1 << (16 - bits))))
    return ports


@pytest.mark.parametrize("first,last", [(80, 80), (8080, 8087), (8080, 8090), (1, 65535), (1000, 1999), (0, 65535), (65535, 65535)])
def test_port_range_prefixes_cover_exactly_the_range(first, last):
    blocks = port_range_prefixes(first, last)
    assert covered(blocks) == set(range(first, last + 1))
    for start, bits in blocks:
        size = 1 << (16 - bits)
        assert start % size == 0, "each block is aligned to its size"


def test_aligned_range_is_one_prefix():
    assert list(port_range_prefixes(8080, 8087)) == [(8080, 13)]
    assert list(port_range_prefixes(0, 65535)) == [(0, 0)]


def test_deny_of_same_identity_folds_narrower_allow():
    state = compute_map_state(7, [
        PolicyRule(1000, "ingress", 6, 80, cookie=1),
        PolicyRule(1000, "ingress", deny=True, cookie=2),
    ])
    key80 = PolicyMapKey(7, 1000, "ingress", 6, 80, 16)
    assert state[key80] == MapEntry(True, 2), "the allow for port 80 must not hide the deny"
    assert state[PolicyMapKey(7, 1000, "ingress", 0, 0, 0)] == MapEntry(True, 2)


def test_deny_of_other_identity_leaves_allow():
    state = compute_map_state(7, [PolicyRule(1000, "ingress", 6, 80), PolicyRule(1001, "ingress", deny=True)])
    assert state[PolicyMapKey(7, 1000, "ingress", 6, 80, 16)] == MapEntry(False, 0)


def test_narrower_deny_inside_allowed_range_stays_separate():
    state = compute_map_state(1, [PolicyRule(0, "egress", 17, 1000, 1999), PolicyRule(0, "egress", 17, 1500, deny=True)])
    assert state[PolicyMapKey(1, 0, "egress", 17, 1500, 16)].deny
    assert not state[PolicyMapKey(1, 0, "egress", 17, 1024, 7)].deny


def test_deny_of_other_protocol_does_not_fold():
    state = compute_map_state(1, [PolicyRule(5, "ingress", 6, 80), PolicyRule(5, "ingress", 17, deny=True)])
    assert not state[PolicyMapKey(1, 5, "ingress", 6, 80, 16)].deny


@pytest.mark.parametrize("kwargs,message", [
    (dict(identity=1, direction="sideways"), "direction"),
    (dict(identity=1, direction="ingress", protocol=6, port=90, end_port=80), "endPort"),
    (dict(identity=1, direction="ingress", port=80), "needs a protocol"),
    (dict(identity=1, direction="ingress", protocol=6, port=70000), "out of range"),
    (dict(identity=1, direction="ingress", protocol=1, port=8, end_port=9), "ICMP"),
])
def test_invalid_rules_name_the_problem(kwargs, message):
    with pytest.raises(PolicyRuleError, match=message):
        PolicyRule(**kwargs)


@pytest.mark.parametrize("key", [
    PolicyMapKey(3, 0, "ingress", 0, 0, 0),
    PolicyMapKey(3, 1000, "egress", 6, 0, 0),
    PolicyMapKey(3, 1000, "egress", 6, 8080, 13),
    PolicyMapKey(65535, 2, "ingress", 17, 53, 16),
])
def test_policy_key_round_trips_through_c_layout(key):
    c_key = PolicyKey.from_buffer_copy(bytes(key.to_c()))
    assert PolicyMapKey.from_c(c_key) == key


def test_policy_key_port_is_big_endian():
    raw = bytes(PolicyMapKey(1, 2, "ingress", 6, 80, 16).to_c())
    assert raw[-2:] == b"\x00\x50"
    assert raw[0] == 56 + 8 + 16
