"""From resolved rules to policy-map entries, and writing only the difference.

A resolved rule is what the control plane hands the datapath after selectors and peers
are worked out: (peer identity, direction, protocol, port range, allow/deny). This module
turns rules into LPM keys: port ranges become aligned prefix blocks, and an allow that a
deny of the same identity covers becomes a deny, because one LPM lookup returns only the
longest match and would otherwise let the narrower allow hide the wider deny.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from cilium_py.datapath.maps.policy import PolicyMap, PolicyMapKey
from cilium_py.datapath.maps.endpoints import EndpointMap
from cilium_py.vocab import EGRESS, ICMP, INGRESS


class PolicyRuleError(ValueError):
    """A resolved rule is not representable; the message names the field."""


@dataclass(frozen=True)
class PolicyRule:
    """identity 0 = any peer; protocol 0 = any protocol; port 0 = any port. For ICMP the
    port is the ICMP type. end_port makes a range port..end_port."""

    identity: int
    direction: str
    protocol: int = 0
    port: int = 0
    end_port: int = 0
    deny: bool = False
    cookie: int = 0

    def __post_init__(self):
        if self.direction not in (INGRESS, EGRESS):
            raise PolicyRuleError(f"direction must be {INGRESS!r} or {EGRESS!r}, not {self.direction!r}")
        if not 0 <= self.identity < 1 << 32:
            raise PolicyRuleError(f"identity {self.identity} is out of range")
        if not 0 <= self.protocol <= 255:
            raise PolicyRuleError(f"protocol {self.protocol} is out of range 0-255")
        if not 0 <= self.port <= 65535 or not 0 <= self.end_port <= 65535:
            raise PolicyRuleError(f"port {self.port}-{self.end_port} is out of range 0-65535")
        if self.end_port and self.end_port < self.port:
            raise PolicyRuleError(f"endPort {self.end_port} is below port {self.port}")
        if self.protocol == 0 and (self.port or self.end_port):
            raise PolicyRuleError("a port needs a protocol: protocol 0 means any port of any protocol")
        if self.protocol == ICMP and self.end_port:
            raise PolicyRuleError("ICMP types cannot be ranges")


@functools.lru_cache(maxsize=4096)
def port_range_prefixes(first: int, last: int) -> tuple[tuple[int, int], ...]:
    """Splits [first, last] into the fewest aligned blocks, as (start, prefix bits).
    Memoized: the same few ranges recur in every endpoint's rules."""
    if first == 0 and last == 65535:
        return ((0, 0),)
    blocks = []
    port = first
    while port <= last:
        size = port & -port if port else 1 << 16
        while size > last - port + 1:
            size >>= 1
        blocks.append((port, 16 - (size.bit_length() - 1)))
        port += size
    return tuple(blocks)


class MapEntry(NamedTuple):
    deny: bool
    cookie: int


def _keys_of(endpoint_id: int, rule: PolicyRule) -> list[PolicyMapKey]:
    if rule.protocol == 0:
        return [PolicyMapKey(endpoint_id, rule.identity, rule.direction, 0, 0, 0)]
    if rule.port == 0 and rule.end_port == 0:
        return [PolicyMapKey(endpoint_id, rule.identity, rule.direction, rule.protocol, 0, 0)]
    last = rule.end_port or rule.port
    return [PolicyMapKey(endpoint_id, rule.identity, rule.direction, rule.protocol, start, bits)
            for start, bits in port_range_prefixes(rule.port, last)]


def _covers(wide: PolicyMapKey, narrow: PolicyMapKey) -> bool:
    if (wide.identity, wide.direction) != (narrow.identity, narrow.direction):
        return False
    if wide.protocol == 0:
        return True
    if wide.protocol != narrow.protocol:
        return False
    lo, hi = wide.port_range
    nlo, nhi = narrow.port_range
    return lo <= nlo and nhi <= hi


def compute_map_state(endpoint_id: int, rules: list[PolicyRule]) -> dict[PolicyMapKey, MapEntry]:
    state: dict[PolicyMapKey, MapEntry] = {}
    # Only a deny of the same identity and direction can be shadowed by a narrower allow
    # (the datapath's second lookup handles identity 0), so denies are grouped that way.
    denies: dict[tuple[int, str], list[tuple[PolicyMapKey, MapEntry]]] = {}
    for rule in rules:
        for key in _keys_of(endpoint_id, rule):
            if rule.deny:
                entry = MapEntry(True, rule.cookie)
                state[key] = entry
                denies.setdefault((key.identity, key.direction), []).append((key, entry))
            elif key not in state:
                state[key] = MapEntry(False, rule.cookie)
    if not denies:
        return state
    for key, entry in list(state.items()):
        if entry.deny:
            continue
        for deny_key, deny_entry in denies.get((key.identity, key.direction), ()):
            if _covers(deny_key, key):
                state[key] = deny_entry
                break
    return state


class PolicyRealizeError(RuntimeError):
    """An endpoint's policy could not be written; the endpoint keeps what it had (or, new,
    denies everything) and the message says why."""


class PolicyBudgetExceeded(PolicyRealizeError):
    """The endpoint needs more entries than its share of the policy map."""


