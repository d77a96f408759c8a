"""systemd's notification socket: the program's ``sd_notify()`` datagrams, sent as the face.

**Why.** A ``Type=notify`` service sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` (and
``FDSTORE=1`` with descriptors) as datagrams to ``$NOTIFY_SOCKET``. systemd learns the sender from
the kernel (SCM_CREDENTIALS) and, under ``NotifyAccess=main`` (the default), takes only the main
PID's: the face, the shepherd. The program runs in the live process, whose PID is another, so
every notification was rejected: the unit never became ready, and ``WatchdogSec=`` killed it.

**How.** Before the live program is cloned, ``prepare`` binds a datagram socket with SO_PASSCRED
in the program's run directory (``_rundir``: ``forkpoint-<PID>/notify.sock``, mode 0700, shared
with the control socket) and points ``NOTIFY_SOCKET`` at it, in ``os.environ`` and so in the C
environment, so that every copy of the program has it. The shepherd keeps the real address and
``Relay`` forwards each datagram unchanged, with its descriptors, so the kernel stamps the face PID.
A run directory whose socket path would pass the 107 bytes an address may have is skipped; with
none left, the relay takes a random abstract name (``@forkpoint-notify-<PID>-<hex>``): anyone in
the network namespace can send there, which the sender check below makes harmless.

**Who may speak as the face.** Only a process that has run program code as the live process (a
datagram may come after a restore or a death: the last few such PIDs are remembered). Anything
else (the program's own children inherit the variable) would be rejected by systemd under
``NotifyAccess=main`` without forkpoint, and must not be taken for the main PID's now: when the
shepherd may name another PID (CAP_SYS_ADMIN, as a root service has), the datagram is forwarded
with its sender's own credentials, so systemd judges it exactly as without forkpoint (whatever
``NotifyAccess`` says); otherwise it is dropped, which is what the default ``NotifyAccess=main``
does with it anyway (``NotifyAccess=all`` loses it; a warning, once).

**Never in the way.** The relay is one more descriptor in the shepherd's loop, read at most
``BATCH`` datagrams per turn; sends never block (a full systemd queue pauses the reading, so that
the program's own sends block, as they would on systemd's socket); an error is logged on logger
``forkpoint`` and ends nothing. ``WATCHDOG_PID`` naming the face is removed from the program's
environment: libsystemd's ``sd_watchdog_enabled()`` compares it with the C ``getpid()`` (the
live process's) and said "no watchdog"; unset, C and Python agree the watchdog is this program's.
"""
from __future__ import annotations

import array
import collections
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

from . import _procfs, _rundir
from ._loop import EventLoop

log = logging.getLogger("forkpoint")

VARIABLE = "NOTIFY_SOCKET"
SOCKET_NAME = _rundir.NOTIFY_NAME
MAX_PATH = 107                 # bytes of a socket path, its NUL excluded (libsystemd's limit too)
MAX_DATA = 1 << 16             # systemd reads at most 4096 bytes: a larger datagram is dropped there too
_ANCILLARY = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(12)   # SCM_MAX_FD descriptors, a ucred
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_CAP_SYS_ADMIN = 21
BATCH = 16                     # datagrams per turn of the shepherd's loop
CHECK_INTERVAL = 5.0           # seconds between touches of the socket file (as _control's)
_REMEMBERED = 16               # reaped live processes whose last datagrams are still the program's


def _address(value: str) -> str | None:
    """The socket address a NOTIFY_SOCKET value names; None for one not relayed (vsock:...)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return value if value.startswith("/") else None


def forget_watchdog_pid(face: int) -> None:
    """Unset WATCHDOG_PID when it names the face: see the module's docstring."""
    if os.environ.get("WATCHDOG_PID") == str(face):
        del os.environ["WATCHDOG_PID"]


class Prepared:
    """The relay's socket, made by the original process before the live program is cloned."""

    def __init__(self, sock: socket.socket, real: str, directory: str) -> None:
        self.sock = sock
        self.real = real               # NOTIFY_SOCKET as systemd gave it
        self.dir = directory           # the run directory it is in; "" for an abstract name

    def in_live(self) -> None:
        """The live process holds no copy of the shepherd's socket."""
        self.sock.close()

    def undo(self) -> None:
        """The start failed: the program goes on in this process, talking to systemd itself."""
        os.environ[VARIABLE] = self.real
        self.sock.close()
        if self.dir:
            with contextlib.suppress(OSError):
                _rundir.remove_dir(self.dir)

    def to_args(self) -> dict[str, Any]:
        """For the shepherd, whose ``Relay`` owns the descriptor from now on."""
        return {"fd": self.sock.detach(), "real": self.real, "dir": self.dir}


