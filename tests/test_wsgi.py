"""forkpoint.wsgi.protect under real gunicorn and Flask: what a client sees, in both modes.

Each scenario runs ``gunicorn app:app`` exactly as a user would (sync workers, no hook, no special
worker class), drives it with a real HTTP client, and where it makes sense compares with the same
app without forkpoint (FORKPOINT_OFF=1). Crashes are real segfaults (``ctypes.string_at(0)``),
hangs are real endless loops.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    check_default_key,
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

pytestmark = pytest.mark.timeout(120)

FLASK_APP = """
    import ctypes, json, os, re, time
    from flask import Flask
    import forkpoint, forkpoint._serving, forkpoint.wsgi

    flask_app = Flask(__name__)
    state = {"served": 0}

    @flask_app.route("/__ready__")
    def ready():
        return "ready"

    @flask_app.route("/count")
    def count():
        state["served"] += 1
        return {"pid": os.getpid(), "served": state["served"]}

    @flask_app.route("/crash")
    def crash():
        state["served"] += 1000            # a change the failed request must not leave behind
        ctypes.string_at(0)

    @flask_app.route("/raise")
    def raising():
        state["served"] += 1000            # a change, then an exception Flask answers itself
        raise RuntimeError("corrupted, then raised")

    if os.environ.get("PROPAGATE"):
        flask_app.config["PROPAGATE_EXCEPTIONS"] = True

    @flask_app.route("/slow-crash")
    def slow_crash():                      # time for the test to do something while it is in flight
        state["served"] += 1000
        time.sleep(1.0)
        ctypes.string_at(0)

    @flask_app.route("/hang")
    def hang():
        state["served"] += 1000
        while True:
            pass

    @flask_app.route("/stuck")
    def stuck():                           # stuck in C: no Python code runs until it returns
        re.match(r"(a+)+$", "a" * 64 + "!")
        return "never"

    @flask_app.route("/wait")
    def wait():                            # the children the application can wait for
        try:
            return {"wait": list(os.waitpid(-1, os.WNOHANG))}
        except ChildProcessError:
            return {"wait": "no children"}

    @forkpoint.checkpointed
    def risky(n):
        if n == 1:
            ctypes.string_at(0)
        return n

    @flask_app.route("/inner/<int:n>")
    def inner(n):                          # a transaction of its own inside the request
        try:
            return {"inner": risky(n)}
        except forkpoint.Recovered:
            return {"inner": "recovered"}

    @flask_app.route("/inner-then-crash")
    def inner_then_crash():                # restored inside the request, then the worker fails
        try:
            risky(1)
        except forkpoint.Recovered:
            pass
        ctypes.string_at(0)

    if os.environ.get("EXTRA_FDS"):        # a worker with many descriptors open (numbers > 1024)
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = int(os.environ["EXTRA_FDS"]) + 256
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
        extra = [open(os.devnull) for _ in range(int(os.environ["EXTRA_FDS"]))]

    if os.environ.get("HOLD_LOCK"):        # a POSIX lock the worker holds for its whole life
        import fcntl
        held = open("app.lock", "w")
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)

    # Made at import: under --preload, in the master, before it forks its workers.
    hits = forkpoint.persist_int("hits") if os.environ.get("PERSIST_AT_IMPORT") else None

    @flask_app.route("/hits")
    def count_hits():
        return {"pid": os.getpid(), "hits": hits.add(), "restores": len(forkpoint.history())}

    MODE = os.environ.get("MODE", "transaction")
    TIMEOUT = float(os.environ.get("TIMEOUT", "2"))
    REFRESH = float(os.environ["REFRESH"]) if os.environ.get("REFRESH") else None
    if os.environ.get("FORKPOINT_PARK"):
        forkpoint._serving.USE_HOLDER = False   # park client sockets with SCM_RIGHTS, never a holder
    if os.environ.get("FORKPOINT_OFF"):
        app = flask_app
    else:
        app = forkpoint.wsgi.protect(flask_app, mode=MODE, timeout=TIMEOUT, refresh=REFRESH)
