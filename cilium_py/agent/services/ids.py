"""Stable numeric IDs for service frontends and backends.

A service ID (the rev-NAT index, u16) belongs to one frontend (address, port, protocol);
a backend ID (u32) belongs to one backend (address, port, protocol), shared by every
service that uses that backend. An ID is held while anything uses its key and released
only after the map entries carrying it are deleted.

Released IDs are not handed out again until the counter has gone round the whole range:
conntrack and affinity entries name backends by ID, and an ID reused right away could
send such a connection to a different backend. IDs of entries found in the pinned maps
at startup are restored first, so a restarted agent keeps every ID.
"""

from __future__ import annotations

from collections.abc import Hashable

SERVICE_ID_RANGE = (1, 0xFFFF)
BACKEND_ID_RANGE = (1, 0xFFFFFFFF)


class IDExhausted(RuntimeError):
    """Every ID of the range is in use."""


class IDAllocator:
    def __init__(self, what: str, first: int, last: int):
        self.what = what
        self.first, self.last = first, last
        self._next = first
        self._by_key: dict[Hashable, int] = {}
        self._by_id: dict[int, Hashable] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: Hashable) -> int | None:
        return self._by_key.get(key)

    def key_of(self, id_: int) -> Hashable | None:
        return self._by_id.get(id_)

    def acquire(self, key: Hashable) -> int:
        """The key's ID, allocating the next free one for a new key."""
        found = self._by_key.get(key)
        if found is not None:
            return found
        if len(self._by_id) > self.last - self.first:
            raise IDExhausted(f"all {self.last - self.first + 1} {self.what} IDs are in use")
        id_ = self._next
        while id_ in self._by_id:
            id_ = id_ + 1 if id_ < self.last else self.first
        self._next = id_ + 1 if id_ < self.last else self.first
        self._by_key[key] = id_
        self._by_id[id_] = key
        return id_

    def restore(self, key: Hashable, id_: int) -> bool:
        """Takes over an ID found in the maps; False when the ID or the key is taken
        already (a conflicting leftover, which the caller then removes)."""
        if not self.first <= id_ <= self.last or id_ in self._by_id or key in self._by_key:
            return False
        self._by_key[key] = id_
        self._by_id[id_] = key
        # New IDs continue after the highest restored one, not in the gaps before it.
        if id_ >= self._next:
            self._next = id_ + 1 if id_ < self.last else self.first
        return True

    def release(self, key: Hashable) -> int | None:
        id_ = self._by_key.pop(key, None)
        if id_ is not None:
            del self._by_id[id_]
        return id_

    def items(self):
        return self._by_key.items()
