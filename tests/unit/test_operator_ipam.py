"""Cluster-pool IPAM allocation (pure: no API server)."""

import ipaddress
import random

import pytest

from cilium_py.operator.ipam import (ClusterPool, NodeAllocation, NodeClaim, PoolAllocator,
                                     PoolError, claim_of, operator_error)

POOL = ClusterPool.parse(["10.20.0.0/22"], 24)   # four blocks


def node(name, *cidrs, created=None):
    return NodeClaim(name, tuple(cidrs), created or f"2025-01-01T00:00:{int(name[-1:] or 0):02d}Z")


# -- the pool ------------------------------------------------------------------------------

def test_pool_parses_lists_and_counts_blocks():
    pool = ClusterPool.parse(["10.20.0.0/22,10.30.0.0/23", " 10.40.0.0/24 "], 24)
    assert [str(c) for c in pool.cidrs] == ["10.20.0.0/22", "10.30.0.0/23", "10.40.0.0/24"]
    assert pool.size == 7
    assert [str(b) for b in pool.blocks()][:5] == ["10.20.0.0/24", "10.20.1.0/24", "10.20.2.0/24",
                                                   "10.20.3.0/24", "10.30.0.0/24"]


@pytest.mark.parametrize("cidrs, mask, flag, words", [
    (["10.20.0.0/22"], 20, "--cluster-pool-ipv4-mask-size", "shorter than the prefix"),
    (["10.20.0.0/22"], 33, "--cluster-pool-ipv4-mask-size", "between 1 and 32"),
    (["10.20.0.1/22"], 24, "--cluster-pool-ipv4-cidr", "host bits"),
    (["banana"], 24, "--cluster-pool-ipv4-cidr", "'banana'"),
    (["fd00::/104"], 120, "--cluster-pool-ipv4-cidr", "not an IPv4 CIDR"),
    (["10.20.0.0/22", "10.20.2.0/23"], 24, "--cluster-pool-ipv4-cidr", "overlap"),
    ([], 24, "--cluster-pool-ipv4-cidr", "no CIDR"),
])
def test_pool_rejects_with_the_flag_named(cidrs, mask, flag, words):
    with pytest.raises(PoolError) as e:
        ClusterPool.parse(cidrs, mask)
    assert e.value.flag == flag and words in e.value.message


def test_check_block_says_why():
    assert POOL.check_block("10.20.1.0/24") == (ipaddress.IPv4Network("10.20.1.0/24"), "")
    assert "outside the cluster pool" in POOL.check_block("10.99.0.0/24")[1]
    assert "not a /24 block" in POOL.check_block("10.20.1.0/25")[1]
    assert "not a valid CIDR" in POOL.check_block("10.20.1.7/24")[1]


# -- allocation ----------------------------------------------------------------------------

def test_four_blocks_for_four_nodes_then_exhausted_then_freed():
    alloc = PoolAllocator(POOL)
    alloc.sync([node(f"n{i}") for i in range(1, 6)])
    got = alloc.allocations()
    assert [got[f"n{i}"].pod_cidrs for i in range(1, 5)] == [
        ("10.20.0.0/24",), ("10.20.1.0/24",), ("10.20.2.0/24",), ("10.20.3.0/24",)]
    assert got["n5"].pod_cidrs == ()
    assert "exhausted" in got["n5"].error and "10.20.0.0/22" in got["n5"].error
    assert alloc.free == 0
    alloc.remove("n2")
    assert alloc.allocation("n5") == NodeAllocation(("10.20.1.0/24",), "")


def test_a_restart_keeps_every_nodes_cidr():
    # As written by an earlier operator: not in the order a fresh one would hand them out.
    nodes = [node("n1", "10.20.3.0/24"), node("n2", "10.20.0.0/24"), node("n3")]
    alloc = PoolAllocator(POOL)
    alloc.sync(nodes)
    assert alloc.allocation("n1").pod_cidrs == ("10.20.3.0/24",)
    assert alloc.allocation("n2").pod_cidrs == ("10.20.0.0/24",)
    assert alloc.allocation("n3").pod_cidrs == ("10.20.1.0/24",)   # lowest free, not a taken one


def test_claims_are_taken_before_free_blocks_are_handed_out():
    # n1 (older, no block) must not be given the block n2 (newer) already has.
    alloc = PoolAllocator(POOL)
    alloc.sync([node("n1"), node("n2", "10.20.0.0/24")])
    assert alloc.allocation("n1").pod_cidrs == ("10.20.1.0/24",)
    assert alloc.allocation("n2") == NodeAllocation(("10.20.0.0/24",), "")


@pytest.mark.parametrize("cidr, words", [
    ("10.99.0.0/24", "outside the cluster pool"),
    ("10.20.1.0/25", "not a /24 block"),
    ("not-a-cidr", "not a valid CIDR"),
])
def test_a_claim_outside_the_pool_is_reported_and_not_taken(cidr, words):
    alloc = PoolAllocator(POOL)
    alloc.sync([node("n1", cidr), node("n2")])
    got = alloc.allocation("n1")
    assert got.pod_cidrs == (cidr,)      # the spec is not rewritten
    assert words in got.error and cidr in got.error
    assert alloc.owners() == {"10.20.0.0/24": "n2"}


