"""A BPF map opened from its pin, with ctypes key and value types.

Each module in this package mirrors one map's C key/value structs (bpf/lib/*.h) once and
wraps the map in domain terms. The mirrors are checked against the layout BCC compiled
(tests/bpf/test_layout.py) and against the pinned map's sizes when a map is opened.
Batch writers that pack many entries at once get their numpy layouts from the same
mirrors (`numpy_dtype`), never from a second hand-written copy.

Inside one process, components that read or write the same pinned map share one file
descriptor: `SomeMap.shared(pin_dir)` hands each caller its own handle on a refcounted fd,
which is closed when the last handle is closed.
"""

from __future__ import annotations

import ctypes
import errno
import copy
import functools
import os
import threading
from dataclasses import dataclass

from cilium_py.datapath import libbpf


class MapLayoutError(RuntimeError):
    """The pinned map does not have the key/value sizes this code was written for."""


class MapNotFound(FileNotFoundError):
    """The map is not pinned: no agent has created this node's datapath yet."""


@functools.cache
def possible_cpus() -> int:
    """Per-CPU maps hold one value slot per possible CPU (not per online CPU)."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


# Network-byte-order field types: a __be16/__be32 in C is one of these in the mirror, so
# wrappers assign plain integers and never swap bytes by hand.
be16 = ctypes.c_uint16.__ctype_be__
be32 = ctypes.c_uint32.__ctype_be__


@functools.cache
def numpy_dtype(struct: type):
    """The numpy record type with the memory layout of a ctypes mirror: the same field
    names, offsets, item size and byte order (a be16/be32 field becomes '>u2'/'>u4').

    numpy reads the layout from the ctypes type itself, so the two cannot drift apart; the
    checks here turn a mirror numpy cannot express (bit fields, say) into an error naming it
    instead of a silently different layout."""
    import numpy as np  # here, not at the top: most map users (the CLI) never need numpy

    if not (isinstance(struct, type) and issubclass(struct, (ctypes.Structure, ctypes.Union))):
        raise TypeError(f"numpy_dtype: {struct!r} is not a ctypes Structure or Union")
    try:
        dtype = np.dtype(struct)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise TypeError(f"numpy_dtype: {struct.__name__} has no numpy equivalent: {e}") from None
    if dtype.itemsize != ctypes.sizeof(struct):
        raise TypeError(f"numpy_dtype: {struct.__name__} is {ctypes.sizeof(struct)} bytes, "
                        f"its numpy layout {dtype.itemsize}")
    for name, *_ in struct._fields_:
        if dtype.fields[name][1] != getattr(struct, name).offset:
            raise TypeError(f"numpy_dtype: {struct.__name__}.{name} is at offset "
                            f"{getattr(struct, name).offset}, numpy puts it at {dtype.fields[name][1]}")
    return dtype


@dataclass
class _SharedFd:
    """One process-wide open of a pinned map and the number of handles using it."""

    first: BpfMap     # the handle that opened it; the others are copies of it
    pin_inode: int    # of the pin when it was opened
    users: int = 0

    @classmethod
    def open(cls, map_cls: type, root: str, args: tuple) -> _SharedFd:
        first = map_cls(root, *args)
        try:
            return cls(first, os.stat(first.path).st_ino)
        except OSError:
            first.close()
            raise

    def still_pinned(self) -> bool:
        """False once the pin was removed or replaced (a new datapath pinned a new map
        there): new users then get the map the pin names now."""
        try:
            return os.stat(self.first.path).st_ino == self.pin_inode
        except OSError:
            return False


# (map class, pin directory, extra constructor arguments) -> the open shared by handles.
_shared: dict[tuple, _SharedFd] = {}
# Re-entrant: a handle dropped without close() is released from __del__, which the garbage
# collector may run on a thread that already holds the lock.
_shared_lock = threading.RLock()


def _reset_shared_lock_in_child() -> None:
    # A fork while another thread held the lock would leave the child's copy locked forever.
    global _shared_lock
    _shared_lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_shared_lock_in_child)


def shared_open_count() -> int:
    """How many pinned maps this process holds open through `shared()` (for tests)."""
    with _shared_lock:
        return len(_shared)


class BpfMap:
    """One pinned map. Subclasses set NAME, KEY, VALUE (and PERCPU for per-CPU maps).

    `SomeMap(pin_dir)` opens a private fd; `SomeMap.shared(pin_dir)` a handle on the fd
    this process shares for that map. Both are closed with `close()` (or `with`)."""

    NAME: str
    KEY: type
    VALUE: type
    PERCPU = False
    _lease: _SharedFd | None = None  # set on handles from shared()
    _shared_key: tuple = ()

    @classmethod
    def shared(cls, root: str, *args):
        """A handle on this process's one fd for the map pinned under `root`.

        Every call returns a new handle (an instance of `cls`) and counts one more user of
        the fd; `close()` on a handle counts one less, and the last close closes the fd, so
        the next `shared()` opens the pin again (as it does when the pin was replaced
        meanwhile). Handles are independent objects: closing one twice, or using one after
        closing it, never affects the others. Extra arguments go to the constructor and are
        part of what is shared (MaglevMap's table size)."""
        key = (cls, os.path.abspath(root), args)
        with _shared_lock:
            entry = _shared.get(key)
            if entry is None or not entry.still_pinned():
                # A replaced entry stays open for the handles it has; their last close ends it.
                entry = _SharedFd.open(cls, root, args)
                _shared[key] = entry
            entry.users += 1
            handle = copy.copy(entry.first)
            handle._lease = entry
            handle._shared_key = key
            return handle

    def __init__(self, root: str):
        self.path = os.path.join(root, self.NAME)
        try:
            self.fd = libbpf.obj_get(self.path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise MapNotFound(
                    f"{self.path} is not pinned: start the agent for this node first "
                    f"(or pass the right --bpf-root/--node)") from None
            raise
        info = libbpf.map_info(self.fd)
        self.max_entries = info.max_entries
        want = (ctypes.sizeof(self.KEY), ctypes.sizeof(self.VALUE))
        if (info.key_size, info.value_size) != want:
            os.close(self.fd)
            raise MapLayoutError(
                f"{self.path}: key/value sizes {info.key_size}/{info.value_size}, this version "
                f"expects {want[0]}/{want[1]}; remove the stale pin and restart the agent")
        self._value_type = self.VALUE
        if self.PERCPU:
            self._value_type = self.VALUE * possible_cpus()

    def close(self) -> None:
        """Closes a private fd; for a shared handle, gives up this handle's use of the fd."""
        lease = self._lease
        if lease is not None:
            self._release(lease)
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _release(self, lease: _SharedFd) -> None:
        with _shared_lock:
            if self._lease is None:  # released meanwhile (close() racing __del__)
                return
            self._lease = None
            self.fd = -1
            lease.users -= 1
            if lease.users == 0:
                if _shared.get(self._shared_key) is lease:
                    del _shared[self._shared_key]
                lease.first.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # Raw access with the ctypes types.
    def lookup(self, key):
        value = self._value_type()
        return value if libbpf.map_lookup(self.fd, key, value) else None

    def update(self, key, value, flags: int = libbpf.BPF_ANY) -> None:
        libbpf.map_update(self.fd, key, value, flags)

    def delete(self, key) -> bool:
        return libbpf.map_delete(self.fd, key)

    def keys(self):
        key, prev = self.KEY(), None
        out = []
        while libbpf.map_next_key(self.fd, prev, key):
            out.append(key)
            prev, key = key, self.KEY()
        return out

    def items(self):
        """All (key, value) pairs: batched where the map type allows it, else by key."""
        try:
            return list(libbpf.map_lookup_batch(self.fd, self.KEY, self._value_type))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524):  # 524: kernel ENOTSUPP
                raise
        pairs = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted between the two calls
                pairs.append((key, value))
        return pairs

    def clear(self) -> int:
        removed = 0
        for key in self.keys():
            removed += self.delete(key)
        return removed

    def __len__(self) -> int:
        return len(self.keys())
