import ipaddress
import json
import os
import threading

import pytest

from cilium_py.agent.identity import (
    IdentityAllocator,
    IdentityExhaustedError,
    IdentityStateError,
)

WEB = {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "prod"}
DB = {"k8s:app": "db", "k8s:io.kubernetes.pod.namespace": "prod"}


def test_same_labels_same_id_from_256():
    alloc = IdentityAllocator(None)
    a = alloc.acquire(WEB)
    assert a == 256
    assert alloc.acquire(dict(reversed(list(WEB.items())))) == a
    assert alloc.acquire(DB) == 257
    assert alloc.lookup(a) == WEB
    assert alloc.lookup_labels(DB) == 257


def test_refcount_release_frees_only_at_zero_and_reuses_lowest():
    alloc = IdentityAllocator(None)
    a = alloc.acquire(WEB)
    alloc.acquire(WEB)
    b = alloc.acquire(DB)
    assert alloc.refcount(a) == 2
    assert alloc.release(WEB) is False
    assert alloc.lookup(a) == WEB
    assert alloc.release(WEB) is True
    assert alloc.lookup(a) is None
    assert alloc.release(WEB) is False, "releasing again is harmless"
    other = {"k8s:app": "other"}
    assert alloc.acquire(other) == a, "the freed lowest number is reused"
    assert alloc.lookup(b) == DB


def test_reserved_identities():
    alloc = IdentityAllocator(None)
    everything = alloc.all()
    assert {i: everything[i] for i in range(1, 8)} == {
        1: {"reserved:host": ""}, 2: {"reserved:world": ""}, 3: {"reserved:unmanaged": ""},
        4: {"reserved:health": ""}, 5: {"reserved:init": ""}, 6: {"reserved:remote-node": ""},
        7: {"reserved:kube-apiserver": ""},
    }
    assert alloc.acquire({"reserved:host": ""}) == 1
    assert alloc.release({"reserved:host": ""}) is False
    assert alloc.lookup(2) == {"reserved:world": ""}
    assert alloc.lookup(9) == {"reserved:world-ipv4": ""}


def test_all_holds_reserved_and_cluster_identities_but_not_cidr():
    alloc = IdentityAllocator(None)
    web = alloc.acquire(WEB)
    cidr = alloc.acquire_cidr("10.0.0.0/8")
    everything = alloc.all()
    assert everything[web] == WEB
    assert cidr not in everything
    assert set(everything) == set(range(1, 8)) | {web}


def test_cidr_identities():
    alloc = IdentityAllocator(None)
    a = alloc.acquire_cidr("10.0.0.0/8")
    assert a == (1 << 24) | 1
    assert alloc.acquire_cidr(ipaddress.ip_network("10.0.0.0/8")) == a
    b = alloc.acquire_cidr("192.168.1.0/24")
    assert b == (1 << 24) | 2
    assert alloc.lookup(a) == {"cidr:10.0.0.0/8": ""}
    assert alloc.cidr_identities() == {ipaddress.ip_network("10.0.0.0/8"): a,
                                       ipaddress.ip_network("192.168.1.0/24"): b}
    assert alloc.release_cidr("10.0.0.0/8") is False
    assert alloc.release_cidr("10.0.0.0/8") is True
    assert alloc.lookup(a) is None
    assert alloc.acquire_cidr("172.16.0.0/12") == a


def test_ipv6_cidr_label_keeps_the_source_separator_unambiguous():
    alloc = IdentityAllocator(None)
    assert alloc.lookup(alloc.acquire_cidr("fd00::/64")) == {"cidr:fd00--/64": ""}


def test_identities_survive_restart(tmp_path):
    state = tmp_path / "sub" / "identities.json"
    alloc = IdentityAllocator(str(state))
    web, db = alloc.acquire(WEB), alloc.acquire(DB)
    cidr = alloc.acquire_cidr("10.0.0.0/8")
    assert json.loads(state.read_text())["identities"][str(web)] == WEB
    assert [p for p in os.listdir(state.parent) if p != "identities.json"] == [], "no temp file left"

    again = IdentityAllocator(str(state))
    assert again.lookup(web) == WEB and again.lookup(db) == DB
    assert again.lookup(cidr) == {"cidr:10.0.0.0/8": ""}
    assert again.refcount(web) == 0, "reference counts are not persisted"
    assert again.acquire(DB) == db and again.acquire(WEB) == web
    assert again.acquire_cidr("10.0.0.0/8") == cidr
    assert again.acquire({"k8s:app": "new"}) == 258


def test_forget_unused_drops_what_nobody_reacquired(tmp_path):
    state = str(tmp_path / "ids.json")
    alloc = IdentityAllocator(state)
    web, db = alloc.acquire(WEB), alloc.acquire(DB)
    cidr = alloc.acquire_cidr("10.0.0.0/8")
    again = IdentityAllocator(state)
    again.acquire(WEB)
    assert again.forget_unused() == [db, cidr]
    assert again.lookup(db) is None and again.lookup(web) == WEB
    assert IdentityAllocator(state).lookup(db) is None, "the forgetting is persisted"


def test_release_to_zero_is_persisted(tmp_path):
    state = str(tmp_path / "ids.json")
    alloc = IdentityAllocator(state)
    web = alloc.acquire(WEB)
    alloc.release(WEB)
    assert IdentityAllocator(state).lookup(web) is None


def test_corrupt_state_file_is_a_clear_error(tmp_path):
    state = tmp_path / "ids.json"
    state.write_text("{not json")
    with pytest.raises(IdentityStateError, match="ids.json"):
        IdentityAllocator(str(state))
    state.write_text(json.dumps({"version": 1, "identities": {"256": WEB, "257": WEB}}))
    with pytest.raises(IdentityStateError, match="same labels"):
        IdentityAllocator(str(state))


def test_exhaustion_raises_a_clear_error():
    alloc = IdentityAllocator(None, min_id=256, max_id=257, max_local=1)
    alloc.acquire(WEB)
    alloc.acquire(DB)
    with pytest.raises(IdentityExhaustedError, match="256-257"):
        alloc.acquire({"k8s:app": "third"})
    alloc.acquire_cidr("10.0.0.0/8")
    with pytest.raises(IdentityExhaustedError, match="CIDR"):
        alloc.acquire_cidr("10.1.0.0/16")


def test_empty_labels_are_rejected():
    with pytest.raises(ValueError):
        IdentityAllocator(None).acquire({})


def test_concurrent_acquire_gives_one_id_per_label_set(tmp_path):
    alloc = IdentityAllocator(str(tmp_path / "ids.json"))
    results: list[int] = []
    lock = threading.Lock()

    def worker(n):
        ids = [alloc.acquire({"k8s:app": f"a{i % 5}"}) for i in range(n)]
        with lock:
            results.extend(ids)

    threads = [threading.Thread(target=worker, args=(50,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == set(range(256, 261))
    assert sum(alloc.refcount(i) for i in range(256, 261)) == 400


def test_revision_changes_only_on_allocation_and_free():
    alloc = IdentityAllocator(None)
    r0 = alloc.revision
    alloc.acquire(WEB)
    r1 = alloc.revision
    alloc.acquire(WEB)
    assert alloc.revision == r1 > r0
    alloc.release(WEB)
    assert alloc.revision == r1
    alloc.release(WEB)
    assert alloc.revision > r1