def test_a_clashing_claim_is_reported_and_the_first_owner_keeps_it():
    alloc = PoolAllocator(POOL)
    alloc.update(node("n1"))
    alloc.update(node("n2", "10.20.0.0/24"))
    assert alloc.allocation("n2").error == "podCIDR 10.20.0.0/24 is already allocated to node n1"
    assert alloc.owners() == {"10.20.0.0/24": "n1"}
    alloc.remove("n1")   # the owner goes: the claim is now good
    assert alloc.allocation("n2") == NodeAllocation(("10.20.0.0/24",), "")


def test_a_node_keeps_its_block_while_our_write_has_not_landed():
    alloc = PoolAllocator(POOL)
    alloc.update(node("n1"))
    alloc.update(node("n1"))   # the same node seen again, its spec still empty
    assert alloc.allocation("n1").pod_cidrs == ("10.20.0.0/24",)
    assert alloc.owners() == {"10.20.0.0/24": "n1"}


def test_a_changed_claim_releases_the_old_block():
    alloc = PoolAllocator(POOL)
    alloc.sync([node("n1", "10.20.0.0/24")])
    alloc.sync([node("n1", "10.20.2.0/24"), node("n2")])
    assert alloc.owners() == {"10.20.0.0/24": "n2", "10.20.2.0/24": "n1"}


def test_claim_of_and_operator_error_read_a_ciliumnode():
    doc = {"metadata": {"name": "n1", "creationTimestamp": "2025-01-01T00:00:00Z"},
           "spec": {"ipam": {"podCIDRs": ["10.20.0.0/24"]}},
           "status": {"ipam": {"operator-status": {"error": "boom"}}}}
    assert claim_of(doc) == NodeClaim("n1", ("10.20.0.0/24",), "2025-01-01T00:00:00Z")
    assert operator_error(doc) == "boom"
    assert claim_of({"metadata": {"name": "n2"}}) == NodeClaim("n2", (), "")
    assert operator_error({"metadata": {"name": "n2"}}) == ""


# -- incremental equals fresh --------------------------------------------------------------

PROPERTY_POOL = ClusterPool.parse(["10.20.0.0/23", "10.30.0.0/24"], 25)   # six blocks


def _random_claim(rng: random.Random) -> tuple[str, ...]:
    kind = rng.random()
    blocks = [str(b) for b in PROPERTY_POOL.blocks()]
    if kind < 0.55:
        return ()
    if kind < 0.8:
        return (rng.choice(blocks),)              # free or someone else's
    if kind < 0.9:
        return ("10.99.0.0/25",)                  # outside the pool
    return ("10.20.0.0/24",)                      # inside, not a block (wrong size)


def _check_invariants(alloc: PoolAllocator, cluster: dict[str, NodeClaim]):
    owners = alloc.owners()
    for block, name in owners.items():
        assert name in cluster
        assert PROPERTY_POOL.check_block(block)[1] == ""
    waiting = [n for n, a in alloc.allocations().items() if not a.pod_cidrs]
    if alloc.free:
        assert all(cluster[n].pod_cidrs for n in waiting), "a free block while a node waits"


def _write_back(alloc: PoolAllocator, cluster: dict[str, NodeClaim]) -> list[NodeClaim]:
    """What the controller writes: blocks into the specs of nodes without claims."""
    written = []
    for name, want in alloc.allocations().items():
        claim = cluster[name]
        if not claim.pod_cidrs and want.pod_cidrs:
            cluster[name] = NodeClaim(name, want.pod_cidrs, claim.created)
            written.append(cluster[name])
    return written


@pytest.mark.parametrize("seed", range(40))
def test_incremental_state_equals_a_fresh_computation(seed):
    rng = random.Random(seed)
    cluster: dict[str, NodeClaim] = {}
    by_event = PoolAllocator(PROPERTY_POOL)   # one event at a time, as from a watch
    by_pass = PoolAllocator(PROPERTY_POOL)    # the controller's path: sync on each list
    serial = 0
    for _ in range(60):
        if cluster and rng.random() < 0.35:
            name = rng.choice(sorted(cluster))
            del cluster[name]
            by_event.remove(name)
        else:
            serial += 1
            name = f"node-{serial:03d}"
            cluster[name] = NodeClaim(name, _random_claim(rng), f"2025-01-01T00:{serial // 60:02d}:{serial % 60:02d}Z")
            by_event.update(cluster[name])
        by_pass.sync(cluster.values())
        for claim in _write_back(by_event, cluster):
            by_event.update(claim)                 # the watch brings our own write back
        by_pass.sync(cluster.values())
        fresh = PoolAllocator(PROPERTY_POOL)       # an operator restarted now
        fresh.sync(cluster.values())
        assert by_event.allocations() == fresh.allocations()
        assert by_event.owners() == fresh.owners()
        assert by_pass.allocations() == fresh.allocations()
        assert by_pass.owners() == fresh.owners()
        _check_invariants(by_event, cluster)
