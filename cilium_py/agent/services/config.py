"""What the service control plane of one node is configured with."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cilium_py.agent.services.maglev import DEFAULT_SEED, DEFAULT_TABLE_SIZE, check_table_size, murmur_seed
from cilium_py.datapath.config import LB_ALGORITHMS as ALGORITHMS

DEFAULT_NODE_PORT_RANGE = (30000, 32767)
# Where the agent picks a ClusterIP for a Service whose manifest gives none (the API
# server's default --service-cluster-ip-range; a cluster's API server always fills it in).
DEFAULT_SERVICE_CIDR = "10.96.0.0/12"


def parse_node_port_range(value: str | tuple) -> tuple[int, int]:
    """"30000-32767" (or a (low, high) pair) -> (30000, 32767), checked."""
    if isinstance(value, (tuple, list)):
        lo, hi = value
    else:
        text = str(value).strip()
        lo_s, sep, hi_s = text.partition("-")
        if not sep:
            raise ValueError(f"node port range {value!r} must look like 30000-32767")
        try:
            lo, hi = int(lo_s), int(hi_s)
        except ValueError:
            raise ValueError(f"node port range {value!r} must be two port numbers, e.g. 30000-32767") from None
    if not (1 <= lo <= hi <= 65535):
        raise ValueError(f"node port range {lo}-{hi} must satisfy 1 <= low <= high <= 65535")
    return int(lo), int(hi)


@dataclass(frozen=True)
class ServiceConfig:
    node: str = "default"
    node_ips: tuple[str, ...] = ()       # NodePort and hostPort frontends live on these
    node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE
    algorithm: str = "random"            # the agent default (--bpf-lb-algorithm)
    maglev_table_size: int = DEFAULT_TABLE_SIZE
    maglev_seed: str = DEFAULT_SEED
    service_cidr: str = DEFAULT_SERVICE_CIDR
    # Without an endpointslice controller (manifests, lab) the agent derives the endpoints
    # of a Service with a selector from the pods, unless EndpointSlices are given.
    derive_endpoint_slices: bool = False
    lb_map_max: int = 65536              # entries of the services and backends maps

    def __post_init__(self):
        object.__setattr__(self, "node_port_range", parse_node_port_range(self.node_port_range))
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"load-balancing algorithm must be one of {', '.join(ALGORITHMS)}, "
                             f"not {self.algorithm!r}")
        check_table_size(self.maglev_table_size)
        murmur_seed(self.maglev_seed)  # raises MaglevError (a ValueError) for a bad seed
        for ip in self.node_ips:
            ipaddress.IPv4Address(ip)
        ipaddress.IPv4Network(self.service_cidr)
        if self.lb_map_max < 1:
            raise ValueError(f"lb map size {self.lb_map_max} must be positive")

    @property
    def node_port_range_text(self) -> str:
        return f"{self.node_port_range[0]}-{self.node_port_range[1]}"

    def in_node_port_range(self, port: int) -> bool:
        lo, hi = self.node_port_range
        return lo <= port <= hi
