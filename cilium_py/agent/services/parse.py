"""What of a Service, an EndpointSlice or a Pod's hostPorts this node can serve.

The objects arrive parsed and valid (cilium_py.agent.objects: the kinds' parsers, run by the
sources); what is checked here is what only this node's datapath and flags decide. A
Service the datapath cannot serve as written (SCTP, a nodePort outside --node-port-range)
is rejected, never served differently; what is left out on purpose (IPv6 endpoints, a
hostPort that would shadow NodePorts) is a warning.
"""

from __future__ import annotations

from typing import NamedTuple

from cilium_py.agent.errors import InvalidObject, ValidationError
from cilium_py.agent.objects import EndpointSlice, Pod, Service
from cilium_py.agent.objects.base import ip_address
from cilium_py.agent.services.config import ServiceConfig
from cilium_py.vocab import SCTP

SCTP_UNSUPPORTED = "SCTP is not supported by the kube-proxy replacement; use TCP or UDP"


class HostPort(NamedTuple):
    host_port: int
    container_port: int
    protocol: int
    host_ip: str | None           # None: every node address
    path: str                     # the containerPorts entry, for messages


class ServiceValidationError(InvalidObject):
    """An object this node cannot serve; `errors` holds every problem, the exception itself
    describes the first."""

    def __init__(self, errors: list[ValidationError], warnings: list[ValidationError] = ()):
        super().__init__(errors)
        self.warnings = list(warnings)


def _problem(obj, path: str, message: str) -> ValidationError:
    return ValidationError(obj.source, obj.describe(), path, message)


def check_service(service: Service, config: ServiceConfig) -> list[ValidationError]:
    """Warnings about what of `service` is not served; raises ServiceValidationError listing
    every field this node cannot serve as written."""
    errors = []
    for sp in service.ports:
        if sp.protocol == SCTP:
            errors.append(_problem(service, f"{sp.path}.protocol", SCTP_UNSUPPORTED))
        if sp.node_port and not config.in_node_port_range(sp.node_port):
            errors.append(_problem(service, f"{sp.path}.nodePort",
                                   f"{sp.node_port} is outside the NodePort range "
                                   f"{config.node_port_range_text} (--node-port-range)"))
    if errors:
        raise ServiceValidationError(errors)
    return []


def slice_warnings(endpoint_slice: EndpointSlice) -> list[ValidationError]:
    if endpoint_slice.address_type == "IPv4":
        return []
    return [_problem(endpoint_slice, "addressType", f"{endpoint_slice.address_type} endpoints are ignored: "
                                                    "the datapath carries IPv4 only")]


def host_ports(pod: Pod, config: ServiceConfig
               ) -> tuple[list[HostPort], list[ValidationError], list[ValidationError]]:
    """The hostPorts of a Pod's containers: (usable, errors, warnings). A hostPort inside
    the NodePort range is ignored with a warning (it would shadow NodePorts)."""
    out: list[HostPort] = []
    errors: list[ValidationError] = []
    warnings: list[ValidationError] = []
    for port in pod.host_ports:
        if port.protocol == SCTP:
            errors.append(_problem(pod, f"{port.path}.protocol", SCTP_UNSUPPORTED))
            continue
        if config.in_node_port_range(port.host_port):
            warnings.append(_problem(pod, f"{port.path}.hostPort",
                                     f"{port.host_port} is inside the NodePort range "
                                     f"{config.node_port_range_text}; the hostPort is ignored"))
            continue
        host_ip = port.host_ip
        if host_ip is not None:
            ip = ip_address(host_ip)
            if ip.version == 6:
                continue  # no IPv6 traffic reaches it
            host_ip = None if ip.is_unspecified else host_ip
        out.append(HostPort(port.host_port, port.port, port.protocol, host_ip, port.path))
    return out, errors, warnings

