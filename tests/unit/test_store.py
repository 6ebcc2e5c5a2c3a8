import threading

import pytest

from cilium_py.agent.objects import ContainerPort, Labels, Namespace, Node, Pod
from cilium_py.agent.store import Store


def pod(name, version=0, ns="default", source="a.yaml"):
    # The version rides in a container port, so versions differ the way real changes do.
    return Pod(namespace=ns, name=name, labels=Labels({"app": name}), source=source,
               ports=(ContainerPort("", version + 1, 6),))


def version(obj):
    return obj.ports[0].port - 1


@pytest.fixture
def store():
    s = Store(workers=4)
    yield s
    s.close()


def keys_on_different_workers(store):
    first = pod("p0")
    for i in range(1, 100):
        other = pod(f"p{i}")
        if store.worker_index(other.key) != store.worker_index(first.key):
            return first, other
    raise AssertionError("all keys hashed to one worker")


def test_resource_key_and_description():
    assert pod("web", ns="prod").key == ("Pod", "prod", "web")
    assert Namespace(namespace=None, name="prod").key == ("Namespace", "", "prod")
    assert pod("web", ns="prod").describe() == "Pod prod/web"
    assert Node(namespace=None, name="n1").describe() == "Node n1"


def test_objects_are_immutable_and_hashable():
    web = pod("web")
    with pytest.raises(AttributeError):
        web.name = "other"
    with pytest.raises(TypeError):
        web.labels["app"] = "other"
    assert hash(web) == hash(pod("web")) and web == pod("web")
    assert {web, pod("web"), pod("web", 1)} == {pod("web"), pod("web", 1)}


def test_upsert_get_list_delete(store):
    events = []
    def record(ev, old, new):
        if (old or new).kind == "Pod":
            events.append((ev, old and version(old), new and version(new)))

    store.subscribe(record)
    assert store.upsert(pod("a", 1))
    assert not store.upsert(pod("a", 1)), "an equal object is not a change"
    assert store.upsert(pod("a", 2))
    store.upsert(Namespace(namespace=None, name="default"))
    assert version(store.get(("Pod", "default", "a"))) == 2
    assert [r.name for r in store.list("Pod")] == ["a"]
    assert len(store.list()) == 2
    assert version(store.delete(("Pod", "default", "a"))) == 2
    assert store.delete(("Pod", "default", "a")) is None
    assert store.wait_idle(5)
    assert store.callback_errors == 0
    assert events == [("upsert", None, 1), ("upsert", 1, 2), ("delete", 2, None)]


def test_changes_to_one_key_arrive_in_order(store):
    seen = []
    store.subscribe(lambda ev, old, new: seen.append(version(new)))
    for v in range(500):
        store.upsert(pod("web", v))
    assert store.wait_idle(10)
    assert seen == list(range(500))


def test_different_keys_run_in_parallel(store):
    a, b = keys_on_different_workers(store)
    b_ran = threading.Event()
    a_saw_b = []

    def handler(ev, old, new):
        if new.key == a.key:
            # Blocks a's worker until b has been handled; only possible if b runs elsewhere.
            a_saw_b.append(b_ran.wait(10))
        else:
            b_ran.set()

    store.subscribe(handler)
    store.upsert(a)
    store.upsert(b)
    assert store.wait_idle(15)
    assert a_saw_b == [True]


def test_wait_idle_times_out_while_a_handler_is_busy(store):
    gate = threading.Event()
    started = threading.Event()

    def handler(ev, old, new):
        started.set()
        gate.wait(10)

    store.subscribe(handler)
    store.upsert(pod("web"))
    assert started.wait(5)
    assert store.wait_idle(0.05) is False
    gate.set()
    assert store.wait_idle(5) is True


def test_wait_idle_with_nothing_queued(store):
    assert store.wait_idle(0)


def test_subscribe_replays_existing_objects(store):
    store.upsert(pod("a"))
    store.upsert(pod("b"))
    seen = []
    store.subscribe(lambda ev, old, new: seen.append((ev, old, new.name)))
    assert store.wait_idle(5)
    assert sorted(seen) == [("upsert", None, "a"), ("upsert", None, "b")]


def test_failing_subscriber_does_not_stop_others(store):
    seen = []

    def broken(ev, old, new):
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(lambda ev, old, new: seen.append(new.name))
    store.upsert(pod("a"))
    store.upsert(pod("b"))
    assert store.wait_idle(5)
    assert sorted(seen) == ["a", "b"]
    assert store.callback_errors == 2


def test_unsubscribe(store):
    seen = []
    unsubscribe = store.subscribe(lambda ev, old, new: seen.append(new.name))
    store.upsert(pod("a"))
    assert store.wait_idle(5)
    unsubscribe()
    store.upsert(pod("b"))
    assert store.wait_idle(5)
    assert seen == ["a"]


def test_handler_may_write_the_store(store):
    def handler(ev, old, new):
        if new and new.kind == "Pod":
            store.upsert(Namespace(namespace=None, name=new.namespace))

    store.subscribe(handler)
    store.upsert(pod("a", ns="prod"))
    assert store.wait_idle(5)
    assert store.get(("Namespace", "", "prod")) is not None
