"""The tasks a request's code creates are the request's: a crash in one blames that request, and a
step stuck in one is cut at the request's ``timeout``.

Middleware and frameworks run the application in tasks of their own: Starlette's
``BaseHTTPMiddleware`` (and so FastAPI's ``@app.middleware("http")``) in an AnyIO task, Django's
``ASGIHandler`` the whole request (middleware and view, and through ``sync_to_async`` a plain
view's thread). Found by the Django audit of 2026-11-29: such a task's steps carried no mark, so a
crash in them blamed nobody (500 for every repeat, never 503, until the recovery budget ran out and
uvicorn died by SIGSEGV), and a step stuck in one had no deadline (the worker hung for ever despite
``timeout=``). Real uvicorn processes, with a bare ASGI application shaped like Django's and a
Starlette application behind ``BaseHTTPMiddleware``.
"""
from __future__ import annotations

import signal
import sys
import textwrap
from http.client import HTTPConnection
from pathlib import Path

import pytest
from conftest import ASGI_LIFESPAN, free_port, http, server_log, start_server, stop_server

pytestmark = pytest.mark.timeout(90)

BARE_APP = ASGI_LIFESPAN + """
    import asyncio, ctypes, os
    from concurrent.futures import ThreadPoolExecutor
    import forkpoint.asgi

    async def crash():
        ctypes.string_at(0)

    async def thread_crash():       # Django's sync_to_async: run_in_executor(ThreadPoolExecutor(1))
        await asyncio.get_running_loop().run_in_executor(ThreadPoolExecutor(1), ctypes.string_at, 0)

    async def hang():
        while True:
            pass

    WORK = {"/task-crash": crash, "/task-thread-crash": thread_crash, "/task-hang": hang}

    async def plain(scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        work = WORK.get(scope["path"])
        if work is not None:
            await asyncio.create_task(work())        # as django.core.handlers.asgi does
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(os.getpid()).encode()})

    app = forkpoint.asgi.protect(plain, timeout=1.0)
"""

MIDDLEWARE_APP = """
    import asyncio, ctypes, os
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    import forkpoint, forkpoint.asgi

    async def ready(request):
        return PlainTextResponse(str(os.getpid()))

    async def crash(request):
        await asyncio.sleep(0.01)
        ctypes.string_at(0)

    async def echo(request):        # reads the body: receive() through the middleware's task group
        return PlainTextResponse((await request.body()).decode())

    async def guarded_await(request):
        # A watchdog() block whose deadline comes while it waits at an await.
        with forkpoint.watchdog(0.3, hard_after=30):
            await asyncio.sleep(3)
        return PlainTextResponse("slept")

    class Passing(BaseHTTPMiddleware):      # what @app.middleware("http") makes in FastAPI
        async def dispatch(self, request, call_next):
            return await call_next(request)

    star = Starlette(routes=[Route("/__ready__", ready), Route("/crash", crash),
                             Route("/echo", echo, methods=["POST"]),
                             Route("/guarded-await", guarded_await)],
                     middleware=[Middleware(Passing)] if os.environ.get("MIDDLEWARE") else [])
    app = forkpoint.asgi.protect(star, timeout=30)
"""


def _uvicorn(tmp_path: Path, app: str, **env: str):
    (tmp_path / "app.py").write_text(textwrap.dedent(app))
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--port", str(port), "app:app"]
    return start_server(argv, tmp_path, port, **env), port


def _post(port: int, path: str, body: bytes) -> tuple[int, str]:
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    except OSError as e:
        return 0, repr(e)
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/task-crash", "/task-thread-crash"])
def test_a_crash_in_a_task_the_request_created_blames_the_request(tmp_path, path):
    proc, port = _uvicorn(tmp_path, BARE_APP)
    try:
        got = [http(port, path, timeout=10)[0] for _ in range(3)]
        assert got == [500, 500, 503], (got, server_log(tmp_path))
        assert http(port, "/") == (200, str(proc.pid))
        assert proc.poll() is None
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_a_task_the_request_created_is_cut_at_the_timeout(tmp_path):
    proc, port = _uvicorn(tmp_path, BARE_APP)
    try:
        status, body = http(port, "/task-hang", timeout=8)
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert http(port, "/") == (200, str(proc.pid))
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_a_crash_behind_base_http_middleware_blames_the_request(tmp_path):
    """Also: a request body read through the middleware (AnyIO cancels a task of its own there,
    asking the task's coroutine its state) is still served, before and after the restores."""
    proc, port = _uvicorn(tmp_path, MIDDLEWARE_APP, MIDDLEWARE="1")
    try:
        assert _post(port, "/echo", b"before") == (200, "before")
        got = [http(port, "/crash", timeout=10)[0] for _ in range(3)]
        assert got == [500, 500, 503], (got, server_log(tmp_path))
        assert _post(port, "/echo", b"after") == (200, "after")
        assert http(port, "/__ready__") == (200, str(proc.pid))
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


@pytest.mark.parametrize("middleware", ["", "1"], ids=["plain", "middleware"])
def test_a_watchdog_block_waiting_at_an_await_is_cut_at_its_deadline(tmp_path, middleware):
    """Invariant: a watchdog() block in a request is cut at its deadline also while it waits at an
    await (its frame is then on no stack: the block is found by following the task's awaits, which
    went no further than the wrapper's own step driver). Before, the block ran its 3 s to the end."""
    proc, port = _uvicorn(tmp_path, MIDDLEWARE_APP, MIDDLEWARE=middleware)
    try:
        status, body = http(port, "/guarded-await", timeout=10)
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert http(port, "/__ready__") == (200, str(proc.pid))
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


