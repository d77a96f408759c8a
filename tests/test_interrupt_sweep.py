"""An interrupt (a signal handler that raises, such as Ctrl-C's KeyboardInterrupt) can land at any
point where CPython runs pending handlers: each function's start, each return from C code. For
every public call, tests/interrupt_sweep.py raises one at each such point in turn (through
sys.settrace, in a real program with its shepherd and snapshots) and checks that the program is
left as it would be had the call not been made or had it ended: no signal left blocked, no timer
or deadline left armed, no key left marked, no checkpoint of a protected call left current after
the call, no cache entry torn, nothing logged as damage, and a checkpoint that still restores.
Each place is tried at its first three passes in a call (a loop's later turns are the same code in
the same kind of state; tests/interrupt_tracer.py, FORKPOINT_SWEEP_REPEATS=0 for every pass).

Found by it (each fails here on the code before its fix):
- a Ctrl-C as a protected call's checkpoint unblocked signals, or as the call's commit began,
  left the call's checkpoint current: with ``timeout=``, the shepherd rolled the program back into
  the finished call at its deadline (re-running it);
- in a WSGI restart-mode request, a handler that raised in the bookkeeping before or after the
  application (a Ctrl-C, an application's own SIGALRM timeout) left the request's key marked and
  its deadline armed: the worker restored at the deadline and the key blamed, long after the
  request was answered;
- a Ctrl-C as a watchdog's cleanup began left its timer and hard deadline armed: a rollback
  "timeout" later into code that had moved on;
- in an ASGI request, a handler that raised as a step's cleanup began left the step marked (its
  key blamed, its deadline armed), one that raised as the request's own cleanup began left the
  request counted in flight (no checkpoint of the worker was taken after it), and in a step nested
  in a watchdog one that raised as the step's marks were made left the key marked;
- a handler that raised as a server wrapper's worker checkpoint gave the signals back after its
  fork left that checkpoint pinned and unknown to the wrapper, which served on from the one
  before; one that raised in the bookkeeping after it kept the replaced checkpoint: either way a
  checkpoint too many, pinned, for the worker's life;
- a handler that raised as a worker made the holder of its descriptor table lost that holder: it
  lived on unused, and the worker parked every client socket from then on;
- a Ctrl-C as cache(IN) placed a new buffer made the next store log the entry as damaged;
- a Ctrl-C during forkpoint's start leaked the arena's memfd (and the memory written to it), or the
  channel's socket pair.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env

SWEEP = Path(__file__).resolve().parent / "interrupt_sweep.py"
START = Path(__file__).resolve().parent / "interrupt_start.py"

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not (3, 11) <= sys.version_info[:2] <= (3, 13),
                       reason="models where CPython 3.11-3.13 run signal handlers (opcodes, exception table)"),
]

CALLS = ["tsetjmp", "tsetjmp_no_spare", "tlongjmp", "discard", "checkpoints", "checkpointed",
         "checkpointed_timeout_key", "watchdog", "wsgi_transaction", "wsgi_restart", "wsgi_restart_nested",
         "asgi", "asgi_nested", "asgi_refresh", "wsgi_refresh", "wsgi_renew", "processing", "quarantine", "cache",
         "recover_on"]


@pytest.mark.parametrize("call", CALLS)
def test_an_interrupt_at_any_point_of_a_call_leaves_the_program_consistent(call):
    r = subprocess.run([sys.executable, str(SWEEP), call], capture_output=True, text=True,
                       timeout=280, env=clean_env())
    lines = r.stdout.splitlines()
    assert r.returncode == 0, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    bad = [line for line in lines if line.startswith("point ")]
    assert not bad, "\n".join(bad[:20])
    name, points, _, nbad, _ = lines[-1].replace(":", "").split()
    assert (name, nbad) == (call, "0"), lines[-1]
    # A sweep that found no point would prove nothing: each call has at least its own entry, the
    # calls into the shepherd's channel and the mask, and the check after it.
    assert int(points) >= 20, lines


def _start(k: int) -> tuple[int, str]:
    r = subprocess.run([sys.executable, str(START), str(k)], capture_output=True, text=True,
                       timeout=30, env=clean_env())
    assert r.returncode == 0, (k, r.returncode, r.stdout, r.stderr[-2000:])
    return int(r.stdout.split()[1]), r.stdout.strip()


def test_an_interrupt_during_the_start_leaks_nothing_and_the_program_goes_on():
    """forkpoint's start makes the arena (and the quarantine table in it), the channel to the
    shepherd and the crash-report pipe, then forks the program off. Interrupted anywhere, the
    program must go on with its mask, start again at its next call and restore, with no descriptor
    (or memory) of the interrupted start left behind. Every point is one process (the start happens
    once), so about one in 6 is tried (each place at its first passes: 250 points on CPython 3.11
    and 3.13, 99 on 3.12), and each of the last 45 (the channel, the pipe, the fork)."""
    total, clean = _start(0)
    fds = clean.split("fds ")[1].split(",")[0]
    assert total >= 50, clean
    for k in sorted(set(range(1, total, 6)) | set(range(max(1, total - 45), total + 1))):
        _, out = _start(k)
        assert out.endswith(f"mask kept True, fds {fds}, restored 1"), (out, clean)
