"""Maglev table for the kube-proxy replacement, pure userspace (no kernel, no root).

- Build time: `build_table` for M=16381 (the default size) and 100 backends with names
  of the form "ip:port/proto", median of BUILD_RUNS. Baseline: the recipe written
  as the plain loop over the M slots (pure Python, each backend probing its permutation for
  the next empty slot), median of BASELINE_RUNS, same backends; its table must equal
  build_table's or the benchmark fails.
- Disruption: the share of slots whose backend changes when one of the 100 backends goes,
  averaged over removing each of them in turn (the worst single removal is reported too);
  the removed backend's own ~1/N of the slots has to move, so 1/N is the baseline. Target:
  2.5/N on that average.
"""

from __future__ import annotations

import time

from bench.common import Result, median

M = 16381
BACKENDS = 100
BUILD_RUNS = 30
BASELINE_RUNS = 3
TARGET_MS = 10.0
TARGET_MOVED = 2.5 / BACKENDS


def backends(n: int, port: int = 8080) -> list[tuple[str, int]]:
    return [(f"10.244.{i // 200}.{i % 200 + 10}:{port}/TCP", 1000 + i) for i in range(n)]


def reference_build(entries, m: int) -> list[int]:
    """The recipe as a loop over the slots: the baseline."""
    from cilium_py.agent.services.maglev import offset_and_skip

    entries = sorted(entries)
    perm = [offset_and_skip(name, m) for name, _ in entries]
    n = len(entries)
    cursor = [0] * n
    table = [-1] * m
    for turn in range(m):
        i = turn % n
        offset, skip = perm[i]
        slot = (offset + cursor[i] * skip) % m
        while table[slot] >= 0:
            cursor[i] += 1
            slot = (offset + cursor[i] * skip) % m
        table[slot] = entries[i][1]
        cursor[i] += 1
    return table


def _timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(quick: bool = False) -> list[Result]:
    from cilium_py.agent.services.maglev import build_table, moved_share, slots_per_backend

    runs = 5 if quick else BUILD_RUNS
    base_runs = 1 if quick else BASELINE_RUNS
    removals = 10 if quick else BACKENDS
    bk = backends(BACKENDS)
    table = build_table(bk, M)
    reference = reference_build(bk, M)
    if table.tolist() != reference:
        raise RuntimeError("build_table differs from the reference loop")
    build_s = _timed(lambda: build_table(bk, M), runs)
    base_s = _timed(lambda: reference_build(bk, M), base_runs)
    others = []
    for label, extra, m in (("10 backends", backends(10, port=9090), M),
                            ("1000 backends", backends(1000, port=9090), 131071),
                            ("100 weighted 1-5", [(name, i, 1 + i % 5) for name, i in bk], M)):
        build_table(extra, m)
        times = _timed(lambda: build_table(extra, m), 1 if quick else 5)
        others.append((label, m, median(times)))

    moved = []
    for gone in range(0, BACKENDS, BACKENDS // removals):
        after = build_table(bk[:gone] + bk[gone + 1:], M)
        moved.append(moved_share(table, after))
    counts = sorted(slots_per_backend(table).values())

    build_ms, base_ms = median(build_s) * 1000, median(base_s) * 1000
    p90 = sorted(build_s)[int(0.9 * (len(build_s) - 1))] * 1000
    mean, worst = sum(moved) / len(moved), max(moved)
    over = sum(share > TARGET_MOVED for share in moved)
    return [
        Result(f"maglev: build M={M}, {BACKENDS} backends", f"{build_ms:.1f} ms",
               f"{base_ms:.1f} ms slot loop", build_ms / base_ms,
               f"<= {TARGET_MS:.0f} ms", build_ms <= TARGET_MS,
               [f"median of {runs} builds (p90 {p90:.1f} ms, min {min(build_s) * 1000:.1f} ms), "
                f"hashing the {BACKENDS} names included; baseline = the recipe as a pure-Python "
                f"loop over the slots, median of {base_runs}, same table",
                f"slots per backend {counts[0]}..{counts[-1]} (M/N = {M / BACKENDS:.1f})",
                "other inputs: " + ", ".join(f"{label} at M={m}: {t * 1000:.1f} ms"
                                             for label, m, t in others)]),
        Result(f"maglev: slots moved, 1 of {BACKENDS} backends removed",
               f"{mean * 100:.2f}% (worst {worst * 100:.2f}%)", f"{100 / BACKENDS:.2f}% (1/N)",
               mean * BACKENDS, f"<= {TARGET_MOVED * 100:.2f}% (2.5/N) on average",
               mean <= TARGET_MOVED,
               [f"mean of {len(moved)} single removals, {over} of them above 2.5/N; 1/N is the "
                f"removed backend's own share, which has to move; the rest is the recipe's "
                f"(the reference loop moves the same slots)"]),
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
