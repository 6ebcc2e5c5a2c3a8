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
store of the consumer position give the acquire/release pairing the kernel expects.
"""

from __future__ import annotations

import mmap
import os
import select
import struct

from cilium_py.datapath import libbpf

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
PAGE_SIZE = mmap.PAGESIZE
BPF_MAP_TYPE_RINGBUF = 27

_u64 = struct.Struct("<Q")
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
        self._epoll = select.epoll()
        self._epoll.register(self._fd, select.EPOLLIN)
        self.records = 0

    def wait(self, timeout_ms: int) -> bool:
        """True when the kernel signalled new data (or the ring is already non-empty)."""
        if self.pending():
            return True
        return bool(self._epoll.poll(timeout_ms / 1000.0 if timeout_ms >= 0 else -1))

    def pending(self) -> bool:
        return _u64.unpack_from(self._producer, 0)[0] != _u64.unpack_from(self._consumer, 0)[0]

    def read(self, limit: int = 0) -> list[bytes]:
        """Committed records, oldest first; at most `limit` when it is non-zero."""
        consumer = _u64.unpack_from(self._consumer, 0)[0]
        producer = _u64.unpack_from(self._producer, 0)[0]
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
        _u64.pack_into(self._consumer, 0, consumer)
        self.records += len(out)
        return out

    def close(self) -> None:
        if self._fd < 0:
            return
        self._epoll.close()
        self._data.release()
        self._producer.close()
        self._consumer.close()
        os.close(self._fd)
        self._fd = -1
