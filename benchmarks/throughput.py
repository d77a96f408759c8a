#!/usr/bin/env python3
"""Requests per second of a small HTTP key-value server with and without forkpoint checkpoints.

    PYTHONPATH=. python benchmarks/throughput.py               # about 3 minutes
    PYTHONPATH=. python benchmarks/throughput.py --quick --json out.json

The server (``serve()`` below, modelled on ``forkpoint/demo.py``) is one single-threaded process on
127.0.0.1: a ``selectors`` loop over keep-alive connections that calls ``handle(path)`` once per
request. Every configuration runs it as its own subprocess:

* ``none``: no forkpoint at all (the baseline each ratio is taken against, measured in the same round);
* ``per-request``: ``@forkpoint.checkpointed`` on the handler (a checkpoint per call, ``spares=0``, the
  decorator's default for per-call checkpoints);
* ``per-request+spare``: the same with ``spares=1`` (a ready copy forked by the checkpoint's keeper);
* ``every-100``: ``forkpoint.tsetjmp()`` on every 100th request (configured default of one spare),
  then ``forkpoint.discard()`` of the previous checkpoint.

Handlers: ``trivial`` (a dict update and a short reply) and ``1ms`` (the same plus 1 ms of busy work,
a spin on ``time.perf_counter``, so the server's CPU is really used, as by a real handler).

The load comes from ``wrk`` (Debian package ``wrk``) when it is installed, else from a Python
asyncio client; both hold a few keep-alive connections for a fixed time. The client runs on the same
machine and competes with the server (and with forkpoint's snapshot and shepherd processes) for CPU.
Each configuration is measured ``--rounds`` times, the configurations interleaved in each round;
the table gives the median (min-max) and the ratio of medians to ``none`` with the same handler.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wrk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MODES = ("none", "per-request", "per-request+spare", "every-100")
HANDLERS = ("trivial", "1ms")
EVERY = 100


# ---- the server (runs in its own subprocess: ``throughput.py --serve MODE HANDLER``) -----------
def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def serve(mode: str, handler: str, profile: str | None = None, heap_mb: int = 0) -> int:
    ballast = b"\x01" * (heap_mb << 20)     # resident heap that every fork must map  # noqa: F841
    store: dict[str, int] = {}
    work = 0.001 if handler == "1ms" else 0.0

    def handle(path: str) -> bytes:
        store[path] = store.get(path, 0) + 1
        if work:
            _spin(work)
        return b"ok %d\n" % store[path]

    fp: Any = None
    if mode != "none":
        import forkpoint as fp

        if mode == "per-request":
            handle = fp.checkpointed(handle)
        elif mode == "per-request+spare":
            handle = fp.checkpointed(spares=1)(handle)
        fp.start()
    counts = {"requests": 0, "checkpoints": 0}
    prev = 0

    def respond(path: str) -> bytes:
        nonlocal prev
        counts["requests"] += 1
        if mode == "every-100" and counts["requests"] % EVERY == 1:
            n = fp.tsetjmp()
            counts["checkpoints"] += 1
            if prev:
                fp.discard(prev)
            prev = n
        return handle(path)

    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    sel = selectors.DefaultSelector()
    srv = socket.create_server((HOST, 0), backlog=128)
    sel.register(srv, selectors.EVENT_READ, None)
    print(srv.getsockname()[1], flush=True)
    bufs: dict[socket.socket, bytes] = {}
    running = True
    while running:
        for ev, _ in sel.select():
            sock = ev.fileobj
            if sock is srv:
                conn, _ = srv.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, None)
                bufs[conn] = b""
                continue
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(sock)
                bufs.pop(sock, None)
                sock.close()
                continue
            buf = bufs[sock] + data
            out = []
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head, buf = buf[:end], buf[end + 4:]
                path = head.split(b" ", 2)[1].decode()
                if path == "/quit":
                    if mode != "none":
                        counts["checkpoints_taken"] = fp.chkpt_status(fp.CKPT_NUMCHKPTS)
                    body = json.dumps(counts).encode()
                    running = False
                else:
                    body = respond(path)
                out.append(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            bufs[sock] = buf
            if out:
                try:
                    sock.sendall(b"".join(out))
                except ConnectionError:
                    pass
            if not running:
                break
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    sel.close()
    srv.close()
    return 0


# ---- load generators ----------------------------------------------------------------------------
def run_wrk(port: int, seconds: int, connections: int) -> dict[str, Any]:
    return wrk.run_wrk(f"http://{HOST}:{port}/k", seconds, connections)


async def _py_load(port: int, seconds: float, connections: int) -> dict[str, Any]:
    deadline = time.perf_counter() + seconds
    done = [0]
    req = f"GET /k HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()

    async def one() -> None:
        r, w = await asyncio.open_connection(HOST, port)
        try:
            while time.perf_counter() < deadline:
                w.write(req)
                head = await r.readuntil(b"\r\n\r\n")
                n = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                await r.readexactly(n)
                done[0] += 1
        finally:
            w.close()
            await w.wait_closed()

    t = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(connections))), seconds + 30)
    elapsed = time.perf_counter() - t
    return {"rps": done[0] / elapsed, "requests": done[0], "errors": None}


def run_python(port: int, seconds: float, connections: int) -> dict[str, Any]:
    return asyncio.run(_py_load(port, seconds, connections))


def http_get(port: int, path: str) -> bytes:
    with socket.create_connection((HOST, port), timeout=30) as c:
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        n = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < n:
            chunk = c.recv(65536)
            if not chunk:
                break
            body += chunk
        return body


# ---- one measurement ----------------------------------------------------------------------------
def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def measure(mode: str, handler: str, client: str, seconds: float, connections: int,
            profile: str | None = None, heap_mb: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", mode, handler, "--heap-mb", str(heap_mb)]
    if profile:
        cmd += ["--profile-out", profile]
    import tempfile

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=server_env(), text=True)
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            for _ in range(20):                  # warm-up: the first checkpoint starts the shepherd
                http_get(port, "/warm")
            if client == "wrk":
                res = run_wrk(port, max(1, round(seconds)), connections)
            else:
                res = run_python(port, seconds, connections)
            res["server"] = json.loads(http_get(port, "/quit"))
            res["exit"] = proc.wait(30)
            return res
        except (OSError, ValueError, RuntimeError) as e:
            if proc.poll() is None:
                proc.kill()
            status = proc.wait()
            err.seek(0)
            raise ServerFailed(f"{mode}/{handler}: {type(e).__name__}: {e}; server exit status "
                               f"{status}; its stderr: {err.read()[-2000:]!r}") from e
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


class ServerFailed(RuntimeError):
    pass


def descendants_gone(timeout: float = 3.0) -> list[str]:
    """Processes still below this one (this process is a subreaper, so orphans come back here)."""
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in me.children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    out = []
    for p in left:
        try:
            out.append(f"{p.pid} {p.name()}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return out


# ---- where the time of a per-request checkpoint goes (``--breakdown``) ---------------------------
def _timed(fn: Any, n: int) -> dict[str, float]:
    """Median wall us of ``fn()`` over ``n`` calls, and the process's own CPU and minor faults per call."""
    import resource

    ts = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"us": statistics.median(ts) * 1e6, "user_us": (r1.ru_utime - r0.ru_utime) / n * 1e6,
            "sys_us": (r1.ru_stime - r0.ru_stime) / n * 1e6,
            "minflt": (r1.ru_minflt - r0.ru_minflt) / n}


