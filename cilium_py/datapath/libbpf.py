"""The few libbpf calls BCC's Python lacks: opening pinned objects, pinning, map access by
fd (so the CLI can read pinned maps without compiling anything), batch lookups, and
BPF_PROG_TEST_RUN.

libbpf >= 1.0 returns -errno from every call; `_check` turns that into OSError.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class BpfTestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class BpfMapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class BpfMapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    vp, c_int, u32p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)
    signatures = {
        "bpf_obj_get": ([ctypes.c_char_p], c_int),
        "bpf_obj_pin": ([c_int, ctypes.c_char_p], c_int),
        "bpf_map_lookup_elem": ([c_int, vp, vp], c_int),
        "bpf_map_update_elem": ([c_int, vp, vp, ctypes.c_uint64], c_int),
        "bpf_map_delete_elem": ([c_int, vp], c_int),
        "bpf_map_get_next_key": ([c_int, vp, vp], c_int),
        "bpf_map_lookup_batch": ([c_int, vp, vp, vp, vp, u32p, vp], c_int),
        "bpf_map_delete_batch": ([c_int, vp, u32p, vp], c_int),
        "bpf_map_update_batch": ([c_int, vp, vp, u32p, vp], c_int),
        "bpf_obj_get_info_by_fd": ([c_int, vp, u32p], c_int),
        "bpf_prog_test_run_opts": ([c_int, ctypes.POINTER(BpfTestRunOpts)], c_int),
        "bpf_map_create": ([c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                            ctypes.c_uint32, vp], c_int),
        "bpf_map_get_fd_by_id": ([ctypes.c_uint32], c_int),
        # cgroup attachments (socket load balancing)
        "bpf_prog_attach": ([c_int, c_int, c_int, ctypes.c_uint], c_int),
        "bpf_prog_detach2": ([c_int, c_int, c_int], c_int),
        "bpf_prog_query": ([c_int, c_int, ctypes.c_uint32, u32p, u32p, u32p], c_int),
        "bpf_prog_get_fd_by_id": ([ctypes.c_uint32], c_int),
    }
    for fname, (args, res) in signatures.items():
        fn = getattr(lib, fname)
        fn.argtypes = args
        fn.restype = res
    return lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def obj_get(path: str) -> int:
    """Opens a pinned map or program and returns a new fd."""
    return _check(_lib().bpf_obj_get(os.fsencode(path)), f"open pinned object {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin at {path}")


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """A new unpinned map; returns its fd (used for the inner maps of map-in-map)."""
    return _check(_lib().bpf_map_create(map_type, name.encode(), key_size, value_size,
                                        max_entries, None), f"create map {name}")


def map_fd_by_id(map_id: int) -> int:
    return _check(_lib().bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def map_lookup(fd: int, key, value) -> bool:
    ret = _lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "map lookup")
    return True


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    _check(_lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags), "map update")


def map_delete(fd: int, key) -> bool:
    ret = _lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "map delete")
    return True


def map_next_key(fd: int, key, next_key) -> bool:
    """Fills next_key with the key after `key` (the first key when key is None)."""
    ret = _lib().bpf_map_get_next_key(fd, ctypes.byref(key) if key is not None else None,
                                      ctypes.byref(next_key))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "map iteration")
    return True


def _copy(ctype, item):
    # Arrays of simple ctypes (c_uint32 * n) index to plain ints, arrays of structs to views.
    if isinstance(item, (int, float, bytes)):
        return ctype(item)
    return ctype.from_buffer_copy(item)


def map_lookup_batch(fd: int, key_type, value_type, batch: int = 4096):
    """Yields (key, value) pairs in batches. Raises OSError(EINVAL/ENOTSUPP) for map types
    without batch support, so callers can fall back to key iteration."""
    keys = (key_type * batch)()
    values = (value_type * batch)()
    # The position token is a u32 bucket for hash maps but a whole key for the generic
    # batch code (LPM tries, arrays): size it for either, or the kernel writes past it.
    token_size = max(8, ctypes.sizeof(key_type))
    in_batch = ctypes.create_string_buffer(token_size)
    out_batch = ctypes.create_string_buffer(token_size)
    opts = BpfMapBatchOpts(sz=ctypes.sizeof(BpfMapBatchOpts))
    first = True
    while True:
        count = ctypes.c_uint32(batch)
        ret = _lib().bpf_map_lookup_batch(
            fd, None if first else in_batch, out_batch,
            keys, values, ctypes.byref(count), ctypes.byref(opts))
        done = ret == -errno.ENOENT
        if ret < 0 and not done:
            _check(ret, "map batch lookup")
        for i in range(count.value):
            yield _copy(key_type, keys[i]), _copy(value_type, values[i])
        if done:
            return
        ctypes.memmove(in_batch, out_batch, token_size)
        first = False


def map_update_batch(fd: int, keys, values, count: int, elem_flags: int = BPF_ANY) -> int:
    """Writes `count` entries in one syscall (BPF_MAP_UPDATE_BATCH, kernel 5.6+). `keys`
    and `values` are buffers of `count` packed keys and values (ctypes arrays, numpy
    arrays). Elements are written in order. On failure the OSError carries `done`, the
    number of elements written before the one that failed."""
    return _batch_op("bpf_map_update_batch", "map batch update", fd, count, elem_flags,
                     _address(keys), _address(values))


def map_delete_batch(fd: int, keys, count: int) -> int:
    """Deletes `count` keys in one syscall; like map_update_batch, a failure (ENOENT for
    a missing key) stops at that key and the OSError carries `done`."""
    return _batch_op("bpf_map_delete_batch", "map batch delete", fd, count, 0, _address(keys))


def _address(buf) -> int:
    if hasattr(buf, "ctypes"):  # numpy
        return buf.ctypes.data
    return ctypes.addressof(buf)


def _batch_op(fname: str, what: str, fd: int, count: int, elem_flags: int, *buffers) -> int:
    if count == 0:
        return 0
    n = ctypes.c_uint32(count)
    opts = BpfMapBatchOpts(sz=ctypes.sizeof(BpfMapBatchOpts), elem_flags=elem_flags)
    ret = getattr(_lib(), fname)(fd, *buffers, ctypes.byref(n), ctypes.byref(opts))
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        err = OSError(code, f"{what} ({n.value} of {count} done): {os.strerror(code)}")
        err.done = n.value
        raise err
    return n.value


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None,
                  data_out_size: int = 0) -> tuple[int, int, bytes]:
    """Runs a loaded program on one packet: (return value, ns per run, packet out)."""
    data_in = ctypes.create_string_buffer(data, len(data))
    out_size = data_out_size or len(data) + 256
    data_out = ctypes.create_string_buffer(out_size)
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts))
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = out_size
    opts.repeat = repeat
    ctx_buf = None
    if ctx is not None:
        ctx_buf = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(ctx_buf, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, opts.duration, data_out.raw[: opts.data_size_out]


# -- cgroup attachments ------------------------------------------------------------------

BPF_F_ALLOW_MULTI = 1 << 1


class BpfProgInfo(ctypes.Structure):
    """The leading fields of struct bpf_prog_info; the kernel fills what the size covers."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _check(_lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "attach program")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Detaches exactly this program (bpf_prog_detach2), leaving others on the target."""
    _check(_lib().bpf_prog_detach2(prog_fd, target_fd, attach_type), "detach program")


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """IDs of the programs attached to the target (a cgroup) for one attach type."""
    ids = (ctypes.c_uint32 * max_progs)()
    count = ctypes.c_uint32(max_progs)
    attach_flags = ctypes.c_uint32(0)
    _check(_lib().bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(attach_flags), ids,
                                 ctypes.byref(count)), "query attached programs")
    return list(ids[: count.value])


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def prog_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return info
