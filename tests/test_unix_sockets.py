"""The server shapes behind a reverse proxy or a socket manager: listening on a Unix socket
(``uvicorn --uds``, ``gunicorn --bind unix:``) or on a socket handed over by descriptor
(``uvicorn --fd``). A crash's client is answered 500 over AF_UNIX as over TCP, the worker keeps
its PID, the key is quarantined at its second failure, and SIGTERM leaves nothing behind."""
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
from conftest import OWN_GROUP, clean_env, server_log, stop_server, wait_for
from test_asgi import STARLETTE_APP, _all_gone, _tree
from test_wsgi import FLASK_APP

pytestmark = pytest.mark.timeout(120)


def _get(path: str, where: str, timeout: float = 10.0) -> tuple[int, dict | str]:
    """One request on a fresh AF_UNIX connection: (status, body); (0, error) if none came."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    got = b""
    try:
        s.connect(where)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        while chunk := s.recv(65536):
            got += chunk
    except OSError as e:
        return 0, f"{type(e).__name__}: {e}"
    finally:
        s.close()
    if not got:
        return 0, "closed"
    head, _, body = got.partition(b"\r\n\r\n")
    text = body.decode(errors="replace")
    try:
        return int(head[9:12]), json.loads(text)
    except ValueError:
        return int(head[9:12]), text


def _start(argv: list[str], cwd: Path, where: str, **env: str) -> subprocess.Popen[str]:
    log = open(cwd / "server.log", "w")
    proc = subprocess.Popen(argv, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(**env), **OWN_GROUP)
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{server_log(cwd)}")
        if _get("/__ready__", where, timeout=1.0)[0]:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not answer on {where}:\n{server_log(cwd)}")


def _server_and_children(pid: int) -> list[int]:
    return [pid, *_tree(pid)]


def _gone(pids: list[int]) -> bool:
    return bool(wait_for(lambda: _all_gone(pids), timeout=5))


def _check_asgi(proc: subprocess.Popen[str], where: str, tmp_path: Path) -> None:
    assert [_get("/count", where)[1]["served"] for _ in range(2)] == [1, 2]
    status, body = _get("/crash", where)
    assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
    assert _get("/count", where) == (200, {"pid": proc.pid, "served": 1})
    innocent: list = []
    t = threading.Thread(target=lambda: innocent.append(_get("/slow?s=0.5", where)))
    t.start()
    time.sleep(0.2)
    assert _get("/crash?after=0.1", where)[0] == 500
    t.join()
    assert innocent[0][0] in (0, 500), innocent              # failed with the crash, not blamed:
    assert _get("/slow?s=0.1", where)[0] == 200
    assert [_get("/crash", where)[0] for _ in range(2)] == [500, 503]
    assert _get("/hang", where)[0] == 500
    assert _get("/count", where) == (200, {"pid": proc.pid, "served": 1})


def test_uvicorn_on_a_unix_socket(tmp_path):
    (tmp_path / "app.py").write_text(textwrap.dedent(STARLETTE_APP))
    where = str(tmp_path / "x.sock")
    proc = _start([sys.executable, "-m", "uvicorn", "--uds", where, "app:app"], tmp_path, where)
    try:
        _check_asgi(proc, where, tmp_path)
        pids = _server_and_children(proc.pid)
    finally:
        assert stop_server(proc, signal.SIGTERM) in (0, -signal.SIGTERM), server_log(tmp_path)
    assert _gone(pids)


def test_uvicorn_on_a_socket_handed_over_by_descriptor(tmp_path):
    """``uvicorn --fd N``: a socket manager bound it and passes it on (here an AF_UNIX one)."""
    (tmp_path / "app.py").write_text(textwrap.dedent(STARLETTE_APP))
    where = str(tmp_path / "fd.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(where)
    listener.listen(128)
    fd = listener.fileno()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--fd", str(fd), "app:app"], cwd=str(tmp_path),
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=clean_env(),
                            pass_fds=[fd], **OWN_GROUP)
    log.close()
    listener.close()
    try:
        deadline = time.monotonic() + 20
        while _get("/__ready__", where, timeout=1.0)[0] != 200 and time.monotonic() < deadline:
            assert proc.poll() is None, server_log(tmp_path)
            time.sleep(0.05)
        _check_asgi(proc, where, tmp_path)
        pids = _server_and_children(proc.pid)
    finally:
        assert stop_server(proc, signal.SIGTERM) in (0, -signal.SIGTERM), server_log(tmp_path)
    assert _gone(pids)


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_gunicorn_on_a_unix_socket(tmp_path, mode):
    (tmp_path / "app.py").write_text(textwrap.dedent(FLASK_APP))
    where = str(tmp_path / "g.sock")
    proc = _start([sys.executable, "-m", "gunicorn", "--bind", f"unix:{where}", "app:app"], tmp_path, where,
                  MODE=mode)
    try:
        status, first = _get("/count", where)
        worker = first["pid"]
        status, body = _get("/crash", where)
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert _get("/count", where) == (200, {"pid": worker, "served": 2 if mode == "transaction" else 1})
        assert [_get("/crash", where)[0] for _ in range(2)] == [500, 503]
        assert _get("/hang", where)[0] == 500
        assert _get("/count", where)[1]["pid"] == worker
        proc.send_signal(signal.SIGHUP)                       # a graceful reload
        deadline = time.monotonic() + 10
        while _get("/count", where)[1]["pid"] == worker and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
        pids = _server_and_children(proc.pid)
    finally:
        assert stop_server(proc, signal.SIGTERM) == 0, server_log(tmp_path)
    assert _gone(pids)
    assert not os.path.exists(where)
