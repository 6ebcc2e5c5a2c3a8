"""`make bench`: runs every benchmark against its baseline and prints one summary table,
also written to bench/results.md.

    python -m bench                      all benchmarks
    python -m bench prog_cost throughput a selection
    python -m bench --quick              fewer iterations (a smoke run, not for quoting)
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import os
import platform
import sys
import time
import traceback

from bench.common import BPFFS, TOKEN, Result

BENCHMARKS = ("prog_cost", "endpoint_create", "agent_start", "throughput", "policy_resolution",
              "policy_change", "lab_up", "hubble", "maglev", "kpr", "k8s_watch")
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md")
COLUMNS = ("benchmark", "measured", "baseline", "ratio", "target", "met")


def _cells(r: Result) -> tuple[str, ...]:
    return (r.benchmark, r.measured, r.baseline, r.ratio_text, r.target, r.met_text)


def text_table(rows: list[Result]) -> str:
    table = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[Result], header: str) -> str:
    out = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    out += ["", "Notes:", ""]
    for r in rows:
        for note in r.notes:
            out.append(f"- {r.benchmark}: {note}")
    return "\n".join(out) + "\n"


def leftovers() -> list[str]:
    """Namespaces and pins of this run that cleanup missed (there should be none)."""
    from cilium_py.datapath import netns

    found = [f"netns {n}" for n in netns.list_names("cpy-bench")]
    found += glob.glob(os.path.join(BPFFS, f"ciliumpy-bench-{TOKEN}*"))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*",
                        metavar="NAME", help=f"benchmarks to run ({', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if os.geteuid() != 0:
        print("bench: needs root (loads BPF programs, creates network namespaces)", file=sys.stderr)
        return 2

    rows: list[Result] = []
    failed = []
    started = time.monotonic()
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            module = importlib.import_module(f"bench.{name}")
            got = module.run(quick=args.quick)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
            got = [Result(name, f"FAILED: {type(e).__name__}: {e}"[:120], met=False)]
        for r in got:
            print(f"   {r.benchmark}: {r.measured} (baseline {r.baseline}, ratio {r.ratio_text}, "
                  f"target {r.target}, met {r.met_text})")
        print(f"   ({time.monotonic() - t0:.1f} s)", flush=True)
        rows.extend(got)

    header = (f"# ciliumpy benchmarks\n\n{datetime.datetime.now().isoformat(timespec='seconds')}, "
              f"kernel {platform.release()}, {os.cpu_count()} CPUs"
              f"{', QUICK run (not for quoting)' if args.quick else ''}; "
              f"total {time.monotonic() - started:.0f} s. Ratios are measured / baseline "
              f"(same run); absolute numbers vary between machines.")
    print()
    print(text_table(rows))
    print()
    for r in rows:
        for note in r.notes:
            print(f"  {r.benchmark}: {note}")
    with open(RESULTS_MD, "w") as f:
        f.write(markdown(rows, header))
    print(f"\nwritten to {RESULTS_MD}")

    left = leftovers()
    if left:
        print("bench: cleanup left: " + ", ".join(left) + " (make clean-lab removes them)",
              file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
