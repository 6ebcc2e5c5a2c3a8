"""A BPF map opened from its pin, with ctypes key and value types.

Each module in this package mirrors one map's C key/value structs (bpf/lib/*.h) once and
wraps the map in domain terms. The mirrors are checked against the layout BCC compiled
(tests/bpf/test_layout.py) and against the pinned map's sizes when a map is opened.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

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


class BpfMap:
    """One pinned map. Subclasses set NAME, KEY, VALUE (and PERCPU for per-CPU maps)."""

    NAME: str
    KEY: type
    VALUE: type
    PERCPU = False

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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

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
