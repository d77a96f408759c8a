"""Signals reach the program exactly once, promptly, as without forkpoint (issue 13.6, invariant 10):
through a terminal (a real pty) and its hangup, during restores and crash-loop backoffs, for every
catchable signal, and for job control.

Terminals are real ptys (``pty.fork``), signals are real, restores are real; each scenario runs
in its own processes with a timeout.
"""
from __future__ import annotations

import os
import pty
import random
import select
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import Lines, clean_env, program, start_py, wait_exit, wait_for

from forkpoint import _procfs

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time, ctypes
    import forkpoint as fp
"""


def _in_pty(code: str, tmp_path) -> tuple[int, int]:
    """Run ``code`` as the session leader of a new pty (as ``ssh -t host prog`` does); returns
    (pid, master fd)."""
    path = program(code, tmp_path)
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, str(path)], clean_env())
    return pid, fd


def _read_until(fd: int, needle: bytes, out: bytearray, timeout: float = 15.0, count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while out.count(needle) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"{needle!r} not seen in {timeout}s; output: {bytes(out[-500:])!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            raise AssertionError(f"pty closed before {needle!r}; output: {bytes(out[-500:])!r}") from None
        if not chunk:
            raise AssertionError(f"pty closed before {needle!r}; output: {bytes(out[-500:])!r}")
        out += chunk


def _stop(fd: int, stop: Path, out: bytearray) -> None:
    """Give a duplicate Ctrl-C, if any, time to be handled, then end the program (its stop file)."""
    time.sleep(0.5)
    stop.write_text("")
    _read_until(fd, b"stopped", out)


def test_a_terminal_hangup_ends_a_session_leader_program(tmp_path):
    """Issue 13.6: when the program is the session leader (ssh -t host prog), a hangup sends SIGHUP
    to it alone, not to its process group. Without forkpoint it dies by SIGHUP; the shepherd took
    it for a terminal signal the live process already had, and the program ran on."""
    pid, fd = _in_pty(HEADER + """
    fp.tsetjmp()
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
    """, tmp_path)
    out = bytearray()
    try:
        _read_until(fd, b"ready", out)
    finally:
        os.close(fd)                     # the terminal hangs up
    assert wait_exit(pid) == -signal.SIGHUP


def test_ctrl_c_during_back_to_back_restores_runs_the_handler_once_per_press(tmp_path):
    """Issue 13.6: Ctrl-C during back-to-back restores ran the handler 309 times for 300 presses:
    the terminal's SIGINT reached the process being retired (which passed it on) and the shepherd
    (which queued its own copy), or the restored process and the shepherd. Each press here waits
    for its handler's mark, so presses never merge; one mark per press, none extra."""
    stop = tmp_path / "stop"
    pid, fd = _in_pty(HEADER + f"""
    signal.signal(signal.SIGINT, lambda *a: os.write(1, b"<INT>"))
    rounds = fp.persist_int("rounds")
    n = fp.tsetjmp()
    if rounds.add() == 1:
        print("ready", flush=True)
    if os.path.exists({str(stop)!r}):
        print("stopped", flush=True)
        sys.exit(0)
    fp.tlongjmp(n)
    """, tmp_path)
    presses = 100
    out = bytearray()
    try:
        _read_until(fd, b"ready", out)
        for i in range(presses):
            time.sleep(random.uniform(0, 0.003))     # a random moment of the restore loop
            os.write(fd, b"\x03")
            _read_until(fd, b"<INT>", out, count=i + 1)
        _stop(fd, stop, out)
    finally:
        code = wait_exit(pid)
        os.close(fd)
    assert out.count(b"<INT>") == presses, bytes(out[-300:])
    assert code == 0