"""


def _gunicorn(tmp_path: Path, *args: str, **env: str):
    (tmp_path / "app.py").write_text(textwrap.dedent(FLASK_APP))
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", *args, "app:app"]
    return start_server(argv, tmp_path, port, **env), port


def _get(port: int, path: str = "/count") -> tuple[int, dict | str]:
    status, body = http(port, path)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def _booted(tmp_path: Path) -> list[int]:
    """PIDs of the workers gunicorn booted, from its log."""
    return [int(line.rsplit(":", 1)[1]) for line in server_log(tmp_path).splitlines()
            if "Booting worker with pid:" in line]


def _forkpoint_processes(pid: int) -> list[str]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if p.name().startswith("fp-"):
                out.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_a_crash_costs_one_request_not_the_worker(tmp_path, mode):
    """200s before and after; 500 for the crashing request; 503 once its key is quarantined; the
    state kept (transaction) or back at the checkpoint (restart); one worker, one PID."""
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE=mode)
    try:
        before = [_get(port) for _ in range(3)]
        assert [s for s, _ in before] == [200] * 3, before
        pid = before[0][1]["pid"]
        assert [b["served"] for _, b in before] == [1, 2, 3]

        status, body = _get(port, "/crash")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        status, after = _get(port)
        assert status == 200 and after["pid"] == pid
        # transaction: every change of the failed request undone, the others kept;
        # restart: the worker is back at its checkpoint, taken before it served
        assert after["served"] == (4 if mode == "transaction" else 1), after

        assert _get(port, "/crash")[0] == 500              # the second failure quarantines the key
        status, body = _get(port, "/crash")
        assert status == 503 and "quarantined" in body, (status, body)
        status, last = _get(port)
        assert status == 200 and last["pid"] == pid
        assert _booted(tmp_path) == [pid], server_log(tmp_path)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


def test_restart_mode_crashes_of_different_requests_between_served_ones_never_end_the_worker(tmp_path):
    """Invariant: a worker that serves between its crashes is not in a crash loop. Seven different
    poisoned requests within a minute, each after a request served: each answered 500 by the same
    worker. The recovery budget (5 within 60 s) used to count them together and let the sixth end
    the worker: gunicorn then started a cold one."""
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="restart")
    try:
        pids = set()
        for i in range(7):
            status, body = _get(port)
            assert status == 200, (i, status, body)
            pids.add(body["pid"])
            status, body = _get(port, f"/crash?n={i}")
            assert status == 500 and "rolled back" in body, (i, status, body, server_log(tmp_path))
        assert len(pids) == 1 and _booted(tmp_path) == list(pids), server_log(tmp_path)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


QUEUE_LOGGING_WSGI = """
    import ctypes, logging, logging.handlers, os, queue, sys
    import forkpoint.wsgi

    # Logging that does not block the request: records go through a queue to a QueueListener's
    # thread (dictConfig's "queue_handler" sets up the same).
    records = queue.Queue(-1)
    logging.handlers.QueueListener(records, logging.StreamHandler(sys.stderr)).start()
    applog = logging.getLogger("app")
    applog.addHandler(logging.handlers.QueueHandler(records))
    applog.setLevel(logging.INFO)
    state = {"served": 0}

    def raw(environ, start_response):
        if environ["PATH_INFO"] == "/crash":
            ctypes.string_at(0)
        state["served"] += 1
        applog.info("served %d in %d", state["served"], os.getpid())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(state["served"]).encode()]

    app = forkpoint.wsgi.protect(raw, mode=os.environ["MODE"])
