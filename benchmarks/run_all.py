#!/usr/bin/env python3
"""Run the full forkpoint benchmark and write docs/benchmarks.md (and the figures as JSON).

    python benchmarks/run_all.py                 # 10 MB, 100 MB, 1 GB; a few minutes
    python benchmarks/run_all.py --sizes 10M,100M --note "laptop on battery"

The tables are the ones ``forkpoint bench`` prints; this script adds the machine, the date, the
targets of issue 14 against what was measured, and the notes a reader needs to judge the figures.
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
  time travels in a `persist()` region (`time.perf_counter` is CLOCK_MONOTONIC, system-wide).
  - *best case*: a tight loop of restores; each jump waits until the checkpoint's spare is ready and
    the previously killed process is gone. "rewritten heap": the live process first wrote every page
    (bytearray) or item (dict) of its heap, so the process that is killed has a heap of its own to
    tear down (its teardown is not waited for).
  - *runs between faults*: the restored program spins 50 ms (the shepherd and the spare sleep, the
    caches go cold) and jumps again; nothing is waited for, not even the teardown of the process the
    restore before killed. "rewritten heap": it rewrites its whole heap during those 50 ms (at 1 GB
    the rewrite itself takes longer).
  - *crash loop*: the restored process jumps again at once, so the spare it came from has not been
    replaced: each restore waits for a fork of the checkpoint (the first jump of the loop, which
    found a spare, is not counted). Its floor is the fork.
  - *floor after running*: the real case's floor, with nothing of forkpoint in it. A fork of the
    same process blocks on a pipe; the program spins as long as between faults, writes to the pipe
    and blocks; the copy stamps the time on its next line. "two": the wake-up goes through one more
    fork blocked on a pipe that only passes it on, as a restore has two (the live process wakes
    the shepherd, the shepherd wakes the spare).
- **pickle**: `pickle.dump` to a file on the root filesystem, `flush` + `fsync`, then `pickle.load`
  (from the page cache).
- **memory**: psutil USS/PSS of the checkpoint's processes (keeper + spare). USS counts pages mapped by
  one process only, and the keeper and its spare share the checkpoint's pages, so the snapshot's USS
  stays small; PSS and the live process's USS growth ("copied") are the honest figures.

## Targets (issue 14)

{targets}

## Where the time goes (issue 14)

{where}

{breakdown}

{audit}## The gc_freeze setting

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

## The quarantine's scopes (issue 15)

`benchmarks/quarantine_bench.py`: per request, what the quarantine lookup costs at each scope against
`process` scope measured in the same run (each scope one program with forkpoint running and 100 keys
quarantined, timing 200,000 calls of `is_quarantined` on a key that is not quarantined, and of an
empty `with processing(key):` block; the scopes take turns, 5 rounds, medians); and the time from a
crash under `processing(k)` in one program (`quarantine_after=1`) to the first lookup in another
program of the service that refuses `k` (the crash, the shepherd's decision and record, and the way
to the other program). The Redis rows use a `redis-server` the script starts on 127.0.0.1.

{quarantine}

Targets of issue 15: `host` adds at most 20 us per request (measured: about 1.5 us, one 8-byte
`pread` of the store's generation word and a dictionary look-up); `redis` puts no network round trip
on a request (a lookup reads the shepherd's mirror in the arena, about 0.6 us more than `process`
here, within the noise of the `processing()` row); a new quarantine is refused by another program
within one second (medians of milliseconds; the maxima are the run's worst, on a machine whose load
the header gives).
"""


