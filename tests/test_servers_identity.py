"""Invariant 10 inside real servers: gunicorn and uvicorn do not notice that their worker moved.

gunicorn's sync worker compares ``os.getppid()`` with its master's PID whenever it runs out of
connections, and exits when they differ ("Parent changed"): a worker whose view ran under
``@checkpointed`` must stay the same warm worker through idle periods, and still exit when its
master is really killed. uvicorn runs an asyncio loop, which must keep serving after forkpoint
starts inside it and after a crash is rolled back. Each scenario runs the real server and compares
with the same app without forkpoint (FORKPOINT_OFF=1), which is the behaviour to match.
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import free_port, http, server_log, start_server, stop_server, wait_for

pytestmark = pytest.mark.timeout(90)

WSGI_APP = """
    import ctypes, json, os
    import forkpoint as fp

    OFF = bool(os.environ.get("FORKPOINT_OFF"))
    state = {"served": 0}

    def protect(fn):
        return fn if OFF else fp.checkpointed(fn)

    @protect
    def view(path):
        if path == "/crash":
            ctypes.string_at(0)
        state["served"] += 1
        return {"pid": os.getpid(), "ppid": os.getppid(), "served": state["served"]}

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/__ready__":
            body, status = b"ready", "200 OK"
        else:
            try:
                body, status = json.dumps(view(path)).encode(), "200 OK"
            except fp.Recovered as e:
                body, status = f"recovered: {e.reason}".encode(), "500 Internal Server Error"
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
"""


def _write(tmp_path: Path, name: str, code: str) -> None:
    (tmp_path / name).write_text(textwrap.dedent(code))


def _gunicorn(tmp_path: Path, port: int, off: bool) -> object:
    _write(tmp_path, "wsgiapp.py", WSGI_APP)
    env = {"FORKPOINT_OFF": "1"} if off else {}
    return start_server([sys.executable, "-m", "gunicorn", "-w", "1", "--timeout", "3",
                         "-b", f"127.0.0.1:{port}", "wsgiapp:app"], tmp_path, port, **env)


@pytest.mark.parametrize("off", [False, True], ids=["forkpoint", "plain"])
def test_gunicorn_keeps_its_warm_worker_through_idle_periods(tmp_path, off):
    import json

    port = free_port()
    proc = _gunicorn(tmp_path, port, off)
    try:
        seen = []
        for _ in range(3):
            for _ in range(3):
                status, body = http(port, "/count")
                assert status == 200, (body, server_log(tmp_path))
                seen.append(json.loads(body))
            time.sleep(2.0)                   # idle: the worker checks its parent meanwhile
        assert [s["served"] for s in seen] == list(range(1, 10)), seen     # warm: never restarted
        assert len({s["pid"] for s in seen}) == 1
        assert {s["ppid"] for s in seen} == {proc.pid}                   # its master
        if not off:   # a crash costs one request, not the worker
            status, body = http(port, "/crash")
            assert status == 500 and "SIGSEGV" in body, body
            status, body = http(port, "/count")
            after = json.loads(body)
            assert after["pid"] == seen[0]["pid"] and after["served"] == 10
        assert "Parent changed" not in server_log(tmp_path)
        assert "Booting worker" in server_log(tmp_path) and server_log(tmp_path).count("Booting worker") == 1
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


@pytest.mark.parametrize("off", [False, True], ids=["forkpoint", "plain"])
def test_a_worker_whose_master_is_killed_stops_serving(tmp_path, off):
    import json

    port = free_port()
    proc = _gunicorn(tmp_path, port, off)
    status, body = http(port, "/count")
    assert status == 200, body
    worker = json.loads(body)["pid"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The worker (re-parented to the test process, a subreaper) notices its parent changed.
    wait_for(lambda: _gone(worker), timeout=15)
    assert "Parent changed" in server_log(tmp_path)


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


ASGI_APP = """
    import asyncio, ctypes, json, os
    import forkpoint as fp

    OFF = bool(os.environ.get("FORKPOINT_OFF"))
    state = {"served": 0}

    def protect(fn):
        return fn if OFF else fp.checkpointed(fn)

    @protect
    def parse(path):
        if path == "/crash":
            ctypes.string_at(0)
        state["served"] += 1
        return state["served"]

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        await asyncio.sleep(0.001)                     # the loop must be running here
        if path == "/__ready__":
            status, body = 200, b"ready"
        else:
            try:
                served = parse(path)
                await asyncio.sleep(0.001)
                status, body = 200, json.dumps({"pid": os.getpid(), "served": served}).encode()
            except fp.Recovered as e:
                status, body = 500, f"recovered: {e.reason}".encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})
"""


@pytest.mark.parametrize("off", [False, True], ids=["forkpoint", "plain"])
def test_uvicorn_serves_after_forkpoint_starts_in_its_loop_and_after_a_rollback(tmp_path, off):
    import json

    port = free_port()
    _write(tmp_path, "asgiapp.py", ASGI_APP)
    env = {"FORKPOINT_OFF": "1"} if off else {}
    proc = start_server([sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--port", str(port),
                         "asgiapp:app"], tmp_path, port, **env)
    try:
        got = [json.loads(http(port, "/count")[1]) for _ in range(3)]
        assert [g["served"] for g in got] == [1, 2, 3]
        if not off:
            status, body = http(port, "/crash")
            assert status == 500 and "SIGSEGV" in body, (body, server_log(tmp_path))
        for k in range(4, 7):
            status, body = http(port, "/count")
            assert status == 200, (body, server_log(tmp_path))
            assert json.loads(body) == {"pid": proc.pid, "served": k}
        assert "no running event loop" not in server_log(tmp_path)
    finally:
        stop_server(proc, signal.SIGINT)
    log = server_log(tmp_path)
    assert "Finished server process" in log, log
