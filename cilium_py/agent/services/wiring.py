"""How the agent builds, starts and reports its service manager (kept here so the daemon
and the control plane only call in)."""

from __future__ import annotations

import logging

from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.services.endpoints import ControlPlanePods
from cilium_py.agent.services.manager import ServiceManager
from cilium_py.agent.services.writer import BpfWriter

log = logging.getLogger(__name__)


def socket_lb_enabled(agent_config) -> bool:
    return bool(agent_config.cgroup_root) and agent_config.bpf_lb_sock


def acceleration(agent_config) -> str:
    return agent_config.datapath.lb_acceleration


def service_config(agent_config) -> ServiceConfig:
    dp = agent_config.datapath
    return ServiceConfig(
        node=dp.node, node_ips=tuple(agent_config.node_ips),
        node_port_range=agent_config.node_port_range,
        algorithm=dp.lb_algorithm, maglev_table_size=dp.maglev_table_size,
        maglev_seed=agent_config.maglev_hash_seed,
        # The manifests source has no endpointslice controller behind it: the agent derives
        # the endpoints of Services with selectors (unless EndpointSlices are given).
        derive_endpoint_slices=bool(agent_config.manifests),
        lb_map_max=dp.lb_map_max)


def start_services(agent_config, store, control) -> ServiceManager:
    """The service manager over the store, writing this node's pinned lb maps. Its first
    sync waits for the control plane's first regeneration: until then a restarted agent
    does not know its pods' addresses, and would remove their backends only to write them
    again a moment later."""
    dp = agent_config.datapath
    manager = ServiceManager(store, BpfWriter(dp.pin_dir, dp.maglev_table_size),
                             service_config(agent_config), pods=ControlPlanePods(control),
                             socket_lb=socket_lb_enabled(agent_config), acceleration=acceleration(agent_config))
    control.endpoint_listeners.append(manager.pods_changed)
    manager.start(before_first_sync=lambda: control.wait_for_revision(1, 60.0))
    return manager


def kpr_status(agent_config, manager: ServiceManager | None) -> dict:
    """The kube-proxy replacement part of `ciliumpy status`."""
    if manager is not None:
        status = manager.status()
        status["problems"] = manager.problems()
        return status
    return {"enabled": False, "socket_lb": socket_lb_enabled(agent_config),
            "node_port_range": "%d-%d" % agent_config.node_port_range,
            "algorithm": agent_config.datapath.lb_algorithm, "acceleration": acceleration(agent_config),
            "reason": "no manifests source: the agent has no Services to serve"}
