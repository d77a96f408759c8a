"""The core engine: tsetjmp/tlongjmp with frozen snapshots and a shepherd that keeps the PID.

Every scenario runs as its own program, with real fork, signals and segfaults.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import Lines, run_py, start_py, wait_for

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time, ctypes
    import forkpoint as fp
"""


def test_restore_any_number_of_times(tmp_path):
    """A checkpoint is not consumed by a restore: a crash loop to the same state keeps working."""
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV, max_recoveries=100)   # no crash-loop budget in this test
    hits = fp.persist_int("hits")
    state = {"untouched": True}
    n = fp.tsetjmp()
    assert state["untouched"], "memory was not restored"
    hits.add()
    if hits.value <= 25:
        state["untouched"] = False
        if hits.value % 2:
            fp.tlongjmp(n)
        ctypes.string_at(0)          # a real segfault, recovered by the shepherd
    print("restores", fp.chkpt_status(fp.CKPT_NUMCHKPTS), hits.value, len(fp.history()))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["restores", "1", "26", "25"]


def test_chkpt_status_follows_the_paper(tmp_path):
    r = run_py(HEADER + """
    import errno
    for kind in (fp.CKPT_FROM_STATE, fp.CKPT_TO_STATE):
        try:
            fp.chkpt_status(kind)
            raise SystemExit("no EINVAL")
        except OSError as e:
            assert e.errno == errno.EINVAL
    print("before", fp.chkpt_status(fp.CHKPT_RECOVERED), fp.chkpt_status(fp.CKPT_SIGTYPE),
          fp.chkpt_status(fp.CKPT_NUMCHKPTS), fp.current_state())
    def handler(signum, frame):
        fp.tlongjmp(0)
    signal.signal(signal.SIGUSR1, handler)
    one = fp.tsetjmp()
    two = fp.tsetjmp()
    three = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        os.kill(os.getpid(), signal.SIGUSR1)
        raise SystemExit("handler did not jump")
    print("after", one, two, fp.chkpt_status(fp.CHKPT_RECOVERED), fp.chkpt_status(fp.CKPT_FROM_STATE),
          fp.chkpt_status(fp.CKPT_TO_STATE), fp.chkpt_status(fp.CKPT_SIGTYPE),
          fp.chkpt_status(fp.CKPT_NUMCHKPTS), fp.current_state(), flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "before 0 0 0 0"
    # restored to 3 (the current state) from state 3, by the handler's signal
    assert lines[1] == f"after 1 2 1 3 3 {int(signal.SIGUSR1)} 3 3"


def test_a_jump_reports_the_signal_of_the_handler_it_was_made_from(tmp_path):
    """Invariant: tlongjmp(0) reports the signal whose Python handler it was called from, however
    deep below the handler, whether the handler is a function serving several signals or a bound
    method; from program code it reports none, handlers installed or not; and finding that out
    never runs a handler object's own code (its __getattr__)."""
    r = run_py(HEADER + """
    class Service:
        def on_signal(self, signum, frame):
            self.below(signum)
        def below(self, signum):
            fp.tlongjmp(0)
    def shared(signum, frame):
        deeper(3)
    def deeper(n):
        if n:
            deeper(n - 1)
        fp.tlongjmp(0)
    class Odd:                               # a callable handler whose attributes are its own code
        def __call__(self, signum, frame):
            pass
        def __getattr__(self, name):
            raise RuntimeError("forkpoint ran a handler's own code")
    service = Service()
    signal.signal(signal.SIGWINCH, Odd())
    signal.signal(signal.SIGUSR1, shared)
    signal.signal(signal.SIGUSR2, shared)
    signal.signal(signal.SIGHUP, service.on_signal)
    step = fp.persist_int("step")
    fp.tsetjmp()
    k = step.add()
    if k > 1:
        print("restored", k - 1, fp.chkpt_status(fp.CKPT_SIGTYPE), flush=True)
    if k == 1:
        os.kill(os.getpid(), signal.SIGUSR2)
    elif k == 2:
        os.kill(os.getpid(), signal.SIGHUP)
    elif k == 3:
        deeper(5)                            # program code, not a handler
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"restored 1 {int(signal.SIGUSR2)}", f"restored 2 {int(signal.SIGHUP)}",
                                     "restored 3 0"], r.stdout


def test_bad_checkpoint_numbers_raise_and_change_nothing(tmp_path):
    r = run_py(HEADER + """
    for bad in (0, 1, -1):
        try:
            fp.tlongjmp(bad)
        except fp.NoSuchCheckpoint as e:
            assert isinstance(e, LookupError)
            print("before-first", bad, "refused")
    n = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        raise SystemExit("restored by a bad request")
    m = fp.tsetjmp()
    for bad in (-3, 99, "x", True):
        try:
            fp.tlongjmp(bad)
        except fp.NoSuchCheckpoint:
            print("refused", bad)
    fp.discard(n)
    for call in (lambda: fp.tlongjmp(n), lambda: fp.discard(n)):
        try:
            call()
        except fp.NoSuchCheckpoint as e:
            print("discarded:", e)
    print("ids", [c.id for c in fp.checkpoints()], "pid unchanged", os.getpid() == fp.shepherd_pid())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("before-first") == 3
    assert "refused -3" in out and "refused 99" in out and "refused x" in out and "refused True" in out
    assert out.count("discarded: no checkpoint 1") == 2
    assert "ids [2] pid unchanged True" in out


def test_exit_status_and_pid_are_the_programs(tmp_path):
    """Invariant 2: the PID a parent waits on is the program's, with the program's exit status."""
    r = run_py(HEADER + """
    fp.tsetjmp()
    print(os.getppid(), flush=True)
    sys.exit(7)
    """, tmp_path)
    assert r.returncode == 7
    code = HEADER + """
    fp.tsetjmp()
    print(os.getppid(), flush=True)
    ctypes.string_at(0)
    """
    r = run_py(code, tmp_path)
    assert r.returncode == -signal.SIGSEGV, "an unrecovered crash must look like one to the parent"
    proc = start_py(HEADER + """
    fp.tsetjmp()
    print("ready", os.getpid(), os.getppid(), fp.shepherd_pid(), flush=True)
    time.sleep(60)
    """, tmp_path)
    lines = Lines(proc)
    _, pid, ppid, face = lines.until("ready").split()
    assert int(face) == int(pid) == proc.pid          # Invariant 10: one PID, the face's
    assert int(ppid) == os.getpid()                   # and the face's real parent
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGBUS])
def test_death_of_the_live_process_is_the_programs_death(tmp_path, sig):
    """Invariant 2: without recovery, the face PID dies by the very signal the live process died of."""
    r = run_py(HEADER + f"""
    fp.tsetjmp()
    os.kill(os.getpid(), {int(sig)})
    time.sleep(5)
    """, tmp_path)
    assert r.returncode == -sig, (r.returncode, r.stderr)


