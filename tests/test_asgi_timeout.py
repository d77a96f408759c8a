"""What ASGI's ``timeout=`` bounds: how long a client waits for its response to start, and how
long each step of the application holds the loop. Not a stream once it has started, not work after
a complete response, not a websocket session: they take as long as they do without forkpoint.

Found by the FastAPI audit of 2026-11-29 (FastAPI under uvicorn, against the same service without
forkpoint): every websocket and every stream (server-sent events, a download) was cut at
``timeout`` however well it went ("waited longer than 1s: cancelled"); work after a complete
response (Starlette's and FastAPI's ``BackgroundTasks``) still running then was cancelled without
a word, and, when its client had closed the connection, answered a second time (uvicorn logged
"Unexpected ASGI message 'http.response.start' sent, after response already completed"); and a
quarantined websocket handshake got no answer (uvicorn logged "ASGI callable returned without
completing handshake." and answered 500, not 503 as for HTTP).

Real uvicorn processes, a bare ASGI application.
"""
from __future__ import annotations

import importlib.util
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ASGI_LIFESPAN, free_port, http, server_log, start_server, stop_server, wait_for

pytestmark = pytest.mark.timeout(90)

APP = ASGI_LIFESPAN + """
    import asyncio, ctypes, os, sys
    import forkpoint.asgi

    async def plain(scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] == "websocket":
            if scope["path"] != "/echo":
                ctypes.string_at(0)
            await receive()                                     # websocket.connect
            await send({"type": "websocket.accept"})
            while True:
                m = await receive()
                if m["type"] != "websocket.receive":
                    return
                await send({"type": "websocket.send", "text": m["text"]})
        if scope["path"] == "/crash":
            ctypes.string_at(0)
        if scope["path"] == "/stream":                          # 4 chunks over 2 s
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(4):
                await asyncio.sleep(0.5)
                await send({"type": "http.response.body", "body": f"{i};".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"end"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
        if scope["path"] == "/after":           # as Starlette runs a response's BackgroundTasks
            await asyncio.sleep(2)
            print("work after the response done", file=sys.stderr, flush=True)

    app = forkpoint.asgi.protect(plain, timeout=1.0)
"""


def _uvicorn(tmp_path: Path):
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--port", str(port), "app:app"]
    return start_server(argv, tmp_path, port), port


