"""forkpoint.asgi.protect under real uvicorn and Starlette: what a client sees.

Each scenario runs ``uvicorn app:app`` as a user would (no ``--loop`` flag, uvicorn's own defaults),
drives it with real HTTP clients, concurrent ones where it matters, and where it makes sense
compares with the same app without forkpoint (FORKPOINT_OFF=1). Crashes are real segfaults.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    ASGI_LIFESPAN,
    OWN_GROUP,
    check_default_key,
    clean_env,
    free_port,
    holders_of,
    http,
    read_to_eof,
    run_py,
    server_log,
    start_server,
    stop_server,
    wait_for,
)

from forkpoint import operator

pytestmark = pytest.mark.timeout(120)

STARLETTE_APP = """
    import asyncio, ctypes, os
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    import forkpoint._serving, forkpoint.asgi

    state = {"served": 0}

    async def ready(request):
        return PlainTextResponse("ready")

    async def count(request):
        state["served"] += 1
        await asyncio.sleep(0.001)
        return JSONResponse({"pid": os.getpid(), "served": state["served"]})

    async def crash(request):
        state["served"] += 1000
        await asyncio.sleep(float(request.query_params.get("after", "0")))
        ctypes.string_at(0)

    async def hang(request):
        state["served"] += 1000
        while True:
            pass

    async def slow(request):
        await asyncio.sleep(float(request.query_params.get("s", "1")))
        return PlainTextResponse("slow done")

    async def guarded_stuck(request):
        # A watchdog() block across an await, then stuck where its handler cannot run (as in C).
        import signal
        state["served"] += 1000
        with forkpoint.watchdog(0.3, hard_after=0.3):
            await asyncio.sleep(0.05)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            while True:
                pass

    async def term_crash(request):
        # Busy in the loop's thread (a CPU-bound request) until uvicorn's SIGTERM handler has run
        # here, then a segfault: the handler's work is in the process that is rolled back.
        import gc, time
        servers = [o for o in gc.get_objects() if type(o).__name__ == "Server" and hasattr(o, "should_exit")]
        end = time.monotonic() + 10
        while not any(s.should_exit for s in servers) and time.monotonic() < end:
            time.sleep(0.005)
        ctypes.string_at(0)

    def sync_count(request):
        # A plain def endpoint: Starlette runs it in one of AnyIO's worker threads.
        state["served"] += 1
        return JSONResponse({"pid": os.getpid(), "served": state["served"]})

    async def to_thread(request):
        state["served"] += 1
        await asyncio.to_thread(lambda: None)       # the loop's default executor keeps a thread
        return JSONResponse({"pid": os.getpid(), "served": state["served"]})

    def sync_crash(request):                        # (in an AnyIO worker thread)
        import time
        time.sleep(float(request.query_params.get("after", "0")))
        ctypes.string_at(0)

    async def busy(request):
        # The loop's thread is busy in this request's step (CPU-bound code) for s seconds.
        import time
        time.sleep(float(request.query_params.get("s", "1")))
        return PlainTextResponse("busy done")

    jobs = set()

    async def background(request):
        # A job in the default executor that outlives its request.
        import time
        job = asyncio.ensure_future(asyncio.to_thread(time.sleep, float(request.query_params.get("s", "1"))))
        jobs.add(job)
        job.add_done_callback(jobs.discard)
        return PlainTextResponse("started")

    async def block(request):
        # The loop's thread is busy for s seconds, from d seconds after this request (which is
        # over by then): a callback of the loop, no request's step (a GC pause, a busy loop).
        import time
        asyncio.get_running_loop().call_later(float(request.query_params.get("d", "0")), time.sleep,
                                              float(request.query_params.get("s", "1")))
        return PlainTextResponse("blocking")

    async def ws(websocket):
        await websocket.accept()
        try:
            await websocket.receive_text()
        except Exception:
            pass

    star = Starlette(routes=[Route("/__ready__", ready), Route("/count", count), Route("/crash", crash),
                             Route("/hang", hang), Route("/slow", slow), Route("/term-crash", term_crash),
                             Route("/sync-count", sync_count), Route("/to-thread", to_thread),
                             Route("/sync-crash", sync_crash), Route("/busy", busy),
                             Route("/background", background), Route("/guarded-stuck", guarded_stuck),
                             Route("/block", block),
                             WebSocketRoute("/ws", ws)])
    class SyncRaising:
        # An ASGI application whose __call__ is a plain function (an adapter, a middleware) that
        # raises before any coroutine exists.
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, scope, receive, send):
            if scope["type"] == "http" and scope["path"] == "/sync-raise":
                raise RuntimeError("refused before any coroutine")
            return self.inner(scope, receive, send)

    if os.environ.get("SYNC_RAISING"):
        star = SyncRaising(star)
    if os.environ.get("FORKPOINT_INFO"):                 # forkpoint's INFO lines, to stderr
        import logging
        logging.getLogger("forkpoint").addHandler(logging.StreamHandler())
        logging.getLogger("forkpoint").setLevel(logging.INFO)
    REFRESH = float(os.environ["REFRESH"]) if os.environ.get("REFRESH") else None
    if os.environ.get("FORKPOINT_PARK"):
        forkpoint._serving.USE_HOLDER = False   # park client sockets with SCM_RIGHTS, never a holder
    if os.environ.get("FORKPOINT_OFF"):
        app = star
    else:
        app = forkpoint.asgi.protect(star, timeout=float(os.environ.get("TIMEOUT", "1")), refresh=REFRESH)
