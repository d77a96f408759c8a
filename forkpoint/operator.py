"""Operator control: list, restore and discard a running program's checkpoints, and its status.

The shepherd (the program's PID) serves a Unix stream socket; the ``forkpoint ls/restore/discard/
status PID`` commands, and ``request()`` below, talk to it.

**Where.** ``<base>/forkpoint-<PID>/control.sock``: one private directory per program, mode 0700,
owned by the program's user, with the socket itself mode 0600. ``<base>`` is ``$XDG_RUNTIME_DIR``
when it is set, absolute, a directory owned by the user and writable, else the temporary directory
(``$TMPDIR``, ``$TEMP``, ``$TMP``, ``/tmp``, ``/var/tmp``, ``/usr/tmp``, the first usable one).
A per-PID directory (rather than one per user) lets the client find the socket from the PID alone
and lets the shepherd remove everything it created with one ``rmdir``. The directory is removed
when the program ends (``Shepherd.shutdown``), whatever ended it, as long as the shepherd itself
runs to the end; a directory left by a SIGKILLed shepherd is removed by the next forkpoint program
of the same user that starts in the same base directory (its PID is gone, or the process now
holding that PID started after the directory was last modified).

**Who.** The 0700 directory keeps other users away from the socket; on top of that the shepherd
checks every connection's SO_PEERCRED at accept time and answers only its own effective uid and
root. Anyone else (e.g. a process holding CAP_DAC_OVERRIDE under another uid, which passes the
directory permission) gets a ``denied`` error and the refusal is logged on logger ``forkpoint``.
The client checks SO_PEERCRED the other way round: the socket must be served by the PID asked for.

**Protocol.** One request per connection: a JSON object on one line, at most ``MAX_REQUEST`` bytes
before the newline; one reply, a JSON object on one line, then the shepherd closes the connection.
Requests::

    {"op": "ls"}                                -> {"ok": true, "checkpoints": [...], "history": [...], ...}
    {"op": "status"}                            -> {"ok": true, "pid", "live", "uptime", "recoveries",
                                                    "current", "checkpoints", "quarantined", ...}
    {"op": "restore", "n": N, "reason": "..."}  -> {"ok": true, "restored": N, "from_state", "live", "reason"}
    {"op": "discard", "n": N}                   -> {"ok": true, "discarded": N, "checkpoints": [ids]}

Errors are ``{"ok": false, "kind": KIND, "error": MESSAGE}`` with KIND one of ``malformed``,
``too_large``, ``truncated``, ``timeout``, ``unknown``, ``invalid``, ``nosuch``, ``busy``,
``denied``, ``internal``. A bad request never changes the program.

**Never blocking the shepherd.** The shepherd is on every restore's critical path, so the server is
non-blocking throughout: at most ``ACCEPTS_PER_WAKEUP`` accepts per wake-up, at most
``MAX_CONNECTIONS`` open connections (more are answered ``busy`` and closed), a connection has
``CONNECTION_TIMEOUT`` seconds to send its request and again to read its reply, and replies are
written as the client reads them. Any unexpected error closes that one connection and is logged;
it never reaches the shepherd's loop.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import stat
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import ForkpointError

if TYPE_CHECKING:
    import argparse

    from ._shepherd import Shepherd

log = logging.getLogger("forkpoint")

DIR_PREFIX = "forkpoint-"
SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096             # bytes of one request line, newline excluded
MAX_REPLY = 16 << 20           # what the client accepts
MAX_REASON = 200               # characters; the history keeps the first 64 bytes of "operator: ..."
MAX_CONNECTIONS = 16
ACCEPTS_PER_WAKEUP = 32
CONNECTION_TIMEOUT = 5.0       # seconds to send a request, and again to read the reply
BACKLOG = 64
OPS = ("ls", "status", "restore", "discard")
_UCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


class OperatorError(ForkpointError):
    """An operator request failed; ``kind`` names the reason (see the module's protocol notes)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---- where the socket lives ---------------------------------------------------------------------
def _usable_dir(path: str, owner: int | None = None) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or (owner is not None and st.st_uid != owner):
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _temp_candidates(environ: Mapping[str, str]) -> list[str]:
    out = [environ.get(k, "") for k in ("TMPDIR", "TEMP", "TMP")] + ["/tmp", "/var/tmp", "/usr/tmp"]
    return [p for p in out if p and os.path.isabs(p)]


def base_dirs(environ: Mapping[str, str] | None = None) -> list[str]:
    """The usable base directories for this user, in order of preference (XDG_RUNTIME_DIR, temp)."""
    environ = os.environ if environ is None else environ
    out = []
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and _usable_dir(xdg, owner=os.geteuid()):
        out.append(xdg)
    for path in _temp_candidates(environ):
        if _usable_dir(path):
            out.append(path)
            break
    return out


def _read_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), or None if it is gone or a zombie."""
    fields = _read_stat(pid)
    if fields is None or fields[0] in ("Z", "X", "x"):
        return None
    try:
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return 0.0   # alive, start unknown: treat as older than anything


def _remove_dir(path: str) -> None:
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def cleanup_stale(base: str) -> list[str]:
    """Remove this user's socket directories in ``base`` whose program is gone; returns them.

    A directory is stale when no process has its PID, or the process that has it now started
    after the directory was last modified (the PID was reused). The caller's own PID counts as
    stale too: the caller is about to create its directory.
    """
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    me, uid = os.getpid(), os.geteuid()
    for name in names:
        if not name.startswith(DIR_PREFIX) or not name[len(DIR_PREFIX):].isdigit():
            continue
        pid = int(name[len(DIR_PREFIX):])
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        if pid != me:
            started = _process_start(pid)
            if started is not None and started <= st.st_mtime + 2.0:   # btime has 1 s resolution
                continue
            if started is not None and _answers(os.path.join(path, SOCKET_NAME), pid):
                continue      # the clock stepped, but the program is there: never remove a live one
        try:
            _remove_dir(path)
            removed.append(path)
            log.debug("removed stale operator directory %s", path)
        except OSError as e:
            log.debug("could not remove stale operator directory %s: %s", path, e)
    return removed


def _answers(path: str, pid: int) -> bool:
    """Whether a socket at ``path`` accepts a connection from process ``pid`` (not a clock reading)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
        return _peercred(probe)[0] == pid
    except OSError:
        return False
    finally:
        probe.close()