WHERE = """The machine is shared with other engineers' test runs, so changes were decided on counts that
do not depend on its load: copy-on-write faults (perf's `exceptions:page_fault_user`, `getrusage`),
the shepherd's instructions per restore (`benchmarks/restore_breakdown.py --callgrind`) and its
bytecodes (a tracer over 50 restores); times come from runs alternating the code before and after.

**tlongjmp.** A restore has five legs: the live process sends `Restore`; the shepherd wakes, reads it,
decides, kills the caller, records the history, asks for the replacement copy and sends `Wake`; the
spare wakes; it resumes (rejoins the program's process group, takes the program's name back, rewinds
read offsets, restores its mask, sends `Up`); the program runs its next line. The tables after this
section show each leg as perf sees it, and the shepherd's instructions. What bought each step:

1. *A woken spare makes system calls and little else.* Each page the spare first writes after its
   wake-up, and each page the restored program first writes in its next `tlongjmp()`, is a
   copy-on-write fault (3-5 us each here): 22 in the resume and 26 in the next `tlongjmp()`, 10 MB,
   the program running between faults. The spare now prepares its wake-up while frozen (its name as
   a ready buffer, the `Up` message encoded, the channel lock, the log levels looked up) and runs the
   restored program's `tlongjmp()` once without effect up to the message it sends: 5 and 3 faults.
2. *The shepherd does after the wake what can wait.* It read the killed caller's pending signals from
   `/proc/PID/status`, line by line, before the wake: 150 us of a cold read on every restore
   (instrumented timestamps). Issue 13 needs them before the wake (whether any are pending decides
   `Wake.hold`, which makes the restored process handle them before any program code), so the
   caller now reports its own pending signals in its `Restore` (one `sigpending()`, with every
   signal already blocked), and only what reached it after that report is read from `/proc`, after
   the wake: a killed process keeps its pending signals until it is reaped and drops any sent after
   the SIGKILL. With the two branches merged, the shepherd's time per restore (instrumented, 10 MB)
   went from 475 us with the read before the wake to 336 us with the report; the check whether the
   program is a terminal's foreground job no longer reads `/proc/self/stat` (0.1 ms) when the
   shepherd has no controlling terminal. The
   replacement copy is asked for before the wake (a spare woken on the shepherd's CPU preempted it
   for 4.4 ms in a trace), with the keeper at SCHED_IDLE so that its own wake-up cannot preempt the
   shepherd (an urgent keeper's did: the Wake went out 5 ms late on a busy machine). Copies in
   flight are counted, so a waiting restore raises the keeper instead of asking twice. Shepherd
   instructions per restore: 547,000 before these, 434,000 after.
3. *Messages formatted by hand* to the same JSON bytes, and read with `json`'s C scanner:
   434,000 -> 347,000 instructions, 3,939 -> 3,011 bytecodes per restore.
4. *No GIL hand-off* for the mask, `sigpending` and `prctl` calls (they cannot block), and one signal
   block in `tlongjmp()` instead of two.
5. *Issue 10's orphan scan*, 50 ms after each restore, read every `/proc/*/stat` on the machine
   (3-4 ms with 200 processes here) and met the next restore of a program failing every 50 ms; it
   reads the kernel's per-task child lists now (0.1 ms). With issue 10 merged the shepherd executes
   650,000 instructions per restore (the scan, the crash-report bookkeeping); main's own count is not
   given, because its scan reads as many processes as the machine happens to run.
6. *The real case, and its floor* (measured 2026-11-28, not a change). Between faults the program
   runs and everything else sleeps, and on this machine (2 vCPUs of a shared host) the code that
   runs next pays for cold caches far beyond its size: in one process, after a 10 ms spin, a
   `getppid()` took 12 us instead of 0.3 us (after a 2 ms spin: 1.1 us) and a 200-item list
   comprehension 31 us instead of 4 (medians of 30). A restore runs cold code in three processes.
   Instrumented timestamps of 20 restores at 10 MB, the program spinning 50 ms between them
   (medians): the caller's `tlongjmp()` up to its `Restore` message 160-230 us (its checks, the
   stdio flush, the mask), from there until the shepherd runs 130 us, the shepherd until its `Wake`
   is sent 300 us (10-40 us for each of its ten steps, none dominant), until the spare runs 110 us,
   the spare's resume up to the program's next line 170 us: about 0.95 ms in all. Its floor is in
   the table below ("floor after running"): a frozen fork of the same worker woken after the same
   50 ms runs its next line after 0.14-0.23 ms (medians over the six heaps of the run below), or
   0.17-0.22 ms through one more process that only passes the wake-up on. Moving the shepherd's
   history record and orphan bookkeeping after the wake did not change the total beyond the run's
   noise (about 100 us), so it was not kept. The 0.5 ms target of this case needs far less
   interpreted code between the fault and the program's next line (a decision and a resume
   prepared before the fault, or made in C), not more trimming.
7. *A jump from deep in a program's stack.* `tlongjmp(0)` reports the signal whose Python handler
   it was called from, and looked for that handler by reading the locals of every frame with two or
   three arguments on the way up: a real program's methods. From program code 30 frames deep (six
   handlers installed, as a gunicorn worker has) that cost 24 us warm, 60 deep 43 us. The installed
   handlers are now read first (one C call per signal, about 5 us for all of them) and only their
   own frames' locals are read: 9 and 12 us; 5 frames deep it went from 4 to 5 us. The benchmark's
   program is shallow, so its figures do not show this.

**Crash loop.** A restore whose spare was used by the restore before has to wait for the keeper's
next fork; its floor is that fork, and the fresh copy then takes its first faults (about 300 in its
start-up, 120 in its resume, 60 in its next `tlongjmp()` at 10 MB, each 2-4 us) unless it had time
to warm up. So while restores wait for copies (2 s after the last wait), the shepherd keeps the
keeper at normal priority for those forks (it used to drop back to SCHED_IDLE after each one and
fork the next behind the restored process), and a copy that a restore is already waiting for skips
its warming. Keeping one spare beyond the number asked for while a checkpoint loops, so that the
next restore finds a warmed copy, was tried and left out: it broke issue 13's bound (the configured
number of spares, at every instant). At 1 GB the fork dominates and a crash
loop costs about one fork; at 10 MB the fresh copy's faults cost more than the fork itself.
Counted again on 2026-11-28 (`getrusage` around each step, 10 MB, 20 restores): a copy that a
waiting restore skips the warming for takes 170 faults from its fork to its first read of the
channel, 98 in its resume and 72 until the program's next line. Most are Python's own bookkeeping in
a fresh fork (reference counts written on shared pages), spread over every call; a keeper, which
does the same kind of start-up, takes 250 faults before it blocks, 65 of them in setting its
name through ctypes, 37 in `sched_setscheduler`, 28 in `PR_SET_PDEATHSIG`, 33 in making its
channel and pidfd and 36 in its `Hello`.

A crash loop's timeline, measured on 2026-11-28 (10 MB, bytes, 30 restores per run, two runs;
each process appended a timestamped line to one `O_APPEND` file at each step, which adds a system
call per step; medians). From `tlongjmp()` to the restored program's next line took 1.83-1.99 ms;
in the same minutes a fork of that heap took 0.63-0.93 ms. The restore rarely waits for a fork
asked for by itself: the keeper is usually already forking the copy that the restore before asked
for (before its wake), and is slowed down by the two processes beside it on 2 CPUs. Once forked,
the copy took 325-343 us to get ready for its warming (its name, its channel, the death signal,
the parent check, its priority), and 609-756 us from its fork to reading its wake-up. The
shepherd's `Wake` waited 365-382 us for it there, and the resume took another 170-174 us. Tried
and not kept: the copy took its name only in the warming, and checked for a waiting wake-up with
a peek at its channel instead of a poll object. Getting ready then took 160-198 us, but the time
from its fork to its wake-up was 558-845 us, within the spread: the faults moved to the steps
after it, which write the same shared pages. Without instrumentation, four alternating runs of 24
restores each gave medians of 1.93-2.35 ms before and 1.91-2.44 ms after at 10 MB, and 3.20-3.87
against 3.46-4.02 ms at 100 MB. What a fresh copy costs is the pages that its whole path writes,
not any one step of it.

**tsetjmp.** The fork itself costs what `os.fork()` costs (without its at-fork hooks, a little less);
the difference is bookkeeping. After the fork every page the parent writes is copied, so the parent
now only restores its mask and records the current state: `clone(2)` takes plain ints and writes the
keeper's pidfd itself (`CLONE_PIDFD`), the previous pidfd is closed before the fork, and the
checkpoint's saved state is freed at the next checkpoint instead of on the way out (25 us of
faults). Faults around clone and mask restore: 69 -> 47 (`os.fork()`: 41). Before the fork,
instrumented at 10 MB in the benchmark's loop (each `tsetjmp()` there comes after the sleeps that
wait for the previous checkpoint's processes to go, so it runs cold), the bookkeeping costs about
300 us: the thread and caller checks 65-80, the stdio flush 26-30, the scan of open files for their
offsets 84-91, the rest of the saved state 31-40, the keeper's pidfd and the signal mask 32-42, the
`Snap` message to the shepherd 46-55. That is why 10 MB stays far from 1.2x.

Counted again on 2026-11-28 (18:20-19:00 UTC, a slower machine than the tables', where `os.fork()` of
the 10 MB worker took 1.2-1.6 ms): what a checkpoint costs beyond its fork is pages, not code.
`tsetjmp()` writes about 160 pages before its fork and 37 after it (minor faults counted between
instrumented steps, medians of 30, 10 MB): every object it touches has its reference count written,
and every page the previous fork left shared or write-protected faults on that first write. A C
program on the same machine timed those faults: 4.1 us a page when the page is copied (a
checkpoint's keeper still shares it), 1.5 us when it is only made writable again (the sharer is
gone, or took its own copy first), 0.03 us for a write without a fault. About 200 faults are
0.3-0.8 ms of the 0.75-0.85 ms that `tsetjmp()` took beyond the fork in those runs. System calls
are most of the rest: 30 in a checkpoint now, 34 before four were dropped (the caller check's
`getpid()`, whose answer a forked child now forgets with the caller; the arena's own memfd asked
for its access mode and its locks). On a cache left cold by the loop's sleeps they are slow:
`getpid()` 15 us (0.5 warm), the `stat` of `/proc/self/task` 79 us (9 warm), listing
`/proc/self/fd` 129 us (21 warm), medians of 30 after 50 ms sleeps. The four dropped were not
measurable in time within the machine's noise (medians of the fork floor moved 1.3-1.9 ms between
runs of the same code). Neither the stdio flush nor the open-file scan can move after the fork
(output would be written twice; a read by the program would move an offset the restore must
rewind), and a copy-on-write fault costs the same in either process. A path in C would write far
fewer pages, but not make fewer system calls: the scan alone in C, tried in a scratch build, took
165 us cold against 272 in Python (20-25 us warm against 50-70). By these counts a C path would
save about 0.2 ms of the 0.75-0.85: 1.5x at 10 MB on this machine rather than 1.2x, and about 1.08x
at 100 MB. It was not built; 1.2x at 10 MB needs a checkpoint that neither lists its open files
nor writes more than a few dozen pages, which is another design (offsets read by the keeper
would race the program's next read).

Huge pages make the fork itself cheaper, not forkpoint's share of a checkpoint: a fork copies one
entry per 2 MB page instead of 512. Measured 2026-11-28 22:03 UTC (medians of 30 `os.fork()`s of
a Python process with one private anonymous mapping, filled): 0.99 ms at 10 MB and 3.19 ms at
100 MB in 4 KB pages, 0.42 and 0.46 ms after `madvise(MADV_HUGEPAGE)` before filling it (this
machine's THP mode is `madvise`); 33 ms against 1.8 ms at 1 GB with other work running. A raw
fork of the same heap gains as much, so every ratio above would grow, and a page the program
writes while a snapshot shares it splits its 2 MB mapping back into 4 KB entries (Linux copies
only the 4 KB page): one byte written in each of 50 of the 100 MB's huge pages while a fork
shared them, and the next fork took 1.24 ms instead of 0.46. The gain lasts only for memory that
is read and not written between checkpoints (large read-only tables or models). It is not
applied by forkpoint; a program can advise its own large buffers.

That recount also found the fork floor wrong since the arena copy for a program's own children
(2026-11-28, d5cb386): `os.fork()` in the benchmark's worker ran forkpoint's at-fork hook, which
copies the arena for the child, and the floor took 2.0-2.1 ms instead of 1.2 at 10 MB, which
would have flattered every ratio to it. The floors (`_fork_floor`, `_wake_floor`, and
`throughput.py --breakdown`) now fork with that copy paused (`_runtime.arena_copies_paused`), as
`os.fork()` without forkpoint; the tables below were measured before the copy existed. With the
corrected floor, `forkpoint bench --sizes 10M,100M --repeats 15` on that slower machine (18:30 UTC,
nothing else of ours running) gave `tsetjmp` / fork 1.69x and 1.57x at 10 MB (bytes, dict) and
1.13x and 1.16x at 100 MB; "runs between faults" 1.34-1.50 ms; crash loop / fork 2.16x and 3.22x
at 10 MB, 1.58x and 1.59x at 100 MB.

On 2026-11-29 (02:05 UTC, two helper sessions' loads partly running), eight rounds alternating
between 1f1c3c7 and 040ff74 (the program's CPU time counted across restores, the signal replay
and witness fixes; bytes, medians of the rounds) gave `tsetjmp` / fork 1.69x and 1.69x at 10 MB,
1.16x and 1.15x at 100 MB; `tlongjmp` best case 0.94 and 1.24 ms at 10 MB, 1.10 and 1.30 at 100
MB; "runs between faults" 1.42 and 1.54 ms, 1.31 and 1.52; crash loop / fork 2.50x and 2.91x,
1.39x and 1.45x. The spare's clock read and arena write for the CPU time were on the wake path
then; prepared while the spare is frozen (fbf5ef6), five rounds against the same code with the
feature switched off gave best cases of 1.03/1.34 ms against 1.16/1.19 and "runs between faults"
1.54/1.57 against 1.60/1.47 (10/100 MB): no difference beyond the run's noise, which on that
machine moved one code's best case between 0.85 and 1.16 ms from run to run."""



