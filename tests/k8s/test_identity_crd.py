"""CiliumIdentity allocation (agent/k8s/identities.py) against the real API server: agents
racing for the same label sets end with one identity each, a number never carries two
label sets, existing identities are adopted (and un-marked for deletion), and CIDR
identities never leave the node."""

from __future__ import annotations

import threading
import uuid

import pytest

from cilium_py.agent.k8s.identities import (
    HEARTBEAT_ANNOTATION,
    CRDIdentityAllocator,
    identity_object,
    probe_order,
)
from cilium_py.agent.labels import labels_key
from cilium_py.vocab import LOCAL_IDENTITY_SCOPE

KIND = "CiliumIdentity"


@pytest.fixture
def ns_label():
    """A namespace name no other test's label sets use: identities are cluster-scoped."""
    return "id-" + uuid.uuid4().hex[:8]


@pytest.fixture
def cleanup(kube, ns_label):
    yield
    items, _ = kube.list_all(KIND, label_selector=f"io.kubernetes.pod.namespace={ns_label}")
    for doc in items:
        kube.delete(KIND, doc["metadata"]["name"], missing_ok=True)


def label_set(namespace: str, app: str) -> dict:
    return {"k8s:app": app, "k8s:io.kubernetes.pod.namespace": namespace,
            "k8s:io.cilium.k8s.policy.serviceaccount": "default",
            "k8s:io.cilium.k8s.policy.cluster": "default"}


def stored(kube, namespace: str) -> dict[int, dict]:
    items, _ = kube.list_all(KIND, label_selector=f"io.kubernetes.pod.namespace={namespace}")
    return {int(d["metadata"]["name"]): d["security-labels"] for d in items}


def test_racing_agents_end_with_one_identity_per_label_set(control_plane, cilium_crds, ns_label, cleanup):
    sets = [label_set(ns_label, f"app{i}") for i in range(6)]
    agents = [CRDIdentityAllocator(control_plane.admin()) for _ in range(2)]
    threads_per_agent = 3
    barrier = threading.Barrier(len(agents) * threads_per_agent)
    results: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(agent, order):
        try:
            barrier.wait(30)
            for labels in order:
                ident = agent.acquire(labels)
                with lock:
                    results.append((labels_key(labels), ident))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = []
    for n, agent in enumerate(agents):
        for t in range(threads_per_agent):
            # Different orders per thread, so the races fall on different label sets.
            order = sets[t:] + sets[:t] if n % 2 == 0 else list(reversed(sets[t:] + sets[:t]))
            threads.append(threading.Thread(target=run, args=(agent, order)))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        by_set: dict[str, set[int]] = {}
        for key, ident in results:
            by_set.setdefault(key, set()).add(ident)
        assert all(len(ids) == 1 for ids in by_set.values()), by_set
        numbers = [next(iter(ids)) for ids in by_set.values()]
        assert len(set(numbers)) == len(sets), "distinct label sets got distinct numbers"
        assert all(256 <= n <= 65535 for n in numbers)
        # The API server holds exactly one object per label set, holding those labels.
        objects = stored(control_plane.admin(), ns_label)
        assert sorted(objects) == sorted(numbers)
        assert {labels_key(v) for v in objects.values()} == {labels_key(s) for s in sets}
        assert sum(a.created for a in agents) == len(sets)
        assert sum(a.adopted for a in agents) == len(sets), "the other agent adopted each one"
        # Every acquire of one label set on one agent holds one reference.
        for agent in agents:
            assert all(agent.refcount(n) == threads_per_agent for n in numbers)
    finally:
        for agent in agents:
            agent.kube.close()


def test_object_shape_and_namespace_label(kube, cilium_crds, ns_label, cleanup):
    labels = label_set(ns_label, "web")
    agent = CRDIdentityAllocator(kube)
    ident = agent.acquire(labels)
    doc = kube.get(KIND, str(ident))
    assert doc["security-labels"] == labels
    assert doc["metadata"]["labels"] == {"io.kubernetes.pod.namespace": ns_label}
    assert agent.lookup(ident) == labels and agent.lookup_labels(labels) == ident
    # Releasing forgets locally; the object stays for other nodes (the operator's GC owns it).
    assert agent.release(labels) is True
    assert kube.get_or_none(KIND, str(ident)) is not None
    assert CRDIdentityAllocator(kube).acquire(labels) == ident, "another node finds it by its labels"


def test_a_number_taken_by_other_labels_is_never_shared(kube, cilium_crds, ns_label, cleanup):
    labels = label_set(ns_label, "web")
    first = probe_order(labels_key(labels))[0]
    # Another namespace: the lookup by namespace label does not see it, the create meets it.
    other = label_set(ns_label + "-x", "squatter")
    kube.create(KIND, identity_object(first, other))
    try:
        agent = CRDIdentityAllocator(kube)
        ident = agent.acquire(labels)
        assert ident != first
        assert ident == probe_order(labels_key(labels))[1], "the next number of the label set's order"
        assert agent.conflicts == 1
        assert kube.get(KIND, str(first))["security-labels"] == other, "the squatter is untouched"
        assert agent.lookup(first) == other
    finally:
        kube.delete(KIND, str(first), missing_ok=True)


def test_adopts_an_identity_marked_for_deletion_and_unmarks_it(kube, cilium_crds, ns_label, cleanup):
    labels = label_set(ns_label, "db")
    number = next(n for n in range(40000, 65535) if kube.get_or_none(KIND, str(n)) is None)
    doc = identity_object(number, labels)
    doc["metadata"]["annotations"] = {HEARTBEAT_ANNOTATION: "2025-01-01T00:00:00.000000000Z"}
    kube.create(KIND, doc)
    agent = CRDIdentityAllocator(kube)
    assert agent.acquire(labels) == number
    assert agent.created == 0 and agent.adopted == 1
    annotations = kube.get(KIND, str(number))["metadata"].get("annotations") or {}
    assert HEARTBEAT_ANNOTATION not in annotations


def test_cidr_identities_stay_on_the_node(kube, cilium_crds, tmp_path):
    before = len(kube.list_all(KIND)[0])
    agent = CRDIdentityAllocator(kube, cidr_state_file=str(tmp_path / "cidr.json"))
    ident = agent.acquire_cidr("10.1.0.0/16")
    assert ident > LOCAL_IDENTITY_SCOPE
    assert agent.lookup(ident) == {"cidr:10.1.0.0/16": ""}
    assert ident not in agent.all(), "selectors never match CIDR identities through all()"
    assert len(kube.list_all(KIND)[0]) == before, "no CiliumIdentity for a CIDR"
    again = CRDIdentityAllocator(kube, cidr_state_file=str(tmp_path / "cidr.json"))
    assert again.acquire_cidr("10.1.0.0/16") == ident, "kept across restarts in the state dir"
