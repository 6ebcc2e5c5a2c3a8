"""What one node's datapath is built with: where its maps live and the compile-time knobs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cilium_py import defaults

EVENT_BACKENDS = ("ringbuf", "perf")
LB_ALGORITHMS = {"random": 1, "maglev": 2}
# Prime table sizes Cilium allows for Maglev (reference §7).
MAGLEV_TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
AGGREGATION_LEVELS = {"none": 0, "medium": 2}
NO_BACKEND_RESPONSES = ("reject", "drop")  # a frontend without backends: ICMP unreachable, or drop
LB_ACCELERATIONS = ("disabled", "native")  # native: NodePort in XDP (cil_xdp_entry) as well


@dataclass(frozen=True)
class DatapathConfig:
    node: str = defaults.NODE_NAME
    bpf_root: str = defaults.BPF_ROOT
    ct_global_tcp_max: int = defaults.CT_GLOBAL_TCP_MAX
    ct_global_any_max: int = defaults.CT_GLOBAL_ANY_MAX
    ct_timeout_tcp: int = defaults.CT_TIMEOUT_REGULAR_TCP
    ct_timeout_syn: int = defaults.CT_TIMEOUT_REGULAR_TCP_SYN
    ct_timeout_fin: int = defaults.CT_TIMEOUT_REGULAR_TCP_FIN
    ct_timeout_any: int = defaults.CT_TIMEOUT_REGULAR_ANY
    events: str = "ringbuf"
    monitor_aggregation: str = defaults.MONITOR_AGGREGATION
    lb_algorithm: str = "random"            # --bpf-lb-algorithm, the default per service
    maglev_table_size: int = 16381          # --bpf-lb-maglev-table-size
    lb_map_max: int = 65536                 # --bpf-lb-map-max: services, backends, rev-NAT
    service_no_backend_response: str = "reject"  # --service-no-backend-response: reject|drop
    lb_acceleration: str = "disabled"       # --bpf-lb-acceleration: native = NodePort in XDP
    # --bpf-policy-map-max: entries one endpoint may have. Cilium gives each endpoint a map
    # of this size; here all share one LPM map sized for POLICY_MAP_ENDPOINTS endpoints at
    # their full budget (no preallocation: the size costs nothing until used).
    policy_map_max: int = defaults.POLICY_MAP_MAX

    def __post_init__(self):
        if self.events not in EVENT_BACKENDS:
            raise ValueError(f"events must be one of {', '.join(EVENT_BACKENDS)}, not {self.events!r}")
        if self.monitor_aggregation not in AGGREGATION_LEVELS:
            raise ValueError(f"monitor aggregation must be one of {', '.join(AGGREGATION_LEVELS)}, "
                             f"not {self.monitor_aggregation!r}")
        if self.lb_algorithm not in LB_ALGORITHMS:
            raise ValueError(f"load-balancing algorithm must be one of {', '.join(LB_ALGORITHMS)}, "
                             f"not {self.lb_algorithm!r}")
        if self.maglev_table_size not in MAGLEV_TABLE_SIZES:
            raise ValueError(f"Maglev table size {self.maglev_table_size} is not one of the primes "
                             f"{', '.join(map(str, MAGLEV_TABLE_SIZES))}")
        if self.service_no_backend_response not in NO_BACKEND_RESPONSES:
            raise ValueError(f"service-no-backend-response must be one of {', '.join(NO_BACKEND_RESPONSES)}, "
                             f"not {self.service_no_backend_response!r}")
        if self.lb_acceleration not in LB_ACCELERATIONS:
            raise ValueError(f"bpf-lb-acceleration must be one of {', '.join(LB_ACCELERATIONS)}, "
                             f"not {self.lb_acceleration!r}")
        if not 16 <= self.policy_map_max <= 1 << 20:
            raise ValueError(f"bpf-policy-map-max {self.policy_map_max} is outside 16-{1 << 20}")
        if not self.node or "/" in self.node:
            raise ValueError(f"node name {self.node!r} must be non-empty and contain no '/'")

    @property
    def pin_dir(self) -> str:
        return os.path.join(self.bpf_root, self.node)

    @property
    def prog_dir(self) -> str:
        return os.path.join(self.pin_dir, "progs")

    @property
    def policy_map_size(self) -> int:
        return self.policy_map_max * defaults.POLICY_MAP_ENDPOINTS

    def cflags(self) -> list[str]:
        flags = [
            f'-DPIN_ROOT="{self.pin_dir}"',
            f"-DCT_MAP_SIZE_TCP={self.ct_global_tcp_max}",
            f"-DCT_MAP_SIZE_ANY={self.ct_global_any_max}",
            f"-DCT_TIMEOUT_TCP={self.ct_timeout_tcp}",
            f"-DCT_TIMEOUT_SYN={self.ct_timeout_syn}",
            f"-DCT_TIMEOUT_CLOSE={self.ct_timeout_fin}",
            f"-DCT_TIMEOUT_ANY={self.ct_timeout_any}",
            f"-DMONITOR_AGGREGATION={AGGREGATION_LEVELS[self.monitor_aggregation]}",
            f"-DEVENTS_RINGBUF_PAGES={defaults.EVENTS_RINGBUF_PAGES}",
            f"-DLB_ALGORITHM={LB_ALGORITHMS[self.lb_algorithm]}",
            f"-DLB_MAGLEV_LUT_SIZE={self.maglev_table_size}",
            f"-DLB_SERVICE_MAP_SIZE={self.lb_map_max}",
            f"-DLB_BACKEND_MAP_SIZE={self.lb_map_max}",
            f"-DLB_REVNAT_MAP_SIZE={self.lb_map_max}",
            f"-DSERVICE_NO_BACKEND_DROP={int(self.service_no_backend_response == 'drop')}",
            f"-DENABLE_NODEPORT_ACCELERATION={int(self.lb_acceleration == 'native')}",
            f"-DPOLICY_MAP_SIZE={self.policy_map_size}",
        ]
        if self.events == "perf":
            flags.append("-DEVENTS_PERF")
        return flags
