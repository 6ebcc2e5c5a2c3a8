"""The datapath's entry programs, each listed once: the bpf/*.c file it is compiled from,
how the kernel loads it and where the agent attaches it.

The loader compiles ENTRY_FILES and loads every program here; the endpoint manager, the
daemon and attach.py take the names and hooks they attach from this table instead of
spelling them out. tests/unit/test_c_vocab.py checks the table against the entry files'
functions both ways.
"""

from __future__ import annotations

from typing import NamedTuple

# Where a program is attached.
ENDPOINT_TC = "endpoint-tc"  # tc on the host side of each endpoint's veth
DEVICE_TC = "device-tc"      # tc on each node device (--devices)
DEVICE_XDP = "device-xdp"    # XDP on each node device
CGROUP_SOCK = "cgroup-sock"  # a cgroup v2 socket-address hook on --cgroup-root

# tc hooks of a clsact qdisc.
TC_INGRESS, TC_EGRESS = "ingress", "egress"

# enum bpf_attach_type (include/uapi/linux/bpf.h). A cgroup socket program names its hook
# already when it is loaded, not only when it is attached.
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29


class Program(NamedTuple):
    name: str
    source: str            # the entry file under bpf/
    prog_type: str         # BCC's program type name (BPF.SCHED_CLS...)
    attach: str            # ENDPOINT_TC, DEVICE_TC, DEVICE_XDP or CGROUP_SOCK
    hook: str = ""         # tc: TC_INGRESS/TC_EGRESS; cgroup: the hook as bpftool names it
    attach_type: int = -1  # cgroup: enum bpf_attach_type; -1 for the others


PROGRAMS: tuple[Program, ...] = (
    # The host-side veth's tc ingress sees what the pod sends, its egress what the pod gets.
    Program("cil_from_container", "bpf_lxc.c", "SCHED_CLS", ENDPOINT_TC, TC_INGRESS),
    Program("cil_to_container", "bpf_lxc.c", "SCHED_CLS", ENDPOINT_TC, TC_EGRESS),
    Program("cil_xdp_entry", "bpf_xdp.c", "XDP", DEVICE_XDP),
    # NodePort/LoadBalancer for what enters the node, their replies leaving it.
    Program("cil_from_netdev", "bpf_host.c", "SCHED_CLS", DEVICE_TC, TC_INGRESS),
    Program("cil_to_netdev", "bpf_host.c", "SCHED_CLS", DEVICE_TC, TC_EGRESS),
    Program("cil_sock4_connect", "bpf_sock.c", "CGROUP_SOCK_ADDR", CGROUP_SOCK, "connect4",
            BPF_CGROUP_INET4_CONNECT),
    Program("cil_sock4_sendmsg", "bpf_sock.c", "CGROUP_SOCK_ADDR", CGROUP_SOCK, "sendmsg4",
            BPF_CGROUP_UDP4_SENDMSG),
    Program("cil_sock4_recvmsg", "bpf_sock.c", "CGROUP_SOCK_ADDR", CGROUP_SOCK, "recvmsg4",
            BPF_CGROUP_UDP4_RECVMSG),
    Program("cil_sock4_getpeername", "bpf_sock.c", "CGROUP_SOCK_ADDR", CGROUP_SOCK,
            "getpeername4", BPF_CGROUP_INET4_GETPEERNAME),
)

# The files compiled into the one translation unit, in the order of the table.
ENTRY_FILES = tuple(dict.fromkeys(p.source for p in PROGRAMS))


def attached_at(where: str) -> tuple[Program, ...]:
    return tuple(p for p in PROGRAMS if p.attach == where)


# (name, tc hook) of the programs on each endpoint's veth and on each node device.
ENDPOINT_TC_PROGRAMS = tuple((p.name, p.hook) for p in attached_at(ENDPOINT_TC))
DEVICE_TC_PROGRAMS = tuple((p.name, p.hook) for p in attached_at(DEVICE_TC))
(DEVICE_XDP_PROGRAM,) = (p.name for p in attached_at(DEVICE_XDP))
# name -> attach type, and bpftool's hook name -> attach type, of the socket programs.
SOCK_LB_PROGRAMS = {p.name: p.attach_type for p in attached_at(CGROUP_SOCK)}
CGROUP_HOOKS = {p.hook: p.attach_type for p in attached_at(CGROUP_SOCK)}