LAZY_APP = ASGI_LIFESPAN + """
    import asyncio, ctypes, os
    import forkpoint.asgi

    queue = None

    async def consumer():           # a shared worker task, started by the first request that needs it
        while True:
            if await queue.get() == b"crash":
                ctypes.string_at(0)

    async def plain(scope, receive, send):
        global queue
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["path"] == "/init" and queue is None:
            queue = asyncio.Queue()
            asyncio.create_task(consumer())
        elif scope["path"] == "/job":
            queue.put_nowait(scope["query_string"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(os.getpid()).encode()})

    app = forkpoint.asgi.protect(plain, timeout=5.0)
"""


def test_a_task_that_outlives_its_request_blames_no_request(tmp_path):
    """A task a request made, still running after the request ended (a shared worker task that the
    first request to need it starts), crashes on another request's job: no request is blamed, as
    for a crash outside any request. Before, every step of that task was marked with the request
    that had started it: 'GET /init' was quarantined (503) for the jobs' crashes."""
    import time

    proc, port = _uvicorn(tmp_path, LAZY_APP)
    try:
        got = []
        for n in range(1, 4):
            got.append(http(port, "/init")[0])
            http(port, "/job?crash")        # answered before, or 500 by, the crash it causes
            deadline = time.monotonic() + 10
            while server_log(tmp_path).count("worker restored to checkpoint") < n \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server_log(tmp_path).count("worker restored to checkpoint") == n, server_log(tmp_path)
        got.append(http(port, "/init")[0])
        assert got == [200, 200, 200, 200], (got, server_log(tmp_path))
        assert proc.poll() is None
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


EAGER_APP = """
    import asyncio, contextlib, ctypes, os
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    import forkpoint.asgi

    async def echo(request):
        return PlainTextResponse((await request.body()).decode())

    async def crash():
        await asyncio.sleep(0.01)
        ctypes.string_at(0)

    async def task_crash(request):
        await asyncio.create_task(crash())

    class Passing(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            return await call_next(request)

    @contextlib.asynccontextmanager
    async def lifespan(app):        # the application's eager tasks (Python 3.12+)
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        yield

    star = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/task-crash", task_crash),
                             Route("/__ready__", lambda r: PlainTextResponse("ok"))],
                     middleware=[Middleware(Passing)] if os.environ.get("MIDDLEWARE") else [],
                     lifespan=lifespan)
    app = forkpoint.asgi.protect(star, timeout=30)
"""


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory: Python 3.12+")
def test_an_eager_task_factory_the_application_sets_is_still_one_for_anyio(tmp_path):
    """AnyIO recognizes asyncio's eager task factory and makes its tasks with the factory's
    constructor, not eagerly (a task group's state must exist before a task's first step). A
    factory of forkpoint's chained in front of it hid it (the first version of the task marks):
    every request through BaseHTTPMiddleware that read its body failed 500 ("Attempted to exit a
    cancel scope that isn't the current tasks's current cancel scope"). The tasks a request makes
    with asyncio.create_task are still the request's under an eager factory (the crash is blamed)."""
    proc, port = _uvicorn(tmp_path, EAGER_APP, MIDDLEWARE="1")
    try:
        assert _post(port, "/echo", b"before") == (200, "before"), server_log(tmp_path)
        assert http(port, "/task-crash", timeout=10)[0] == 500, server_log(tmp_path)
        assert _post(port, "/echo", b"after") == (200, "after"), server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)
    proc, port = _uvicorn(tmp_path, EAGER_APP)
    try:
        got = [http(port, "/task-crash", timeout=10)[0] for _ in range(3)]
        assert got == [500, 500, 503], (got, server_log(tmp_path))
        assert _post(port, "/echo", b"after") == (200, "after"), server_log(tmp_path)
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


TASK_NAMES_APP = ASGI_LIFESPAN + """
    import asyncio, os
    import forkpoint.asgi

    async def child():
        return asyncio.current_task().get_name()

    async def plain(scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        names = [asyncio.current_task().get_name(), await asyncio.create_task(child()),
                 await asyncio.create_task(child(), name="named")]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": " ".join(names).encode()})

    app = plain if os.environ.get("FORKPOINT_OFF") else forkpoint.asgi.protect(plain, timeout=5.0)
"""


def test_tasks_keep_the_names_asyncio_gives_them(tmp_path):
    """Task names (logging's taskName) as without forkpoint: a task factory, which the first
    version of the task marks set, makes CPython 3.13.0 name every task "None"."""
    got = {}
    for off in ("1", ""):
        proc, port = _uvicorn(tmp_path, TASK_NAMES_APP, FORKPOINT_OFF=off)
        try:
            http(port, "/")                                   # (the worker's checkpoint is taken)
            status, body = http(port, "/")
            assert status == 200, (status, body, server_log(tmp_path))
            got[off] = [name.startswith("Task-") for name in body.split()[:2]] + body.split()[2:]
        finally:
            assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)
    assert got[""] == got["1"] == [True, True, "named"], got
