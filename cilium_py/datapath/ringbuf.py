"""A consumer of a BPF ring buffer map that reads records in batches straight from the
shared memory, without a per-record callback.

BCC's reader calls back into Python through ctypes once per record, which costs more than
decoding the record. The kernel exposes the ring to user space with mmap instead
(kernel/bpf/ringbuf.c): page 0 holds the consumer position, writable by us; page 1 the
producer position; the data area follows and is mapped twice in a row, so a record that
wraps around the end is still contiguous. Each record starts with an 8-byte header: its
length with a busy bit (still being written) and a discard bit, and a page offset we ignore.

x86 assumption: loads are not reordered with other loads and stores are not reordered
with older loads, so plain reads of the producer position and record header and a plain
store of the consumer position give the acquire/release pairing the kernel expects. The
positions are read and written through ctypes u64 views, one aligned 8-byte access each:
struct.pack_into writes byte-wise, and a kernel reading a half-written consumer position
sees the ring as full and drops events.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import select
import struct

import numpy as np

from cilium_py.datapath import libbpf

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
PAGE_SIZE = mmap.PAGESIZE
BPF_MAP_TYPE_RINGBUF = 27

_u32 = struct.Struct("<I")


class RingBufferError(OSError):
    pass


class RingBufferConsumer:
    """Reads whole batches of records from a BPF_MAP_TYPE_RINGBUF map fd.

    `read()` returns every committed record since the last call (copies, so the space is
    handed back to the producer at once); `wait(timeout_ms)` blocks until the kernel
    signals data. Only one consumer per ring may exist: a second one would race on the
    consumer position.
    """

    def __init__(self, map_fd: int):
        info = libbpf.map_info(map_fd)
        if info.type != BPF_MAP_TYPE_RINGBUF:
            raise RingBufferError(f"map {info.name.decode()!r} is not a ring buffer (type {info.type})")
        self.size = info.max_entries
        self._mask = self.size - 1
        self._fd = os.dup(map_fd)
        self._consumer = mmap.mmap(self._fd, PAGE_SIZE, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(self._fd, PAGE_SIZE + 2 * self.size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=PAGE_SIZE)
        self._data = memoryview(self._producer)[PAGE_SIZE:]
        self._consumer_pos = ctypes.c_uint64.from_buffer(self._consumer)
        # The producer page is mapped read-only, which ctypes cannot view; numpy can.
        self._producer_pos = np.frombuffer(self._producer, dtype=np.uint64, count=1)
        self._epoll = select.epoll()
        self._epoll.register(self._fd, select.EPOLLIN)
        self.records = 0

    @staticmethod
    def supported() -> bool:
        """The plain loads and stores below are only ordered enough on x86."""
        return platform.machine() in ("x86_64", "AMD64", "i386", "i686")

    def wait(self, timeout_ms: int) -> bool:
        """True when the kernel signalled new data (or the ring is already non-empty)."""
        if self.pending():
            return True
        return bool(self._epoll.poll(timeout_ms / 1000.0 if timeout_ms >= 0 else -1))

    def pending(self) -> bool:
        return int(self._producer_pos[0]) != self._consumer_pos.value

    def read(self, limit: int = 0) -> list[bytes]:
        """Committed records, oldest first; at most `limit` when it is non-zero."""
        consumer = self._consumer_pos.value
        producer = int(self._producer_pos[0])
        data, mask = self._data, self._mask
        out = []
        append = out.append
        while consumer < producer:
            offset = consumer & mask
            header = _u32.unpack_from(data, offset)[0]
            if header & BUSY_BIT:
                break  # reserved but not yet committed: later records wait behind it
            length = header & ~(BUSY_BIT | DISCARD_BIT)
            if not header & DISCARD_BIT:
                start = offset + HEADER_SIZE
                append(bytes(data[start:start + length]))
            consumer += (length + HEADER_SIZE + 7) & ~7
            if limit and len(out) >= limit:
                break
        self._consumer_pos.value = consumer
        self.records += len(out)
        return out

    def close(self) -> None:
        if self._fd < 0:
            return
        self._epoll.close()
        # Views first: an mmap with live exports refuses to close.
        del self._consumer_pos, self._producer_pos
        self._data.release()
        self._producer.close()
        self._consumer.close()
        os.close(self._fd)
        self._fd = -1
