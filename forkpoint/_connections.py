"""The program's connections to servers, which a rollback must not leave half-used.

A checkpoint's copies share every socket with the live process (fork shares open files), so a
restore finds the program's database or Redis connection open. But the rolled-back code may have
used it: sent ``BEGIN`` and an ``UPDATE``, or a command whose reply it never read. The server still
holds that transaction or that reply, while the restored memory believes the connection idle: its
next transaction ran inside the rolled-back one and committed it (a test's transfer of 666 was
committed by the next, innocent request), and its next read returned the reply meant for the
rolled-back command. Without forkpoint the crash would have closed the connection, and the server
would have dropped both.

So a checkpoint notes, for each connection the program opened (a TCP or Unix stream socket connected
to a server; not one it accepted, which the server's own code answers for, nor a socket pair), how
far its stream had gone: the bytes the program had written (acknowledged plus still queued) and
read (received minus still unread), from ``TCP_INFO`` and two ioctls. A restore compares, and shuts
down (``shutdown(2)``, which reaches the socket in every process holding it) each connection whose
stream moved: the server sees the end of the connection and drops what the rolled-back code began,
and the client library meets a closed connection at its next use and reconnects, as it does when a
server restarts. A Unix stream socket keeps no such counts, so one that was open at the checkpoint
is shut down at every restore; except two kinds that hold no transaction and whose clients never
reconnect: a ``multiprocessing`` manager's (``_helper``), shut down only when the rolled-back code
left a request or a reply in its queues, and journald's log stream, never, as standard input, output
and error (a service's output is often a stream socket to journald) are never touched.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import sys
import termios
from typing import Any, NamedTuple

log = logging.getLogger("forkpoint")

_libc = ctypes.CDLL(None, use_errno=True)
_SO_ACCEPTCONN = 30                          # asm-generic/socket.h (x86_64 and aarch64)
_TCP_INFO_SIZE = 136                         # up to tcpi_bytes_received (Linux 4.2)
_BYTES_ACKED = 120                           # tcpi_bytes_acked, then tcpi_bytes_received (linux/tcp.h)
_FIN_RECEIVED = (8, 9, 11)                   # TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING
_FIN_SENT = (4, 5, 6, 7, 9, 11)              # FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE, LAST_ACK, CLOSING
_STREAMS = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
# Unix peers that hold no transaction a rollback must end, and whose clients never reconnect: a
# multiprocessing manager or Listener (its proxies raise BrokenPipeError for ever after a shutdown)
# and journald's stream socket (systemd.journal.stream(): every later log record would be lost).
_JOURNAL_STREAM = "/run/systemd/journal/stdout"


def _helper(peer: str) -> bool:
    """A multiprocessing manager's or Listener's address (``multiprocessing.util.get_temp_dir()``)."""
    return os.path.basename(os.path.dirname(peer)).startswith("pymp-")


class Connection(NamedTuple):
    """A connection open at a checkpoint: its kind (``_TCP``, ``_UNIX``, ``_HELPER``) and, for TCP,
    where its stream stood then (None: not countable)."""

    fd: int
    peer: str
    kind: int
    position: tuple[int, int] | None = None


class _Socket(NamedTuple):
    """What a socket is, which does not change once it is connected or listening."""

    family: int
    listening_port: int      # a listening TCP socket's port, else 0
    own_port: int            # a connected TCP socket's local port, else 0
    peer: str                # a connection to a server: its address; "" for anything else


_known: dict[tuple[int, int], _Socket] = {}
_TCP, _UNIX, _HELPER = 0, 1, 2
_clients: tuple[tuple[int, str, int], ...] = ()     # (descriptor, peer, kind) of those in _known
_unsettled = False                                  # a socket was not connected yet
_info = ctypes.create_string_buffer(_TCP_INFO_SIZE)
_info_len = ctypes.c_uint32()
_name = ctypes.create_string_buffer(128)     # sockaddr_storage
_name_len = ctypes.c_uint32()
_int = ctypes.c_int()
_int_len = ctypes.c_uint32()
_IOCTL_INT = bytes(4)


def at_checkpoint(sockets: dict[int, int], stdio: set[int]) -> tuple[Connection, ...]:
    """The program's connections to servers among ``sockets`` (descriptor -> inode), with where
    their streams stand. ``stdio``: the inodes of descriptors 0-2, never counted.

    Every page a checkpoint writes is a copy-on-write fault (the previous checkpoint's keeper shares
    it): while the program's sockets are those of the checkpoint before, nothing is rebuilt, and
    only the connections' positions are read.
    """
    global _clients, _unsettled
    count = 0
    for fd, ino in sockets.items():
        if ino not in stdio:
            if (fd, ino) not in _known:
                _unsettled = True
                break
            count += 1
    if _unsettled or count != len(_known):
        _clients, _unsettled = _survey(sockets, stdio)
    if not _clients:
        return ()
    out = []
    for fd, peer, kind in _clients:
        position = None
        if kind == _TCP:
            try:
                position = _position(fd)
            except OSError:      # not countable here: shut down at a restore, as a Unix one
                pass
        out.append(Connection(fd, peer, kind, position))
    return tuple(out)


def _survey(sockets: dict[int, int], stdio: set[int]) -> tuple[tuple[tuple[int, str, int], ...], bool]:
    """Classify the sockets not seen before (``_known`` becomes these sockets): the connections
    to servers as (descriptor, peer, kind), and whether a socket is not connected yet (asked again
    at the next checkpoint)."""
    seen: dict[tuple[int, int], _Socket] = {}
    listening = {w.listening_port for w in _known.values() if w.listening_port}
    unsettled = False
    for fd, ino in sockets.items():
        if ino in stdio:
            continue
        what = _known.get((fd, ino))
        if what is None:
            what = _classify(fd, listening)
            if what is None:
                unsettled = True
                continue
            if what.listening_port:
                listening.add(what.listening_port)
        seen[(fd, ino)] = what
    _known.clear()
    _known.update(seen)
    clients = []
    for (fd, _), what in seen.items():
        if not what.peer or (what.own_port and what.own_port in listening):   # accepted by us
            continue
        kind = _TCP if what.family != socket.AF_UNIX else _HELPER if _helper(what.peer) else _UNIX
        clients.append((fd, what.peer, kind))
    return tuple(clients), unsettled


def reset_used(connections: tuple[Connection, ...]) -> list[str]:
    """Shut down each of ``connections`` whose stream moved since the checkpoint (or cannot be
    told); the peers of those shut down. The pools that would lend a cut connection to the next
    request are told (``_tell_pools``)."""
    reset = []
    cut = set()
    for conn in connections:
        try:
            if conn.kind == _HELPER:
                if _queued(conn.fd) == (0, 0):      # nothing left half-sent or unread: kept
                    continue
            elif conn.position is not None:
                # Kept if unmoved, or closed from this side already (an earlier restore of the
                # same checkpoint cut it: not cut nor reported again, but its pool told again)
                moved = _position(conn.fd) != conn.position
                if _info.raw[0] in _FIN_SENT:
                    cut.add(conn.fd)
                    continue
                if not moved:
                    continue
        except OSError:           # no longer a connection the kernel can describe
            pass
        if _libc.shutdown(conn.fd, socket.SHUT_RDWR) != 0:
            e = ctypes.get_errno()
            if e != errno.ENOTCONN:           # ENOTCONN: closed already (an earlier restore, the peer)
                log.debug("could not shut down the connection to %s: %s", conn.peer, os.strerror(e))
            continue
        cut.add(conn.fd)
        reset.append(f"{conn.peer} (a Unix socket: its use cannot be counted)" if conn.kind == _UNIX
                     else conn.peer)
    if cut:
        _tell_pools(cut)
    return reset


def cut(fd: int) -> bool:
    """Whether connection ``fd`` was shut down from this side (by a restore): POLLHUP, which a
    connection the server closed (its FIN: POLLIN|POLLRDHUP) or one still open does not give."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLNVAL) for _, ev in p.poll(0))


