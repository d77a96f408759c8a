#!/usr/bin/env python3
"""Run the full forkpoint benchmark and write docs/benchmarks.md (and the figures as JSON).

    python benchmarks/run_all.py                 # 10 MB, 100 MB, 1 GB; a few minutes
    python benchmarks/run_all.py --sizes 10M,100M --note "laptop on battery"

The tables are the ones ``forkpoint bench`` prints; this script adds the machine, the date, the
targets of issue 2 against what was measured, and the notes a reader needs to judge the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forkpoint import bench  # noqa: E402

HEADER = """# Benchmarks

Measured by `python benchmarks/run_all.py` (the same figures as `forkpoint bench --json`); the raw
figures are in `benchmarks/results/latest.json`. Every row is one worker process measured in one
run: the fork floor, `tsetjmp`, `tlongjmp` and the pickle image of the same heap in the same process.

- Machine: {nproc} CPUs ({cpu}), {memory:.0f} GiB, Linux {kernel}, Python {python}.
- Date: {date}.
- {note}

How each figure is taken (see `forkpoint/bench.py`):

- **fork floor**: `os.fork()` of the benchmark process, the child blocked on a pipe; timed in the parent
  until `fork()` returns.
- **tsetjmp**: from the call until it returns in the live process. It includes the parent's first
  copy-on-write faults after its fork, which the fork floor (timed until `fork()` returns) does not.
- **tlongjmp**: from the call until the restored program runs the line after its `tsetjmp()`; the start
  time travels in a `persist()` region (`time.perf_counter` is CLOCK_MONOTONIC, system-wide). Each
  jump waits until the checkpoint's spare is ready and the previously killed process is gone.
  "after rewriting heap": the live process first wrote every page (bytearray) or item (dict) of its
  heap, so the process that is killed has a heap of its own to tear down.
- **pickle**: `pickle.dump` to a file on the root filesystem, `flush` + `fsync`, then `pickle.load`
  (from the page cache).
- **memory**: psutil USS/PSS of the checkpoint's processes (keeper + spare). USS counts pages mapped by
  one process only, and the keeper and its spare share the checkpoint's pages, so the snapshot's USS
  stays small; PSS and the live process's USS growth ("copied") are the honest figures.

## Targets (issue 2)

{targets}

"""


def targets_text(data: dict) -> str:
    lines = ["| heap | tsetjmp / fork (target <= 1.25x) | tlongjmp ms (target < 1 ms) |", "|---|---|---|"]
    for r in data["results"]:
        ratio = r["ratios"]["tsetjmp_over_fork"]
        tl = r["metrics"]["tlongjmp"]
        ok1 = "met" if ratio <= 1.25 else "NOT met"
        ok2 = "met" if tl["median"] < 1e-3 else "NOT met"
        ms = tl["median"] * 1e3
        lines.append(f"| {r['kind']} {r['size_label']} | {ratio:.2f}x {ok1} | {ms:.2f} {ok2} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10M,100M,1G")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "benchmarks.png"))
    p.add_argument("--note", default="Other work (another engineer's test runs) ran on the machine at "
                   "the same time; the min column is the least disturbed figure.")
    args = p.parse_args()
    sizes = [bench.parse_size(s) for s in args.sizes.split(",")]
    data = bench.measure(sizes, list(bench.KINDS))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(data, indent=1))
    m = data["machine"]
    text = HEADER.format(nproc=m["nproc"], cpu=m["cpu"], memory=m["memory"] / (1 << 30), kernel=m["kernel"],
                         python=m["python"], date=m["date"], note=args.note, targets=targets_text(data))
    text += bench.tables(data).replace("### ", "## ")
    try:
        bench.plot(data, args.plot)
        text += f"\n![checkpoint and restore time against heap size]({Path(args.plot).name})\n"
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'forkpoint[plot]')", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(bench.tables(data))
    print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
