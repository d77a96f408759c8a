"""Django, as it is deployed: its WSGI handler under gunicorn in transaction mode, its ASGI handler
under uvicorn. Compared with what Django does without forkpoint.

Found by the Django audit of 2026-11-29:
- Django answers a view's exception with a 500 of its own unless ``DEBUG_PROPAGATE_EXCEPTIONS``,
  so transaction mode never sees the exception and commits what the view changed (as Django keeps
  it without forkpoint). Nothing said so: the first request now logs a warning that says how to
  let the exception escape, and with the setting the change is undone.
- ``ASGIHandler`` runs each request (middleware and view) in a task of its own, whose steps carried
  no mark: a view that segfaulted was answered 500 for ever, never 503, until the recovery budget
  ran out and uvicorn died by SIGSEGV.
- a plain view stuck past ``timeout=`` under ASGI was never answered: asgiref waits for its thread
  however the request is cancelled (as without forkpoint, where it is not answered either).
"""
from __future__ import annotations

import json
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port, http, server_log, start_server, stop_server

pytest.importorskip("django")

pytestmark = pytest.mark.timeout(90)

DJANGO_APP = """
    import ctypes, os, time
    from django.conf import settings

    settings.configure(
        DEBUG=False, SECRET_KEY="test", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
        DEBUG_PROPAGATE_EXCEPTIONS=bool(os.environ.get("PROPAGATE")),
        MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
    )
    import django
    django.setup()
    from django.http import HttpResponse, JsonResponse
    from django.urls import path
    import forkpoint.asgi, forkpoint.wsgi

    state = {"served": 0}

    def ready(request):
        return HttpResponse("ready")

    def count(request):
        state["served"] += 1
        return JsonResponse({"pid": os.getpid(), "served": state["served"]})

    def raising(request):
        state["served"] += 1000             # a change, then an exception
        raise RuntimeError("corrupted, then raised")

    def crash(request):                     # a plain view: Django runs it in a thread (ASGI)
        ctypes.string_at(0)

    async def async_crash(request):         # an async view: in the request's task (ASGI)
        ctypes.string_at(0)

    def hang(request):                      # a plain view stuck (in C, say) in its thread
        time.sleep(60)

    urlpatterns = [path("__ready__", ready), path("count", count), path("raise", raising),
                   path("crash", crash), path("async-crash", async_crash), path("hang", hang)]

    if os.environ.get("ASGI"):
        from django.core.asgi import get_asgi_application
        app = forkpoint.asgi.protect(get_asgi_application(), timeout=float(os.environ.get("TIMEOUT", 5)))
    else:
        from django.core.wsgi import get_wsgi_application
        app = forkpoint.wsgi.protect(get_wsgi_application(), mode="transaction", timeout=5)
"""


def _serve(tmp_path: Path, server: str, **env: str):
    (tmp_path / "app.py").write_text(textwrap.dedent(DJANGO_APP))
    port = free_port()
    if server == "gunicorn":
        argv = [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "app:app"]
    else:
        argv = [sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--port", str(port), "app:app"]
        env["ASGI"] = "1"
    return start_server(argv, tmp_path, port, **env), port


def _served(port: int) -> int:
    status, body = http(port, "/count")
    assert status == 200, (status, body)
    return json.loads(body)["served"]


@pytest.mark.parametrize("propagate", ["", "1"], ids=["django-default", "propagate"])
def test_a_views_exception_is_undone_only_if_django_lets_it_escape_and_the_log_says_so(tmp_path, propagate):
    proc, port = _serve(tmp_path, "gunicorn", PROPAGATE=propagate)
    try:
        assert _served(port) == 1
        status, body = http(port, "/raise")
        assert status == 500, (status, body)
        log = server_log(tmp_path)
        if propagate:
            assert "rolled back" in body, body
            assert _served(port) == 2                   # undone
            assert "DEBUG_PROPAGATE_EXCEPTIONS" not in log, log
        else:
            assert _served(port) == 1002                # kept, as Django keeps it without forkpoint
            assert log.count("set DEBUG_PROPAGATE_EXCEPTIONS = True") == 1, log
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


@pytest.mark.parametrize("view", ["/crash", "/async-crash"])
def test_a_view_that_crashes_under_django_asgi_is_quarantined_and_the_worker_lives(tmp_path, view):
    proc, port = _serve(tmp_path, "uvicorn")
    try:
        pid = json.loads(http(port, "/count")[1])["pid"]
        got = [http(port, view)[0] for _ in range(3)]
        assert got == [500, 500, 503], (got, server_log(tmp_path))
        assert json.loads(http(port, "/count")[1])["pid"] == pid == proc.pid
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)


def test_a_plain_view_stuck_in_its_thread_is_answered_and_quarantined_under_asgi(tmp_path):
    """A client of a stuck plain view waited for ever, with or without forkpoint: Django runs the
    view in a thread, and asgiref waits for that thread however the request is cancelled. Past the
    request's ``timeout=`` the worker is now restored, the client answered 500, and the view's key
    blamed for it, as for a step that hangs the loop."""
    proc, port = _serve(tmp_path, "uvicorn", TIMEOUT="1")
    try:
        got = [http(port, "/hang", timeout=15)[0] for _ in range(3)]
        assert got == [500, 500, 503], (got, server_log(tmp_path))
        assert json.loads(http(port, "/count")[1])["pid"] == proc.pid
        assert server_log(tmp_path).count("work of 'GET /hang' in a thread") >= 2
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)
