"""The soak suite (issue 13): faults injected into forkpoint's own machinery, at random, many times.

Marked ``soak``. The normal test run (``python -m pytest -q tests/``) runs a short version of each
scenario; the long run is one command::

    FORKPOINT_SOAK=long FORKPOINT_SOAK_REPORT=soak.jsonl python -m pytest -q -m soak tests/test_soak.py

(``FORKPOINT_SOAK_REPORT``, optional, collects every scenario's figures as JSON lines; the figures
in docs/reliability.md come from such a run.) Scenarios:

* chaos: a random workload (checkpoints, jumps, segfaults, aborts, transactions, discards) while
  the test SIGKILLs random members of the program (live process, keepers, spares) at random
  instants, and the workload kills itself at random lines inside tsetjmp, tlongjmp and the
  keeper's fork of a spare;
* PID wrap: the workload in a private PID namespace whose next PID is set back every round, so
  that new keepers and spares get pids the shepherd reaped moments before;
* ``ulimit -u`` and ``ulimit -n`` squeezes (the process limit as an unprivileged uid);
* a terminal hangup through a real pty during back-to-back restores; SIGTERM during backoffs;
  Ctrl-C through a pty during back-to-back restores;
* peak process and snapshot-memory sampling in tight loops;
* a directory planted in the temporary directory by another user;
* random corruption of every structural arena word.

Every scenario runs in subprocesses with timeouts; outcomes are counted, and the assertions say
what may never happen (a program with a usable checkpoint ending, a signal lost or doubled, a bound
exceeded, a wrong answer from the arena).
"""
from __future__ import annotations

import json
import os
import pty
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, SQUEEZED_UID, clean_env, program, run_as, run_py, start_py, wait_exit
from test_arena_integrity import run_scenario
from test_bounds import DYING_MAX, Sampler, _snapshot_pss

from forkpoint._procfs import comm

LONG = os.environ.get("FORKPOINT_SOAK") == "long"
pytestmark = [pytest.mark.soak, pytest.mark.timeout(3600 if LONG else 120)]


def scale(short: int, long: int) -> int:
    return long if LONG else short


