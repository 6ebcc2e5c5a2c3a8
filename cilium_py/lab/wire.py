"""Making a veth behave like a physical NIC for native XDP, for the tests and benchmarks
that send traffic through `--bpf-lb-acceleration native` on veth devices.

Two veth quirks stand in the way: a frame a native XDP program sends back out (XDP_TX) is
only picked up by a peer that runs an XDP program itself, and a sender's checksum offload
leaves a partial checksum that XDP cannot complete. A physical NIC needs neither fix.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

from pyroute2 import IPRoute

from cilium_py.datapath import attach, netns

SIOCETHTOOL, ETHTOOL_STXCSUM = 0x8946, 0x17
BPF_PROG_TYPE_XDP, XDP_PASS = 6, 2


def set_tx_checksum_offload(ns: str, ifname: str, on: bool) -> None:
    """`ethtool -K IFNAME tx on|off` inside `ns` (struct ethtool_value through SIOCETHTOOL)."""
    value = ctypes.create_string_buffer(struct.pack("=II", ETHTOOL_STXCSUM, int(on)), 8)
    ifreq = struct.pack("16sQ", ifname.encode(), ctypes.addressof(value)) + b"\0" * 16
    with netns.entered(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCETHTOOL, ifreq)


def attach_xdp_pass(ns: str, ifname: str) -> None:
    """A two-instruction program returning XDP_PASS, attached natively to `ifname` in `ns`."""
    insns = struct.pack("<BBhi", 0xB7, 0, 0, XDP_PASS) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p,
                                  ctypes.c_size_t, ctypes.c_void_p]
    buf = ctypes.create_string_buffer(insns, len(insns))
    fd = lib.bpf_prog_load(BPF_PROG_TYPE_XDP, b"xdp_pass", b"GPL", buf, 2, None)
    if fd < 0:
        raise OSError(-fd, "loading an XDP_PASS program")
    try:
        with netns.entered(ns), IPRoute() as ipr:
            attach.attach_xdp(ipr, ipr.link_lookup(ifname=ifname)[0], fd, "native")
    finally:
        os.close(fd)