def test_ctrl_c_while_a_restored_process_rejoins_the_terminal_is_handled_once(tmp_path):
    """The exact instant of the duplicate: the restored process has rejoined the terminal's
    process group but is not up yet, and Ctrl-C reaches both it and the shepherd. It is paused
    there (a trace function it inherited stops it at that line) while the test presses Ctrl-C."""
    stop = tmp_path / "stop"
    pid, fd = _in_pty(HEADER + f"""
    import inspect
    from forkpoint import _frozen
    signal.signal(signal.SIGINT, lambda *a: os.write(1, b"<INT>"))
    paused = fp.persist_int("paused")
    src, first = inspect.getsourcelines(_frozen.resume)
    line = first + next(i for i, l in enumerate(src) if "rt.chan.send(_UP)" in l)
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == line and paused.value == 0:
            paused.value = 1
            os.write(1, b"<PAUSE>")
            time.sleep(1.0)             # the test presses Ctrl-C now
        return local
    sys.settrace(lambda f, e, a: local if f.f_code is _frozen.resume.__code__ else None)
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        fp.tlongjmp(n)
    sys.settrace(None)
    while not os.path.exists({str(stop)!r}):
        time.sleep(0.01)
    print("stopped", flush=True)
    """, tmp_path)
    out = bytearray()
    try:
        _read_until(fd, b"<PAUSE>", out)
        os.write(fd, b"\x03")
        _read_until(fd, b"<INT>", out)
        _stop(fd, stop, out)
    finally:
        code = wait_exit(pid)
        os.close(fd)
    assert out.count(b"<INT>") == 1, bytes(out)
    assert code == 0


@pytest.mark.parametrize("handled", [False, True])
def test_sigterm_during_a_backoff_ends_or_reaches_the_program_at_once(tmp_path, handled):
    """Issue 13.6: SIGTERM during a crash-loop backoff waited for the backoff (seconds), and was
    lost when the restored process crashed again before its handler ran. The backoff here is 60 s
    and the test gives the program 30: a SIGTERM the program does not handle ends it at once (as
    it would without forkpoint); one it handles cuts the backoff short and runs the handler before
    any program code."""
    proc = start_py(HEADER + f"""
    count = fp.persist_int("c")
    if {handled}:
        def term(*a):
            print("term", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
    fp.recover_on(signal.SIGSEGV, backoff=60, max_recoveries=100)
    n = fp.tsetjmp()
    print("up", count.add(), os.readlink("/proc/self"), flush=True)
    time.sleep(0.05)
    ctypes.string_at(0)
    """, tmp_path)
    lines = Lines(proc)
    live = int(lines.until("up 2").split()[2])    # its crash is followed by a 60 s backoff
    wait_for(lambda: _killed(live), timeout=20)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    while lines.next() != "<EOF>":
        pass
    if handled:
        assert code == 0 and [line.split()[:2] for line in lines.seen] == [["up", "1"], ["up", "2"], ["term"],
                                                                            ["<EOF>"]], (code, lines.seen)
    else:
        assert code == -signal.SIGTERM, code


def _killed(pid: int) -> bool:
    """Whether ``pid`` is gone, a zombie, or has a SIGKILL pending (retired by the shepherd)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return fields["State"].split()[0] in ("Z", "X") or bool(pending >> (signal.SIGKILL - 1) & 1)


def test_every_catchable_signal_sent_to_the_pid_reaches_the_program_once(tmp_path):
    """Issue 13.6: only eight signals were forwarded; gunicorn's master sends SIGABRT to a worker
    on timeout, and programs use SIGPWR, SIGURG, real-time signals, ... Each one sent to the PID
    runs the program's handler exactly once."""
    sigs = [signal.SIGABRT, signal.SIGPWR, signal.SIGURG, signal.SIGVTALRM, signal.SIGPROF,
            signal.SIGXCPU, signal.SIGPIPE, signal.SIGTRAP, signal.SIGSYS, signal.SIGIO,
            signal.SIGRTMIN + 1, signal.SIGRTMAX, signal.SIGUSR1]
    proc = start_py(HEADER + f"""
    got = []
    for s in {[int(s) for s in sigs]}:
        signal.signal(s, lambda signum, frame: got.append(signum))
    fp.tsetjmp()
    print("ready", flush=True)
    sys.stdin.readline()
    time.sleep(0.5)
    print("got", sorted(got), flush=True)
    """, tmp_path)
    lines = Lines(proc)
    lines.until("ready")
    for s in sigs:
        os.kill(proc.pid, s)
        time.sleep(0.02)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert lines.until("got") == f"got {sorted(int(s) for s in sigs)}"
    assert proc.wait(10) == 0