"""


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_a_logging_queue_listener_does_not_refuse_the_workers_checkpoints(tmp_path, mode):
    """A logging QueueListener's thread made every checkpoint refuse (``ThreadsAlive``): every
    request was answered 500. The checkpoint stops it and starts it again, in the worker that goes
    on and in every process restored there, which logs through it."""
    (tmp_path / "app.py").write_text(textwrap.dedent(QUEUE_LOGGING_WSGI))
    port = free_port()
    proc = start_server([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "app:app"], tmp_path,
                        port, MODE=mode)
    try:
        status, first = http(port, "/a")        # (after start_server's own requests)
        assert status == 200, server_log(tmp_path)
        status, body = http(port, "/crash")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        status, body = http(port, "/b")
        # transaction: the crash undone, the rest kept; restart: back before the first request
        assert status == 200 and int(body) == (int(first) + 1 if mode == "transaction" else 1), \
            (body, server_log(tmp_path))
        worker = _booted(tmp_path)
        assert len(worker) == 1, server_log(tmp_path)
        assert wait_for(lambda: f"served {body} in {worker[0]}" in server_log(tmp_path), timeout=5), \
            server_log(tmp_path)
        assert "ThreadsAlive" not in server_log(tmp_path)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


LIBRARY_THREAD_WSGI = """
    import ctypes, os, threading, time
    import forkpoint.wsgi

    # A library's background thread, as Sentry's SDK starts two at its first event (its worker and
    # its health monitor): here at the first request, or at import for SINCE_IMPORT seconds.
    state = {"served": 0}
    if os.environ.get("SINCE_IMPORT"):
        threading.Thread(target=time.sleep, args=(float(os.environ["SINCE_IMPORT"]),),
                         name="lib-worker", daemon=True).start()

    def raw(environ, start_response):
        if environ["PATH_INFO"] == "/crash":
            ctypes.string_at(0)
        state["served"] += 1
        if state["served"] == 1 and not os.environ.get("SINCE_IMPORT"):
            threading.Thread(target=threading.Event().wait, name="lib-worker", daemon=True).start()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d %d" % (state["served"], os.getpid())]

    app = forkpoint.wsgi.protect(raw, mode=os.environ["MODE"])
"""


def test_a_library_thread_leaves_transaction_mode_serving_unprotected_not_failing(tmp_path):
    """Invariant: forkpoint never turns a working application into one that fails. A library's
    thread (Sentry's SDK starts two at its first event) makes a checkpoint impossible: every
    request after it was answered 500 (``ThreadsAlive``). Each now runs as without forkpoint,
    said once in the log; a crash then ends the worker, as without forkpoint."""
    (tmp_path / "app.py").write_text(textwrap.dedent(LIBRARY_THREAD_WSGI))
    port = free_port()
    proc = start_server([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "app:app"], tmp_path,
                        port, MODE="transaction")
    try:
        statuses = [http(port, "/")[0] for _ in range(4)]
        assert statuses == [200] * 4, (statuses, server_log(tmp_path))
        assert server_log(tmp_path).count("runs without a checkpoint") == 1, server_log(tmp_path)
        assert http(port, "/crash")[0] != 200
        assert wait_for(lambda: len(_booted(tmp_path)) == 2, timeout=10), server_log(tmp_path)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


REDISPATCH_WSGI = """
    import os, threading
    import forkpoint.wsgi

    # A library's thread from the first request on (Sentry's SDK), and a middleware that calls the
    # protected application again with a copy of the environ (an error document, an internal
    # redirect), or a protected sub-application nested in a protected one.
    state = {"served": 0}

    def raw(environ, start_response):
        state["served"] += 1
        if state["served"] == 1:
            threading.Thread(target=threading.Event().wait, name="lib-worker", daemon=True).start()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % state["served"]]

    inner = forkpoint.wsgi.protect(raw)

    def redispatch(environ, start_response):
        b"".join(inner(environ, lambda *a: None))
        again = dict(environ, PATH_INFO="/again")
        return inner(again, start_response)

    app = forkpoint.wsgi.protect(inner) if os.environ["HOW"] == "nested" else redispatch
