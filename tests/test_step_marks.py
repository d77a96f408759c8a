"""A protected request's key and deadline go into the arena in one call (``Arena.enter_step``), the
per-request path of the WSGI and ASGI wrappers. Invariant protected: what the shepherd reads during
the step is exactly what the general path (``set_processing`` and ``watchdog.Deadline``) would have
written, and an enclosing input or deadline is never overwritten: the fast path refuses and the
caller nests as before. Run in a subprocess on a real arena."""
from __future__ import annotations

import json

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(60)

SCENARIO = r"""
import json, time
from forkpoint import arena as A

ar = A.Arena.create(2 << 20)
out = {}
rec = A.processing_record("GET /img?id=7")
before = time.monotonic()
out["entered"] = ar.enter_step(rec, 10.0, 3)
at, to = ar.watchdog()
out["key"] = ar.processing()
out["deadline_ok"] = before + 10.0 <= at <= time.monotonic() + 10.0
out["target"] = to
out["handled"] = ar.deadline()[2]
ar.leave_step()
out["after"] = [ar.processing(), ar.watchdog()]

out["no_deadline"] = ar.enter_step(rec, 0.0, 3)
out["no_deadline_read"] = [ar.processing(), ar.watchdog()]
ar.leave_step()

ar.set_processing("outer input")
out["refused_under_input"] = ar.enter_step(rec, 10.0, 3)
out["outer_kept"] = [ar.processing(), ar.watchdog()]
ar.set_processing(None)

ar.set_watchdog(1234.5, 2)
out["refused_under_deadline"] = ar.enter_step(rec, 10.0, 3)
out["outer_deadline_kept"] = [ar.processing(), list(ar.watchdog())]
ar.set_watchdog(None)

ar.set_alarm(time.monotonic() + 5.0, 4)     # a watchdog() block's: a record of its own
out["entered_in_block"] = ar.enter_step(rec, 10.0, 3)
out["earliest_in_block"] = ar.deadline()[1:]
ar.leave_step()
out["block_kept"] = ar.deadline()[1:]
print(json.dumps(out))
"""


def test_one_call_writes_what_the_general_path_writes_and_never_overwrites_an_enclosing_one(tmp_path):
    r = run_py(SCENARIO, tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["entered"] is True
    assert out["key"] == "GET /img?id=7"
    assert out["deadline_ok"] and out["target"] == 3
    assert out["handled"] is False           # a protected call's own deadline: the timeout itself
    assert out["after"] == [None, None]
    assert out["no_deadline"] is True and out["no_deadline_read"] == ["GET /img?id=7", None]
    assert out["refused_under_input"] is False and out["outer_kept"] == ["outer input", None]
    assert out["refused_under_deadline"] is False
    assert out["outer_deadline_kept"] == [None, [1234.5, 2]]
    # A watchdog() block's deadline neither refuses the step nor is touched by it: the shepherd
    # reads the earliest of both (the block's, 5 s away), the step's gone, the block's stays.
    assert out["entered_in_block"] is True
    assert out["earliest_in_block"] == [4, True] and out["block_kept"] == [4, True]