def test_a_signal_the_program_sends_its_own_group_arrives_once(tmp_path):
    """Issue 13.6: a signal sent to the whole process group reaches the live process directly and
    the shepherd, which forwarded it again. When the program itself signals its group, the
    shepherd knows the sender and leaves it."""
    proc = start_py(HEADER + """
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    fp.tsetjmp()
    os.killpg(0, signal.SIGUSR1)           # its own process group (start_py gives it one)
    time.sleep(0.5)
    print("got", len(got), flush=True)
    """, tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip() == "got 1"


GROUP_SIGNALS = HEADER + """
    got = []
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, lambda sig, frame: got.append(int(sig)))
    if sys.argv[1] == "forkpoint":
        fp.tsetjmp()
    print("ready", flush=True)
    sys.stdin.readline()
    time.sleep(0.3)
    print("got", sorted(got), flush=True)
"""


def _signalled(tmp_path, how: str, send) -> list[int]:
    """Run GROUP_SIGNALS (``how``: "plain" or "forkpoint"), call ``send(pid)`` once it is ready,
    and return the signals its handlers ran for, sorted."""
    proc = start_py(GROUP_SIGNALS, tmp_path, how)
    try:
        lines = Lines(proc)
        lines.until("ready")
        if how == "forkpoint":
            # The shepherd reads signals once its loop runs (its socket is served from there): a
            # signal to the PID before that merges with the group's copy pending there
            # (docs/reliability.md, "Signals in the shepherd's first moments").
            wait_for(lambda: _serving(proc.pid))
        send(proc.pid)
        time.sleep(0.2)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        got = lines.until("got")
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return [int(s) for s in got.removeprefix("got [").removesuffix("]").split(", ") if s]


@pytest.mark.parametrize("how", ["plain", "forkpoint"])
def test_a_signal_sent_to_the_group_from_outside_arrives_once(tmp_path, how):
    """Invariant 10: ``kill -TERM -PGID`` (a shell's ``kill %1``, coreutils ``timeout``) reaches the
    live process directly and the shepherd, which cannot tell it from a signal sent to its PID
    alone; it is handled once, as without forkpoint, while one sent to the PID still arrives."""
    def send(pid: int) -> None:
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.killpg(os.getpgid(pid), s)
            time.sleep(0.2)         # each is handled (or forwarded) before the next comes
        os.kill(pid, signal.SIGUSR1)

    got = _signalled(tmp_path, how, send)
    assert got == sorted(int(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGUSR1))


def _serving(face: int) -> bool:
    with open("/proc/net/unix") as f:
        return any(line.rstrip("\n").endswith(f"/forkpoint-{face}/control.sock") for line in f)


def _witness_of(face: int) -> int:
    with open(f"/proc/{face}/task/{face}/children") as f:
        kids = [int(p) for p in f.read().split()]
    return next((pid for pid in kids if _procfs.comm(pid) == "fp-witness"), 0)


def test_a_witness_killed_from_outside_is_replaced(tmp_path):
    """Invariant 11: a member of forkpoint killed at any instant does not end the program; the
    witness of group signals is replaced, and a signal to the group is again handled once."""
    def send(pid: int) -> None:
        first = wait_for(lambda: _witness_of(pid))
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: _witness_of(pid) not in (0, first), timeout=5)
        os.killpg(os.getpgid(pid), signal.SIGUSR1)

    assert _signalled(tmp_path, "forkpoint", send) == [int(signal.SIGUSR1)]


def _pending(pid: int) -> int:
    """The signals ``pid`` has pending (its own and its process's), as a mask."""
    return _procfs.pending_mask(pid)


