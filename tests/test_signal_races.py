"""Signals at unlucky moments: races found by a randomized soak (random checkpoints, restores,
crashes, transactions and watchdogs under floods of signals), each reproduced deterministically by
delivering a real SIGINT at one exact line (through sys.settrace)."""
from __future__ import annotations

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time, ctypes
    import forkpoint as fp
"""

# Send a real SIGINT (default handler: KeyboardInterrupt) when watchdog()'s setup (Alarm.arm) or
# cleanup (Alarm.disarm) reaches one exact line: Python runs the handler at the next bytecode
# boundary that checks for signals, as for a Ctrl-C typed at that moment; if signals are blocked
# there, it runs once they are unblocked.
INJECT = """
    import inspect
    import sys
    rec = sys.modules["forkpoint.watchdog"]      # (forkpoint.watchdog is also the function)
    def inject_at(snippet, occurrence=-1, where="disarm"):
        fn = getattr(rec._Blocks if where == "give_back" else rec.Alarm, where)
        src, first = inspect.getsourcelines(fn)
        hits = [first + i for i, l in enumerate(src) if snippet in l]
        target = hits[occurrence]
        code = fn.__code__
        done = []
        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == target and not done:
                done.append(1)
                os.kill(os.getpid(), signal.SIGINT)   # a real Ctrl-C, delivered at this line
            return local
        def glob(frame, event, arg):
            return local if frame.f_code is code else None
        sys.settrace(glob)
"""


@pytest.mark.parametrize("line,where", [
    ("self._forget()", "disarm"),                  # first line of the cleanup
    ("blocks.give_back()", "_forget"),             # out of the blocks, the program's alarm not back
    ("_setitimer(_ITIMER_REAL, 0)", "give_back"),  # the timer cleared, the deadline not yet
])
def test_ctrl_c_during_watchdog_cleanup_leaves_no_armed_watchdog(tmp_path, line, where):
    """A KeyboardInterrupt that lands in watchdog()'s `finally` skips the rest of the cleanup: the
    arena keeps the watchdog record (the shepherd SIGKILLs the program hard_after later and rolls
    it back to a checkpoint it left long ago, as a timeout), and SIGALRM keeps watchdog's handler.
    Found by the soak as spurious "timeout (stuck in native code: killed)" rollbacks and NoSuchCheckpoint raised out of
    a stale `_expired` handler. Reproduced with real signals by flooding SIGINT (see report)."""
    r = run_py(HEADER + INJECT + f"""
    n = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("spurious rollback:", fp.restore_reason(), flush=True)
        sys.exit(3)
    before = signal.getsignal(signal.SIGALRM)
    inject_at({line!r}, where={where!r})
    try:
        with fp.watchdog(0.2, hard_after=0.3):
            pass                                   # the block finishes well within its deadline
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    sys.settrace(None)
    time.sleep(1.0)                               # past seconds + hard_after
    print("handler restored", signal.getsignal(signal.SIGALRM) is before, flush=True)
    """, tmp_path)
    assert r.stdout.splitlines() == ["interrupted", "handler restored True"], (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.returncode == 0


@pytest.mark.parametrize("call,times", [("watchdog", 4000), ("tsetjmp", 800), ("checkpointed", 800)])
def test_an_interrupt_as_forkpoint_blocks_signals_never_leaves_them_blocked(tmp_path, call, times):
    """forkpoint blocks every signal around its own critical sections. CPython runs the Python
    handler of a signal that came just before the block as the blocking call returns: one that
    raises there (Ctrl-C) must not escape before the section's `finally`, or the program is left
    with every signal blocked (no Ctrl-C, no SIGTERM, ever again). A child floods the live process
    with real SIGINTs while it enters and leaves watchdogs, takes checkpoints and makes protected
    calls; after each, the thread's blocked mask must be what it was. Before the fix this found a
    leak within 8-283 calls."""
    r = run_py(HEADER + f"""
    import random

    class Interrupt(Exception):
        pass

    inside = False
    def handler(sig, frame):
        global inside
        if inside:                      # the harness's own lines are never interrupted, and a
            inside = False              # call at most once (no second one while it unwinds)
            raise Interrupt()
    signal.signal(signal.SIGINT, handler)

    def blocked():
        with open("/proc/thread-self/status") as f:
            return next(int(l.split()[1], 16) for l in f if l.startswith("SigBlk:"))

    def watchdog():
        with fp.watchdog(5):
            pass

    call = {{"watchdog": watchdog, "tsetjmp": fp.tsetjmp, "checkpointed": fp.checkpointed(lambda: 1)}}[{call!r}]
    fp.start()
    base = blocked()
    me = int(os.readlink("/proc/self"))
    flooder = os.fork()
    if flooder == 0:
        try:
            while True:
                os.kill(me, signal.SIGINT)
                time.sleep(random.uniform(0.00002, 0.0003))
        finally:
            os._exit(0)
    interrupted = 0
    for i in range({times}):
        try:
            inside = True
            call()
            inside = False
        except Interrupt:
            inside = False
            interrupted += 1
        if blocked() != base:
            print("left blocked after call", i, hex(blocked()), flush=True)
            break
    os.kill(flooder, signal.SIGKILL)
    os.waitpid(flooder, 0)
    print("interrupted", interrupted > 0, "unchanged", blocked() == base, flush=True)
    """, tmp_path, timeout=50)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.splitlines() == ["interrupted True unchanged True"], r.stdout


def test_a_ctrl_c_as_the_signal_stack_is_installed_never_leaves_it_freed(tmp_path):
    """forkpoint gives signal handlers a larger alternate stack when it arms faulthandler. A Ctrl-C
    handled as ``sigaltstack`` returned dropped the mapping while it was still the signal stack,
    and the next signal (CPython runs every handler there, SA_ONSTACK) killed the program by
    SIGSEGV with no crash report: found by the SIGINT flood above on a busy machine (5 of 60 runs
    of its program). A real SIGINT is sent at that line; later signals must still be handled."""
    r = run_py(HEADER + """
    import inspect
    from forkpoint import _sigutil
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    fn = _sigutil.large_altstack
    src, first = inspect.getsourcelines(fn)
    target = first + [i for i, l in enumerate(src) if "return stack" in l][0]
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == target:
            os.kill(os.getpid(), signal.SIGINT)      # a real Ctrl-C as the call returns
        return local
    sys.settrace(lambda f, e, a: local if f.f_code is fn.__code__ else None)
    try:
        fp.recover_on(signal.SIGSEGV)               # arms faulthandler and the signal stack
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    sys.settrace(None)
    import gc
    gc.collect()
    for _ in range(20):
        os.kill(os.getpid(), signal.SIGUSR1)
    print("handled", len(got), flush=True)
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.splitlines() == ["interrupted", "handled 20"], r.stdout


