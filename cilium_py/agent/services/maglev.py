"""Maglev consistent hashing: the per-service lookup table of backend IDs.

The recipe (shared reference, section 7), which every node must follow to the letter because
a flow's backend is chosen by whichever node receives it:

- M, the table size, is one of `MAGLEV_PRIMES`.
- A backend is known by a stable name (not its node-local ID). With h1, h2 the halves of
  murmur3 x64_128 of the name, seeded with bytes 0-3 of the decoded 12-byte seed (big-endian),
  its preference list is perm[j] = (offset + j * skip) mod M, offset = h1 mod M,
  skip = h2 mod (M - 1) + 1. M is prime, so every list visits every slot.
- Backends are sorted by name. For n = 0 .. M-1 backend n mod N takes the first slot of its
  list that is still empty (each backend keeps a cursor past the slots it has looked at).
- Weights, used only when sum(weights) // N > 1 (integer division, as upstream): the turn
  passes on to the next backend while (n + 1) * weight < counter; a backend that takes its
  turn adds the weight sum to its counter, which starts at weight / N (upstream keeps it as
  a float and truncates it to compare, so weight // N here is the same).

The table holds backend IDs. `build_table` computes exactly the table the loop above
produces, but without a Python loop per slot: the comment before `_fill` explains how.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence

import numpy as np

from cilium_py.datapath.config import MAGLEV_TABLE_SIZES as MAGLEV_PRIMES

DEFAULT_TABLE_SIZE = 16381
# 12 random bytes, base64; bytes 0-3 seed murmur3 here, bytes 4-11 seed the datapath's jhash.
DEFAULT_SEED = "JLfvgnHc2kaSUFaI"

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


class MaglevError(ValueError):
    """Input that cannot produce a table: unsupported size, bad seed, bad backend list."""


# --- murmur3 x64_128 -------------------------------------------------------------------------

_C1 = 0x87C37B91114253D5
_C2 = 0x4CF5AD432745937F


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _U64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _U64
    return k ^ (k >> 33)


def murmur3_x64_128(data: bytes, seed: int) -> tuple[int, int]:
    """MurmurHash3 x64_128 of `data` as its two unsigned 64-bit halves (h1, h2), both
    seeded with the 32-bit `seed` (the convention of the reference C code, Go's
    spaolacci/murmur3 and Python's mmh3). Pure Python: it runs once per backend, so the
    rotations are written out rather than called."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _U32:
        raise MaglevError(f"murmur3 seed {seed!r} is not an unsigned 32-bit integer")
    data = bytes(data)
    h1 = h2 = seed
    length = len(data)
    body = length - length % 16
    for i in range(0, body, 16):
        k1 = (int.from_bytes(data[i:i + 8], "little") * _C1) & _U64
        k1 = (((k1 << 31) | (k1 >> 33)) & _U64) * _C2 & _U64
        h1 ^= k1
        h1 = (((h1 << 27) | (h1 >> 37)) & _U64) + h2
        h1 = (h1 * 5 + 0x52DCE729) & _U64
        k2 = (int.from_bytes(data[i + 8:i + 16], "little") * _C2) & _U64
        k2 = (((k2 << 33) | (k2 >> 31)) & _U64) * _C1 & _U64
        h2 ^= k2
        h2 = (((h2 << 31) | (h2 >> 33)) & _U64) + h1
        h2 = (h2 * 5 + 0x38495AB5) & _U64
    tail = data[body:]
    if len(tail) > 8:
        k2 = (int.from_bytes(tail[8:], "little") * _C2) & _U64
        h2 ^= (((k2 << 33) | (k2 >> 31)) & _U64) * _C1 & _U64
    if tail:
        k1 = (int.from_bytes(tail[:8], "little") * _C1) & _U64
        h1 ^= (((k1 << 31) | (k1 >> 33)) & _U64) * _C2 & _U64
    h1 ^= length
    h2 ^= length
    h1 = (h1 + h2) & _U64
    h2 = (h2 + h1) & _U64
    h1 = _fmix64(h1)
    h2 = _fmix64(h2)
    h1 = (h1 + h2) & _U64
    h2 = (h2 + h1) & _U64
    return h1, h2


def _murmur3_many(keys: list[bytes], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """murmur3_x64_128 of every key at once (uint64 arrays h1, h2): the same arithmetic on
    numpy's wrapping uint64 columns, one 16-byte block at a time. Keys are zero-padded;
    a tail word of zeros mixes to zero, so only whole blocks need a mask."""
    count = len(keys)
    length = np.array([len(k) for k in keys], np.uint64)
    blocks = length // np.uint64(16)
    width = (int(blocks.max(initial=0)) + 1) * 16
    words = np.frombuffer(b"".join(k.ljust(width, b"\0") for k in keys), "<u8")
    words = words.reshape(count, width // 8)
    c1, c2, five = np.uint64(_C1), np.uint64(_C2), np.uint64(5)

    def rotl(x, r):
        return (x << np.uint64(r)) | (x >> np.uint64(64 - r))

    def fmix(k):
        k = k ^ (k >> np.uint64(33))
        k = k * np.uint64(0xFF51AFD7ED558CCD)
        k = k ^ (k >> np.uint64(33))
        k = k * np.uint64(0xC4CEB9FE1A85EC53)
        return k ^ (k >> np.uint64(33))

    h1 = np.full(count, seed, np.uint64)
    h2 = h1.copy()
    for j in range(int(blocks.max(initial=0))):
        k1 = rotl(words[:, 2 * j] * c1, 31) * c2
        k2 = rotl(words[:, 2 * j + 1] * c2, 33) * c1
        n1 = (rotl(h1 ^ k1, 27) + h2) * five + np.uint64(0x52DCE729)
        n2 = (rotl(h2 ^ k2, 31) + n1) * five + np.uint64(0x38495AB5)
        more = blocks > np.uint64(j)
        h1 = np.where(more, n1, h1)
        h2 = np.where(more, n2, h2)
    at = np.arange(count)
    tail = 2 * blocks.astype(np.intp)
    h2 ^= rotl(words[at, tail + 1] * c2, 33) * c1
    h1 ^= rotl(words[at, tail] * c1, 31) * c2
    h1 ^= length
    h2 ^= length
    h1 += h2
    h2 += h1
    h1 = fmix(h1)
    h2 = fmix(h2)
    h1 += h2
    h2 += h1
    return h1, h2


# --- inputs ----------------------------------------------------------------------------------


def murmur_seed(seed: str) -> int:
    """The murmur3 seed inside a `maglev.hashSeed` value: bytes 0-3, big-endian."""
    try:
        raw = base64.b64decode(seed, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise MaglevError(f"maglev hash seed {seed!r} is not valid base64: {e}") from None
    if len(raw) != 12:
        raise MaglevError(f"maglev hash seed {seed!r} decodes to {len(raw)} bytes, not 12")
    return int.from_bytes(raw[:4], "big")


def check_table_size(table_size: int) -> int:
    """`table_size` if it is one of the supported primes, else MaglevError."""
    if isinstance(table_size, bool) or table_size not in MAGLEV_PRIMES:
        raise MaglevError(f"maglev table size {table_size!r} is not one of the supported "
                          f"primes {', '.join(map(str, MAGLEV_PRIMES))}")
    return int(table_size)


def offset_and_skip(name: str, table_size: int, seed: str = DEFAULT_SEED) -> tuple[int, int]:
    """Where the backend called `name` starts in the table and how far it steps."""
    m = check_table_size(table_size)
    h1, h2 = murmur3_x64_128(name.encode(), murmur_seed(seed))
    return h1 % m, h2 % (m - 1) + 1


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _normalize(backends) -> list[tuple[str, int, int]]:
    """(name, id, weight) sorted by name, after checking every entry."""
    out = []
    names: set[str] = set()
    ids: dict[int, str] = {}
    for entry in backends:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise MaglevError(f"backend {entry!r} is not (name, backend_id) or "
                              f"(name, backend_id, weight)")
        name, backend_id = entry[0], entry[1]
        weight = entry[2] if len(entry) == 3 else 1
        if not isinstance(name, str) or not name:
            raise MaglevError(f"backend name {name!r} is not a non-empty string")
        if not _is_int(backend_id) or not 0 <= backend_id <= _U32:
            raise MaglevError(f"backend {name!r}: ID {backend_id!r} is not an unsigned "
                              f"32-bit integer")
        if not _is_int(weight) or weight <= 0:
            raise MaglevError(f"backend {name!r}: weight {weight!r} is not a positive integer")
        if name in names:
            raise MaglevError(f"duplicate backend name {name!r}")
        if int(backend_id) in ids:
            raise MaglevError(f"backend ID {int(backend_id)} is used by both "
                              f"{ids[int(backend_id)]!r} and {name!r}")
        names.add(name)
        ids[int(backend_id)] = name
        out.append((name, int(backend_id), int(weight)))
    # Code point order is UTF-8 byte order, the order of Go's sort.Strings upstream.
    out.sort(key=lambda e: e[0])
    return out


# --- the table -------------------------------------------------------------------------------


def build_table(backends: Sequence, table_size: int = DEFAULT_TABLE_SIZE,
                seed: str = DEFAULT_SEED) -> np.ndarray | None:
    """The Maglev lookup table for `backends`, a sequence of (name, backend_id) or
    (name, backend_id, weight): a uint32 array of length `table_size` holding backend IDs.

    The order of `backends` does not matter (they are sorted by name), so every node that
    knows the same backends under the same names builds the same table. With no backends
    there is no table: returns None (upstream's table builder returns nothing then too).
    Raises MaglevError for an unsupported size, a bad seed, a malformed entry, a duplicate
    name or ID, or a weight that is not a positive integer."""
    m = check_table_size(table_size)
    murmur = murmur_seed(seed)
    entries = _normalize(backends)
    if not entries:
        return None
    h1, h2 = _murmur3_many([name.encode() for name, _, _ in entries], murmur)
    offsets = (h1 % np.uint64(m)).astype(np.int64)
    skips = (h2 % np.uint64(m - 1)).astype(np.int64) + 1
    turns = _turn_order([w for _, _, w in entries], m)
    owner = _fill(offsets, skips, m, turns)
    ids = np.array([backend_id for _, backend_id, _ in entries], np.uint32)
    return ids[owner]


def _turn_order(weights: list[int], m: int) -> np.ndarray | None:
    """Which backend (index in name order) takes each turn 0..M-1; None when that is plain
    round-robin (turn mod N).

    Equal weights are round-robin too: with weight w for all, backend i's counter before
    its turn r*N + i is w//N + r*N*w <= (r*N + i + 1) * w, so it never passes its turn.

    Otherwise each turn depends on the counters all earlier turns left, an integer
    recurrence walked here in Python (one pass over the turns, no slot work); filling the
    slots, the expensive part, is vectorized whatever the order."""
    count = len(weights)
    total = sum(weights)
    if total // count <= 1 or min(weights) == max(weights):
        return None
    counters = [w // count for w in weights]
    order = []
    due = 0  # turn mod N: whose turn it is unless that backend passes
    for turn_plus_1 in range(1, m + 1):
        i = due
        while turn_plus_1 * weights[i] < counters[i]:
            i = i + 1 if i + 1 < count else 0
        counters[i] += total
        order.append(i)
        due = due + 1 if due + 1 < count else 0
    return np.array(order, np.int64)


# How the slots are filled.
#
# Take a window of consecutive turns and give every backend the list of the slots still
# empty when the window begins, in its permutation order. If backend b holds k entries of
# its list before entry e, it is b's k-th turn in the window that gets to e, at that turn's
# time, and every slot goes to the backend that gets to it first. The recipe's table
# satisfies this rule, and nothing else does: two solutions would first differ at some
# turn, and the slot that turn takes in one of them is taken in the other by a turn that is
# earlier still, on which both agree.
#
# So a window is settled by applying the rule to every entry at once ("who holds what" ->
# "who gets where when" -> "who holds what"), a few rounds of numpy, until nothing changes.
# A backend is never let hold more entries than it has turns, and its list is cut a little
# beyond what it should need: both keep the rounds from swinging between claiming too much
# and too little. A settled window where a backend falls short of its turns had its list
# cut too early: the list grows and the rounds go on. A window that does not settle is
# split in two (a window of one turn settles at once).
#
# Windows take half the remaining turns, so there are about log2(M) of them, and the last
# few turns go one by one (`_finish`). Each backend's empty slots come from scanning its
# permutation once, front to back, into a buffer that later windows only filter. Once few
# slots are left they are far apart in every permutation; then the lists are built the other
# way round, from each slot's position.

_TIME_BITS = 18                  # times are below M <= 131071 < 2**17
_NEVER = (1 << 17) + 1           # the time of a turn that does not exist (column R)
_WINDOW_SHARE = 0.5              # a window's turns, as a share of the empty slots
_MAX_ROUNDS = 30                 # rounds without settling before a window is split
_COMPLETE_BELOW = 8              # build the lists from the slots below sqrt(this * M) empty
_TAIL = 32                       # turns left for `_finish`
_MAX_CELLS = 1 << 21             # bound on backends x turns-per-backend in a window
_COMPLETE_CELLS = 1 << 16        # and on backends x slots for complete lists


def _fill(offsets: np.ndarray, skips: np.ndarray, m: int, turns: np.ndarray | None) -> np.ndarray:
    """Index (in name order) of the backend owning each slot."""
    n = offsets.size
    owner = np.zeros(m + 1, np.intp)
    if n == 1:
        return owner[:m]
    empty = np.ones(m + 1, bool)
    empty[m] = False  # slot m pads the lists; filtering drops it like a filled slot
    earliest = np.empty(m + 1, np.int32)  # scratch: earliest claim on each slot
    lists = _Lists(offsets, skips, m, empty)
    complete_below = min(int(math.sqrt(_COMPLETE_BELOW * m)), max(_TAIL, _COMPLETE_CELLS // n))
    t0 = 0
    size = 0
    while t0 < m:
        left = m - t0
        if left <= _TAIL:
            _finish(owner, empty, offsets, skips, m, n, turns)
            break
        if not size:
            size = max(1, int(_WINDOW_SHARE * left))
        times, counts = _turn_times(t0, size, n, turns)
        if n * int(counts.max()) > _MAX_CELLS and size > 1:
            # Arrays are (backends x entries): with very uneven weights one backend's turns
            # would make them huge; take fewer turns at a time instead.
            size //= 2
            continue
        # Room for a backend's turns and for the entries the others take from it.
        share = size / left
        lose = share / (1 - share) if share < 1 else 1.0
        want = counts + np.ceil(counts * lose).astype(np.int64) + 4 * (counts > 0)
        if left <= complete_below and not lists.complete:
            lists.make_complete()
        lists.refresh(want, left / m)
        settled = _settle(lists, want, times, counts, earliest, m)
        if settled is None:
            if size == 1:
                raise AssertionError("maglev: a single turn did not settle")
            size //= 2
            continue
        rows, taken = settled
        owner[taken] = rows
        empty[taken] = False
        t0 += size
        size = 0
    return owner[:m]


def _finish(owner, empty, offsets, skips, m, n, turns):
    """The last few turns one by one, exactly as the recipe reads: a handful of windows
    of one or two turns would cost more than this."""
    free = np.flatnonzero(empty[:m])
    t0 = m - free.size
    who = np.arange(t0, m) % n if turns is None else turns[t0:]
    backs = np.unique(who)
    inverse = np.array([pow(int(skips[b]), -1, m) for b in backs], np.int64)
    position = ((free - offsets[backs, None]) * inverse[:, None]) % m
    prefs = dict(zip(backs.tolist(), free[np.argsort(position, axis=1)].tolist()))
    cursor = dict.fromkeys(prefs, 0)
    taken: set[int] = set()
    slots = []
    for b in who.tolist():
        pref, i = prefs[b], cursor[b]
        while pref[i] in taken:
            i += 1
        taken.add(pref[i])
        slots.append(pref[i])
        cursor[b] = i + 1
    owner[slots] = who


def _turn_times(t0: int, size: int, n: int, turns: np.ndarray | None):
    """Times of every backend's turns among t0 .. t0+size-1, as an (n, R+1) array padded
    with _NEVER (column R is never a turn), and how many each backend has."""
    if turns is None:
        first = t0 + (np.arange(n) - t0) % n
        counts = np.maximum(0, (t0 + size - first + n - 1) // n)
        k = np.arange(int(counts.max()) + 1)
        times = (first[:, None] + n * k).astype(np.int32)
        times[k >= counts[:, None]] = _NEVER
        return times, counts
    who = turns[t0:t0 + size]
    order = np.argsort(who, kind="stable")
    counts = np.bincount(who, minlength=n)
    times = np.full((n, int(counts.max()) + 1), _NEVER, np.int32)
    times[who[order], _ranks(counts)] = t0 + order
    return times, counts


def _settle(lists, want, times, counts, earliest, m):
    """Settle one window: the backend and slot of every entry held at the fixpoint, or
    None if the rounds do not settle."""
    n = counts.size
    cap = counts[:, None]
    flat_t = times.ravel()
    limit = np.minimum(want, lists.count)
    # Each round's claims carry a prefix lower than the last round's, so the minimum over
    # a slot only sees the current round without clearing `earliest` in between.
    earliest.fill(np.iinfo(np.int32).max)
    earliest[m] = -1  # the padding slot goes to nobody
    won = None
    rounds = 0
    while True:
        width = max(1, int(limit.max()))
        col = np.arange(width)
        beyond = col >= limit[:, None]
        slots = lists.slots[:, :width].copy()
        slots[beyond] = m  # entries past a backend's limit only ever reach the padding slot
        flat_slots = slots.ravel()
        if won is None:
            won = col < cap
        elif won.shape[1] < width:
            won = np.pad(won, ((0, 0), (0, width - won.shape[1])))
        won &= ~beyond
        # at[:, j] = row start in `times` + the backend's turns placed before entry j
        at = np.empty((n, width), np.int32)
        at[:, 0] = np.arange(n) * times.shape[1]
        while True:
            rounds += 1
            if rounds > _MAX_ROUNDS:
                return None
            at[:, 1:] = won[:, :-1]
            np.cumsum(at, axis=1, out=at)
            when = (flat_t + ((_MAX_ROUNDS - rounds) << _TIME_BITS)).take(at)
            np.minimum.at(earliest, flat_slots, when.ravel())  # 1-d: numpy's fast path
            now = earliest.take(slots) == when
            # Out of the fixpoint a turn can seem to take several entries: keep a backend's
            # first `counts`. (A turn past its last can seem to take one too; at a fixpoint
            # that entry would be one more than `counts`, so this drops it.)
            now &= np.cumsum(now, axis=1, dtype=np.int32) <= cap
            if np.array_equal(now, won):
                break
            won = now
        short = np.flatnonzero(np.count_nonzero(won, axis=1) < counts)
        if short.size == 0:
            held = np.flatnonzero(won)
            return held // width, flat_slots.take(held)
        # Lists cut too early: longer ones, and more rounds.
        before = limit[short].copy()
        lists.grow(short, before * 2 + 8)
        limit[short] = np.minimum(before * 2 + 8, lists.count[short])
        if (limit[short] == before).all():
            return None  # cannot happen with complete lists; split rather than loop


class _Lists:
    """Every backend's empty slots in permutation order: `slots` (n, width) int32, packed
    left, padded with slot m; `count` real entries per backend. They come from scanning
    each permutation once, front to back, up to `frontier`: the positions scanned but not
    listed were filled then and stay filled."""

    def __init__(self, offsets, skips, m, empty):
        self.offsets, self.skips, self.m, self.empty = offsets, skips, m, empty
        n = offsets.size
        self.slots = np.full((n, 1), m, np.int32)
        self.count = np.zeros(n, np.int64)
        self.frontier = np.zeros(n, np.int64)
        self.density = 1.0
        self.complete = False

    def refresh(self, want, density):
        """Before a window: drop the entries filled since, then scan on far enough that
        every backend should have `want` entries (`grow` makes sure, if it comes to it)."""
        self.density = density
        keep = np.flatnonzero(self.empty.take(self.slots))
        rows = keep // self.slots.shape[1]
        self.count = np.bincount(rows, minlength=self.count.size)
        packed = np.full((self.count.size, int(self.count.max()) + 1), self.m, np.int32)
        packed.ravel()[rows * packed.shape[1] + _ranks(self.count, rows)] = \
            self.slots.ravel().take(keep)
        self.slots = packed
        short = np.flatnonzero((self.count < want) & (self.frontier < self.m))
        if short.size:
            self._scan(short, want[short] - self.count[short], 1.0)

    def grow(self, rows, want):
        """More entries for `rows`: `want` (per row) where their permutations have them."""
        full = np.zeros_like(self.count)
        full[rows] = want
        self._scan_until(rows, full)

    def _scan_until(self, rows, want):
        # A scan reads about (entries needed) / (share of empty slots) positions. Two
        # permutations that run alike (one's skip a simple fraction of the other's, -1/2
        # say) defeat that estimate: one backend then meets long runs the other filled.
        # So scan again, twice as far each time, until each row has its entries or ends.
        stretch = 1.0
        while True:
            rows = rows[(self.count[rows] < want[rows]) & (self.frontier[rows] < self.m)]
            if rows.size == 0:
                return
            self._scan(rows, want[rows] - self.count[rows], stretch)
            stretch *= 2

    def make_complete(self):
        """Lists of every empty slot, from each slot's position in each permutation:
        (s - offset) * skip^-1 mod m. Every empty slot is ahead of every backend's
        progress, which only ever passes filled slots."""
        m = self.m
        free = np.flatnonzero(self.empty[:m])
        e = free.size
        inverse = np.array([pow(int(s), -1, m) for s in self.skips], np.int64)
        position = ((free - self.offsets[:, None]) * inverse[:, None]) % m
        position *= e
        position += np.arange(e)
        position.sort(axis=1)
        self.slots = np.full((self.offsets.size, e + 1), m, np.int32)
        self.slots[:, :e] = free[position % e]
        self.count[:] = e
        self.frontier[:] = m
        self.complete = True

    def _scan(self, rows, deficit, stretch):
        """Scan `rows` on from their frontiers, far enough to expect `deficit` more empty
        slots (times `stretch`), and append what turns up."""
        d = int(deficit.max())
        width = min(self.m, int(stretch * (d + 3 * math.sqrt(d) + 2) / self.density) + 1)
        slots = self.frontier[rows, None] + np.arange(width)  # positions, then their slots
        past_end = slots >= self.m if self.frontier[rows].max() + width > self.m else None
        slots *= self.skips[rows, None]
        slots += self.offsets[rows, None]
        slots %= self.m
        empty = self.empty.take(slots)
        if past_end is not None:
            empty &= ~past_end  # past its end a permutation starts over
        found = np.flatnonzero(empty)
        sub = found // width  # index into rows
        new = np.bincount(sub, minlength=rows.size)
        old = self.slots
        wide = max(old.shape[1], int((self.count[rows] + new).max()) + 1)
        self.slots = np.full((old.shape[0], wide), self.m, np.int32)
        self.slots[:, :old.shape[1]] = old
        # rows[i]'s finds go after its current entries
        at = (rows * wide + self.count[rows]).take(sub) + _ranks(new, sub)
        self.slots.ravel()[at] = slots.ravel().take(found)
        self.count[rows] += new
        self.frontier[rows] += width


def _ranks(count: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """0, 1, .., count[0]-1, 0, 1, .., count[1]-1, ...; `rows` (each item's row, sorted)
    saves building it again."""
    start = np.cumsum(count) - count
    if rows is None:
        return np.arange(int(count.sum())) - np.repeat(start, count)
    return np.arange(rows.size) - start.take(rows)


# --- helpers for tests and benchmarks --------------------------------------------------------


def slots_per_backend(table: np.ndarray) -> dict[int, int]:
    """How many slots each backend ID holds."""
    ids, counts = np.unique(np.asarray(table), return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def moved_share(old: np.ndarray, new: np.ndarray) -> float:
    """Fraction of slots whose backend changed between two tables of the same size."""
    old = np.asarray(old)
    new = np.asarray(new)
    if old.shape != new.shape:
        raise MaglevError(f"tables of different sizes: {old.size} and {new.size}")
    return float(np.count_nonzero(old != new)) / old.size if old.size else 0.0
