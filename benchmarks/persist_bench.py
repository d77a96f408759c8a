#!/usr/bin/env python3
"""The cost of ``persist()`` writes and of ``cache(IN)``/``cache(OUT)``, against plain memory and pickle.

    PYTHONPATH=. python benchmarks/persist_bench.py                # about half a minute
    PYTHONPATH=. python benchmarks/persist_bench.py --quick --json out.json

What is compared (each timed ``--repeat`` times; the table gives median, min and max):

* **int64 item writes**: ``view[i] = i`` for every item of an ``N``-item int64 ``memoryview``, over a
  persistent region (``forkpoint.persist(...).cast("q")``) and over a ``bytearray``; once on fresh
  memory (first touch: page faults included) and once on memory already written (warm).
* **counter increment**: ``PersistentInt.add()`` (``forkpoint.persist_int``) against ``view[0] += 1``
  on a bytearray's int64 view.
* **bulk slice write**: ``region[:] = payload`` for 1 MB and 64 MB, persistent region vs bytearray.
* **cache IN / OUT** of a bytes payload of 1 KB, 1 MB and 64 MB, against ``pickle.dump`` to a file
  with ``flush`` + ``os.fsync`` (IN) and ``open`` + ``pickle.load`` from that file (OUT, from the page
  cache). ``cache(IN)`` copies into the shared arena with a CRC32; ``cache(OUT)`` checks the CRC and
  returns a copy.

The program is started with ``forkpoint.start()`` first (the shepherd is running, as in a real
program); the arena is set to ``--arena-mb`` (default 1024) with ``forkpoint.configure``, since the
64 MB entries are double-buffered. Ratios are forkpoint time / baseline time: below 1 is faster.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import forkpoint as fp  # noqa: E402

SIZES = (("1 KB", 1 << 10), ("1 MB", 1 << 20), ("64 MB", 64 << 20))


def timeit(fn: Callable[[], Any], repeat: int, setup: Callable[[], Any] | None = None) -> list[float]:
    out = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def stats(ts: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts)}


def fs_type(path: str) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, f"{parts[2]} on {parts[0]}"
    except OSError:
        pass
    return kind


class Bench:
    def __init__(self, repeat: int, n_items: int, directory: str) -> None:
        self.repeat = repeat
        self.n = n_items
        self.dir = directory
        self.rows: list[dict[str, Any]] = []
        self.seq = 0

    def name(self, prefix: str) -> str:
        self.seq += 1
        return f"bench.{prefix}.{self.seq}"

    def add(self, what: str, size: str, fp_ts: list[float], base_ts: list[float], baseline: str,
            unit_items: int = 1, nbytes: int = 0) -> None:
        f, b = stats(fp_ts), stats(base_ts)
        self.rows.append({"what": what, "size": size, "forkpoint": f, "baseline": b,
                          "baseline_kind": baseline, "items": unit_items, "bytes": nbytes,
                          "ratio": f["median"] / b["median"] if b["median"] else None})

    # -- persist writes ---------------------------------------------------------------------------
    def item_writes(self) -> None:
        n = self.n

        def fill(view: memoryview) -> None:
            for i in range(n):
                view[i] = i

        # first touch: a fresh region / bytearray each time
        fresh_p: list[memoryview] = []
        fresh_b: list[memoryview] = []
        fp_ts = timeit(lambda: fill(fresh_p[-1]), self.repeat,
                       setup=lambda: fresh_p.append(fp.persist(self.name("ints"), 8 * n).cast("q")))
        base_ts = timeit(lambda: fill(fresh_b[-1]), self.repeat,
                         setup=lambda: fresh_b.append(memoryview(bytearray(8 * n)).cast("q")))
        self.add("int64 item writes, first touch", f"{n:,} items", fp_ts, base_ts, "bytearray", n)
        fresh_p.clear()
        fresh_b.clear()
        # warm: the same memory written again
        pv = fp.persist(self.name("ints"), 8 * n).cast("q")
        bv = memoryview(bytearray(8 * n)).cast("q")
        fill(pv)
        fill(bv)
        fp_ts = timeit(lambda: fill(pv), self.repeat)
        base_ts = timeit(lambda: fill(bv), self.repeat)
        self.add("int64 item writes, warm", f"{n:,} items", fp_ts, base_ts, "bytearray", n)

    def counter(self) -> None:
        n = self.n
        c = fp.persist_int(self.name("counter"))
        bv = memoryview(bytearray(8)).cast("q")

        def pers() -> None:
            for _ in range(n):
                c.add()

        def plain() -> None:
            for _ in range(n):
                bv[0] += 1

        fp_ts = timeit(pers, self.repeat)
        base_ts = timeit(plain, self.repeat)
        self.add("counter increment: PersistentInt.add() vs view[0] += 1", f"{n:,} adds", fp_ts,
                 base_ts, "bytearray view", n)

    def bulk(self) -> None:
        for label, size in SIZES[1:]:
            payload = os.urandom(size)
            region = fp.persist(self.name("bulk"), size)
            plain = memoryview(bytearray(size))
            region[:] = payload      # touched once, so both sides are warm
            plain[:] = payload

            def w_region(region: memoryview = region, payload: bytes = payload) -> None:
                region[:] = payload

            def w_plain(plain: memoryview = plain, payload: bytes = payload) -> None:
                plain[:] = payload

            fp_ts = timeit(w_region, self.repeat)
            base_ts = timeit(w_plain, self.repeat)
            self.add("bulk slice write (warm)", label, fp_ts, base_ts, "bytearray", nbytes=size)

    # -- cache vs pickle + fsync ------------------------------------------------------------------
    def cache(self) -> None:
        for label, size in SIZES:
            payload = os.urandom(size)
            reps = self.repeat * (20 if size <= 1 << 20 else 1)
            name = self.name("cache")
            path = os.path.join(self.dir, f"forkpoint-bench-{os.getpid()}-{self.seq}.pickle")

            def c_in(name: str = name, payload: bytes = payload) -> None:
                fp.cache(fp.IN, name, payload)

            def c_out(name: str = name) -> None:
                fp.cache(fp.OUT, name)

            def p_in(path: str = path, payload: bytes = payload) -> None:
                with open(path, "wb") as f:
                    pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
                    f.flush()
                    os.fsync(f.fileno())

            def p_out(path: str = path) -> None:
                with open(path, "rb") as f:
                    pickle.load(f)

            try:
                c_in()
                p_in()            # the first IN allocates both buffers / creates the file
                c_in()
                assert fp.cache(fp.OUT, name) == payload
                fp_in = timeit(c_in, reps)
                base_in = timeit(p_in, reps)
                fp_out = timeit(c_out, reps)
                base_out = timeit(p_out, reps)
                with open(path, "rb") as f:
                    assert pickle.load(f) == payload
            finally:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self.add("cache(IN) vs pickle.dump + fsync", label, fp_in, base_in, "pickle file", nbytes=size)
            self.add("cache(OUT) vs pickle.load", label, fp_out, base_out, "pickle file", nbytes=size)


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def cell(st: dict[str, float]) -> str:
    return f"{fmt_time(st['median'])} ({fmt_time(st['min'])} - {fmt_time(st['max'])})"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| operation | size | forkpoint median (min - max) | baseline | baseline median (min - max) "
             "| ratio fp/baseline | per item or GB/s (fp / baseline) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, b = r["forkpoint"], r["baseline"]
        if r["bytes"]:
            extra = f"{r['bytes'] / f['median'] / 1e9:.2f} / {r['bytes'] / b['median'] / 1e9:.2f} GB/s"
        else:
            extra = f"{f['median'] / r['items'] * 1e9:.0f} / {b['median'] / r['items'] * 1e9:.0f} ns"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        lines.append(f"| {r['what']} | {r['size']} | {cell(f)} | {r['baseline_kind']} | {cell(b)} "
                     f"| {ratio} | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer items and repeats (a few seconds)")
    ap.add_argument("--json", metavar="FILE", help="write the raw figures as JSON")
    ap.add_argument("--repeat", type=int, help="timings per figure (default 7; quick: 2)")
    ap.add_argument("--items", type=int,
                    help="int64 items per write loop (default 1,000,000; quick: 100,000)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the pickle files go")
    ap.add_argument("--arena-mb", type=int, default=1024)
    args = ap.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 7)
    items = args.items or (100_000 if args.quick else 1_000_000)
    fp.configure(arena_size=args.arena_mb << 20)
    fp.start()
    started = time.monotonic()
    b = Bench(repeat, items, args.dir)
    b.item_writes()
    b.counter()
    b.bulk()
    b.cache()
    fs = fs_type(os.path.realpath(args.dir))
    print(f"persist() and cache() costs: {repeat} timings per figure (cache of 1 KB and 1 MB: "
          f"{repeat * 20}); pickle files in {args.dir} ({fs}); {os.cpu_count()} CPUs; "
          f"{time.monotonic() - started:.1f} s in all.\n")
    print(table(b.rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "persist", "repeat": repeat, "items": items, "dir": args.dir,
                       "filesystem": fs, "arena_mb": args.arena_mb,
                       "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                                   "python": platform.python_version()},
                       "rows": b.rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
