"""Shared fixtures: every test runs its scenario in a subprocess, and must leave nothing behind.

The test process makes itself a child subreaper, so any process a scenario leaks (a snapshot that
outlived its shepherd, an orphaned live process) is re-parented here, where the ``no_leaks`` fixture
sees it: a test that leaves a process or a zombie behind fails.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from forkpoint import _prctl

ROOT = Path(__file__).resolve().parent.parent
# A process group of its own for each program (Popen's process_group= is 3.11+; 3.10 for manual runs).
OWN_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
_prctl.set_child_subreaper(True)
# Ignored signals survive exec: a runner started in the background (the shell ignores SIGINT and
# SIGQUIT for it) or under nohup (SIGHUP) would hand that to every program a test starts, and each
# test about Ctrl-C or a hangup would fail (7 did, in a CI run started so). The scenarios start from
# the dispositions a terminal gives a program.
for _sig in (signal.SIGHUP, signal.SIGQUIT):
    signal.signal(_sig, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)


def _reap() -> list[int]:
    reaped = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)


@pytest.fixture(autouse=True)
def no_leaks():
    """Invariant: after a test, no process it started remains, and no zombie exists."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 1.5
    while True:
        left = [p for p in me.children(recursive=True) if p.pid not in before]
        zombies = []
        for p in left:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    zombies.append(p)
            except psutil.NoSuchProcess:
                pass
        alive = [p for p in left if p not in zombies and p.is_running()]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    _reap()
    desc = []
    for p in alive:
        try:
            desc.append(f"{p.pid} {p.name()} {p.status()}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _reap()
    assert not desc, f"processes left behind: {desc}"


def program(code: str, tmp_path: Path, name: str = "prog.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_py(code: str, tmp_path: Path, *args: str, timeout: float = 30, input: str | None = None,
           **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a program (block-buffered stdout, like a user's) and wait for it."""
    path = program(code, tmp_path)
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**extra_env), input=input)


def start_py(code: str, tmp_path: Path, *args: str, **extra_env: str) -> subprocess.Popen[str]:
    path = program(code, tmp_path)
    return subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                            env=clean_env(**extra_env), **OWN_GROUP)


