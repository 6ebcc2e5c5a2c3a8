"""The difference between plans and the realized books, alone: what a new, changed or
removed frontend writes, in which order, slot positions, IDs released only once the
write is committed, Maglev tables per backend set, and the leftovers of a restore."""

from __future__ import annotations

from cilium_py.agent.services.diff import RealizedBooks, diff, slot_order
from cilium_py.agent.services.endpoints import BackendRef
from cilium_py.agent.services.maglev import DEFAULT_SEED
from cilium_py.agent.services.plan import FrontendPlan
from cilium_py.agent.services.writer import MemoryWriter
from cilium_py.datapath.maps import lb

WEB = ("Service", "shop", "web")
TCP = 6
CIP = ("10.96.0.10", 80, TCP)
SIZE, SEED = 251, DEFAULT_SEED


def ref(address, state=lb.BE_STATE_ACTIVE, local=False) -> BackendRef:
    return BackendRef((address, 8080, TCP), state, local)


def fplan(key, backends, maglev=False, internal=None, algorithm=0) -> FrontendPlan:
    return FrontendPlan(key, "ClusterIP", 0, 0, algorithm, maglev, tuple(backends), internal)


class Node:
    """Books and a memory writer, changed through diff -> apply -> commit."""

    def __init__(self):
        self.books = RealizedBooks()
        self.writer = MemoryWriter()
        self.desired: dict = {}

    def want(self, *plans: FrontendPlan) -> None:
        self.desired = {p.key: p for p in plans}

    def refs(self) -> dict:
        out: dict = {}
        for p in self.desired.values():
            for r in p.external + (p.internal or ()):
                out[r.key] = {WEB: (r.state, r.local)}
        return out

    def diff(self, touched_fe=None, touched_be=()):
        """The writes for the desired frontends (or `touched_fe`), their backends and
        `touched_be`."""
        refs = self.refs()
        touched_fe = dict.fromkeys(touched_fe if touched_fe is not None else self.desired)
        touched_be = dict.fromkeys(list(refs) + list(touched_be))
        return diff(self.books, self.desired.get, refs, touched_fe, touched_be, SIZE, SEED)

    def commit(self, changes, pending):
        self.writer.apply(changes)
        self.books.commit(changes, pending)
        return changes

    def sync(self, touched_fe=None, touched_be=()):
        return self.commit(*self.diff(touched_fe, touched_be))

    def slots(self, key=CIP, scope=lb.SCOPE_EXTERNAL) -> list[str]:
        entry = self.writer.entry(lb.frontend(*key, scope))
        return [str(self.writer.backends[b].address) for b in entry.backend_ids]


