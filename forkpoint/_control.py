"""The control socket, served inside the shepherd: list, restore and discard checkpoints, and status.

The ``forkpoint ls/restore/discard/status PID`` commands (``forkpoint.operator`` is the client) talk
to it. Where the socket lives is ``_rundir``'s business.

**Who.** The 0700 directory keeps other users away from the socket; on top of that the server
checks every connection's SO_PEERCRED at accept time and answers only its own effective uid and
root. Anyone else (e.g. a process holding CAP_DAC_OVERRIDE under another uid, which passes the
directory permission) gets a ``denied`` error and the refusal is logged on logger ``forkpoint``.

**Protocol.** One request per connection: a JSON object on one line, at most ``MAX_REQUEST`` bytes
before the newline; one reply, a JSON object on one line, then the server closes the connection.
Requests::

    {"op": "ls"}                                -> {"ok": true, "checkpoints": [...], "history": [...], ...}
    {"op": "status"}                            -> {"ok": true, "pid", "live", "uptime", "recoveries",
                                                    "current", "checkpoints", "quarantined", ...}
    {"op": "restore", "n": N, "reason": "..."}  -> {"ok": true, "restored": N, "from_state", "live", "reason"}
    {"op": "discard", "n": N}                   -> {"ok": true, "discarded": N, "checkpoints": [ids]}
    {"op": "quarantine"}                        -> {"ok": true, "scope", "service", "quarantined": [...],
                                                    "failures": [...], "releases": [...], ...}
    {"op": "release", "key": KEY}               -> {"ok": true, "released": bool, "key": KEY}

Errors are ``{"ok": false, "kind": KIND, "error": MESSAGE}`` with KIND one of ``malformed``,
``too_large``, ``truncated``, ``timeout``, ``unknown``, ``invalid``, ``nosuch``, ``busy``,
``denied``, ``internal``. A bad request never changes the program.

**Never blocking the shepherd.** The shepherd is on every restore's critical path, so the server is
non-blocking throughout: at most ``ACCEPTS_PER_WAKEUP`` accepts per wake-up, at most
``MAX_CONNECTIONS`` open connections (more are answered ``busy`` and closed), a connection has
``CONNECTION_TIMEOUT`` seconds to send its request and again to read its reply, and replies are
written as the client reads them. A new connection's request is read at once, and when every slot
is taken the connection that has waited longest for its request is closed to make room, so idle
connections cannot starve the operator. Any unexpected error closes that one connection and is logged;
it never reaches the shepherd's loop.

The server knows the shepherd only through the ``Controlled`` protocol below.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import _rundir
from ._errors import OperatorError
from ._loop import EventLoop
from ._record import Record
from .arena import HistoryRecord

log = logging.getLogger("forkpoint")

MAX_REQUEST = 4096             # bytes of one request line, newline excluded
MAX_REASON = 200               # characters; the history keeps the first 64 bytes of "operator: ..."
MAX_CONNECTIONS = 16
ACCEPTS_PER_WAKEUP = 32
CONNECTION_TIMEOUT = 5.0       # seconds to send a request, and again to read the reply
BACKLOG = 64
# How often the shepherd makes sure its socket is still where clients look for it, and touches it.
CHECK_INTERVAL = 5.0
OPS = ("ls", "status", "restore", "discard", "quarantine", "release")


class Controlled(Protocol):
    """What the control server may see and do of the shepherd."""

    @property
    def live_pid(self) -> int | None: ...
    @property
    def current(self) -> int: ...
    @property
    def started(self) -> float: ...
    @property
    def recoveries(self) -> int: ...

    def checkpoint_ids(self) -> list[int]: ...
    def describe(self) -> list[dict[str, Any]]: ...
    def history(self) -> list[HistoryRecord]: ...
    def quarantined(self) -> list[str]: ...
    def nosuch(self, n: int) -> str: ...
    def restore_by_operator(self, n: int, reason: str) -> None: ...
    def discard_by_operator(self, n: int, why: str) -> None: ...
    def quarantine_report(self) -> dict[str, Any]: ...
    def release_by_operator(self, key: str, pid: int, uid: int) -> bool: ...


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), default=str).encode() + b"\n"


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "error": message}


class _Conn(Record):
    __slots__ = ("sock", "pid", "uid", "deadline", "buf", "out")

    def __init__(self, sock: socket.socket, pid: int, uid: int, deadline: float,
                 buf: bytearray | None = None, out: bytes | None = None) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.deadline = deadline
        self.buf = bytearray() if buf is None else buf
        self.out = out


class ControlServer:
    """The control socket, served from the shepherd's event loop; never blocks it."""

    def __init__(self, shepherd: Controlled, loop: EventLoop, shared: str = "") -> None:
        self.shepherd = shepherd
        self.loop = loop
        self.pid = os.getpid()
        self.uid = os.geteuid()
        self.conns: dict[int, _Conn] = {}
        self.max_connections = MAX_CONNECTIONS    # the shepherd lowers it under a tight ulimit -n
        self.sock: socket.socket | None = None
        self.dir = self.path = ""
        self._ident: tuple[int, int] | None = None
        self._sweeping = False
        self.closed = False
        self._last_refusal = float("-inf")
        self._refusals_unlogged = 0
        self.shared = shared     # the program's directory, made already for the notify relay (_notify)
        self._ops: dict[str, Callable[[dict[str, Any], int, int], dict[str, Any]]] = {
            "ls": self._op_ls, "status": self._op_status, "restore": self._op_restore,
            "discard": self._op_discard, "quarantine": self._op_quarantine, "release": self._op_release}
        bases = _rundir.base_dirs()
        if not bases:
            raise OSError(errno.ENOENT, "no usable directory for the operator socket")
        for base in bases:
            _rundir.cleanup_stale(base, keep=shared)
        errors = self._listen_in(bases)
        if errors is not None:
            raise OSError(errno.EACCES, errors)
        assert self.sock is not None
        loop.add_reader(self.sock, self._on_accept)
        log.debug("operator socket %s", self.path)
        loop.after(CHECK_INTERVAL, self._check_tick)

    def _check_tick(self) -> None:
        if self.closed:             # the program is ending
            return
        try:
            self.check()
        except Exception:  # noqa: BLE001 - the program runs on without operator control
            log.exception("operator socket: could not check %s", self.path)
        self.loop.after(CHECK_INTERVAL, self._check_tick)

    def check(self) -> None:
        """Keep the socket where clients look for it, for as long as the program runs.

        Its path can be removed under a running program: by a cleaner that ages the temporary
        directory (systemd-tmpfiles removes what /tmp has not used for 10 days by default; a
        daemon's socket is used only when an operator asks), by ``rm``, by a program in another
        PID namespace that took it for a dead program's (before 2026-11-29). Then every client
        found its path in /proc/net/unix and no file there. So the socket and its directory are
        touched (their times are what cleaners age), and made again if they are gone.
        """
        try:
            st = os.lstat(self.dir)
            if (st.st_dev, st.st_ino) == self._ident and stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.utime(self.path)
                os.utime(self.dir)
                return
        except OSError:
            pass
        old = self.path
        if self.sock is not None:
            self.loop.remove(self.sock)
            self.sock.close()
            self.sock = None
        self._ident = None
        try:                # what is left of it (the socket alone removed): ours, in our directory
            if os.path.isdir(self.dir) and not os.path.islink(self.dir) and self.dir != self.shared:
                _rundir.remove_dir(self.dir)
        except OSError:
            pass
        errors = self._listen_in(_rundir.base_dirs())
        if errors is not None:
            log.warning("operator socket %s was removed and could not be made again (%s): operator "
                        "control is off until the next try", old, errors or "no directory")
            return
        assert self.sock is not None
        self.loop.add_reader(self.sock, self._on_accept)
        log.warning("operator socket %s was removed while the program ran: listening again at %s",
                    old, self.path)

    def _listen_in(self, bases: list[str]) -> str | None:
        """Listen in the first of ``bases`` that allows it; None, or why none did."""
        errors = []
        for base in bases:
            try:
                self._listen(base)
                return None
            except OSError as e:
                errors.append(f"{base}: {e}")
        return "; ".join(errors)

    def _listen(self, base: str) -> None:
        path = os.path.join(base, f"{_rundir.DIR_PREFIX}{self.pid}")
        shared = path == self.shared and _rundir.is_private(path)
        if not shared:   # cleanup_stale removed any earlier one of ours with this PID; the user
            _rundir.make_dir(path)   # directory around it is ours alone (_rundir.base_dirs)
        try:
            st = os.lstat(path)
            sock_path = os.path.join(path, _rundir.SOCKET_NAME)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _rundir.bind_private(sock, sock_path)
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            try:
                if shared:
                    os.unlink(os.path.join(path, _rundir.SOCKET_NAME))
                else:
                    _rundir.remove_dir(path)
            except OSError:
                pass
            raise
        self.sock, self.dir, self.path, self._ident = sock, path, sock_path, (st.st_dev, st.st_ino)

    # -- connections ----------------------------------------------------------------------------
    def _on_accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if self.sock is None:
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of descriptors: the listener would stay readable and spin the loop; pause it.
                log.warning("operator socket: accept failed (%s); pausing for a second", e)
                self._pause_accepting()
                return
            try:
                self._admit(conn)
            except Exception:  # noqa: BLE001 - one bad connection must never stop the shepherd
                log.exception("operator socket: error on a new connection")
                conn.close()

    def _pause_accepting(self) -> None:
        if self.sock is None:
            return
        self.loop.remove(self.sock)
        paused = self.sock

        def resume() -> None:
            if self.sock is paused:     # (not one made since by check(), already watched)
                self.loop.add_reader(self.sock, self._on_accept)
        self.loop.after(1.0, resume)

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        pid, uid, _gid = _rundir.peercred(conn)
        if uid not in (self.uid, 0):
            self._log_refusal(pid, uid)
            self._send_and_close(conn, _error(
                "denied", f"permission denied: uid {uid} may not control forkpoint program {self.pid}"
                          f" (only uid {self.uid}, its owner, or root may)"))
            return
        if len(self.conns) >= self.max_connections:
            # Full: the connection that has waited longest for its request goes, so that idle
            # clients can never keep out one that asks at once (the CLI sends as it connects).
            idle = [c for c in self.conns.values() if c.out is None]
            if not idle:
                self._send_and_close(conn, _error(
                    "busy", f"too many operator connections ({self.max_connections} open); try again"))
                return
            oldest = min(idle, key=lambda c: c.deadline)
            self._send_and_close_conn(oldest, _error(
                "busy", "closed to make room for another operator connection: send the request "
                        "as soon as connected"))
        c = _Conn(conn, pid, uid, time.monotonic() + CONNECTION_TIMEOUT)
        self.conns[conn.fileno()] = c
        self.loop.add_reader(conn, functools.partial(self._on_conn, c))
        self._arm_sweep()
        self._on_conn(c)              # the request is usually there already: answer it now

    def _log_refusal(self, pid: int, uid: int) -> None:
        now = time.monotonic()
        if now - self._last_refusal < 1.0:
            self._refusals_unlogged += 1
            return
        more = f" ({self._refusals_unlogged} more refused before)" if self._refusals_unlogged else ""
        log.warning("operator socket: refused process %d of uid %d: only uid %d or root may control "
                    "this program%s", pid, uid, self.uid, more)
        self._last_refusal, self._refusals_unlogged = now, 0

    @staticmethod
    def _send_and_close(conn: socket.socket, msg: dict[str, Any]) -> None:
        try:
            conn.send(encode(msg), socket.MSG_NOSIGNAL)   # small: fits an empty socket buffer
        except OSError:
            pass
        conn.close()

    def _send_and_close_conn(self, c: _Conn, msg: dict[str, Any]) -> None:
        try:
            c.sock.send(encode(msg), socket.MSG_NOSIGNAL)
        except OSError:
            pass
        self._drop(c)

    def _drop(self, c: _Conn) -> None:
        if self.conns.pop(c.sock.fileno(), None) is None:
            return
        self.loop.remove(c.sock)
        c.sock.close()

    def _on_conn(self, c: _Conn) -> None:
        try:
            if c.out is None:
                self._read(c)
            else:
                self._write(c)
        except Exception:  # noqa: BLE001 - one bad connection must never stop the shepherd
            log.exception("operator socket: error while serving process %d", c.pid)
            self._drop(c)

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(MAX_REQUEST + 1 - len(c.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        if not data:
            if c.buf:
                self._reply(c, _error("truncated", "truncated request: the connection ended before "
                                                   "the newline that ends a request"))
            else:
                self._drop(c)
            return
        c.buf += data
        nl = c.buf.find(b"\n")
        if nl < 0:
            if len(c.buf) > MAX_REQUEST:
                self._reply(c, _error("too_large", f"request too large: at most {MAX_REQUEST} bytes "
                                                   "before the newline"))
            return
        self._reply(c, self.handle(bytes(c.buf[:nl]), c.pid, c.uid))

    def _reply(self, c: _Conn, msg: dict[str, Any]) -> None:
        if c.sock.fileno() not in self.conns:   # the request ended the program's connection set
            return
        c.out = encode(msg)
        c.deadline = time.monotonic() + CONNECTION_TIMEOUT
        self.loop.set_writer(c.sock, functools.partial(self._on_conn, c))
        self._write(c)

    def _write(self, c: _Conn) -> None:
        assert c.out is not None
        try:
            sent = c.sock.send(c.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        c.out = c.out[sent:]
        if not c.out:
            self._drop(c)

    def _arm_sweep(self) -> None:
        if not self._sweeping:
            self._sweeping = True
            self.loop.after(1.0, self._sweep)

    def _sweep(self) -> None:
        self._sweeping = False
        try:
            now = time.monotonic()
            for c in [c for c in self.conns.values() if c.deadline <= now]:
                if c.out is None:
                    try:
                        c.sock.send(encode(_error("timeout", "timed out waiting for a complete request")),
                                    socket.MSG_NOSIGNAL)
                    except OSError:
                        pass
                self._drop(c)
        except Exception:  # noqa: BLE001
            log.exception("operator socket: error while closing idle connections")
        if self.conns:
            self._arm_sweep()

    # -- requests -------------------------------------------------------------------------------
    def handle(self, line: bytes, pid: int = 0, uid: int = 0) -> dict[str, Any]:
        """Answer one request line (without its newline) from process ``pid`` of user ``uid``."""
        try:
            req = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _error("malformed", "malformed request: expected one JSON object on one line")
        if not isinstance(req, dict):
            return _error("malformed", "malformed request: expected a JSON object")
        op = req.get("op")
        if op not in OPS:
            shown = repr(op) if len(repr(op)) <= 40 else repr(op)[:40] + "..."
            return _error("unknown", f"unknown request {shown}; expected one of {', '.join(OPS)}")
        try:
            return self._ops[op](req, pid, uid)
        except OperatorError as e:
            return _error(e.kind, str(e))
        except Exception as e:  # noqa: BLE001 - report, keep serving
            log.exception("operator request %r failed", op)
            return _error("internal", f"internal error: {type(e).__name__}: {e}")

    def _checkpoint(self, req: dict[str, Any]) -> int:
        n = req.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise OperatorError("invalid", f"invalid checkpoint number {n!r}: expected an integer >= 1")
        if n not in self.shepherd.checkpoint_ids():
            raise OperatorError("nosuch", self.shepherd.nosuch(n))
        return n

    def _settled(self) -> None:
        if self.shepherd.live_pid is None:
            raise OperatorError("busy", "a restore is in progress; try again in a moment")

    def _op_ls(self, req: dict[str, Any], pid: int, uid: int) -> dict[str, Any]:
        sh = self.shepherd
        return {"ok": True, "pid": self.pid, "live": sh.live_pid, "current": sh.current,
                "checkpoints": sh.describe(), "history": [h._asdict() for h in sh.history()]}

    def _op_status(self, req: dict[str, Any], pid: int, uid: int) -> dict[str, Any]:
        sh = self.shepherd
        return {"ok": True, "pid": self.pid, "live": sh.live_pid,
                "uptime": time.time() - sh.started, "started": sh.started,
                "recoveries": sh.recoveries, "current": sh.current,
                "checkpoints": len(sh.checkpoint_ids()), "quarantined": sh.quarantined(),
                "socket": self.path}

    def _op_restore(self, req: dict[str, Any], pid: int, uid: int) -> dict[str, Any]:
        n = self._checkpoint(req)
        reason = req.get("reason") or ""
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise OperatorError("invalid", f"invalid reason: expected a string of at most {MAX_REASON} "
                                           "characters")
        reason = " ".join("".join(ch if ch.isprintable() else " " for ch in reason).split())
        reason = reason or f"uid {uid}"
        self._settled()
        sh = self.shepherd
        from_state = sh.current
        log.warning("operator (process %d, uid %d) restores checkpoint %d: %s", pid, uid, n, reason)
        sh.restore_by_operator(n, reason)
        return {"ok": True, "restored": n, "from_state": from_state,
                "live": sh.live_pid, "reason": f"operator: {reason}"[:64]}

    def _op_discard(self, req: dict[str, Any], pid: int, uid: int) -> dict[str, Any]:
        n = self._checkpoint(req)
        self._settled()
        log.warning("operator (process %d, uid %d) discards checkpoint %d", pid, uid, n)
        self.shepherd.discard_by_operator(n, f"discarded by the operator (uid {uid})")
        return {"ok": True, "discarded": n, "checkpoints": self.shepherd.checkpoint_ids()}

    def _op_quarantine(self, req: dict[str, Any], pid: int, uid: int) -> dict[str, Any]:
        return {"ok": True, **self.shepherd.quarantine_report()}

    def _op_release(self, req: dict[str, Any], pid: int, uid: int) -> dict[str, Any]:
        key = req.get("key")
        if not isinstance(key, str) or not key or len(key.encode()) > 256:
            raise OperatorError("invalid", "invalid key: expected a non-empty string of at most 256 bytes "
                                           "(the key, or the digest 'forkpoint quarantine list' shows)")
        log.warning("operator (process %d, uid %d) releases quarantined input %r", pid, uid, key)
        return {"ok": True, "released": self.shepherd.release_by_operator(key, pid, uid), "key": key}

    # -- the end --------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection and the socket, and remove the socket and its directory."""
        self.closed = True
        for c in list(self.conns.values()):
            self._drop(c)
        if self.sock is not None:
            self.loop.remove(self.sock)
            self.sock.close()
            self.sock = None
        if self._ident is not None:
            try:
                st = os.lstat(self.dir)
                if (st.st_dev, st.st_ino) == self._ident:
                    _rundir.remove_dir(self.dir)
            except OSError as e:
                log.debug("could not remove %s: %s", self.dir, e)
            self._ident = None
            base = os.path.dirname(self.dir)
            if os.path.basename(base).startswith(_rundir.user_dir_name(self.uid) + "-"):
                try:              # a randomly named user directory (the usual one was taken): ours alone
                    os.rmdir(base)
                except OSError:
                    pass