def test_signals_to_the_pid_reach_the_live_program_exactly_once(tmp_path):
    proc = start_py(HEADER + """
    got = []
    def handler(signum, frame):
        got.append(signum)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, handler)
    rounds = fp.persist_int("rounds")
    n = fp.tsetjmp()
    while True:
        got.clear()
        print("ready", rounds.value, os.readlink("/proc/self"), flush=True)   # the real process
        deadline = time.time() + 1.0
        while time.time() < deadline:
            time.sleep(0.01)
        print("got", sorted(got), flush=True)
        rounds.add()
        if rounds.value >= 3:
            break
        fp.tlongjmp(n)       # the next round runs in a restored process
    """, tmp_path)
    lines = Lines(proc)
    pids = set()
    for _ in range(3):
        _, _, pid = lines.until("ready").split()
        pids.add(pid)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(proc.pid, s)
        got = lines.until("got")
        assert got == "got " + str(sorted(int(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                             signal.SIGUSR1, signal.SIGUSR2)))
    assert len(pids) == 3, "rounds 2 and 3 must run in restored processes"
    assert proc.wait(10) == 0


def test_ctrl_c_in_a_terminal_reaches_the_program_once(tmp_path):
    """The terminal signals its whole foreground group; the shepherd must not forward it again."""
    import pty

    path = tmp_path / "prog.py"
    path.write_text(__import__("textwrap").dedent(HEADER + """
    count = 0
    def handler(signum, frame):
        global count
        count += 1
    signal.signal(signal.SIGINT, handler)
    fp.tsetjmp()
    print("ready", flush=True)
    t = time.time()
    while time.time() - t < 1.5:
        time.sleep(0.01)
    print("count", count, flush=True)
    """))
    from conftest import clean_env

    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, str(path)], clean_env())
    out = b""
    try:
        while b"ready" not in out:
            out += os.read(fd, 1024)
        time.sleep(0.2)
        os.write(fd, b"\x03")
        while b"count" not in out or not out.rstrip().endswith(b"1") and b"count 0" not in out:
            chunk = os.read(fd, 1024)
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert b"count 1" in out, out
    assert os.waitstatus_to_exitcode(status) == 0


