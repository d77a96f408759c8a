"""systemd's notification socket: a ``Type=notify`` service under forkpoint.

Invariant protected: every notification the program sends (``READY=1``, ``STATUS=``,
``WATCHDOG=1``, ``FDSTORE=1`` with its descriptors) reaches ``$NOTIFY_SOCKET`` once, unchanged,
with the program's PID (the face, systemd's MainPID) as the sender the kernel stamps, after
``start()`` and after a restore from a real segfault, as the same program run without forkpoint
shows. systemd (``NotifyAccess=main``, the default) takes a datagram only from the main PID: the
live process's own PID made every one of them rejected (the unit never became ready, and
``WatchdogSec=`` killed it). A process of the program's other than the live one (its children
inherit the variable) is never taken for the main PID. The watchdog is for this program in C
(libsystemd) as in Python, and a program that unsets ``NOTIFY_SOCKET`` itself runs on.

The harness plays systemd: a real AF_UNIX datagram socket with SO_PASSCRED, whose kernel-filled
SCM_CREDENTIALS say who sent each datagram. Each program runs in a subprocess with a timeout.
"""
from __future__ import annotations

import array
import ctypes
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import clean_env, wait_for

from forkpoint import _procfs, _rundir

pytestmark = pytest.mark.timeout(120)

_UCRED = struct.Struct("iII")


class Systemd:
    """The receiving end of ``$NOTIFY_SOCKET``, as systemd's manager has it."""

    def __init__(self, address: str) -> None:
        self.address = address             # as NOTIFY_SOCKET says it ('@' for an abstract name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)

    def received(self) -> list[tuple[str, int, list[bytes]]]:
        """(text, sender pid, what each passed descriptor reads) of every datagram queued."""
        out = []
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4) + socket.CMSG_SPACE(12))
            except BlockingIOError:
                return out
            assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
            pid, contents = 0, []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[:_UCRED.size])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        with os.fdopen(fd, "rb") as f:
                            contents.append(f.read())
            out.append((data.decode(), pid, contents))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def systemd(request) -> Iterator[Systemd]:
    """systemd's socket at a path (a short one: pytest's tmp_path can pass the 108-byte limit), and
    at an abstract address, as a user manager or a container's may use."""
    where = tempfile.mkdtemp(prefix="fp-sd-")
    address = os.path.join(where, "notify") if request.param == "path" else f"@fp-sd-{os.path.basename(where)}"
    s = Systemd(address)
    yield s
    s.close()
    shutil.rmtree(where)


def _run(tmp_path: Path, code: str, mode: str, notify: str, shell: str = "",
         **env: str) -> tuple[int, list[str], str]:
    """(PID, stdout lines, stderr) of ``code`` run as a program, with forkpoint when ``mode`` is
    "fp"; ``shell`` is run by sh before it execs the program (with $$ its PID)."""
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(code))
    argv = [sys.executable, str(path), mode]
    if shell:
        argv = ["sh", "-c", shell + '; exec "$@"', "sh", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(NOTIFY_SOCKET=notify, **env))
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, f"{mode}: exit {proc.returncode}\n{out}\n{err}"
    return proc.pid, out.splitlines(), err


HEADER = """
    import array, ctypes, os, signal, socket, sys
    fp = None
    if sys.argv[1] == "fp":
        import forkpoint as fp
        fp.recover_on(signal.SIGSEGV)
        fp.start()

    def address():
        addr = os.environ["NOTIFY_SOCKET"]
        return "\\0" + addr[1:] if addr.startswith("@") else addr

    def crash_once():
        # With forkpoint: a checkpoint, a real segfault, and the program goes on restored from it.
        # Without it the program simply goes on.
        if fp is not None:
            fp.tsetjmp()
            if not fp.chkpt_status(fp.CHKPT_RECOVERED):
                ctypes.string_at(0)
"""


def test_notifications_arrive_once_from_the_main_pid_after_start_and_after_a_restore(tmp_path, systemd):
    """sdnotify's and a plain sendmsg's datagrams, before and after a restore from a segfault."""
    code = HEADER + """
    import sdnotify

    def notify(tag):
        sdnotify.SystemdNotifier(debug=True).notify(f"READY=1\\nSTATUS=sdnotify {tag}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendmsg([f"STATUS=sendmsg {tag}".encode()], [], 0, address())

    print(os.getpid(), flush=True)
    notify("first")
    crash_once()
    notify("second")
    """
    runs = {}
    for mode in ("plain", "fp"):
        pid, out, err = _run(tmp_path, code, mode, systemd.address)
        assert out == [str(pid)]
        got = systemd.received()
        runs[mode] = [(text, sender == pid) for text, sender, _ in got]
        assert all(sender == pid for _, sender, _ in got), f"{mode}: senders {got}, main PID {pid}"
    assert runs["fp"] == runs["plain"] == [
        ("READY=1\nSTATUS=sdnotify first", True), ("STATUS=sendmsg first", True),
        ("READY=1\nSTATUS=sdnotify second", True), ("STATUS=sendmsg second", True)]


