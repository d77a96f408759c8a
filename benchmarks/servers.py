#!/usr/bin/env python3
"""Throughput of real gunicorn and uvicorn servers with and without forkpoint.wsgi/asgi.protect.

    PYTHONPATH=. python benchmarks/servers.py                   # about 4 minutes
    PYTHONPATH=. python benchmarks/servers.py --quick --json out.json

Each configuration starts its own server (``gunicorn -w 1`` sync worker, ``uvicorn --loop asyncio
--no-access-log``; one worker, so that the load generator and the server share the 2 cores the same
way in every configuration) on an application written here without a framework, so that the
server and forkpoint are all that is measured:

* ``plain``: the application as it is (the baseline of every ratio, measured in the same round);
* ``restart``: ``protect(app, mode="restart")`` (WSGI) or ``protect(app)`` (ASGI), with
  ``timeout=`` and the default key: the worker's checkpoint, per-request bookkeeping, no fork;
* ``restart-defaults``: the same with the default arguments (no ``timeout=``): no deadline is
  written per request (ASGI: per step) and no timer is kept;
* ``transaction``: ``forkpoint.wsgi.protect(app, mode="transaction", timeout=...)`` (gunicorn
  only): a checkpoint per request.

Handlers: ``trivial`` (a counter and a short reply) and ``1ms`` (the same plus 1 ms of busy work, a
spin on ``time.perf_counter``: a sleep would leave the CPU to forkpoint's processes and flatter it).

The load comes from ``wrk -t1 -c4`` when it is installed (Debian package ``wrk``), else from a
Python asyncio client. Configurations are interleaved in each of ``--rounds`` rounds; the table
gives the median (min-max) and the ratio of medians to ``plain`` with the same server and handler.

A second table times what protection adds to one call, in a single process, interleaved:
``@checkpointed`` with and without ``timeout=`` and ``key=`` (each call forks, so every page the
bookkeeping writes is copied on write), and a protected WSGI request in restart mode (no fork)
against the bare application.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wrk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
HANDLERS = ("trivial", "1ms")
CONFIGS = [("gunicorn", "plain"), ("gunicorn", "restart"), ("gunicorn", "restart-defaults"),
           ("gunicorn", "transaction"), ("uvicorn", "plain"), ("uvicorn", "restart"),
           ("uvicorn", "restart-defaults")]

APP = '''
import os, time
MODE = os.environ["BENCH_MODE"]
WORK = float(os.environ["BENCH_WORK"])
count = [0]

def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass

def wsgi(environ, start_response):
    count[0] += 1
    if WORK:
        spin(WORK)
    body = b"ok %d\\n" % count[0]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

async def asgi(scope, receive, send):
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].split(".")[-1]
                await send({"type": message["type"] + ".complete"})
                if kind == "shutdown":
                    return
        return
    count[0] += 1
    if WORK:
        spin(WORK)
    body = b"ok %d\\n" % count[0]
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

if MODE == "plain":
    wsgi_app, asgi_app = wsgi, asgi
elif MODE == "restart-defaults":
    import forkpoint.asgi, forkpoint.wsgi
    wsgi_app = forkpoint.wsgi.protect(wsgi, mode="restart")
    asgi_app = forkpoint.asgi.protect(asgi)
else:
    import forkpoint.asgi, forkpoint.wsgi
    wsgi_app = forkpoint.wsgi.protect(wsgi, mode=MODE, timeout=10.0)
    asgi_app = forkpoint.asgi.protect(asgi, timeout=10.0)
'''


# ---- servers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def env_for(mode: str, handler: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["BENCH_MODE"] = mode
    env["BENCH_WORK"] = "0.001" if handler == "1ms" else "0"
    return env


# Each server in a process group of its own (Popen's process_group= is Python 3.11+).
_OWN_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def start(server: str, mode: str, handler: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if server == "gunicorn":
        argv = [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"{HOST}:{port}", "app:wsgi_app"]
    else:
        argv = [sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--no-access-log",
                "--host", HOST, "--port", str(port), "app:asgi_app"]
    log = open(workdir / f"{server}.log", "ab")
    proc = subprocess.Popen(argv, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                            env=env_for(mode, handler), **_OWN_GROUP)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server} exited {proc.returncode}: "
                               f"{(workdir / f'{server}.log').read_text(errors='replace')[-2000:]}")
        try:
            if http_get(port).startswith(b"ok"):
                return proc, port
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{server} did not answer on port {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def http_get(port: int, path: str = "/") -> bytes:
    with socket.create_connection((HOST, port), timeout=10) as c:
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


# ---- load ---------------------------------------------------------------------------------------
def run_wrk(port: int, seconds: int, connections: int) -> dict[str, Any]:
    return wrk.run_wrk(f"http://{HOST}:{port}/", seconds, connections)


async def _py_load(port: int, seconds: float, connections: int) -> dict[str, Any]:
    deadline = time.perf_counter() + seconds
    done = [0]
    bad = [0]
    req = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()

    async def one() -> None:
        r = w = None
        while time.perf_counter() < deadline:
            if w is None:
                r, w = await asyncio.open_connection(HOST, port)
            assert r is not None
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            n = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await r.readexactly(n)
            done[0] += 1
            if not head.startswith(b"HTTP/1.1 200"):
                bad[0] += 1
            if re.search(rb"(?i)connection: close", head):
                w.close()
                r = w = None
        if w is not None:
            w.close()

    t = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(connections))), seconds + 30)
    return {"rps": done[0] / (time.perf_counter() - t), "requests": done[0], "errors": None,
            "non_2xx": bad[0]}


def run_python(port: int, seconds: float, connections: int) -> dict[str, Any]:
    return asyncio.run(_py_load(port, seconds, connections))


def measure(server: str, mode: str, handler: str, client: str, seconds: float, connections: int,
            workdir: Path) -> dict[str, Any]:
    proc, port = start(server, mode, handler, workdir)
    try:
        for _ in range(50):                     # warm-up
            http_get(port)
        if client == "wrk":
            res = run_wrk(port, max(1, round(seconds)), connections)
        else:
            res = run_python(port, seconds, connections)
        res["alive"] = proc.poll() is None
        return res
    finally:
        stop(proc)


# ---- per-call overhead (``--percall-child``) ----------------------------------------------------
def percall_child(n: int, what: str) -> int:
    """In a fresh process: what timeout= and key= add to a @checkpointed call (``what`` "calls"), or
    what restart mode adds to a WSGI request (``what`` "requests"; its worker checkpoint and rescue
    slots would change the first measurement, so each has its own process)."""
    import resource

    import forkpoint as fp
    import forkpoint.wsgi

    store: dict[str, int] = {}

    def work(x: str) -> int:
        store[x] = store.get(x, 0) + 1
        return 1

    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        return None

    if what == "asgi":
        return _percall_asgi(n)
    if what == "calls":
        variants: dict[str, Any] = {
            "@checkpointed": fp.checkpointed(work),
            "@checkpointed(timeout=)": fp.checkpointed(timeout=30.0)(work),
            "@checkpointed(key=)": fp.checkpointed(key=lambda x: x)(work),
            "@checkpointed(timeout=, key=)": fp.checkpointed(timeout=30.0, key=lambda x: x)(work)}
        repeat = 1
    else:
        a, b = socket.socketpair()
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/k", "QUERY_STRING": "",
                   "gunicorn.socket": a, "wsgi.file_wrapper": type(None)}
        apps = {"WSGI request, bare application": wsgi,
                "WSGI request, restart mode": forkpoint.wsgi.protect(wsgi, mode="restart"),
                "WSGI request, restart mode, timeout=": forkpoint.wsgi.protect(wsgi, mode="restart",
                                                                                timeout=30.0)}
        variants = {name: (lambda x, f=f: f(environ, start_response)) for name, f in apps.items()}
        repeat = 10
    fp.start()
    for f in variants.values():
        for _ in range(50):
            f("/w")
    times: dict[str, list[float]] = {k: [] for k in variants}
    faults: dict[str, list[int]] = {k: [] for k in variants}
    pc, gr = time.perf_counter, resource.getrusage
    for _ in range(n):
        for name, f in variants.items():
            f0 = gr(0).ru_minflt
            t = pc()
            for _ in range(repeat):
                f("/k")
            times[name].append((pc() - t) / repeat)
            faults[name].append(gr(0).ru_minflt - f0)
    out = {k: {"us": statistics.median(v) * 1e6, "minflt": statistics.mean(faults[k]) / repeat}
           for k, v in times.items()}
    print(json.dumps(out), flush=True)
    return 0


def _percall_asgi(n: int) -> int:
    """What ``forkpoint.asgi.protect`` adds to one HTTP request, driven in-process on one event loop
    (the worker's checkpoint taken as uvicorn's lifespan would; the connection's rescue slot held
    once, as for a keep-alive connection); medians of ``n`` batches of 10 requests."""
    import forkpoint.asgi

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    class Transport:                    # what the wrapper asks of uvicorn's transport
        def __init__(self, sock: socket.socket) -> None:
            self.sock, self.protocol = sock, self

        def get_extra_info(self, name: str) -> Any:
            return self.sock

        def get_protocol(self) -> Any:
            return self.protocol

        def connection_lost(self, exc: BaseException | None) -> None:
            return None

    class Cycle:                        # uvicorn's send is a bound method of the request cycle
        def __init__(self, transport: Transport) -> None:
            self.transport = transport

        async def send(self, message: Any) -> None:
            return None

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def run() -> dict[str, Any]:
        a, _b = socket.socketpair()
        send = Cycle(Transport(a)).send
        scope = {"type": "http", "method": "GET", "path": "/k", "query_string": b""}
        protect = forkpoint.asgi.protect
        apps: dict[str, Any] = {"ASGI request, bare application": app,
                                "ASGI request, protected": protect(app),
                                "ASGI request, protected, timeout=": protect(app, timeout=30.0)}
        for f in apps.values():
            if f is not app:
                f._checked_loop()
                f._checkpoint()
            for _ in range(50):
                await f(scope, receive, send)
        times: dict[str, list[float]] = {k: [] for k in apps}
        pc = time.perf_counter
        for _ in range(n):
            for name, f in apps.items():
                t = pc()
                for _ in range(10):
                    await f(scope, receive, send)
                times[name].append((pc() - t) / 10)
        return {k: {"us": statistics.median(v) * 1e6, "minflt": 0.0} for k, v in times.items()}

    print(json.dumps(asyncio.run(run())), flush=True)
    return 0


def percall(n: int) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    result: dict[str, Any] = {}
    for what in ("calls", "requests", "asgi"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--percall-child", str(n), what],
                             capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"per-call measurement failed: {out.stderr[-3000:]}")
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


def percall_table(p: dict[str, Any]) -> str:
    base = p["@checkpointed"]["us"]
    bare = p["WSGI request, bare application"]["us"]
    abare = p.get("ASGI request, bare application", {}).get("us", 0.0)
    lines = ["| call | us (median) | added us | minor faults per call |", "|---|---|---|---|"]
    for name, v in p.items():
        ref = base if name.startswith("@") else abare if name.startswith("ASGI") else bare
        added = v["us"] - ref
        lines.append(f"| {name} | {v['us']:.1f} | {added:+.1f} | {v['minflt']:.1f} |")
    return "\n".join(lines)


# ---- report -------------------------------------------------------------------------------------
def summarize(runs: dict[tuple[str, str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for server in ("gunicorn", "uvicorn"):
        for handler in HANDLERS:
            base_runs = runs.get((server, "plain", handler), [])
            base = statistics.median([r["rps"] for r in base_runs]) if base_runs else None
            for srv, mode in CONFIGS:
                rs = runs.get((server, mode, handler))
                if srv != server or not rs:
                    continue
                rps = [r["rps"] for r in rs]
                med = statistics.median(rps)
                per_round = [r / b["rps"] for r, b in zip(rps, base_runs, strict=False)] if base_runs else []
                rows.append({"server": server, "handler": handler, "mode": mode, "rps_median": med,
                             "rps_min": min(rps), "rps_max": max(rps), "runs": rps,
                             "ratio": med / base if base else None, "ratio_per_round": per_round,
                             "non_2xx": sum(r.get("non_2xx") or 0 for r in rs),
                             "errors": [r.get("errors") for r in rs if r.get("errors")]})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| server | handler | protection | req/s median (min-max) | ratio to plain | ratio per round |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        rounds = ", ".join(f"{x:.2f}" for x in r["ratio_per_round"])
        lines.append(f"| {r['server']} | {r['handler']} | {r['mode']} | {r['rps_median']:.0f} "
                     f"({r['rps_min']:.0f}-{r['rps_max']:.0f}) | {ratio} | {rounds} |")
    return "\n".join(lines)


TARGETS = [("gunicorn", "restart", "trivial", 0.90), ("gunicorn", "restart-defaults", "trivial", 0.90),
           ("uvicorn", "restart", "trivial", 0.90), ("uvicorn", "restart-defaults", "trivial", 0.90),
           ("gunicorn", "transaction", "trivial", 0.15), ("gunicorn", "transaction", "1ms", 0.50)]


def verdict(rows: list[dict[str, Any]], per: dict[str, Any] | None) -> list[str]:
    by = {(r["server"], r["mode"], r["handler"]): r for r in rows}
    out = []
    for server, mode, handler, target in TARGETS:
        r = by.get((server, mode, handler))
        if r and r["ratio"] is not None:
            ok = "met" if r["ratio"] >= target else "NOT met"
            label = "restart mode with default arguments" if mode == "restart-defaults" else \
                "restart mode, timeout=" if mode == "restart" else f"{mode} mode"
            out.append(f"{server}, {label}, {handler} handler: {r['ratio']:.0%} of plain "
                       f"(target >= {target:.0%}): {ok}.")
    if per:
        added = per["@checkpointed(timeout=, key=)"]["us"] - per["@checkpointed"]["us"]
        ok = "met" if added <= 30 else "NOT met"
        out.append(f"timeout= and key= together add {added:.0f} us to a @checkpointed call "
                   f"(target <= 30 us): {ok}.")
        req = per["WSGI request, restart mode, timeout="]["us"] - per["WSGI request, bare application"]["us"]
        out.append(f"A restart-mode WSGI request (key, quarantine check, rescue slot, timeout) costs "
                   f"{req:.1f} us more than the bare application.")
        if "ASGI request, protected, timeout=" in per:
            areq = (per["ASGI request, protected, timeout="]["us"]
                    - per["ASGI request, bare application"]["us"])
            out.append(f"A protected ASGI request (key, quarantine check, the step's mark and deadline, "
                       f"the request's timeout) costs {areq:.1f} us more than the bare application.")
    bad = [r for r in rows if r["non_2xx"]]
    for r in bad:
        out.append(f"{r['server']} {r['mode']} {r['handler']}: {r['non_2xx']} responses were not 2xx.")
    return out


def descendants_left() -> list[str]:
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + 3
    while True:
        left = [p for p in me.children(recursive=True)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out = []
    for p in left:
        try:
            out.append(f"{p.pid} {p.name()}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round (a smoke test)")
    ap.add_argument("--json", metavar="FILE", help="write the raw figures as JSON")
    ap.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--seconds", type=float, help="load time per measurement (default 5; quick: 1)")
    ap.add_argument("--rounds", type=int, help="rounds over all configurations (default 3; quick: 1)")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--handlers", default=",".join(HANDLERS))
    ap.add_argument("--percall", type=int, help="interleaved calls for the per-call table "
                                                 "(default 2000; quick: 100; 0: skip)")
    ap.add_argument("--note", default="", help="a line about the machine's load, for the record")
    ap.add_argument("--percall-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.percall_child:
        return percall_child(int(args.percall_child[0]), args.percall_child[1])

    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    elif client == "wrk" and not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk); using the Python client", file=sys.stderr)
        client = "python"
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    rounds = args.rounds or (1 if args.quick else 3)
    handlers = [h for h in args.handlers.split(",") if h]
    for h in handlers:
        if h not in HANDLERS:
            ap.error(f"unknown handler {h!r}")
    n_percall = args.percall if args.percall is not None else (100 if args.quick else 2000)

    from forkpoint import _prctl

    _prctl.set_child_subreaper(True)     # so that any process a server leaks is seen (and ended) here
    started = time.monotonic()
    load_before = os.getloadavg()
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fp-servers-") as tmp:
        workdir = Path(tmp)
        (workdir / "app.py").write_text(textwrap.dedent(APP))
        for rnd in range(rounds):
            for handler in handlers:
                for server, mode in CONFIGS:
                    res = measure(server, mode, handler, client, seconds, args.connections, workdir)
                    runs.setdefault((server, mode, handler), []).append(res)
                    print(f"  round {rnd + 1}/{rounds} {server:>8} {handler:>7} {mode:<16} "
                          f"{res['rps']:9.0f} req/s", file=sys.stderr)
    per = percall(n_percall) if n_percall else None
    leaked = descendants_left()
    rows = summarize(runs)
    load_after = os.getloadavg()
    print(f"Server throughput: client {client}, {args.connections} connections, {seconds:g} s x {rounds} "
          f"round(s), one worker; {os.cpu_count()} CPUs; load average before/after "
          f"{load_before[0]:.2f}/{load_after[0]:.2f}; {time.monotonic() - started:.0f} s in all."
          + (f" {args.note}" if args.note else "") + "\n")
    print(table(rows))
    if per:
        print()
        print(percall_table(per))
    print()
    for line in verdict(rows, per):
        print(f"- {line}")
    if leaked:
        print(f"- WARNING: processes left behind and killed: {leaked}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "servers", "client": client, "seconds": seconds, "rounds": rounds,
                       "connections": args.connections, "note": args.note,
                       "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                                   "python": platform.python_version()},
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "load_before": load_before, "load_after": load_after,
                       "rows": rows, "percall": per, "verdict": verdict(rows, per),
                       "leaked": leaked}, f, indent=1)
    return 1 if leaked else 0


if __name__ == "__main__":
    raise SystemExit(main())