"""


def _uvicorn(tmp_path: Path, *args: str, **env: str):
    (tmp_path / "app.py").write_text(textwrap.dedent(STARLETTE_APP))
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--port", str(port), *args, "app:app"]
    return start_server(argv, tmp_path, port, **env), port


def _get(port: int, path: str = "/count", timeout: float = 10.0) -> tuple[int, dict | str]:
    status, body = http(port, path, timeout=timeout)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def _tree(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _all_gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


def _in_background(port: int, path: str) -> tuple[threading.Thread, list]:
    got: list = []
    t = threading.Thread(target=lambda: got.append(_get(port, path)))
    t.start()
    return t, got


def _exchange(s: socket.socket, path: str, headers: bytes = b"") -> tuple[int, bytes]:
    """One request on a socket kept open: (status, body), the body read by its content-length
    (none: empty); (0, what came) if the server closed the connection first."""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + headers + b"\r\n")
    got = b""
    while True:
        head, sep, body = got.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return int(head[9:12]), body[:length]
        chunk = s.recv(65536)
        if not chunk:
            return 0, got
        got += chunk


def test_a_crash_restores_the_worker_warm_under_the_same_pid(tmp_path):
    proc, port = _uvicorn(tmp_path)
    try:
        first = [_get(port) for _ in range(3)]
        assert [b["served"] for _, b in first] == [1, 2, 3]
        assert {b["pid"] for _, b in first} == {proc.pid}
        status, body = _get(port, "/crash")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        status, after = _get(port)
        # restart mode: back at the checkpoint taken at startup, the crash's change gone too
        assert status == 200 and after == {"pid": proc.pid, "served": 1}
        assert _get(port, "/crash")[0] == 500
        status, body = _get(port, "/crash")
        assert status == 503 and "quarantined" in body
        assert _get(port, "/hang")[0] == 500                  # cut at the 1 s timeout
        assert _get(port)[1] == {"pid": proc.pid, "served": 1}
        assert "no running event loop" not in server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)
    assert "Finished server process" in server_log(tmp_path)


def test_the_checkpoint_comes_after_the_startup_and_before_clients_waiting_in_the_backlog(tmp_path):
    """Invariant: a restore does not run the server's startup again (uvicorn's "Uvicorn running
    on" line was logged again after each crash: the checkpoint came as the socket began to
    listen), and the checkpoint holds no client, not even one that connected before the server
    listened (uvicorn ``--fd``, as under socket activation): each such client gets its whole
    answer and the connection's end, and a restore goes back to a worker that served none."""
    (tmp_path / "app.py").write_text(textwrap.dedent(STARLETTE_APP))
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    for c in clients:
        c.settimeout(10)
        c.sendall(b"GET /count HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--fd", str(listener.fileno()), "app:app"],
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
                                pass_fds=(listener.fileno(),), **OWN_GROUP)
    listener.close()
    try:
        served = []
        for c in clients:
            with c:
                got = b""
                while chunk := c.recv(65536):       # to the server's close (socket.timeout: never)
                    got += chunk
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), (got, server_log(tmp_path))
            served.append(json.loads(body)["served"])
        assert len(served) == 8 and max(served) == 8, served   # (served at once: not 1..8)
        assert _get(port, "/crash")[0] == 500
        assert _get(port, "/hang")[0] == 500
        status, after = _get(port)
        assert status == 200 and after == {"pid": proc.pid, "served": 1}, after
        assert server_log(tmp_path).count("Uvicorn running on") == 1, server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_crashes_of_different_requests_between_served_ones_never_end_the_worker(tmp_path):
    """Invariant: a worker that serves between its crashes is not in a crash loop. Seven different
    poisoned requests within a minute (each would be quarantined at its second failure), each
    after a request served: each answered 500, the worker restored every time under its PID. The
    recovery budget (5 within 60 s) used to count them together and let the sixth end the worker:
    a lone uvicorn died by SIGSEGV."""
    proc, port = _uvicorn(tmp_path)
    try:
        for i in range(7):
            status, body = _get(port)
            assert status == 200 and body["pid"] == proc.pid, (i, status, body)
            status, body = _get(port, f"/crash?n={i}")
            assert status == 500 and "rolled back" in body, (i, status, body, server_log(tmp_path))
        assert _get(port) == (200, {"pid": proc.pid, "served": 1})
        assert "giving up" not in server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_the_default_key_is_method_path_and_query(tmp_path):
    """Invariant: a quarantine refuses exactly the request that failed, named by its method, path
    and query: the same path with another query, or another method, still runs."""
    proc, port = _uvicorn(tmp_path)
    try:
        check_default_key(port)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_without_forkpoint_the_crash_takes_the_server(tmp_path):
    proc, port = _uvicorn(tmp_path, FORKPOINT_OFF="1")
    try:
        assert _get(port)[0] == 200
        assert _get(port, "/crash")[0] == 0
        assert proc.wait(10) == -signal.SIGSEGV
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_a_sigterm_handled_by_a_request_that_then_crashes_still_stops_the_server(tmp_path):
    """uvicorn's SIGTERM handler sets ``should_exit`` in whatever process runs when it comes; in
    a request that then crashed, that was the process the rollback threw away, and the restored
    worker served on, deaf to the SIGTERM (found by an audit). The shepherd sends the restored
    process the signal again: the server shuts down, lifespan and all, leaving nothing behind."""
    proc, port = _uvicorn(tmp_path)
    try:
        tree = _tree(proc.pid)
        failing, got = _in_background(port, "/term-crash")
        time.sleep(0.3)                                       # in flight, busy
        os.kill(proc.pid, signal.SIGTERM)
        failing.join(20)
        assert got and got[0][0] == 500, (got, server_log(tmp_path))
        proc.wait(20)
    finally:
        if proc.poll() is None:
            stop_server(proc, signal.SIGKILL)
    assert "Application shutdown complete" in server_log(tmp_path), server_log(tmp_path)
    assert wait_for(lambda: _all_gone(tree), timeout=5)