def breakdown_child(n: int, heap_mb: int = 0) -> int:
    """Run in a fresh process shaped like a ``per-request`` server; print the parts as JSON."""
    ballast = b"\x01" * (heap_mb << 20)  # noqa: F841
    import forkpoint as fp
    from forkpoint import _channel, _procfs, _sigutil, snapshots
    from forkpoint._runtime import arena_copies_paused

    store: dict[str, int] = {}

    def work(path: str) -> bytes:
        store[path] = store.get(path, 0) + 1
        return b"ok"

    handle = fp.checkpointed(work)
    handle_spare = fp.checkpointed(spares=1)(work)
    fp.start()
    for _ in range(20):
        handle("/warm")
    res: dict[str, Any] = {}

    def fork_floor() -> None:
        with arena_copies_paused():     # os.fork() as without forkpoint
            pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    def fork_returns() -> None:
        with arena_copies_paused():
            t = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            fork_only.append(time.perf_counter() - t)
        os.waitpid(pid, 0)

    fork_only: list[float] = []
    res["handler alone (no checkpoint)"] = _timed(lambda: work("/k"), n)
    res["os.fork() until it returns in the parent"] = _timed(fork_returns, n)
    res["os.fork() until it returns in the parent"]["us"] = statistics.median(fork_only) * 1e6
    res["os.fork() + child _exit + waitpid"] = _timed(fork_floor, n)
    res["checkpointed call, spares=0 (whole)"] = _timed(lambda: handle("/k"), n)
    res["checkpointed call, spares=1 (whole)"] = _timed(lambda: handle_spare("/k"), n)

    def ts_release() -> None:
        before = snapshots.current_state()
        k = snapshots.tsetjmp(spares=0)
        snapshots.end_transaction(k, before)

    res["tsetjmp(spares=0) + end_transaction"] = _timed(ts_release, n)
    res["  signal mask: block_all + restore"] = _timed(
        lambda: _sigutil.restore_mask(_sigutil.block_all()), n)
    res["  file_offsets() (/proc/self/fd scan)"] = _timed(_procfs.file_offsets, n)
    res["  other_threads() (/proc/self/task scan)"] = _timed(_procfs.other_threads, n)

    def chan() -> None:
        a, b = _channel.pair()
        a.close()
        b.close()

    res["  channel socketpair + close"] = _timed(chan, n)
    res["  flush_stdio()"] = _timed(_sigutil.flush_stdio, n)
    with open("/proc/self/status") as f:
        status = {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    print(json.dumps({"parts": res, "VmRSS": status.get("VmRSS"), "VmSize": status.get("VmSize"),
                      "mappings": maps, "fds": len(os.listdir("/proc/self/fd"))}), flush=True)
    return 0


def breakdown(n: int, heap_mb: int = 0) -> dict[str, Any]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--breakdown-child", str(n),
                          "--heap-mb", str(heap_mb)],
                         capture_output=True, text=True, env=server_env(), timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"breakdown failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def breakdown_table(b: dict[str, Any]) -> str:
    lines = [f"Live process: RSS {b['VmRSS']}, {b['mappings']} mappings, {b['fds']} fds.", "",
             "| step (in the live process, no network) | wall us (median) | user us | sys us "
             "| minor faults |", "|---|---|---|---|---|"]
    for name, v in b["parts"].items():
        lines.append(f"| {name} | {v['us']:.0f} | {v['user_us']:.0f} | {v['sys_us']:.0f} "
                     f"| {v['minflt']:.0f} |")
    return "\n".join(lines)


