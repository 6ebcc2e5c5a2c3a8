"""ciliumpy_metrics: per-CPU packet and byte counters by (reason, direction)
(bpf/lib/metrics.h)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from cilium_py.datapath.reasons import direction_name, drop_reason_name

from .base import BpfMap


class MetricsKey(ctypes.Structure):
    _fields_ = [("reason", ctypes.c_uint8), ("dir", ctypes.c_uint8), ("reserved", ctypes.c_uint16 * 3)]


class MetricsValue(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


@dataclass(frozen=True)
class Metric:
    reason: int
    direction: int
    packets: int
    bytes: int

    @property
    def reason_name(self) -> str:
        return drop_reason_name(self.reason)

    @property
    def direction_name(self) -> str:
        return direction_name(self.direction)


class MetricsMap(BpfMap):
    NAME = "ciliumpy_metrics"
    KEY = MetricsKey
    VALUE = MetricsValue
    PERCPU = True

    def list(self) -> list[Metric]:
        """Counters summed over CPUs."""
        out = [Metric(k.reason, k.dir, sum(c.count for c in v), sum(c.bytes for c in v))
               for k, v in self.items()]
        return sorted(out, key=lambda m: (m.reason, m.direction))

    def get(self, reason: int, direction: int) -> Metric:
        value = self.lookup(MetricsKey(reason=reason, dir=direction))
        if value is None:
            return Metric(reason, direction, 0, 0)
        return Metric(reason, direction, sum(c.count for c in value), sum(c.bytes for c in value))