def test_requests_in_flight_fail_with_the_crash_but_are_not_blamed(tmp_path):
    """Every request in flight on the worker fails with it (500 from the restored process); only
    the request whose code crashed is quarantined. A request that merely waits past the timeout
    is cancelled with a 500, without a restore (the worker's state is kept)."""
    proc, port = _uvicorn(tmp_path, TIMEOUT="1.5")
    try:
        for _ in range(2):
            slow, got = _in_background(port, "/slow?s=0.8")
            time.sleep(0.2)                                   # the slow request is waiting
            assert _get(port, "/crash?after=0.1")[0] == 500
            slow.join(10)
            assert got and got[0][0] == 500, got             # failed with the worker
        assert _get(port, "/crash?after=0.1")[0] == 503      # the crashing key, twice: quarantined
        status, body = _get(port, "/slow?s=0.8")
        assert (status, body) == (200, "slow done")           # the innocent one: never quarantined
        assert _get(port)[1]["served"] == 1
        assert _get(port, "/slow?s=5")[0] == 500              # waits past 1.5 s: cancelled
        assert _get(port)[1]["served"] == 2                   # no restore: the state is kept
        assert "waited longer than 1.5s: cancelled" in server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_each_request_is_cut_at_its_own_timeout(tmp_path):
    """Requests that start at different moments each expire at their own deadline (one timer for
    all, re-armed for the next): of three long requests started 0.4 s apart under a 1.5 s timeout,
    each is cancelled with a 500 (none runs its 6 s), while a short one started among them, and one
    started after the first was cut, answer."""
    proc, port = _uvicorn(tmp_path, TIMEOUT="1.5")
    try:
        long = []
        for _ in range(3):
            long.append(_in_background(port, "/slow?s=6"))
            time.sleep(0.4)
        short = _in_background(port, "/slow?s=0.2")
        wait_for(lambda: bool(long[0][1]), timeout=10)
        assert long[0][1][0][0] == 500
        assert _get(port, "/slow?s=0.1") == (200, "slow done")
        for t, _ in [*long, short]:
            t.join(15)
        assert [got[0][0] for _, got in long] == [500, 500, 500]
        assert short[1] == [(200, "slow done")]
        assert server_log(tmp_path).count("waited longer than 1.5s: cancelled") == 3
        assert _get(port)[1]["served"] == 1                   # no restore: the state is kept
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_a_watchdog_block_across_an_await_keeps_its_hard_deadline(tmp_path):
    """Invariant: a watchdog() block's hard deadline holds for the whole block, across the awaits
    at which the wrapper ends one step of the request and starts the next. The end of each step
    cleared the one deadline record the block had written, so code stuck after the block's first
    await (SIGALRM blocked, as in C) ran on to the request's own 30 s timeout."""
    proc, port = _uvicorn(tmp_path, TIMEOUT="30")
    try:
        assert _get(port) == (200, {"pid": proc.pid, "served": 1})
        status, body = _get(port, "/guarded-stuck", timeout=10)
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert _get(port) == (200, {"pid": proc.pid, "served": 1})     # restored, warm, same PID
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


