"""Recovery policy: crash-loop budgets, escalation, input quarantine and the watchdog."""
from __future__ import annotations

import signal

import pytest
from conftest import run_py

from forkpoint.policy import Action, Policy, RecoveryPolicy

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time, ctypes
    import forkpoint as fp
"""


def test_poisoned_input_is_quarantined_and_everything_else_served_once_in_order(tmp_path):
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV)
    inputs = ["a", "b", "poison", "c", "d"]
    print("starting")                           # buffered: must not be printed again
    for item in inputs:
        fp.tsetjmp()
        try:
            with fp.processing(item):
                if item == "poison":
                    ctypes.string_at(0)          # a segfault in C code
                print("served", item)
        except fp.Quarantined as e:
            print("skipped", e.key)
    h = fp.history()
    print("history", [(x.reason.split(";")[0], x.key) for x in h])
    print("quarantined", fp.quarantined(), fp.is_quarantined("poison"), fp.is_quarantined("a"))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:6] == ["starting", "served a", "served b", "skipped poison", "served c", "served d"]
    assert lines[6] == ("history [('killed by SIGSEGV', 'poison'), ('quarantined', 'poison'), "
                        "('killed by SIGSEGV', 'poison')]")
    assert lines[7] == "quarantined ['poison'] True False"


def test_the_quick_nothing_quarantined_answer_never_hides_a_quarantine(tmp_path):
    """Invariant: a protected call learns that nothing is quarantined from one word of the arena it
    remembers (``_qlookup.QUIET``), without asking the lookup; a quarantine made after that, by the
    shepherd after failures or by hand, refuses the very next call, and a release lets the key in
    at once."""
    r = run_py(HEADER + """
    from forkpoint import _qlookup
    fp.recover_on(signal.SIGSEGV, quarantine_after=2)

    @fp.checkpointed(key=lambda item: item)
    def handle(item):
        if item == "poison":
            ctypes.string_at(0)
        return "ok"

    def call(item):
        try:
            return handle(item)
        except fp.Quarantined:
            return "refused"
        except fp.Recovered:
            return "failed"

    out = [call("a") for _ in range(3)]
    out.append(_qlookup.quiet())                 # the quick answer is in use
    out += [call("poison"), call("poison"), call("poison"), call("a")]
    fp.quarantine("b")
    out += [call("b"), call("a")]
    fp.release("b")
    out += [call("b"), _qlookup.quiet()]         # "poison" is still in the table
    fp.release("poison")
    out += [call("a"), _qlookup.quiet(), call("poison")]
    print(out)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(["ok", "ok", "ok", True, "failed", "failed", "refused", "ok",
                                    "refused", "ok", "ok", False, "ok", True, "failed"])


def test_crash_loop_without_an_input_gives_up_by_its_own_signal(tmp_path):
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV, max_recoveries=3, within=60)
    fp.tsetjmp()
    fp.tsetjmp()
    print("crashing at", fp.current_state(), flush=True)
    ctypes.string_at(0)
    """, tmp_path, timeout=30)
    assert r.returncode == -signal.SIGSEGV, (r.stdout, r.stderr)
    states = [line.split()[-1] for line in r.stdout.splitlines()]
    # 1 crash + 3 recoveries at checkpoint 2, escalation to 1 (which takes checkpoint 3), 3 more, give up
    assert states == ["2", "2", "2", "2", "3", "3", "3", "3"], states
    assert "escalated to older checkpoint 1" in r.stderr
    assert "giving up" in r.stderr


def test_budget_resets_after_a_stable_period(tmp_path):
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV, max_recoveries=2, within=0.5)
    crashes = fp.persist_int("crashes")
    fp.tsetjmp()
    if crashes.add() <= 6:
        if crashes.value in (3, 5):
            time.sleep(0.7)                      # a stable period longer than `within`
        ctypes.string_at(0)
    print("survived", crashes.value - 1, "crashes;", len(fp.history()), "restores")
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "survived 6 crashes; 6 restores"


def test_watchdog_cuts_an_endless_loop_and_restores_timers(tmp_path):
    r = run_py(HEADER + """
    mine = lambda *a: print("program's own alarm")
    signal.signal(signal.SIGALRM, mine)
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        with fp.watchdog(0.2):
            while True:
                pass
    print("cut off:", fp.chkpt_status(fp.CKPT_SIGTYPE) == signal.SIGALRM, fp.restore_reason(),
          fp.history()[-1].reason)
    signal.setitimer(signal.ITIMER_REAL, 100)
    with fp.watchdog(5):
        pass
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    print("timer back:", 90 < left <= 100, signal.getsignal(signal.SIGALRM) is mine)
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        fp.watchdog(0).__enter__()
    except ValueError as e:
        print("refused:", e)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "cut off: True timeout timeout", "timer back: True True",
        "refused: watchdog needs a positive number of seconds, got 0"]