def test_a_descriptor_stored_with_fdstore_arrives_intact(tmp_path, systemd):
    """FDSTORE=1 with SCM_RIGHTS: the descriptor reaches systemd, still reading what was written."""
    code = HEADER + """
    def store(tag):
        r, w = os.pipe()
        os.write(w, f"contents {tag}".encode())
        os.close(w)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendmsg([f"FDSTORE=1\\nFDNAME={tag}".encode()],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))], 0, address())
        os.close(r)

    store("first")
    crash_once()
    store("second")
    """
    runs = {}
    for mode in ("plain", "fp"):
        pid, _, _ = _run(tmp_path, code, mode, systemd.address)
        runs[mode] = [(text, sender == pid, contents) for text, sender, contents in systemd.received()]
    assert runs["fp"] == runs["plain"] == [
        ("FDSTORE=1\nFDNAME=first", True, [b"contents first"]),
        ("FDSTORE=1\nFDNAME=second", True, [b"contents second"])]


def _libsystemd() -> str:
    try:
        ctypes.CDLL("libsystemd.so.0")
        return "libsystemd.so.0"
    except OSError:
        return ""


def test_the_watchdog_is_this_programs_in_c_and_in_python(tmp_path, systemd):
    """WATCHDOG_PID names the main PID: libsystemd's sd_watchdog_enabled() (which compares it with
    the C getpid()) and a Python check against os.getpid() both say the watchdog is on, and the
    ping reaches systemd from the main PID, after start() and after a restore."""
    code = HEADER + f"""
    LIB = {_libsystemd()!r}
    def check(tag):
        if LIB:
            lib = ctypes.CDLL(LIB)
            usec = ctypes.c_uint64(0)
            print(tag, "libsystemd", lib.sd_watchdog_enabled(0, ctypes.byref(usec)), usec.value)
            print(tag, "ping", lib.sd_notify(0, f"WATCHDOG=1\\nSTATUS={{tag}}".encode()))
        else:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendmsg([f"WATCHDOG=1\\nSTATUS={{tag}}".encode()], [], 0, address())
        pid = os.environ.get("WATCHDOG_PID")     # what the systemd_watchdog package checks
        print(tag, "python", "WATCHDOG_USEC" in os.environ and pid in (None, str(os.getpid())))

    check("first")
    crash_once()
    check("second")
    """
    runs = {}
    for mode in ("plain", "fp"):
        pid, out, _ = _run(tmp_path, code, mode, systemd.address, shell="export WATCHDOG_PID=$$",
                           WATCHDOG_USEC="30000000")
        got = [(text, sender == pid) for text, sender, _ in systemd.received()]
        runs[mode] = (out, got)
    assert runs["fp"] == runs["plain"]
    out, got = runs["plain"]
    assert got == [("WATCHDOG=1\nSTATUS=first", True), ("WATCHDOG=1\nSTATUS=second", True)]
    assert "first python True" in out and "second python True" in out
    if _libsystemd():
        assert "first libsystemd 1 30000000" in out and "second libsystemd 1 30000000" in out


