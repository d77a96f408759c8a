#!/usr/bin/env python3
"""The quarantine at each scope: what a lookup costs per request, and how soon a new quarantine is
refused everywhere.

    PYTHONPATH=. python benchmarks/quarantine_bench.py [--calls 200000] [--rounds 5] [--keys 100]
                                                       [--propagation 20] [--json FILE] [--md FILE]

* **lookup**: one program per scope (process, host, redis), each started with forkpoint running
  and ``--keys`` keys quarantined, times ``--calls`` calls of ``is_quarantined`` (a key that is not
  quarantined: the ordinary request) and of a ``with processing(key):`` block (what every request of
  ``@checkpointed(key=...)`` pays). The scopes run in turn, ``--rounds`` times, so that the machine's
  load falls on each alike; the figure is each scope's median over the rounds, and its ratio and
  difference to process scope measured in the same run.
* **propagation**: two programs of one service. B polls ``is_quarantined(k)`` in a loop; A crashes
  on ``k`` under ``processing(k)`` (``quarantine_after=1``). The time is from A's last stamp of
  CLOCK_MONOTONIC before its crash to the first lookup in B that refuses ``k``: the crash, A's
  shepherd deciding and recording, and the way to B (the host store; or Redis, pub/sub and B's
  shepherd rewriting its mirror).

Redis rows need ``redis-server`` on PATH and the ``redis`` package; the script starts its own server
on a free port (no persistence) and stops it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOOKUP = textwrap.dedent("""
    import sys, time
    import forkpoint as fp
    calls, keys = int(sys.argv[1]), int(sys.argv[2])
    fp.start()
    for i in range(keys):
        fp.quarantine(f"GET /poisoned/{i}")
    while len(fp.quarantined()) < keys:      # at redis scope: until the mirror has them all
        time.sleep(0.01)
    key = "GET /api/items?page=2"
    fp.is_quarantined(key)
    t0 = time.perf_counter()
    for _ in range(calls):
        fp.is_quarantined(key)
    t1 = time.perf_counter()
    for _ in range(calls):
        with fp.processing(key):
            pass
    t2 = time.perf_counter()
    print((t1 - t0) / calls * 1e6, (t2 - t1) / calls * 1e6, flush=True)
""")

WATCHER = textwrap.dedent("""
    import sys, time
    import forkpoint as fp
    fp.start()
    print("ready", flush=True)
    for line in sys.stdin:
        key = line.strip()
        deadline = time.monotonic() + 10
        while not fp.is_quarantined(key) and time.monotonic() < deadline:
            pass
        print(time.monotonic() if fp.is_quarantined(key) else "timeout", flush=True)
""")

CRASHER = textwrap.dedent("""
    import ctypes, signal, sys, time
    import forkpoint as fp
    fp.recover_on(signal.SIGSEGV, quarantine_after=1, max_recoveries=10000)
    stamp = fp.persist_array("t0", 1, "d")
    crashed = fp.persist_array("crashed", 1, "q")
    print("ready", flush=True)
    for i, line in enumerate(sys.stdin, 1):
        key = line.strip()
        fp.tsetjmp()
        if crashed[0] == i:                  # restored after crashing on this key
            print(stamp[0], flush=True)
            continue
        with fp.processing(key):
            crashed[0] = i
            stamp[0] = time.monotonic()
            ctypes.string_at(0)
