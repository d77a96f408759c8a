#!/usr/bin/env python3
"""Crash-to-restored time: a real fault (reported by faulthandler before the teardown) against a
SIGKILL (which the shepherd only learns of from waitpid, after the kernel has freed the heap).

    PYTHONPATH=. python benchmarks/crash_recovery.py [--sizes 10,100,1000] [--repeat 5] [--json FILE]

Each configuration is one program: it checkpoints, optionally rewrites its whole heap (so that the
crashed process owns a private copy to tear down), stamps CLOCK_MONOTONIC in a persist() region and
crashes; the restored process measures the gap.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent("""
    import ctypes, os, signal, sys, time
    import forkpoint as fp
    mb, dirty, how, repeat = int(sys.argv[1]), sys.argv[2] == "dirty", sys.argv[3], int(sys.argv[4])
    heap = bytearray(mb << 20)
    heap[::4096] = b"x" * len(heap[::4096])
    fp.recover_on(signal.SIGSEGV, signal.SIGKILL, max_recoveries=1000)
    t0 = fp.persist_array("t0", 1, "d")
    res = fp.persist_array("res", 64, "d")
    k = fp.persist_int("k")
    fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        res[k.value] = time.perf_counter() - t0[0]
        k.add()
    if k.value < repeat:
        time.sleep(0.2 + mb / 2000)          # the spare is ready, the last teardown is over
        if dirty:
            heap[::4096] = b"y" * len(heap[::4096])
        t0[0] = time.perf_counter()
        if how == "segfault":
            ctypes.string_at(0)
        os.kill(os.getpid(), signal.SIGKILL)
    print(" ".join(str(x) for x in res[:repeat]))
""")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000", help="heap sizes in MB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    for mb in (int(x) for x in args.sizes.split(",")):
        for state in ("clean", "dirty"):
            row = {"mb": mb, "state": state}
            for how in ("segfault", "sigkill"):
                r = subprocess.run([sys.executable, "-c", PROGRAM, str(mb), state, how, str(args.repeat)],
                                   capture_output=True, text=True, env=env, timeout=300)
                if r.returncode != 0:
                    print(r.stderr, file=sys.stderr)
                    return 1
                xs = [float(x) * 1e3 for x in r.stdout.split()]
                row[how] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
            rows.append(row)
            print(f"  {mb} MB {state}: segfault {row['segfault']['median']:.2f} ms, "
                  f"SIGKILL {row['sigkill']['median']:.2f} ms", file=sys.stderr)
    print(f"Crash-to-restored time (ms, median (min-max) of {args.repeat}); 'written': the crashed process "
          "had rewritten its whole heap, so its teardown frees a private copy.\n")
    print("| heap | state | real segfault (faulthandler report) | SIGKILL (waitpid) | SIGKILL / segfault |")
    print("|---|---|---|---|---|")
    for row in rows:
        s, k = row["segfault"], row["sigkill"]
        print(f"| {row['mb']} MB | {'written' if row['state'] == 'dirty' else 'unwritten'} | "
              f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {k['median']:.2f} ({k['min']:.2f}-"
              f"{k['max']:.2f}) | {k['median'] / s['median']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
