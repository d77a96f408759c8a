"""Operator control: ``forkpoint ls/restore/discard/status PID`` and the shepherd's control socket.

Every scenario runs a real program and the real CLI (``python -m forkpoint``) in subprocesses;
the socket is fuzzed with real connections, and the other-user cases run the CLI under uid 65534.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, Lines, clean_env, run_py, start_py, wait_for

from forkpoint import _control as operator

NOBODY = 65534

# Two checkpoints, then serve stdin: "exit" ends the program normally, "ls" lists from inside.
PROG = """
    import json, os, signal, sys, time
    import forkpoint as fp
    if "--recover-kill" in sys.argv:
        fp.recover_on(signal.SIGKILL)
    n1 = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", json.dumps({"n": n1, "sigtype": fp.chkpt_status(fp.CKPT_SIGTYPE),
              "reason": fp.restore_reason(),
              "history": [[h.to_state, h.signal, h.reason] for h in fp.history()]}), flush=True)
    else:
        n2 = fp.tsetjmp()
    print("ready", os.readlink("/proc/self"), flush=True)   # the live process's real PID
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "exit":
            print("bye", flush=True)
            sys.exit(0)
        if cmd == "ls":
            print("ids", [c.id for c in fp.checkpoints()], len(fp.history()), flush=True)
"""


@pytest.fixture
def xdg():
    """A short private XDG_RUNTIME_DIR (AF_UNIX paths are limited to 108 bytes)."""
    path = tempfile.mkdtemp(prefix="fpop-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def cli(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forkpoint", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=clean_env(**env), cwd=str(ROOT))


class Program:
    """PROG running under its shepherd, with its output read line by line."""

    def __init__(self, tmp_path: Path, *args: str, **env: str) -> None:
        self.proc = start_py(PROG, tmp_path, *args, **env)
        self.lines = Lines(self.proc)
        self.pid = self.proc.pid
        self.live = int(self.lines.until("ready").split()[1])
        # The live process runs on while the shepherd is still starting: wait for its socket.
        wait_for(lambda: listening(self.pid))

    def tell(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, str]:
        """End it normally; returns (exit status, stderr)."""
        try:
            self.tell("exit")
            self.lines.until("bye")
            code = self.proc.wait(20)
        except BaseException:
            self.kill()
            raise
        return code, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(20)


def listening(pid: int) -> bool:
    """Whether program ``pid``'s control socket is bound and listening (the kernel's list)."""
    suffix = f"/forkpoint-{pid}/control.sock"
    with open("/proc/net/unix") as f:
        return any(line.rstrip("\n").endswith(suffix) for line in f)


def sock_dir(base: str, pid: int) -> Path:
    return Path(base) / f"forkpoint-{pid}"


def tmp_sock_dir(tmp: str, pid: int) -> Path:
    """Without XDG_RUNTIME_DIR: in this user's private directory in the temporary directory."""
    return Path(tmp) / f"forkpoint-u{os.geteuid()}" / f"forkpoint-{pid}"


def _unused_pid() -> int:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(p for p in range(pid_max - 1, 1, -1) if not os.path.exists(f"/proc/{p}"))