def _peercred(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def _encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), default=str).encode() + b"\n"


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "error": message}


# ---- the server, inside the shepherd --------------------------------------------------------------
@dataclass
class _Conn:
    sock: socket.socket
    pid: int
    uid: int
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    out: bytes | None = None


class OperatorServer:
    """The control socket, served from the shepherd's selector loop; never blocks it."""

    def __init__(self, shepherd: Shepherd) -> None:
        self.shepherd = shepherd
        self.pid = os.getpid()
        self.uid = os.geteuid()
        self.conns: dict[int, _Conn] = {}
        self.sock: socket.socket | None = None
        self.dir = self.path = ""
        self._ident: tuple[int, int] | None = None
        self._sweeping = False
        self._last_refusal = float("-inf")
        self._refusals_unlogged = 0
        bases = base_dirs()
        if not bases:
            raise OSError(errno.ENOENT, "no usable directory for the operator socket")
        for base in bases:
            cleanup_stale(base)
        errors = []
        for base in bases:
            try:
                self._listen(base)
                break
            except OSError as e:
                errors.append(f"{base}: {e}")
        else:
            raise OSError(errno.EACCES, "; ".join(errors))
        assert self.sock is not None
        shepherd.sel.register(self.sock, selectors.EVENT_READ, self._on_accept)
        log.debug("operator socket %s", self.path)

    def _listen(self, base: str) -> None:
        path = os.path.join(base, f"{DIR_PREFIX}{self.pid}")
        os.mkdir(path, 0o700)   # cleanup_stale removed any earlier one of ours with this PID
        try:
            os.chmod(path, 0o700)   # whatever the umask
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != self.uid or stat.S_IMODE(st.st_mode) != 0o700:
                raise OSError(errno.EPERM, f"{path} is not a private directory")
            sock_path = os.path.join(path, SOCKET_NAME)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                old = os.umask(0o177)
                try:
                    sock.bind(sock_path)
                finally:
                    os.umask(old)
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            try:
                _remove_dir(path)
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
        try:
            self.shepherd.sel.unregister(self.sock)
        except (KeyError, ValueError):
            return

        def resume() -> None:
            if self.sock is not None:
                self.shepherd.sel.register(self.sock, selectors.EVENT_READ, self._on_accept)
        self.shepherd.after(1.0, resume)

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        pid, uid, _gid = _peercred(conn)
        if uid not in (self.uid, 0):
            self._log_refusal(pid, uid)
            self._send_and_close(conn, _error(
                "denied", f"permission denied: uid {uid} may not control forkpoint program {self.pid}"
                          f" (only uid {self.uid}, its owner, or root may)"))
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            self._send_and_close(conn, _error(
                "busy", f"too many operator connections ({MAX_CONNECTIONS} open); try again"))
            return
        c = _Conn(conn, pid, uid, time.monotonic() + CONNECTION_TIMEOUT)
        self.conns[conn.fileno()] = c
        self.shepherd.sel.register(conn, selectors.EVENT_READ, lambda c=c: self._on_conn(c))
        self._arm_sweep()

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
            conn.send(_encode(msg), socket.MSG_NOSIGNAL)   # small: fits an empty socket buffer
        except OSError:
            pass
        conn.close()

    def _drop(self, c: _Conn) -> None:
        if self.conns.pop(c.sock.fileno(), None) is None:
            return
        try:
            self.shepherd.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
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
        c.out = _encode(msg)
        c.deadline = time.monotonic() + CONNECTION_TIMEOUT
        self.shepherd.sel.modify(c.sock, selectors.EVENT_WRITE, lambda c=c: self._on_conn(c))
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
            self.shepherd.after(1.0, self._sweep)

    def _sweep(self) -> None:
        self._sweeping = False
        try:
            now = time.monotonic()
            for c in [c for c in self.conns.values() if c.deadline <= now]:
                if c.out is None:
                    try:
                        c.sock.send(_encode(_error("timeout", "timed out waiting for a complete request")),
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
            return getattr(self, f"_op_{op}")(req, pid, uid)
        except OperatorError as e:
            return _error(e.kind, str(e))
        except Exception as e:  # noqa: BLE001 - report, keep serving
            log.exception("operator request %r failed", op)
            return _error("internal", f"internal error: {type(e).__name__}: {e}")

    def _checkpoint(self, req: dict[str, Any]) -> int:
        n = req.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise OperatorError("invalid", f"invalid checkpoint number {n!r}: expected an integer >= 1")
        if n not in self.shepherd.ckpts:
            raise OperatorError("nosuch", self.shepherd._nosuch(n))
        return n

    def _settled(self) -> None:
        if self.shepherd.live is None:
            raise OperatorError("busy", "a restore is in progress; try again in a moment")

    def _op_ls(self, req: dict[str, Any], pid: int, uid: int) -> dict[str, Any]:
        sh = self.shepherd
        return {"ok": True, "pid": self.pid, "live": sh.live.pid if sh.live else None,
                "current": sh.current, "checkpoints": sh.describe(),
                "history": [h._asdict() for h in sh.arena.history()]}

    def _op_status(self, req: dict[str, Any], pid: int, uid: int) -> dict[str, Any]:
        from .recovery import _load

        sh = self.shepherd
        return {"ok": True, "pid": self.pid, "live": sh.live.pid if sh.live else None,
                "uptime": time.time() - sh.started, "started": sh.started,
                "recoveries": sh.recoveries, "current": sh.current, "checkpoints": len(sh.ckpts),
                "quarantined": _load(sh.arena), "socket": self.path}

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
                "live": sh.live.pid if sh.live else None, "reason": f"operator: {reason}"[:64]}

    def _op_discard(self, req: dict[str, Any], pid: int, uid: int) -> dict[str, Any]:
        n = self._checkpoint(req)
        self._settled()
        log.warning("operator (process %d, uid %d) discards checkpoint %d", pid, uid, n)
        self.shepherd._discard(n, f"discarded by the operator (uid {uid})")
        return {"ok": True, "discarded": n, "checkpoints": sorted(self.shepherd.ckpts)}

    # -- the end --------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection and the socket, and remove the socket and its directory."""
        for c in list(self.conns.values()):
            self._drop(c)
        if self.sock is not None:
            try:
                self.shepherd.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        if self._ident is not None:
            try:
                st = os.lstat(self.dir)
                if (st.st_dev, st.st_ino) == self._ident:
                    _remove_dir(self.dir)
            except OSError as e:
                log.debug("could not remove %s: %s", self.dir, e)
            self._ident = None


