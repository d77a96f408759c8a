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
import os
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

Where the time goes (measured by instrumenting the calls):

- `tsetjmp` is the fork plus a fixed cost of a few tenths of a millisecond, so the ratio to the floor
  falls as the heap grows and the page-table copy dominates: 0.95-1.06x at 1 GB, 1.05-1.25x at 100 MB
  and 1.5-1.9x at 10 MB over three runs on this machine (the fork floor itself varies by a third
  from run to run at 10-100 MB). The fixed part is the bookkeeping before
  the fork (open-file offsets, the message to the shepherd: about 0.05 ms) and, mostly, the parent's
  first copy-on-write faults on the interpreter's own pages between the fork and the return. The fork
  floor is timed until `fork()` returns and pays none of those. Two changes took most of the fixed
  cost out: signal masks are set with raw `sigset_t` buffers (converting Python sets of `Signals`
  touched dozens of pages right after the fork, 0.2 ms), and the keeper announces itself and makes
  its own channel to the shepherd, so the live process sends one small message before the fork and
  does nothing but restore its mask after it.
- `tlongjmp` stays well under a millisecond and nearly flat in the heap size: the request, the
  shepherd's decision and history record, the kill, and the wake-up of a spare that has already taken
  its copy-on-write faults for the wake-up machinery while frozen. "After rewriting heap" is the same
  restore when the killed process owns a private copy of the whole heap: its teardown runs at
  SCHED_IDLE off the restore path, but still costs the restored process a few tenths of a millisecond
  at 100 MB and more.
- An earlier version measured 2.1-2.5x and 1.2-1.5 ms on this machine while other test suites loaded
  both cores; the figures above are from a quiet machine, so the improvement is partly the code and
  partly the quiet.

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
    """The targets of issue 14 (bench.target_check) as a table: figures from this run."""
    t = bench.target_check(data)

    def ok(v: bool | None) -> str:
        return "-" if v is None else "met" if v else "NOT met"

    lines = ["| heap | tsetjmp / fork (target) | tlongjmp ms: best, rewritten, runs, runs rewritten "
             f"(target <= {t['tlongjmp_max_s'] * 1e3:g}) "
             f"| crash loop / fork (target <= {t['crashloop_over_fork_max']:g}x) |",
             "|---|---|---|---|"]
    for row in t["rows"]:
        ms = ", ".join(f"{row['tlongjmp_s'][k] * 1e3:.2f}" for k in bench.RESTORE_METRICS
                       if k in row["tlongjmp_s"])
        ts = row["tsetjmp_over_fork"]
        cl = row["crashloop_over_fork"]
        lines.append(f"| {row['heap']} | {ts:.2f}x (<= {row['tsetjmp_max']:g}x) {ok(row['tsetjmp_met'])} "
                     f"| {ms} {ok(row['tlongjmp_met'])} "
                     f"| {'-' if cl is None else f'{cl:.2f}x'} {ok(row['crashloop_met'])} |")
    spread = ", ".join(f"{k} {v:.2f}x" for k, v in t["tlongjmp_spread"].items())
    lines += ["", "tlongjmp across sizes, largest / smallest median "
              f"(target <= {t['tlongjmp_spread_max']:g}x, {ok(t['tlongjmp_spread_met'])}): {spread}."]
    return "\n".join(lines)


SERVER_PERSIST = """
## Server throughput with `@checkpointed` (issue 5)

`benchmarks/throughput.py --breakdown`: one single-threaded keep-alive HTTP server on 127.0.0.1 (a
`selectors` loop, one `handle(path)` call per request, modelled on the demo's store), each
configuration its own server process, driven by wrk (1 thread, 4 connections) when installed, else an
asyncio client. `none`: no forkpoint. `per-request`: `@forkpoint.checkpointed` on the handler (per-call
default `spares=0`); `per-request+spare`: the same with `spares=1`; `every-100`: `tsetjmp()` on every
100th request and `discard()` of the previous one. `1ms` is 1 ms of busy work (a spin: a sleep would
leave the CPU to the checkpoint's processes and flatter forkpoint). The load generator shares the 2
cores with the server. "checkpoints / requests" is counted by the server.

{throughput}

A checkpoint per request costs about one fork of the server (page tables, proportional to its
resident memory: about 20 us per MB here) plus the copy-on-write faults the live process takes while
the checkpoint exists (about 200 per request), so it pays off for handlers that are not trivial: with
1 ms of work it keeps about half the throughput, and a checkpoint every 100 requests costs almost
nothing. A pre-forked spare does not pay for itself on the success path (most per-call checkpoints are
never restored), hence `spares=0` for per-call checkpoints; the restore then forks on demand. A server
with a large heap should checkpoint less often (a loop checkpoint plus per-request quarantine) or keep
bulk data in `persist()` regions, which are shared mappings whose pages a fork does not copy.

## Crash recovery: a real fault against a SIGKILL

`benchmarks/crash_recovery.py`: from just before the fault to the restored process running, for a
real NULL dereference (faulthandler reports it to the shepherd from inside the dying process) and
for a SIGKILL (which the shepherd learns of from `waitpid`, only after the kernel has torn the dead
process down).

{crash}

The fault path stays at 1-4 ms whatever the heap; the `waitpid` path pays the teardown of the dead
process's memory, which grows with the heap and with how much of it the process had written.

## persist() and cache() (issue 3)

`benchmarks/persist_bench.py`: ratio = forkpoint time / baseline time (below 1: forkpoint faster). The
pickle baseline writes to /tmp (ext4 on the VM's virtio disk, whose fsync the host may absorb: cheaper
than a real disk) and loads from the page cache.

{persist}

persist writes cost what bytearray writes cost once a page is touched (the first touch of a memfd page
costs a little more than an anonymous zero page). `cache(IN)` beats pickle + fsync at every size since
nothing goes to a disk; `cache(OUT)` is dominated by its CRC32 (about 4 GB/s, the fastest checksum the
standard library has: adler32 and blake2b measured slower), which a plain `pickle.load` from the page
cache does not pay: the price of refusing a corrupted entry instead of returning it.
"""


def server_and_persist(results: Path, rerun: bool) -> str:
    """Run (or re-read) the throughput and persist benchmarks; their markdown goes into the doc."""
    import subprocess

    out = {}
    runs = (("throughput", "throughput.py", ["--breakdown"]), ("persist", "persist_bench.py", []),
            ("crash", "crash_recovery.py", []))
    for name, script, extra in runs:
        md = results / f"{name}.md"
        if rerun or not md.exists():
            r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *extra,
                                "--json", str(results / f"{name}.json")],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            r.check_returncode()
            md.write_text(r.stdout)
        out[name] = md.read_text().strip()
    return SERVER_PERSIST.format(**out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10M,100M,1G")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "benchmarks.png"))
    p.add_argument("--note", default="Other work (another engineer's test runs) ran on the machine at "
                   "the same time; the min column is the least disturbed figure.")
    p.add_argument("--from-json", metavar="FILE", help="only render FILE (figures of an earlier run)")
    p.add_argument("--no-server-persist", action="store_true",
                   help="skip throughput.py, persist_bench.py and crash_recovery.py (about 2 min)")
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
    if not args.no_server_persist:
        text += server_and_persist(Path(args.json).parent, rerun=not args.from_json)
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
