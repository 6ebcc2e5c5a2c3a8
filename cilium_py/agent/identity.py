"""Numeric security identities for label sets, file-backed for the lab.

Equal label sets share one identity; the datapath only ever sees the number. Allocations
are persisted (not the reference counts): the pinned BPF maps outlive the agent and keep
enforcing with the old numbers, so a restarted agent must hand every workload the number
it had before. After a restart every reloaded identity has a count of zero until its
users acquire it again; `forget_unused()` drops those nobody re-acquired, and the agent
calls it once its sources have synced.

Numbers: reserved 1-7 (`reserved:<name>`, never allocated or released), cluster
identities from 256 (lowest free), node-local CIDR identities 1<<24 | n with n from 1.
A released number is reused by the next allocation.

`all()` holds the reserved and cluster identities, the ones policy selectors are matched
against; CIDR identities are world traffic and are reached through `lookup()` and
`cidr_identities()` so that a selector such as "every endpoint" never picks one up.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import tempfile
import threading
from collections.abc import Container, Mapping

from cilium_py.agent.labels import RESERVED, SOURCE_CIDR, Labels, labels_key, reserved_id
from cilium_py.vocab import (
    ACTIVE_RESERVED_IDENTITIES as ACTIVE_RESERVED,
    FIRST_CLUSTER_IDENTITY as MIN_CLUSTER_ID,
    LOCAL_IDENTITY_SCOPE as LOCAL_SCOPE,
)

log = logging.getLogger(__name__)

MAX_CLUSTER_ID = 65535
MAX_LOCAL_INDEX = LOCAL_SCOPE - 1

STATE_VERSION = 1

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network


class IdentityError(RuntimeError):
    pass


class IdentityExhaustedError(IdentityError):
    pass


class IdentityStateError(IdentityError):
    """The state file cannot be trusted; starting empty would renumber every workload
    while the pinned maps still hold the old numbers, so we refuse instead."""


def cidr_labels(prefix: Prefix) -> Labels:
    # ':' separates the label source, so IPv6 prefixes spell their colons as '-'.
    return {f"{SOURCE_CIDR}:{str(prefix).replace(':', '-')}": ""}


def _prefix(prefix: str | Prefix) -> Prefix:
    return ipaddress.ip_network(str(prefix), strict=False)


class IdentityAllocator:
    def __init__(self, state_file: str | None = None, *, min_id: int = MIN_CLUSTER_ID,
                 max_id: int = MAX_CLUSTER_ID, max_local: int = MAX_LOCAL_INDEX):
        self.state_file = state_file
        self._min_id, self._max_id, self._max_local = min_id, max_id, max_local
        self._lock = threading.RLock()
        self._by_key: dict[str, int] = {}
        self._labels: dict[int, Labels] = {}
        self._refs: dict[int, int] = {}
        self._cidr_ids: dict[Prefix, int] = {}
        self._cidr_prefixes: dict[int, Prefix] = {}
        self._cidr_refs: dict[int, int] = {}
        # Bumped on every allocation and free, so controllers can tell cheaply whether
        # the identity set changed since they last resolved selectors.
        self.revision = 0
        self.save_error: str | None = None
        if state_file and os.path.exists(state_file):
            self._load()

    # -- cluster identities -------------------------------------------------------

    def acquire(self, labels: Mapping[str, str]) -> int:
        if not labels:
            raise ValueError("cannot allocate an identity for an empty label set")
        reserved = reserved_id(labels)
        if reserved is not None:
            return reserved
        key = labels_key(labels)
        with self._lock:
            ident = self._by_key.get(key)
            if ident is None:
                ident = self._lowest_free(self._labels, self._min_id, self._max_id,
                                          "cluster identity")
                self._by_key[key] = ident
                self._labels[ident] = dict(labels)
                self._refs[ident] = 0
                self.revision += 1
                self._save()
                log.info("allocated identity %d for %s", ident, key)
            self._refs[ident] += 1
            return ident

    def release(self, labels: Mapping[str, str]) -> bool:
        """Drops one reference; returns True when that freed the identity."""
        if reserved_id(labels) is not None:
            return False
        key = labels_key(labels)
        with self._lock:
            ident = self._by_key.get(key)
            if ident is None:
                log.warning("release of labels without an identity: %s", key)
                return False
            if self._refs[ident] > 0:
                self._refs[ident] -= 1
            if self._refs[ident] > 0:
                return False
            del self._by_key[key], self._labels[ident], self._refs[ident]
            self.revision += 1
            self._save()
            log.info("freed identity %d (%s)", ident, key)
            return True

    # -- node-local CIDR identities -----------------------------------------------

    def acquire_cidr(self, prefix: str | Prefix) -> int:
        net = _prefix(prefix)
        with self._lock:
            ident = self._cidr_ids.get(net)
            if ident is None:
                index = self._lowest_free({i - LOCAL_SCOPE for i in self._cidr_prefixes},
                                          1, self._max_local, "CIDR identity")
                ident = LOCAL_SCOPE | index
                self._cidr_ids[net] = ident
                self._cidr_prefixes[ident] = net
                self._cidr_refs[ident] = 0
                self.revision += 1
                self._save()
            self._cidr_refs[ident] += 1
            return ident

    def release_cidr(self, prefix: str | Prefix) -> bool:
        net = _prefix(prefix)
        with self._lock:
            ident = self._cidr_ids.get(net)
            if ident is None:
                log.warning("release of CIDR %s without an identity", net)
                return False
            if self._cidr_refs[ident] > 0:
                self._cidr_refs[ident] -= 1
            if self._cidr_refs[ident] > 0:
                return False
            del self._cidr_ids[net], self._cidr_prefixes[ident], self._cidr_refs[ident]
            self.revision += 1
            self._save()
            return True

    # -- queries ------------------------------------------------------------------

    def lookup(self, ident: int) -> Labels | None:
        if ident in RESERVED:
            return dict(RESERVED[ident])
        with self._lock:
            if ident in self._labels:
                return dict(self._labels[ident])
            if ident in self._cidr_prefixes:
                return cidr_labels(self._cidr_prefixes[ident])
        return None

    def lookup_labels(self, labels: Mapping[str, str]) -> int | None:
        """The identity of a label set without taking a reference."""
        reserved = reserved_id(labels)
        if reserved is not None:
            return reserved
        with self._lock:
            return self._by_key.get(labels_key(labels))

    def all(self) -> dict[int, Labels]:
        out = {i: dict(RESERVED[i]) for i in ACTIVE_RESERVED}
        with self._lock:
            out.update((i, dict(lbls)) for i, lbls in self._labels.items())
        return out

    def cidr_identities(self) -> dict[Prefix, int]:
        with self._lock:
            return dict(self._cidr_ids)

    def refcount(self, ident: int) -> int:
        with self._lock:
            return self._refs.get(ident, self._cidr_refs.get(ident, 0))

    def forget_unused(self) -> list[int]:
        """Frees every identity with no references (those reloaded from the state file
        that no workload re-acquired). Returns the freed numbers."""
        with self._lock:
            gone = [i for i, n in self._refs.items() if n == 0]
            gone_cidr = [i for i, n in self._cidr_refs.items() if n == 0]
            for i in gone:
                del self._by_key[labels_key(self._labels[i])], self._labels[i], self._refs[i]
            for i in gone_cidr:
                del self._cidr_ids[self._cidr_prefixes[i]], self._cidr_prefixes[i], self._cidr_refs[i]
            if gone or gone_cidr:
                self.revision += 1
                self._save()
            return sorted(gone + gone_cidr)

    # -- internals ----------------------------------------------------------------

    @staticmethod
    def _lowest_free(used: Container[int], low: int, high: int, what: str) -> int:
        # Allocations are rare (one per distinct label set), so a scan is cheap enough
        # and keeps numbers small and stable to read.
        for candidate in range(low, high + 1):
            if candidate not in used:
                return candidate
        raise IdentityExhaustedError(
            f"no free {what}: all {high - low + 1} numbers in {low}-{high} are in use")

    def _load(self) -> None:
        path = self.state_file
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported version {state.get('version')!r}")
            for text_id, lbls in state.get("identities", {}).items():
                ident = int(text_id)
                if not self._min_id <= ident <= self._max_id or not isinstance(lbls, dict) or not lbls:
                    raise ValueError(f"bad identity entry {text_id}: {lbls!r}")
                key = labels_key(lbls)
                if key in self._by_key:
                    raise ValueError(f"identities {self._by_key[key]} and {ident} have the same labels")
                self._by_key[key] = ident
                self._labels[ident] = {str(k): str(v) for k, v in lbls.items()}
                self._refs[ident] = 0
            for text_id, text_prefix in state.get("cidr", {}).items():
                ident = int(text_id)
                if not LOCAL_SCOPE < ident <= LOCAL_SCOPE | self._max_local:
                    raise ValueError(f"bad CIDR identity {text_id}")
                net = _prefix(text_prefix)
                if net in self._cidr_ids:
                    raise ValueError(f"CIDR {net} appears twice")
                self._cidr_ids[net] = ident
                self._cidr_prefixes[ident] = net
                self._cidr_refs[ident] = 0
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise IdentityStateError(
                f"identity state file {path} is unreadable ({e}); fix or remove it "
                "(removing it renumbers every workload)") from e
        log.info("reloaded %d identities and %d CIDR identities from %s",
                 len(self._labels), len(self._cidr_ids), path)

    def _save(self) -> None:
        if not self.state_file:
            return
        try:
            self._write_state()
            self.save_error = None
        except OSError as e:
            # The in-memory table stays right and the next change rewrites the whole
            # file; failing the caller would stop endpoints for a disk problem.
            self.save_error = f"{self.state_file}: {e}"
            log.error("cannot persist identities to %s: %s", self.state_file, e)

    def _write_state(self) -> None:
        state = {
            "version": STATE_VERSION,
            "identities": {str(i): self._labels[i] for i in sorted(self._labels)},
            "cidr": {str(i): str(self._cidr_prefixes[i]) for i in sorted(self._cidr_prefixes)},
        }
        directory = os.path.dirname(os.path.abspath(self.state_file))
        os.makedirs(directory, exist_ok=True)
        # Write-then-rename so a crash leaves either the old or the new file, never half.
        fd, tmp = tempfile.mkstemp(prefix=".identities.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
