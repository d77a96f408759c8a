"""@checkpointed: transactional request handling, and a server loop that restarts warm."""
from __future__ import annotations

import signal

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time, ctypes, socket, json
    import forkpoint as fp
"""


def test_failed_calls_roll_back_and_raise_recovered(tmp_path):
    r = run_py(HEADER + """
    store = {"a": 1}
    served = fp.persist_int("served")

    @fp.checkpointed(timeout=0.3, rollback_on_exception=True)
    def handle(op):
        served.add()
        store["dirty"] = op                    # every failed call leaves this behind...
        if op == "segv":
            ctypes.string_at(0)
        if op == "abort":
            os.abort()
        if op == "hang":
            while True:
                pass
        if op == "raise":
            raise KeyError("no such user")
        store[op] = len(store)
        return "ok"

    for op in ["put1", "segv", "abort", "hang", "raise", "put2"]:
        try:
            print(op, handle(op), sorted(store), flush=True)
        except fp.Recovered as e:
            print(op, "recovered", e.signal, e.reason.split(";")[0], e.attempts, e.to_state > e.from_state - 1,
                  e.exc_type, e.exc_message, "Traceback" in (e.traceback or "Traceback"),
                  e.recovery_seconds >= 0, sorted(store), flush=True)
    print("served", served.value, "checkpoints", [c.id for c in fp.checkpoints()])
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "put1 ok ['a', 'dirty', 'put1']"
    assert lines[1] == f"segv recovered {int(signal.SIGSEGV)} killed by SIGSEGV 1 True None None True True ['a', 'dirty', 'put1']"
    assert lines[2] == f"abort recovered {int(signal.SIGABRT)} killed by SIGABRT 1 True None None True True ['a', 'dirty', 'put1']"
    assert lines[3] == f"hang recovered {int(signal.SIGALRM)} timeout 1 True None None True True ['a', 'dirty', 'put1']"
    assert lines[4] == "raise recovered 0 exception: KeyError 1 True KeyError 'no such user' True True ['a', 'dirty', 'put1']"
    assert lines[5] == "put2 ok ['a', 'dirty', 'put1', 'put2']"
    # persist() survived every rollback; committed calls left no checkpoint behind
    assert lines[6] == "served 6 checkpoints []"


def test_on_recover_answers_the_client_on_a_socket_open_at_entry(tmp_path):
    r = run_py(HEADER + """
    a, b = socket.socketpair()

    def answer(args, kwargs, info):
        args[0].sendall(f"error: {info.reason}".encode())
        return "answered"

    @fp.checkpointed(on_recover=answer)
    def handle(conn, op):
        if op == "segv":
            ctypes.string_at(0)
        conn.sendall(b"done")
        return "ok"

    print(handle(a, "segv"), b.recv(100).decode())
    print(handle(a, "fine"), b.recv(100).decode())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["answered error: killed by SIGSEGV", "ok done"]


def test_poisoned_key_is_quarantined(tmp_path):
    r = run_py(HEADER + """
    @fp.checkpointed(key=lambda req: req["id"], quarantine_after=2)
    def handle(req):
        if req["poison"]:
            ctypes.string_at(0)
        return "served " + req["id"]

    for req in [{"id": "r1", "poison": False}, {"id": "bad", "poison": True},
                {"id": "bad", "poison": True}, {"id": "bad", "poison": True}, {"id": "r2", "poison": False}]:
        try:
            print(handle(req))
        except fp.Recovered as e:
            print("recovered", req["id"], e.attempts)
        except fp.Quarantined as e:
            print("quarantined", e.key)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["served r1", "recovered bad 1", "recovered bad 1", "quarantined bad",
                                     "served r2"]


def test_server_loop_restarts_warm(tmp_path):
    r = run_py(HEADER + """
    fp.configure(max_checkpoints=4)
    cache = {i: i * i for i in range(100000)}          # expensive warm-up, done once
    rounds = fp.persist_int("rounds")

    @fp.checkpointed
    def serve():
        rounds.add()
        print("serving, round", rounds.value, "warm", len(cache), flush=True)
        cache.clear()                                  # the crash corrupts the warm state...
        if rounds.value < 3:
            ctypes.string_at(0)
        return "done"

    print(serve(), "pid", os.getpid() == fp.shepherd_pid())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["serving, round 1 warm 100000", "serving, round 2 warm 100000",
                                     "serving, round 3 warm 100000", "done pid True"]


def test_exceptions_propagate_unless_asked_to_roll_back(tmp_path):
    r = run_py(HEADER + """
    state = []
    @fp.checkpointed
    def handle(x):
        state.append(x)
        raise ValueError("bad input")
    try:
        handle(1)
    except ValueError as e:
        print("raised", e, state, [c.id for c in fp.checkpoints()])
    try:
        fp.checkpointed(timeout=0)
    except ValueError as e:
        print("refused:", e)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["raised bad input [1] []",
                                     "refused: timeout must be a positive number of seconds, got 0"]
