"""Endpoints: a pod network namespace joined to the node namespace by a veth pair, with an
address, routes, a gateway, its entries in the endpoint map and ipcache, and the datapath's
programs on the host-side veth.

No compile happens here: the programs are the agent's pinned ones (DESIGN.md §3), so an
endpoint costs a namespace, a veth pair and a few map writes.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cilium_py.agent.ipcache import SOURCE_LOCAL, IPCache
from cilium_py.agent.paths import pod_netns
from cilium_py.datapath import attach, netns
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.loader import open_pinned_program
from cilium_py.datapath.maps.endpoints import (
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    Endpoint,
    EndpointMap,
)
from cilium_py.datapath.maps.ipcache import IPCacheMap
from cilium_py.datapath.maps.policy import PolicyMap

log = logging.getLogger(__name__)

MAX_ENDPOINT_ID = 65535
POD_IFNAME = "eth0"
PROGRAMS = (("cil_from_container", attach.INGRESS), ("cil_to_container", attach.EGRESS))


class EndpointError(RuntimeError):
    """An endpoint could not be created or removed; nothing half-made is left behind."""


@dataclass(frozen=True)
class EndpointHandle:
    name: str
    endpoint_id: int
    ip: ipaddress.IPv4Address
    identity: int
    netns: str
    host_ifname: str
    ifindex: int


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    """The device's ifindex, asked of the kernel by name (pyroute2's link_lookup dumps every
    link of the namespace, which grows with the number of endpoints)."""
    try:
        return ipr.link("get", ifname=ifname)[0]["index"]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def host_ifname(pod_netns: str) -> str:
    """A stable, unique device name under the 15-byte limit, like Cilium's lxcXXXX."""
    return "lxc" + hashlib.sha256(pod_netns.encode()).hexdigest()[:11]


