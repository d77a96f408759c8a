"""What the WSGI and ASGI wrappers share: request keys, the answers forkpoint gives, the restart
checkpoint, and the rescue of the clients whose requests were in flight when the worker failed.

In restart mode a failure rolls the whole worker back to a checkpoint taken before it served. The
connection of a request that failed was accepted after that checkpoint, so the restored process
does not have it: only the failed process did, and it is dead. ``Rescue`` keeps it reachable: before
the application runs, the client socket is sent (SCM_RIGHTS) into a socketpair made before the
checkpoint, and taken out again when the request is done. The queue of a socketpair is a kernel
object shared by every process of the program, so the restored process finds there the socket of
every request that was in flight, answers it 500 (or closes it if the response had started), and
sends FIN with ``shutdown`` (a plain close would not, while another process holds the socket). Each
slot's state (in flight, response started, which request) is in persistent memory, which survives
the rollback. Cost: one ``sendmsg`` and one ``recvmsg`` per request, about 6 us here.
"""
from __future__ import annotations

import array
import hashlib
import inspect
import logging
import os
import socket
import time
from typing import Any

from . import snapshots
from ._errors import ConfigurationError
from .arena import processing_record
from .persist import persist
from .snapshots import FATAL_SIGNALS

log = logging.getLogger("forkpoint")

__all__ = ["FAILED", "MODES", "REFUSED", "Records", "Refresh", "Rescue", "check_common", "is_async",
           "key_from", "merge_policy", "raw_response", "restored_into"]

MODES = ("transaction", "restart")
MAX_KEY = 200           # bytes; longer keys keep a prefix and a digest (the arena keeps 256)

FAILED = ("500 Internal Server Error", 500, b"forkpoint: the request failed and was rolled back\n")
_ONE = [b"r"]
_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS

REFUSED = ("503 Service Unavailable", 503,
           b"forkpoint: this request is quarantined: it failed the server repeatedly\n")


def raw_response(status: tuple[str, int, bytes]) -> bytes:
    """A complete HTTP/1.1 response for a socket the server no longer knows (Connection: close)."""
    line, _, body = status
    return (f"HTTP/1.1 {line}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def key_from(method: str, path: str, query: str) -> str:
    """The default request key: method, path and query (``GET /img?id=7``), at most 200 bytes."""
    key = f"{method} {path}?{query}" if query else f"{method} {path}"
    if len(key) > MAX_KEY // 4 and len(key.encode()) > MAX_KEY:
        digest = hashlib.sha1(key.encode(errors="surrogateescape")).hexdigest()[:16]
        key = key.encode()[:MAX_KEY - 17].decode(errors="ignore") + "#" + digest
    return key


def check_common(app: Any, timeout: float | None, key: Any, quarantine_after: int,
                 refresh: float | None) -> None:
    """The arguments both ``protect`` functions take, refused with a specific message."""
    if not callable(app):
        raise TypeError(f"protect() needs the application callable, got {type(app).__name__}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    if key is not None and not callable(key):
        raise TypeError(f"key must be a function of the request (or None), got {type(key).__name__}")
    if isinstance(quarantine_after, bool) or not isinstance(quarantine_after, int) or quarantine_after < 1:
        raise ValueError(f"quarantine_after must be a positive int, got {quarantine_after!r}")
    if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, (int, float))
                                or not refresh > 0):
        raise ValueError(f"refresh must be a positive number of seconds or None, got {refresh!r}")


def is_async(app: Any) -> bool:
    """Whether ``app`` is a coroutine function, or an object whose ``__call__`` is one (ASGI)."""
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(type(app).__call__)


def merge_policy(quarantine_after: int) -> None:
    """Recover from the fault signals, and quarantine a key after ``quarantine_after`` failures."""
    try:
        snapshots.merge_policy(FATAL_SIGNALS, quarantine_after=quarantine_after)
    except ConfigurationError as e:    # (the shepherd's own check; the arguments were checked)
        raise ValueError(str(e)) from e


def restored_into(n: int) -> bool:
    """Whether this process is the one a restore to checkpoint ``n`` created."""
    rt = snapshots._rt
    return rt.recovered and rt.to_state == n


