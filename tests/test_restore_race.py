"""Invariant 1 under a restore: the process that calls tlongjmp never runs program code again.

The shepherd once closed the caller's channel before killing it; the caller, blocked in tlongjmp,
could see EOF first and raise ForkpointError into program code while the restored copy ran.
"""
from __future__ import annotations

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(60)


def test_tlongjmp_caller_never_returns_into_program_code(tmp_path):
    r = run_py("""
    import os
    import forkpoint as fp
    jumps = fp.persist_int("jumps")
    n = fp.tsetjmp()
    if jumps.add() <= 200:
        try:
            fp.tlongjmp(n)
        except BaseException as e:
            print("killed process ran program code:", repr(e), flush=True)
            os._exit(0)
    print("done", jumps.value, flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["done 201"], r.stdout
    assert "Traceback" not in r.stderr, r.stderr
