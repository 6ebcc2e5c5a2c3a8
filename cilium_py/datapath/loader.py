"""Compiles the C datapath once with BCC, loads its programs and pins maps and programs.

BCC rewrites map method calls (`map.lookup(&k)`) only in the main source, not in included
headers, so the loader builds one translation unit: the entry files with every
`#include "lib/..."` expanded in place (once each, like an include guard), `#line` markers
keeping compiler errors pointed at the real file and line.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cilium_py.datapath import libbpf
from cilium_py.datapath.bcc_import import import_bcc
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.programs import ENTRY_FILES, PROGRAMS

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
BPFFS_MAGIC = 0xCAFE4A11

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


class DatapathError(RuntimeError):
    """The datapath could not be built or loaded; the message says what to fix."""


def build_source(bpf_dir: Path = BPF_DIR, entries=ENTRY_FILES) -> str:
    seen: set[Path] = set()
    out: list[str] = []

    def expand(path: Path) -> None:
        if path in seen:
            return
        seen.add(path)
        out.append(f'#line 1 "{path}"')
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            match = _LOCAL_INCLUDE.match(line)
            if match:
                expand((path.parent / match.group(1)).resolve())
                out.append(f'#line {lineno + 1} "{path}"')
            else:
                out.append(line)

    for entry in entries:
        expand((bpf_dir / entry).resolve())
    return "\n".join(out) + "\n"


def check_bpffs(path: str) -> None:
    """Pins only survive on bpffs; anywhere else the agent would silently lose its maps."""
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if _fs_magic(probe) != BPFFS_MAGIC:
        raise DatapathError(
            f"{probe} is not on a BPF filesystem: mount it with `mount -t bpf bpf /sys/fs/bpf` "
            f"(make setup does this) or choose --bpf-root on bpffs")


def _fs_magic(path: str) -> int:
    import ctypes

    class Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        raise OSError(ctypes.get_errno(), f"statfs {path}")
    return buf.f_type & 0xFFFFFFFF


@dataclass
class LoadedDatapath:
    """The compiled object, its program fds, and how long building it took."""

    config: DatapathConfig
    bpf: object
    prog_fds: dict[str, int] = field(default_factory=dict)
    compile_seconds: float = 0.0

    def fd(self, program: str) -> int:
        return self.prog_fds[program]

    @property
    def events_table(self):
        return self.bpf[b"ciliumpy_events"]

    def close(self) -> None:
        if self.config.events == "perf":
            # Close the per-CPU perf readers before BCC closes the map; otherwise the
            # table's finalizer later fails on keys that are already gone.
            table = self.events_table
            for cpu in list(getattr(table, "_open_key_fds", {})):
                del table[cpu]
        self.bpf.cleanup()


def load(config: DatapathConfig, pin_programs: bool = True) -> LoadedDatapath:
    """Compiles and loads everything. Maps already pinned under config.pin_dir are reused,
    so state survives an agent restart; missing ones are created and pinned."""
    check_bpffs(config.bpf_root)
    os.makedirs(config.pin_dir, exist_ok=True)
    bcc = import_bcc()
    started = time.monotonic()
    try:
        # BCC wants bytes for source and names; str still works but warns on every call.
        bpf = bcc.BPF(text=build_source().encode(),
                      cflags=config.cflags() + ["-Wno-unused-function"])
    except Exception as e:
        raise DatapathError(f"compiling {', '.join(ENTRY_FILES)} failed: {e}") from e
    loaded = LoadedDatapath(config=config, bpf=bpf)
    for prog in PROGRAMS:
        try:
            loaded.prog_fds[prog.name] = bpf.load_func(
                prog.name.encode(), getattr(bcc.BPF, prog.prog_type),
                attach_type=prog.attach_type).fd
        except Exception as e:
            raise DatapathError(f"the kernel rejected {prog.name}: {e}") from e
    loaded.compile_seconds = time.monotonic() - started
    if pin_programs:
        pin_loaded_programs(loaded)
    log.info("datapath for node %s loaded in %.2fs", config.node, loaded.compile_seconds)
    return loaded


def pin_loaded_programs(loaded: LoadedDatapath) -> None:
    """Pins each program so other processes (the endpoint manager in the CNI or lab) can
    attach the agent's current programs. Each pin is replaced by rename, so a reader
    always finds either the old or the new program."""
    os.makedirs(loaded.config.prog_dir, exist_ok=True)
    for name, fd in loaded.prog_fds.items():
        final = os.path.join(loaded.config.prog_dir, name)
        staging = final + "_new"  # bpffs reserves names with a dot
        if os.path.exists(staging):
            os.unlink(staging)
        libbpf.obj_pin(fd, staging)
        os.replace(staging, final)


def open_pinned_program(config: DatapathConfig, name: str) -> int:
    path = os.path.join(config.prog_dir, name)
    try:
        return libbpf.obj_get(path)
    except FileNotFoundError:  # libbpf's ENOENT, raised as OSError(ENOENT)
        raise DatapathError(f"{path} is not pinned: start the agent for node {config.node} first") from None