class EndpointManager:
    def __init__(self, config: DatapathConfig, node_netns: str, router_ip=None,
                 ipcache: IPCache | None = None):
        """`router_ip` is the pods' gateway; only creating endpoints needs it. `ipcache` is
        the process's ipcache owner (the agent's, shared with its other writers); without
        one the manager owns one of its own."""
        self.config = config
        self.node_netns = node_netns
        self.router_ip = ipaddress.IPv4Address(router_ip) if router_ip is not None else None
        self.endpoints = EndpointMap.shared(config.pin_dir)
        self._own_ipcache = ipcache is None
        self.ipcache = ipcache if ipcache is not None else IPCache(IPCacheMap.shared(config.pin_dir))
        self.policy = PolicyMap.shared(config.pin_dir)

    def pod_netns(self, name: str) -> str:
        return pod_netns(self.node_netns, name)

    def _allocate_id(self) -> int:
        used = {e.endpoint_id for e in self.endpoints.list()}
        for candidate in range(1, MAX_ENDPOINT_ID + 1):
            if candidate not in used:
                return candidate
        raise EndpointError("no free endpoint ID: 65535 endpoints exist on this node")

    def create(self, name: str, ip, identity: int, *, closed: bool = False) -> EndpointHandle:
        """`closed`: the endpoint enforces both directions from its first packet, with no
        entries yet, so it denies everything until its policy is written (the control
        plane's endpoints); without it, it allows everything until told otherwise."""
        ip = ipaddress.IPv4Address(ip)
        if self.router_ip is None:
            raise EndpointError(f"endpoint {name}: no router IP given to the endpoint manager")
        if self.endpoints.get(ip) is not None:
            raise EndpointError(f"endpoint {name}: IP {ip} is already used by another endpoint")
        pod_ns = self.pod_netns(name)
        if netns.exists(pod_ns):
            raise EndpointError(f"endpoint {name}: namespace {pod_ns} already exists")
        ifname = host_ifname(pod_ns)
        endpoint_id = self._allocate_id()
        netns.create(pod_ns)
        try:
            with netns.entered(self.node_netns), IPRoute() as ipr:
                ipr.link("add", ifname=ifname, kind="veth",
                         peer={"ifname": POD_IFNAME, "net_ns_fd": pod_ns})
                link = ipr.link("get", ifname=ifname)[0]
                ifindex, node_mac = link["index"], link.get_attr("IFLA_ADDRESS")
            mac = self._setup_pod(pod_ns, ip, node_mac)
            # Map entries before programs and link: the first packet must find its endpoint.
            flags = (ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS) if closed else 0
            self.endpoints.upsert(ip, endpoint_id=endpoint_id, ifindex=ifindex, identity=identity,
                                  mac=mac, node_mac=node_mac, flags=flags)
            self.ipcache.upsert(ip, identity, SOURCE_LOCAL)
            with netns.entered(self.node_netns), IPRoute() as ipr:
                self._attach(ipr, ifindex)
                ipr.link("set", index=ifindex, state="up")
                ipr.route("add", dst=f"{ip}/32", oif=ifindex, scope="link")
                # The pod's MAC is known: no ARP round trip, and no first packets lost
                # while a burst of new connections waits on an unresolved neighbour.
                ipr.neigh("add", dst=str(ip), lladdr=mac, ifindex=ifindex, state="permanent")
        except BaseException as e:
            self._teardown(pod_ns, ip, endpoint_id)
            if isinstance(e, Exception):
                raise EndpointError(f"endpoint {name}: {e}") from e
            raise
        return EndpointHandle(name, endpoint_id, ip, identity, pod_ns, ifname, ifindex)

    def _setup_pod(self, pod_ns: str, ip: ipaddress.IPv4Address, node_mac: str) -> str:
        # IPv4 only for now: without IPv6 the pod sends no router solicitations to be dropped.
        netns.write_sysctls(pod_ns, {"net.ipv6.conf.all.disable_ipv6": 1,
                                     "net.ipv6.conf.default.disable_ipv6": 1})
        with netns.entered(pod_ns), IPRoute() as ipr:
            ipr.link("set", index=link_index(ipr, "lo"), state="up")
            link = ipr.link("get", ifname=POD_IFNAME)[0]
            idx, mac = link["index"], link.get_attr("IFLA_ADDRESS")
            ipr.addr("add", index=idx, address=str(ip), prefixlen=32)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=f"{self.router_ip}/32", oif=idx, scope="link")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(self.router_ip), oif=idx)
            # The gateway's MAC is the host-side veth: no ARP round trip, and no ARP
            # responder needed in the datapath.
            ipr.neigh("add", dst=str(self.router_ip), lladdr=node_mac, ifindex=idx, state="permanent")
        return mac

    def _attach(self, ipr: IPRoute, ifindex: int, prog_fds: dict[str, int] | None = None) -> None:
        for prog, direction in PROGRAMS:
            if prog_fds is not None:
                attach.attach_tc(ipr, ifindex, prog_fds[prog], direction, prog)
                continue
            fd = open_pinned_program(self.config, prog)
            try:
                attach.attach_tc(ipr, ifindex, fd, direction, prog)
            finally:
                os.close(fd)

    def adopt(self, name: str, ip, identity: int) -> EndpointHandle | None:
        """The endpoint a previous agent made for `name`, if it is still whole (namespace,
        device and endpoint-map entry): a restarted agent keeps it instead of recreating it,
        so the pod keeps its connections."""
        pod_ns = self.pod_netns(name)
        if not netns.exists(pod_ns):
            return None
        ep = self.endpoints.get(ip)
        with netns.entered(self.node_netns), IPRoute() as ipr:
            ifindex = link_index(ipr, host_ifname(pod_ns))
        if ep is None or ifindex is None or ep.ifindex != ifindex:
            return None
        if ep.identity != identity:
            self.set_identity(ip, identity)
        else:
            self.ipcache.upsert(ip, identity, SOURCE_LOCAL)  # this process claims it too
        return EndpointHandle(name, ep.endpoint_id, ipaddress.IPv4Address(ip), identity, pod_ns,
                              host_ifname(pod_ns), ifindex)

    def set_identity(self, ip, identity: int) -> None:
        """A label change moved the pod to another identity: both maps follow."""
        ep = self.endpoints.get(ip)
        if ep is None:
            raise EndpointError(f"no endpoint with IP {ip}")
        self.endpoints.upsert(ip, endpoint_id=ep.endpoint_id, ifindex=ep.ifindex, identity=identity,
                              mac=ep.mac, node_mac=ep.node_mac, flags=ep.flags)
        self.ipcache.upsert(ip, identity, SOURCE_LOCAL)

    def reattach_all(self, prog_fds: dict[str, int]) -> int:
        """Puts new programs on every endpoint's device, replacing the old ones in place.
        Returns how many endpoints were updated."""
        count = 0
        with netns.entered(self.node_netns), IPRoute() as ipr:
            present = {link["index"] for link in ipr.get_links()}
            for ep in self.endpoints.list():
                if ep.is_host or ep.ifindex not in present:
                    continue
                self._attach(ipr, ep.ifindex, prog_fds)
                count += 1
        return count

    def delete(self, name: str) -> int | None:
        """Removes the endpoint; returns its endpoint ID (None when none was found), whose
        policy entries went with it."""
        pod_ns = self.pod_netns(name)
        ep = self._find(pod_ns)
        self._teardown(pod_ns, ep.ip if ep else None, ep.endpoint_id if ep else None)
        return ep.endpoint_id if ep else None

    def _find(self, pod_ns: str) -> Endpoint | None:
        ifname = host_ifname(pod_ns)
        with netns.entered(self.node_netns), IPRoute() as ipr:
            ifindex = link_index(ipr, ifname)
        if ifindex is None:
            return None
        return next((e for e in self.endpoints.list() if e.ifindex == ifindex), None)

    def _teardown(self, pod_ns: str, ip, endpoint_id: int | None) -> None:
        """Removes whatever exists of an endpoint; safe to call on a half-made one."""
        if ip is not None:
            self.endpoints.remove(ip)
            self.ipcache.remove(ip, SOURCE_LOCAL)
        if endpoint_id is not None:
            for key in self.policy.entries(endpoint_id):
                self.policy.remove(key)
        if netns.exists(self.node_netns):
            with netns.entered(self.node_netns), IPRoute() as ipr:
                ifindex = link_index(ipr, host_ifname(pod_ns))
                if ifindex is not None:
                    ipr.link("del", index=ifindex)  # takes the pod-side peer and route with it
        netns.remove(pod_ns)

    def list(self) -> list[Endpoint]:
        return [e for e in self.endpoints.list() if not e.is_host]

    def close(self) -> None:
        self.endpoints.close()
        if self._own_ipcache:
            self.ipcache.map.close()
        self.policy.close()