def test_an_interrupt_in_the_look_at_killed_keepers_never_closes_a_descriptor_twice(tmp_path):
    """A committed transaction kills its keeper itself and keeps the keeper's pidfd until it is
    gone; every few checkpoints, tsetjmp() closes the pidfds of those that are. Interrupted there
    (a KeyboardInterrupt raised at each line in turn, by the tracer), it must never leave a closed
    pidfd listed: the next look would close the number again, and by then it can be a descriptor
    of the program's own. Found by the SIGINT flood above as EBADF out of tsetjmp()."""
    r = run_py(HEADER + """
    import forkpoint._runtime as runtime_mod
    rt = runtime_mod.runtime()
    call = fp.checkpointed(lambda: 1)
    code = runtime_mod._Runtime.wait_killed.__code__
    mine = []
    for k in range(1, 40):             # the k-th line event of wait_killed() raises
        while len(rt.killed) < runtime_mod.DYING_MAX:
            call()                     # each commit kills its keeper and lists its pidfd
        time.sleep(0.05)               # they are gone: the next look closes their pidfds
        seen = [0]
        def local(frame, event, arg):
            if event == "line":
                seen[0] += 1
                if seen[0] == k:
                    raise KeyboardInterrupt
            return local
        sys.settrace(lambda f, e, a: local if f.f_code is code else None)
        try:
            fp.tsetjmp()
        except KeyboardInterrupt:
            pass
        sys.settrace(None)
        mine += [os.open("/dev/null", os.O_RDONLY) for _ in range(4)]  # the lowest free numbers
        call()                         # the next look
    null = os.stat("/dev/null")
    # Closed by a look, a number is taken again by the next keeper's pidfd: compare what it is.
    ours = sum(1 for fd in mine if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (null.st_dev, null.st_ino))
    print("still ours", ours, "of", len(mine), flush=True)
    """, tmp_path, timeout=50)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "still ours 156 of 156", r.stdout