class Rescue:
    """Slots holding the client sockets of in-flight requests where a restored process finds them.

    Made before the restart checkpoint, in the worker process. ``hold(fd, seq)`` before the
    application runs, ``started(slot)`` when its response begins, ``release(slot)`` when it is
    done; ``rescue(own)`` in the restored process (see the module docstring). A keep-alive
    connection may keep its slot between requests (``idle``/``busy``), released when the
    connection is lost: one ``sendmsg`` per connection instead of one per request.
    """

    FREE, INFLIGHT, STARTED, IDLE = 0, 1, 2, 3

    def __init__(self, slots: int, name: str) -> None:
        self.pairs = []
        for _ in range(slots):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.setblocking(False)
            b.setblocking(False)
            self.pairs.append((a, b))
        # per slot: state word, request sequence number
        self.words = persist(f"forkpoint:{name}", slots * 16).cast("Q")
        for i in range(slots * 2):
            self.words[i] = 0
        self.free = list(range(slots - 1, -1, -1))
        self.fds = array.array("i", [0])

    def hold(self, fd: int, seq: int) -> int:
        """Put client socket ``fd`` where a restored process will find it; -1 if no slot is free."""
        if fd < 0 or not self.free:
            return -1
        slot = self.free.pop()
        self.fds[0] = fd
        try:
            self.pairs[slot][0].sendmsg(_ONE, [(_SOL_SOCKET, _SCM_RIGHTS, self.fds)])
        except OSError:
            self.free.append(slot)
            return -1
        self.words[2 * slot + 1] = seq
        self.words[2 * slot] = self.INFLIGHT
        return slot

    def started(self, slot: int) -> None:
        if slot >= 0:
            self.words[2 * slot] = self.STARTED

    def busy(self, slot: int, seq: int) -> None:
        """A new request on a held connection."""
        self.words[2 * slot + 1] = seq
        self.words[2 * slot] = self.INFLIGHT

    def idle(self, slot: int) -> None:
        """The request is done; the connection stays held (a restore closes it, with FIN)."""
        self.words[2 * slot] = self.IDLE

    def release(self, slot: int) -> None:
        """The request is done: take its socket out of the slot (first: a death in between then
        answers no one), and free the slot. One ``recv`` without room for descriptors: the kernel
        drops the socket it carried, with no descriptor installed and closed here."""
        if slot < 0:
            return
        try:
            self.pairs[slot][1].recv(1)
        except OSError:             # (nothing queued: cannot happen, but a slot must never leak)
            pass
        self.words[2 * slot] = self.FREE
        self.free.append(slot)

    def _drain(self, slot: int) -> list[int]:
        out: list[int] = []
        sock = self.pairs[slot][1]
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(sock, 1, 8)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                return out
            out.extend(fds)

    def rescue(self, own_seq: int = -1) -> tuple[int, int]:
        """In a restored process: answer the clients of the requests that were in flight.

        A request that had not started its response gets a 500, one that had is closed, and so is
        an idle connection (with FIN: its client sees it closed, as after any restart); the
        request numbered ``own_seq`` is skipped (the restored process is inside it and answers it
        itself). Returns (answered, closed). Every slot is free again afterwards.
        """
        answered = closed = 0
        for slot in range(len(self.pairs)):
            state, seq = int(self.words[2 * slot]), int(self.words[2 * slot + 1])
            fds = self._drain(slot)
            for i, fd in enumerate(fds):
                last = i == len(fds) - 1
                if last and state != self.FREE and seq != own_seq:
                    if state == self.INFLIGHT and _send_all(fd, raw_response(FAILED)):
                        answered += 1
                    else:
                        closed += 1
                    _shutdown(fd)
                _close(fd)
            self.words[2 * slot] = self.FREE
        self.free = list(range(len(self.pairs) - 1, -1, -1))
        return answered, closed

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()
        self.pairs = []


def _send_all(fd: int, data: bytes, timeout: float = 1.0) -> bool:
    s = socket.socket(fileno=fd)
    try:
        s.settimeout(timeout)          # the descriptor may be non-blocking (asyncio's)
        s.sendall(data)
        return True
    except OSError:
        return False
    finally:
        s.detach()


def _shutdown(fd: int) -> None:
    """FIN now: the socket may still be held by a process that is being torn down."""
    s = socket.socket(fileno=fd)
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.detach()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Refresh:
    """When the restart checkpoint is due to be replaced (``refresh=`` seconds after the last)."""

    def __init__(self, every: float | None) -> None:
        self.every = every
        self.taken = 0.0

    def due(self) -> bool:
        return self.every is not None and time.monotonic() - self.taken >= self.every

    def mark(self) -> None:
        self.taken = time.monotonic()


class Records:
    """Request keys as the arena stores them (``Arena.enter_step``): encoded and checksummed once
    per distinct key, not on every request; at most ``cap`` kept (then forgotten all at once)."""

    def __init__(self, cap: int = 1024) -> None:
        self.cap = cap
        self.known: dict[str, tuple[bytes, int]] = {}

    def __call__(self, key: str) -> tuple[bytes, int]:
        record = self.known.get(key)
        if record is None:
            if len(self.known) >= self.cap:
                self.known.clear()
            record = self.known[key] = processing_record(key)
        return record