def test_exactly_one_live_process(tmp_path):
    """Invariant 1: a process that asked for a restore never runs program code again."""
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGKILL, signal.SIGSEGV, max_recoveries=100)
    owner = fp.persist_int("owner")
    clashes = fp.persist_int("clashes")
    rounds = fp.persist_int("rounds")
    n = fp.tsetjmp()
    while rounds.add() < 40:
        owner.value = os.getpid()
        for _ in range(2000):
            if owner.value != os.getpid():
                clashes.add()
                break
        if rounds.value % 3 == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        elif rounds.value % 3 == 1:
            ctypes.string_at(0)
        fp.tlongjmp(n)
    print("clashes", clashes.value, "rounds", rounds.value)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["clashes", "0", "rounds", "40"]


def _program_processes(face: int) -> list[psutil.Process]:
    try:
        return psutil.Process(face).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("ending", ["exit", "crash", "kill-face"])
def test_nothing_outlives_the_program(tmp_path, ending):
    """Invariant 3: after the program ends, every forkpoint process is gone within a second."""
    proc = start_py(HEADER + """
    for i in range(4):
        fp.tsetjmp()
    print("ready", flush=True)
    sys.stdin.readline() if False else None
    time.sleep(0.5)
    if sys.argv[1] == "exit":
        sys.exit(0)
    if sys.argv[1] == "crash":
        ctypes.string_at(0)
    time.sleep(60)
    """, tmp_path, ending)
    Lines(proc).until("ready")
    family = wait_for(lambda: len(_program_processes(proc.pid)) >= 9 and _program_processes(proc.pid))
    pids = [p.pid for p in family]
    if ending == "kill-face":
        proc.kill()
    ended = time.monotonic()
    proc.wait(10)
    for pid in pids:
        def gone(pid=pid):
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE or False
            except psutil.NoSuchProcess:
                return True
        wait_for(gone, timeout=1.0)
    assert time.monotonic() - ended < 1.5


