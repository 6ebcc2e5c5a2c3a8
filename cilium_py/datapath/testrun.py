"""BPF_PROG_TEST_RUN on loaded programs: one crafted packet in, the verdict out. Used by the
bpf test tier and the per-packet benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

from cilium_py.datapath import libbpf

TC_ACT_OK = 0
TC_ACT_SHOT = 2
XDP_DROP = 1
XDP_PASS = 2


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    ns_per_run: int
    data: bytes


def run(prog_fd: int, packet: bytes, repeat: int = 1) -> TestRunResult:
    retval, duration, data = libbpf.prog_test_run(prog_fd, packet, repeat=repeat)
    return TestRunResult(retval, duration, data)
