"""The names and numbers every layer shares, each set defined once: IP protocols, reserved
security identities, policy directions, the policy kinds.

Imports nothing of the project's, so the CLI, the datapath, the agent and Hubble can all
use it without pulling each other in. The C side of each number lives in bpf/lib/ (a test
compares them).
"""

from __future__ import annotations

# -- IP protocols ------------------------------------------------------------------------

ANY, ICMP, TCP, UDP, SCTP, ICMPV6 = 0, 1, 6, 17, 132, 58

# The names Kubernetes objects use (Pod containerPorts, Service ports, NetworkPolicy).
K8S_PROTOCOLS: dict[str, int] = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}
# CiliumNetworkPolicy toPorts also takes ANY.
CILIUM_PROTOCOLS: dict[str, int] = {"ANY": ANY, **K8S_PROTOCOLS}
# What the CLI and flows print for a protocol number.
PROTOCOL_NAMES: dict[int, str] = {ICMP: "ICMP", TCP: "TCP", UDP: "UDP", SCTP: "SCTP",
                                  ICMPV6: "ICMPv6"}


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


def protocol_number(name: str) -> int:
    """A Kubernetes protocol name (case-insensitive) to its number; KeyError if unknown."""
    return CILIUM_PROTOCOLS[name.upper()]


# -- reserved identities (Cilium's numbers; bpf/lib/common.h) ---------------------------

RESERVED_IDENTITY_NAMES: dict[int, str] = {
    1: "host",
    2: "world",
    3: "unmanaged",
    4: "health",
    5: "init",
    6: "remote-node",
    7: "kube-apiserver",
    8: "ingress",
    9: "world-ipv4",
    10: "world-ipv6",
    11: "overlay-to-encrypt",
}
RESERVED_IDENTITY_IDS: dict[str, int] = {n: i for i, n in RESERVED_IDENTITY_NAMES.items()}
IDENTITY_UNKNOWN = 0
IDENTITY_HOST = 1
IDENTITY_WORLD = 2
IDENTITY_UNMANAGED = 3
IDENTITY_HEALTH = 4
IDENTITY_INIT = 5
IDENTITY_REMOTE_NODE = 6
IDENTITY_KUBE_APISERVER = 7
# The identities a node hands out today (1-7); 8-11 are reserved but never assigned here.
ACTIVE_RESERVED_IDENTITIES = range(IDENTITY_HOST, IDENTITY_KUBE_APISERVER + 1)
# Pods' identities start here (Cilium's cluster-local range); CIDR identities carry the
# local-scope bit, as in Cilium.
FIRST_CLUSTER_IDENTITY = 256
LOCAL_IDENTITY_SCOPE = 1 << 24


def reserved_label(identity: int) -> str | None:
    """`reserved:<name>` for a reserved identity, None otherwise."""
    name = RESERVED_IDENTITY_NAMES.get(identity)
    return f"reserved:{name}" if name else None


# -- policy directions -------------------------------------------------------------------

INGRESS, EGRESS = "ingress", "egress"
DIRECTIONS = (INGRESS, EGRESS)

# -- policy kinds ------------------------------------------------------------------------

NETWORK_POLICY = "NetworkPolicy"
CILIUM_NETWORK_POLICY = "CiliumNetworkPolicy"
CILIUM_CLUSTERWIDE_NETWORK_POLICY = "CiliumClusterwideNetworkPolicy"
POLICY_KINDS = (NETWORK_POLICY, CILIUM_NETWORK_POLICY, CILIUM_CLUSTERWIDE_NETWORK_POLICY)
