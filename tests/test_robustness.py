"""Failure modes found in review: each test states the invariant the fix protects."""
from __future__ import annotations

import signal

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time, ctypes
    import forkpoint as fp
"""


def test_a_restore_whose_checkpoint_dies_ends_the_program_instead_of_hanging(tmp_path):
    """If the keeper dies while a restore waits for its spare, the program ends (no live process
    would ever come back); it must not wait forever."""
    r = run_py(HEADER + """
    import threading
    fp.recover_on(signal.SIGSEGV)
    n = fp.tsetjmp(spares=0)
    keeper = fp.checkpoints()[0].pid
    assert keeper > 0, keeper                 # (kill(0, ...) would stop the whole process group)
    os.kill(keeper, signal.SIGSTOP)           # it cannot fork the copy the restore needs...
    killer = os.fork()
    if killer == 0:
        time.sleep(0.5)
        os.kill(keeper, signal.SIGKILL)       # ...and then it dies
        os._exit(0)
    ctypes.string_at(0)
    """, tmp_path, timeout=30)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)
    assert "while a restore to it was pending" in r.stderr


def test_a_crash_in_the_programs_own_child_does_not_roll_the_program_back(tmp_path):
    """Only the live process's faults are reported to the shepherd, not those of its children."""
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV)
    fp.tsetjmp()
    pid = os.fork()
    if pid == 0:
        ctypes.string_at(0)
    _, status = os.waitpid(pid, 0)
    time.sleep(0.3)
    print("child", os.waitstatus_to_exitcode(status), "restored", fp.chkpt_status(fp.CHKPT_RECOVERED),
          "history", len(fp.history()), flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"child {-int(signal.SIGSEGV)} restored 0 history 0"


def test_nested_watchdogs_keep_the_outer_hard_deadline(tmp_path):
    """An inner watchdog must not erase the outer one's record: the outer kill is a timeout."""
    r = run_py(HEADER + """
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        with fp.watchdog(0.3, hard_after=0.3):
            with fp.watchdog(5):
                pass
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            while True:
                pass
    print("restored:", fp.restore_reason())
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip() == "restored: timeout (stuck in native code: killed)"


def test_a_hard_deadline_seen_ahead_is_kept_on_time_not_at_the_next_tick(tmp_path):
    """The shepherd learns of a deadline recorded in the arena by reading it (no message per
    request); once it has seen one ahead, that deadline gets a timer of its own instead of waiting
    for a later reading, which came every 50 ms (up to 50 ms late). Here the periodic reading is
    put off for 1,000 s: the only reading is the one a committed protected call's timer makes, and
    the watchdog's hard deadline, still ahead then, must still cut the stuck block."""
    r = run_py(HEADER + """
    import forkpoint._shepherd_limits
    forkpoint._shepherd_limits._WATCHDOG_TICK = 1000.0
    fp.configure(shepherd_exec=False)       # the shepherd stays this process, with that setting
    fp.start()

    @fp.checkpointed(timeout=0.3)
    def quick():
        return "committed"

    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        print(quick(), flush=True)      # its deadline's timer fires 0.3 s later and finds nothing
        with fp.watchdog(0.1, hard_after=0.6):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            while True:
                pass
    print("restored:", fp.restore_reason(), flush=True)
    """, tmp_path, timeout=20)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.splitlines() == ["committed", "restored: timeout (stuck in native code: killed)"]


def test_recover_on_does_not_disarm_checkpointed_handlers(tmp_path):
    r = run_py(HEADER + """
    @fp.checkpointed
    def handle(op):
        if op == "segv":
            ctypes.string_at(0)
        return "ok"
    print(handle("x"))
    fp.recover_on(signal.SIGUSR1)            # replaces the policy...
    try:
        handle("segv")                       # ...but the decorator's signals come back
    except fp.Recovered as e:
        print("recovered", e.signal == signal.SIGSEGV)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ok", "recovered True"]


def test_nested_processing_restores_the_outer_key(tmp_path):
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV, quarantine_after=1)
    fp.tsetjmp()
    try:
        with fp.processing("batch-7"):
            with fp.processing("item-1"):
                pass
            ctypes.string_at(0)               # fails after the inner block: the batch is to blame
    except fp.Quarantined as e:
        print("quarantined", e.key)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "quarantined batch-7"


def test_a_damaged_directory_never_hands_out_a_fresh_region(tmp_path):
    r = run_py(HEADER + """
    region = fp.persist("precious", 16)
    region[:4] = b"data"
    arena = fp._runtime.runtime().arena
    P = sys.modules["forkpoint.arena"]
    slot = arena._find("precious")
    arena._slot_of.clear()
    name_at = P._DIR_OFF + slot * P._SLOT_SIZE + 2 * 8    # the entry's name bytes
    arena.map[name_at] ^= 0xFF                 # a stray write over the entry's name
    try:
        fp.persist("precious", 16)
        print("fresh region handed out")
    except fp.CacheCorrupted as e:
        print("refused:", "corrupted" in str(e))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "refused: True"


def test_an_oversized_restore_reason_is_truncated_not_fatal(tmp_path):
    r = run_py(HEADER + """
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        fp.tlongjmp(n, reason="x" * 200000)
    print("restored", len(fp.restore_reason()) <= 200)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "restored True"


def test_a_failure_to_record_a_quarantine_never_costs_the_restore(tmp_path):
    """Invariant 11: bookkeeping that fails inside the shepherd's handling of a crash (here a stray
    write damaged the arena's directory entry of the quarantine table, so the table cannot be
    found) is logged, and the restore still happens; the program's lookups do not fail either."""
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV)
    tries = fp.persist_int("tries")
    arena = fp._runtime.runtime().arena
    P = sys.modules["forkpoint.arena"]
    slot = arena._find(P.QUARANTINE_REGION)
    arena._slot_of.clear()
    arena.map[P._DIR_OFF + slot * P._SLOT_SIZE + 2 * 8] ^= 0xFF     # a stray write over its name
    n = fp.tsetjmp()
    if tries.add() <= 2:
        with fp.processing("poison"):
            ctypes.string_at(0)
    print("restored", fp.chkpt_status(fp.CHKPT_RECOVERED), "tries", tries.value,
          "quarantined", fp.quarantined(), flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["restored", "1", "tries", "3", "quarantined", "[]"], r.stdout
    assert "could not quarantine input 'poison'" in r.stderr and "CacheCorrupted" in r.stderr
