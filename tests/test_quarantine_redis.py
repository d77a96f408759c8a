"""Issue 15: a quarantine shared across machines through a real Redis (Debian's redis-server).

Each test starts its own ``redis-server`` on a free port, with a temporary directory and no
persistence, and stops (and reaps) it at the end; it is killed, stopped and restarted for real.
Skipped, with the reason, where ``redis-server`` or the ``redis`` package is missing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import (
    Lines,
    clean_env,
    free_port,
    http,
    run_py,
    server_log,
    start_py,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

def cli(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forkpoint", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**env))


def report(pid: int) -> dict:
    r = cli("quarantine", "list", "--pid", str(pid), "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)
    return rep


def shared(pid: int, key: str) -> bool:
    """Whether program ``pid`` has ``key`` in its mirror of Redis (what its live process reads)."""
    return any(e["key"] == key and e["where"] == "redis" for e in report(pid)["quarantined"])


WSGI = """
    import ctypes, json, os
    import forkpoint as fp

    @fp.checkpointed(key=lambda path: path, quarantine_after=2)
    def view(path):
        if path.startswith("/poison"):
            ctypes.string_at(0)
        return {"pid": os.getpid(), "path": path}

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        status, body = "200 OK", json.dumps({"pid": os.getpid()}).encode()
        if path != "/__ready__":
            try:
                body = json.dumps(view(path)).encode()
            except fp.Recovered as e:
                status, body = "500 Internal Server Error", json.dumps({"pid": os.getpid(),
                                                                        "recovered": e.reason}).encode()
            except fp.Quarantined:
                status, body = "503 Service Unavailable", json.dumps({"pid": os.getpid()}).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
