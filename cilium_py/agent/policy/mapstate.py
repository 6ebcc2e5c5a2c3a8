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


class PolicyWriter:
    """Writes an endpoint's policy: entries that changed, then the enforcement flags.

    What each endpoint has in the map is kept in memory (read from the map once, on first
    use), so a change costs its own entries: reading the shared map back per endpoint would
    make every write grow with the whole node."""

    def __init__(self, policy_map: PolicyMap, endpoint_map: EndpointMap):
        self.policy_map = policy_map
        self.endpoint_map = endpoint_map
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

    def apply(self, endpoint_ip, endpoint_id: int, rules: list[PolicyRule], *,
              enforce_ingress: bool, enforce_egress: bool) -> tuple[int, int]:
        """Returns (entries written, entries removed)."""
        desired = compute_map_state(endpoint_id, rules)
        realized = self._load().setdefault(endpoint_id, {})
        written = removed = 0
        # Add before remove and only then switch enforcement on, so no packet meets an
        # enforced direction with a half-written map.
        for key, entry in desired.items():
            if realized.get(key) != entry:
                self.policy_map.put(key, deny=entry.deny, cookie=entry.cookie)
                realized[key] = entry
                written += 1
        self.endpoint_map.set_policy_enforcement(endpoint_ip, ingress=enforce_ingress,
                                                 egress=enforce_egress)
        for key in [k for k in realized if k not in desired]:
            self.policy_map.remove(key)
            del realized[key]
            removed += 1
        return written, removed
