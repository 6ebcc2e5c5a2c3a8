"""A lab node: a network namespace that plays the node's root namespace.

Inside it: `cilium_host` (with the router IP, the pods' gateway, paired with `cilium_net`
as Cilium's devices are) and `eth0`, the node's uplink, paired with `eth0` of a second
namespace `<node>-ext` that plays the outside world. Pods hang off the node namespace by
veth pairs (cilium_py.agent.endpoints).

Nothing here touches the root namespace: all devices are created inside namespaces we
own, and addresses come from 10.244.0.0/16 (pods) and 10.245.0.0/16 (uplinks).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyroute2 import IPRoute

from cilium_py.datapath import netns

NS_PREFIX = "cpy-"


@dataclass(frozen=True)
class NodeAddressing:
    """Addresses of node number `index` (1-250)."""

    index: int

    def __post_init__(self):
        if not 1 <= self.index <= 250:
            raise ValueError(f"node index must be 1-250, not {self.index}")

    @property
    def pod_cidr(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.244.{self.index}.0/24")

    @property
    def router_ip(self) -> ipaddress.IPv4Address:
        return self.pod_cidr.network_address + 1

    @property
    def uplink_ip(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(f"10.245.{self.index}.1")

    @property
    def world_ip(self) -> ipaddress.IPv4Address:
        """The address of the outside namespace on the node's uplink."""
        return ipaddress.IPv4Address(f"10.245.{self.index}.2")

    def pod_ip(self, n: int) -> ipaddress.IPv4Address:
        return self.pod_cidr.network_address + 1 + n


class LabNode:
    def __init__(self, name: str, index: int = 1):
        self.name = name
        self.addressing = NodeAddressing(index)
        self.netns = f"{NS_PREFIX}{name}"
        self.ext_netns = f"{NS_PREFIX}{name}-ext"

    @property
    def router_ip(self) -> ipaddress.IPv4Address:
        return self.addressing.router_ip

    def create(self) -> None:
        """Creates both namespaces and their devices; fails if the node exists."""
        if netns.exists(self.netns):
            raise FileExistsError(f"network namespace {self.netns} exists: is lab node {self.name} already up?")
        netns.create(self.netns)
        try:
            netns.create(self.ext_netns)
            self._setup_devices()
        except BaseException:
            self.destroy()
            raise

    def _setup_devices(self) -> None:
        a = self.addressing
        netns.write_sysctls(self.netns, {
            "net.ipv4.ip_forward": 1,
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
            # IPv4 only for now: IPv6 neighbour discovery on the lxc devices would only
            # show up as UNSUPPORTED_L3_PROTOCOL drops.
            "net.ipv6.conf.all.disable_ipv6": 1,
            "net.ipv6.conf.default.disable_ipv6": 1,
        })
        with netns.entered(self.netns), IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname="cilium_host", kind="veth", peer={"ifname": "cilium_net"})
            host = ipr.link_lookup(ifname="cilium_host")[0]
            ipr.addr("add", index=host, address=str(a.router_ip), prefixlen=32)
            ipr.link("set", index=host, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="cilium_net")[0], state="up")
            ipr.link("add", ifname="eth0", kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": self.ext_netns})
            up = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=up, address=str(a.uplink_ip), prefixlen=30)
            ipr.link("set", index=up, state="up")
        with netns.entered(self.ext_netns), IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ext = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=ext, address=str(a.world_ip), prefixlen=30)
            ipr.link("set", index=ext, state="up")
            ipr.route("add", dst=str(a.pod_cidr), gateway=str(a.uplink_ip))

    def ifindex(self, ifname: str) -> int:
        with netns.entered(self.netns), IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"no device {ifname} in {self.netns}")
        return found[0]

    def owned_namespaces(self) -> list[str]:
        """The node's namespaces and every one named after it: its pods' (the endpoint
        manager names them `<node>-pod-<name>`) and any a test added next to them."""
        return [name for name in netns.list_names(self.netns)
                if name == self.netns or name.startswith(self.netns + "-")]

    def destroy(self) -> None:
        """Removes both namespaces (and every device in them). Pod namespaces are the
        endpoint manager's to remove."""
        netns.remove(self.ext_netns)
        netns.remove(self.netns)