def test_group_signals_are_told_apart_while_the_witness_lags(tmp_path):
    """Invariant 10 with a witness that does not run (a loaded machine; here it is stopped): a
    signal sent to the group while the witness still owes the drop of another is handled once,
    and a signal sent to the PID right after the same signal to the group is handled again.

    The witness used to be set aside whole while a drop it was asked for was unanswered, and a
    group signal then came back to the live process a second time if it had handled its own copy
    before the shepherd read its: SIGINT was handled twice here, and so was the group's SIGUSR1.
    The shepherd is stopped too while the live process handles the SIGINT, as a busy machine may
    leave it unscheduled; every other step waits for the state it needs, not for time."""
    proc = start_py(HEADER + """
    got = []
    def handler(sig, frame):
        got.append(int(sig))
        print("handled", int(sig), flush=True)
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, handler)
    fp.tsetjmp()
    print("ready", flush=True)
    sys.stdin.readline()
    time.sleep(0.3)
    print("got", sorted(got), flush=True)
    """, tmp_path)
    face = proc.pid
    group = os.getpgid(face)
    witness = 0
    try:
        lines = Lines(proc)
        lines.until("ready")
        witness = wait_for(lambda: _witness_of(face))
        os.kill(witness, signal.SIGSTOP)
        wait_for(lambda: _state(witness) == "T")

        def sent_to_group(sig: int) -> None:
            os.killpg(group, sig)
            assert lines.until("handled") == f"handled {int(sig)}"
            wait_for(lambda: not _pending(face) & 1 << (sig - 1))   # the shepherd read its copy

        sent_to_group(signal.SIGTERM)        # the witness is asked to drop it, and does not answer
        os.kill(face, signal.SIGSTOP)        # the face's SIGSTOP stops the shepherd alone
        wait_for(lambda: _state(face) == "T")
        os.killpg(group, signal.SIGINT)
        assert lines.until("handled") == f"handled {int(signal.SIGINT)}"
        os.kill(face, signal.SIGCONT)
        wait_for(lambda: _state(face) != "T" and not _pending(face) & 1 << (signal.SIGINT - 1))
        sent_to_group(signal.SIGUSR1)
        os.kill(face, signal.SIGUSR1)
        assert lines.until("handled") == f"handled {int(signal.SIGUSR1)}"
        os.kill(witness, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        got = lines.until("got")
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if witness:
            try:
                os.kill(witness, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert got == "got " + str(sorted(int(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT,
                                                         signal.SIGUSR1)))


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_job_control_stop_and_continue_through_the_face_pid(tmp_path):
    """Issue 13.6: `kill -TSTP PID` (and SIGTTIN, SIGTTOU) stopped the shepherd alone while the
    program ran on. Now the program stops, the face PID stops with it (its parent sees it
    stopped, as a shell does), and SIGCONT to the face continues both."""
    proc = start_py(HEADER + """
    fp.tsetjmp()
    print("live", os.readlink("/proc/self"), flush=True)
    ticks = 0
    while True:
        ticks += 1
        print("tick", ticks, flush=True)
        time.sleep(0.02)
    """, tmp_path)
    try:
        _stop_and_continue(proc)
    finally:
        proc.kill()
        proc.wait(10)


def _stop_and_continue(proc) -> None:
    lines = Lines(proc)
    live = int(lines.until("live").split()[1])
    lines.until("tick")
    for stop in (signal.SIGTSTP, signal.SIGTTIN):
        os.kill(proc.pid, stop)
        wait_for(lambda: _state(live) == "T" and _state(proc.pid) == "T")
        _, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == stop, status
        while not lines.q.empty():
            lines.next()
        time.sleep(0.3)
        assert lines.q.empty(), "the program must not run while stopped"
        os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: _state(live) != "T" and _state(proc.pid) != "T")
        lines.until("tick")


def test_a_program_that_ignores_sigterm_during_a_restore_keeps_running(tmp_path):
    """A signal that comes while no live process is up is judged by the checkpoint's own
    dispositions: ignored there, it is dropped (it does not end the program)."""
    proc = start_py(HEADER + """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fp.recover_on(signal.SIGSEGV, backoff=1, max_recoveries=100)
    count = fp.persist_int("c")
    n = fp.tsetjmp()
    print("up", count.add(), flush=True)
    if count.value >= 4:
        sys.exit(0)
    time.sleep(0.05)
    ctypes.string_at(0)
    """, tmp_path)
    lines = Lines(proc)
    lines.until("up 2")
    time.sleep(0.2)                     # in the 1 s backoff
    proc.send_signal(signal.SIGTERM)
    lines.until("up 4", timeout=30)
    assert proc.wait(20) == 0


@pytest.mark.parametrize("how", ["plain", "segfault", "tlongjmp", "checkpointed"])
def test_an_asyncio_signal_that_came_during_a_rolled_back_step_is_handled_once(tmp_path, how):
    """A signal for ``loop.add_signal_handler()`` that arrives while a step of the loop runs
    synchronously is only written into the loop's self-pipe: its handler runs when the loop reads
    the byte. If that step is then rolled back, the byte is all that is left of the signal. The
    restored loop used to drop such bytes, and the handler never ran anywhere (the program ignored
    its SIGTERM); it must run once, as when the step simply ends."""
    p = start_py(HEADER + """
    import asyncio, select
    how = sys.argv[1]
    if how != "plain":
        fp.recover_on(signal.SIGSEGV)
        calls = fp.persist_int("calls")             # the handler's calls, in every process
        crashed = fp.persist_int("crashed")
    else:
        class Counter:
            value = 0
            def add(self):
                self.value += 1
                return self.value
        calls, crashed = Counter(), Counter()

    def until_written(loop):                        # the signal came: its byte is in the pipe
        while not select.select([loop._ssock], [], [], 0)[0]:
            time.sleep(0.001)

    def helper(loop):
        until_written(loop)
        ctypes.string_at(0)
    if how == "checkpointed":
        helper = fp.checkpointed(helper)

    async def main():
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        def on_term():
            calls.add()
            done.set()
        loop.add_signal_handler(signal.SIGTERM, on_term)
        if how in ("segfault", "tlongjmp"):
            n = fp.tsetjmp()
        await asyncio.sleep(0)
        if how == "checkpointed":
            print("step", flush=True)
            try:
                helper(loop)
            except fp.Recovered:
                pass
        elif crashed.add() == 1:
            print("step", flush=True)
            until_written(loop)                     # a step running synchronously meanwhile
            if how == "segfault":
                ctypes.string_at(0)
            elif how == "tlongjmp":
                fp.tlongjmp(n)
        try:
            await asyncio.wait_for(done.wait(), 5.0)
            await asyncio.sleep(0.2)                # a second call would come now
        except asyncio.TimeoutError:
            pass
        print("handler calls", calls.value, flush=True)
    asyncio.run(main())
    """, tmp_path, how)
    out = Lines(p)
    out.until("step")
    os.kill(p.pid, signal.SIGTERM)
    assert out.until("handler calls", timeout=20) == "handler calls 1"
    assert p.wait(20) == 0, p.stderr.read()


@pytest.mark.parametrize("how", ["plain", "segfault", "tlongjmp", "checkpointed", "timeout"])
def test_a_signal_handled_in_a_step_that_is_rolled_back_is_handled_again(tmp_path, how):
    """A handler that ran in a step which then failed did its work in a process the rollback
    throws away: uvicorn's SIGTERM handler had set ``should_exit``, and the server kept serving;
    asyncio.run's Ctrl-C had cancelled the main task, and the program ran on. The restored process
    must handle the signal again, so that the program does what it did with it once: here it
    stops. A signal handled before the checkpoint is part of it, and is not handled again. A
    plain ``tlongjmp()`` is the program's own control flow, not a failure: nothing is replayed
    (a Ctrl-C it caught once would otherwise come back at every later jump)."""
    p = start_py(HEADER + """
    how = sys.argv[1]
    if how != "plain":
        fp.recover_on(signal.SIGSEGV)
        calls = fp.persist_array("calls", 2, "q")   # handler runs in every process: TERM, USR1
    else:
        calls = [0, 0]
    stopping = False                                # the program's own state: rolled back

    def on_term(signum, frame):
        global stopping
        calls[0] += 1
        stopping = True

    def on_usr1(signum, frame):
        calls[1] += 1

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    print("ready", flush=True)
    while calls[1] == 0:                            # SIGUSR1 comes before the checkpoint
        time.sleep(0.005)

    def step(request=None):                         # a transaction (it takes an argument)
        print("step", flush=True)
        while not stopping:                         # until SIGTERM's handler ran here
            time.sleep(0.005)
        if how == "timeout":
            while True:
                pass
        ctypes.string_at(0)

    if how in ("checkpointed", "timeout"):
        step = fp.checkpointed(timeout=1.0 if how == "timeout" else None)(step)
        try:
            step("request")
        except fp.Recovered:
            pass
    elif how == "plain":
        while not stopping:
            print("step", flush=True)
            time.sleep(0.05)
    else:
        n = fp.tsetjmp()
        if not fp.chkpt_status(fp.CHKPT_RECOVERED):
            if how == "tlongjmp":
                print("step", flush=True)
                while not stopping:
                    time.sleep(0.005)
                fp.tlongjmp(n)
            step()
    for _ in range(0 if how == "tlongjmp" else 500):
        if stopping:
            break
        time.sleep(0.01)
    print("stopping", stopping, "TERM handled", calls[0], "USR1 handled", calls[1], flush=True)
    """, tmp_path, how)
    out = Lines(p)
    out.until("ready")
    os.kill(p.pid, signal.SIGUSR1)
    out.until("step")
    os.kill(p.pid, signal.SIGTERM)
    if how == "tlongjmp":
        want = "stopping False TERM handled 1 USR1 handled 1"
    else:                                       # in the failed step, and again after the rollback
        want = f"stopping True TERM handled {1 if how == 'plain' else 2} USR1 handled 1"
    assert out.until("stopping", timeout=20) == want
    assert p.wait(20) == 0, p.stderr.read()


def test_a_signal_forwarded_right_after_a_checkpoint_is_handled_again_after_a_rollback_to_it(tmp_path):
    """The shepherd learns of a checkpoint from a message the live process sends before its fork,
    and of a signal for the program from its signalfd, which it read first: on a busy machine,
    where it ran after both had come, a SIGTERM handled in the step after the checkpoint counted
    as handled before it, and was not handled again after that step crashed (4 of 15 runs of the
    test above with two CPU hogs). Here the shepherd is stopped while both come."""
    p = start_py(HEADER + """
    fp.recover_on(signal.SIGSEGV)
    calls = fp.persist_int("calls")
    stopping = False
    def on_term(signum, frame):
        global stopping
        calls.add()
        stopping = True
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    sys.stdin.readline()                  # the shepherd is stopped now
    fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("step", flush=True)
        while not stopping:
            time.sleep(0.005)
        ctypes.string_at(0)
    for _ in range(500):
        if stopping:
            break
        time.sleep(0.01)
    print("stopping", stopping, "TERM handled", calls.value, flush=True)
    """, tmp_path)
    out = Lines(p)
    try:
        out.until("ready")
        os.kill(p.pid, signal.SIGSTOP)
        wait_for(lambda: _state(p.pid) == "T")
        p.stdin.write("go\n")
        p.stdin.flush()
        out.until("step")                  # its checkpoint's message is waiting for the shepherd
        os.kill(p.pid, signal.SIGTERM)     # and this, too
        os.kill(p.pid, signal.SIGCONT)
        assert out.until("stopping", timeout=20) == "stopping True TERM handled 2"
        assert p.wait(20) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait()


def test_a_program_that_makes_itself_a_group_leader_keeps_its_terminal(tmp_path):
    """A program run from a terminal (here its session leader, as under ``ssh -t``) already leads
    its process group: ``os.setpgrp()`` changes nothing and ``os.setsid()`` fails with EPERM. The
    live process, a child of the face, could do both: it left the terminal's foreground group,
    and Ctrl-C no longer reached the program (found by an audit). Both answer as for the face."""
    pid, fd = _in_pty(HEADER + """
    got = []
    signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    fp.tsetjmp()
    os.setpgrp()
    os.setpgid(0, 0)
    try:
        os.setsid()
        print("setsid allowed", flush=True)
    except PermissionError:
        print("setsid EPERM", flush=True)
    print("leader", os.getpgrp() == os.getpid(), "foreground", os.tcgetpgrp(0) == os.getpgrp(), flush=True)
    print("ready", flush=True)
    while not got:
        time.sleep(0.01)
    print("interrupted", flush=True)
    """, tmp_path)
    out = bytearray()
    try:
        _read_until(fd, b"ready", out)
        os.write(fd, b"\x03")                       # Ctrl-C
        _read_until(fd, b"interrupted", out)
    finally:
        os.close(fd)
    wait_exit(pid)
    assert b"setsid EPERM" in out and b"leader True foreground True" in out, bytes(out)
