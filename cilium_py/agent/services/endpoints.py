"""Backends of a Service: from its EndpointSlices, or derived from the pods its selector
matches when no EndpointSlice is given (the lab has no endpointslice controller, so the
agent does that controller's job: ready pods whose labels match, ports resolved by
number or by container port name).

Backend states follow the EndpointSlice conditions: terminating -> terminating (kept for
the connections it has, never chosen for new ones), ready -> active, anything else is
not a backend.
"""

from __future__ import annotations

from typing import NamedTuple

from cilium_py.agent.objects import EndpointSlice, Pod, Service
from cilium_py.datapath.maps.lb import BE_STATE_ACTIVE, BE_STATE_TERMINATING

BackendKey = tuple[str, int, int]   # (address, port, protocol)


class BackendRef(NamedTuple):
    key: BackendKey
    state: int
    local: bool

    @property
    def name(self) -> str:
        """The stable name Maglev hashes (the same on every node)."""
        addr, port, proto = self.key
        return f"{addr}:{port}/{'TCP' if proto == 6 else 'UDP' if proto == 17 else proto}"


class PodAddresses:
    """Which pods run on this node and their addresses. The default knows none; the
    agent plugs in its endpoint manager (ControlPlanePods)."""

    def invalidate(self) -> None:
        pass

    def pod_ip(self, namespace: str, name: str) -> str | None:
        return None

    def is_local(self, ip: str) -> bool:
        return False


class ControlPlanePods(PodAddresses):
    """Pod addresses from the control plane's endpoints (the lab allocates them; pods
    have no status there)."""

    def __init__(self, control):
        self.control = control
        self._ips: set[str] | None = None
        self._generation = 0

    def invalidate(self) -> None:
        """Endpoints changed: the set of local addresses is rebuilt on the next question."""
        self._generation += 1
        self._ips = None

    def pod_ip(self, namespace: str, name: str) -> str | None:
        ep = self.control.endpoints.get(f"{namespace}/{name}")
        if ep is None or ep.state != "ready":
            return None
        return str(ep.handle.ip)

    def is_local(self, ip: str) -> bool:
        ips = self._ips
        if ips is None:
            generation = self._generation
            # A copy made in one step: the regeneration thread changes the dict meanwhile.
            ips = {str(ep.handle.ip) for ep in list(self.control.endpoints.values())}
            # Kept only if no invalidate() ran meanwhile: a set built from a snapshot older
            # than the last change would otherwise stay until the next change.
            if generation == self._generation:
                self._ips = ips
        return ip in ips


def _merge(found: dict[BackendKey, BackendRef], ref: BackendRef) -> None:
    # The same backend twice (two slices, two addresses of one pod): the more usable wins.
    old = found.get(ref.key)
    if old is None or ref.state < old.state or (ref.state == old.state and ref.local and not old.local):
        found[ref.key] = ref


def from_slices(spec: Service, slices: list[EndpointSlice], node: str, pods: PodAddresses) -> dict[int, list[BackendRef]]:
    """Backends per Service port (by index), matched to slice ports by name and protocol."""
    out: dict[int, list[BackendRef]] = {}
    is_local = pods.is_local
    for sp in spec.ports:
        found: dict[BackendKey, BackendRef] = {}
        for sl in slices:
            for port in sl.ports:
                if port.name != sp.name or port.protocol != sp.protocol:
                    continue
                number, proto = port.port, port.protocol
                for ep in sl.endpoints:
                    if ep.terminating:
                        state = BE_STATE_TERMINATING
                    elif ep.ready:
                        state = BE_STATE_ACTIVE
                    else:
                        continue
                    key = (ep.address, number, proto)
                    ref = BackendRef(key, state, ep.node_name == node or is_local(ep.address))
                    if key in found:
                        _merge(found, ref)
                    else:
                        found[key] = ref
        # BackendRefs sort by their key first, and keys are unique here.
        out[sp.index] = sorted(found.values())
    return out


def from_pods(spec: Service, candidates: list[Pod], node: str, pods: PodAddresses) -> dict[int, list[BackendRef]]:
    """What the endpointslice controller would publish for `spec`, from the pods of its
    namespace."""
    out: dict[int, list[BackendRef]] = {sp.index: [] for sp in spec.ports}
    selected = []
    for pod in candidates:
        if not pod.matches(spec.selector):
            continue
        ip = pod.ip or pods.pod_ip(pod.namespace, pod.name)
        if ip is None:
            continue
        ready = pod.ready if pod.ready is not None else True
        if pod.terminating:
            state = BE_STATE_TERMINATING
        elif ready:
            state = BE_STATE_ACTIVE
        else:
            continue
        local = pod.node_name == node or pods.is_local(ip)
        selected.append((pod, ip, state, local))
    for sp in spec.ports:
        found: dict[BackendKey, BackendRef] = {}
        for pod, ip, state, local in selected:
            port = pod.container_port(sp.target_port, sp.protocol)
            if port is not None:
                _merge(found, BackendRef((ip, port, sp.protocol), state, local))
        out[sp.index] = sorted(found.values())
    return out


__all__ = ["BackendKey", "BackendRef", "ControlPlanePods", "PodAddresses", "from_pods", "from_slices"]