def restore_steps(results: Path, rerun: bool) -> str:
    """A restore step by step (perf) and the shepherd's instructions per restore (callgrind)."""
    import subprocess

    parts = []
    for name, extra in (("restore_steps", []), ("restore_instructions", ["--callgrind"])):
        md = results / f"{name}.md"
        if rerun or not md.exists():
            r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "restore_breakdown.py"), *extra],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            md.write_text(r.stdout if r.returncode == 0 else f"({name}: not measured: {r.stderr.strip()})\n")
        parts.append(md.read_text().strip())
    return "\n\n".join(parts)


def server_and_persist(results: Path, rerun: bool) -> str:
    """Run (or re-read) the throughput and persist benchmarks; their markdown goes into the doc."""
    import subprocess

    out = {}
    runs = (("throughput", "throughput.py", ["--breakdown"]), ("persist", "persist_bench.py", []),
            ("crash", "crash_recovery.py", []), ("quarantine", "quarantine_bench.py", []))
    for name, script, extra in runs:
        md = results / f"{name}.md"
        if rerun or not md.exists():
            r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *extra,
                                "--json", str(results / f"{name}.json")],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            r.check_returncode()
            md.write_text(r.stdout)
        out[name] = md.read_text().strip()
    notes = ROOT / "benchmarks" / "notes"
    servers = results / "servers.md"      # benchmarks/servers.py, about 3 min: run it by hand
    table = servers.read_text().strip() if servers.exists() else "(not measured: run benchmarks/servers.py)"
    return (SERVER_PERSIST.format(**out) + "\n" + (notes / "servers.md").read_text().replace("{table}", table)
            + "\n" + (notes / "module_split.md").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10M,100M,1G")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "benchmarks.png"))
    p.add_argument("--note", default="No note on the machine's load was given (run_all.py --note).",
                   help="a line about what else ran on the machine, for the record")
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
                         python=m["python"], date=m["date"], note=args.note, targets=targets_text(data),
                         where=WHERE, audit=(ROOT / "benchmarks" / "notes" / "audit.md").read_text(),
                         breakdown=restore_steps(Path(args.json).parent, rerun=not args.from_json))
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