""")


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKPOINT_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class Redis:
    def __init__(self, tmp: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _scopes(redis: Redis | None) -> dict[str, str]:
    out = {"process": "process", "host": "host"}
    if redis is not None:
        out["redis"] = redis.url
    return out


def lookup(scopes: dict[str, str], calls: int, rounds: int, keys: int, run: Path) -> dict[str, dict]:
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in scopes}
    prog = run / "lookup.py"
    prog.write_text(LOOKUP)
    for r in range(rounds):
        for name, scope in scopes.items():
            env = _env({"FORKPOINT_QUARANTINE": scope, "FORKPOINT_SERVICE": f"bench-{os.getpid()}-{r}",
                        "XDG_RUNTIME_DIR": str(run)})
            out = subprocess.run([sys.executable, str(prog), str(calls), str(keys)], capture_output=True,
                                 text=True, timeout=600, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"{name}: {out.stderr}")
            a, b = map(float, out.stdout.split())
            got[name].append((a, b))
    base = statistics.median(a for a, _ in got["process"])
    base_p = statistics.median(b for _, b in got["process"])
    res = {}
    for name, xs in got.items():
        look, proc = statistics.median(a for a, _ in xs), statistics.median(b for _, b in xs)
        res[name] = {"lookup_us": look, "lookup_ratio": look / base, "lookup_extra_us": look - base,
                     "processing_us": proc, "processing_ratio": proc / base_p,
                     "processing_extra_us": proc - base_p, "rounds": [list(x) for x in xs]}
    return res


def propagation(scope: str, n: int, run: Path) -> dict:
    env = _env({"FORKPOINT_QUARANTINE": scope, "FORKPOINT_SERVICE": f"prop-{os.getpid()}-{scope[:5]}",
                "XDG_RUNTIME_DIR": str(run)})
    (run / "watcher.py").write_text(WATCHER)
    (run / "crasher.py").write_text(CRASHER)
    procs = [subprocess.Popen([sys.executable, str(run / name)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
             for name in ("watcher.py", "crasher.py")]
    watcher, crasher = procs
    times = []
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for i in range(n):
            key = f"poison-{i}"
            assert watcher.stdin is not None and crasher.stdin is not None
            watcher.stdin.write(key + "\n")
            watcher.stdin.flush()
            time.sleep(0.02)
            crasher.stdin.write(key + "\n")
            crasher.stdin.flush()
            assert crasher.stdout is not None and watcher.stdout is not None
            t0 = float(crasher.stdout.readline())
            seen = watcher.stdout.readline().strip()
            times.append(float(seen) - t0 if seen != "timeout" else float("inf"))
            time.sleep(0.05)
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(30)
    ms = sorted(t * 1e3 for t in times)
    return {"n": n, "median_ms": statistics.median(ms), "max_ms": ms[-1], "min_ms": ms[0], "all_ms": ms}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "cpu": _cpu(), "load_before": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"- Machine: {m['cpus']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}.",
             f"- Date: {m['date']}; load average before {m['load_before'][0]:.2f}, after "
             f"{data['load_after'][0]:.2f} (1 min).",
             f"- {data['calls']} calls per round, {data['rounds']} rounds, {data['keys']} keys "
             "quarantined.", "",
             "| scope | is_quarantined us | vs process | extra us | processing() us | vs process "
             "| extra us |",
             "|---|---|---|---|---|---|---|"]
    for name, r in data["lookup"].items():
        lines.append(f"| {name} | {r['lookup_us']:.2f} | {r['lookup_ratio']:.2f}x "
                     f"| {r['lookup_extra_us']:+.2f} | {r['processing_us']:.2f} "
                     f"| {r['processing_ratio']:.2f}x | {r['processing_extra_us']:+.2f} |")
    lines += ["", "| scope | new quarantine refused by another program: median ms | max ms | runs |",
              "|---|---|---|---|"]
    for name, r in data["propagation"].items():
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['max_ms']:.2f} | {r['n']} |")
    if data.get("skipped"):
        lines += ["", f"Skipped: {data['skipped']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--calls", type=int, default=200000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keys", type=int, default=100)
    ap.add_argument("--propagation", type=int, default=20, help="quarantines timed per scope")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--md", metavar="FILE")
    args = ap.parse_args()
    data: dict = {"machine": machine(), "calls": args.calls, "rounds": args.rounds, "keys": args.keys}
    with tempfile.TemporaryDirectory(prefix="fp-qbench-") as tmp:
        run = Path(tmp) / "run"
        run.mkdir(mode=0o700)
        redis = None
        try:
            import redis as _client  # noqa: F401
            have_client = True
        except ImportError:
            have_client = False
        if shutil.which("redis-server") and have_client:
            redis = Redis(Path(tmp))
        else:
            data["skipped"] = "redis rows: redis-server or the redis package is missing"
        try:
            scopes = _scopes(redis)
            data["lookup"] = lookup(scopes, args.calls, args.rounds, args.keys, run)
            data["propagation"] = {name: propagation(scope, args.propagation, run)
                                   for name, scope in scopes.items() if name != "process"}
        finally:
            if redis is not None:
                redis.stop()
    data["load_after"] = os.getloadavg()
    md = markdown(data)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    if args.md:
        Path(args.md).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
