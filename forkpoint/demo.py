"""``forkpoint demo``: a key-value server that survives a segfault, a hang and a corrupted store.

The demo starts the server as its own program (so its PID, which forkpoint keeps, is a PID this
process can watch), drives it with a client over TCP on 127.0.0.1, prints a live log, and ends
with a table of what happened. It exits 0 only if every expectation held.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

import forkpoint as fp

TIMEOUT = 0.5          # the server's watchdog, seconds


# ---- the server ---------------------------------------------------------------------------------
def _key(conn: socket.socket, req: dict[str, Any]) -> str:
    """An input's identity: the same poison sent again has the same key."""
    return hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()[:16]


def serve() -> int:
    logging.basicConfig(level=logging.WARNING, format="    server: %(message)s", stream=sys.stderr)
    store: dict[str, str] = {}
    meta = {"size": 0}
    fault_at = fp.persist_array("demo.fault_at", 1, "d")   # CLOCK_MONOTONIC just before a failure
    writes = fp.persist_int("demo.writes")

    def check_invariant() -> None:
        if meta["size"] != len(store):
            fault_at[0] = time.monotonic()  # type: ignore[call-overload]
            fp.tlongjmp(0, reason=f"invariant: size {meta['size']} != {len(store)} entries")

    def recovered(args: tuple[Any, ...], kwargs: dict[str, Any], info: fp.Recovered) -> dict[str, Any]:
        return {"ok": False, "recovered": True, "signal": info.signal, "reason": info.reason,
                "recovery_ms": (time.monotonic() - fault_at[0]) * 1000, "live": os.getpid()}

    @fp.checkpointed(timeout=TIMEOUT, key=_key, quarantine_after=1, on_recover=recovered)
    def handle(conn: socket.socket, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "put":
            if req["key"] not in store:
                meta["size"] += 1
            store[req["key"]] = req["value"]
            writes.add()
        elif op == "get":
            return {"ok": True, "value": store.get(req["key"])}
        elif op == "segv":                       # a bug in C code: a NULL dereference
            fault_at[0] = time.monotonic()  # type: ignore[call-overload]
            ctypes.string_at(0)
        elif op == "loop":                       # an input that never finishes
            fault_at[0] = time.monotonic() + TIMEOUT  # type: ignore[call-overload]
            while True:
                pass
        elif op == "corrupt":                    # a bug that drops entries behind the index's back
            for k in list(store)[::2]:
                del store[k]
        elif op == "stats":
            return {"ok": True, "pid": fp.shepherd_pid(), "live": os.getpid(), "size": len(store),
                    "writes": writes.value, "restores": len(fp.history())}
        check_invariant()
        return {"ok": True}

    fp.start()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        print(srv.getsockname()[1], flush=True)
        while True:
            conn, _ = srv.accept()
            with conn:
                req = json.loads(conn.makefile().readline())
                if req["op"] == "quit":
                    conn.sendall(b'{"ok": true}\n')
                    return 0
                try:
                    resp = handle(conn, req)
                except fp.Quarantined as e:
                    resp = {"ok": False, "quarantined": e.key}
                conn.sendall(json.dumps(resp).encode() + b"\n")


# ---- the client ---------------------------------------------------------------------------------
class _Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def __call__(self, **req: Any) -> tuple[dict[str, Any], float]:
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as c:
            c.sendall(json.dumps(req).encode() + b"\n")
            resp = json.loads(c.makefile().readline())
        return resp, (time.perf_counter() - t) * 1000


def run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
    boot = "from forkpoint.demo import serve; raise SystemExit(serve())"
    server = subprocess.Popen([sys.executable, "-c", boot], stdout=subprocess.PIPE, text=True, env=env)
    rows: list[tuple[str, str, str, str, str]] = []
    failures: list[str] = []
    started = time.monotonic()

    def expect(cond: bool, what: str) -> None:
        if not cond:
            failures.append(what)
            print(f"  !! expected: {what}")

    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        call = _Client(port)
        print(f"forkpoint demo: key-value server pid {server.pid} on 127.0.0.1:{port}")
        stats, _ = call(op="stats")
        expect(stats["pid"] == server.pid, "the server's public PID is the one we started")

        def event(label: str, req: dict[str, Any], check_key: str | None = None) -> dict[str, Any]:
            resp, ms = call(**req)
            if resp.get("recovered"):
                outcome = f"rolled back ({resp['reason'].split(';')[0]})"
                rec = f"{resp['recovery_ms']:.1f}"
            elif "quarantined" in resp:
                outcome, rec = "refused: quarantined", "-"
            else:
                outcome, rec = "ok", "-"
            intact = "-"
            if check_key is not None:
                got, _ = call(op="get", key=check_key)
                intact = "yes" if got.get("value") is not None else "NO"
                expect(intact == "yes", f"data written before '{label}' is still there")
            pid = call(op="stats")[0]["pid"]
            expect(pid == server.pid, f"server PID unchanged after '{label}'")
            print(f"  {label:<34} {outcome:<46} {ms:7.1f} ms round trip")
            rows.append((label, outcome, rec, intact, str(pid)))
            return resp

        for k, v in (("alpha", "1"), ("beta", "2"), ("gamma", "3")):
            event(f"put {k}={v}", {"op": "put", "key": k, "value": v})
        r = event("segfault in C code", {"op": "segv"}, "alpha")
        expect(bool(r.get("recovered")) and r["signal"] == 11, "the segfault is rolled back (SIGSEGV)")
        r = event("endless loop (watchdog 0.5 s)", {"op": "loop"}, "beta")
        expect(bool(r.get("recovered")) and r["reason"].startswith("timeout"),
               "the hang is cut by the watchdog")
        r = event("corrupt store (invariant check)", {"op": "corrupt"}, "gamma")
        expect(bool(r.get("recovered")) and r["reason"].startswith("invariant"),
               "the corruption is rolled back")
        r = event("same segfault input again", {"op": "segv"}, "alpha")
        expect("quarantined" in r, "the poison is refused as quarantined")
        event("put delta=4", {"op": "put", "key": "delta", "value": "4"}, "delta")
        final, _ = call(op="stats")
        expect(final["size"] == 4, "all four committed writes are in the store")
        call(op="quit")
        code = server.wait(10)
        expect(code == 0, "the server exits with status 0")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    elapsed = time.monotonic() - started
    print()
    print(f"{'event':<34} {'outcome':<46} {'recovery ms':>11} {'data kept':>9} {'server pid':>10}")
    for label, outcome, rec, intact, pid in rows:
        print(f"{label:<34} {outcome:<46} {rec:>11} {intact:>9} {pid:>10}")
    print(f"\nrecovery ms: from the fault (or the watchdog's deadline) to the restored handler answering. "
          f"{len(rows)} events in {elapsed:.1f} s.")
    if failures:
        print(f"FAILED: {len(failures)} expectation(s) did not hold: {'; '.join(failures)}")
        return 1
    print("OK: every failure cost one request, the server kept its PID, its data and its warm state.")
    return 0


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    pass