@pytest.mark.parametrize("way", ["holder", "park"])
def test_keep_alive_connections_are_answered_or_closed_never_left_hanging(tmp_path, way):
    """A keep-alive connection holds its rescue slot between requests. When the worker fails, the
    one with a request in flight gets a 500 and the idle one is closed (FIN): neither client waits.
    So whether a holder shares the worker's descriptors or the sockets are parked."""
    import http.client

    env = {"FORKPOINT_PARK": "1"} if way == "park" else {}
    proc, port = _uvicorn(tmp_path, TIMEOUT="5", **env)
    busy = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for conn in (busy, idle):
            conn.request("GET", "/count")
            assert conn.getresponse().read()
        got: list = []

        def slow() -> None:
            busy.request("GET", "/slow?s=1")
            r = busy.getresponse()
            got.append((r.status, r.read()))

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)
        assert _get(port, "/crash")[0] == 500
        t.join(15)
        assert got and got[0][0] == 500, got
        idle.request("GET", "/count")
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            idle.getresponse()                                 # closed at once, not a 10 s timeout
        assert _get(port)[1]["served"] == 1
    finally:
        busy.close()
        idle.close()
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_a_holder_killed_while_the_worker_lives_is_replaced_at_the_next_connection(tmp_path):
    """Invariant: a holder killed while its worker lives is replaced when the worker next takes a
    connection, so the worker's next failure is answered 500 again (not a closed connection)."""
    proc, port = _uvicorn(tmp_path)

    def holders() -> list[int]:
        return holders_of(proc.pid)

    try:
        assert _get(port)[0] == 200
        wait_for(lambda: len(holders()) == 1, timeout=10)
        [killed] = holders()
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: not holders(), timeout=10)        # reaped (and counted) by the shepherd

        def replaced() -> bool:                             # a new connection: the new holder
            assert _get(port)[0] == 200
            return len(holders()) == 1

        wait_for(replaced, timeout=10)
        status, body = _get(port, "/crash")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert "a new one replaces it" in server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_connections_upgraded_to_websockets_give_their_rescue_slots_back(tmp_path):
    """A keep-alive connection holds a rescue slot from its first HTTP request. When it is upgraded
    to a websocket, uvicorn gives it another protocol, whose loss would never free the slot: more
    such connections than there are slots (64) must still leave one for a request that crashes,
    whose client gets its 500."""
    proc, port = _uvicorn(tmp_path)
    try:
        for _ in range(70):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                assert _exchange(c, "/count")[0] == 200
                upgrade = (b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
                assert _exchange(c, "/ws", upgrade)[0] == 101, server_log(tmp_path)
        status, body = _get(port, "/crash")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert "rescue slots are taken" not in server_log(tmp_path)
        # (none was left to a websocket connection, idle, for the restore to close: an idle slot is
        # given to a new connection when none is free, so the count is what tells)
        wait_for(lambda: "client(s) answered 500" in server_log(tmp_path), timeout=10)
        assert "client(s) answered 500, 0 closed" in server_log(tmp_path), server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_idle_keep_alive_connections_leave_a_slot_for_a_request_that_crashes(tmp_path):
    """A keep-alive connection holds its rescue slot between requests, and uvicorn keeps it open 5 s
    after its last response (hypercorn keeps a connection its client closed as long): more idle
    connections than slots (64), as a busy worker has, took them all, and the client of a request
    that crashed saw a closed connection instead of its 500. An idle connection's slot is given to
    a new connection when none is free."""
    import http.client

    from forkpoint.asgi import SLOTS

    proc, port = _uvicorn(tmp_path, TIMEOUT="5")
    idle = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(SLOTS + 6)]
    try:
        for conn in idle:
            conn.request("GET", "/count")
            assert conn.getresponse().read()
        status, body = _get(port, "/crash")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert "rescue slots are taken" not in server_log(tmp_path)
        idle[0].request("GET", "/count")                # its slot was given away: closed by the
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):  # restore all the same
            idle[0].getresponse()
    finally:
        for conn in idle:
            conn.close()
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