def test_ctrl_c_during_watchdog_setup_leaves_no_armed_watchdog(tmp_path):
    """The same in the setup: an interrupt between installing the handler/timer and entering the
    `try` (or after the kill timer is created, before `killer` is assigned) has no cleanup at all;
    the SIGALRM timer later runs `_expired` outside any watchdog and rolls the program back."""
    r = run_py(HEADER + INJECT + """
    n = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("spurious rollback:", fp.restore_reason(), flush=True)
        sys.exit(3)
    inject_at("now = _monotonic()", where="arm")
    try:
        with fp.watchdog(0.2):
            pass
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    sys.settrace(None)
    time.sleep(0.5)
    print("still here", flush=True)
    """, tmp_path)
    assert r.stdout.splitlines() == ["interrupted", "still here"], (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.returncode == 0


def test_ctrl_c_inside_release_desynchronises_current_state(tmp_path):
    """A KeyboardInterrupt between the two statements of snapshots.end_transaction() (rt.current is reset,
    the discard message with the new current state is never sent) leaves the shepherd's current
    state at the committed call's entry checkpoint while the program's is the state before the
    call. The entry checkpoint leaks, and the next crash under recover_on() is restored into the
    middle of a call that already returned (or, if the program discarded that leaked checkpoint,
    the program dies: "live process died by SIGABRT and there is no checkpoint N to restore",
    seen twice in the soak)."""
    r = run_py(HEADER + """
    import inspect
    from forkpoint import snapshots
    fp.recover_on(signal.SIGSEGV, max_recoveries=100)
    hits = fp.persist_int("hits")
    base = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored to", fp.chkpt_status(fp.CKPT_TO_STATE), "base", base, flush=True)
        sys.exit(0)

    @fp.checkpointed
    def txn(x):
        return x + 1

    src, first = inspect.getsourcelines(snapshots.end_transaction)
    target = first + next(i for i, l in enumerate(src) if "_channel.encode_commit" in l)
    me = os.getpid()
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == target and os.getpid() == me:
            sys.settrace(None)
            os.kill(me, signal.SIGINT)          # a real Ctrl-C, delivered at this line
        return local
    code = snapshots.end_transaction.__code__
    sys.settrace(lambda f, e, a: local if f.f_code is code else None)
    try:
        print("txn", txn(1), flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    except fp.Recovered as e:
        print("the crash below was restored into the finished call:", e.to_state, flush=True)
        sys.exit(5)
    sys.settrace(None)
    print("current", fp.current_state() == base, "ids", [c.id for c in fp.checkpoints()] == [base], flush=True)
    hits.add()
    if hits.value > 1:
        print("crashed twice: restored into the committed call", flush=True)
        sys.exit(5)
    ctypes.string_at(0)      # must go back to `base`, the program's current state
    """, tmp_path)
    assert r.stdout.splitlines()[-1] == "restored to 1 base 1", (r.returncode, r.stdout, r.stderr[-2000:])
    assert "current True ids True" in r.stdout


def test_checkpoints_never_lists_a_keeper_without_pid(tmp_path):
    """_on_list (forkpoint/_shepherd.py) arms a 1 s "force" timer when the first waiter arrives, but
    the timer is not tied to that request: if the request is answered at once, the stale timer
    still fires one second later and answers whatever list request is waiting then, even one made
    a few ms earlier while a keeper has not introduced itself yet, so checkpoints() returns an
    entry with pid=0 (soak: CheckpointInfo(id=35, pid=0, age=0.007)). Timing-dependent: the
    second request is placed just before the stale timer fires, many times."""
    r = run_py(HEADER + """
    import random
    fp.configure(max_checkpoints=64)
    bad = []
    for i in range(12):
        t0 = time.monotonic()
        fp.checkpoints()                       # answered at once; its force timer stays armed
        time.sleep(max(0.0, t0 + 0.9985 + random.uniform(-0.0015, 0.0015) - time.monotonic()))
        fp.tsetjmp(spares=0)
        bad += [c for c in fp.checkpoints() if c.pid <= 0]
        if bad:
            break
    print("without pid:", bad, flush=True)
    """, tmp_path, timeout=50)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "without pid: []"


@pytest.mark.parametrize("kind", ["plain", "contextmanager"])
def test_a_watchdog_whose_block_never_exited_does_not_roll_back_later_code(tmp_path, kind):
    """CPython can skip __exit__ when an interrupt lands right after __enter__ (bpo-29988). The
    timer of such a watchdog must not roll back code that has moved on, nor kill it later. The
    same for a block in an @contextmanager's generator, which is rolled back while the generator
    is suspended inside it (the guarded code runs in the caller): a with statement interrupted
    right after ``__enter__`` drops the generator, whose close ends the block."""
    r = run_py(HEADER + f"""
    import contextlib
    kind = {kind!r}
    @contextlib.contextmanager
    def guarded():
        with fp.watchdog(0.1, hard_after=0.2):
            yield
    n = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("spurious rollback:", fp.restore_reason(), flush=True)
        sys.exit(3)
    kept = []                                     # (as a traceback keeps the frame's objects alive)
    def entered_but_never_exited():
        if kind == "plain":
            cm = fp.watchdog(0.1, hard_after=0.2)
            cm.__enter__()
            kept.append(cm)
        else:
            cm = guarded()
            cm.__enter__()                        # dropped here, as the with drops it
    entered_but_never_exited()
    t = time.time()
    while time.time() - t < 0.8:                 # past the deadline and the hard kill
        pass
    print("still here", flush=True)
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stdout.strip() == "still here"


@pytest.mark.parametrize("line, how", [
    ("_sigutil.block_all_into(old)", "reported"),      # pending when the caller reads its own mask
    ("rt.request(msg, blocked=True)", "late"),          # after it read its mask, before the kill
])
def test_a_signal_pending_in_a_tlongjmp_caller_reaches_the_restored_program_once(tmp_path, line, how):
    """Invariant 10, issue 13.6: a signal sent to the live process while it is inside tlongjmp()
    (every signal blocked, about to be killed) is handled once by the restored program. The caller
    reports what it has pending in its Restore, so the shepherd need not read its /proc status
    before the wake; a signal that comes after that report is read from the killed process after
    the wake and passed on too. Delivered here at one exact line of tlongjmp(), through the real
    pid (os.kill of the face PID would reach the shepherd instead)."""
    r = run_py(HEADER + f"""
    import inspect
    from forkpoint import snapshots
    got = fp.persist_int("got")
    signal.signal(signal.SIGUSR1, lambda s, f: got.add())
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        src, first = inspect.getsourcelines(snapshots.tlongjmp)
        target = first + next(i for i, l in enumerate(src) if {line!r} in l)
        # after the line named: at the next line event (for the block, once the mask is blocked)
        offset = 1 if {how!r} == "reported" else 0
        code = snapshots.tlongjmp.__code__
        real = int(os.readlink("/proc/self"))
        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == target + offset:
                os.kill(real, signal.SIGUSR1)
            return local
        sys.settrace(lambda f, e, a: local if f.f_code is code else None)
        fp.tlongjmp(n)
    time.sleep(0.3)
    print("handled", got.value, flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["handled", "1"], (r.stdout, r.stderr[-2000:])


def test_ctrl_c_as_a_protected_call_checkpoints_never_runs_it_again_later(tmp_path):
    """A real SIGINT that comes while tsetjmp() has every signal blocked for its fork is handled as
    the mask comes back: the KeyboardInterrupt leaves tsetjmp() after the checkpoint was taken,
    before the protected call learns its number. The call must still commit it: left current,
    with the call's timeout, the shepherd restored it at the deadline, 0.5 s after the program had
    caught the interrupt and moved on, and ran the interrupted call again."""
    r = run_py(HEADER + """
    import inspect
    from forkpoint import snapshots
    fp.start()
    calls = fp.persist_int("calls")

    @fp.checkpointed(timeout=0.5)
    def work():
        calls.add()

    src, first = inspect.getsourcelines(snapshots.tsetjmp)
    target = first + next(i for i, l in enumerate(src) if "rt.chan.send(_channel.encode_snap" in l)
    code = snapshots.tsetjmp.__code__
    real = int(os.readlink("/proc/self"))
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == target:
            sys.settrace(None)
            os.kill(real, signal.SIGINT)      # every signal is blocked here
        return local
    before = fp.current_state()
    sys.settrace(lambda f, e, a: local if f.f_code is code else None)
    try:
        work()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    sys.settrace(None)
    print("current", fp.current_state() == before, flush=True)
    time.sleep(1.5)                          # past the call's timeout
    print("calls", calls.value, "restored", fp.chkpt_status(fp.CHKPT_RECOVERED), flush=True)
    """, tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    assert r.stdout.splitlines() == ["interrupted", "current True", "calls 0 restored 0"], \
        (r.stdout, r.stderr[-2000:])


def test_ctrl_c_as_watchdog_cleanup_begins_leaves_no_armed_watchdog(tmp_path):
    """A real SIGINT sent as the watchdog's cleanup (Alarm.disarm) is entered is handled at its
    first instruction, before anything is disarmed. The cleanup must run all the same: its timer
    fired 0.3 s later into the function that had caught the interrupt (still on the stack, so the
    owner check passed) and rolled the program back as a timeout."""
    r = run_py(HEADER + """
    n = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("spurious rollback:", fp.restore_reason(), flush=True)
        sys.exit(3)
    code = sys.modules["forkpoint.watchdog"].Alarm.disarm.__code__
    real = int(os.readlink("/proc/self"))
    def enter(frame, event, arg):
        if frame.f_code is code:
            sys.settrace(None)
            os.kill(real, signal.SIGINT)      # handled as disarm() starts
    def main():
        sys.settrace(enter)
        try:
            with fp.watchdog(0.3, hard_after=0.3):
                pass
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        sys.settrace(None)
        t = time.monotonic()
        while time.monotonic() - t < 1.0:    # the program goes on in the same function
            pass
        print("still here", flush=True)
    main()
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stdout.splitlines() == ["interrupted", "still here"], (r.stdout, r.stderr[-2000:])
