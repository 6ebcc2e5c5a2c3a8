"""What a node runs next to its endpoints, outside the datapath: the seam through which
lab mode starts stand-in containers without the control plane knowing about them."""

from __future__ import annotations

from cilium_py.agent.endpoints import EndpointHandle


class EndpointHooks:
    """Called by the control plane as endpoints come and go; does nothing by default.

    `endpoint_created` runs for every endpoint the agent creates or adopts (also after a
    restart); an exception fails the endpoint, which is retried like any other failure.
    `endpoint_removed` runs for endpoints removed, also stale ones left by an earlier agent."""

    def endpoint_created(self, key: str, handle: EndpointHandle, ports: list) -> None:
        """`key` is "namespace/name"; `ports` the pod's [(port, "TCP"|"UDP"|"SCTP")]."""

    def endpoint_removed(self, key: str) -> None:
        pass
