"""Cluster-pool IPAM: one pod CIDR per CiliumNode, cut from the pool the operator is given
(`--cluster-pool-ipv4-cidr`, blocks of `--cluster-pool-ipv4-mask-size`), written to the
node's `spec.ipam.podCIDRs`; errors go to `status.ipam.operator-status.error`.

The allocation is pure (`PoolAllocator`, no API): the controller at the bottom feeds it the
CiliumNodes it lists and writes back what differs. The rules:

* A node that claims pod CIDRs (its spec already has them: given by an earlier run of the
  operator, or by hand) keeps every claim that is a block of the pool and no other node's;
  the operator rebuilds its allocation from the nodes at start this way, so a restart
  changes nobody's CIDR. A claim outside the pool, not a block of it (another size, not
  aligned) or already another node's is reported in the node's operator-status and not
  taken; the operator never rewrites a spec that has claims (the agent may be using them).
* A node without claims gets the lowest free block; with the pool exhausted it gets none
  and an error saying so, and it gets the next block freed (nodes waiting in creation order).
* A deleted node's blocks are free again.
* At start (or for a batch), claims are taken before free blocks are handed out, oldest node
  first (creationTimestamp, then name): so the state after any sequence of changes equals a
  fresh computation from the same nodes as the operator wrote them. (One case differs: when
  an older node is *edited* to claim a newer node's block, the newer node keeps it, and a
  restart gives it to the older one; both specs name it either way and the error moves.)
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cilium_py.k8s.client import ApiError

log = logging.getLogger(__name__)

DEFAULT_MASK_SIZE = 24


CIDR_FLAG, MASK_FLAG = "--cluster-pool-ipv4-cidr", "--cluster-pool-ipv4-mask-size"


class PoolError(ValueError):
    """A pool configuration that cannot work: the flag at fault and why."""

    def __init__(self, flag: str, message: str):
        self.flag, self.message = flag, message
        super().__init__(f"{flag}: {message}")


# -- the pool ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterPool:
    cidrs: tuple[ipaddress.IPv4Network, ...]
    mask_size: int = DEFAULT_MASK_SIZE

    @classmethod
    def parse(cls, cidrs: Iterable[str], mask_size: int = DEFAULT_MASK_SIZE) -> "ClusterPool":
        """From flag values (each may be a comma-separated list, as Cilium's string slices).
        PoolError names what is wrong."""
        networks: list[ipaddress.IPv4Network] = []
        for value in cidrs:
            for text in filter(None, (part.strip() for part in str(value).split(","))):
                try:
                    net = ipaddress.ip_network(text, strict=True)
                except ValueError as e:
                    raise PoolError(CIDR_FLAG, f"{text!r} is not a CIDR: {e}") from None
                if net.version != 4:
                    raise PoolError(CIDR_FLAG, f"{text!r} is not an IPv4 CIDR")
                networks.append(net)
        if not networks:
            raise PoolError(CIDR_FLAG, "no CIDR given")
        if not 1 <= mask_size <= 32:
            raise PoolError(MASK_FLAG, f"{mask_size} is not between 1 and 32")
        for net in networks:
            if mask_size < net.prefixlen:
                raise PoolError(MASK_FLAG, f"/{mask_size} is shorter than the prefix of the pool "
                                           f"CIDR {net}: a node's block cannot be larger than "
                                           f"the pool")
        for i, a in enumerate(networks):
            for b in networks[i + 1:]:
                if a.overlaps(b):
                    raise PoolError(CIDR_FLAG, f"{a} and {b} overlap")
        return cls(tuple(networks), mask_size)

    @property
    def size(self) -> int:
        """Blocks in the pool."""
        return sum(1 << (self.mask_size - net.prefixlen) for net in self.cidrs)

    def describe(self) -> str:
        return f"{', '.join(map(str, self.cidrs))} in /{self.mask_size} blocks"

    def blocks(self) -> Iterable[ipaddress.IPv4Network]:
        """Every block, lowest first within each pool CIDR, the CIDRs in the order given."""
        step = 1 << (32 - self.mask_size)
        for net in self.cidrs:
            first = int(net.network_address)
            for i in range(1 << (self.mask_size - net.prefixlen)):
                yield ipaddress.IPv4Network((first + i * step, self.mask_size))

    def check_block(self, text: str) -> tuple[ipaddress.IPv4Network | None, str]:
        """(the block, "") when `text` is one of the pool's blocks, else (None, why not)."""
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            return None, f"podCIDR {text!r} is not a valid CIDR ({e})"
        if net.version != 4 or not any(net.subnet_of(pool) for pool in self.cidrs):
            return None, f"podCIDR {text} is outside the cluster pool ({self.describe()})"
        if net.prefixlen != self.mask_size:
            return None, (f"podCIDR {text} is not a /{self.mask_size} block of the cluster pool "
                          f"({self.describe()})")
        return net, ""


# -- the allocation ------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeClaim:
    """What the operator reads of a CiliumNode."""

    name: str
    pod_cidrs: tuple[str, ...] = ()
    created: str = ""   # creationTimestamp (RFC 3339 sorts as text)

    @property
    def order(self) -> tuple[str, str]:
        return (self.created, self.name)


@dataclass(frozen=True)
class NodeAllocation:
    """What the operator wants a CiliumNode to hold: spec.ipam.podCIDRs, operator-status.error."""

    pod_cidrs: tuple[str, ...]
    error: str = ""


@dataclass
class _Node:
    claim: NodeClaim
    owned: set[ipaddress.IPv4Network] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


class PoolAllocator:
    """The blocks of one pool and who holds them (see the module docstring)."""

    def __init__(self, pool: ClusterPool):
        self.pool = pool
        self._owner: dict[ipaddress.IPv4Network, str] = {}
        self._nodes: dict[str, _Node] = {}

    # -- changes -----------------------------------------------------------------------

    def sync(self, claims: Iterable[NodeClaim]) -> None:
        """Brings the state to `claims`, the whole current set of nodes: the nodes missing are
        removed, then changed nodes' claims are taken (oldest first), then nodes without a
        block get one."""
        claims = {c.name: c for c in claims}
        for name in [n for n in self._nodes if n not in claims]:
            self._remove(name)
        changed = sorted((c for c in claims.values()
                          if c.name not in self._nodes or self._nodes[c.name].claim != c),
                         key=lambda c: c.order)
        for claim in changed:
            self._take_claims(claim)
        self._settle()

    def update(self, claim: NodeClaim) -> None:
        """One node added or changed (an informer's event)."""
        node = self._nodes.get(claim.name)
        if node is None or node.claim != claim:
            self._take_claims(claim)
        self._settle()

    def remove(self, name: str) -> None:
        """One node deleted: its blocks go to the nodes waiting for one."""
        if self._remove(name):
            self._settle()

    # -- state ---------------------------------------------------------------------------

    def allocation(self, name: str) -> NodeAllocation | None:
        node = self._nodes.get(name)
        if node is None:
            return None
        if node.claim.pod_cidrs:
            # The spec is the node's: never rewritten, only judged.
            return NodeAllocation(node.claim.pod_cidrs, "; ".join(node.errors))
        return NodeAllocation(tuple(str(b) for b in sorted(node.owned)), "; ".join(node.errors))

    def allocations(self) -> dict[str, NodeAllocation]:
        return {name: self.allocation(name) for name in sorted(self._nodes)}

    def owners(self) -> dict[str, str]:
        """Block -> node, for every block held."""
        return {str(b): n for b, n in sorted(self._owner.items())}

    @property
    def free(self) -> int:
        return self.pool.size - len(self._owner)

    # -- internals -----------------------------------------------------------------------

    def _remove(self, name: str) -> bool:
        node = self._nodes.pop(name, None)
        if node is None:
            return False
        for block in node.owned:
            del self._owner[block]
        return True

    def _take_claims(self, claim: NodeClaim) -> None:
        node = self._nodes.get(claim.name)
        if node is None:
            node = self._nodes[claim.name] = _Node(claim)
        node.claim = claim
        node.errors = []
        if not claim.pod_cidrs:
            return   # keeps what it holds (our write may not have landed yet); else waits
        wanted: set[ipaddress.IPv4Network] = set()
        for text in claim.pod_cidrs:
            block, why = self.pool.check_block(text)
            if block is not None and self._owner.get(block, claim.name) != claim.name:
                why = f"podCIDR {text} is already allocated to node {self._owner[block]}"
                block = None
            if block is None:
                node.errors.append(why)
            else:
                wanted.add(block)
        for block in node.owned - wanted:
            del self._owner[block]
        for block in wanted:
            self._owner[block] = claim.name
        node.owned = wanted

    def _settle(self) -> None:
        """After a change: claims refused before are judged again (a block they wanted may
        be free now), oldest node first; then the nodes without a block get one."""
        refused = sorted((n for n in self._nodes.values() if n.claim.pod_cidrs and n.errors),
                         key=lambda n: n.claim.order)
        for node in refused:
            self._take_claims(node.claim)
        self._hand_out()

    def _hand_out(self) -> None:
        waiting = sorted((n for n in self._nodes.values() if not n.claim.pod_cidrs and not n.owned),
                         key=lambda n: n.claim.order)
        if not waiting:
            return
        free = (b for b in self.pool.blocks() if b not in self._owner)
        for node in waiting:
            block = next(free, None)
            if block is None:
                node.errors = [f"no pod CIDR available: the cluster pool ({self.pool.describe()}, "
                               f"{self.pool.size} blocks) is exhausted"]
                continue
            self._owner[block] = node.claim.name
            node.owned = {block}
            node.errors = []


# -- CiliumNodes ---------------------------------------------------------------------------

def claim_of(node: dict) -> NodeClaim:
    meta = node.get("metadata") or {}
    ipam = (node.get("spec") or {}).get("ipam") or {}
    cidrs = ipam.get("podCIDRs") or []
    if not isinstance(cidrs, list):
        cidrs = [cidrs]
    return NodeClaim(str(meta.get("name") or ""), tuple(str(c) for c in cidrs),
                     str(meta.get("creationTimestamp") or ""))


def operator_error(node: dict) -> str:
    ipam = (node.get("status") or {}).get("ipam") or {}
    return str((ipam.get("operator-status") or {}).get("error") or "")


@dataclass
class IPAMStats:
    passes: int = 0
    spec_writes: int = 0
    status_writes: int = 0
    conflicts: int = 0
    last_error: str = ""


class IPAMController:
    """Lists the CiliumNodes, runs the allocator, writes what differs (spec first, then the
    status). Each pass reads the whole list: a write that lost a race (409) is simply redone
    from the next list. `may_act` is asked before every write (the leader's time check).
    `label_selector` limits the CiliumNodes it manages (tests sharing one API server)."""

    def __init__(self, kube, pool: ClusterPool, *, may_act: Callable[[], bool] = lambda: True,
                 label_selector: str = ""):
        self.kube = kube
        self.label_selector = label_selector
        self.allocator = PoolAllocator(pool)
        self._may_act = may_act
        self._lock = threading.Lock()
        self.stats = IPAMStats()

    def reconcile(self, dirty=None, revision=None) -> None:
        """One pass (the signature of cilium_py.agent.reconcile.Reconciler's callback)."""
        with self._lock:
            nodes, _ = self.kube.list_all("CiliumNode", label_selector=self.label_selector)
            self.stats.passes += 1
            self.allocator.sync(claim_of(n) for n in nodes)
            failures = []
            for node in nodes:
                try:
                    self._write(node)
                except ApiError as e:
                    if e.conflict or e.not_found:
                        self.stats.conflicts += 1   # changed or gone meanwhile: the next list says
                        continue
                    failures.append(e)
            if failures:
                self.stats.last_error = str(failures[0])
                raise failures[0]
            self.stats.last_error = ""

    def _write(self, node: dict) -> None:
        name = node["metadata"]["name"]
        want = self.allocator.allocation(name)
        if want is None:
            return
        if tuple(claim_of(node).pod_cidrs) != want.pod_cidrs:
            if not self._may_act():
                return
            spec = node.setdefault("spec", {})
            spec.setdefault("ipam", {})["podCIDRs"] = list(want.pod_cidrs)
            node = self.kube.replace("CiliumNode", node)
            self.stats.spec_writes += 1
            log.info("CiliumNode %s: podCIDRs %s", name, ", ".join(want.pod_cidrs))
        if operator_error(node) != want.error:
            if not self._may_act():
                return
            status = node.setdefault("status", {})
            ipam = status.setdefault("ipam", {})
            ipam["operator-status"] = {"error": want.error} if want.error else {}
            self.kube.replace("CiliumNode", node, subresource="status")
            self.stats.status_writes += 1
            if want.error:
                log.warning("CiliumNode %s: %s", name, want.error)
            else:
                log.info("CiliumNode %s: IPAM error cleared", name)