def wait_for(pred, timeout: float = 10.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def wait_exit(pid: int, timeout: float = 20.0) -> int:
    """The exit code of child ``pid`` (negative: the signal that ended it). One that has not ended
    within ``timeout`` is SIGKILLed and reaped, and the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"process {pid} did not end within {timeout}s")


def read_to_eof(fd: int, timeout: float = 20.0) -> bytes:
    """What a pty's other side writes until it closes (or ``timeout`` passes)."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:          # EIO: every process holding the terminal is gone
            break
        if not chunk:
            break
        out += chunk
    return out


class Lines:
    """The program's stdout, line by line, with a timeout: a hung rollback fails one test."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import queue
        import threading

        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []

        def pump() -> None:
            for line in proc.stdout:
                self.q.put(line.rstrip("\n"))
            self.q.put("<EOF>")

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 10.0) -> str:
        import queue

        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from the program in {timeout}s; so far: {self.seen}") from None
        self.seen.append(line)
        return line

    def until(self, prefix: str, timeout: float = 10.0) -> str:
        while True:
            line = self.next(timeout)
            if line.startswith(prefix):
                return line
            if line == "<EOF>":
                raise AssertionError(f"program ended before {prefix!r}; output: {self.seen}")


# ---- real servers (gunicorn, uvicorn) ------------------------------------------------------------
# The lifespan side of a bare ASGI application, for the source of a test's application (indented
# as its own lines are): ``if scope["type"] == "lifespan": return await lifespan(receive, send)``.
ASGI_LIFESPAN = """
    async def lifespan(receive, send):
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, path: str = "/", timeout: float = 10.0, method: str = "GET") -> tuple[int, str]:
    """One request on a fresh connection: (status, body); (0, error) if the connection failed."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        return 0, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def holders_of(worker: int) -> list[int]:
    """The processes holding a descriptor table of the worker whose face PID is ``worker``."""
    try:
        kids = psutil.Process(worker).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if p.name() == "fp-fds":
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def check_default_key(port: int) -> None:
    """A server whose ``/crash`` segfaults and ``/count`` answers, protected with the default key
    and ``quarantine_after=2``: the quarantine refuses exactly the request that failed, named by
    its method, path and query; the same path with another query, or another method, still runs."""
    assert [http(port, "/crash?id=1")[0] for _ in range(3)] == [500, 500, 503]
    assert http(port, "/crash?id=2")[0] == 500         # not refused: another input
    assert http(port, "/crash?id=1", method="HEAD")[0] == 500
    assert http(port, "/count?id=1")[0] == 200
    assert http(port, "/crash?id=1")[0] == 503


def start_server(argv: list[str], cwd: Path, port: int, timeout: float = 20.0,
                 **extra_env: str) -> subprocess.Popen[str]:
    """Start a server as its own process group and wait until it answers on ``port``.

    stdout and stderr go to ``cwd/server.log`` (read it with ``server_log``), so that a chatty
    server can never block on a full pipe.
    """
    log = open(cwd / "server.log", "w")
    proc = subprocess.Popen(argv, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(**extra_env), **OWN_GROUP)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{server_log(cwd)}")
        if http(port, "/__ready__", timeout=1.0)[0]:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not answer on port {port}:\n{server_log(cwd)}")


def server_log(cwd: Path) -> str:
    try:
        return (cwd / "server.log").read_text(errors="replace")
    except OSError:
        return ""


def stop_server(proc: subprocess.Popen[str], sig: int = 15, timeout: float = 20.0) -> int:
    """Signal the server's process and wait for it; on a timeout kill its whole group."""
    import signal as _signal

    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, _signal.SIGKILL)
        proc.wait()
        raise


# A uid no other test or user of this machine runs as: the process-limit (ulimit -u) scenarios
# count every process of their uid, so they must not share it with anything else.
SQUEEZED_UID = 64999


def run_as(uid: int, code: str, *args: str, timeout: float = 30,
           **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (``python -c``) as ``uid`` with no capabilities (root is exempt from ulimit -u).

    The code must live in the command line: the test's tmp_path is private to root.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to run a scenario as another uid")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", _interpreter_for(uid), "-c",
           textwrap.dedent(code), *args]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **extra_env}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


_INTERPRETERS: dict[int, str] = {}


def _interpreter_for(uid: int) -> str:
    """A Python that ``uid`` can run *and exec again* (the shepherd execs sys.executable): ours if
    its path is open to that uid, else the system's python3 (forkpoint needs nothing else)."""
    if uid not in _INTERPRETERS:
        probe = "import os, sys; os.execv(sys.executable, [sys.executable, '-c', 'print(1)'])"
        for exe in (sys.executable, "/usr/bin/python3"):
            r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", exe, "-c",
                                probe], capture_output=True, text=True, timeout=30, cwd="/")
            if r.stdout.strip() == "1":
                _INTERPRETERS[uid] = exe
                break
        else:
            pytest.skip(f"no Python that uid {uid} can exec")
    return _INTERPRETERS[uid]


# ---- a real Redis (Debian's redis-server) -----------------------------------------------------------
REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A real redis-server of the test's own: a free port, a temporary directory, no persistence."""

    def __init__(self, tmp_path: Path) -> None:
        assert REDIS_SERVER is not None
        self.port = free_port()
        self.dir = tmp_path / "redis"
        self.dir.mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--daemonize", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except Exception:  # noqa: BLE001 - not up yet
                assert self.proc is not None and self.proc.poll() is None, (self.dir / "redis.log").read_text()
                return False
        wait_for(up, timeout=20, interval=0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip("the redis package is not installed: pip install 'forkpoint[redis]'")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