def prepare(face: int) -> Prepared | None:
    """Bind the relay and point NOTIFY_SOCKET at it; None when there is nothing to relay, or no
    socket could be made (logged: the program then talks to systemd as its live process)."""
    forget_watchdog_pid(face)
    real = os.environ.get(VARIABLE, "")
    if not real or _address(real) is None:
        return None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    except OSError as e:
        log.warning("no socket to relay systemd notifications (%s): they come from the live process", e)
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        directory = _bind_in_run_dir(sock, face)
        address = os.path.join(directory, SOCKET_NAME) if directory else ""
        if not directory:
            address = f"@forkpoint-notify-{face}-{os.urandom(8).hex()}"     # secrets.token_hex(8)
            sock.bind("\0" + address[1:])
    except OSError as e:
        sock.close()
        log.warning("no socket to relay systemd notifications (%s): they come from the live process", e)
        return None
    os.environ[VARIABLE] = address
    return Prepared(sock, real, directory)


def _bind_in_run_dir(sock: socket.socket, face: int) -> str:
    """Bind ``sock`` in the program's run directory, made here; the directory, or "" if none fit."""
    for base in _rundir.base_dirs():
        directory = os.path.join(base, f"{_rundir.DIR_PREFIX}{face}")
        path = os.path.join(directory, SOCKET_NAME)
        if len(os.fsencode(path)) > MAX_PATH:
            continue
        _rundir.cleanup_stale(base)
        try:
            _rundir.make_dir(directory)
        except OSError as e:
            log.debug("notify relay: %s: %s", directory, e)
            continue
        try:
            _rundir.bind_private(sock, path)
            return directory
        except OSError as e:
            log.debug("notify relay: %s: %s", path, e)
            with contextlib.suppress(OSError):
                _rundir.remove_dir(directory)
    return ""


