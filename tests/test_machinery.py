"""Faults in forkpoint's own machinery (invariant 11): a member killed at an unlucky instant, a
recycled PID, a failed fork, a full descriptor table. None of them may end a program that still
has a usable checkpoint: each ends in a restore or a clear exception in the program.

Each scenario is a real program in a subprocess; kills are real SIGKILLs delivered at exact lines
(through sys.settrace), PIDs are recycled for real inside a PID namespace, and the process and
descriptor limits are real rlimits of an unprivileged uid (root is exempt from ulimit -u).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import SQUEEZED_UID, clean_env, program, run_as, run_py

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time, ctypes, inspect, threading
    import forkpoint as fp
"""

# SIGKILL the process that reaches the line of `function` containing `snippet` (the OOM killer
# striking at that instant): this process, or with forked=True only a process forked from it.
# Python runs the trace function before the line executes.
KILL_AT = """
    def kill_at(function, snippet, sig=signal.SIGKILL, forked=False):
        src, first = inspect.getsourcelines(function)
        target = first + next(i for i, l in enumerate(src) if snippet in l)
        code = function.__code__
        def real_pid():              # os.getpid() answers the program's PID in every process
            return int(os.readlink("/proc/self"))
        me = real_pid()
        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == target and (real_pid() != me) == forked:
                sys.settrace(None)
                signal.pthread_kill(threading.main_thread().ident, sig)
            return local
        sys.settrace(lambda f, e, a: local if f.f_code is code else None)
"""