@pytest.mark.parametrize("park", [False, True], ids=["holder", "parked"])
def test_a_request_whose_client_left_leaves_the_slot_another_connection_took_alone(tmp_path, park):
    """uvicorn runs a request to its end after its client closed the connection, whose loss frees
    its rescue slot; the next connection takes that slot. The first request's response start then
    marked the slot as started: the second connection's request crashed, and its client saw a
    closed connection ("0 client(s) answered 500, 1 closed") instead of its 500."""
    proc, port = _uvicorn(tmp_path, TIMEOUT="5", **({"FORKPOINT_PARK": "1"} if park else {}))
    try:
        assert _get(port)[0] == 200
        gone = socket.create_connection(("127.0.0.1", port))
        gone.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        gone.close()                                      # its slot is free; /slow runs on
        time.sleep(0.2)
        crash, got = _in_background(port, "/crash?after=1.5")     # takes that slot
        crash.join(15)                                    # (/slow's response starts meanwhile)
        assert got and got[0][0] == 500 and "rolled back" in got[0][1], (got, server_log(tmp_path))
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_refresh_keeps_what_the_worker_learned(tmp_path):
    proc, port = _uvicorn(tmp_path, REFRESH="0.3")
    try:
        assert [_get(port)[1]["served"] for _ in range(2)] == [1, 2]
        time.sleep(0.4)
        assert _get(port)[1]["served"] == 3       # a new checkpoint is taken after this, unconnected
        wait_for(lambda: [c["id"] for c in operator.request(proc.pid, "ls")["checkpoints"]] == [2])
        assert _get(port, "/crash")[0] == 500
        assert _get(port)[1]["served"] == 4                   # back to 3, then this request
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


@pytest.mark.parametrize("way", ["holder", "park"])
def test_a_refresh_is_taken_while_clients_keep_their_connections_alive(tmp_path, way):
    """A checkpoint must not hold a client's socket: asyncio closes one without ``shutdown``, so
    the server's close would send no FIN while a checkpoint's process held a copy. So a refresh
    waited for a moment with no connection open, and clients that keep theirs alive (a proxy's
    upstream keep-alive, an HTTP client's pool) never gave it one: no refresh at all. Now the
    checkpoint's processes let go of connections idle between requests: the refresh is taken,
    the kept connections are served on, the server's close of one still sends FIN, and after a
    crash another is closed, the worker back at the refreshed state."""
    def get(s: socket.socket, close: bool = False) -> dict:
        status, body = _exchange(s, "/count", b"Connection: close\r\n" if close else b"")
        assert status == 200, (status, body)
        return json.loads(body)

    env = {"FORKPOINT_PARK": "1"} if way == "park" else {}
    proc, port = _uvicorn(tmp_path, "--timeout-keep-alive", "60", REFRESH="0.3", **env)
    kept = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        served: list[int] = []

        def refreshed() -> bool:                        # requests 0.1 s apart, never unconnected
            served.extend(get(s)["served"] for s in kept)
            time.sleep(0.1)
            return [c["id"] for c in operator.request(proc.pid, "ls")["checkpoints"]] != [1]

        wait_for(refreshed, timeout=10)
        assert served == list(range(1, len(served) + 1)), served
        assert get(kept[0], close=True)["served"] == len(served) + 1
        assert kept[0].recv(1) == b""                   # the server closed it: its FIN went
        status, body = _get(port, "/crash")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert kept[1].recv(1) == b""                   # closed by the restore, not left open
        # Back at a refresh: one taken in the last rounds of requests, or after the close.
        after = _get(port)[1]["served"]
        assert len(served) - 2 <= after <= len(served) + 2, (after, served)
    finally:
        for s in kept:
            s.close()
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_a_request_read_as_the_refresh_is_taken_is_not_run_again_by_a_restore(tmp_path):
    """A refresh taken while keep-alive connections are open lets go of them, and a restored
    process drops them: but the loop may have read a request on one of them already, its task
    made and not yet run, in the same turn as the refresh (the loop runs the callbacks of the
    sockets it found readable before the timers due: under steady traffic, every refresh). The
    live process serves that request; a process restored into that checkpoint must not run it
    again: a second execution of whatever it did, and for a request that crashes, a second
    crash (quarantined after one request of its client). A refresh is not taken while the loop
    has callbacks queued, and a restored process does not run a request on a connection it let
    go of (either one alone passes this test)."""
    get = _exchange

    proc, port = _uvicorn(tmp_path, "--timeout-keep-alive", "60", REFRESH="0.3", TIMEOUT="5",
                         FORKPOINT_INFO="1")
    kept = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert get(kept, "/count")[0] == 200
        time.sleep(0.4)                                     # a refresh is due
        # A job in a thread puts the refresh off for a second (its end runs the check, which
        # finds the thread still running), while the connection stays open and idle.
        assert get(kept, "/background?s=0.2")[0] == 200
        time.sleep(0.4)
        # The loop is busy 0.4-1.3 s from there, across the retry; the next request comes in
        # meanwhile, so the loop reads it and takes the refresh in the same turn.
        assert get(kept, "/block?s=0.9")[0] == 200
        time.sleep(0.4)
        assert get(kept, "/crash")[0] == 500
        assert "refresh of the worker's checkpoint put off" in server_log(tmp_path)
        assert _get(port)[0] == 200             # (served after what a restored process runs first)
        assert server_log(tmp_path).count("worker restored to checkpoint") == 1, server_log(tmp_path)
        assert "quarantined" not in server_log(tmp_path), server_log(tmp_path)
    finally:
        kept.close()
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