def report(scenario: str, **figures) -> None:
    path = os.environ.get("FORKPOINT_SOAK_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"scenario": scenario, "long": LONG, "time": time.time(), **figures}) + "\n")


# ---- a random workload ---------------------------------------------------------------------------
WORKLOAD = r'''
import ctypes, inspect, json, os, random, resource, signal, sys, threading, time
import forkpoint as fp
from forkpoint import _frozen, snapshots

seed, rounds = int(sys.argv[1]), int(sys.argv[2])
pidwrap = "--pidwrap" in sys.argv
done = fp.persist_int("done")
refused = fp.persist_int("refused")
selfkills = fp.persist_array("selfkills", 3, "q")       # in tsetjmp, in tlongjmp, in a spare fork
fp.recover_on(signal.SIGSEGV, signal.SIGABRT, signal.SIGKILL, max_recoveries=10**9, within=0.001)

def real_pid():
    return int(os.readlink("/proc/self"))

def kill_at(function, snippet, forked=False):
    src, first = inspect.getsourcelines(function)
    lines = [first + i for i, l in enumerate(src) if snippet(l)]
    target = random.choice(lines)
    code = function.__code__
    me = real_pid()
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == target and (real_pid() != me) == forked:
            sys.settrace(None)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGKILL)
        return local
    sys.settrace(lambda f, e, a: local if f.f_code is code else None)

@fp.checkpointed
def txn(x):
    if x == "crash":
        ctypes.string_at(0)
    return x

QUOTES = (chr(34) * 3, chr(39) * 3)
def body_lines(l):
    s = l.strip()
    return s and not s.startswith(("#", "def ", "@") + QUOTES) and not s.endswith(QUOTES)

while True:
    try:
        n = fp.tsetjmp(spares=random.choice((0, 1, 1)))
    except fp.ForkpointError:
        refused.add()
        n = 0
    sys.settrace(None)
    i = done.value
    if i >= rounds:
        break
    done.add()
    r = random.Random(seed * 1000003 + i)
    act = r.choice(["crash", "abort", "jump", "txn", "txn-crash", "discard", "kill-in-tsetjmp",
                    "kill-in-tlongjmp", "kill-in-spare-fork", "sleep", "sleep", "write"])
    random.seed(seed * 7 + i)
    if pidwrap:
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(r.randrange(100, 400)))      # the next pids are ones used moments ago
        except OSError:
            pass
    try:
        if act == "crash":
            ctypes.string_at(0)
        elif act == "abort":
            os.abort()
        elif act == "jump":
            ids = [c.id for c in fp.checkpoints()]
            if ids:
                fp.tlongjmp(r.choice(ids))
        elif act in ("txn", "txn-crash"):
            try:
                txn("crash" if act == "txn-crash" else i)
            except fp.Recovered:
                pass
        elif act == "discard":
            ids = [c.id for c in fp.checkpoints()]
            if len(ids) > 2:
                fp.discard(r.choice(ids[:-1]))
        elif act == "kill-in-tsetjmp":
            selfkills[0] += 1
            kill_at(snapshots.tsetjmp, body_lines)
            fp.tsetjmp()
        elif act == "kill-in-tlongjmp" and n:
            selfkills[1] += 1
            kill_at(snapshots.tlongjmp, body_lines)
            fp.tlongjmp(n)
        elif act == "kill-in-spare-fork":
            selfkills[2] += 1
            kill_at(_frozen.frozen, lambda l: "clone_pidfd" in l or "ForkFailed" in l or "Spare(n" in l,
                    forked=True)
            fp.tsetjmp()
            time.sleep(0.02)
        elif act == "write":
            fp.persist("scratch", 4096)[:8] = i.to_bytes(8, "little")
        else:
            time.sleep(r.random() * 0.01)
    except fp.NoSuchCheckpoint:
        pass
    except fp.ForkpointError:
        refused.add()
    sys.settrace(None)
print("RESULT " + json.dumps({"rounds": done.value, "recoveries": len(fp.history()),
                              "refused": refused.value, "selfkills": list(selfkills)}), flush=True)
'''

# What the shepherd says when the program really had no usable checkpoint left (legitimate ends).
NO_CHECKPOINT = ("and there is no checkpoint", "no other checkpoint is left")


def _classify(code: int, out: str, err: str) -> tuple[str, dict]:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return ("completed" if code == 0 else f"completed, exit {code}"), json.loads(line[7:])
    if any(s in err for s in NO_CHECKPOINT):
        return "ended: no usable checkpoint left", {}
    return f"ENDED exit {code}", {}


class Chaos:
    """SIGKILLs random members of program ``face`` (its shepherd's children) at random instants."""

    def __init__(self, face: int, seed: int, period: float) -> None:
        self.face, self.rng, self.period = face, random.Random(seed), period
        self.kills: dict[str, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = False          # no kills before the program's first checkpoint: nothing could save it
        while not self.done.wait(self.rng.uniform(0, 2 * self.period)):
            try:
                with open(f"/proc/{self.face}/task/{self.face}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                if not started:
                    started = any(comm(k).startswith("fp-snap-") for k in kids)
                    continue
                victim = self.rng.choice(kids)
                name = comm(victim)
                if name == "?":
                    continue            # gone meanwhile
                os.kill(victim, signal.SIGKILL)
            except (OSError, IndexError, ValueError):
                continue
            kind = "keeper" if name.startswith("fp-snap-") else "spare" if name.startswith("fp-spare-") \
                else "live"
            self.kills[kind] = self.kills.get(kind, 0) + 1

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.thread.join(10)
        return self.kills


def test_chaos_kills_at_random_instants(tmp_path):
    runs, rounds = scale(2, 40), scale(100, 400)
    outcomes: dict[str, int] = {}
    kills: dict[str, int] = {}
    totals = {"rounds": 0, "recoveries": 0, "refused": 0, "selfkills": [0, 0, 0]}
    for run in range(runs):
        proc = start_py(WORKLOAD, tmp_path, str(run), str(rounds))
        chaos = Chaos(proc.pid, run, period=0.05)
        try:
            out, err = proc.communicate(timeout=scale(100, 600))
        finally:
            for k, v in chaos.stop().items():
                kills[k] = kills.get(k, 0) + v
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        outcome, figures = _classify(proc.returncode, out, err)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert not outcome.startswith("ENDED"), (outcome, err[-3000:])
        for k in ("rounds", "recoveries", "refused"):
            totals[k] += figures.get(k, 0)
        totals["selfkills"] = [a + b for a, b in zip(totals["selfkills"], figures.get("selfkills", [0, 0, 0]),
                                                     strict=True)]
    report("chaos", runs=runs, outcomes=outcomes, outside_kills=kills, **totals)
    # The scenario is only worth its name if the outside killer did strike (30+ keepers and spares
    # in a short run): a killer that silently stopped would leave the test passing on nothing.
    assert kills.get("keeper", 0) > 0 and kills.get("spare", 0) > 0, kills


def _in_pid_namespace(code: str, tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1)")
    path = program(code, tmp_path)
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", '"$0" "$@"; echo "exit=$?"',
                           sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env())


def test_pid_wrap(tmp_path):
    """Every round sets the namespace's next PID back into the range just used, so new keepers
    and spares take pids the shepherd reaped moments before (a wrap of pid_max, compressed)."""
    runs, rounds = scale(1, 10), scale(80, 400)
    outcomes: dict[str, int] = {}
    totals = {"rounds": 0, "recoveries": 0}
    for run in range(runs):
        r = _in_pid_namespace(WORKLOAD, tmp_path, str(100 + run), str(rounds), "--pidwrap",
                              timeout=scale(100, 600))
        code = int(r.stdout.rsplit("exit=", 1)[1]) if "exit=" in r.stdout else -1
        outcome, figures = _classify(code, r.stdout, r.stderr)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcome == "completed", (outcome, r.stdout[-500:], r.stderr[-3000:])
        totals["rounds"] += figures["rounds"]
        totals["recoveries"] += figures["recoveries"]
    report("pid wrap", runs=runs, outcomes=outcomes, **totals)


SQUEEZE_NPROC = '''
import os, resource, sys
extra = int(sys.argv[3])
def procs():
    return sum(1 for p in os.listdir("/proc") if p.isdigit() and os.stat(f"/proc/{p}").st_uid == os.getuid())
import forkpoint as fp
fp.start()
resource.setrlimit(resource.RLIMIT_NPROC, (procs() + extra, procs() + extra))
'''


def test_ulimit_u_squeeze(tmp_path):
    """The workload under a process limit just above what the program has: checkpoints that
    cannot be forked are refused (ResourceExhausted) and the program goes on."""
    runs, rounds = scale(3, 24), scale(30, 200)
    outcomes: dict[str, int] = {}
    ended_at: dict[str, int] = {}       # free process slots of the runs that ended -> how many
    totals = {"rounds": 0, "recoveries": 0, "refused": 0}
    for run in range(runs):
        extra = 1 + run % 4
        r = run_as(SQUEEZED_UID, SQUEEZE_NPROC + WORKLOAD, str(run), str(rounds), str(extra),
                   timeout=scale(100, 600))
        outcome, figures = _classify(r.returncode, r.stdout, r.stderr)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert not outcome.startswith("ENDED"), (extra, outcome, r.stderr[-3000:])
        if outcome.startswith("ended"):
            ended_at[str(extra)] = ended_at.get(str(extra), 0) + 1
        for k in totals:
            totals[k] += figures.get(k, 0)
    report("ulimit -u", runs=runs, outcomes=outcomes, ended_by_free_slots=ended_at, **totals)


SQUEEZE_NOFILE = '''
import resource, sys
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
'''


@pytest.mark.parametrize("limit", [16, 24])
def test_ulimit_n_squeeze(tmp_path, limit):
    runs, rounds = scale(1, 10), scale(40, 300)
    outcomes: dict[str, int] = {}
    totals = {"rounds": 0, "recoveries": 0, "refused": 0}
    for run in range(runs):
        r = run_py(SQUEEZE_NOFILE + WORKLOAD, tmp_path, str(run), str(rounds), str(limit),
                   timeout=scale(100, 600))
        outcome, figures = _classify(r.returncode, r.stdout, r.stderr)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert not outcome.startswith("ENDED"), (outcome, r.stderr[-3000:])
        for k in totals:
            totals[k] += figures.get(k, 0)
    report(f"ulimit -n {limit}", runs=runs, outcomes=outcomes, **totals)


# ---- signals through real terminals ----------------------------------------------------------------
RESTORE_LOOP = """
    import os, signal, sys, time
    import forkpoint as fp
    signal.signal(signal.SIGINT, lambda *a: os.write(1, b"<INT>"))
    rounds = fp.persist_int("rounds")
    n = fp.tsetjmp()
    if rounds.add() == 1:
        print("ready", flush=True)
    if os.path.exists(sys.argv[1]):
        print("stopped", flush=True)
        sys.exit(0)
    fp.tlongjmp(n)
"""


def _pty_program(tmp_path: Path, code: str, *args: str) -> tuple[int, int]:
    path = program(code, tmp_path)
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, str(path), *args], clean_env())
    return pid, fd