"""


@pytest.mark.parametrize("how", ["nested", "copy"])
def test_a_library_thread_leaves_a_reused_environ_or_nested_protection_serving(tmp_path, how):
    """The mark that the application was called (so that a ThreadsAlive is its own) belongs to the
    call: kept in the environ, a copy of it or a protected application nested in a protected one
    took the next checkpoint's refusal for the application's, and every request was answered 500."""
    (tmp_path / "app.py").write_text(textwrap.dedent(REDISPATCH_WSGI))
    port = free_port()
    proc = start_server([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "app:app"], tmp_path,
                        port, HOW=how)
    try:
        statuses = [http(port, "/")[0] for _ in range(4)]
        assert statuses == [200] * 4, (statuses, server_log(tmp_path))
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


def test_a_put_off_restart_checkpoint_does_not_merge_the_policy_or_freeze_again_each_request(tmp_path):
    """forkpoint started (as ThreadsAlive's advice says: before threads), then a library's thread:
    restart mode's checkpoint is put off at every request. Each attempt merged the recovery policy
    again (a round trip to the shepherd, one more policy kept for the worker's life) and froze the
    heap again (the garbage of the requests before never collected)."""
    r = run_py("""
        import gc, threading
        import forkpoint, forkpoint.snapshots, forkpoint.wsgi
        forkpoint.start()
        threading.Thread(target=threading.Event().wait, name="lib-worker", daemon=True).start()

        def raw(environ, start_response):
            start_response("200 OK", [])
            return [b"ok"]

        app = forkpoint.wsgi.protect(raw, mode="restart")
        app({"PATH_INFO": "/"}, lambda *a: None)
        policies, frozen = len(forkpoint.snapshots._rt.policies), gc.get_freeze_count()
        junk = []
        for _ in range(50):
            cycle = [object() for _ in range(20)]
            cycle.append(cycle)                 # cyclic garbage of the request
            del cycle
            assert b"".join(app({"PATH_INFO": "/"}, lambda *a: None)) == b"ok"
        print(len(forkpoint.snapshots._rt.policies) - policies, gc.get_freeze_count() - frozen)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0"], (r.stdout, r.stderr)


def test_a_library_thread_at_startup_puts_the_restart_checkpoint_off_until_it_ends(tmp_path):
    """A thread alive at the first request (a library's, for 1.5 s here): the request is served
    unprotected (it was answered 500, and each after it until the thread ended), and the worker's
    checkpoint is taken at the first request after the thread ended, which a crash then restores."""
    (tmp_path / "app.py").write_text(textwrap.dedent(LIBRARY_THREAD_WSGI))
    port = free_port()
    proc = start_server([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "app:app"], tmp_path,
                        port, MODE="restart", SINCE_IMPORT="1.5")
    try:
        status, body = http(port, "/")
        assert status == 200, (status, body, server_log(tmp_path))
        assert "put off to the next request" in server_log(tmp_path)
        time.sleep(1.6)
        status, before = http(port, "/")              # the checkpoint, before this request
        assert status == 200, server_log(tmp_path)
        assert http(port, "/crash")[0] == 500
        status, after = http(port, "/")
        assert status == 200 and after.split()[1] == before.split()[1], (before, after)
        assert int(after.split()[0]) == int(before.split()[0]), (before, after)
        assert len(_booted(tmp_path)) == 1, server_log(tmp_path)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


@pytest.mark.parametrize("propagate", ["", "1"], ids=["flask-default", "propagate"])
def test_a_views_exception_is_undone_only_if_flask_lets_it_escape_and_the_log_says_so(tmp_path, propagate):
    """Flask answers a view's exception with a 500 of its own unless ``PROPAGATE_EXCEPTIONS``:
    transaction mode never sees it and commits the view's changes, as Flask keeps them without
    forkpoint. The first request logs a warning that says how to let it escape; with the setting
    the change is undone."""
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="transaction", PROPAGATE=propagate)
    try:
        assert _get(port)[1]["served"] == 1
        status, body = _get(port, "/raise")
        assert status == 500, (status, body)
        log = server_log(tmp_path)
        if propagate:
            assert "rolled back" in body, body
            assert _get(port)[1]["served"] == 2                 # undone
            assert "PROPAGATE_EXCEPTIONS" not in log, log
        else:
            assert _get(port)[1]["served"] == 1002              # kept, as Flask keeps it
            assert log.count("app.config['PROPAGATE_EXCEPTIONS'] = True") == 1, log
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


def _lock_free(path: Path) -> bool:
    """Whether another process (this one) could take the POSIX lock ``path``'s owner holds."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.lockf(f, fcntl.LOCK_UN)
        return True


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_a_worker_keeps_its_posix_lock_through_crashes(tmp_path, mode):
    """Invariant: a lock the application took when it was loaded (a POSIX lock, as SQLite's or
    a PID file's) stays the worker's through the start of forkpoint, every checkpoint and every
    restore, as in a worker without forkpoint: a second process can never take it meanwhile.
    In restart mode the dead worker's lock lives on in the holder of its descriptors, which lets
    go of it for the restored worker."""
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE=mode, HOLD_LOCK="1")
    try:
        pid = _get(port)[1]["pid"]
        assert not _lock_free(tmp_path / "app.lock")
        for i in range(3):
            status, body = _get(port, f"/crash?try={i}")
            assert status in (500, 503), (status, body, server_log(tmp_path))
            status, after = _get(port)
            assert status == 200 and after["pid"] == pid
            assert not _lock_free(tmp_path / "app.lock"), f"the lock was free after crash {i}"
        assert "gave up the lock" not in server_log(tmp_path)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []
    assert _lock_free(tmp_path / "app.lock")            # and it ends with the worker


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_the_default_key_is_method_path_and_query(tmp_path, mode):
    """Invariant: a quarantine refuses exactly the request that failed, named by its method, path
    and query: the same path with another query, or another method, still runs."""
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE=mode)
    try:
        check_default_key(port)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


@pytest.mark.parametrize("way", ["holder", "holder, 1100 descriptors", "park"])
def test_restart_mode_answers_the_failed_client_whichever_way_it_kept_the_socket(tmp_path, way):
    """Invariant: the client of a request that crashed the worker gets a 500 from the restored
    worker, crash after crash, whether a holder shares the worker's descriptor table (one per live
    worker, none left of a dead one; however many descriptors the worker has open: a select() on
    one above 1024 once killed the holder silently) or, where none can be made, the socket is
    parked."""
    env = {"park": {"FORKPOINT_PARK": "1"}, "holder, 1100 descriptors": {"EXTRA_FDS": "1100"}}.get(way, {})
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="restart", **env)
    want = 0 if way == "park" else 1
    try:
        pid = _get(port)[1]["pid"]
        for i in range(3):
            status, body = _get(port, f"/crash?try={i}")
            assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
            assert _get(port) == (200, {"pid": pid, "served": 1})
            wait_for(lambda: len(holders_of(pid)) == want, timeout=10)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


def test_a_holder_killed_from_outside_costs_its_clients_not_the_rescue_slots(tmp_path):
    """Invariant: a holder killed from outside (the OOM killer, a stray kill) while a request is
    in flight costs that request's client its 500 when the worker then fails (the socket closes
    with the table), never a rescue slot: the restored worker frees the slots it would have handed
    to that holder, and the next failure is answered 500 again. With two slots, two such losses
    used to leave none."""
    from concurrent.futures import ThreadPoolExecutor

    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="restart")
    try:
        pid = _get(port)[1]["pid"]
        for i in range(3):
            wait_for(lambda: len(holders_of(pid)) == 1, timeout=10)
            with ThreadPoolExecutor(1) as pool:
                failing = pool.submit(_get, port, f"/slow-crash?lost={i}")
                time.sleep(0.4)                                  # in flight: its slot is taken
                os.kill(holders_of(pid)[0], signal.SIGKILL)
                wait_for(lambda: not holders_of(pid), timeout=10)  # reaped by the shepherd
                status, body = failing.result(timeout=20)
            assert status == 0, (status, body)                  # closed with the table
            assert _get(port) == (200, {"pid": pid, "served": 1})
        wait_for(lambda: len(holders_of(pid)) == 1, timeout=10)
        status, body = _get(port, "/crash?kept=1")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert _get(port) == (200, {"pid": pid, "served": 1})
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


def test_a_holder_killed_while_its_worker_lives_is_replaced_at_the_next_request(tmp_path):
    """Invariant: a holder killed while its worker is idle (the OOM killer weighs it by the
    worker's memory, which it maps) is replaced at the worker's next request, so the worker's next
    failure is answered 500 again, not only the failures after its next restore."""
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="restart")
    try:
        pid = _get(port)[1]["pid"]
        wait_for(lambda: len(holders_of(pid)) == 1, timeout=10)
        [killed] = holders_of(pid)
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: not holders_of(pid), timeout=10)          # reaped (and counted) by the shepherd

        def replaced() -> bool:                                  # a request makes the new holder
            status, body = _get(port)
            assert status == 200 and body["pid"] == pid, (status, body)
            return len(holders_of(pid)) == 1

        wait_for(replaced, timeout=10)
        assert holders_of(pid) != [killed]
        status, body = _get(port, "/crash?after=kill")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert _get(port) == (200, {"pid": pid, "served": 1})
        assert "holder of this worker's descriptors was killed; a new one replaces it" in server_log(tmp_path)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


def test_a_request_restored_inside_itself_is_answered_by_its_own_code(tmp_path):
    """Invariant: only a restore to the worker checkpoint answers a client 500. A @checkpointed
    call inside a request that crashes is rolled back to its own checkpoint, inside the request:
    the client gets the handler's answer, and the connection ends as soon as it is answered (the
    dead process's holder lets the socket go), not when a holder gives up."""
    import socket

    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="restart")
    try:
        pid = _get(port)[1]["pid"]
        assert _get(port, "/inner/2") == (200, {"inner": 2})
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /inner/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while chunk := c.recv(65536):        # until EOF; a socket.timeout fails the test
                got += chunk
        assert got.startswith(b"HTTP/1.1 200") and b'"recovered"' in got, got
        assert _get(port) == (200, {"pid": pid, "served": 2})      # no restore of the worker
        wait_for(lambda: len(holders_of(pid)) == 1, timeout=10)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