def _tell_pools(fds: set[int]) -> None:
    """Make the connection pools the program already had drop a connection this restore cut,
    instead of lending it to the next request, which failed with it (Django with persistent
    connections and no health checks, SQLAlchemy without ``pool_pre_ping``: one 500 after each
    restore, where without forkpoint the new worker connected afresh and answered 200).

    Django: a connection whose socket was cut is marked ``errors_occurred``, so that the next
    request's start (``close_old_connections``) checks it and connects again. SQLAlchemy: a
    ``checkout`` listener on every pool raises ``DisconnectionError`` for a cut connection, and
    the pool connects again (its documented pessimistic check, at the cost of one ``poll``).
    """
    db = sys.modules.get("django.db")
    conf = sys.modules.get("django.conf")
    if db is not None and conf is not None:
        try:
            # Only the connections this thread opened (``_connections``: Django's own
            # ``all(initialized_only=True)``, which Django before 4.1 lacks); unconfigured
            # settings: none (asking would import the settings module here)
            handler = db.connections
            opened = [getattr(handler._connections, alias) for alias in handler
                      if hasattr(handler._connections, alias)] if conf.settings.configured else []
        except Exception as e:   # noqa: BLE001 (the program's code: never in the restore's way)
            log.debug("could not tell Django's connections: %s", e)
            opened = []
        for wrapper in opened:      # each on its own: a SQLite or closed one has no fileno()
            try:
                fileno = getattr(getattr(wrapper, "connection", None), "fileno", None)
                if fileno is not None and fileno() in fds:      # (SQLite's has none)
                    wrapper.errors_occurred = True
            except Exception as e:   # noqa: BLE001
                log.debug("could not tell Django's connection %s: %s",
                          getattr(wrapper, "alias", "?"), e)
    global _sqlalchemy
    if not _sqlalchemy and "sqlalchemy.pool" in sys.modules:
        try:
            from sqlalchemy import event, exc, pool

            def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
                try:
                    fd = dbapi_connection.fileno()
                except Exception:    # noqa: BLE001 (closed, or a driver without one)
                    return
                if cut(fd):
                    raise exc.DisconnectionError("forkpoint: a restore shut this connection down")

            event.listen(pool.Pool, "checkout", checkout)
            _sqlalchemy = True
        except Exception as e:   # noqa: BLE001
            log.debug("could not tell SQLAlchemy's pools: %s", e)


