"""Attaching programs to devices with netlink (pyroute2): cls_bpf in direct-action mode on a
clsact qdisc for tc, and XDP. Every call takes an open IPRoute, so the caller decides which
network namespace it works in. The socket hooks go on a cgroup (last section).

Attach calls replace what is there (same parent, priority and handle), so loading a new
agent swaps programs without a moment where a device has none.
"""

from __future__ import annotations

import errno
import os
import re

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cilium_py.datapath import libbpf
from cilium_py.datapath.programs import CGROUP_HOOKS, SOCK_LB_PROGRAMS
from cilium_py.datapath.programs import TC_EGRESS as EGRESS
from cilium_py.datapath.programs import TC_INGRESS as INGRESS

CLSACT_PARENT = {INGRESS: 0xFFFFFFF2, EGRESS: 0xFFFFFFF3}
FILTER_PRIO = 1
FILTER_HANDLE = 1
ETH_P_ALL = 0x0003

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_MODES = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}


def ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    # Ask the kernel rather than list qdiscs first: pyroute2 lists every qdisc of the
    # namespace and filters in Python, which made endpoint creation grow with the node.
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def attach_tc(ipr: IPRoute, ifindex: int, prog_fd: int, direction: str, name: str) -> None:
    ensure_clsact(ipr, ifindex)
    ipr.tc("replace-filter", "bpf", ifindex, FILTER_HANDLE, fd=prog_fd, name=name,
           parent=CLSACT_PARENT[direction], prio=FILTER_PRIO, protocol=ETH_P_ALL,
           classid=1, direct_action=True)


def detach_tc(ipr: IPRoute, ifindex: int) -> None:
    """Removes the clsact qdisc and with it both directions' filters."""
    try:
        ipr.tc("del", "clsact", ifindex)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EINVAL):
            raise


def tc_program_names(ipr: IPRoute, ifindex: int, direction: str) -> list[str]:
    """Names of the BPF programs attached in one direction."""
    names = []
    for flt in ipr.get_filters(index=ifindex, parent=CLSACT_PARENT[direction]):
        opts = flt.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name:
            names.append(name)
    return names


def attach_xdp(ipr: IPRoute, ifindex: int, prog_fd: int, mode: str = "native") -> None:
    ipr.link("set", index=ifindex,
             xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", XDP_MODES[mode])]})


def detach_xdp(ipr: IPRoute, ifindex: int, mode: str = "native") -> None:
    ipr.link("set", index=ifindex,
             xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_MODES[mode])]})