def test_a_request_restored_inside_itself_then_failing_is_answered_500(tmp_path):
    """The process restored inside a request (a @checkpointed call in it) goes on with the slot
    the dead process recorded; when it fails too, the restored worker hands that slot to the first
    process's holder, which has waited for it, and the client gets its 500."""
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="restart")
    try:
        pid = _get(port)[1]["pid"]
        status, body = _get(port, "/inner-then-crash")
        assert status == 500 and "rolled back" in body, (status, body, server_log(tmp_path))
        assert _get(port) == (200, {"pid": pid, "served": 1})
        wait_for(lambda: len(holders_of(pid)) == 1, timeout=10)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


@pytest.mark.parametrize("off", [False, True], ids=["forkpoint", "plain"])
def test_the_application_has_no_children_it_did_not_make(tmp_path, off):
    """The holder of a worker's descriptors is forkpoint's, not the application's: a wait for any
    child says there is none, as under plain gunicorn, before a crash, while the orphan scan after
    a restore runs, and once the restored worker has a holder of its own."""
    env = {"FORKPOINT_OFF": "1"} if off else {}
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="restart", **env)
    try:
        assert _get(port, "/wait") == (200, {"wait": "no children"})
        if not off:
            assert _get(port, "/crash")[0] == 500
            for _ in range(5):
                assert _get(port, "/wait") == (200, {"wait": "no children"})
                time.sleep(0.03)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


