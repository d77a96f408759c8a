"""The program as PID 1 of a PID namespace (Python as a container's init, ``docker run`` without
``--init``) sees what it would see without forkpoint there.

The kernel protects a namespace's init: a signal for which init has the default action is dropped
(from inside the namespace, from the init itself, and from the host; only SIGKILL and SIGSTOP from
an ancestor namespace get through), while a real fault still kills it. Its parent is outside its
namespace, so ``os.getppid()`` is 0. Each scenario runs the same program as PID 1 of a new
namespace (``unshare --pid --fork --mount-proc``) with and without forkpoint, and compares.
"""
from __future__ import annotations

import functools
import os
import resource
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import Lines, clean_env, program, wait_for

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time, ctypes, subprocess
    if os.environ.get("FP") == "1":
        import forkpoint as fp
        fp.start()
    STOP = sys.argv[1] + "/stop"
    handled = []
    signal.signal(signal.SIGUSR2, lambda s, f: handled.append(s))

    def wait_stop(tick=lambda: None):
        seen = 0
        while not os.path.exists(STOP):
            tick()
            if len(handled) != seen:
                seen = len(handled)
                print("handled", seen, flush=True)
            time.sleep(0.01)
        print("alive, handled", len(handled), flush=True)
"""


@functools.cache
def _can_unshare() -> str:
    """Why a PID namespace cannot be made here ("" if it can)."""
    try:
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare unavailable: {e}"
    return "" if r.returncode == 0 else f"unshare --pid not permitted: {r.stderr.strip()}"


def _no_core() -> None:
    # unshare dies by its child's signal itself: no core file of it
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _as_init(path, tmp_path, fp: bool, *args: str) -> subprocess.Popen[str]:
    """Run the program at ``path`` as PID 1 of a new PID namespace (``fp``: with forkpoint)."""
    if _can_unshare():
        pytest.skip(_can_unshare())
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable,
                             str(path), str(tmp_path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env(FP="1" if fp else "0"), cwd=str(tmp_path),
                            preexec_fn=_no_core)


def _init_pid(unshare: subprocess.Popen[str]) -> int:
    """The host PID of the namespace's init (unshare's child)."""
    return wait_for(lambda: next((p.pid for p in psutil.Process(unshare.pid).children()), 0))


def _finish(proc: subprocess.Popen[str], tmp_path, lines: Lines | None = None) -> tuple[int, str, str]:
    """Tell the program to end (its stop file) and wait for it: (exit code, stdout, stderr)."""
    (tmp_path / "stop").write_text("")
    try:
        if lines is None:
            out, err = proc.communicate(timeout=20)
        else:                       # its stdout is read by ``lines``
            proc.wait(timeout=20)
            lines.until("<EOF>")
            out, err = "\n".join(lines.seen), proc.stderr.read()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the program did not end") from None
    finally:
        (tmp_path / "stop").unlink()
    return proc.returncode, out, err


def _both(run, tmp_path) -> dict[bool, tuple[int, str]]:
    """``run(fp)`` without and with forkpoint: (exit code, stdout) of each."""
    seen = {}
    for fp in (False, True):
        code, out, err = run(fp)
        seen[fp] = (code, out)
        assert code == seen[False][0] and out == seen[False][1], (fp, code, out, err)
    return seen


def test_signals_init_ignores_are_dropped_and_handled_ones_arrive_once(tmp_path):
    """Invariant: as PID 1, a signal the program does not handle (SIGUSR1, SIGTERM, SIGHUP) is
    dropped, as the kernel drops it for init, whether it comes from the host or from a process in
    the namespace; one it handles arrives exactly once."""
    path = program(HEADER + """
    print("ready", flush=True)
    sent = []

    def from_inside():
        if not sent and os.path.exists(sys.argv[1] + "/inside"):
            sent.append(subprocess.run([sys.executable, "-c", "import os, signal\\n"
                        "for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP): os.kill(1, s)\\n"
                        "os.kill(1, signal.SIGUSR2)"]))
    wait_stop(from_inside)
    """, tmp_path)

    def run(fp: bool) -> tuple[int, str, str]:
        proc = _as_init(path, tmp_path, fp)
        lines = Lines(proc)
        init = _init_pid(proc)
        lines.until("ready")
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP):
            os.kill(init, sig)                        # from the host
        time.sleep(0.3)
        os.kill(init, signal.SIGUSR2)
        lines.until("handled 1")
        (tmp_path / "inside").write_text("")          # from a process inside the namespace
        lines.until("handled 2")
        time.sleep(0.3)                               # a second copy, or a late death, shows now
        (tmp_path / "inside").unlink()
        return _finish(proc, tmp_path, lines)

    assert _both(run, tmp_path)[True] == (0, "ready\nhandled 1\nhandled 2\nalive, handled 2\n<EOF>")


def test_signals_init_sends_itself_are_dropped_unless_handled(tmp_path):
    """Invariant: as PID 1, ``os.kill(os.getpid(), sig)`` of a signal without a handler (even
    SIGKILL and SIGSTOP) does nothing, as the kernel does for init's own signals; a handled one
    arrives once, before the call returns."""
    path = program(HEADER + """
    for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL, signal.SIGSTOP):
        os.kill(os.getpid(), s)
    os.kill(os.getpid(), signal.SIGUSR2)
    print("at once", handled, flush=True)
    wait_stop()
    """, tmp_path)

    def run(fp: bool) -> tuple[int, str, str]:
        return _finish(_as_init(path, tmp_path, fp), tmp_path)

    assert _both(run, tmp_path)[True] == (0, "at once [12]\nalive, handled 1\n")


def test_a_signal_init_ignores_does_not_end_a_restore(tmp_path):
    """Invariant: as PID 1, a signal the checkpoint being restored does not handle, sent during a
    crash loop's backoff (no live process), is dropped as the kernel drops it for init: the
    restore goes on and the program ends normally. (Before, the program ended by SIGTERM.)"""
    path = program(HEADER + """
    fp.recover_on(signal.SIGSEGV, backoff=1.0)
    step = fp.persist_int("step")
    fp.tsetjmp()
    i = step.add()
    if i <= 2:
        print("crash", i, flush=True)
        ctypes.string_at(0)
    print("restored", flush=True)
    wait_stop()
    """, tmp_path)
    proc = _as_init(path, tmp_path, True)
    lines = Lines(proc)
    init = _init_pid(proc)
    lines.until("crash 2")
    time.sleep(0.2)                         # the second restore waits out its 1 s backoff
    os.kill(init, signal.SIGTERM)
    lines.until("restored")
    code, _, err = _finish(proc, tmp_path, lines)
    assert code == 0, err


@pytest.mark.parametrize("how", ["segfault", "abort"])
def test_a_fatal_fault_ends_init_as_without_forkpoint(tmp_path, how):
    """Invariant: as PID 1, the program's death by a fault is what its parent sees without
    forkpoint: the kernel forces a real fault on init (a segfault, and glibc's abort(), whose
    SIGABRT init ignores, ends in one), so the parent sees SIGSEGV, not an exit code."""
    path = program(HEADER + f"""
    if {how!r} == "segfault":
        ctypes.string_at(0)
    os.abort()
    """, tmp_path)

    def run(fp: bool) -> tuple[int, str, str]:
        proc = _as_init(path, tmp_path, fp)
        out, err = proc.communicate(timeout=20)
        return proc.returncode, out, err

    code = _both(run, tmp_path)[True][0]             # the same as without forkpoint, whatever it is
    if how == "segfault" or os.uname().machine == "x86_64":
        assert code == -signal.SIGSEGV               # (glibc's abort() in init: a SIGSEGV on x86_64)


def test_getppid_of_init_and_of_a_process_entered_from_outside_is_0(tmp_path):
    """Invariant: a process whose parent is outside its PID namespace sees ``os.getppid()`` == 0,
    as the kernel answers: the namespace's init, and a process entered into a running namespace
    (``docker exec``, ``nsenter -p``)."""
    path = program(HEADER + """
    print("ppid", os.getppid(), "pid", os.getpid(), flush=True)
    if len(sys.argv) > 2:
        wait_stop()
    """, tmp_path)

    def run(fp: bool) -> tuple[int, str, str]:
        return _finish(_as_init(path, tmp_path, fp), tmp_path)

    assert _both(run, tmp_path)[True] == (0, "ppid 0 pid 1\n")

    init = _as_init(path, tmp_path, False, "wait")    # a running namespace, entered from outside
    lines = Lines(init)
    try:
        lines.until("ppid")
        host = _init_pid(init)
        entered = {}
        for fp in (False, True):
            r = subprocess.run(["nsenter", "-t", str(host), "-p", "-m", sys.executable, str(path),
                                str(tmp_path)], capture_output=True, text=True, timeout=20,
                               env=clean_env(FP="1" if fp else "0"))
            entered[fp] = (r.returncode, r.stdout.split()[:2])
        assert entered[True] == entered[False] == (0, ["ppid", "0"]), entered
    finally:
        _finish(init, tmp_path, lines)


def test_a_signal_init_blocks_and_waits_for_is_delivered(tmp_path):
    """Invariant: as PID 1, a signal the program blocks is queued for it whatever its action, as
    the kernel queues it for init: a program that waits for SIGTERM with ``sigwait()`` (or a
    signalfd) gets ``docker stop``'s SIGTERM, from the host and from itself."""
    path = program(HEADER + """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print("ready", flush=True)
    print("got", int(signal.sigwait({signal.SIGTERM})), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    print("got again", int(signal.sigwait({signal.SIGTERM})), flush=True)
    """, tmp_path)

    def run(fp: bool) -> tuple[int, str, str]:
        proc = _as_init(path, tmp_path, fp)
        lines = Lines(proc)
        init = _init_pid(proc)
        lines.until("ready")
        os.kill(init, signal.SIGTERM)                 # from the host
        return _finish(proc, tmp_path, lines)

    term = int(signal.SIGTERM)
    assert _both(run, tmp_path)[True] == (0, f"ready\ngot {term}\ngot again {term}\n<EOF>")