def xdp_program_id(ipr: IPRoute, ifindex: int) -> int:
    link = ipr.get_links(ifindex)[0]
    xdp = link.get_attr("IFLA_XDP")
    return (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp is not None else 0


# -- cgroup socket hooks (socket load balancing) ------------------------------------------
#
# bpf_sock.c's programs go on one cgroup v2 directory (--cgroup-root) with BPF_F_ALLOW_MULTI,
# so programs others attached there stay untouched. A new agent attaches its programs first
# and only then detaches the ones it replaces (found by name), so sockets of the cgroup are
# never without a translation. Removing the cgroup detaches everything on it.

BPF_OBJ_NAME_LEN = 16  # the kernel keeps the first 15 characters of a program's name


class CgroupError(ValueError):
    """A cgroup path the socket hooks must not (or cannot) be attached to."""


def _unescape_mount_path(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, str]:
    """Every mount point -> its filesystem type, from mountinfo."""
    mounts = {}
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                mounts[_unescape_mount_path(fields[4])] = right.split()[0]
    return mounts


def check_cgroup_root(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The real path of a cgroup v2 directory the socket hooks may attach to. Refuses a
    path that is not a directory of a cgroup v2 hierarchy and the root of any cgroup v2
    mount (the machine's root cgroup: every process of the host would be translated)."""
    if not path:
        raise CgroupError("no cgroup given")
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise CgroupError(f"cgroup {path} does not exist: create it (mkdir) under a cgroup v2 "
                          f"mount such as /sys/fs/cgroup/unified first")
    mounts = cgroup2_mounts(mountinfo)
    owner = max((m for m in mounts if real == m or real.startswith(m.rstrip("/") + "/")),
                key=len, default=None)
    if owner is None or mounts[owner] != "cgroup2":
        raise CgroupError(f"{path} is not in a cgroup v2 hierarchy (socket load balancing needs "
                          f"a cgroup v2 directory, e.g. one under /sys/fs/cgroup/unified)")
    if real == owner:
        raise CgroupError(f"{path} is the root of the cgroup v2 mount {owner}: socket load "
                          f"balancing never attaches to a root cgroup; give a child cgroup "
                          f"(e.g. {owner.rstrip('/')}/ciliumpy) and put the pods' processes in it")
    # A cgroup holding init or the agent itself (system.slice, user.slice...) would put the
    # host's own sockets under the service hooks.
    for who, pid in (("init (PID 1)", 1), ("the agent", os.getpid())):
        inside = _cgroup2_path_of(pid, owner)
        if inside is not None and (inside == real or inside.startswith(real.rstrip("/") + "/")):
            raise CgroupError(f"{path} contains {who}: socket load balancing attaches only to a "
                              f"cgroup of its own pods (e.g. {owner.rstrip('/')}/ciliumpy)")
    return real


def _cgroup2_path_of(pid: int, mount: str) -> str | None:
    """The directory under `mount` of the cgroup v2 group `pid` is in; None if unknown."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                hierarchy, _, rest = line.rstrip("\n").partition(":")
                controllers, _, group = rest.partition(":")
                if hierarchy == "0" and not controllers:
                    return os.path.join(mount, group.lstrip("/")).rstrip("/") or mount
    except OSError:
        pass
    return None


def _attached(cg_fd: int, attach_type: int) -> list[tuple[int, str]]:
    """(id, name) of every program attached to the cgroup for one hook."""
    out = []
    for prog_id in libbpf.prog_query(cg_fd, attach_type):
        try:
            fd = libbpf.prog_fd_by_id(prog_id)
        except OSError:
            continue  # detached and freed meanwhile
        try:
            out.append((prog_id, libbpf.prog_info(fd).name.decode(errors="replace")))
        finally:
            os.close(fd)
    return out


def _detach_id(cg_fd: int, attach_type: int, prog_id: int) -> bool:
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError:
        return False
    try:
        libbpf.prog_detach(fd, cg_fd, attach_type)
        return True
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    finally:
        os.close(fd)


def attach_cgroup(path: str, prog_fds: dict[str, int]) -> None:
    """Attaches each named program to its hook of the cgroup, replacing an earlier program
    of the same name (attach the new one, then detach the old)."""
    real = check_cgroup_root(path)
    cg_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, fd in prog_fds.items():
            attach_type = SOCK_LB_PROGRAMS[name]
            new_id = libbpf.prog_info(fd).id
            kernel_name = name[: BPF_OBJ_NAME_LEN - 1]
            present = _attached(cg_fd, attach_type)
            if new_id not in {pid for pid, _ in present}:
                libbpf.prog_attach(fd, cg_fd, attach_type, libbpf.BPF_F_ALLOW_MULTI)
            for prog_id, pname in present:
                if pname == kernel_name and prog_id != new_id:
                    _detach_id(cg_fd, attach_type, prog_id)
    finally:
        os.close(cg_fd)


def detach_cgroup(path: str, names=tuple(SOCK_LB_PROGRAMS)) -> int:
    """Detaches our socket programs (by name) from the cgroup; returns how many."""
    real = check_cgroup_root(path)
    cg_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    removed = 0
    try:
        for name in names:
            attach_type = SOCK_LB_PROGRAMS[name]
            for prog_id, pname in _attached(cg_fd, attach_type):
                if pname == name[: BPF_OBJ_NAME_LEN - 1]:
                    removed += _detach_id(cg_fd, attach_type, prog_id)
    finally:
        os.close(cg_fd)
    return removed


def cgroup_program_names(path: str) -> dict[str, list[str]]:
    """Hook name -> names of the programs attached there (any cgroup, also a root one:
    reading is harmless), as `bpftool cgroup show` would list them."""
    cg_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {hook: [n for _, n in _attached(cg_fd, attach_type)]
                for hook, attach_type in CGROUP_HOOKS.items()}
    finally:
        os.close(cg_fd)
