"""Attaching programs to devices with netlink (pyroute2): cls_bpf in direct-action mode on a
clsact qdisc for tc, and XDP. Every call takes an open IPRoute, so the caller decides which
network namespace it works in.

Attach calls replace what is there (same parent, priority and handle), so loading a new
agent swaps programs without a moment where a device has none.
"""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

INGRESS = "ingress"
EGRESS = "egress"
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
