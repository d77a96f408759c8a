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

Where the time goes (measured by instrumenting the calls; see the report of the change that added this
file):

- `tsetjmp` pays the fork of the process plus a fixed ~1 ms: most of it is the parent's first
  copy-on-write faults on the interpreter's own pages right after the fork (restoring the signal mask
  costs 0.07 ms unforked and ~0.4 ms as the first thing after the fork), the rest is the bookkeeping
  (open-file offsets, the socketpair to the shepherd, the message). The fork floor is timed until
  `fork()` returns and so pays none of these faults. The ratio therefore falls as the heap grows and
  the fork itself dominates (about 1.2-1.3x at 1 GB, 2-2.5x at 10 MB).
- `tlongjmp` is flat in the heap size (the teardown of the killed process is off the restore path, even
  after it rewrote a whole 1 GB heap), but about 1.2-1.5 ms rather than under 1 ms: roughly 0.6-0.8 ms
  from the call until the spare is woken (the request, the shepherd's policy decision and history
  record, the kill) and 0.5 ms in the woken spare before the program runs (its own first
  copy-on-write faults, and `_resume`).

## The gc_freeze setting

CPython writes to an object whenever it is read (reference counts) and whenever the cyclic GC examines
it (the GC header of every container). Both copy the page in the live process, so a snapshot's cost
grows with what the program merely reads. `forkpoint.configure(gc_freeze=True)` makes every
`tsetjmp()` run `gc.collect()` and then `gc.freeze()`: the objects alive at the checkpoint move to the
permanent generation, which later collections never walk. In the last table, a full `gc.collect()`
after the checkpoint copies the pages of every GC-tracked object without it (the "records" heap) and
nothing with it. Reference-count writes are not prevented by anything a library can do on CPython 3.11
(3.12's immortal objects are not available for user objects), so reading every object still copies
its page, with or without the setting; storing bulk data in flat buffers (bytes, array, numpy) is what
avoids that.

Costs: the first `tsetjmp()` with the setting pays a full collection (tens of ms per 100 MB of
containers; later ones only collect what was allocated since), and objects that become cyclic garbage
after being frozen are never collected. Use it for programs whose heap is mostly long-lived containers
(objects, lists, dicts of dicts) and that allocate enough to trigger full collections; leave it off
(the default) for heaps of flat data, where it buys nothing. `gc.freeze()` without the collection
("freeze_only") gives the same memory figures for a cheaper first checkpoint, at the price of freezing
whatever garbage exists at that moment.

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
    p.add_argument("--from-json", metavar="FILE", help="only render FILE (figures of an earlier run)")
    args = p.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
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