def test_a_child_of_the_program_is_never_taken_for_the_main_pid(tmp_path, systemd):
    """A child inherits NOTIFY_SOCKET. Without forkpoint its datagrams carry its own PID, and
    systemd (NotifyAccess=main) rejects them: under forkpoint they arrive with that same PID when
    the shepherd may say so (CAP_SYS_ADMIN), and not at all when it may not; never as the main
    PID's. The child lives until its parent's datagram, sent after its own, has arrived (a PID
    that is gone cannot be named)."""
    code = HEADER + """
    crash_once()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendmsg([b"STATUS=child"], [], 0, address())
        os.write(w, b"sent")
        sys.stdin.readline()            # until the test has seen the main PID's datagram
        os._exit(0)
    os.read(r, 4)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendmsg([b"STATUS=main"], [], 0, address())
    os.waitpid(child, 0)
    print("child", child)
    """
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(code))

    def run(mode: str, *prefix: str) -> list[tuple[str, str | int]]:
        proc = subprocess.Popen([*prefix, sys.executable, str(path), mode], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=clean_env(NOTIFY_SOCKET=systemd.address))
        got: list[tuple[str, int, list[bytes]]] = []
        try:
            while not any(text == "STATUS=main" for text, _, _ in got):
                if not select.select([systemd.sock], [], [], 60)[0]:
                    raise AssertionError(f"{mode}: no datagram from the program; so far {got}")
                got += systemd.received()
            out, err = proc.communicate("\n", timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, f"{mode}: exit {proc.returncode}\n{out}\n{err}"
        child = int(out.split()[1])
        return [(text, {proc.pid: "main", child: "child"}.get(sender, sender)) for text, sender, _ in got]

    plain = run("plain")
    assert plain == [("STATUS=child", "child"), ("STATUS=main", "main")]
    if _procfs.has_capability(21):     # CAP_SYS_ADMIN: the child's own credentials are forwarded
        assert run("fp") == plain
    if os.geteuid() == 0 and shutil.which("setpriv"):
        # Without CAP_SYS_ADMIN the shepherd may not send with another PID: the child's is dropped.
        prefix = ("setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--")
        assert run("plain", *prefix) == plain
        assert run("fp", *prefix) == [("STATUS=main", "main")]


def test_a_program_that_unsets_notify_socket_runs_on(tmp_path, systemd):
    """sd_notify(unset_environment=1) and os.environ.pop: the program sends once and runs on,
    through a restore, as without forkpoint."""
    code = HEADER + f"""
    LIB = {_libsystemd()!r}
    if LIB:
        print("sent", ctypes.CDLL(LIB).sd_notify(1, b"READY=1") > 0)
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            print("sent", s.sendmsg([b"READY=1"], [], 0, address()) > 0)
    os.environ.pop("NOTIFY_SOCKET")
    crash_once()
    print("after", os.environ.get("NOTIFY_SOCKET"), flush=True)
    """
    runs = {}
    for mode in ("plain", "fp"):
        pid, out, _ = _run(tmp_path, code, mode, systemd.address)
        runs[mode] = (out, [(text, sender == pid) for text, sender, _ in systemd.received()])
    assert runs["fp"] == runs["plain"] == (["sent True", "after None"], [("READY=1", True)])


@pytest.mark.parametrize("systemd", ["path"], indirect=True)
def test_notifications_go_on_after_the_run_directory_is_removed(tmp_path, systemd):
    """A cleaner (or ``rm``) removes the program's run directory, with the relay's socket in it: the
    relay binds it again at the same path, which the program's NOTIFY_SOCKET still names, and the
    program's notifications reach systemd again, from the main PID, each at most once."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HEADER + """
    import select
    print(os.environ["NOTIFY_SOCKET"], flush=True)
    i = 0
    while not select.select([sys.stdin], [], [], 0.02)[0]:
        i += 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendmsg([f"STATUS={i}".encode()], [], 0, address())
            except OSError:         # gone for now (sdnotify and libsystemd ignore it too)
                pass
    """), "fp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env(NOTIFY_SOCKET=systemd.address))
    got: list[tuple[str, int, list[bytes]]] = []

    def more() -> None:
        if not select.select([systemd.sock], [], [], 30)[0]:
            raise AssertionError(f"no notification in 30 s; so far {got[-3:]}")
        got.extend(systemd.received())

    try:
        relay = proc.stdout.readline().strip()
        assert relay != systemd.address and os.path.basename(relay) == "notify.sock"
        more()
        shutil.rmtree(os.path.dirname(relay))
        wait_for(lambda: os.path.exists(relay), timeout=30)
        before = len(got)
        more()
        while len(got) == before:
            more()
        out, err = proc.communicate("\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    texts = [text for text, _, _ in got]
    assert len(set(texts)) == len(texts)
    assert {sender for _, sender, _ in got} == {proc.pid}
    assert "bound again" in err


def test_a_run_directory_whose_relay_is_bound_is_not_taken_for_a_dead_programs():
    """The relay is bound before the shepherd listens on its control socket: in that window another
    forkpoint program's clean-up (one in another PID namespace sees no process with this PID) took
    the directory for a dead program's and removed it, with the first notifications. A bound
    ``notify.sock`` says a program is there; an unbound one does not."""
    base = tempfile.mkdtemp(prefix="fp-sd-")
    try:
        os.chmod(base, 0o700)
        pid = (1 << 22) + 7                     # above any pid_max: no process has it
        held = os.path.join(base, f"forkpoint-{pid}")
        left = os.path.join(base, f"forkpoint-{pid + 1}")
        os.mkdir(held, 0o700)
        os.mkdir(left, 0o700)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
            gone.bind(os.path.join(left, "notify.sock"))      # its file stays, unbound
        relay = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        relay.bind(os.path.join(held, "notify.sock"))
        try:
            assert _rundir.cleanup_stale(base) == [left]
            assert os.path.isdir(held)
        finally:
            relay.close()
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("systemd", ["path"], indirect=True)
def test_a_run_directory_past_the_path_limit_gives_an_abstract_relay(tmp_path, systemd):
    """A socket path has at most 107 bytes: with the only run directory deeper than that, the relay
    takes an abstract name, and notifications still come from the main PID."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir(mode=0o700)
    code = HEADER + """
    print(os.environ["NOTIFY_SOCKET"].startswith("@forkpoint-notify-"), flush=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendmsg([b"READY=1"], [], 0, address())
    crash_once()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendmsg([b"STATUS=second"], [], 0, address())
    """
    env = {"TMPDIR": str(deep), "XDG_RUNTIME_DIR": ""}
    pid, out, _ = _run(tmp_path, code, "fp", systemd.address, **env)
    assert out == ["True"]
    assert [(text, sender == pid) for text, sender, _ in systemd.received()] == [
        ("READY=1", True), ("STATUS=second", True)]