def _parse(anc: list[tuple[int, int, bytes]]) -> tuple[list[int], tuple[int, int, int] | None]:
    fds: list[int] = []
    creds = None
    for level, kind, data in anc:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(data[:len(data) - len(data) % got.itemsize])
            fds.extend(got)
        elif kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            creds = _UCRED.unpack(data[:_UCRED.size])
    return fds, creds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Relay:
    """The shepherd's side: forwards what the program sends to systemd's real socket."""

    def __init__(self, args: dict[str, Any], loop: EventLoop, is_program: Callable[[int], bool]) -> None:
        self.loop = loop
        self.is_program = is_program       # has this PID run program code (the live process)?
        self.sock = socket.socket(fileno=args["fd"])
        try:
            self.sock.setblocking(False)
            self.sock.set_inheritable(False)
            self.real: str = args["real"]
            self.target = _address(self.real)
            self.dir: str = args["dir"]
            self.path = os.path.join(self.dir, SOCKET_NAME) if self.dir else ""
            self.ident = self._socket_ident()
            self.out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.out.setblocking(False)
        except BaseException:
            # Closed, so that the program's sends fail at once: left unread, its queue would fill
            # and block the program's next sd_notify() for ever.
            self.sock.close()
            raise
        os.environ[VARIABLE] = self.real   # the shepherd's own (it started none of the program)
        self.impersonate = _procfs.has_capability(_CAP_SYS_ADMIN)
        self.reaped: collections.deque[int] = collections.deque(maxlen=_REMEMBERED)
        self.stalled: tuple[bytes, list[int], list[tuple[int, int, bytes]]] | None = None
        self.delay = 0.01
        self.warned: set[str] = set()
        self.closed = False
        loop.add_reader(self.sock, self._on_readable)
        if self.path:
            loop.after(CHECK_INTERVAL, self._check_tick)

    def gone(self, pid: int) -> None:
        """A live process was reaped: what it sent before it died is still the program's."""
        self.reaped.append(pid)

    # -- forwarding ------------------------------------------------------------------------------
    def _on_readable(self, limit: int = BATCH) -> None:
        for _ in range(limit):
            if self.stalled is not None or self.closed:
                return
            try:
                data, anc, flags, _ = self.sock.recvmsg(MAX_DATA, _ANCILLARY,
                                                        socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._warn("receive", f"could not read the notify relay: {e}")
                return
            fds, creds = _parse(anc)
            try:
                self._pass(data, fds, creds, flags)
            except Exception:  # noqa: BLE001 - a relay fault never reaches the shepherd's loop
                _close_all(fds)
                log.exception("notify relay: a datagram was lost")

    def _pass(self, data: bytes, fds: list[int], creds: tuple[int, int, int] | None, flags: int) -> None:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_all(fds)
            self._warn("size", f"a notification larger than {MAX_DATA} bytes (or with its descriptors "
                               "cut) was dropped (systemd takes at most 4096 bytes)")
            return
        anc: list[tuple[int, int, bytes]] = []
        if fds:
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
        pid = creds[0] if creds is not None else 0
        if pid and (self.is_program(pid) or pid in self.reaped):
            pass                               # sent as is: the kernel stamps the face's PID
        elif creds is not None and pid and self.impersonate:   # as its sender's: judged as without us
            anc.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, _UCRED.pack(*creds)))
        else:
            _close_all(fds)
            self._warn("other", f"a notification from process {pid}, not the program's live process, "
                                "was dropped: systemd takes only the main PID's (NotifyAccess=main), and "
                                "forkpoint may not send it with its sender's PID (no CAP_SYS_ADMIN)")
            return
        if not self._send(data, fds, anc):
            self.stalled = (data, fds, anc)
            self.loop.remove(self.sock)
            self.delay = 0.01
            self.loop.after(self.delay, self._retry)

    def _send(self, data: bytes, fds: list[int], anc: list[tuple[int, int, bytes]]) -> bool:
        """Send one datagram on; False if systemd's queue is full (try again), else True (sent, or
        dropped with a log). The descriptors are closed once they are sent or dropped."""
        try:
            self.out.sendmsg([data], anc, socket.MSG_DONTWAIT, self.target)
        except (BlockingIOError, InterruptedError):
            return False
        except ProcessLookupError:    # its sender is gone: no one can be named for it any more
            log.debug("notify relay: the sender of a notification is gone; dropped")
        except OSError as e:
            self._warn(f"send {e.errno}", f"a notification could not be passed on to {self.real}: {e}")
        _close_all(fds)
        return True

    def _retry(self) -> None:
        if self.closed or self.stalled is None:
            return
        if not self._send(*self.stalled):
            self.delay = min(2 * self.delay, 0.5)
            self.loop.after(self.delay, self._retry)
            return
        self.stalled = None
        self.loop.add_reader(self.sock, self._on_readable)
        self._on_readable()

    def _warn(self, what: str, message: str, level: int = logging.WARNING) -> None:
        """Once per kind at ``level``, then at debug level: a flood of them must not flood the log."""
        if what in self.warned:
            log.debug("notify relay: %s", message)
            return
        self.warned.add(what)
        log.log(level, "notify relay: %s", message)

    # -- the socket's file -----------------------------------------------------------------------
    def _socket_ident(self) -> tuple[int, int] | None:
        try:
            st = os.lstat(self.path) if self.path else None
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if st is not None and stat.S_ISSOCK(st.st_mode) else None

    def _check_tick(self) -> None:
        if self.closed:
            return
        try:
            self._check()
        except Exception:  # noqa: BLE001 - the program runs on; the next tick tries again
            log.exception("notify relay: could not check %s", self.path)
        self.loop.after(CHECK_INTERVAL, self._check_tick)

    def _check(self) -> None:
        """Keep the socket's file where the program sends, as ``_control`` keeps its own: touched
        (cleaners age files by their times), bound again at the same path if it was removed."""
        ident = self._socket_ident()
        if ident is not None and ident == self.ident:
            os.utime(self.path)
            return
        if self.stalled is not None:
            return                         # bound again once the queue is read
        fresh = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            fresh.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if not _rundir.is_private(self.dir):
                _rundir.make_dir(self.dir)
            if ident is not None:          # another socket in our 0700 directory: a stale one
                os.unlink(self.path)
            _rundir.bind_private(fresh, self.path)
            fresh.setblocking(False)
        except OSError as e:
            fresh.close()
            self._warn("rebind", f"{self.path} was removed and could not be bound again ({e}): "
                                 "notifications are lost until it can")
            return
        self._on_readable(limit=1 << 20)   # what the old one still has
        self.loop.remove(self.sock)
        self.sock.close()
        self.sock, self.ident = fresh, self._socket_ident()
        if self.stalled is None:           # else _retry watches it once systemd reads again
            self.loop.add_reader(self.sock, self._on_readable)
        log.warning("notify relay: %s was removed while the program ran: bound again", self.path)

    # -- the end ---------------------------------------------------------------------------------
    def close(self) -> None:
        """At the program's end: pass on what it sent last, then close and remove the socket."""
        if self.closed:
            return
        if self.stalled is not None:
            if not self._send(*self.stalled):
                _close_all(self.stalled[1])
                self._warn("end", "systemd's queue was full at the program's end: a notification was lost")
            self.stalled = None
        self._on_readable(limit=1 << 20)
        if self.stalled is not None:
            _close_all(self.stalled[1])
            self._warn("end", "systemd's queue was full at the program's end: a notification was lost")
        self.closed = True
        self.loop.remove(self.sock)
        self.sock.close()
        self.out.close()
        if self.path and self.ident is not None and self._socket_ident() == self.ident:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        if self.dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.dir)          # when the control socket is not there (it removes both)