def test_slot_order():
    assert slot_order([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert slot_order([1, 2, 3], [1, 3]) == [1, 3]
    assert slot_order([1, 2, 3, 4], [2, 3]) == [3, 2]
    assert slot_order([1, 2, 3], [1, 3, 5]) == [1, 5, 3]
    assert slot_order([1, 2, 3, 4, 5], [1, 5, 6]) == [1, 6, 5]
    assert slot_order([1, 2], []) == []


def test_a_new_frontend_writes_everything_once_then_nothing():
    node = Node()
    node.want(fplan(CIP, [ref("10.244.1.5"), ref("10.244.1.6")]))
    changes = node.sync()
    assert {k: v for k, v in changes.counts().items() if v} == {"backends": 2, "revnat": 1, "slots": 2, "masters": 1}
    assert node.slots() == ["10.244.1.5", "10.244.1.6"]
    sid = node.books.service_ids.get(CIP)
    assert node.writer.revnat[sid][1] == 80
    assert not node.sync()  # the books say it is all there


def test_a_removed_backend_gives_its_slot_to_the_last_and_its_id_back_after_the_commit():
    node = Node()
    node.want(fplan(CIP, [ref("10.244.1.5"), ref("10.244.1.6"), ref("10.244.1.7")]))
    node.sync()
    removed, last = ("10.244.1.6", 8080, TCP), ("10.244.1.7", 8080, TCP)
    gone = node.books.backend_ids.get(removed)
    node.want(fplan(CIP, [ref("10.244.1.5"), ref("10.244.1.7")]))
    changes, pending = node.diff(touched_be=[removed])
    assert [(w.slot, w.backend_id) for w in changes.slots] == [(2, node.books.backend_ids.get(last))]
    assert [slot for _, slot in changes.service_deletes] == [3]
    assert changes.backend_deletes == [gone]
    assert node.books.backend_ids.get(removed) == gone  # not written yet: still held
    node.commit(changes, pending)
    assert node.books.backend_ids.get(removed) is None
    assert node.slots() == ["10.244.1.5", "10.244.1.7"]


def test_a_frontend_gone_is_deleted_master_first_and_its_service_id_released():
    node = Node()
    node.want(fplan(CIP, [ref("10.244.1.5")]))
    node.sync()
    sid = node.books.service_ids.get(CIP)
    node.want()
    changes = node.sync(touched_fe=[CIP], touched_be=[("10.244.1.5", 8080, TCP)])
    assert [slot for _, slot in changes.service_deletes] == [0, 1]  # nothing reaches the slot after
    assert changes.revnat_deletes == [sid]
    assert node.writer.services == {} and node.writer.backends == {} and node.writer.revnat == {}
    assert node.books.service_ids.get(CIP) is None and node.books.frontends == {}


def test_an_uncommitted_diff_leaves_the_books_as_they_were():
    node = Node()
    node.want(fplan(CIP, [ref("10.244.1.5")]))
    changes, _ = node.diff()
    assert changes.masters and node.books.frontends == {} and node.books.backends == {}
    assert node.sync().masters  # the same writes again: nothing was recorded


def test_terminating_backends_keep_their_entry_but_get_no_slot():
    node = Node()
    node.want(fplan(CIP, [ref("10.244.1.5"), ref("10.244.1.6", lb.BE_STATE_TERMINATING)]))
    node.sync()
    assert node.slots() == ["10.244.1.5"]
    assert sorted(str(b.address) for b in node.writer.backends.values()) == ["10.244.1.5", "10.244.1.6"]


def test_maglev_tables_per_backend_set_and_random_in_the_internal_scope():
    node = Node()
    other = ("10.96.0.11", 80, TCP)
    backends = [ref("10.244.1.5"), ref("10.244.1.6")]
    node.want(fplan(CIP, backends, maglev=True, internal=tuple(backends[:1]), algorithm=lb.ALGORITHM_MAGLEV),
              fplan(other, backends, maglev=True, algorithm=lb.ALGORITHM_MAGLEV))
    changes = node.sync()
    (sid1, t1), (sid2, t2) = changes.maglev
    assert t1 is t2 and len(t1) == SIZE  # one table built for one backend set
    masters = {(m.frontend.address, m.frontend.scope): m.algorithm for m in changes.masters}
    internal = [a for (addr, scope), a in masters.items() if scope == lb.SCOPE_INTERNAL]
    assert internal == [lb.ALGORITHM_RANDOM]
    assert set(masters.values()) == {lb.ALGORITHM_MAGLEV, lb.ALGORITHM_RANDOM}
    node.want(fplan(CIP, backends[:1], maglev=True, algorithm=lb.ALGORITHM_MAGLEV),
              fplan(other, backends, maglev=True, algorithm=lb.ALGORITHM_MAGLEV))
    changes = node.sync()
    assert [sid for sid, _ in changes.maglev] == [node.books.service_ids.get(CIP)]  # only the changed set


def test_stale_leftovers_of_a_restore_are_deleted_and_their_ids_released():
    node = Node()
    node.books.backend_ids.restore(("stale", 9), 9)
    node.books.service_ids.restore(("stale", 4), 4)
    node.books.revnat[4] = ("10.96.0.99", 80)
    node.books.stale = [("backend", 9), ("service", 4)]
    changes, pending = node.diff()
    assert (changes.backend_deletes, changes.revnat_deletes) == ([9], [4])
    assert node.books.stale == []
    node.books.commit(changes, pending)
    assert node.books.backend_ids.key_of(9) is None and node.books.service_ids.key_of(4) is None
    assert 4 not in node.books.revnat