def test_without_forkpoint_the_crash_takes_the_worker(tmp_path):
    """The baseline: the same app under plain gunicorn loses the request, the worker and its state."""
    proc, port = _gunicorn(tmp_path, "-w", "1", FORKPOINT_OFF="1")
    try:
        status, first = _get(port)
        assert status == 200
        assert _get(port, "/crash")[0] == 0                # the connection dies with the worker
        status, after = wait_for(lambda: (r := _get(port))[0] == 200 and r, timeout=20)
        assert after["pid"] != first["pid"] and after["served"] == 1
        assert len(_booted(tmp_path)) == 2
    finally:
        stop_server(proc)


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_a_hang_is_cut_at_the_timeout(tmp_path, mode):
    """A Python hang and a hang inside C code (a regular expression) both end in a 500 at the
    timeout, and the worker serves on with the same PID."""
    proc, port = _gunicorn(tmp_path, "-w", "1", "--timeout", "30", MODE=mode, TIMEOUT="0.5")
    try:
        status, first = _get(port)
        for path in ("/hang", "/stuck"):
            status, body = _get(port, path)
            assert status == 500, (path, status, body, server_log(tmp_path))
        status, after = _get(port)
        assert status == 200 and after["pid"] == first["pid"]
        assert after["served"] == (2 if mode == "transaction" else 1)
        assert "timeout" in server_log(tmp_path)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


