"""Operator control under a hostile /tmp (issue 13.8, invariant 9): another user cannot deny or hijack
it, decoy sockets and idle connections cannot starve it, and nothing the program says reaches the
operator's terminal as raw control characters.

Real programs, the real CLI, real sockets; the other user is uid 65534 (files it plants are made
by root and handed over with chown, which is what it could have made itself).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, Lines, clean_env, program, start_py, wait_for

pytestmark = pytest.mark.timeout(90)

NOBODY = 65534

PROG = """
    import os, sys, time
    import forkpoint as fp
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        fp.tlongjmp(n, reason=os.environ.get("REASON", "plain"))
    print("ready", os.getpid(), flush=True)
    sys.stdin.readline()
"""


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forkpoint", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=clean_env(**env), cwd=str(ROOT))


def _listening(pid: int) -> bool:
    with open("/proc/net/unix") as f:
        return any(line.rstrip("\n").endswith(f"/forkpoint-{pid}/control.sock") for line in f)


def _start(tmp_path: Path, **env: str):
    proc = start_py(PROG, tmp_path, **env)
    lines = Lines(proc)
    lines.until("ready")
    wait_for(lambda: _listening(proc.pid))
    return proc


def _finish(proc) -> None:
    try:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("planted", ["forkpoint-{pid}", "forkpoint-u0"])
def test_a_directory_planted_by_another_user_neither_denies_nor_hijacks_control(tmp_path, planted):
    """Issue 13.8: any local user could create /tmp/forkpoint-<PID> for a predictable PID, and the
    program then ran without operator control (File exists). Sockets now live in a directory of
    the user's own, checked after it is made; a name planted in /tmp (the old per-PID one, or the
    new per-user one) is never used. The program's PID is made predictable here for real: it runs
    in a private PID namespace whose next PID is set (ns_last_pid)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1)")
    pid = 4242
    shared = Path(tempfile.mkdtemp(prefix="fptmp-", dir="/tmp"))    # a world-writable /tmp of its own
    shared.chmod(0o1777)
    trap = shared / planted.format(pid=pid)
    trap.mkdir(mode=0o777)
    os.chown(trap, NOBODY, NOBODY)
    prog = program("""
        import signal, sys, time
        import forkpoint as fp
        fp.tsetjmp()
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """, tmp_path)
    script = f"""
        echo {pid - 1} > /proc/sys/kernel/ns_last_pid
        "$0" "$1" < /dev/null &
        P=$!
        n=0
        while ! grep -q "/forkpoint-$P/control.sock" /proc/net/unix; do
            n=$((n+1)); [ $n -gt 500 ] && break; sleep 0.02
        done
        echo "pid $P"
        "$0" -m forkpoint status "$P" --json
        echo "status $?"
        kill -TERM $P; wait $P
    """
    try:
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script, sys.executable,
                            str(prog)], capture_output=True, text=True, timeout=60,
                           env=clean_env(XDG_RUNTIME_DIR="", TMPDIR=str(shared)), cwd=str(ROOT))
        assert f"pid {pid}" in r.stdout, (r.stdout, r.stderr)
        assert "status 0" in r.stdout, (r.stdout, r.stderr)
        status = json.loads(r.stdout.split(f"pid {pid}\n", 1)[1].split("\nstatus", 1)[0])
        assert status["pid"] == pid and status["checkpoints"] == 1
        assert trap not in Path(status["socket"]).parents, status["socket"]
        assert trap.stat().st_uid == NOBODY and not any(trap.iterdir()), "the planted directory was used"
        if planted == "forkpoint-u0":
            assert "is not a private directory of uid 0" in r.stderr, r.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_decoy_sockets_with_full_backlogs_do_not_keep_the_client_away(tmp_path):
    """Issue 13.8: 40 decoy sockets whose names fit the program's PID, each with a full listen
    backlog, made `forkpoint status PID` give up. The client now only tries sockets the target
    process holds (its /proc/PID/fd), and never waits on one while others remain."""
    proc = _start(tmp_path)
    decoys: list[socket.socket] = []
    base = Path(tempfile.mkdtemp(prefix="fpdecoy-", dir="/tmp"))
    try:
        for i in range(40):
            d = base / f"d{i}" / f"forkpoint-{proc.pid}"
            d.mkdir(parents=True)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(str(d / "control.sock"))
            srv.listen(0)
            decoys.append(srv)
            while True:                     # fill its backlog: the next connect would wait
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.setblocking(False)
                try:
                    c.connect(str(d / "control.sock"))
                    decoys.append(c)
                except BlockingIOError:
                    c.close()
                    break
        r = cli("status", proc.pid, "--json", "--timeout", "5")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["pid"] == proc.pid
    finally:
        for s in decoys:
            s.close()
        shutil.rmtree(base, ignore_errors=True)
        _finish(proc)