def test_no_zombies_and_the_programs_own_children_work(tmp_path):
    """Invariant 4: snapshots are not the program's children; its wait/subprocess use is undisturbed."""
    r = run_py(HEADER + """
    import subprocess
    fp.recover_on(signal.SIGSEGV)
    rounds = fp.persist_int("rounds")
    n = fp.tsetjmp()
    try:
        os.wait()
        print("wait saw a child")
    except ChildProcessError:
        print("no children")
    out = subprocess.run(["sh", "-c", "exit 5"]).returncode
    pid = os.fork()
    if pid == 0:
        os._exit(9)
    _, status = os.waitpid(pid, 0)
    print("subprocess", out, "fork", os.waitstatus_to_exitcode(status), flush=True)
    if rounds.add() < 5:
        ctypes.string_at(0)
    import psutil
    time.sleep(0.2)
    face = psutil.Process(os.getppid())
    zombies = [p.pid for p in face.children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
    print("zombies", zombies)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("no children") == 5
    assert r.stdout.count("subprocess 5 fork 9") == 5
    assert "zombies []" in r.stdout


def test_snapshots_are_inert(tmp_path):
    """Invariant 5: group signals, a hang-up and timers never wake or kill a frozen snapshot."""
    proc = start_py(HEADER + """
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(s, lambda *a: None)
    signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
    a = fp.tsetjmp()
    b = fp.tsetjmp()
    print("ready", flush=True)
    sys.stdin.readline()
    signal.setitimer(signal.ITIMER_REAL, 0)
    print("status", fp.chkpt_status(fp.CHKPT_RECOVERED), [c.id for c in fp.checkpoints()],
          [len(c.spares) for c in fp.checkpoints()], flush=True)
    """, tmp_path)
    lines = Lines(proc)
    lines.until("ready")
    # the live process, two checkpoints of two processes each, and the witness of group signals
    family = wait_for(lambda: len(_program_processes(proc.pid)) == 6 and _program_processes(proc.pid))
    frozen = [p for p in family if p.name().startswith(("fp-snap", "fp-spare"))]
    assert len(frozen) == 4
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM):
        os.killpg(os.getpgid(proc.pid), s)
    for p in frozen:
        os.kill(p.pid, signal.SIGHUP)
        os.kill(p.pid, signal.SIGTERM)
    time.sleep(0.5)
    for p in frozen:
        assert p.is_running() and p.status() == psutil.STATUS_SLEEPING
    proc.stdin.write("go\n")
    proc.stdin.flush()
    status = lines.until("status")
    assert status.startswith("status 0 [1, 2]"), "a snapshot was woken or lost"
    assert proc.wait(10) == 0
    for p in frozen:
        wait_for(lambda p=p: not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, timeout=1.0)


def test_buffered_output_is_not_printed_twice(tmp_path):
    """Invariant 6: stdio is flushed before the fork, so a restore cannot replay buffered output."""
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV)
    print("before the checkpoint")        # block-buffered: stdout is a pipe, no PYTHONUNBUFFERED
    libc = ctypes.CDLL(None)
    libc.printf(b"from C before\\n")
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        ctypes.string_at(0)
    print("after")
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("before the checkpoint") == 1
    assert r.stdout.count("from C before") == 1
    assert r.stdout.count("after") == 1


def test_file_offsets_rewind_and_sockets_survive(tmp_path):
    """Invariant 7: read offsets go back; pipes and a listening socket work after a restore."""
    data = tmp_path / "data.txt"
    data.write_text("".join(f"line {i}\n" for i in range(100)))
    r = run_py(HEADER + f"""
    import socket
    fp.recover_on(signal.SIGSEGV)
    f = open({str(data)!r})
    first = f.readline()
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    rfd, wfd = os.pipe()
    n = fp.tsetjmp()
    print("next line", f.readline().strip(), flush=True)
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        for _ in range(50):
            f.readline()
        os.write(wfd, b"x")
        ctypes.string_at(0)
    os.write(wfd, b"y")
    print("pipe", os.read(rfd, 10), flush=True)
    c = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    c.sendall(b"hello")
    print("socket", conn.recv(5))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("next line line 1") == 2
    assert "pipe b'xy'" in r.stdout
    assert "socket b'hello'" in r.stdout


def test_threads_are_refused_clearly(tmp_path):
    """Invariant 13: fork copies one thread; a checkpoint with others alive is refused unless allowed."""
    r = run_py(HEADER + """
    import threading
    ev = threading.Event()
    t = threading.Thread(target=ev.wait, name="worker")
    t.start()
    try:
        fp.tsetjmp(allow_threads=True)
    except fp.ThreadsAlive as e:
        print("first use refused:", e)
    ev.set(); t.join()
    fp.start()                       # the program goes on in the shepherd's child from here
    ev = threading.Event()
    t = threading.Thread(target=ev.wait, name="worker")
    t.start()
    try:
        fp.tsetjmp()
    except fp.ThreadsAlive as e:
        print("refused:", e)
    n = fp.tsetjmp(allow_threads=True)
    def other():
        for call in (fp.tsetjmp, lambda: fp.tlongjmp(n)):
            try:
                call()
            except fp.WrongThread as e:
                print("wrong thread:", e)
    w = threading.Thread(target=other); w.start(); w.join()
    ev.set(); t.join()
    print("still running", n, fp.chkpt_status(fp.CHKPT_RECOVERED))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "first use refused: 1 other thread(s) alive" in r.stdout
    assert "refused: 1 other thread(s) alive (worker)" in r.stdout
    assert r.stdout.count("wrong thread:") == 2
    assert "still running 1 0" in r.stdout


def test_a_protected_call_in_a_pool_thread_is_refused_as_the_wrong_thread_with_what_to_do(tmp_path):
    """Invariant: a call that can never be checkpointed is refused with the reason that holds.
    A ``@checkpointed`` function run by a thread pool (``ThreadPoolExecutor``, APScheduler's thread
    executor) got ``ThreadsAlive``, whose advice (start forkpoint before starting threads) only turned
    it into ``WrongThread``; now it is ``WrongThread`` at once, before and after the start, naming
    the pool and the way out (found by an audit of job runners, 2026-11-29)."""
    r = run_py(HEADER + """
    import concurrent.futures
    @fp.checkpointed(timeout=2)
    def job(n):
        return n * 2
    for when in ("before the start", "after the start"):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                print(when, pool.submit(job, 1).result())
            except fp.ForkpointError as e:
                print(when, type(e).__name__, "ThreadPoolExecutor" in str(e), "processes" in str(e))
        fp.start()
    print("main thread", job(2))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["before the start WrongThread True True",
                                     "after the start WrongThread True True", "main thread 4"], r.stdout


def test_forkpoints_errors_cross_to_another_process_whole(tmp_path):
    """Invariant: ``Recovered``, ``Quarantined`` and forkpoint's other errors survive pickling with
    their message and attributes, as job runners send them between processes. ``Recovered``
    (keyword-only) failed to unpickle and ``Quarantined``'s message doubled: a process pool whose
    worker protected its task lost every result (``multiprocessing.Pool``'s result handler died) or
    broke (``ProcessPoolExecutor``), and Celery reported a bare ``ForkpointError`` (found by an
    audit of job runners, 2026-11-29). Here a ``ProcessPoolExecutor`` worker segfaults on one
    input: that future raises ``Recovered`` with its attributes, the others return, the pool goes on."""
    r = run_py("""
    import concurrent.futures, ctypes, multiprocessing, pickle, signal
    import forkpoint as fp
    from forkpoint.operator import OperatorError

    @fp.checkpointed(recover_on=(signal.SIGSEGV,))
    def task(n):
        if n == 3:
            ctypes.string_at(0)
        return n * 10

    if __name__ == "__main__":
        for err in (fp.Recovered(signal=11, reason="signal", attempts=1, from_state=2, to_state=1),
                    fp.Quarantined("k"), OperatorError("busy", "it is busy")):
            back = pickle.loads(pickle.dumps(err))
            print(type(back).__name__, str(back) == str(err), back.__dict__ == err.__dict__)
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
            for n, future in enumerate([pool.submit(task, n) for n in range(6)]):
                try:
                    print(n, future.result(timeout=30))
                except fp.Recovered as e:
                    print(n, "Recovered", e.signal, e.to_state >= 1)
        print("done")
    """, tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "Recovered True True", "Quarantined True True", "OperatorError True True",
        "0 0", "1 10", "2 20", "3 Recovered 11 True", "4 40", "5 50", "done"], r.stdout + r.stderr


def test_snapshots_have_recognizable_names(tmp_path):
    """An operator sees every role in ps (fp-shepherd, fp-snap-N, fp-spare-N, fp-witness)."""
    proc = start_py(HEADER + """
    from forkpoint import _prctl
    fp.tsetjmp(); fp.tsetjmp()
    print("ready", _prctl.BACKEND, flush=True)
    time.sleep(30)
    """, tmp_path)
    line = Lines(proc).until("ready")
    expected = os.environ.get("FORKPOINT_EXPECT_PRCTL")
    if expected:
        assert line.split()[1] == expected
    want = ["fp-snap-1", "fp-snap-2", "fp-spare-1", "fp-spare-2", "fp-witness"]
    try:
        wait_for(lambda: sorted(p.name() for p in _program_processes(proc.pid))[:5] == want)
        wait_for(lambda: psutil.Process(proc.pid).name() == "fp-shepherd")
        ps = subprocess.run(["ps", "-o", "comm=", "--ppid", str(proc.pid)], capture_output=True, text=True)
        assert "fp-snap-1" in ps.stdout
    finally:
        proc.kill()
        proc.wait(10)


def test_bounded_checkpoints_keep_pinned_ones(tmp_path):
    r = run_py(HEADER + """
    fp.configure(max_checkpoints=4)
    pinned = fp.tsetjmp(pin=True)
    for _ in range(9):
        fp.tsetjmp()
    print([c.id for c in fp.checkpoints()], [c.pinned for c in fp.checkpoints()])
    try:
        fp.tlongjmp(2)
    except fp.NoSuchCheckpoint:
        print("2 discarded")
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        fp.tlongjmp(pinned)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[1, 8, 9, 10] [True, False, False, False]"
    assert lines[1] == "2 discarded"
    # restored to checkpoint 1: the loop ran again from there
    assert r.stdout.count("[1,") >= 2


def test_death_by_an_unlisted_signal_ends_the_program(tmp_path):
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV)
    fp.tsetjmp()
    os.abort()
    """, tmp_path)
    assert r.returncode == -signal.SIGABRT


def test_recover_on_restores_the_chosen_checkpoint(tmp_path):
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGABRT, signal.SIGKILL, to=1)
    first = fp.tsetjmp()
    at = fp.current_state()
    second = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        os.abort()
    print("at", at, "to", fp.chkpt_status(fp.CKPT_TO_STATE), "from",
          fp.chkpt_status(fp.CKPT_FROM_STATE), "sig", fp.chkpt_status(fp.CKPT_SIGTYPE))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"at 1 to 1 from 2 sig {int(signal.SIGABRT)}"


def test_a_fault_is_reported_and_recovered_before_the_process_is_torn_down(tmp_path):
    """faulthandler tells the shepherd of the segfault at once; its traceback still reaches stderr."""
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV, signal.SIGFPE)
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        def deep_in_the_handler():
            ctypes.string_at(0)
        deep_in_the_handler()
    print("recovered", fp.chkpt_status(fp.CKPT_SIGTYPE) == signal.SIGSEGV, len(fp.history()))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "recovered True 1"
    assert "Fatal Python error: Segmentation fault" in r.stderr
    assert "in deep_in_the_handler" in r.stderr