def test_restart_mode_refresh_keeps_what_the_worker_learned(tmp_path):
    """With refresh=, a new checkpoint is taken after a request once that much time has passed, so
    a crash rolls back to recent state, not to the worker's first request."""
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="restart", REFRESH="0.3")
    try:
        assert [_get(port)[1]["served"] for _ in range(2)] == [1, 2]
        time.sleep(0.4)
        assert _get(port)[1]["served"] == 3                # the checkpoint is taken again after this
        assert _get(port)[1]["served"] == 4
        assert _get(port, "/crash")[0] == 500
        status, after = _get(port)
        assert status == 200 and after["served"] == 4, after    # back to 3, then this request
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_two_workers(tmp_path, mode):
    proc, port = _gunicorn(tmp_path, "-w", "2", MODE=mode)
    try:
        pids = {_get(port)[1]["pid"] for _ in range(12)}
        assert _get(port, "/crash")[0] == 500
        pids |= {_get(port)[1]["pid"] for _ in range(12)}
        booted = _booted(tmp_path)
        assert len(booted) == 2 and pids <= set(booted), (pids, booted)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


def test_preloaded_workers_are_programs_of_their_own(tmp_path):
    """``gunicorn --preload`` imports the application in the master, and a ``persist()`` made at
    import made forkpoint's arena there, before the workers were forked: every worker then shared
    it. Their checkpoint ids interleaved, each saw the others' restores in its history, their
    counters were one, and a worker was once lost with another's crash. Each worker must be a
    program of its own, as the workers of a plain application are: it counts its own hits (kept
    through its own crash, as ``persist()`` memory is) and sees only its own restores."""
    proc, port = _gunicorn(tmp_path, "--preload", "-w", "2", MODE="restart", PERSIST_AT_IMPORT="1")
    served: dict[int, int] = {}

    def both_seen(restores: dict[int, int]) -> bool:
        status, body = _get(port, "/hits")
        assert status == 200, body
        pid = body["pid"]
        served[pid] = served.get(pid, 0) + 1
        assert body["hits"] == served[pid], (body, served)      # its own counter
        restores[pid] = body["restores"]
        return len(restores) == 2

    try:
        before: dict[int, int] = {}
        wait_for(lambda: both_seen(before), timeout=30, interval=0)
        assert list(before.values()) == [0, 0], before
        assert _get(port, "/crash")[0] == 500
        after: dict[int, int] = {}
        wait_for(lambda: both_seen(after), timeout=30, interval=0)
        assert sorted(after.values()) == [0, 1], after          # the crashed worker's restore only
        assert set(after) == set(before) == set(_booted(tmp_path)), (before, after)
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


@pytest.mark.parametrize("off", [False, True], ids=["forkpoint", "plain"])
def test_gunicorn_timeout_shorter_than_forkpoints_replaces_the_worker(tmp_path, off):
    """gunicorn's --timeout (2 s) fires before forkpoint's (30 s): its master sends SIGABRT to the
    worker, which exits, and a new worker is booted, as gunicorn documents. forkpoint forwards the
    SIGABRT and does not take a fault signal sent from outside for a crash."""
    env = {"FORKPOINT_OFF": "1"} if off else {}
    proc, port = _gunicorn(tmp_path, "-w", "1", "--timeout", "2", MODE="restart", TIMEOUT="30", **env)
    try:
        status, first = _get(port)
        status, body = _get(port, "/hang")
        assert status in (0, 500), (status, body)
        status, after = wait_for(lambda: (r := _get(port))[0] == 200 and r, timeout=20)
        assert after["pid"] != first["pid"], server_log(tmp_path)
        log = server_log(tmp_path)
        assert "WORKER TIMEOUT" in log and len(_booted(tmp_path)) == 2
        assert "recovered" not in log                      # a command from outside, not a crash
        return_status = status
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert return_status == 200
    assert _forkpoint_processes(proc.pid) == []


def _all_gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


