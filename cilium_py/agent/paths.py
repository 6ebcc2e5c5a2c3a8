"""Where a node's agent keeps its run files, and what it names the namespaces it makes.

The daemon, the CLI, the lab and the tests all find an agent by these names, so they are
spelled here and nowhere else: `<run-dir>/<node>/` holds the API socket, the monitor
socket, the ready file and (in lab mode) the listeners' pidfiles. The run directory is
per boot: what lives here means nothing after a reboot, unlike the state directory
(identities, IP allocations), which the agent is given separately.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cilium_py import defaults


@dataclass(frozen=True)
class RunPaths:
    run_dir: str = defaults.RUN_DIR
    node: str = defaults.NODE_NAME

    @property
    def node_dir(self) -> str:
        return os.path.join(self.run_dir, self.node)

    @property
    def api_socket(self) -> str:
        return os.path.join(self.node_dir, "ciliumpy.sock")

    @property
    def monitor_socket(self) -> str:
        return os.path.join(self.node_dir, "monitor.sock")

    @property
    def ready_file(self) -> str:
        """Written with the agent's pid once it serves; removed when it stops."""
        return os.path.join(self.node_dir, "agent.ready")

    @property
    def listeners(self) -> str:
        """Pidfiles of the lab's stand-in containers, one per pod."""
        return os.path.join(self.node_dir, "listeners")

    @property
    def hubble_socket(self) -> str:
        """The Observer API's default socket: one per run directory, as Hubble has one
        default address (the lab gives each lab its own run directory)."""
        return os.path.join(self.run_dir, "hubble.sock")


def pod_netns(node_netns: str, endpoint_name: str) -> str:
    """The network namespace of an endpoint of the node whose namespace is `node_netns`."""
    return f"{node_netns}-pod-{endpoint_name}"


def endpoint_name(pod_key: str) -> str:
    """The endpoint name the control plane gives pod "namespace/name"."""
    return pod_key.replace("/", "-")