def test_a_signal_forwarded_during_a_restore_reaches_the_restored_program(tmp_path):
    """A signal that reached the live process while it was inside tlongjmp (signals blocked) is not
    lost with it: the restored process gets it."""
    proc = start_py(HEADER + """
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("ready", flush=True)
        sys.stdin.readline()
        from forkpoint import _sigutil
        _sigutil.block_all()                  # as tlongjmp does, from here to its death
        os.kill(fp.shepherd_pid(), signal.SIGUSR1)   # forwarded to us: pending, blocked
        time.sleep(0.3)
        fp.tlongjmp(n)
    t = time.time()
    while not got and time.time() - t < 3:
        time.sleep(0.01)
    print("restored got", len(got), flush=True)
    """, tmp_path)
    lines = Lines(proc)
    lines.until("ready")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert lines.until("restored got") == "restored got 1"
    assert proc.wait(10) == 0


def test_a_crash_loop_keeps_no_spare_beyond_the_number_asked_for(tmp_path):
    """Invariant 12 in a crash loop: a checkpoint whose restores wait for copies never keeps more
    spares than asked for, and each copy is asked for once (no spare left over afterwards)."""
    r = run_py(HEADER + """
    jumps = fp.persist_int("jumps")
    most = fp.persist_int("most")
    n = fp.tsetjmp(spares=1)
    k = jumps.add()
    if k > 1:
        spares = max(len(c.spares) for c in fp.checkpoints())
        most.value = max(most.value, spares)
    if k <= 40:
        fp.tlongjmp(n)               # fails again at once: every restore waits for a new copy
    time.sleep(0.5)
    print("most", most.value, "now", [len(c.spares) for c in fp.checkpoints()], flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    most, now = r.stdout.split()[1], r.stdout.split(" now ")[1].strip()
    assert int(most) <= 1, r.stdout
    assert now == "[1]", r.stdout


@pytest.mark.parametrize("args", [
    (5, False, 0, "GET /", 123.456), (7, True, 1, None, 0.0), (1, False, 0, 'k"\\\u00e9\n', 1e20),
    (2, False, 0, None, float("inf")), (3, False, 0, None, 5), (4, False, 2, "x" * 64, -0.0)])
def test_the_hot_messages_are_encoded_byte_for_byte_as_encode_does(args):
    """tsetjmp()'s Snap and a committing call's Discard are formatted in one operation each (fewer
    pages touched while the keeper shares them); the shepherd must read exactly what encode() writes."""
    from forkpoint import _channel
    assert _channel.encode_snap(*args) == _channel.encode(_channel.Snap(*args))
    if args[4] == args[4] and abs(args[4]) != float("inf"):
        assert _channel.decode(_channel.encode_snap(*args)) == _channel.Snap(*args)
    n, current = args[0] * 10**9, args[2]
    assert _channel.encode_commit(n, current) == _channel.encode(_channel.Discard(n, quiet=True, current=current))
    assert _channel.decode(_channel.encode_commit(n, current)) == _channel.Discard(n, quiet=True, current=current)


PROGRAM_WITH_A_POOL = """
    import concurrent.futures, os, sys, threading
    USE = sys.argv[1] == "forkpoint"
    if USE:
        import forkpoint as fp
        fp.start()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    print(list(pool.map(abs, [-1, -2])), flush=True)
    worker = threading.Thread(target=threading.Event().wait, name="waits-for-ever", daemon=True)
    worker.start()
    if USE:
        n = fp.tsetjmp(allow_threads=True)
        if not fp.chkpt_status(fp.CHKPT_RECOVERED):
            fp.tlongjmp(n)
    else:
        pid = os.fork()           # the same copy of one thread, by os.fork() without forkpoint
        if pid:
            os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(sorted(t.name for t in threading.enumerate()), flush=True)
    print("exiting", flush=True)
"""


def test_threads_a_checkpoint_left_behind_are_not_waited_for_at_exit(tmp_path):
    """Invariant: ``allow_threads=True`` copies only the calling thread, and a restored program
    behaves as the child of an ``os.fork()`` does: ``threading`` no longer lists the threads it
    does not have, and its exit does not wait for them. The raw clone skips the at-fork hook that
    tells ``threading`` so: a restored program that had used a ``ThreadPoolExecutor`` once hung at
    exit for ever (found by an audit, 2026-11-29; on 3.13 the wait is in C)."""
    plain = run_py(PROGRAM_WITH_A_POOL, tmp_path, "fork", timeout=30)
    fp = run_py(PROGRAM_WITH_A_POOL, tmp_path, "forkpoint", timeout=30)
    assert plain.returncode == 0, plain.stderr
    assert fp.returncode == 0, fp.stderr
    assert plain.stdout.splitlines() == ["[1, 2]", "['MainThread']", "exiting"]
    assert fp.stdout == plain.stdout


def test_the_idle_threads_of_asyncios_executor_do_not_refuse_a_checkpoint(tmp_path):
    """asyncio's default executor keeps its threads after ``to_thread()``: a checkpoint was refused,
    and with ``allow_threads=True`` the restored loop waited for them for ever (its next
    ``to_thread()``, ``asyncio.run()``'s end; found by an audit). Idle, they are stopped (asyncio
    starts a new executor on next use); busy, the refusal says what to do."""
    r = run_py(HEADER + """
    import asyncio, threading
    async def main():
        await asyncio.to_thread(lambda: None)
        step = fp.persist_int("step")
        n = fp.tsetjmp()
        if step.add() == 1:
            fp.tlongjmp(n)
        print("after the restore:", await asyncio.to_thread(lambda: "a new executor"))
        release = threading.Event()
        job = asyncio.ensure_future(asyncio.to_thread(release.wait))
        await asyncio.sleep(0.1)
        try:
            fp.tsetjmp()
        except fp.ThreadsAlive as e:
            print("busy: refused,", "a job still runs in asyncio's default executor" in str(e))
        release.set()
        await job
    asyncio.run(main())
    print("ended")
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["after the restore: a new executor", "busy: refused, True",
                                     "ended"], r.stdout


def test_a_logging_queue_listener_does_not_refuse_a_checkpoint_and_logs_each_record_once(tmp_path):
    """Invariant: a logging ``QueueListener``'s thread (dictConfig's ``queue_handler``, Litestar's
    default logging) neither refuses forkpoint's start or a checkpoint (``ThreadsAlive``: a gunicorn
    worker answered every request 500) nor is lost by a copy: each record is written once, the
    records queued before a checkpoint before it, and a restored process logs through a new thread
    on the same queue."""
    r = run_py(HEADER + """
    import logging, logging.handlers, queue, threading
    records = queue.Queue()
    listener = logging.handlers.QueueListener(records, logging.StreamHandler(sys.stdout))
    listener.start()
    log = logging.getLogger("app")
    log.addHandler(logging.handlers.QueueHandler(records))
    log.setLevel(logging.INFO)
    fp.recover_on(signal.SIGSEGV)
    crashes = fp.persist_int("crashes")
    for i in range(3):
        log.info("queued before checkpoint %d", i)
    fp.tsetjmp()
    log.info("after the checkpoint, %d crash(es)", crashes.value)
    if crashes.add() <= 2:
        while not records.empty():      # (a crash loses what its process had not written yet,
            time.sleep(0.001)           # as without forkpoint)
        time.sleep(0.05)
        ctypes.string_at(0)
    listener.stop()                 # (handles what is queued)
    print("threads:", threading.active_count(), flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "queued before checkpoint 0", "queued before checkpoint 1", "queued before checkpoint 2",
        "after the checkpoint, 0 crash(es)", "after the checkpoint, 1 crash(es)",
        "after the checkpoint, 2 crash(es)", "threads: 1"], (r.stdout, r.stderr)
    assert "ThreadsAlive" not in r.stderr


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio waits for its children without threads "
                    "from 3.12 (PidfdChildWatcher)")
def test_a_finished_asyncio_child_watcher_thread_does_not_refuse_a_checkpoint(tmp_path):
    """On 3.10 and 3.11 asyncio waits for each subprocess in a thread, which may not have ended yet
    when ``await proc.wait()`` returns: a ``tsetjmp()`` right after was refused in 3-6 of 60 tries
    (found by an audit). A watcher whose child is gone is waited for; one whose child still runs
    refuses the checkpoint, at once, as any live thread does."""
    r = run_py(HEADER + """
    import asyncio
    async def main():
        fp.start()
        refused = 0
        for _ in range(100):
            proc = await asyncio.create_subprocess_exec("true")
            await proc.wait()
            try:
                fp.tsetjmp()
            except fp.ThreadsAlive:
                refused += 1
        print("refused", refused)
        proc = await asyncio.create_subprocess_exec("sleep", "5")
        t = time.monotonic()
        try:
            fp.tsetjmp()
        except fp.ThreadsAlive as e:
            print("running child: refused,", "child watcher" in str(e), time.monotonic() - t < 0.5)
        proc.kill()
        await proc.wait()
    asyncio.run(main())
    """, tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["refused 0", "running child: refused, True True"], r.stdout


def test_a_checkpoint_cut_short_while_a_logging_listener_drains_leaves_the_listener_running(tmp_path):
    """Invariant: a handler that raises (a Ctrl-C) while a checkpoint waits for a logging
    ``QueueListener`` to handle its queue leaves the listener running: its thread ended at the
    queued sentinel and was never started again, so every record logged after was lost."""
    r = run_py(HEADER + """
    import logging, logging.handlers, queue, threading
    class Slow(logging.StreamHandler):
        def emit(self, record):
            time.sleep(0.2)
            super().emit(record)
            self.flush()
    records = queue.Queue()
    listener = logging.handlers.QueueListener(records, Slow(sys.stdout))
    listener.start()
    log = logging.getLogger("app")
    log.addHandler(logging.handlers.QueueHandler(records))
    log.setLevel(logging.INFO)
    fp.start()
    def interrupt(*a):
        raise KeyboardInterrupt
    signal.signal(signal.SIGALRM, interrupt)
    for i in range(3):
        log.info("queued %d", i)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        fp.tsetjmp()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    log.info("logged after the interrupt")
    listener.stop()
    print("threads:", threading.active_count(), flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["queued 0", "queued 1", "queued 2", "interrupted",
                                     "logged after the interrupt", "threads: 1"], (r.stdout, r.stderr)
