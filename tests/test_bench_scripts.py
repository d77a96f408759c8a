"""Smoke tests of the benchmark scripts: each runs in --quick mode, writes its JSON, and leaves no process.

No timing is asserted (the machine is shared); only that every configuration ran, that the server
really took a checkpoint per request (or every 100), and that the figures are well formed.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, clean_env


def _run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=timeout, env=clean_env())


@pytest.mark.timeout(40)
def test_throughput_quick(tmp_path):
    out = tmp_path / "throughput.json"
    # the Python client: the fallback must work where wrk is not installed
    r = _run("throughput.py", "--quick", "--client", "python", "--seconds", "0.5", "--json", str(out),
             timeout=35)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| handler | checkpointing |" in r.stdout
    data = json.loads(out.read_text())
    assert data["client"] == "python" and data["leaked"] == []
    rows = {(row["handler"], row["mode"]): row for row in data["rows"]}
    assert set(rows) == {(h, m) for h in ("trivial", "1ms")
                         for m in ("none", "per-request", "per-request+spare", "every-100")}
    for (_, mode), row in rows.items():
        assert row["rps_median"] > 0 and row["ratio"] > 0
        requests, ckpts = row["requests"][0], row["checkpoints"][0]
        if mode == "none":
            assert ckpts == 0
        elif mode == "every-100":
            assert ckpts == (requests + 99) // 100
        else:
            assert ckpts == requests
    assert rows[("trivial", "none")]["ratio"] == 1.0


@pytest.mark.timeout(30)
def test_persist_bench_quick(tmp_path):
    out = tmp_path / "persist.json"
    r = _run("persist_bench.py", "--quick", "--dir", str(tmp_path), "--json", str(out), timeout=25)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| operation | size |" in r.stdout
    data = json.loads(out.read_text())
    whats = {(row["what"].split(" vs")[0].split(",")[0], row["size"]) for row in data["rows"]}
    for size in ("1 KB", "1 MB", "64 MB"):
        assert ("cache(IN)", size) in whats and ("cache(OUT)", size) in whats
    assert ("bulk slice write (warm)", "64 MB") in whats
    for row in data["rows"]:
        assert row["forkpoint"]["median"] > 0 and row["baseline"]["median"] > 0
    assert list(tmp_path.glob("*.pickle")) == []


@pytest.mark.timeout(60)
def test_crash_recovery_bench_small(tmp_path):
    out = tmp_path / "crash.json"
    r = _run("crash_recovery.py", "--sizes", "1", "--repeat", "2", "--json", str(out), timeout=50)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| heap | state | real segfault" in r.stdout
    rows = json.loads(out.read_text())
    assert [(row["mb"], row["state"]) for row in rows] == [(1, "clean"), (1, "dirty")]
    for row in rows:
        assert row["segfault"]["median"] > 0 and row["sigkill"]["median"] > 0


@pytest.mark.timeout(120)
def test_servers_quick(tmp_path):
    """benchmarks/servers.py with tiny settings: real gunicorn and uvicorn, plain and protected, the
    Python client (the fallback where wrk is missing), and the per-call table."""
    out = tmp_path / "servers.json"
    r = _run("servers.py", "--quick", "--client", "python", "--seconds", "0.5", "--handlers", "trivial",
             "--percall", "20", "--json", str(out), timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| server | handler | protection |" in r.stdout and "| call | us (median) |" in r.stdout
    data = json.loads(out.read_text())
    assert data["client"] == "python" and data["leaked"] == []
    rows = {(row["server"], row["mode"]): row for row in data["rows"]}
    assert set(rows) == {("gunicorn", "plain"), ("gunicorn", "restart"), ("gunicorn", "restart-defaults"),
                         ("gunicorn", "transaction"), ("uvicorn", "plain"), ("uvicorn", "restart"),
                         ("uvicorn", "restart-defaults")}
    for row in rows.values():
        assert row["rps_median"] > 0 and row["ratio"] > 0 and row["non_2xx"] == 0, row
    assert rows[("gunicorn", "plain")]["ratio"] == 1.0
    assert set(data["percall"]) >= {"@checkpointed", "@checkpointed(timeout=, key=)",
                                    "WSGI request, restart mode, timeout=", "ASGI request, protected"}


@pytest.mark.timeout(120)
def test_quarantine_bench_quick(tmp_path):
    out = tmp_path / "quarantine.json"
    r = _run("quarantine_bench.py", "--calls", "2000", "--rounds", "1", "--keys", "5", "--propagation", "2",
             "--json", str(out), timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    scopes = {"process", "host"} | ({"redis"} if "redis" in data["lookup"] else set())
    assert set(data["lookup"]) == scopes and set(data["propagation"]) == scopes - {"process"}
    assert data["lookup"]["process"]["lookup_ratio"] == 1.0
    for row in data["propagation"].values():
        assert row["n"] == 2 and row["max_ms"] < float("inf")      # every quarantine was seen
    assert "| scope | is_quarantined us |" in r.stdout