# ---- report -------------------------------------------------------------------------------------
def summarize(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for handler in HANDLERS:
        base = None
        for mode in MODES:
            rs = runs.get((mode, handler))
            if not rs:
                continue
            rps = [r["rps"] for r in rs]
            med = statistics.median(rps)
            if mode == "none":
                base = med
            # the ratio of each round to the baseline measured in the same round
            bases = [b["rps"] for b in runs.get(("none", handler), [])]
            per_round = [r / b for r, b in zip(rps, bases, strict=False)] if bases else []
            srv = [r["server"] for r in rs]
            rows.append({
                "handler": handler, "mode": mode, "rps_median": med, "rps_min": min(rps),
                "rps_max": max(rps), "runs": rps,
                "ratio": med / base if base else None,
                "ratio_per_round": per_round,
                "us_per_request": 1e6 / med,
                "extra_us_per_request": (1e6 / med - 1e6 / base) if base else None,
                "requests": [s["requests"] for s in srv],
                "checkpoints": [s.get("checkpoints_taken", 0) for s in srv],
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| handler | checkpointing | req/s median (min-max) | ratio to none | us/request "
             "| extra us/request | checkpoints / requests |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        extra = f"{r['extra_us_per_request']:.0f}" if r["extra_us_per_request"] is not None else "-"
        ck = sum(r["checkpoints"]) / max(1, sum(r["requests"]))
        lines.append(f"| {r['handler']} | {r['mode']} | {r['rps_median']:.0f} ({r['rps_min']:.0f}-"
                     f"{r['rps_max']:.0f}) | {ratio} | {r['us_per_request']:.0f} | {extra} | {ck:.3f} |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["handler"], r["mode"]): r for r in rows}
    out = []
    r = by.get(("1ms", "per-request"))
    if r and r["ratio"] is not None:
        ok = "meets" if r["ratio"] >= 0.5 else "MISSES"
        out.append(f"Target (1 ms handler, checkpoint per request >= 50% of unprotected): "
                   f"{r['ratio']:.0%}, {ok} the target.")
    for h in HANDLERS:
        a, b = by.get((h, "per-request")), by.get((h, "per-request+spare"))
        if a and b:
            out.append(f"Spare ({h} handler): spares=1 gives {b['rps_median']:.0f} req/s vs "
                       f"{a['rps_median']:.0f} with spares=0 ({b['rps_median'] / a['rps_median']:.2f}x).")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round (a few seconds)")
    ap.add_argument("--json", metavar="FILE", help="write the raw figures as JSON")
    ap.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--seconds", type=float, help="load time per measurement (default 3; quick: 1)")
    ap.add_argument("--rounds", type=int, help="rounds over all configurations (default 3; quick: 1)")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--heap-mb", type=int, default=0,
                    help="extra resident heap (MB) in each server, to see how the fork cost scales")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--handlers", default=",".join(HANDLERS))
    ap.add_argument("--profile", metavar="DIR", help="cProfile each server's live process into DIR")
    ap.add_argument("--serve", nargs=2, metavar=("MODE", "HANDLER"), help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the parts of a per-request checkpoint in a server-like process")
    ap.add_argument("--breakdown-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(*args.serve, profile=args.profile_out, heap_mb=args.heap_mb)
    if args.breakdown_child:
        return breakdown_child(args.breakdown_child, args.heap_mb)

    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    elif client == "wrk" and not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk); using the Python client", file=sys.stderr)
        client = "python"
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    rounds = args.rounds or (1 if args.quick else 3)
    modes = [m for m in args.modes.split(",") if m]
    handlers = [h for h in args.handlers.split(",") if h]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")
    for h in handlers:
        if h not in HANDLERS:
            ap.error(f"unknown handler {h!r}")
    if "none" not in modes:
        modes.insert(0, "none")

    from forkpoint import _prctl

    _prctl.set_child_subreaper(True)   # so that any process a server leaks is seen (and ended) here
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failures: list[str] = []
    started = time.monotonic()
    for rnd in range(rounds):
        for handler in handlers:
            for mode in modes:
                prof = None
                if args.profile:
                    os.makedirs(args.profile, exist_ok=True)
                    prof = os.path.join(args.profile, f"{mode}-{handler}-{rnd}.prof")
                for attempt in range(3):
                    try:
                        res = measure(mode, handler, client, seconds, args.connections, prof,
                                      args.heap_mb)
                        break
                    except ServerFailed as e:   # reported, then measured again
                        failures.append(str(e))
                        print(f"  !! {e}", file=sys.stderr)
                        if attempt == 2:
                            raise
                runs.setdefault((mode, handler), []).append(res)
                print(f"  round {rnd + 1}/{rounds} {handler:>7} {mode:<18} {res['rps']:9.0f} req/s",
                      file=sys.stderr)
    bd = breakdown(100 if args.quick else 400, args.heap_mb) if args.breakdown else None
    leaked = descendants_gone()
    rows = summarize(runs)
    print(f"Server throughput: client {client}, {args.connections} keep-alive connections, "
          f"{seconds:g} s x {rounds} round(s); {os.cpu_count()} CPUs; extra heap {args.heap_mb} MB; "
          f"{time.monotonic() - started:.0f} s in all.\n")
    print(table(rows))
    print()
    for line in verdict(rows):
        print(f"- {line}")
    if bd is not None:
        print()
        print(breakdown_table(bd))
    for f in failures:
        print(f"- A server run failed and was measured again: {f}")
    if leaked:
        print(f"- WARNING: processes left behind and killed: {leaked}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "throughput", "client": client, "seconds": seconds,
                       "rounds": rounds, "connections": args.connections, "heap_mb": args.heap_mb,
                       "every": EVERY,
                       "handler_1ms": "busy spin on time.perf_counter for 1 ms",
                       "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                                   "python": platform.python_version()},
                       "rows": rows, "verdict": verdict(rows), "breakdown": bd,
                       "failures": failures, "leaked": leaked}, f, indent=1)
    return 1 if leaked else 0


if __name__ == "__main__":
    raise SystemExit(main())