@pytest.mark.parametrize("path", ["/sync-count", "/to-thread"])
def test_refresh_stops_the_idle_threads_the_application_made(tmp_path, path):
    """A plain def endpoint leaves AnyIO worker threads behind, ``asyncio.to_thread`` the default
    executor's: idle, but a checkpoint cannot copy them. They were stopped before the first
    checkpoint only, so every refresh was refused (a ``ThreadsAlive`` traceback from the loop
    callback at each try) and a crash went back to the startup state (found by an audit). A
    refresh stops them as the first checkpoint does, and keeps what the worker learned."""
    proc, port = _uvicorn(tmp_path, REFRESH="0.3")
    try:
        assert [_get(port, path)[1]["served"] for _ in range(3)] == [1, 2, 3]
        time.sleep(0.4)
        assert _get(port)[1]["served"] == 4       # a new checkpoint is taken after this
        wait_for(lambda: _checkpoint_ids(proc.pid) == [2], timeout=10)
        assert _get(port, "/crash")[0] == 500
        assert _get(port)[1]["served"] == 5                   # back to 4, then this request
        log = server_log(tmp_path)
        assert "Exception in callback" not in log and "ThreadsAlive" not in log, log
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_a_refresh_beside_a_busy_thread_is_put_off_quietly(tmp_path):
    """A thread that cannot be stopped (a job still running in the executor) puts the refresh off,
    with one INFO line and no traceback, and it is taken once the job is over."""
    proc, port = _uvicorn(tmp_path, REFRESH="0.3", FORKPOINT_INFO="1")
    try:
        assert _get(port, "/background?s=2") == (200, "started")
        time.sleep(0.4)
        assert _get(port)[1]["served"] == 1       # refresh due: put off while the job runs
        time.sleep(1.0)
        assert _checkpoint_ids(proc.pid) == [1]
        wait_for(lambda: _checkpoint_ids(proc.pid) == [2], timeout=10)
        log = server_log(tmp_path)
        assert "Exception in callback" not in log and "ThreadsAlive" not in log, log
        assert log.count("refresh of the worker's checkpoint put off") == 1, log
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_a_crash_in_a_plain_def_endpoint_blames_its_request_only(tmp_path):
    """Starlette runs a plain def endpoint in a worker thread, after the request's step that
    handed it off has yielded: a crash there found no request marked (never quarantined: 500 until
    the recovery budget ran out and the server died, found by an audit), or the mark of another
    request whose step ran in the loop's thread meanwhile (an innocent request quarantined). The
    work is marked with its request in the thread that runs it, and the shepherd blames the
    crashing thread's mark. Here the innocent request is busy in the loop's thread both times the
    endpoint crashes: the crashing request is quarantined, the innocent one never."""
    proc, port = _uvicorn(tmp_path, TIMEOUT="5")
    try:
        for _ in range(2):
            crashing, got = _in_background(port, "/sync-crash?after=0.5")
            time.sleep(0.2)                                   # its thread sleeps, then crashes
            assert _get(port, "/busy?s=1.5")[0] == 500        # busy in its step meanwhile
            crashing.join(10)
            assert got and got[0][0] == 500, got
        # the innocent one (the same key): never quarantined
        assert _get(port, "/busy?s=1.5") == (200, "busy done"), server_log(tmp_path)
        status, body = _get(port, "/sync-crash?after=0.5")
        assert status == 503 and "quarantined" in body, (status, body, server_log(tmp_path))
        assert _get(port)[1]["served"] == 1
        assert proc.poll() is None
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def _checkpoint_ids(pid: int) -> list[int] | None:
    try:
        return [c["id"] for c in operator.request(pid, "ls")["checkpoints"]]
    except operator.OperatorError:      # no checkpoint taken yet
        return None