def _pump(fd: int, out: bytearray, until, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not until():
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return until()
        if not chunk:
            return until()
        out += chunk
    return True


def test_ctrl_c_during_restores(tmp_path):
    runs, presses = scale(1, 10), scale(100, 300)
    handled = lost = 0
    for run in range(runs):
        stop = tmp_path / f"stop{run}"
        pid, fd = _pty_program(tmp_path, RESTORE_LOOP, str(stop))
        out = bytearray()
        missed = 0
        try:
            assert _pump(fd, out, lambda o=out: b"ready" in o, 15)
            for i in range(presses):
                time.sleep(random.uniform(0, 0.003))      # a random moment of the restore loop
                os.write(fd, b"\x03")
                want = i + 1 - missed
                if not _pump(fd, out, lambda o=out, w=want: o.count(b"<INT>") >= w, 5):
                    missed += 1
            time.sleep(0.5)                               # a duplicate would be handled by now
            stop.write_text("")
            _pump(fd, out, lambda o=out: b"stopped" in o, 15)
        finally:
            try:
                code = wait_exit(pid)
            finally:
                os.close(fd)
        handled += out.count(b"<INT>")
        lost += missed
        assert code == 0
    report("ctrl-c during restores", presses=runs * presses, handled=handled, lost=lost)
    assert lost == 0 and handled == runs * presses, (handled, lost)


def test_terminal_hangup_during_restores(tmp_path):
    runs = scale(3, 30)
    outcomes: dict[str, int] = {}
    for _ in range(runs):
        stop = tmp_path / "never"
        pid, fd = _pty_program(tmp_path, RESTORE_LOOP, str(stop))
        out = bytearray()
        assert _pump(fd, out, lambda o=out: b"ready" in o, 15)
        time.sleep(random.uniform(0, 0.2))
        os.close(fd)                                 # hang up in the middle of the restores
        code = wait_exit(pid)
        key = "died by SIGHUP" if code == -signal.SIGHUP else f"exit {code}"
        outcomes[key] = outcomes.get(key, 0) + 1
    report("terminal hangup during restores", runs=runs, outcomes=outcomes)
    assert outcomes == {"died by SIGHUP": runs}, outcomes


BACKOFF = """
    import ctypes, os, signal, sys, time
    import forkpoint as fp
    if sys.argv[1] == "handled":
        signal.signal(signal.SIGTERM, lambda *a: (print("term", flush=True), sys.exit(0)))
    fp.recover_on(signal.SIGSEGV, backoff=60, max_recoveries=100)
    count = fp.persist_int("c")
    n = fp.tsetjmp()
    print("up", count.add(), flush=True)
    time.sleep(0.05)
    ctypes.string_at(0)
"""


def test_sigterm_during_backoffs(tmp_path):
    runs = scale(4, 40)
    outcomes: dict[str, int] = {}
    for run in range(runs):
        handled = run % 2 == 0
        proc = start_py(BACKOFF, tmp_path, "handled" if handled else "default")
        try:
            while not proc.stdout.readline().startswith("up 2"):
                pass
            time.sleep(random.uniform(0.06, 0.3))       # in the crash's 60 s backoff (or at its start)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            rest = proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        ok = (code == 0 and "term" in rest) if handled else code == -signal.SIGTERM
        key = f"{'handled' if handled else 'default'}: {'as without forkpoint' if ok else f'exit {code}'}"
        outcomes[key] = outcomes.get(key, 0) + 1
    report("SIGTERM during a backoff", runs=runs, outcomes=outcomes)
    assert all("as without forkpoint" in k for k in outcomes), outcomes


# ---- bounds ------------------------------------------------------------------------------------------
LOOPS = {
    "tsetjmp": """
        import sys
        import forkpoint as fp
        data = bytearray(16 << 20)
        for i in range(int(sys.argv[1])):
            fp.tsetjmp()
            data[(i * 4096) % len(data)] = 1
    """,
    "tlongjmp": """
        import sys
        import forkpoint as fp
        r = fp.persist_int("r")
        n = fp.tsetjmp()
        if r.add() < int(sys.argv[1]):
            fp.tlongjmp(n)
    """,
    "checkpointed": """
        import sys
        import forkpoint as fp
        @fp.checkpointed
        def txn(i):
            return i
        for i in range(int(sys.argv[1])):
            txn(i)
    """,
}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_peak_processes(tmp_path, loop):
    n = scale(300, 5000)
    proc = start_py(LOOPS[loop], tmp_path, str(n))
    sampler = Sampler(proc.pid, lambda kids: 1 + len(kids))
    try:
        out, err = proc.communicate(timeout=scale(100, 1200))
    finally:
        peak = sampler.stop()
    assert proc.returncode == 0, err
    bound = 16 * 2 + 3 + DYING_MAX + 2 * 2
    report("peak processes", loop=loop, iterations=n, peak=peak, bound=bound, samples=sampler.samples)
    assert peak <= bound, (peak, bound)


def test_peak_snapshot_memory(tmp_path):
    n = scale(100, 1500)
    MB = 1 << 20
    proc = start_py("""
        import sys
        import forkpoint as fp
        MB = 1 << 20
        heap = bytearray(b"\\x01") * (32 * MB)
        fp.configure(max_snapshot_memory=64 * MB)
        for i in range(int(sys.argv[1])):
            fp.tsetjmp()
            start = (i * 4 * MB) % len(heap)
            heap[start:start + 4 * MB:4096] = bytes([i % 250 + 1]) * len(range(0, 4 * MB, 4096))
    """, tmp_path, str(n))
    sampler = Sampler(proc.pid, _snapshot_pss)
    try:
        out, err = proc.communicate(timeout=scale(100, 1200))
    finally:
        peak = sampler.stop()
    assert proc.returncode == 0, err
    report("peak snapshot memory", iterations=n, budget=64 * MB, peak=peak, bound=96 * MB, samples=sampler.samples)
    assert peak <= 96 * MB, peak / MB


# ---- a hostile /tmp, a damaged arena -------------------------------------------------------------
def test_planted_directories(tmp_path):
    """Another user plants the per-user directory name, and per-PID names for the next PIDs."""
    runs = scale(2, 20)
    ok = 0
    for _ in range(runs):
        shared = Path(tempfile.mkdtemp(prefix="fpsoak-", dir="/tmp"))
        shared.chmod(0o1777)
        try:
            nxt = int(Path("/proc/sys/kernel/ns_last_pid").read_text()) + 1
            for name in [f"forkpoint-u{os.geteuid()}"] + [f"forkpoint-{p}" for p in range(nxt, nxt + 50)]:
                (shared / name).mkdir(mode=0o777)
                os.chown(shared / name, 65534, 65534)
            proc = start_py("""
                import sys, time
                import forkpoint as fp
                fp.tsetjmp()
                print("ready", flush=True)
                sys.stdin.readline()
            """, tmp_path, XDG_RUNTIME_DIR="", TMPDIR=str(shared))
            try:
                assert proc.stdout.readline().strip() == "ready"
                deadline = time.monotonic() + 10
                r = None
                while time.monotonic() < deadline:
                    r = subprocess.run([sys.executable, "-m", "forkpoint", "status", str(proc.pid), "--json"],
                                       capture_output=True, text=True, timeout=30, env=clean_env(), cwd=str(ROOT))
                    if r.returncode == 0:
                        break
                    time.sleep(0.05)
                assert r is not None and r.returncode == 0, r.stderr if r else None
                ok += 1
            finally:
                proc.stdin.write("\n")
                proc.stdin.flush()
                proc.wait(20)
        finally:
            shutil.rmtree(shared, ignore_errors=True)
    report("planted directories", runs=runs, controlled=ok)


def test_random_corruption_of_every_arena_word(tmp_path):
    per_word = scale(10, 400)
    out = run_scenario(tmp_path, seed=int(time.time()), per_word=per_word)
    report("arena corruption", words=out["words"], writes=out["writes"], answers=out["tally"],
           wrong=out["wrong_count"])
    assert out["wrong_count"] == 0, out["wrong"]