def test_idle_connections_cannot_starve_the_operator(tmp_path, monkeypatch):
    """Issue 13.8: 40 idle connections from the same user filled the 16 connection slots, and
    every real request was answered busy. A full server now closes the connection that has waited
    longest for its request, and reads a new connection's request at once."""
    proc = _start(tmp_path)
    idle: list[socket.socket] = []
    try:
        path = next(line.rstrip("\n").split(None, 7)[7] for line in open("/proc/net/unix")
                    if line.rstrip("\n").endswith(f"/forkpoint-{proc.pid}/control.sock"))
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            idle.append(s)
        time.sleep(0.2)                     # all of them accepted and waiting
        for _ in range(3):
            r = cli("status", proc.pid, "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["pid"] == proc.pid
    finally:
        for s in idle:
            s.close()
        _finish(proc)


def test_control_characters_from_the_program_are_escaped_in_what_the_cli_prints(tmp_path):
    """Issue 13.8: a tlongjmp reason from the program reached the operator's terminal as raw
    escape sequences. Everything the CLI prints from the program is escaped."""
    reason = "\x1b[2J\x1b]0;owned\x07\u202eevil\nline"
    proc = _start(tmp_path, REASON=reason)
    try:
        r = cli("ls", proc.pid)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\u202e" not in r.stdout, repr(r.stdout)
        assert "\\x1b[2J\\x1b]0;owned\\x07\\u202eevil\\nline" in r.stdout, r.stdout
        assert len(r.stdout.splitlines()) == 5, r.stdout     # header, table head, 1 row, history, 1 entry
        r = cli("ls", proc.pid, "--json")                       # JSON is escaped by its own rules
        assert "\x1b" not in r.stdout and json.loads(r.stdout)["history"][0]["reason"] == reason[:64]
    finally:
        _finish(proc)


def test_a_program_in_another_pid_namespace_leaves_live_programs_their_sockets(tmp_path):
    """A forkpoint program run in a private PID namespace (``unshare --pid``, same /tmp) sees none
    of the PIDs outside it: its start-up cleanup took every live program's directory in the user
    directory for stale and removed it, and ``forkpoint status PID`` answered "its control socket
    was not found" for the rest of those programs' lives (a Redis test failed so whenever another
    suite ran a test in a PID namespace at the same time). A socket that is listened on is kept."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1)")
    shared = Path(tempfile.mkdtemp(prefix="fpns-", dir="/tmp"))      # short: AF_UNIX paths
    env = {"XDG_RUNTIME_DIR": "", "TMPDIR": str(shared)}
    proc = _start(tmp_path, **env)
    inner = program("""
        import time
        import forkpoint as fp
        fp.tsetjmp()
        def ours() -> int:     # the outer program's socket and, once its shepherd is up, this one's
            with open("/proc/net/unix") as f:
                return sum(" " + PREFIX + "/" in line and line.rstrip().endswith("/control.sock") for line in f)
        while ours() < 2:
            time.sleep(0.01)
        print("checkpoint taken, its socket bound", flush=True)
    """.replace("PREFIX", repr(str(shared))), tmp_path, "inner.py")
    try:
        r = cli("status", proc.pid, "--json", **env)
        assert r.returncode == 0, r.stderr
        sock = json.loads(r.stdout)["socket"]
        ns = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", '"$0" "$1"; echo "exit=$?"',
                             sys.executable, str(inner)], capture_output=True, text=True, timeout=60,
                            env=clean_env(**env), cwd=str(ROOT))
        assert ns.stdout.splitlines() == ["checkpoint taken, its socket bound", "exit=0"], (ns.stdout, ns.stderr)
        assert os.path.exists(sock), "the live program's socket was removed"
        r = cli("status", proc.pid, "--json", **env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["socket"] == sock
    finally:
        _finish(proc)
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize("removed", ["directory", "socket"])
def test_a_socket_removed_under_a_running_program_is_made_again(tmp_path, removed):
    """A cleaner that ages /tmp (systemd-tmpfiles: 10 days by default) or an ``rm`` can remove a
    long-running program's socket or its directory; every ``forkpoint status PID`` then said "its
    control socket was not found" for the rest of the program's life. The shepherd looks every
    few seconds and listens again; it also touches them, so that an ageing cleaner leaves them."""
    shared = Path(tempfile.mkdtemp(prefix="fprm-", dir="/tmp"))      # short: AF_UNIX paths
    env = {"XDG_RUNTIME_DIR": "", "TMPDIR": str(shared)}
    proc = _start(tmp_path, **env)
    try:
        r = cli("status", proc.pid, "--json", **env)
        assert r.returncode == 0, r.stderr
        sock = Path(json.loads(r.stdout)["socket"])
        before = sock.stat().st_mtime
        wait_for(lambda: sock.stat().st_mtime > before, timeout=30)     # touched
        if removed == "directory":
            shutil.rmtree(sock.parent)
        else:
            sock.unlink()
        assert cli("status", proc.pid, "--json", **env).returncode != 0
        wait_for(lambda: cli("status", proc.pid, "--json", **env).returncode == 0, timeout=30)
        assert json.loads(cli("status", proc.pid, "--json", **env).stdout)["socket"] == str(sock)
    finally:
        _finish(proc)
        shutil.rmtree(shared, ignore_errors=True)
    assert "listening again" in proc.stderr.read()