def test_an_application_that_raises_before_its_coroutine_exists_leaves_the_worker_protected(tmp_path):
    """Invariant: a request that ends, however it ends, is no longer in flight. An application
    whose __call__ raises synchronously (before any coroutine exists) still ends its request: the
    wrapper must not count it in flight for ever, or the worker's checkpoint, which waits for a
    moment with nothing in flight, is never taken (lifespan off) and a crash ends the worker."""
    proc, port = _uvicorn(tmp_path, "--lifespan", "off", SYNC_RAISING="1")
    try:
        assert _get(port, "/sync-raise")[0] == 500          # uvicorn's answer to the exception
        first = _get(port)[1]
        wait_for(lambda: _checkpoint_ids(proc.pid) == [1], timeout=10)
        assert _get(port, "/crash")[0] == 500, server_log(tmp_path)
        after = _get(port)[1]
        assert after["pid"] == first["pid"] and after["served"] == first["served"] + 1, (first, after)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_two_workers_keep_their_pids_and_answer_health_checks(tmp_path):
    """uvicorn --workers 2 spawns its workers with multiprocessing; each answers its supervisor's
    health checks from a thread, which forkpoint moves into the event loop (a checkpoint cannot
    copy a thread). A worker that stopped answering would be killed and replaced."""
    proc, port = _uvicorn(tmp_path, "--workers", "2", "--timeout-worker-healthcheck", "1")
    try:
        workers: set[int] = set()

        def both_answer() -> bool:      # (which worker accepts a connection is the kernel's choice)
            workers.update(_get(port)[1]["pid"] for _ in range(8))
            return len(workers) == 2

        wait_for(both_answer, timeout=20)
        assert _get(port, "/crash")[0] == 500
        time.sleep(3)                                         # several health checks
        seen = {_get(port)[1]["pid"] for _ in range(16)}
        assert seen <= workers and len(workers) == 2, (workers, seen)
        log = server_log(tmp_path)
        assert "died" not in log and "not ready" not in log, log
        for pid in workers:
            assert psutil.Process(pid).num_threads() == 1   # the live process is single-threaded
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


def test_ctrl_c_in_a_terminal_stops_every_worker(tmp_path):
    import pty

    (tmp_path / "app.py").write_text(textwrap.dedent(STARLETTE_APP))
    port = free_port()
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, "-m", "uvicorn", "--port", str(port), "--workers", "2",
                                   "app:app"], clean_env())
    try:
        wait_for(lambda: http(port, "/__ready__", timeout=1)[0] == 200, timeout=20)
        assert _get(port, "/crash")[0] == 500
        tree = _tree(pid)
        assert any(psutil.Process(p).name().startswith("fp-") for p in tree)
        os.write(fd, b"\x03")
        out = read_to_eof(fd)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-3000:]
        wait_for(lambda: _all_gone(tree), timeout=10)
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_uvloop_is_refused_with_a_clear_message(tmp_path):
    pytest.importorskip("uvloop")
    (tmp_path / "app.py").write_text(textwrap.dedent(STARLETTE_APP))
    import subprocess

    r = subprocess.run([sys.executable, "-m", "uvicorn", "--port", str(free_port()), "--loop", "uvloop",
                        "app:app"], cwd=tmp_path, capture_output=True, text=True, timeout=30, env=clean_env())
    assert r.returncode != 0
    assert "run uvicorn with --loop asyncio" in r.stderr + r.stdout


NESTED_STEP = """
    import asyncio
    import forkpoint as fp
    from forkpoint import asgi

    async def app(scope, receive, send):
        await asyncio.sleep(0)                   # a second step
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def serve():
        protected._checked_loop()                # the worker's checkpoint, as once uvicorn listens
        protected._checkpoint()
        with fp.processing("outer"):             # an input marked around the request
            await protected({"type": "http", "method": "GET", "path": "/x", "query_string": b"",
                             "headers": []}, receive, send)
            fp.tlongjmp(base, reason="after the request")

    base = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("blamed:", fp.history()[-1].key)
    else:
        protected = asgi.protect(app, timeout=5)
        asyncio.run(serve())
"""


def test_a_request_inside_a_marked_input_leaves_that_input_marked(tmp_path):
    """Invariant: what ``processing(key)`` marks stays marked until its block ends, as without the
    request in it. A request's steps mark the request; a step that found another input marked
    (a ``processing()`` block, or a ``watchdog()`` around the loop, takes the nested path) puts it
    back when it ends: a failure after the request, inside the block, blames that input."""
    r = run_py(NESTED_STEP, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "blamed: outer", (r.stdout, r.stderr)


def test_under_hypercorn_the_clients_of_failed_requests_are_answered_500(tmp_path):
    """Hypercorn's asyncio worker (``hypercorn app:app``: a master and one spawned worker) hands
    the application a ``send`` of its own stream object, not of the protocol that has the
    transport: the client of the request that crashed, and of one waiting beside it, must still
    get the 500 from the restored worker (they saw a closed connection), and the worker keeps its
    PID and its startup state."""
    pytest.importorskip("hypercorn")
    (tmp_path / "app.py").write_text(textwrap.dedent(STARLETTE_APP))
    port = free_port()
    argv = [sys.executable, "-m", "hypercorn", "-b", f"127.0.0.1:{port}", "app:app"]
    proc = start_server(argv, tmp_path, port, TIMEOUT="1")
    try:
        status, first = _get(port)
        assert status == 200 and first["served"] == 1
        slow, got = _in_background(port, "/slow?s=0.8")
        time.sleep(0.2)                                   # the slow request is waiting
        status, body = _get(port, "/crash?after=0.1")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        slow.join(10)
        assert got and got[0][0] == 500, got              # failed with the worker, answered
        status, body = _get(port, "/hang")
        assert status == 500 and "rolled back" in body, (status, body)   # cut at the 1 s timeout
        status, after = _get(port)
        assert status == 200 and after == {"pid": first["pid"], "served": 1}
        assert [_get(port, "/crash")[0] for _ in range(3)] == [500, 500, 503]
        pids = [proc.pid, *_tree(proc.pid)]
    finally:
        assert stop_server(proc, signal.SIGTERM) == 0, server_log(tmp_path)
    assert wait_for(lambda: _all_gone(pids), timeout=10), server_log(tmp_path)


def test_granian_is_refused_with_a_clear_message(tmp_path):
    """Granian serves connections in its Rust runtime's threads, outside the asyncio loop: no
    checkpoint is possible there (the worker spun a core at 100% looking for a listening socket
    in the loop, and a crash took the server down, with no word from forkpoint). Refused at the
    lifespan startup (the server stops), or at each request without one (``asginl``: 500)."""
    pytest.importorskip("granian")
    import subprocess

    (tmp_path / "app.py").write_text(textwrap.dedent(STARLETTE_APP))
    port = free_port()
    argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--port", str(port), "app:app"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(), **OWN_GROUP)
    log.close()
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code not in (None, 0), server_log(tmp_path)
    assert "cannot protect an application served by Granian" in server_log(tmp_path)
    argv[argv.index("asgi")] = "asginl"                  # no lifespan: refused at each request
    proc = start_server(argv, tmp_path, port)
    try:
        assert _get(port)[0] == 500
        assert _get(port, "/crash")[0] == 500            # (not run: the server is still there)
        assert _get(port)[0] == 500
        assert "cannot protect an application served by Granian" in server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGTERM) == 0, server_log(tmp_path)