@pytest.mark.parametrize("where, expected", [
    ("_clone.clone", 1),                       # announced, never forked: its keeper never appears
    ("keeper.pid = pid", 2),                   # forked: the keeper exists, so 2 is usable
])
def test_sigkill_inside_tsetjmp_restores_a_usable_checkpoint(tmp_path, where, expected):
    """Issue 13.1: the OOM killer's SIGKILL inside tsetjmp() (after the checkpoint was announced)
    ended the program with "no checkpoint 2 to restore", although checkpoint 1 was intact. The
    checkpoint being announced is the target only if its keeper exists; else the one before it."""
    r = run_py(HEADER + KILL_AT + f"""
    from forkpoint import snapshots
    fp.recover_on(signal.SIGKILL)
    n1 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", fp.chkpt_status(fp.CKPT_TO_STATE), flush=True)
        sys.exit(0)
    kill_at(snapshots.tsetjmp, {where!r})
    n2 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", n2, flush=True)
        sys.exit(0)
    print("not killed", flush=True)
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip() == f"restored {expected}", (r.stdout, r.stderr)


def test_an_announced_checkpoint_pushes_out_no_other_before_its_keeper_exists(tmp_path):
    """With room for one checkpoint (max_checkpoints=1 here; a tight ulimit -n does the same), the
    announcement of a new one discarded the old one at once; the live process then killed inside
    tsetjmp() left the program with none. The old one now goes when the new keeper introduces
    itself."""
    r = run_py(HEADER + KILL_AT + """
    from forkpoint import snapshots
    fp.configure(max_checkpoints=1)
    fp.recover_on(signal.SIGKILL)
    n1 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", fp.chkpt_status(fp.CKPT_TO_STATE), flush=True)
        sys.exit(0)
    kill_at(snapshots.tsetjmp, "_clone.clone")
    fp.tsetjmp()
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip() == "restored 1", (r.stdout, r.stderr)


def test_a_keeper_killed_before_its_hello_falls_back_to_the_previous_checkpoint(tmp_path):
    """The keeper itself is killed before it introduces itself while a restore waits for it: the
    restore goes to the checkpoint before instead of ending the program."""
    r = run_py(HEADER + KILL_AT + """
    from forkpoint import _frozen
    fp.recover_on(signal.SIGSEGV)
    n1 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", fp.chkpt_status(fp.CKPT_TO_STATE), flush=True)
        sys.exit(0)
    kill_at(_frozen.frozen, "chan, theirs = _channel.pair()", forked=True)   # the new keeper
    n2 = fp.tsetjmp()
    sys.settrace(None)
    time.sleep(0.2)
    ctypes.string_at(0)
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip() == "restored 1", (r.stdout, r.stderr)


def test_a_restore_that_falls_back_replays_the_signals_the_older_checkpoint_undoes(tmp_path):
    """A SIGTERM handled after the newest checkpoint, then a crash; the restore waits for that
    checkpoint's keeper, which is killed before it introduces itself, and goes to the checkpoint
    before. Rolled back to there, the handler's work is undone: it must run again, as for a
    restore that did not fall back (it did not: the fallback replayed nothing)."""
    r = run_py(HEADER + KILL_AT + """
    import subprocess
    from forkpoint import _frozen
    fp.recover_on(signal.SIGSEGV)
    calls = fp.persist_int("calls")
    stopping = False
    def on_term(signum, frame):
        global stopping
        calls.add()
        stopping = True
    signal.signal(signal.SIGTERM, on_term)
    n1 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        for _ in range(500):
            if stopping:
                break
            time.sleep(0.01)
        print("restored", fp.chkpt_status(fp.CKPT_TO_STATE), stopping, calls.value, flush=True)
        sys.exit(0)
    kill_at(_frozen.frozen, "chan, theirs = _channel.pair()", forked=True)   # the new keeper
    n2 = fp.tsetjmp()
    sys.settrace(None)
    subprocess.run(["kill", "-TERM", str(os.getpid())])    # from outside, through the shepherd
    while not stopping:
        time.sleep(0.005)
    ctypes.string_at(0)
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip() == "restored 1 True 2", (r.stdout, r.stderr)


def _in_pid_namespace(code: str, tmp_path) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private PID namespace")
    path = program(code, tmp_path)
    # sh is PID 1 of the namespace (init ignores signals it has no handler for: not our program)
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", '"$0" "$1"; echo "exit=$?"',
           sys.executable, str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=40, env=clean_env())


def test_a_recycled_pid_never_makes_a_new_keeper_look_dead(tmp_path):
    """Issue 13.2: the shepherd remembered pids it had reaped and took a new keeper with a
    recycled pid for dead ("checkpoint 7 was lost (its keeper died) while a restore to it was
    pending: ending"). Here an orphan the shepherd reaps frees a pid and the next keeper gets
    exactly that pid (ns_last_pid in a private PID namespace)."""
    r = _in_pid_namespace(HEADER + """
    fp.recover_on(signal.SIGSEGV)
    n1 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", fp.chkpt_status(fp.CKPT_TO_STATE), flush=True)
        sys.exit(0)
    r, w = os.pipe()
    a = os.fork()
    if a == 0:                       # a child whose child is orphaned: the shepherd adopts it
        b = os.fork()
        if b == 0:
            time.sleep(0.2)
            os._exit(0)
        os.write(w, str(b).encode())
        os._exit(0)
    os.waitpid(a, 0)
    orphan = int(os.read(r, 16))
    while os.path.exists(f"/proc/{orphan}"):      # reaped by the shepherd, as an unknown pid
        time.sleep(0.01)
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(orphan - 1))
    n2 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", n2, flush=True)
        sys.exit(0)
    keeper = [c.pid for c in fp.checkpoints() if c.id == n2]
    print("keeper has the orphan's pid", keeper == [orphan], flush=True)
    ctypes.string_at(0)              # restored to n2 only if its keeper was kept
    """, tmp_path)
    assert "exit=0" in r.stdout, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[:2] == ["keeper has the orphan's pid True", "restored 2"], (r.stdout, r.stderr)


def test_a_spare_carries_its_checkpoint_on_after_its_keeper_is_killed(tmp_path):
    """Issue 13.3: a checkpoint whose keeper was killed stayed listed while it had a spare, and the
    restore after the one that used the spare ended the program (exit 70, "its keeper is gone").
    The spare becomes the keeper, and the checkpoint can be restored any number of times."""
    r = run_py(HEADER + """
    rounds = fp.persist_int("rounds")
    n = fp.tsetjmp()
    if rounds.value == 0:
        rounds.add()
        while not fp.checkpoints()[0].spares:
            time.sleep(0.01)
        keeper = fp.checkpoints()[0].pid
        os.kill(keeper, signal.SIGKILL)
        while fp.checkpoints()[0].pid == keeper:
            time.sleep(0.01)
        fp.tlongjmp(n)
    print("round", rounds.value, fp.chkpt_status(fp.CHKPT_RECOVERED), flush=True)
    if rounds.add() <= 4:
        fp.tlongjmp(n)
    deadline = time.time() + 10
    while not fp.checkpoints()[0].spares and time.time() < deadline:
        time.sleep(0.01)              # the keeper (once a spare) forks the replacement
    c = fp.checkpoints()[0]
    print("keeper", c.pid > 0, "spares", len(c.spares), flush=True)
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.splitlines() == [f"round {i} 1" for i in range(1, 5)] + ["keeper True spares 1"], r.stdout


def test_a_promoted_spare_keeps_the_configured_spares_at_idle_priority(tmp_path):
    """Invariants 11 and 12 after a promotion: with spares=2, the spare that becomes the keeper
    forks only the copy it is asked for (it inherited its keeper's count of copies owed, and forked
    those too), runs at SCHED_IDLE like every keeper (the shepherd sets keepers' priority), and the
    checkpoint has exactly 2 spares again."""
    r = run_py(HEADER + """
    n = fp.tsetjmp(spares=2)
    def spares():
        return fp.checkpoints()[0].spares
    deadline = time.time() + 10
    while len(spares()) < 2 and time.time() < deadline:
        time.sleep(0.01)
    keeper = fp.checkpoints()[0].pid
    os.kill(keeper, signal.SIGKILL)
    while fp.checkpoints()[0].pid == keeper and time.time() < deadline:
        time.sleep(0.01)
    most = 0
    settle = time.time() + 1.5
    while time.time() < settle:
        most = max(most, len(spares()))
        time.sleep(0.01)
    new = fp.checkpoints()[0].pid
    idle = os.sched_getscheduler(new) == os.SCHED_IDLE
    print("promoted", new != keeper, "most", most, "now", len(spares()), "idle", idle, flush=True)
    """, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.split() == ["promoted", "True", "most", "2", "now", "2", "idle", "True"], r.stdout


PIDS_CGROUP = "/sys/fs/cgroup/pids"


def test_a_clone_refused_by_a_cgroup_pids_limit_raises_and_leaves_the_program_unharmed(tmp_path):
    """Issue 13.10 under a cgroup's pids.max (systemd's TasksMax, docker --pids-limit): the kernel
    writes the new keeper's pidfd number before the cgroup check refuses the clone, and releases it.
    tsetjmp() must raise ResourceExhausted without closing that number (it was EBADF, raised with
    every signal still blocked); the program goes on, its signals handled and its checkpoint usable."""
    if os.geteuid() != 0 or not os.access(PIDS_CGROUP, os.W_OK):
        pytest.skip("needs root and a writable cgroup v1 pids hierarchy")
    group = os.path.join(PIDS_CGROUP, f"fp-test-{os.getpid()}")
    os.mkdir(group)
    try:
        path = program(HEADER + f"""
    group = {group!r}
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    got = fp.persist_int("got")
    signal.signal(signal.SIGUSR1, lambda s, f: got.add())
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        deadline = time.time() + 10
        while not fp.checkpoints()[0].spares and time.time() < deadline:
            time.sleep(0.01)
        with open(os.path.join(group, "pids.current")) as f:
            current = f.read().strip()
        with open(os.path.join(group, "pids.max"), "w") as f:
            f.write(current)                  # no room for one more process
        try:
            fp.tsetjmp()
            print("taken", flush=True)
        except fp.ResourceExhausted as e:
            print("refused", e.errno, flush=True)
        except OSError as e:
            print("wrong error", repr(e), flush=True)
        with open(os.path.join(group, "pids.max"), "w") as f:
            f.write("max")
        os.kill(os.getpid(), signal.SIGUSR1)  # handled at once: nothing left blocked
        print("handled", got.value, flush=True)
        fp.tlongjmp(n)
    print("restored", fp.chkpt_status(fp.CKPT_TO_STATE) == n, flush=True)
        """, tmp_path)
        r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=30,
                           env=clean_env())
        assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
        assert r.stdout.split() == ["refused", "11", "handled", "1", "restored", "True"], (r.stdout, r.stderr[-3000:])
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(group)                   # once every process of the program is gone
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# ---- a process limit (ulimit -u) ---------------------------------------------------------------------
SQUEEZE = """
    import os, sys, signal, time, ctypes, resource, logging
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import forkpoint as fp
    def procs():
        return sum(1 for p in os.listdir("/proc") if p.isdigit() and os.stat(f"/proc/{p}").st_uid == os.getuid())
"""


def test_a_process_limit_never_hands_out_a_checkpoint_that_does_not_exist(tmp_path):
    """Issue 13.4: under ulimit -u a keeper that could not fork its spare exited, so tsetjmp()
    returned ids of checkpoints that did not exist, and a later segfault ended the program
    ("checkpoint 2 cannot be restored: its keeper is gone"). Now the keeper stays (the checkpoint
    exists, without a spare), a checkpoint that cannot be forked at all raises ResourceExhausted,
    and a restore that cannot get a spare wakes the keeper itself."""
    r = run_as(SQUEEZED_UID, SQUEEZE + """
    fp.recover_on(signal.SIGSEGV)
    fp.start()
    n1 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", fp.chkpt_status(fp.CKPT_TO_STATE), "ids", [c.id for c in fp.checkpoints()], flush=True)
        sys.exit(0)
    while not fp.checkpoints()[0].spares:
        time.sleep(0.01)
    # shepherd, live, keeper and spare of 1: room for one more process, the keeper of 2
    resource.setrlimit(resource.RLIMIT_NPROC, (procs() + 1, procs() + 1))
    n2 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", n2, "ids", [c.id for c in fp.checkpoints()], flush=True)
        sys.exit(0)
    try:
        fp.tsetjmp()
        print("a third checkpoint was taken", flush=True)
    except fp.ResourceExhausted as e:
        print("refused", isinstance(e, OSError), "ulimit -u" in str(e), flush=True)
    print("ids", [c.id for c in fp.checkpoints()], flush=True)
    ctypes.string_at(0)
    """)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.splitlines() == ["refused True True", "ids [1, 2]", "restored 2 ids [1]"] or \
        r.stdout.splitlines() == ["refused True True", "ids [1, 2]", "restored 2 ids [1, 2]"], (r.stdout, r.stderr)
    assert "could not fork a spare" in r.stderr, r.stderr


def test_a_failed_fork_raises_a_forkpoint_error_that_says_what_to_change(tmp_path):
    """Issue 13.10: a failed fork surfaced as a bare BlockingIOError."""
    r = run_as(SQUEEZED_UID, SQUEEZE + """
    fp.start()
    resource.setrlimit(resource.RLIMIT_NPROC, (procs(), procs()))
    try:
        fp.tsetjmp()
    except fp.ForkpointError as e:
        print(type(e).__name__, e.errno, flush=True)
        print(e, flush=True)
    print("ids", [c.id for c in fp.checkpoints()], flush=True)
    """)
    assert r.returncode == 0, (r.returncode, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0] == "ResourceExhausted 11" and lines[2] == "ids []", r.stdout
    assert "could not take checkpoint 1: the fork failed" in lines[1] and "ulimit -u" in lines[1], r.stdout


def test_a_restore_before_the_first_spare_leaves_exactly_the_configured_spares(tmp_path):
    """Issue 13.7: a restore that came before the first spare was ready asked the keeper for one
    more fork, and the checkpoint kept 2 spares for good (configured: 1)."""
    r = run_py(HEADER + """
    rounds = fp.persist_int("rounds")
    n = fp.tsetjmp()
    if rounds.add() < 20:
        fp.tlongjmp(n)          # at once: before the keeper's first spare is ready
    time.sleep(0.5)
    print("spares", [len(c.spares) for c in fp.checkpoints()], flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "spares [1]", r.stdout


# ---- a descriptor limit (ulimit -n) ------------------------------------------------------------------
@pytest.mark.parametrize("limit", [16, 24])
def test_a_descriptor_limit_never_hangs_the_program_nor_drops_checkpoints_silently(tmp_path, limit):
    """Issue 13.5: under ulimit -n 16 or 24, the shepherd lost the channels of keepers and spares
    it had no room for: some runs hung after a tlongjmp with no live process (SIGTERM did
    nothing), and 8 of 12 checkpoints were dropped without a log line. The shepherd now keeps as
    many checkpoints as its descriptors hold, discards the oldest beyond that as it would beyond
    max_checkpoints, and says so."""
    r = run_py("""
    import os, sys, random, resource, logging
    logging.basicConfig(level=logging.WARNING, format="prog: %(message)s")
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    import forkpoint as fp
    rounds = fp.persist_int("rounds")
    for i in range(12):
        n = fp.tsetjmp()
        if fp.chkpt_status(fp.CHKPT_RECOVERED):
            break
    if rounds.add() < 30:
        fp.tlongjmp(random.choice([c.id for c in fp.checkpoints()]))
    print("done", rounds.value, len(fp.checkpoints()) >= 1, flush=True)
    """, tmp_path, str(limit), timeout=40)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.strip() == "done 30 True", (r.stdout, r.stderr)
    assert f"the shepherd's descriptor limit (ulimit -n {limit})" in r.stderr, r.stderr



def test_an_arena_that_cannot_be_mapped_raises_a_forkpoint_error_naming_arena_size(tmp_path):
    """Issue 13.10: a failed mmap of the arena surfaced as a bare OSError."""
    r = run_py(HEADER + """
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))      # 1 GiB of address space
    fp.configure(arena_size=4 << 30)                                 # a 4 GiB arena cannot be mapped
    try:
        fp.start()
    except fp.ResourceExhausted as e:
        print("refused", isinstance(e, OSError), "configure(arena_size=...)" in str(e), flush=True)
    fp.configure(arena_size=8 << 20)
    fp.tsetjmp()
    print("then", len(fp.checkpoints()), flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["refused True True", "then 1"], (r.stdout, r.stderr)


def test_a_full_descriptor_table_in_the_program_raises_a_forkpoint_error(tmp_path):
    """Issue 13.10: tsetjmp() with the program's descriptors exhausted (reading /proc/self/fd
    needs one) surfaced as a bare OSError; it says which limit now, and the program goes on."""
    r = run_py(HEADER + """
    fp.start()
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    try:
        fp.tsetjmp()
        print("taken", flush=True)
    except fp.ResourceExhausted as e:
        print("refused", "ulimit -n" in str(e), flush=True)
    for fd in held[:8]:
        os.close(fd)
    n = fp.tsetjmp()                      # id 1 was used up by the refused one; ids are never reused
    print("then", n, [c.id for c in fp.checkpoints()], flush=True)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["refused True", "then 2 [2]"], (r.stdout, r.stderr)


def test_a_process_is_called_gone_only_when_it_is(tmp_path):
    """A holder judged gone has its rescue slots freed while it may still write them, so
    ``alive_since`` says "gone" only for a process that is: reaped, a zombie or exiting. A stat it
    cannot read for another reason (no descriptor left) means "there, start unknown" (0)."""
    r = run_py("""
    import os, resource, signal, time
    from forkpoint import _procfs
    me = os.getpid()
    assert _procfs.alive_since(me) > 0
    child = os.fork()
    if child == 0:
        os._exit(0)
    time.sleep(0.2)
    zombie = _procfs.alive_since(child)
    os.waitpid(child, 0)
    gone = _procfs.alive_since(child)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    full = _procfs.alive_since(me)
    for fd in held:
        os.close(fd)
    print(zombie, gone, full)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None", "0"], r.stdout