"""


def _gunicorn(tmp_path: Path, name: str, url: str, **env: str) -> tuple[subprocess.Popen[str], int, Path]:
    d = tmp_path / name
    d.mkdir()
    (d / "wsgiapp.py").write_text(textwrap.dedent(WSGI))
    port = free_port()
    env = {"FORKPOINT_QUARANTINE": url, "FORKPOINT_SERVICE": "api", "FORKPOINT_QUARANTINE_KEYS": "plain",
           **env}
    proc = start_server([sys.executable, "-m", "gunicorn", "-w", "1", "--timeout", "60", "-b",
                         f"127.0.0.1:{port}", "wsgiapp:app"], d, port, **env)
    return proc, port, d


def _worker(port: int) -> int:
    status, body = http(port, "/whoami")
    assert status == 200, body
    return json.loads(body)["pid"]


def test_two_gunicorn_servers_share_one_redis_quarantine(tmp_path, redis_server):
    a, pa, da = _gunicorn(tmp_path, "a", redis_server.url)
    b, pb, db = _gunicorn(tmp_path, "b", redis_server.url)
    try:
        wa, wb = _worker(pa), _worker(pb)
        assert [http(pa, "/poison")[0] for _ in range(2)] == [500, 500]        # two crashes on server A
        assert http(pa, "/poison")[0] == 503
        wait_for(lambda: shared(wb, "/poison"), timeout=20)                     # B's mirror has it
        status, body = http(pb, "/poison")                                       # B's first request
        assert status == 503, (body, server_log(db))
        assert "recovered" not in server_log(db)                                 # B never crashed
        assert http(pb, "/fine")[0] == 200
        # Failures count wherever they happened: one crash on each server quarantines on both.
        assert http(pa, "/poison-2")[0] == 500
        wait_for(lambda: any(f["key"] == "/poison-2" for f in report(wb)["failures"]), timeout=20)
        assert http(pb, "/poison-2")[0] == 500
        wait_for(lambda: shared(wa, "/poison-2") and shared(wb, "/poison-2"), timeout=20)
        assert http(pa, "/poison-2")[0] == 503 and http(pb, "/poison-2")[0] == 503
        # Every failure is listed with the host and worker that saw it; Redis holds digests, and the
        # key text only because this deployment asked for it (FORKPOINT_QUARANTINE_KEYS=plain).
        listing = cli("quarantine", "list", "--scope", redis_server.url, "--service", "api")
        assert listing.returncode == 0, listing.stderr
        host = os.uname().nodename
        assert f"on host {host} worker {wa}: SIGSEGV" in listing.stdout
        assert f"on host {host} worker {wb}: SIGSEGV" in listing.stdout, listing.stdout
        # an operator releases it once, for every server
        rel = cli("quarantine", "release", "/poison", "--scope", redis_server.url, "--service", "api")
        assert rel.returncode == 0 and "released" in rel.stdout, rel.stdout + rel.stderr
        wait_for(lambda: not shared(wb, "/poison") and not shared(wa, "/poison"), timeout=20)
        wait_for(lambda: all("/poison" != e["key"] for e in report(wa)["quarantined"]), timeout=20)
        assert http(pb, "/poison")[0] == 500                                     # it runs again
        after = cli("quarantine", "list", "--scope", redis_server.url, "--service", "api").stdout
        assert f"by operator uid {os.geteuid()}" in after, after
    finally:
        assert stop_server(a) == 0, server_log(da)
        assert stop_server(b) == 0, server_log(db)


def test_redis_holds_digests_not_requests_unless_asked(tmp_path, redis_server):
    r = run_py("""
    import ctypes, signal
    import forkpoint as fp
    fp.recover_on(signal.SIGSEGV, quarantine_after=1)
    fp.tsetjmp()
    try:
        with fp.processing("GET /account?card=4111111111111111"):
            ctypes.string_at(0)
    except fp.Quarantined:
        print("refused", flush=True)
    fp.quarantine("by hand: secret")
    import time
    while len(fp.quarantined()) < 2:
        time.sleep(0.01)
    """, tmp_path, FORKPOINT_QUARANTINE=redis_server.url, FORKPOINT_SERVICE="svc")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "refused"
    c = redis_server.client()
    wait_for(lambda: len(c.hgetall(next(k for k in c.keys("forkpoint:q:*:q")))) == 2, timeout=20)
    everything = b"".join(k + b"".join(c.dump(k) or b"" for _ in [0]) for k in c.keys("*"))
    assert b"4111111111111111" not in everything and b"secret" not in everything
    assert b"svc" in c.hget(next(iter(c.keys("forkpoint:service:*"))), "label")


def test_redis_killed_mid_run_then_restarted(tmp_path, redis_server):
    """Redis killed: every request is still answered, crashes are still recovered (and quarantined
    locally), one warning per program. Restarted (empty: no persistence): sharing resumes, and
    what was recorded meanwhile reaches the other server."""
    a, pa, da = _gunicorn(tmp_path, "a", redis_server.url)
    b, pb, db = _gunicorn(tmp_path, "b", redis_server.url)
    try:
        wa, wb = _worker(pa), _worker(pb)
        assert [http(pa, "/poison-1")[0] for _ in range(3)] == [500, 500, 503]
        wait_for(lambda: shared(wb, "/poison-1"), timeout=20)
        redis_server.kill()
        statuses = [http(pa, "/fine")[0] for _ in range(20)] + [http(pb, "/fine")[0] for _ in range(20)]
        assert statuses == [200] * 40
        assert [http(pb, "/poison-1")[0] for _ in range(3)] == [503] * 3        # B keeps its mirror
        assert [http(pa, "/poison-2")[0] for _ in range(3)] == [500, 500, 503]  # local quarantine
        assert [http(pa, "/fine")[0] for _ in range(5)] == [200] * 5
        for d in (da, db):
            wait_for(lambda d=d: "unavailable" in server_log(d), timeout=20)
        time.sleep(3.0)                 # several reconnect attempts fail meanwhile: still one warning
        assert server_log(da).count("unavailable") == 1, server_log(da)
        assert server_log(db).count("unavailable") == 1, server_log(db)
        assert not report(wa)["available"] and "unreachable" in report(wa)["error"]
        redis_server.start()            # same port, no data
        for d in (da, db):
            wait_for(lambda d=d: "available again" in server_log(d), timeout=30)
        wait_for(lambda: shared(wb, "/poison-2"), timeout=20)    # A's outage quarantine reached B
        assert http(pb, "/poison-2")[0] == 503
        wait_for(lambda: shared(wb, "/poison-1"), timeout=20)    # and what Redis lost was written again
        assert http(pb, "/poison-3")[0] == 500                   # new failures are shared again
        assert http(pa, "/poison-3")[0] == 500
        wait_for(lambda: shared(wa, "/poison-3") and shared(wb, "/poison-3"), timeout=20)
        assert http(pa, "/poison-3")[0] == 503
        assert server_log(da).count("unavailable") == 1 and server_log(da).count("available again") == 1
    finally:
        assert stop_server(a) == 0, server_log(da)
        assert stop_server(b) == 0, server_log(db)


def test_redis_slow_or_answering_garbage_never_delays_a_request(tmp_path, redis_server):
    """A stopped Redis (SIGSTOP: connections hang) and keys full of garbage: requests and crash
    recoveries go on, one warning for each outage, and it catches up when Redis answers again."""
    proc = start_py("""
    import ctypes, os, signal, sys, time
    import forkpoint as fp
    fp.recover_on(signal.SIGSEGV, quarantine_after=2)
    print("up", os.getpid(), flush=True)
    for line in sys.stdin:
        key = line.strip()
        fp.tsetjmp()
        try:
            with fp.processing(key):
                if key.startswith("poison"):
                    ctypes.string_at(0)
            print("served", key, flush=True)
        except fp.Quarantined:
            print("refused", key, flush=True)
    """, tmp_path, FORKPOINT_QUARANTINE=redis_server.url, FORKPOINT_SERVICE="svc")
    lines = Lines(proc)
    pid = int(lines.until("up").split()[1])

    def ask(key: str) -> str:
        proc.stdin.write(key + "\n")
        proc.stdin.flush()
        return lines.next(timeout=20)

    try:
        assert ask("a") == "served a"
        os.kill(redis_server.proc.pid, signal.SIGSTOP)                 # slow: it answers nothing
        assert [ask(k) for k in ("b", "poison-1", "c")] == ["served b", "refused poison-1", "served c"]
        wait_for(lambda: not report(pid)["available"], timeout=20)
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        wait_for(lambda: report(pid)["available"], timeout=30)
        wait_for(lambda: shared(pid, "poison-1"), timeout=20)          # caught up
        c = redis_server.client()
        qkey = next(iter(c.keys("forkpoint:q:*:q")))
        c.hset(qkey, "zz", b"\xff not json")
        c.hset(qkey, "0" * 32, b'{"since": "yesterday"}')
        c.lpush(qkey.replace(b":q", b":log"), b"[1,2]")
        assert [ask(k) for k in ("d", "poison-2", "e")] == ["served d", "refused poison-2", "served e"]
        wait_for(lambda: shared(pid, "poison-2"), timeout=20)
        wait_for(lambda: report(pid)["garbage"], timeout=20)       # seen, skipped, and said once
        assert report(pid)["available"]
        c.delete(qkey)
        c.set(qkey, b"not a hash")                                    # WRONGTYPE for every read
        assert [ask(k) for k in ("f", "poison-3", "g")] == ["served f", "refused poison-3", "served g"]
        wait_for(lambda: not report(pid)["available"], timeout=20)
        assert "answered garbage" in report(pid)["error"]
        c.delete(qkey)
        wait_for(lambda: report(pid)["available"], timeout=30)
        wait_for(lambda: shared(pid, "poison-3") and shared(pid, "poison-2"), timeout=20)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        proc.stdin.close()
        assert proc.wait(20) == 0
    err = proc.stderr.read()
    assert err.count("answered garbage") == 2, err          # the bad entries once, the wrong type once
    assert err.count("unavailable") == 2, err                 # the stop, the wrong type
    assert err.count("available again") == 2, err


def test_without_the_redis_package_the_program_keeps_its_own_quarantine(tmp_path):
    """The shepherd cannot import redis (an empty sys.path for it): one warning, and process scope."""
    r = run_py("""
    import ctypes, signal, sys
    import forkpoint as fp
    fp._runtime.runtime().quarantine_settings().sys_path[:] = ["/nonexistent"]
    fp.recover_on(signal.SIGSEGV, quarantine_after=2)
    for key in ["poison", "ok"]:
        fp.tsetjmp()
        try:
            with fp.processing(key):
                if key == "poison":
                    ctypes.string_at(0)
            print("served", key, flush=True)
        except fp.Quarantined:
            print("refused", key, flush=True)
    """, tmp_path, FORKPOINT_QUARANTINE="redis://127.0.0.1:1/0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["refused poison", "served ok"]
    assert r.stderr.count("unavailable") == 1 and "pip install 'forkpoint[redis]'" in r.stderr, r.stderr


def test_the_public_api_at_redis_scope(tmp_path, redis_server):
    """quarantine(), is_quarantined(), quarantined(), release() and processing() work at Redis scope,
    also before forkpoint started (they start it: only the shepherd talks to Redis), and reach
    another program of the service."""
    env = {"FORKPOINT_QUARANTINE": redis_server.url, "FORKPOINT_SERVICE": "svc"}
    first = start_py("""
    import os, sys, time
    import forkpoint as fp
    fp.quarantine("k1")                      # before any checkpoint
    fp.quarantine("k2")
    print(fp.is_quarantined("k1"), fp.quarantined(), flush=True)
    sys.stdin.readline()
    print("release", fp.release("k1"), fp.release("k1"), fp.is_quarantined("k1"), flush=True)
    try:
        with fp.processing("k2"):
            pass
    except fp.Quarantined as e:
        print("refused", e.key, flush=True)
    """, tmp_path, **env)
    lines = Lines(first)
    assert lines.next() == "True ['k1', 'k2']"
    second = start_py("""
    import sys, time
    import forkpoint as fp
    fp.start()
    while not (fp.is_quarantined("k1") and fp.is_quarantined("k2")):
        time.sleep(0.01)
    print("both", flush=True)
    sys.stdin.readline()
    while fp.is_quarantined("k1"):
        time.sleep(0.01)
    print("k1 released", fp.is_quarantined("k2"), flush=True)
    """, tmp_path, **env)
    other = Lines(second)
    try:
        assert other.next(timeout=20) == "both"
        first.stdin.write("\n")
        first.stdin.flush()
        assert lines.next() == "release True False False"
        assert lines.next() == "refused k2"
        second.stdin.write("\n")
        second.stdin.flush()
        assert other.next(timeout=20) == "k1 released True"
    finally:
        for p in (first, second):
            p.stdin.close()
            assert p.wait(20) == 0, p.stderr.read()


def test_quarantine_ttl_at_redis_scope_and_who_let_it_out(tmp_path, redis_server):
    r = run_py("""
    import time
    import forkpoint as fp
    fp.configure(quarantine_ttl=0.5)
    fp.quarantine("k")
    print(fp.is_quarantined("k"), flush=True)
    while fp.is_quarantined("k"):
        time.sleep(0.02)
    print("back", flush=True)
    """, tmp_path, FORKPOINT_QUARANTINE=redis_server.url, FORKPOINT_SERVICE="svc")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["True", "back"]
    def expired() -> bool:
        out = cli("quarantine", "list", "--scope", redis_server.url, "--service", "svc").stdout
        return "quarantined: none" in out and "expired (quarantine_ttl)" in out
    # Redis keeps the entry until a program's next read of the store removes it (and says so)
    keeper = start_py("""
    import sys, forkpoint as fp
    fp.start()
    print("up", flush=True)
    sys.stdin.readline()
    """, tmp_path, FORKPOINT_QUARANTINE=redis_server.url, FORKPOINT_SERVICE="svc")
    try:
        Lines(keeper).until("up")
        wait_for(expired, timeout=20)
    finally:
        keeper.stdin.close()
        assert keeper.wait(20) == 0


def test_cli_at_process_scope_asks_the_program(tmp_path):
    proc = start_py("""
    import ctypes, os, signal, sys
    import forkpoint as fp
    fp.recover_on(signal.SIGSEGV, quarantine_after=1)
    fp.tsetjmp()
    try:
        with fp.processing("bad"):
            ctypes.string_at(0)
    except fp.Quarantined:
        pass
    print("up", os.getpid(), flush=True)
    sys.stdin.readline()
    print(fp.quarantined(), flush=True)
    """, tmp_path)
    lines = Lines(proc)
    pid = lines.until("up").split()[1]
    try:
        refused = cli("quarantine", "list")
        assert refused.returncode == 2 and "pass --pid PID" in refused.stderr
        out = cli("quarantine", "list", "--pid", pid).stdout
        assert "(process, as program" in out and "'bad'" in out and "[local]" in out, out
        assert f"worker {pid}: SIGSEGV, killed by SIGSEGV" in out, out
        assert "released" in cli("quarantine", "release", "bad", "--pid", pid).stdout
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert lines.next() == "[]"
    finally:
        proc.stdin.close()
        assert proc.wait(20) == 0


PROTECTED = """
    import ctypes, json, os
    import forkpoint.wsgi

    def raw(environ, start_response):
        if environ["PATH_INFO"].startswith("/poison"):
            ctypes.string_at(0)
        body = json.dumps({"pid": os.getpid()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    app = forkpoint.wsgi.protect(raw, mode=os.environ["MODE"], quarantine_after=2)
"""


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_two_gunicorn_servers_with_wsgi_protect_share_one_redis_quarantine(tmp_path, redis_server, mode):
    servers = []
    try:
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            (d / "wsgiapp.py").write_text(textwrap.dedent(PROTECTED))
            port = free_port()
            proc = start_server([sys.executable, "-m", "gunicorn", "-w", "1", "--timeout", "60", "-b",
                                 f"127.0.0.1:{port}", "wsgiapp:app"], d, port, MODE=mode,
                                FORKPOINT_QUARANTINE=redis_server.url, FORKPOINT_SERVICE="api")
            servers.append((proc, port, d))
        (_, pa, _), (_, pb, db) = servers
        wb = _worker(pb)
        assert [http(pa, "/poison")[0] for _ in range(3)] == [500, 500, 503]
        wait_for(lambda: any(e["where"] == "redis" for e in report(wb)["quarantined"]), timeout=20)
        assert http(pb, "/poison")[0] == 503                   # B's first request with that key
        assert "recovered" not in server_log(db).lower()
        assert http(pb, "/fine")[0] == 200
    finally:
        for proc, _, d in servers:
            assert stop_server(proc) == 0, server_log(d)