# ---- the client -----------------------------------------------------------------------------------
def _environ_of(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return {}
    out = {}
    for item in data.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def _owner_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def socket_candidates(pid: int) -> list[str]:
    """Where the control socket of program ``pid`` may be, most likely first.

    The listening sockets the kernel knows of (/proc/net/unix, readable by anyone) come first;
    then the paths the program's own environment (when readable) and ours would give.
    """
    suffix = f"/{DIR_PREFIX}{pid}/{SOCKET_NAME}"
    out: list[str] = []
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.rstrip("\n").split(None, 7)
                if len(parts) == 8 and parts[7].endswith(suffix):
                    out.append(parts[7])
    except OSError:
        pass
    owner = _owner_of(pid)
    bases: list[str] = []
    for env in (_environ_of(pid), os.environ):
        if env.get("XDG_RUNTIME_DIR"):
            bases.append(env["XDG_RUNTIME_DIR"])
        bases.extend(_temp_candidates(env))
    if owner is not None:
        bases.append(f"/run/user/{owner}")
    out.extend(os.path.join(b, suffix.lstrip("/")) for b in bases if os.path.isabs(b))
    return list(dict.fromkeys(out))


def _not_a_program(pid: int, stale: bool) -> OperatorError:
    comm = _comm(pid)
    fields = _read_stat(pid)
    ppid = int(fields[1]) if fields else 0
    if comm.startswith(("fp-snap-", "fp-spare-")) or (ppid and _comm(ppid) == "fp-shepherd"):
        return OperatorError("notforkpoint", f"process {pid} ({comm}) is one of the processes of forkpoint "
                                             f"program {ppid}; use that PID")
    if comm == "fp-shepherd":
        return OperatorError("notforkpoint", f"process {pid} is a forkpoint program but its control "
                                             "socket was not found (see the program's stderr)")
    why = " (only a stale socket was found)" if stale else ""
    return OperatorError("notforkpoint", f"process {pid} ({comm}) is not a forkpoint program, or has not "
                                         f"taken a checkpoint yet: no control socket found{why}")


def connect(pid: int, timeout: float = 10.0) -> socket.socket:
    """A connection to the control socket of forkpoint program ``pid`` (its shepherd's PID)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise OperatorError("invalid", f"invalid PID {pid!r}")
    if not os.path.exists(f"/proc/{pid}"):
        raise OperatorError("nosuchprocess", f"no process with PID {pid}")
    denied = None
    stale = False
    deadline = time.monotonic() + timeout
    for path in socket_candidates(pid):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:   # the listen backlog is full: the program is busy
                    if time.monotonic() > deadline:
                        sock.close()
                        raise OperatorError("busy", f"program {pid} is not accepting connections "
                                                    f"(its control socket's backlog stayed full for "
                                                    f"{timeout:g}s)") from None
                    time.sleep(0.01)
        except (FileNotFoundError, NotADirectoryError):
            sock.close()
            continue
        except PermissionError:
            sock.close()
            denied = denied or path
            continue
        except ConnectionRefusedError:
            sock.close()
            stale = True
            continue
        except OSError:
            sock.close()
            continue
        server_pid, server_uid, _ = _peercred(sock)
        if server_pid == pid:
            return sock
        sock.close()
        log.warning("%s is served by process %d (uid %d), not by %d: ignored", path, server_pid,
                    server_uid, pid)
    if denied:
        raise OperatorError("denied", f"permission denied: cannot reach {denied}: process {pid} belongs to "
                                      f"uid {_owner_of(pid)}; only that user or root may control it")
    raise _not_a_program(pid, stale)


def request(pid: int, op: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
    """Send one request to program ``pid`` and return its reply; raise OperatorError on failure."""
    with connect(pid, timeout) as sock:
        try:
            sock.sendall(_encode({"op": op, **fields}))
        except (BrokenPipeError, ConnectionResetError):
            pass   # a refusal is sent without reading the request: read it below
        data = bytearray()
        while b"\n" not in data:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise OperatorError("timeout", f"program {pid} did not answer within {timeout:g}s") from None
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REPLY:
                raise OperatorError("too_large", f"program {pid} sent a reply larger than {MAX_REPLY} bytes")
    if not data:
        raise OperatorError("closed", f"program {pid} closed the connection without answering "
                                      "(it may have ended)")
    try:
        reply = json.loads(bytes(data).split(b"\n", 1)[0])
    except ValueError:
        raise OperatorError("malformed", f"program {pid} sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise OperatorError("malformed", f"program {pid} sent a malformed reply")
    if not reply.get("ok"):
        raise OperatorError(str(reply.get("kind", "error")), str(reply.get("error", "request refused")))
    return reply


# ---- the command line -----------------------------------------------------------------------------
def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The arguments of subcommand ``name`` (ls, restore, discard or status)."""
    parser.add_argument("pid", type=_positive, metavar="PID",
                        help="the program's PID (the one its parent and the shell know)")
    if name in ("restore", "discard"):
        parser.add_argument("n", type=_positive, metavar="N", help="the checkpoint id (see 'forkpoint ls')")
    if name == "restore":
        parser.add_argument("--reason", default="", help="recorded in the program's jump history")
    if name in ("ls", "status"):
        parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for an answer")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _print_ls(reply: dict[str, Any], out: Any) -> None:
    cks = reply["checkpoints"]
    print(f"forkpoint program {reply['pid']}: live process {reply['live'] or '-'}, "
          f"current checkpoint {reply['current']}, {len(cks)} checkpoint(s)", file=out)
    if cks:
        print(f"  {'ID':>4} {'PID':>8} {'AGE':>8} {'PINNED':>6} {'SPARES':>6} {'USS':>11} {'PSS':>11}",
              file=out)
        for c in cks:
            print(f"  {c['id']:>4} {c['pid']:>8} {_age(c['age']):>8} {'yes' if c['pinned'] else 'no':>6} "
                  f"{len(c.get('spares', [])):>6} {_size(c['uss']):>11} {_size(c['pss']):>11}", file=out)
    hist = reply["history"]
    print(f"history: {len(hist)} entr{'y' if len(hist) == 1 else 'ies'}", file=out)
    for h in hist:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"]))
        key = f"  input {h['key']!r}" if h.get("key") is not None else ""
        print(f"  #{h['seq']:<4} {when}  {h['from_state']} -> {h['to_state']}  signal {h['signal']}  "
              f"{h['reason']}{key}", file=out)


def _print_status(reply: dict[str, Any], out: Any) -> None:
    q = reply["quarantined"]
    print(f"forkpoint program {reply['pid']}", file=out)
    print(f"  live process: {reply['live'] or '- (restoring)'}", file=out)
    print(f"  uptime:       {_age(reply['uptime'])}", file=out)
    print(f"  recoveries:   {reply['recoveries']}", file=out)
    print(f"  checkpoints:  {reply['checkpoints']} (current {reply['current']})", file=out)
    print(f"  quarantined:  {', '.join(map(repr, q)) if q else 'none'}", file=out)


def run(args: argparse.Namespace) -> int:
    """Carry out one operator subcommand; returns the exit status (0 success, 1 failure)."""
    cmd, pid, out = args.command, args.pid, sys.stdout
    try:
        if cmd == "ls":
            reply = request(pid, "ls", args.timeout)
            if args.json:
                json.dump({"checkpoints": reply["checkpoints"], "history": reply["history"]}, out)
                out.write("\n")
            else:
                _print_ls(reply, out)
        elif cmd == "status":
            reply = request(pid, "status", args.timeout)
            if args.json:
                json.dump({k: v for k, v in reply.items() if k != "ok"}, out)
                out.write("\n")
            else:
                _print_status(reply, out)
        elif cmd == "restore":
            reply = request(pid, "restore", args.timeout, n=args.n, reason=args.reason)
            print(f"program {pid} restored to checkpoint {reply['restored']} (from state "
                  f"{reply['from_state']}; live process {reply['live'] or 'starting'}): {reply['reason']}",
                  file=out)
        elif cmd == "discard":
            reply = request(pid, "discard", args.timeout, n=args.n)
            left = ", ".join(map(str, reply["checkpoints"])) or "none"
            print(f"program {pid}: checkpoint {reply['discarded']} discarded (left: {left})", file=out)
        else:
            print(f"forkpoint: unknown operator command {cmd!r}", file=sys.stderr)
            return 2
    except OperatorError as e:
        print(f"forkpoint {cmd}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"forkpoint {cmd}: program {pid}: {e}", file=sys.stderr)
        return 1
    return 0