def test_a_hanging_input_is_quarantined_too(tmp_path):
    r = run_py(HEADER + """
    for item in ["ok1", "hang", "ok2"]:
        fp.tsetjmp()
        try:
            with fp.processing(item), fp.watchdog(0.2):
                while item == "hang":
                    pass
                print("served", item)
        except fp.Quarantined as e:
            print("skipped", e.key)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["served ok1", "skipped hang", "served ok2"]


def test_full_quarantine_releases_the_oldest_key(tmp_path):
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV, quarantine_size=3)
    for k in ["k1", "k2", "k3", "k4", "k5"]:
        fp.quarantine(k)
    print(fp.quarantined(), fp.is_quarantined("k1"), fp.release("k4"), fp.release("k4"), fp.quarantined())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    # forkpoint.quarantine() by hand uses the default bound; the policy's bound applies to the shepherd
    assert r.stdout.strip() == "['k1', 'k2', 'k3', 'k4', 'k5'] True True False ['k1', 'k2', 'k3', 'k5']"


def test_shepherd_quarantine_is_bounded(tmp_path):
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV, quarantine_size=2, quarantine_after=1)
    for item in ["p1", "p2", "p3"]:
        fp.tsetjmp()
        try:
            with fp.processing(item):
                ctypes.string_at(0)
        except fp.Quarantined as e:
            print("skipped", e.key)
    print(fp.quarantined())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["skipped p1", "skipped p2", "skipped p3", "['p2', 'p3']"]
    assert "quarantine full (2 keys): released the oldest ['p1']" in r.stderr


def test_backoff_spaces_out_repeated_recoveries(tmp_path):
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV, max_recoveries=10, backoff=0.1)
    crashes = fp.persist_int("crashes")
    fp.tsetjmp()
    if crashes.add() <= 4:
        ctypes.string_at(0)
    t = [h.time for h in fp.history()]
    print(" ".join(f"{b - a:.3f}" for a, b in zip(t, t[1:])))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    gaps = [float(x) for x in r.stdout.split()]
    # each restore is recorded when it happens: no delay, then 0.1, 0.2 and 0.4 s after the crash
    assert len(gaps) == 3
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4


def test_bad_policy_settings_are_refused(tmp_path):
    r = run_py(HEADER + """
    for kw in ({"max_recoveries": 0}, {"within": -1}, {"sideways": True}, {"backoff": "x"}):
        try:
            fp.recover_on(signal.SIGSEGV, **kw)
            print("accepted", kw)
        except fp.ConfigurationError as e:
            print("refused:", e)
    try:
        fp.recover_on(12345)
    except ValueError:
        print("refused: bad signal")
    fp.tsetjmp()
    print("still fine")
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("refused:") == 5 and "still fine" in r.stdout and "accepted" not in r.stdout


def test_python_handler_for_a_fault_signal_is_warned_about(tmp_path):
    r = run_py(HEADER + """
    import logging
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGSEGV, lambda *a: None)
    fp.recover_on(signal.SIGSEGV)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "never reaches it and spins forever" in r.stderr


def test_policy_counts_per_checkpoint_and_signal():
    """The decision logic itself: budget per (checkpoint, signal), escalation once, then give up."""
    rp = RecoveryPolicy()
    rp.policy = Policy(signals={11}, max_recoveries=2, within=10)
    d = [rp.decide(5, 11, None, [3, 5], now=t, cause="c") for t in (0, 1, 2)]
    assert [x.action for x in d] == [Action.RESTORE] * 3
    assert [x.target for x in d] == [5, 5, 3]
    other_signal = rp.decide(5, 6, None, [3, 5], now=3, cause="c")
    assert other_signal.target == 5 and other_signal.attempt == 1
    d2 = [rp.decide(7, 11, None, [3, 5, 7], now=t, cause="c") for t in (4, 5, 6)]
    assert [x.action for x in d2] == [Action.RESTORE, Action.RESTORE, Action.GIVE_UP]
    later = rp.decide(7, 11, None, [3, 5, 7], now=100, cause="c")
    assert later.action is Action.RESTORE and later.attempt == 1


# 30 inputs after one checkpoint, each taken once (``i``), with a budget of 2 crashes a minute.
THIRTY_INPUTS = HEADER + """
    fp.recover_on(signal.SIGSEGV, max_recoveries=2, within=60, to=1)
    nxt = fp.persist_int("next")
    fp.tsetjmp()
    while nxt.value < 30:
        i = nxt.value
        nxt.add()
"""


def test_a_failure_paid_for_by_inputs_served_starts_the_count_afresh():
    """Invariant: the budget catches a state that keeps failing, not a program that serves between
    its failures: once the inputs served since the window's first failure are at least as many as
    its failures, the count starts again at 1; fewer (a few health checks between failures of
    every real input) still exhaust it."""
    rp = RecoveryPolicy()
    rp.policy = Policy(signals={11}, max_recoveries=2, within=60)
    # one input served between failures: never given up on, no escalation
    d = [rp.decide(5, 11, f"k{i}", [3, 5], now=i, cause="c", served=10 * i) for i in range(10)]
    assert {x.action for x in d} == {Action.RESTORE} and {x.target for x in d} == {5}
    assert [x.attempt for x in d] == [1] * 10
    # nothing served between them: escalated at the third, given up at the sixth, as before
    rp = RecoveryPolicy()
    rp.policy = Policy(signals={11}, max_recoveries=2, within=60)
    d = [rp.decide(5, 11, f"k{i}", [3, 5], now=i, cause="c", served=7) for i in range(6)]
    assert [x.target for x in d[:3]] == [5, 5, 3] and d[5].action is Action.GIVE_UP
    # one input served for every two failures: fewer than failed, so the count goes on
    rp = RecoveryPolicy()
    rp.policy = Policy(signals={11}, max_recoveries=3, within=60)
    d = [rp.decide(5, 11, f"k{i}", [5], now=i, cause="c", served=i // 2) for i in range(4)]
    assert [x.action for x in d] == [Action.RESTORE] * 3 + [Action.GIVE_UP]
    # unknown (None): counted as before
    rp = RecoveryPolicy()
    rp.policy = Policy(signals={11}, max_recoveries=2, within=60)
    d = [rp.decide(5, 11, None, [5], now=i, cause="c") for i in range(3)]
    assert d[2].action is Action.GIVE_UP


def test_a_program_that_serves_between_crashes_of_different_inputs_is_not_given_up_on(tmp_path):
    """The README's loop: every third input segfaults, each a different one (each quarantined
    after its failure would come again), with inputs served between them. With a budget of 2
    crashes a minute it serves all 30, the 10 crashes restored; the same program whose good
    inputs do nothing in ``processing()`` has no such evidence and is given up on at the third."""
    code = THIRTY_INPUTS + """
        if i % 3 == 2:
            with fp.processing(f"input-{i}"):
                ctypes.string_at(0)
        elif os.environ.get("MARKED"):
            with fp.processing(f"input-{i}"):
                pass
    print("served all;", len(fp.history()), "restores", flush=True)
    """
    r = run_py(code, tmp_path, MARKED="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "served all; 10 restores"
    r = run_py(code, tmp_path)
    assert r.returncode == -signal.SIGSEGV, (r.stdout, r.stderr)
    assert "giving up" in r.stderr


def test_watchdog_kills_a_hang_its_handler_cannot_reach(tmp_path):
    """Code that never lets the SIGALRM handler run (here: SIGALRM blocked, as native code may do)
    is SIGKILLed by the watchdog's kill timer, and the shepherd restores it as a timeout."""
    r = run_py(HEADER + """
    for item in ["ok1", "stuck", "ok2"]:
        fp.tsetjmp()
        try:
            with fp.processing(item), fp.watchdog(0.2, hard_after=0.3):
                if item == "stuck":
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                    while True:
                        pass
                print("served", item, flush=True)
        except fp.Quarantined as e:
            print("skipped", e.key, flush=True)
    h = fp.history()
    print("restored", h[0].reason, h[0].signal == signal.SIGALRM, h[0].key)
    print("mask restored", signal.SIGALRM not in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["served ok1", "skipped stuck", "served ok2",
                                     "restored timeout (stuck in native code: killed) True stuck",
                                     "mask restored True"]


def test_watchdog_cuts_catastrophic_regex_backtracking(tmp_path):
    r = run_py(HEADER + """
    import re
    for item in ["aaa", "a" * 40 + "!", "aa"]:
        fp.tsetjmp()
        try:
            with fp.processing(item), fp.watchdog(0.2, hard_after=0.3):
                re.match(r"(a+)+$", item)
                print("served", item, flush=True)
        except fp.Quarantined as e:
            print("skipped", len(e.key), flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["served aaa", "skipped 41", "served aa"]


def test_watchdog_cuts_a_coroutine_that_hangs_in_an_await(tmp_path):
    """A watchdog() block in a coroutine that awaits is suspended when its alarm comes: the loop's
    own frame runs the handler. It was taken for a block interrupted on entry and ignored
    ("a timer outlived its block"), hard deadline included: the await ran its full 5 s."""
    r = run_py(HEADER + """
    import asyncio
    async def inner():
        await asyncio.sleep(5)
    async def main():
        for item in ["stuck", "ok"]:
            fp.tsetjmp()
            try:
                with fp.processing(item), fp.watchdog(0.2):
                    if item == "stuck":
                        await inner()
                    print("served", item, flush=True)
            except fp.Quarantined as e:
                print("skipped", e.key, flush=True)
    asyncio.run(main())
    print("restored", fp.history()[0].reason)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["skipped stuck", "served ok", "restored timeout"], r.stderr
    assert "outlived its block" not in r.stderr


def test_overlapping_watchdogs_of_two_tasks_each_keep_their_own_deadline(tmp_path):
    """Invariant: a watchdog() block's deadline holds until that block ends, whatever other blocks
    start or end meanwhile. Two tasks' blocks overlap without nesting: the one entered first ends
    first. The alarms were saved and put back last in, first out, so its end cancelled the other
    block's timer and hard deadline (the hang ran its full 3 s) and, at the other block's end, put
    its own hard deadline back, long past: the shepherd then killed code that had moved on and
    restored the program to its checkpoint."""
    r = run_py(HEADER + """
    import asyncio
    async def quick():
        with fp.watchdog(0.3):
            await asyncio.sleep(0.1)
        print("quick done", flush=True)
    async def stuck():
        await asyncio.sleep(0.05)
        with fp.watchdog(0.6):
            await asyncio.sleep(3)
        print("stuck ran to its end", flush=True)
    async def main():
        fp.tsetjmp()
        if fp.chkpt_status(fp.CHKPT_RECOVERED):
            print("restored", fp.restore_reason(), flush=True)
            await asyncio.sleep(1.5)          # a stale hard deadline would be acted on by now
            print("restores", len(fp.history()), flush=True)
            return
        await asyncio.gather(quick(), stuck())
        await asyncio.sleep(1.5)
        print("moved on", flush=True)
    asyncio.run(main())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["quick done", "restored timeout", "restores 1"], r.stderr


def test_an_inner_watchdog_with_a_later_deadline_does_not_put_off_the_outer_one(tmp_path):
    """Invariant: the earliest deadline of the blocks in force is the one that fires, by its
    handler. An inner ``watchdog(5)`` inside a ``watchdog(0.3)`` replaced the process's one timer
    with its own 5 s: the outer block's handler never ran, and only its hard deadline, a second
    later, cut the loop by a kill ("stuck in native code")."""
    r = run_py(HEADER + """
    fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        with fp.watchdog(0.3):
            with fp.watchdog(5):
                while True:
                    pass
    print("restored:", fp.restore_reason())
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip() == "restored: timeout"


def test_a_block_restored_from_its_checkpoint_keeps_the_time_it_had_left_there(tmp_path):
    """Invariant: restored into a checkpoint taken inside a watchdog() block, the block runs again
    from there with the time it had left at the checkpoint (``_frozen._real_timer``), whatever
    other blocks start or end after the restore. The blocks kept their deadlines as absolute
    times of the first run: after retries that, together, took longer than the block's seconds,
    the next block armed or ended set the timer to the stale deadline, which fired at once, and
    every run of the block was cut as a timeout, a crash loop escalated to an older checkpoint."""
    r = run_py(HEADER + """
    fp.tsetjmp()
    with fp.watchdog(1.0, hard_after=0.5):
        n = fp.tsetjmp()
        if len(fp.history()) < 3:
            time.sleep(0.6)              # well within the block's 1 s from its checkpoint
            fp.tlongjmp(n)               # a retry: back to the checkpoint, inside the block
        with fp.watchdog(5):             # any other block, in the retried run
            pass
        time.sleep(0.2)
    print("done", [h.reason for h in fp.history()], flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["done ['tlongjmp', 'tlongjmp', 'tlongjmp']"], r.stderr


def test_a_block_restored_from_its_checkpoint_keeps_its_hard_deadline(tmp_path):
    """Invariant: a watchdog() block's hard deadline holds in a process restored into a checkpoint
    taken inside it. The shepherd clears the deadline records at a restore and nothing wrote the
    block's again: code stuck after the restore (SIGALRM blocked, as in C) ran for ever."""
    r = run_py(HEADER + """
    fp.tsetjmp()
    with fp.watchdog(0.3, hard_after=0.3):
        n = fp.tsetjmp()
        if not fp.history():
            fp.tlongjmp(n)               # a retry, inside the block
        if len(fp.history()) == 1:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})   # stuck as in C
            while True:
                pass
    print("done", [h.reason for h in fp.history()], flush=True)
    """, tmp_path, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["done ['tlongjmp', 'timeout (stuck in native code: killed)']"]


def test_a_watchdog_in_another_thread_is_refused_on_entry_and_leaves_the_programs_alarm(tmp_path):
    """Invariant: watchdog() works in the main thread only (its handler runs there) and refuses
    any other thread on entry, whether or not the main thread is in a block; the program's own
    SIGALRM handler is untouched. Only the first block installed the handler, which refused; a
    thread's block entered while the main thread was in one ran unguarded and, ending after it,
    failed (ValueError) to give the program's handler back: the program's alarm was swallowed."""
    r = run_py(HEADER + """
    import threading
    fp.tsetjmp()
    got = []
    signal.signal(signal.SIGALRM, lambda s, f: got.append("program's alarm"))
    out = {}
    def worker():
        try:
            with fp.watchdog(5):
                time.sleep(0.3)                  # the main thread's block ends meanwhile
            out["worker"] = "ran"
        except ValueError:
            out["worker"] = "refused"
    with fp.watchdog(5):
        t = threading.Thread(target=worker)
        t.start()
        time.sleep(0.1)
    t.join()
    print("worker:", out["worker"], flush=True)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    for _ in range(500):                     # (it fires in 50 ms; long enough on a busy machine)
        if got:
            break
        time.sleep(0.01)
    print(got, flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["worker: refused", "[\"program's alarm\"]"], r.stderr


def test_a_block_with_a_deadline_too_far_for_a_timer_never_breaks_another_blocks_end(tmp_path):
    """Invariant: a watchdog() block is refused on entry or guards its code; its deadline never
    breaks another block. One too far off for setitimer (1e10 s, "no deadline, really") was
    armed while another task's earlier block was in force; that block's end then set the timer
    to the far deadline: OverflowError out of its ``with``, and out of the SIGALRM handler when
    the stale timer came, into the event loop, which the program died of."""
    r = run_py(HEADER + """
    import asyncio
    async def quick():
        with fp.watchdog(0.3):
            await asyncio.sleep(0.1)
        print("quick done", flush=True)
    async def far():
        await asyncio.sleep(0.05)
        try:
            with fp.watchdog(1e10):
                await asyncio.sleep(0.6)         # past the quick block's deadline
            print("far done", flush=True)
        except OverflowError:
            print("far refused", flush=True)
    async def main():
        fp.tsetjmp()
        if fp.chkpt_status(fp.CHKPT_RECOVERED):
            print("restored", fp.restore_reason(), flush=True)
            return
        await asyncio.gather(quick(), far())
    asyncio.run(main())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() in (["quick done", "far done"], ["far refused", "quick done"]), r.stderr


def test_a_block_entered_before_forkpoint_starts_keeps_its_hard_deadline(tmp_path):
    """Invariant: a watchdog() block's hard deadline holds from the moment forkpoint runs, also
    for a block entered before its start (the first ``tsetjmp()`` inside it): with no shepherd
    then, nothing recorded it later, and code stuck in the block (SIGALRM blocked, as in C) ran
    for ever."""
    r = run_py(HEADER + """
    with fp.watchdog(0.3, hard_after=0.3):
        fp.tsetjmp()                         # forkpoint starts here, inside the block
        if not fp.chkpt_status(fp.CHKPT_RECOVERED):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            while True:
                pass
    print("restored:", fp.restore_reason(), flush=True)
    """, tmp_path, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["restored: timeout (stuck in native code: killed)"]


@pytest.mark.parametrize("periodic", [False, True])
def test_the_programs_own_alarm_comes_on_time_inside_a_watchdog_block(tmp_path, periodic):
    """Invariant: a program's own SIGALRM timer (a job runner's timeout: RQ's is ``alarm()`` and a
    handler that raises) fires when it falls due, also inside a watchdog() block with a later
    deadline, as it does without the block. The block put it aside until its end: a job stuck in
    a block of 60 s outlived its 0.3 s timeout by the whole block."""
    r = run_py(HEADER + f"""
    periodic = {periodic!r}
    class JobTimeout(Exception):
        pass
    fired = []
    def on_alarm(signum, frame):
        fired.append(1)
        if not periodic or len(fired) == 3:
            raise JobTimeout()
    fp.tsetjmp()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.3, 0.1 if periodic else 0)
    try:
        with fp.watchdog(60):
            time.sleep(30)                   # (the test gives up after 20 s)
    except JobTimeout:
        print("job timed out", len(fired), flush=True)
    signal.setitimer(signal.ITIMER_REAL, 0)
    print("handler kept", signal.getsignal(signal.SIGALRM) is on_alarm, "restores", len(fp.history()))
    """, tmp_path, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"job timed out {3 if periodic else 1}", "handler kept True restores 0"]


def test_a_child_forked_inside_a_watchdog_block_has_none_of_its_parents_blocks(tmp_path):
    """Invariant: the blocks in force are the process's own. A child forked inside one (no timer
    is copied by fork) must not find its parent's deadlines among its blocks: its own first block
    would set its timer to the parent's, long past, and roll the child back into the parent's
    block, which the child is not in."""
    r = run_py(HEADER + """
    fp.tsetjmp()
    with fp.watchdog(0.3):
        pid = os.fork()
        if pid == 0:                         # (a pool's worker, forked inside the block for good)
            try:
                time.sleep(0.5)              # past the parent's deadline
                with fp.watchdog(2):
                    time.sleep(0.1)
                print("child done", flush=True)
            finally:
                os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status), "restored", len(fp.history()), flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["child done", "child exit 0 restored 0"], r.stderr


def test_a_watchdog_beyond_the_timers_range_is_accepted_and_leaves_nothing_armed(tmp_path):
    """``watchdog(1e12)`` (or ``inf``: no deadline in practice) raised ``OverflowError`` from
    ``setitimer``; it gets a timer that fires early and is set again, and a block inside it
    still gets its own deadline."""
    r = run_py(HEADER + """
    fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", fp.restore_reason(), flush=True)
        sys.exit(0)
    for seconds in (1e12, float("inf")):
        with fp.watchdog(seconds):
            pass
        print(seconds, signal.getitimer(signal.ITIMER_REAL), int(signal.getsignal(signal.SIGALRM)), flush=True)
    with fp.watchdog(float("inf")):
        with fp.watchdog(0.2):
            while True:
                pass
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1000000000000.0 (0.0, 0.0) 0",
                                     "inf (0.0, 0.0) 0", "restored timeout"], r.stderr


@pytest.mark.parametrize("kind", ["contextmanager", "generator"])
def test_watchdog_cuts_the_code_a_generator_block_guards(tmp_path, kind):
    """A watchdog() block in a generator (an @contextmanager's, or one a loop iterates) guards code
    that runs in the caller while the generator is suspended at its yield, on no stack: its
    expiry was taken for a block interrupted on entry and ignored, hard deadline included, and
    the loop ran for ever."""
    r = run_py(HEADER + f"""
    import contextlib
    kind = {kind!r}
    @contextlib.contextmanager
    def guarded():
        with fp.watchdog(0.2):
            yield
    def items():
        with fp.watchdog(0.2):
            yield 1
    fp.tsetjmp()
    if fp.history():
        print("restored", fp.history()[0].reason, flush=True)
        sys.exit(0)
    if kind == "contextmanager":
        with guarded():
            while True:
                pass
    else:
        for _ in items():
            while True:
                pass
    """, tmp_path, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["restored timeout"], r.stderr
    assert "outlived its block" not in r.stderr


@pytest.mark.parametrize("kind", ["asynccontextmanager", "async_generator"])
def test_watchdog_cuts_an_async_generator_block_that_hangs_in_an_await(tmp_path, kind):
    """A watchdog() block in an async generator (an @asynccontextmanager's, an async iterator's)
    is on no task's chain of awaits: its expiry was taken for a block interrupted on entry and
    ignored, hard deadline included, and the await ran its full 5 s."""
    r = run_py(HEADER + f"""
    import asyncio, contextlib
    kind = {kind!r}
    @contextlib.asynccontextmanager
    async def guarded():
        with fp.watchdog(0.2):
            yield
    async def agen():
        with fp.watchdog(0.2):
            await asyncio.sleep(5)
            yield 1
    async def main():
        fp.tsetjmp()
        if fp.history():
            print("restored", fp.history()[0].reason, flush=True)
            return
        if kind == "asynccontextmanager":
            async with guarded():
                await asyncio.sleep(5)
        else:
            async for _ in agen():
                pass
        print("ran to its end", flush=True)
    asyncio.run(main())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["restored timeout"], r.stderr
    assert "outlived its block" not in r.stderr


@pytest.mark.parametrize("where", ["step-of-the-input", "after-the-input"])
def test_inputs_that_all_fail_are_not_paid_for_by_their_own_steps_or_blocks(tmp_path, where):
    """Invariant: a state that fails every input exhausts the budget. An inner ``processing()``
    block (a step of the input) that ends before the input's crash, or the input's own block when
    the crash comes just after it, is no input served: each failure was 'paid for' by itself, and
    a program failing all 30 inputs was never given up on."""
    code = THIRTY_INPUTS + """
        if os.environ["WHERE"] == "step-of-the-input":
            with fp.processing(f"input-{i}"):
                with fp.processing(f"parse-{i}"):
                    pass
                ctypes.string_at(0)
        else:
            with fp.processing(f"input-{i}"):
                pass
            ctypes.string_at(0)
    print("served all", flush=True)
    """
    r = run_py(code, tmp_path, WHERE=where)
    assert r.returncode == -signal.SIGSEGV, (r.stdout, r.stderr)
    assert "giving up" in r.stderr
