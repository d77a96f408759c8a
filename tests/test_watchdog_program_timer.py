"""The program's own SIGALRM handler and timer, changed while watchdog() blocks are in force."""
from __future__ import annotations

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time
    import forkpoint as fp
    def wait_until(cond):                    # up to 5 s
        for _ in range(100):
            if cond():
                return True
            time.sleep(0.05)
        return False
"""


def test_a_handler_that_rearms_its_timer_keeps_ticking_inside_and_after_a_block(tmp_path):
    """Invariant: a handler that re-arms its one-shot timer (the classic heartbeat) goes on
    ticking inside a watchdog() block and after it. Called inside the block, its setitimer()
    was overwritten by the block's timer: it ticked once, then never again."""
    r = run_py(HEADER + """
    ticks = []
    def tick(signum, frame):
        ticks.append(1)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
    fp.tsetjmp()
    signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    with fp.watchdog(60):
        inside = wait_until(lambda: len(ticks) >= 3)
    n = len(ticks)
    after = wait_until(lambda: len(ticks) >= n + 3)
    signal.setitimer(signal.ITIMER_REAL, 0)
    print("inside", inside, "after", after, "restores", len(fp.history()))
    """, tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["inside True after True restores 0"]


def test_a_handler_that_rearms_a_later_timer_leaves_the_blocks_deadline_soft(tmp_path):
    """Invariant: the program's handler, run on time inside a block, cannot take the block's
    timer away: the block still rolls back by its SIGALRM handler at its deadline (reason
    "timeout"), not by the shepherd's kill at the hard deadline."""
    r = run_py(HEADER + """
    def on_alarm(signum, frame):
        signal.alarm(30)                     # its next check in 30 s
    fp.tsetjmp()
    if not fp.history():
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with fp.watchdog(0.5, hard_after=3):
            time.sleep(15)
    print("restored:", fp.history()[-1].reason)
    """, tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["restored: timeout"]


def test_a_handler_and_timer_the_program_sets_inside_a_block_outlive_it(tmp_path):
    """Invariant: a SIGALRM handler and timer the program sets inside a block (a job runner's
    timeout entered inside it) are the program's after the block: its end put back the handler
    and timer from before the block, so the timeout never came."""
    r = run_py(HEADER + """
    fired = []
    def on_alarm(signum, frame):
        fired.append(1)
    fp.tsetjmp()
    with fp.watchdog(60):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
    came = wait_until(lambda: fired)
    print("came", came, "handler kept", signal.getsignal(signal.SIGALRM) is on_alarm)
    """, tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["came True handler kept True"]


def test_a_timer_the_program_cancels_inside_a_block_stays_cancelled(tmp_path):
    """Invariant: alarm(0) inside a block cancels the program's timer (RQ's job timeout, the job
    done): the block's end re-armed the timer it had put aside, and the timeout came after all."""
    r = run_py(HEADER + """
    class JobTimeout(Exception):
        pass
    def on_timeout(signum, frame):
        raise JobTimeout()
    fp.tsetjmp()
    signal.signal(signal.SIGALRM, on_timeout)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with fp.watchdog(60):
            signal.alarm(0)                  # done: no timeout
        time.sleep(1.5)
        print("no timeout")
    except JobTimeout:
        print("timed out after cancel")
    """, tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["no timeout"]