def test_daphne_is_refused_with_a_clear_message(tmp_path):
    """Daphne runs Twisted's asyncio reactor: the loop is asyncio's, its sockets Twisted's, so the
    worker's checkpoint was never taken (a warning promised it) and a crash killed the server.
    Daphne has no lifespan: each request is refused (500) with the reason in its log."""
    pytest.importorskip("daphne")
    (tmp_path / "app.py").write_text(textwrap.dedent(STARLETTE_APP))
    port = free_port()
    proc = start_server([sys.executable, "-m", "daphne", "-p", str(port), "app:app"], tmp_path, port)
    try:
        assert _get(port)[0] == 500, server_log(tmp_path)
        assert _get(port, "/crash")[0] == 500            # (not run: the server is still there)
        assert _get(port)[0] == 500
        assert "served by Daphne" in server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGTERM) == 0, server_log(tmp_path)


QUEUE_LOGGING_APP = ASGI_LIFESPAN + """
    import asyncio, ctypes, logging, logging.handlers, os, queue, sys
    import forkpoint.asgi

    # Non-blocking logging as Litestar's default LoggingConfig sets it up (and dictConfig's
    # "queue_handler"): records go through a queue to a QueueListener's thread.
    records = queue.Queue(-1)
    listener = logging.handlers.QueueListener(records, logging.StreamHandler(sys.stderr))
    listener.start()
    applog = logging.getLogger("app")
    applog.addHandler(logging.handlers.QueueHandler(records))
    applog.setLevel(logging.INFO)
    state = {"served": 0}

    async def raw(scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["path"] == "/crash":
            state["served"] += 1000
            ctypes.string_at(0)
        state["served"] += 1
        applog.info("served %d in %d", state["served"], os.getpid())
        body = str(state["served"]).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    app = forkpoint.asgi.protect(raw, timeout=1, refresh=0.3)
"""


def test_a_logging_queue_listener_thread_does_not_keep_the_worker_unprotected(tmp_path):
    """A logging QueueListener's thread (Litestar's default logging) held off the worker's
    checkpoint for good ("waiting for threads to end" every second): a crash took the server.
    It is stopped around each checkpoint and started again, in every restored process too."""
    (tmp_path / "app.py").write_text(textwrap.dedent(QUEUE_LOGGING_APP))
    port = free_port()
    proc = start_server([sys.executable, "-m", "uvicorn", "--port", str(port), "app:app"], tmp_path, port)
    try:
        status, first = http(port, "/a")
        assert status == 200
        time.sleep(1.0)                 # a refresh comes after it, the listener stopped around it
        assert http(port, "/b") == (200, str(int(first) + 1))
        time.sleep(1.0)                 # a refresh is due as /b ends, and taken once it is closed
        status, body = http(port, "/crash")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert proc.poll() is None
        status, body = http(port, "/c")
        assert status == 200 and int(body) == int(first) + 2, (body, server_log(tmp_path))
        # the restored process logs through the listener, started again there
        assert wait_for(lambda: f"served {body} in {proc.pid}" in server_log(tmp_path), timeout=5), \
            server_log(tmp_path)
        assert "waiting for threads to end" not in server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)