_sqlalchemy = False


def _position(fd: int) -> tuple[int, int]:
    """(bytes the program wrote, bytes it read) on TCP connection ``fd``.

    Written: acknowledged by the peer plus still in the send queue; read: received minus still
    unread. Neither moves by itself: data arriving, or the peer acknowledging, leaves both alone.
    """
    _info_len.value = _TCP_INFO_SIZE
    _check(_libc.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, _info, ctypes.byref(_info_len)))
    if _info_len.value < _TCP_INFO_SIZE:
        raise OSError(errno.ENOSYS, "tcp_info has no byte counts (Linux before 4.2)")
    acked, received = struct.unpack_from("QQ", _info, _BYTES_ACKED)
    if _info.raw[0] in _FIN_RECEIVED:     # tcpi_state: the peer's FIN counts one in bytes_received
        received -= 1
    unread, unsent = _queued(fd)
    return acked + unsent, received - unread


def _queued(fd: int) -> tuple[int, int]:
    """(bytes unread here, bytes the peer has not read or acknowledged yet) on connection ``fd``."""
    unread = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, _IOCTL_INT), "little", signed=True)
    unsent = int.from_bytes(fcntl.ioctl(fd, termios.TIOCOUTQ, _IOCTL_INT), "little", signed=True)
    return unread, unsent


def _getint(fd: int, option: int) -> int:
    _int_len.value = 4
    _check(_libc.getsockopt(fd, socket.SOL_SOCKET, option, ctypes.byref(_int), ctypes.byref(_int_len)))
    return _int.value


def _check(rc: int) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _address(fd: int, call: object) -> tuple[int, str, int] | None:
    """(family, text, port) of the socket's own or peer address; None if it has none."""
    _name_len.value = len(_name)
    if call(fd, _name, ctypes.byref(_name_len)) != 0:       # type: ignore[operator]
        return None
    raw = _name.raw[:_name_len.value]
    if len(raw) < 2:
        return None
    family = int.from_bytes(raw[:2], "little")
    if family == socket.AF_INET and len(raw) >= 8:
        port = int.from_bytes(raw[2:4], "big")
        return family, f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}:{port}", port
    if family == socket.AF_INET6 and len(raw) >= 24:
        port = int.from_bytes(raw[2:4], "big")
        return family, f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{port}", port
    if family == socket.AF_UNIX:
        path = raw[2:]
        if not path or path == b"\0" * len(path):
            return family, "", 0                              # unnamed
        if path[0] == 0:
            return family, "@" + path[1:].decode(errors="replace"), 0      # abstract
        return family, path.split(b"\0", 1)[0].decode(errors="replace"), 0
    return None


def _classify(fd: int, listening: set[int]) -> _Socket | None:
    """What socket ``fd`` is; None while it is neither connected nor listening.

    A server accepts a connection for each request (a gunicorn worker, one per checkpointed
    request): one whose own port is a port the process listens on is told by its name alone.
    """
    own = _address(fd, _libc.getsockname)
    if own is None:
        return _Socket(0, 0, 0, "")
    family = own[0]
    if family != socket.AF_UNIX and own[2] in listening:
        return _Socket(family, 0, own[2], "")
    try:
        kind = _getint(fd, socket.SO_TYPE)
        if family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) or kind not in _STREAMS:
            return _Socket(family, 0, 0, "")
        if _getint(fd, _SO_ACCEPTCONN):
            return _Socket(family, own[2], 0, "")
    except OSError:
        return _Socket(0, 0, 0, "")
    peer = _address(fd, _libc.getpeername)
    if peer is None:
        return None if ctypes.get_errno() == errno.ENOTCONN else _Socket(family, 0, 0, "")
    if family == socket.AF_UNIX:
        # A connection to a server: its peer has a name and it has none (an accepted one has the
        # server's name; a socket pair has none on either side).
        # journald's stream socket is a log, as standard output on it is: never shut down.
        return _Socket(family, 0, 0, peer[1] if peer[1] and not own[1] and peer[1] != _JOURNAL_STREAM
                       else "")
    if kind != socket.SOCK_STREAM:
        return _Socket(family, 0, 0, "")
    if not _ephemeral(own[2]):
        # connect() takes a port of the ephemeral range; any other local port is a server's,
        # whose listening socket may be closed already (a one-client server, a drain).
        return _Socket(family, 0, own[2], "")
    return _Socket(family, 0, own[2], peer[1])


_port_range: tuple[int, int] | None = None


def _ephemeral(port: int) -> bool:
    """Whether ``port`` is in the range the kernel picks a connecting socket's port from (all of
    them where the range cannot be read)."""
    global _port_range
    if _port_range is None:
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
                low, high = (int(x) for x in f.read().split())
            _port_range = (low, high)
        except (OSError, ValueError):
            _port_range = (0, 65535)
    return _port_range[0] <= port <= _port_range[1]