class PolicyWriter:
    """Writes an endpoint's policy: entries that changed, then the enforcement flags.

    What each endpoint has in the map is kept in memory (read from the map once, on first
    use), so a change costs its own entries: reading the shared map back per endpoint would
    make every write grow with the whole node.

    All or nothing per endpoint: a policy larger than `budget` entries (Cilium's
    --bpf-policy-map-max, one map per endpoint there, a share of the shared map here) is
    refused before anything is written, and a write the kernel refuses (a full map) is
    rolled back, so the endpoint is left on its previous policy, never on half of the new
    one with enforcement switched off."""

    def __init__(self, policy_map: PolicyMap, endpoint_map: EndpointMap, budget: int = 0):
        self.policy_map = policy_map
        self.endpoint_map = endpoint_map
        self.budget = budget
        self._realized: dict[int, dict[PolicyMapKey, MapEntry]] | None = None

    def _load(self) -> dict[int, dict[PolicyMapKey, MapEntry]]:
        if self._realized is None:
            realized: dict[int, dict[PolicyMapKey, MapEntry]] = {}
            for key, value in self.policy_map.entries().items():
                realized.setdefault(key.endpoint_id, {})[key] = MapEntry(value.deny, value.cookie)
            self._realized = realized
        return self._realized

    def forget(self, endpoint_id: int) -> None:
        """The endpoint's entries were removed from the map by someone else (teardown)."""
        self._load().pop(endpoint_id, None)

    def entry_count(self, endpoint_id: int | None = None) -> int:
        """Entries this writer has in the map: one endpoint's, or all of them."""
        realized = self._load()
        if endpoint_id is not None:
            return len(realized.get(endpoint_id, ()))
        return sum(len(entries) for entries in realized.values())

    def capacity(self) -> int:
        return int(getattr(self.policy_map, "max_entries", 0) or 0)

    def apply(self, endpoint_ip, endpoint_id: int, rules: list[PolicyRule], *,
              enforce_ingress: bool, enforce_egress: bool) -> tuple[int, int]:
        """Returns (entries written, entries removed); raises PolicyRealizeError with the
        endpoint's previous state intact."""
        desired = compute_map_state(endpoint_id, rules)
        if self.budget and len(desired) > self.budget:
            raise PolicyBudgetExceeded(
                f"policy needs {len(desired)} map entries, more than the {self.budget} an "
                f"endpoint may have (--bpf-policy-map-max)")
        realized = self._load().setdefault(endpoint_id, {})
        stale = [k for k in realized if k not in desired]
        adds = sum(1 for k in desired if k not in realized)
        capacity = self.capacity()
        total = self.entry_count()
        # The new entries go in before the stale ones leave (no moment with a deny gone and
        # its replacement not yet there), so the peak is what must fit.
        if capacity and total + adds > capacity:
            raise PolicyRealizeError(
                f"policy map full: {total} of {capacity} entries used, this endpoint needs "
                f"{adds} more")
        written, added, changed = self._write(endpoint_id, realized, desired)
        # Only then enforcement switched on, so no packet meets an enforced direction with a
        # half-written map.
        try:
            self.endpoint_map.set_policy_enforcement(endpoint_ip, ingress=enforce_ingress,
                                                     egress=enforce_egress)
        except (OSError, KeyError) as e:
            undone = self._rollback(realized, added, changed)
            raise PolicyRealizeError(f"enforcement flags not written: {e}"
                                     + ("" if undone else "; rollback incomplete")) from e
        try:
            removed = self._remove(realized, stale)
        except OSError as e:
            # The new policy is in force; what could not be removed stays listed in the
            # realized state, so the retry removes it.
            raise PolicyRealizeError(f"stale policy entries not removed: {e}") from e
        return written, removed

    def _write(self, endpoint_id: int, realized: dict, desired: dict) -> tuple[int, list, list]:
        added, changed = [], []
        try:
            for key, entry in desired.items():
                old = realized.get(key)
                if old != entry:
                    self.policy_map.put(key, deny=entry.deny, cookie=entry.cookie)
                    (added if old is None else changed).append((key, old))
                    realized[key] = entry
        except OSError as e:
            undone = self._rollback(realized, added, changed)
            raise PolicyRealizeError(f"policy map update failed: {e}"
                                     + ("" if undone else "; rollback incomplete, map re-read")) from e
        return len(added) + len(changed), added, changed

    def _rollback(self, realized: dict, added: list, changed: list) -> bool:
        """Puts back what this apply changed; False when the kernel refused part of it."""
        try:
            # New keys go first: that frees the room an in-place update of a full LPM trie
            # needs on kernels that count it as an insert.
            for key, _ in added:
                self.policy_map.remove(key)
                realized.pop(key, None)
            for key, old in changed:
                self.policy_map.put(key, deny=old.deny, cookie=old.cookie)
                realized[key] = old
        except OSError:
            self._realized = None  # re-read the map next time: it is the truth now
            return False
        return True

    def _remove(self, realized: dict, stale: list) -> int:
        for key in stale:
            self.policy_map.remove(key)
            del realized[key]  # only once the kernel let it go
        return len(stale)