def ls_json(pid: int) -> dict:
    r = cli("ls", pid, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---- end to end -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_ls_status_and_the_private_socket(tmp_path, xdg):
    prog = Program(tmp_path, XDG_RUNTIME_DIR=xdg)
    try:
        d = sock_dir(xdg, prog.pid)
        st = d.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        sock = d / "control.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600

        # A keeper runs at idle priority and introduces itself when it gets a CPU: until then its
        # checkpoint is listed with pid 0 (on a loaded machine, 4 of 15 runs listed one so).
        wait_for(lambda: all(c["pid"] > 0 for c in ls_json(prog.pid)["checkpoints"]))
        out = ls_json(prog.pid)
        assert set(out) == {"checkpoints", "history"} and out["history"] == []
        assert [c["id"] for c in out["checkpoints"]] == [1, 2]
        for c in out["checkpoints"]:
            assert {"id", "pid", "age", "pinned", "uss", "pss"} <= set(c)
            assert c["pid"] > 0 and c["age"] >= 0 and c["pinned"] is False and c["uss"] > 0 and c["pss"] > 0, c

        r = cli("ls", prog.pid)
        assert r.returncode == 0, r.stderr
        assert f"forkpoint program {prog.pid}" in r.stdout and "history: 0 entries" in r.stdout

        r = cli("status", prog.pid, "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["pid"] == prog.pid and st["live"] == prog.live
        assert st["recoveries"] == 0 and st["quarantined"] == [] and st["uptime"] >= 0
        assert st["checkpoints"] == 2 and st["current"] == 2
        r = cli("status", prog.pid)
        assert r.returncode == 0 and f"live process: {prog.live}" in r.stdout

        # The CLI finds the socket from the PID alone, whatever its own environment says.
        r = cli("status", prog.pid, "--json", XDG_RUNTIME_DIR="/nonexistent", TMPDIR="/nonexistent")
        assert r.returncode == 0, r.stderr
    finally:
        code, err = prog.finish()
    assert code == 0, err
    assert not sock_dir(xdg, prog.pid).exists(), "the socket directory outlived the program"


@pytest.mark.timeout(60)
def test_restore_is_a_tlongjmp_with_the_operators_reason(tmp_path, xdg):
    prog = Program(tmp_path, XDG_RUNTIME_DIR=xdg)
    r = cli("restore", prog.pid, 1, "--reason", "bad deploy")
    assert r.returncode == 0, r.stderr
    assert "restored to checkpoint 1" in r.stdout
    restored = json.loads(prog.lines.until("restored").split(" ", 1)[1])
    assert restored["n"] == 1
    assert restored["sigtype"] == 0, "CKPT_SIGTYPE must be 0 after an operator restore"
    assert restored["reason"] == "operator: bad deploy"
    assert restored["history"] == [[1, 0, "operator: bad deploy"]]
    new_live = int(prog.lines.until("ready").split()[1])
    assert new_live != prog.live
    wait_for(lambda: not os.path.exists(f"/proc/{prog.live}"))   # the replaced live process is gone

    out = ls_json(prog.pid)
    assert [h["reason"] for h in out["history"]] == ["operator: bad deploy"]
    assert [c["id"] for c in out["checkpoints"]] == [1, 2], "a restore must not consume checkpoints"
    st = json.loads(cli("status", prog.pid, "--json").stdout)
    assert st["live"] == new_live and st["recoveries"] == 1 and st["current"] == 1

    # Again, without a reason: the history still says who did it; the same checkpoint is reusable.
    r = cli("restore", prog.pid, 1)
    assert r.returncode == 0, r.stderr
    restored = json.loads(prog.lines.until("restored").split(" ", 1)[1])
    assert restored["sigtype"] == 0 and restored["reason"] == f"operator: uid {os.geteuid()}"
    prog.lines.until("ready")
    code, err = prog.finish()
    assert code == 0, err
    assert "restores checkpoint 1: bad deploy" in err, "operator actions are logged"
    assert not sock_dir(xdg, prog.pid).exists()


@pytest.mark.timeout(60)
def test_discard_and_bad_requests_leave_the_program_untouched(tmp_path, xdg):
    prog = Program(tmp_path, XDG_RUNTIME_DIR=xdg)
    try:
        r = cli("discard", prog.pid, 1)
        assert r.returncode == 0, r.stderr
        assert "checkpoint 1 discarded (left: 2)" in r.stdout
        assert [c["id"] for c in ls_json(prog.pid)["checkpoints"]] == [2]

        for args, expect in [
            (("discard", prog.pid, 1), "no checkpoint 1 (live checkpoints: 2)"),
            (("restore", prog.pid, 1), "no checkpoint 1 (live checkpoints: 2)"),
            (("restore", prog.pid, 99, "--reason", "x"), "no checkpoint 99"),
            (("restore", prog.pid, 2, "--reason", "x" * 500), "invalid reason"),
        ]:
            r = cli(*args)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert expect in r.stderr, (args, r.stderr)

        for bad in ("abc", "-5", "0", "1.5"):      # usage errors, caught before anything is sent
            r = cli("restore", prog.pid, bad)
            assert r.returncode == 2 and "positive integer" in r.stderr, r.stderr
            r = cli("ls", bad)
            assert r.returncode == 2 and "positive integer" in r.stderr, r.stderr

        prog.tell("ls")
        assert prog.lines.until("ids") == "ids [2] 0"
        assert ls_json(prog.pid)["history"] == []
    finally:
        code, err = prog.finish()
    assert code == 0, err


@pytest.mark.timeout(60)
def test_pids_that_are_not_forkpoint_programs(tmp_path, xdg):
    unused = _unused_pid()
    r = cli("ls", unused)
    assert r.returncode == 1 and f"no process with PID {unused}" in r.stderr, r.stderr

    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for cmd in (("ls", plain.pid), ("status", plain.pid), ("restore", plain.pid, 1), ("discard", plain.pid, 1)):
            r = cli(*cmd)
            assert r.returncode == 1 and "is not a forkpoint program" in r.stderr, r.stderr
    finally:
        plain.kill()
        plain.wait()

    prog = Program(tmp_path, XDG_RUNTIME_DIR=xdg)
    try:   # the live process's PID: point the operator at the program's own
        r = cli("ls", prog.live)
        assert r.returncode == 1 and f"forkpoint program {prog.pid}; use that PID" in r.stderr, r.stderr
    finally:
        code, err = prog.finish()
    assert code == 0, err


@pytest.mark.timeout(60)
def test_socket_falls_back_to_the_temp_dir(tmp_path, xdg):
    """An unusable XDG_RUNTIME_DIR: the socket goes to this user's private directory in $TMPDIR,
    and the CLI still finds it."""
    prog = Program(tmp_path, XDG_RUNTIME_DIR="/nonexistent/run", TMPDIR=xdg)
    try:
        assert (tmp_sock_dir(xdg, prog.pid) / "control.sock").exists()
        assert stat.S_IMODE(tmp_sock_dir(xdg, prog.pid).parent.stat().st_mode) == 0o700
        assert ls_json(prog.pid)["checkpoints"]
    finally:
        code, err = prog.finish()
    assert code == 0, err
    assert not tmp_sock_dir(xdg, prog.pid).exists()


# ---- the socket goes away --------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_socket_removed_after_sigkill_of_the_live_process(tmp_path, xdg):
    # Without recovery the program ends by SIGKILL: the shepherd removes the socket on its way out.
    prog = Program(tmp_path, XDG_RUNTIME_DIR=xdg)
    assert sock_dir(xdg, prog.pid).exists()
    os.kill(prog.live, signal.SIGKILL)
    assert prog.proc.wait(20) == -signal.SIGKILL      # invariant 2: the program's own death
    assert not sock_dir(xdg, prog.pid).exists()

    # With recovery the shepherd restores: the socket stays and answers, and goes at the end.
    prog = Program(tmp_path, "--recover-kill", XDG_RUNTIME_DIR=xdg)
    try:
        os.kill(prog.live, signal.SIGKILL)
        new_live = int(prog.lines.until("ready").split()[1])   # checkpoint 2, the current one
        st = json.loads(cli("status", prog.pid, "--json").stdout)
        assert st["live"] == new_live and st["recoveries"] == 1
        assert [h["reason"] for h in ls_json(prog.pid)["history"]] == ["killed by SIGKILL"]
    finally:
        code, err = prog.finish()
    assert code == 0, err
    assert not sock_dir(xdg, prog.pid).exists()


@pytest.mark.timeout(90)
def test_stale_dir_of_a_sigkilled_shepherd_is_cleaned_by_the_next_run(tmp_path, xdg):
    dead = Program(tmp_path, XDG_RUNTIME_DIR=xdg)
    os.kill(dead.pid, signal.SIGKILL)          # the shepherd itself: nothing can clean up now
    assert dead.proc.wait(20) == -signal.SIGKILL
    assert sock_dir(xdg, dead.pid).exists(), "expected a stale directory to clean"

    # A directory named after a live PID (ours) that is older than that process: PID reuse, stale.
    reused = sock_dir(xdg, os.getpid())
    reused.mkdir(mode=0o700)
    old = time.time() - 10 * 24 * 3600
    os.utime(reused, (old, old))
    # Not ours to touch: another user's directory, and a name that is not a PID.
    foreign = sock_dir(xdg, _unused_pid())
    if os.geteuid() == 0:
        foreign.mkdir(mode=0o700)
        os.chown(foreign, NOBODY, NOBODY)
    odd = Path(xdg) / "forkpoint-notapid"
    odd.mkdir()

    running = Program(tmp_path, XDG_RUNTIME_DIR=xdg)  # a live program: its socket must survive
    try:
        prog2 = tmp_path / "second"
        prog2.mkdir()
        r = run_py("""
            import json, os, forkpoint as fp
            fp.tsetjmp()
            print(json.dumps(sorted(os.listdir(os.environ["XDG_RUNTIME_DIR"]))), flush=True)
        """, prog2, XDG_RUNTIME_DIR=xdg)
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout)
        assert f"forkpoint-{dead.pid}" not in seen, "stale directory not cleaned"
        assert f"forkpoint-{os.getpid()}" not in seen, "directory older than its PID's process not cleaned"
        assert f"forkpoint-{running.pid}" in seen and "forkpoint-notapid" in seen
        assert ls_json(running.pid)["checkpoints"], "a running program's socket was disturbed"
        if os.geteuid() == 0:
            assert foreign.name in seen, "another user's directory was removed"
    finally:
        code, err = running.finish()
    assert code == 0, err
    assert sorted(os.listdir(xdg)) == sorted(p.name for p in (odd, foreign) if p.exists())


# ---- fuzzing the protocol ---------------------------------------------------------------------------
def _exchange(path: str, payload: bytes, half_close: bool = True) -> dict | None:
    """Send ``payload`` on a fresh connection; the reply (or None if closed without one)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    try:
        try:
            s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    if not data:
        return None
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    return json.loads(data)


@pytest.mark.timeout(120)
def test_fuzzed_socket_never_harms_the_program(tmp_path, xdg):
    prog = Program(tmp_path, XDG_RUNTIME_DIR=xdg)
    path = str(sock_dir(xdg, prog.pid) / "control.sock")
    rng = random.Random(20240607)
    kinds: dict[str, int] = {}

    def expect_error(payload: bytes, *allowed: str, half_close: bool = True) -> None:
        reply = _exchange(path, payload, half_close)
        if reply is None:
            kinds["<closed>"] = kinds.get("<closed>", 0) + 1
            assert "<closed>" in allowed or not payload, payload[:80]
            return
        assert reply["ok"] is False, (payload[:80], reply)
        assert reply["kind"] in allowed, (payload[:80], reply)
        assert isinstance(reply["error"], str) and reply["error"]
        kinds[reply["kind"]] = kinds.get(reply["kind"], 0) + 1

    try:
        # random bytes, with and without a newline
        for _ in range(150):
            blob = rng.randbytes(rng.randint(1, 600))
            expect_error(blob, "malformed", "unknown", "truncated", "invalid", "nosuch")
            expect_error(blob.replace(b"\n", b"") + b"\n", "malformed", "unknown", "invalid", "nosuch")
        # well-formed JSON that is not a valid request (never a valid restore or discard)
        ops = [None, 1, "", "LS", "restore", "discard", "x" * 100, ["ls"], {"op": "ls"}]
        ns = [None, 0, -1, 99, "1", 1.0, True, [1], {"n": 1}, 2 ** 70, 1e308]
        reasons = [None, 5, "x" * 300, ["why"]]
        for _ in range(200):
            req = {"op": rng.choice(ops), "n": rng.choice(ns), "reason": rng.choice(reasons)}
            req = {k: v for k, v in req.items() if v is not None or rng.random() < 0.5}
            expect_error(json.dumps(req).encode() + b"\n", "unknown", "invalid", "nosuch")
        for text in (b"[]\n", b"null\n", b"\"ls\"\n", b"1e999999\n", b"[" * 3000 + b"\n",
                     b"{\"op\": \"ls\"" + b"\xff\xfe\n", b"9" * 4000 + b"\n", b"\n", b"\x00\n"):
            expect_error(text, "malformed")
        # truncated: the connection ends before the newline
        for cut in (1, 5, 11):
            expect_error(b'{"op": "ls"}'[:cut], "truncated")
        # oversized: refused as soon as the limit is passed, whether or not the client stops
        expect_error(b"x" * (operator.MAX_REQUEST + 1), "too_large")
        expect_error(b'{"op": "ls", "pad": "' + b"a" * (1 << 20) + b'"}\n', "too_large", "<closed>",
                     half_close=False)
        # a flood of connections: some held silent, more than the server keeps open at once
        flood = []
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)            # blocking: waits while the listen backlog is full
            s.settimeout(30)
            flood.append(s)
        replies = []
        for s in flood:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            replies.append(json.loads(data)["kind"] if data else "<closed>")
            s.close()
        assert set(replies) <= {"busy", "timeout"}, set(replies)
        assert replies.count("timeout") <= operator.MAX_CONNECTIONS and "busy" in replies

        # The program is untouched and still fully controllable.
        out = ls_json(prog.pid)
        assert [c["id"] for c in out["checkpoints"]] == [1, 2] and out["history"] == []
        prog.tell("ls")
        assert prog.lines.until("ids") == "ids [1, 2] 0"
        r = cli("restore", prog.pid, 1, "--reason", "after fuzz")
        assert r.returncode == 0, r.stderr
        assert json.loads(prog.lines.until("restored").split(" ", 1)[1])["reason"] == "operator: after fuzz"
        prog.lines.until("ready")
    finally:
        code, err = prog.finish()
    assert code == 0, err
    assert "Traceback" not in err, err
    for kind in ("malformed", "unknown", "invalid", "truncated", "too_large"):
        assert kinds.get(kind), f"the fuzz never produced a {kind!r} error: {kinds}"


# ---- another user ------------------------------------------------------------------------------------
def _as_nobody(*args: str, dac_override: bool = False, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if dac_override:
        cmd += ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def _need_second_user(dac_override: bool = False) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as a second user (uid 65534)")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run the CLI as a second user")
    probe = _as_nobody(sys.executable, "-c", "import os, forkpoint; print(os.geteuid())",
                       dac_override=dac_override)
    if probe.returncode != 0 or probe.stdout.strip() != str(NOBODY):
        pytest.skip(f"cannot run this Python as uid {NOBODY}{' with CAP_DAC_OVERRIDE' * dac_override}: "
                    f"{probe.stderr.strip()[-200:]}")


@pytest.mark.timeout(60)
def test_another_user_cannot_reach_the_private_directory(tmp_path):
    _need_second_user()
    # No XDG_RUNTIME_DIR: the socket is under the world-writable /tmp, so only the 0700 directories
    # keep uid 65534 out.
    prog = Program(tmp_path, XDG_RUNTIME_DIR="", TMPDIR="")
    try:
        d = tmp_sock_dir("/tmp", prog.pid)
        assert (d / "control.sock").exists()
        for args in (("ls", prog.pid), ("restore", prog.pid, 1), ("discard", prog.pid, 2)):
            r = _as_nobody(sys.executable, "-m", "forkpoint", *map(str, args))
            assert r.returncode == 1, (r.stdout, r.stderr)
            assert "permission denied: cannot reach" in r.stderr and "uid 0" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        out = ls_json(prog.pid)
        assert [c["id"] for c in out["checkpoints"]] == [1, 2] and out["history"] == []
    finally:
        code, err = prog.finish()
    assert code == 0, err
    assert not tmp_sock_dir("/tmp", prog.pid).exists()


@pytest.mark.timeout(60)
def test_peer_credentials_refuse_another_user(tmp_path):
    """SO_PEERCRED itself: the client runs as uid 65534 but holds CAP_DAC_OVERRIDE.

    The capability lets it through every file permission (the 0700 directory, the 0600 socket), so
    the connection reaches the shepherd, and the only thing that can stop it is the shepherd's check
    of the peer's uid. Peer credentials are taken at connect() time, which is why the client must
    drop to uid 65534 *before* connecting (a socket connected by root and then handed over would
    still read as root).
    """
    _need_second_user(dac_override=True)
    prog = Program(tmp_path, XDG_RUNTIME_DIR="", TMPDIR="")
    try:
        sock = str(tmp_sock_dir("/tmp", prog.pid) / "control.sock")
        # The directory permission does not stop this client: it can connect to the socket...
        probe = _as_nobody(sys.executable, "-c", f"""if 1:
            import os, socket
            s = socket.socket(socket.AF_UNIX)
            s.connect({sock!r})
            print(os.geteuid(), "connected")
        """, dac_override=True)
        assert probe.stdout.split() == [str(NOBODY), "connected"], probe.stderr
        # ...and yet every request is refused by the shepherd.
        for args in (("ls", prog.pid), ("status", prog.pid), ("restore", prog.pid, 1, "--reason", "evil"),
                     ("discard", prog.pid, 1)):
            r = _as_nobody(sys.executable, "-m", "forkpoint", *map(str, args), dac_override=True)
            assert r.returncode == 1, (r.stdout, r.stderr)
            assert f"permission denied: uid {NOBODY} may not control forkpoint program {prog.pid}" \
                in r.stderr, r.stderr
            assert r.stdout == ""
        out = ls_json(prog.pid)
        assert [c["id"] for c in out["checkpoints"]] == [1, 2] and out["history"] == []
        prog.tell("ls")
        assert prog.lines.until("ids") == "ids [1, 2] 0"
    finally:
        code, err = prog.finish()
    assert code == 0, err
    assert "refused process" in err and f"of uid {NOBODY}" in err, "the refusal must be logged"
