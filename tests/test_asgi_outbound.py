"""forkpoint.asgi.protect with connections the application opened to servers on the loop (an
asyncpg, redis.asyncio or httpx pool: asyncio transports of its own, not accepted by uvicorn).

Such a connection stays open for the worker's life. Counted as a client's, it kept the worker
from ever taking its checkpoint (an asyncpg pool made in the lifespan startup: no checkpoint, and
the first segfault ended uvicorn as if unprotected) and, opened later, from ever refreshing it.
A plain asyncio stream to a line-echo server stands in for the pool, so no database is needed.
"""
from __future__ import annotations

import json
import socket
import sys
import textwrap
import threading
import time

import pytest
from conftest import free_port, http, server_log, start_server, stop_server

pytestmark = pytest.mark.timeout(60)

APP = """
    import asyncio, contextlib, ctypes, os, sys
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route
    import forkpoint.asgi

    state = {}

    async def ask(v):
        async with state["lock"]:
            state["w"].write(b"%d\\n" % v)
            await state["w"].drain()
            return int(await state["r"].readline())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["lock"] = asyncio.Lock()
        if os.environ.get("EAGER"):      # opened in the startup, as asyncpg.create_pool does
            state["r"], state["w"] = await asyncio.open_connection("127.0.0.1", int(os.environ["ECHO"]))
        yield

    async def ready(request):
        return PlainTextResponse("ready")

    async def echo(request):
        if "w" not in state:           # opened by the first request, as a lazy pool does
            state["r"], state["w"] = await asyncio.open_connection("127.0.0.1", int(os.environ["ECHO"]))
        v = int(request.query_params["v"])
        return JSONResponse({"v": v, "got": await ask(v), "pid": os.getpid()})

    async def crash(request):
        ctypes.string_at(0)

    star = Starlette(routes=[Route("/__ready__", ready), Route("/echo", echo), Route("/crash", crash)],
                     lifespan=lifespan)
    app = forkpoint.asgi.protect(star, timeout=5, refresh=float(os.environ.get("REFRESH", "0")) or None)
"""


class _EchoServer:
    """A line-echo server in this process: each connection answers each line with itself."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            for line in f:
                conn.sendall(line)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo_server():
    server = _EchoServer()
    yield server
    server.close()


def _serve(tmp_path, echo_server, **env):
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--port", str(port), "app:app"]
    return start_server(argv, tmp_path, port, ECHO=str(echo_server.port), **env), port


def _get(port, path):
    status, body = http(port, path, timeout=10)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def test_pool_opened_in_startup_does_not_keep_the_worker_unprotected(tmp_path, echo_server):
    """Invariant: a connection the application opened in its lifespan startup (asyncpg's
    ``create_pool``) does not stop the worker's checkpoint: a segfault is answered 500 and the
    worker serves on under the same PID, as without such a connection."""
    proc, port = _serve(tmp_path, echo_server, EAGER="1")
    try:
        status, body = _get(port, "/echo?v=1")
        assert status == 200 and body["got"] == 1
        assert _get(port, "/crash")[0] == 500, server_log(tmp_path)
        assert proc.poll() is None, server_log(tmp_path)
        assert _get(port, "/__ready__") == (200, "ready"), server_log(tmp_path)
    finally:
        stop_server(proc)


def test_pool_opened_by_a_request_does_not_stop_refreshes(tmp_path, echo_server):
    """Invariant: with ``refresh=``, a connection a request opened (a lazy pool) does not put off
    every later refresh: the checkpoint moves on, and a restore keeps the connection (unused since
    that refresh), so the next request is answered on it without reconnecting."""
    proc, port = _serve(tmp_path, echo_server, REFRESH="0.3")
    try:
        assert _get(port, "/echo?v=1")[1]["got"] == 1          # opens the connection
        time.sleep(0.5)
        assert _get(port, "/echo?v=2")[1]["got"] == 2          # due: a refresh follows it
        time.sleep(0.5)
        assert _get(port, "/crash")[0] == 500, server_log(tmp_path)
        status, body = _get(port, "/echo?v=3")
        assert (status, body["got"]) == (200, 3), server_log(tmp_path)
        # Restored to a refresh that held the open connection: kept, not reconnected.
        assert echo_server.accepted == 1, server_log(tmp_path)
    finally:
        stop_server(proc)