def _handshake(port: int, path: str = "/ws", sock: list | None = None) -> str:
    """A websocket handshake on a fresh connection: the status line answered ('' if closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if sock is not None:
            sock.append(s.dup())
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        return data.split(b"\r\n", 1)[0].decode(errors="replace")


def test_work_after_a_complete_response_runs_to_its_end(tmp_path):
    proc, port = _uvicorn(tmp_path)
    try:
        assert http(port, "/after") == (200, str(proc.pid))    # its connection closed at once
        wait_for(lambda: "work after the response done" in server_log(tmp_path), timeout=10)
        log = server_log(tmp_path)
        assert "waited longer" not in log, log
        assert "Exception in ASGI application" not in log, log
        assert http(port, "/") == (200, str(proc.pid))
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_a_stream_longer_than_the_timeout_arrives_whole(tmp_path):
    proc, port = _uvicorn(tmp_path)
    try:
        assert http(port, "/stream") == (200, "0;1;2;3;end"), server_log(tmp_path)
        assert "waited longer" not in server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


@pytest.mark.skipif(not any(importlib.util.find_spec(m) for m in ("websockets", "wsproto")),
                    reason="uvicorn has no websocket implementation here")
def test_a_quarantined_websocket_handshake_is_refused_with_503(tmp_path):
    proc, port = _uvicorn(tmp_path)
    try:
        first = [_handshake(port) for _ in range(2)]         # each crashes the worker
        assert all(" 101 " not in line for line in first), first
        assert _handshake(port).startswith("HTTP/1.1 503"), server_log(tmp_path)
        # (uvicorn 0.54's websockets-sansio protocol still logs "ASGI callable returned without
        # completing handshake." after a complete websocket.http.response: its own quirk, for every
        # application that denies a handshake with a response.)
        assert http(port, "/") == (200, str(proc.pid))
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


@pytest.mark.skipif(not any(importlib.util.find_spec(m) for m in ("websockets", "wsproto")),
                    reason="uvicorn has no websocket implementation here")
def test_a_refused_websocket_handshake_on_a_kept_alive_connection_gives_back_its_slot(tmp_path):
    """A connection holds a rescue slot from its first HTTP request until it is lost; a websocket
    upgrade gives the connection another protocol, whose loss never released it, so the upgrade
    releases it, but a quarantined handshake was refused before that: each such connection kept its
    slot for ever, and once they were all taken a crash left its client with a closed connection
    instead of a 500. (Since an idle connection's slot is given to a new one when none is free,
    the slots such connections keep show as the idle connections a restore closes.)"""
    from forkpoint.asgi import SLOTS

    proc, port = _uvicorn(tmp_path)
    try:
        for _ in range(2):                                      # /ws crashes: quarantined
            _handshake(port)
        for _ in range(SLOTS + 2):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                data = b""
                while not data.endswith(b"0\r\n\r\n"):      # (chunked: no content-length)
                    chunk = s.recv(4096)
                    assert chunk, data
                    data += chunk
                s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
                answer = s.recv(4096)
                assert answer.startswith(b"HTTP/1.1 503"), (answer, server_log(tmp_path))
        assert http(port, "/crash")[0] == 500, server_log(tmp_path)
        # (and no slot was left to such a connection, idle, for the restore to close)
        wait_for(lambda: server_log(tmp_path).count("client(s) answered") == 3, timeout=10)
        last = [line for line in server_log(tmp_path).splitlines() if "client(s) answered" in line][-1]
        assert last.endswith("1 client(s) answered 500, 0 closed"), server_log(tmp_path)
        assert http(port, "/") == (200, str(proc.pid))
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


@pytest.mark.skipif(not any(importlib.util.find_spec(m) for m in ("websockets", "wsproto")),
                    reason="uvicorn has no websocket implementation here")
def test_a_websocket_session_may_last_longer_than_the_timeout(tmp_path):
    """Before: every websocket was cut at ``timeout=`` (1 s here) as a request that waited too long
    ("waited longer than 1s: cancelled"), however idle and well its handler was."""
    proc, port = _uvicorn(tmp_path)
    held: list[socket.socket] = []
    try:
        assert " 101 " in _handshake(port, "/echo", held), server_log(tmp_path)
        s = held[0]
        time.sleep(2.0)                                         # twice the timeout, idle
        mask = b"\x01\x02\x03\x04"
        s.sendall(b"\x81\x82" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"hi")))
        s.settimeout(5)
        frame = b""
        try:
            while len(frame) < 4:
                chunk = s.recv(64)
                if not chunk:
                    break
                frame += chunk
        except OSError:
            pass
        assert frame[:4] == b"\x81\x02hi", (frame, server_log(tmp_path))
        assert "waited longer" not in server_log(tmp_path)
    finally:
        for s in held:
            s.close()
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


KEEPALIVE_APP = ASGI_LIFESPAN + """
    import asyncio, ctypes
    import forkpoint.asgi

    async def plain(scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["path"] == "/crash":                   # still in flight as /after's work ends
            await asyncio.sleep(1.5)
            ctypes.string_at(0)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        if scope["path"] == "/after":                   # as Starlette runs BackgroundTasks
            await asyncio.sleep(0.7)

    app = forkpoint.asgi.protect(plain, timeout=5.0)
"""


def test_a_request_after_background_work_on_its_connection_is_still_answered(tmp_path):
    """uvicorn reads a keep-alive connection's next request as soon as a response is complete,
    while the task that sent it may still run its BackgroundTasks. That task's end marked the
    connection's rescue slot idle under the next request, which a crash then left closed (as
    without forkpoint) instead of answered 500 as on a fresh connection."""
    (tmp_path / "app.py").write_text(textwrap.dedent(KEEPALIVE_APP))
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--port", str(port), "app:app"]
    proc = start_server(argv, tmp_path, port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /after HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while not data.endswith(b"\r\n\r\nok"):
                chunk = s.recv(4096)
                assert chunk, data
                data += chunk
            s.sendall(b"GET /crash HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            try:
                answer = s.recv(4096)
            except OSError as e:
                answer = repr(e).encode()
        assert answer.startswith(b"HTTP/1.1 500"), (answer, server_log(tmp_path))
        assert http(port, "/") == (200, "ok")
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


THREAD_APP = ASGI_LIFESPAN + """
    import asyncio, os, sys, time
    import forkpoint.asgi

    async def plain(scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["path"] == "/hang":            # as a C library stuck in a thread
            await asyncio.get_running_loop().run_in_executor(None, time.sleep, 60)
        if scope["path"] == "/late":            # a query a little slower than the timeout
            await asyncio.get_running_loop().run_in_executor(None, time.sleep, 1.3)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/spin":            # short steps in the loop's thread, for a while
            end = time.monotonic() + float(scope["query_string"] or 0)
            while time.monotonic() < end:
                t = time.monotonic() + 0.002
                while time.monotonic() < t:
                    pass
                await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
        if scope["path"] == "/after":           # as Starlette runs a sync BackgroundTask
            await asyncio.to_thread(time.sleep, 2)
            print("thread work after the response done", file=sys.stderr, flush=True)

    app = forkpoint.asgi.protect(plain, timeout=1.0, key=lambda scope: scope["path"])
"""


def _thread_app(tmp_path: Path):
    (tmp_path / "app.py").write_text(textwrap.dedent(THREAD_APP))
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--port", str(port), "app:app"]
    return start_server(argv, tmp_path, port), port


def test_work_a_request_hands_to_a_thread_is_cut_past_its_timeout_and_blamed_on_it(tmp_path):
    """A thread cannot be cancelled: work stuck there past the request's ``timeout`` kept a pool
    thread for ever (and, where the server waits for the thread, as asgiref does for Django's sync
    views, its client for ever), and the request was never blamed: it could hang thread after
    thread. The worker is restored, and the request whose work it was is blamed, not the one
    whose step the loop's thread runs at that moment (/spin's, nearly always)."""
    import threading

    proc, port = _thread_app(tmp_path)
    try:
        got = []
        for n in (1, 2):
            # (its client gets a 500 from the restore, or a 200: it is not what this test checks)
            t = threading.Thread(target=http, args=(port, "/spin?4", 20.0))
            t.start()
            time.sleep(0.2)
            got.append(http(port, "/hang", timeout=20)[0])
            # (answered 500 as it timed out, the worker restored just after: its thread runs on)
            wait_for(lambda n=n: server_log(tmp_path).count("worker restored") == n, timeout=10)
            t.join()
        assert got == [500, 500], (got, server_log(tmp_path))
        assert http(port, "/hang")[0] == 503, server_log(tmp_path)
        assert http(port, "/spin?0") == (200, str(proc.pid)), server_log(tmp_path)
        log = server_log(tmp_path)
        assert "quarantined input '/hang'" in log and "quarantined input '/spin'" not in log, log
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_thread_work_after_a_complete_response_is_not_timed(tmp_path):
    proc, port = _thread_app(tmp_path)
    try:
        assert http(port, "/after") == (200, str(proc.pid))
        wait_for(lambda: "thread work after the response done" in server_log(tmp_path), timeout=10)
        log = server_log(tmp_path)
        assert "restored" not in log and "waited longer" not in log, log
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


STREAM_BEHIND_MIDDLEWARE_APP = """
    import asyncio, os, time
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route
    import forkpoint.asgi

    def events():                   # a sync iterator: each next() in a thread
        time.sleep(2.6)             # its first event after twice the timeout (a blocking queue.get)
        yield b"one;"
        yield str(os.getpid()).encode()

    async def stream(request):
        return StreamingResponse(events())

    async def ready(request):
        return PlainTextResponse("ok")

    class Pass(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            response = await call_next(request)
            await asyncio.sleep(0.2)    # (work of its own: the first chunk is being read meanwhile)
            return response

    app = forkpoint.asgi.protect(Starlette(routes=[Route("/stream", stream), Route("/__ready__", ready)],
                                           middleware=[Middleware(Pass)]), timeout=1.0)
"""


def test_thread_work_of_a_stream_that_started_behind_base_http_middleware_is_not_timed(tmp_path):
    """``BaseHTTPMiddleware`` runs the application in a task that goes on to its stream's first
    next() (in a thread) as soon as its response start is read, before the middleware has passed
    that start on: the thread's work took the request's deadline, and a stream whose first chunk
    came after ``timeout`` was cut as it streamed (closed, the worker restored, its path quarantined
    at the second), where without the middleware it was not timed. A response that starts untimes
    the work its request has running in threads."""
    pytest.importorskip("starlette")
    (tmp_path / "app.py").write_text(textwrap.dedent(STREAM_BEHIND_MIDDLEWARE_APP))
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--port", str(port), "app:app"]
    proc = start_server(argv, tmp_path, port)
    try:
        for _ in range(2):
            assert http(port, "/stream") == (200, f"one;{proc.pid}"), server_log(tmp_path)
        log = server_log(tmp_path)
        assert "restored" not in log and "quarantined" not in log, log
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_thread_work_a_little_past_its_timeout_costs_no_other_request(tmp_path):
    """A request whose thread ran a little past ``timeout`` (a slow query) is answered 500 by its
    timeout, as a request that waits in the loop is; its thread, cut at once, restored the worker:
    every other request in flight there failed with it (a FastAPI app of def endpoints: three
    innocent 0.5 s requests beside a 1.05 s one all got 500), and the slow path was quarantined
    at its second time. Thread work gets one more ``timeout`` before the cut."""
    import threading

    proc, port = _thread_app(tmp_path)
    try:
        got = []
        for _ in range(2):
            t = threading.Thread(target=lambda: got.append(http(port, "/spin?1.5", 20.0)))
            t.start()
            time.sleep(0.2)
            assert http(port, "/late", timeout=20)[0] == 500, server_log(tmp_path)
            t.join()
            time.sleep(0.5)     # (its thread ends)
        assert got == [(200, str(proc.pid))] * 2, (got, server_log(tmp_path))
        log = server_log(tmp_path)
        assert "restored" not in log and "quarantined" not in log, log
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)
