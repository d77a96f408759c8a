"""The two server examples, run as their docstrings say: Flask under gunicorn in transaction mode,
Starlette under uvicorn in restart mode."""
from __future__ import annotations

import json
import signal
import sys

import pytest
from conftest import ROOT, free_port, http, server_log, start_server, stop_server

EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.timeout(90)


def _json(port: int, path: str, method: str = "GET") -> tuple[int, dict | str]:
    status, body = http(port, path, method=method)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def test_flask_under_gunicorn_undoes_a_half_done_sale(tmp_path):
    port = free_port()
    proc = start_server([sys.executable, "-m", "gunicorn", "--chdir", str(EXAMPLES), "-b",
                         f"127.0.0.1:{port}", "flask_gunicorn:app"], tmp_path, port)
    try:
        pid = _json(port, "/pid")[1]["pid"]
        assert _json(port, "/stock")[1] == {"apples": 10, "pears": 4}
        assert _json(port, "/sell/apples/3", "POST")[1] == {"apples": 7, "pears": 4}
        status, body = _json(port, "/sell/pears/1?gift_wrap=glitter", "POST")
        assert status == 500, (status, body, server_log(tmp_path))
        assert _json(port, "/stock")[1] == {"apples": 7, "pears": 4}      # the pear is back
        assert _json(port, "/sell/pears/1?gift_wrap=glitter", "POST")[0] == 500
        assert _json(port, "/sell/pears/1?gift_wrap=glitter", "POST")[0] == 503
        assert _json(port, "/sell/pears/1", "POST")[1] == {"apples": 7, "pears": 3}
        assert _json(port, "/pid")[1]["pid"] == pid
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


def test_starlette_under_uvicorn_restarts_warm(tmp_path):
    port = free_port()
    proc = start_server([sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "--port", str(port),
                         "starlette_uvicorn:app"], tmp_path, port)
    try:
        status, first = _json(port, "/lookup/ab")
        assert status == 200 and first["matches"] > 0 and first["pid"] == proc.pid
        assert _json(port, "/lookup/a%00b")[0] == 500
        status, after = _json(port, "/lookup/abc")
        assert status == 200 and after["pid"] == proc.pid
        assert after["warm_ms"] == first["warm_ms"]                  # the same index, not rebuilt
        assert _json(port, "/lookup/a%00b")[0] == 500
        assert _json(port, "/lookup/a%00b")[0] == 503
        assert _json(port, "/lookup/ab")[1] == first
    finally:
        assert stop_server(proc, signal.SIGINT) == 0, server_log(tmp_path)