def _tree(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def test_sighup_reload_then_sigterm_leave_nothing_behind(tmp_path):
    proc, port = _gunicorn(tmp_path, "-w", "1", MODE="restart")
    try:
        assert _get(port, "/crash")[0] == 500             # the worker has a checkpoint and a history
        old = _get(port)[1]["pid"]
        old_tree = _tree(old)
        assert any(psutil.Process(p).name().startswith("fp-") for p in old_tree)
        os.kill(proc.pid, signal.SIGHUP)                   # graceful reload: new workers, old ones go
        wait_for(lambda: _get(port)[1]["pid"] != old if _get(port)[0] == 200 else False, timeout=30)
        wait_for(lambda: _all_gone([old, *old_tree]), timeout=20)
        new = _get(port)[1]["pid"]
        assert _get(port, "/crash")[0] == 500 and _get(port)[1]["pid"] == new
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


def test_ctrl_c_in_a_terminal_stops_everything(tmp_path):
    """Ctrl-C typed at the terminal gunicorn runs in: the kernel signals the whole foreground
    group (master and live worker; snapshots sit in groups of their own)."""
    import pty

    (tmp_path / "app.py").write_text(textwrap.dedent(FLASK_APP))
    port = free_port()
    from conftest import clean_env

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(tmp_path)
        env = clean_env(MODE="restart")
        os.execve(sys.executable, [sys.executable, "-m", "gunicorn", "-w", "2", "-b",
                                   f"127.0.0.1:{port}", "app:app"], env)
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


@pytest.mark.parametrize("off", [False, True], ids=["forkpoint", "plain"])
def test_sigkill_of_the_master_leaves_no_worker_serving(tmp_path, off):
    """Plain gunicorn workers notice their master is gone (their parent changed) and exit; under
    forkpoint the worker's face PID is re-parented, the live process sees it through os.getppid(),
    and the worker, its checkpoint and spare all go."""
    env = {"FORKPOINT_OFF": "1"} if off else {}
    proc, port = _gunicorn(tmp_path, "-w", "1", "--timeout", "4", MODE="restart", **env)
    assert _get(port, "/crash")[0] == (0 if off else 500)
    status, body = wait_for(lambda: (r := _get(port))[0] == 200 and r, timeout=20)
    tree = _tree(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: _all_gone(tree), timeout=15)
    assert http(port, "/count", timeout=2)[0] == 0


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_gunicorn_threads_are_refused_with_a_message_that_says_so(tmp_path, mode):
    """gunicorn --threads N (its gthread worker) calls the application from a pool thread while
    the worker's main thread and the pool's other threads run: no checkpoint can copy them, so no
    request can be protected. Every request then fails (500), as before; what the user must get is
    a message that names the cause and the cure (not "call forkpoint.start() before starting
    threads", which cannot help here: the checkpoint is then refused from a non-main thread), the
    worker under its PID, and no forkpoint process left behind."""
    proc, port = _gunicorn(tmp_path, "-w", "1", "--threads", "4", MODE=mode)
    try:
        statuses = [_get(port)[0] for _ in range(3)]
        assert statuses == [500] * 3, (statuses, server_log(tmp_path))
        log = server_log(tmp_path)
        assert "Using worker: gthread" in log
        assert "--threads" in log and "main thread" in log, log[-3000:]
        assert "call forkpoint.start() before starting threads" not in log, log[-3000:]
        assert len(_booted(tmp_path)) == 1, log
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []


@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_gunicorn_gevent_is_refused_with_a_message_that_says_so(tmp_path, mode):
    """gunicorn -k gevent serves many requests at once in greenlets of one process; gevent's
    monkey-patching makes each look like a thread of its own, so the request is refused as from
    a thread (500, every request): the message must name greenlets and the cure, not --threads,
    which the command line does not have."""
    pytest.importorskip("gevent")
    proc, port = _gunicorn(tmp_path, "-w", "1", "-k", "gevent", MODE=mode)
    try:
        statuses = [_get(port)[0] for _ in range(3)]
        assert statuses == [500] * 3, (statuses, server_log(tmp_path))
        log = server_log(tmp_path)
        assert "Using worker: gevent" in log
        assert "gevent's greenlets" in log and "sync worker" in log, log[-3000:]
        assert "--threads" not in log, log[-3000:]
        assert len(_booted(tmp_path)) == 1, log
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)
    assert _forkpoint_processes(proc.pid) == []
