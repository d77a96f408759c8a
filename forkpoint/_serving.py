"""What the WSGI and ASGI wrappers share: request keys, the answers forkpoint gives, the restart
checkpoint, and the rescue of the clients whose requests were in flight when the worker failed.

In restart mode a failure rolls the whole worker back to a checkpoint taken before it served. The
connection of a request that failed was accepted after that checkpoint, so the restored process
does not have it: only the failed process did, and it is dead. ``Rescue`` keeps it reachable. Each
live process has a *holder* (``_fdholder``): a process that shares its descriptor table, so the
failed process's sockets stay open after its death. Per request the worker only writes down the
socket's descriptor, with the slot's state (in flight, response started, which request), in
persistent memory, which survives the rollback: 1.5-2 us per WSGI request in one process. The
restored process hands each slot in use to the dead process's holder, which answers it 500 (or
closes it if the response had started) and sends FIN with ``shutdown`` (a plain close would not,
while another process holds the socket).

Where no holder can be made, the client socket is parked instead: sent (SCM_RIGHTS) into a
socketpair made before the checkpoint before the application runs, and taken out again when the
request is done. The queue of a socketpair is a kernel object shared by every process of the
program, so the restored process finds there the socket of every request that was in flight and
answers it itself. Cost: one ``sendmsg`` and one ``recvmsg`` per request, about 6 us here.
"""
from __future__ import annotations

import array
import ctypes
import hashlib
import inspect
import logging
import os
import socket
import threading
import time
from typing import Any

from . import _fdholder, _logqueues, _nativepools, _procfs, snapshots
from ._errors import ConfigurationError, NoSuchCheckpoint
from ._fdholder import FD as _FD
from ._fdholder import INO as _INO
from ._fdholder import SEQ as _SEQ
from ._fdholder import TABLE as _TABLE
from ._fdholder import send_all, shutdown
from ._runtime import runtime
from .arena import processing_record
from .persist import persist
from .snapshots import FATAL_SIGNALS

log = logging.getLogger("forkpoint")

__all__ = ["FAILED", "MODES", "REFUSED", "Records", "Refresh", "Rescue", "check_common", "is_async",
           "WorkerCheckpoint", "key_from", "merge_policy", "raw_response", "restored_into"]

MODES = ("transaction", "restart")
MAX_KEY = 200           # bytes; longer keys keep a prefix and a digest (the arena keeps 256)

FAILED = ("500 Internal Server Error", 500, b"forkpoint: the request failed and was rolled back\n")
_ONE = [b"r"]
_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS

USE_HOLDER = True       # False: always park client sockets with SCM_RIGHTS (tests of that way)

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
    """Slots recording the client sockets of in-flight requests, where a restored process finds them.

    Made before the restart checkpoint, in the worker process. ``hold(fd, seq)`` before the
    application runs, ``started(slot)`` when its response begins, ``release(slot)`` when it is
    done; ``rescue(own)`` in the restored process (see the module docstring). A keep-alive
    connection may keep its slot between requests (see ``word``), released when the connection is
    lost.

    Each live process gets a holder of its descriptor table (``_fdholder``) at its first ``hold``,
    and a slot then only names the socket's descriptor. Where no holder can be made (other threads
    alive, no process slot left, an unsupported architecture) the socket itself is parked in the
    slot's socketpair with SCM_RIGHTS, as the module docstring describes; a slot's table word says
    which (0: parked).

    The last few holders are written down (table, pid, start time), so that a restored process can
    tell that a table's holder was killed from outside (the OOM killer, a stray ``kill``): the
    sockets of that table closed with it, and its slots are freed instead of handed to no one,
    where they stayed taken for the worker's whole life.
    """

    FREE, INFLIGHT, STARTED, IDLE = _fdholder.FREE, _fdholder.INFLIGHT, _fdholder.STARTED, _fdholder.IDLE
    _TABLES = 1                # word 0: the holders' bell; word 1: the last table id
    _KNOWN = 4                 # holders written down, a (table, pid, start) entry each, by table id
    _HOLDERS = 2               # the first entry's word
    # A table whose worker a restored process knows to be dead, before it hands anything over: it
    # waits for the POSIX locks of its checkpoint, which the dead worker's table holds until its
    # holder closes it (``_fdholder``, ``_locks``).
    _DEAD = _HOLDERS + 3 * _KNOWN
    _HEAD = _DEAD + 1                  # words before the slots
    _SLOT = _fdholder.SLOT     # words per slot: state, request number, descriptor, table, inode

    def __init__(self, slots: int, name: str) -> None:
        self.pairs = []
        for _ in range(slots):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.setblocking(False)
            b.setblocking(False)
            self.pairs.append((a, b))
        raw = persist(f"forkpoint:{name}", (self._HEAD + self._SLOT * slots) * 8)
        self.words = raw.cast("Q")
        for i in range(len(self.words)):
            self.words[i] = 0
        self.bell = ctypes.addressof(ctypes.c_uint64.from_buffer(raw))
        self.slots = slots
        self.free = list(range(slots - 1, -1, -1))
        self.fds = array.array("i", [0])
        self.rt = runtime()
        self.rt.lock_nudge = self._worker_dead   # a restored worker waits for the dead one's locks
        self.owner = 0                          # the live process whose table self.table names
        self.table = 0                          # its id while a holder shares it; 0: park sockets
        self.holder: _fdholder.Holder | None = None
        self.warned = False
        arena = self.rt.arena
        assert arena is not None                # (persist() above started forkpoint)
        self.lost = arena.holders_lost          # killed holders so far, as the shepherd counts them
        self.lost_seen = 0

    def word(self, slot: int) -> int:
        """Index in ``words`` of the slot's state word; the request's number is the next word.

        A keep-alive connection keeps its slot between requests: a new request writes its number
        there and then INFLIGHT in the state word, a finished one IDLE (a restore closes an idle
        connection, with FIN); the ASGI wrapper writes them itself."""
        return self._HEAD + self._SLOT * slot

    def slot_of(self, w: int) -> int:
        """The slot whose state word is ``words[w]``."""
        return (w - self._HEAD) // self._SLOT

    def hold(self, fd: int, seq: int, ino: int = 0) -> int:
        """Record client socket ``fd`` where a restored process will find it; -1 if no slot is free.

        ``ino``, the socket's inode, lets a holder check that the descriptor is still that socket
        (given where a slot may outlive its request: a keep-alive connection's)."""
        if fd < 0:
            return -1
        if self.owner != self.rt.owner_pid:
            self._attach()
        elif self.lost() != self.lost_seen:
            self._replace_if_killed()
        if not self.free and not self._reclaim():
            if not self.warned:
                self.warned = True
                log.warning("forkpoint: all %d rescue slots are taken; the client of a request that "
                            "fails now sees a closed connection instead of a 500", self.slots)
            return -1
        # Taken without a call (not pop()): a handler that raises as a call returns (a Ctrl-C) would
        # come between taking the slot and handing it to the request, and the slot would be lost.
        slot = self.free[-1]
        del self.free[-1]
        words = self.words
        w = self._HEAD + self._SLOT * slot
        if self.table:
            words[w + _SEQ] = seq
            words[w + _FD] = fd
            words[w + _TABLE] = self.table
            words[w + _INO] = ino
            words[w] = self.INFLIGHT
            return slot
        self.fds[0] = fd
        try:
            self.pairs[slot][0].sendmsg(_ONE, [(_SOL_SOCKET, _SCM_RIGHTS, self.fds)])
        except OSError:
            self.free.append(slot)
            return -1
        except BaseException:       # a handler raised as it returned: the socket may be parked
            try:
                self.pairs[slot][1].recv(1, socket.MSG_DONTWAIT)
            except OSError:
                pass
            self.free.append(slot)
            raise
        words[w + _SEQ] = seq
        words[w + _TABLE] = 0
        words[w] = self.INFLIGHT
        return slot

    def full(self) -> bool:
        """Whether no slot is free, after taking back those that holders freed."""
        return not self.free and not self._reclaim()

    def started(self, slot: int) -> None:
        if slot >= 0:
            self.words[self._HEAD + self._SLOT * slot] = self.STARTED

    def release(self, slot: int) -> None:
        """The request is done: free the slot. A parked socket is taken out first (a death in
        between then answers no one), with one ``recv`` without room for descriptors: the kernel
        drops the socket it carried, with no descriptor installed and closed here."""
        if slot < 0:
            return
        w = self._HEAD + self._SLOT * slot
        if self.words[w] == self.FREE:     # released already (a release cut short, done again)
            return
        if self.words[w + _TABLE]:
            self.words[w] = self.FREE
            self.free.append(slot)
            if self.owner != self.rt.owner_pid:     # recorded before a restore into this request:
                self._ring()                        # that table's holder waits for it
            return
        try:
            self.pairs[slot][1].recv(1)
        except OSError:             # (nothing queued: cannot happen, but a slot must never leak)
            pass
        self.words[w] = self.FREE
        self.free.append(slot)

    def in_flight(self, seq: int) -> bool:
        """Whether request ``seq`` holds a slot."""
        words = self.words
        return any(words[w] in _fdholder.IN_USE and words[w + _SEQ] == seq
                   for w in range(self._HEAD, self._HEAD + self._SLOT * self.slots, self._SLOT))

    def _ring(self) -> None:
        """Wake the holders: a slot was handed over or freed (the bell word changes first)."""
        self.words[0] += 1
        _fdholder.ring(self.bell)

    def _worker_dead(self) -> None:
        """In a restored process, before its program code runs: the newest table is the failed
        worker's (this process has none yet), and its holder may let go of it now."""
        self.words[self._DEAD] = self.words[self._TABLES]
        self._ring()

    def _attach(self) -> None:
        """This process is not the one whose table the holder shares (its first request, or a
        restored process's): make a holder of its own, or park sockets if none can be made."""
        if self.holder is not None:
            self.holder.forget()       # a restored process's copy of its predecessor's pidfd
            self.holder = None
        self.owner, self.table = self.rt.owner_pid, 0
        self.lost_seen = self.lost()
        self.holder = self._spawn(0)
        if self.holder is not None:
            self.table = self.holder.table

    def _replace_if_killed(self) -> None:
        """A holder was killed (the OOM killer, a stray kill): if it was this process's, make a new
        one for the same table, so that this process's failures are answered 500 again, not only
        those after its next restore."""
        self.lost_seen = self.lost()
        old = self.holder
        if old is None or not self._holder_gone(self.table):
            return
        new = self._spawn(self.table)
        self.holder = new
        old.forget()
        if new is None:
            self.table = 0                      # park sockets from now on
        log.warning("forkpoint: the holder of this worker's descriptors was killed; %s",
                    "a new one replaces it" if new is not None else "parking client sockets instead")

    def renew_holder(self) -> None:
        """The worker checkpoint was replaced in this process: a new holder for the same table, so
        that the old one does not keep the old checkpoint's pages (kept if none can be made)."""
        old = self.holder
        if old is None or self.owner != self.rt.owner_pid:
            return
        new = self._spawn(self.table)
        if new is not None:
            self.holder = new           # first: an interrupt from here on cannot lose it
            try:
                old.stop()
            except BaseException:       # cut short as it began (a handler that raised): once more
                old.stop()
                raise

    def _spawn(self, table: int) -> _fdholder.Holder | None:
        if not (USE_HOLDER and _fdholder.SUPPORTED):
            return None
        stopped: list[Any] = []
        try:
            if threading.active_count() > 1:        # (as for a checkpoint)
                _logqueues.stop(stopped)
            return self._spawn_alone(table)
        finally:
            if stopped:             # (no call otherwise: an interrupt there would lose the holder)
                _logqueues.start(stopped)

    def _spawn_alone(self, table: int) -> _fdholder.Holder | None:
        try:
            if _nativepools.other_threads():
                raise OSError("other threads are alive; a copy of this process could deadlock")
            if not table:
                self.words[self._TABLES] += 1
                table = int(self.words[self._TABLES])
            holder = _fdholder.Holder.spawn(self.words, self._HEAD, self.slots, table, self.bell,
                                            raw_response(FAILED), self.rt.chan)
        except OSError as e:
            log.info("forkpoint: no holder of this worker's descriptors (%s); parking each client "
                     "socket with SCM_RIGHTS instead", e)
            return None
        try:        # a holder made and then lost (a handler that raised here) would live on unused
            entry = self._entry(table)
            since = _procfs.alive_since(holder.pid) or 0
            # No call from here to the end: a handler that raised in between would leave the entry
            # cleared, and a renewal's old holder, which then serves on, unknown.
            words = self.words
            words[entry] = 0            # (a renewal: never the old holder's start with the new pid)
            words[entry + 1] = holder.pid
            words[entry + 2] = since
            words[entry] = table
        except BaseException:
            holder.stop()
            raise
        return holder

    def _entry(self, table: int) -> int:
        """The first word of the entry where table ``table``'s holder is written down."""
        return self._HOLDERS + 3 * (table % self._KNOWN)

    def _holder_gone(self, table: int) -> bool:
        """Whether the holder of ``table`` is known to be dead (killed from outside: one that ends
        by itself frees its slots first). False when it is not written down any more."""
        e = self._entry(table)
        words = self.words
        if not table or words[e] != table:
            return False
        since = _procfs.alive_since(int(words[e + 1]))
        return since is None or (since != 0 and words[e + 2] != 0 and since != words[e + 2])

    def _reclaim(self) -> bool:
        """Slots a holder freed since (they were handed to it): free here again; and slots handed
        to a holder that was killed before it could free them."""
        words = self.words
        for s in range(self.slots):
            w = self._HEAD + self._SLOT * s
            if words[w] >= _fdholder.HAND_ANSWER and self._holder_gone(int(words[w + _TABLE])):
                words[w] = self.FREE
        self.free = [s for s in range(self.slots - 1, -1, -1)
                     if words[self._HEAD + self._SLOT * s] == self.FREE]
        return bool(self.free)

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
        itself). A recorded descriptor is handed to the holder of the dead process's table, which
        does this; a parked socket is answered here. Returns (answered, closed). Every slot this
        process may use is free again afterwards.
        """
        answered = closed = 0
        words = self.words
        handed = False
        gone: dict[int, bool] = {}
        for slot in range(self.slots):
            w = self._HEAD + self._SLOT * slot
            state, seq, table = int(words[w]), int(words[w + _SEQ]), int(words[w + _TABLE])
            if table:
                if state in _fdholder.IN_USE:
                    if table not in gone:
                        gone[table] = self._holder_gone(table)
                    if gone[table]:                 # its socket closed with the table
                        words[w] = self.FREE
                        closed += seq != own_seq
                        continue
                    if seq == own_seq:
                        words[w] = _fdholder.HAND_LEAVE
                    elif state == self.INFLIGHT:
                        words[w] = _fdholder.HAND_ANSWER
                        answered += 1
                    else:
                        words[w] = _fdholder.HAND_CLOSE
                        closed += 1
                    handed = True
                continue
            fds = self._drain(slot)
            for i, fd in enumerate(fds):
                last = i == len(fds) - 1
                if last and state != self.FREE and seq != own_seq:
                    if state == self.INFLIGHT and send_all(fd, raw_response(FAILED)):
                        answered += 1
                    else:
                        closed += 1
                    shutdown(fd)
                _close(fd)
            words[w] = self.FREE
        if handed:
            self._ring()
        self._reclaim()
        self.owner = 0          # this process's first request makes a holder of its own table
        return answered, closed

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()
        self.pairs = []


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


class WorkerCheckpoint:
    """The worker checkpoint a wrapper serves from (WSGI restart mode, ASGI), taken and replaced.

    ``tsetjmp()`` blocks signals around its fork, so a signal that came meanwhile is handled as it
    gives them back, after the fork: a handler that raises there (Ctrl-C's) leaves the checkpoint
    taken, current and pinned. A wrapper that only assigned what ``tsetjmp()`` returned then
    served on from the checkpoint before and kept both for the worker's life; an interrupt in
    the bookkeeping after it kept the old one (the interrupt sweep: 16-18 of 534 points of an ASGI
    refresh, 21 of 142 of a WSGI one). ``take_checkpoint`` makes the new one the
    wrapper's either way, and drops the one it replaces, before anything else can raise.
    """

    n: int
    arena: Any
    refresh: Refresh
    rescue: Rescue | None

    def take_checkpoint(self, drop: tuple[int, ...] = ()) -> int:
        """``tsetjmp(pin=True)``, made the worker's checkpoint; returns its number. ``drop``: the
        descriptors of connections the checkpoint's processes let go of (``tsetjmp``)."""
        old = self.n
        before = snapshots.current_state()
        try:
            n = snapshots.tsetjmp(pin=True, _drop=drop)
        except BaseException:
            n = snapshots.current_state()
            if n != before:             # taken: raised as the signals came back
                self._adopt(n, old)
            raise
        try:
            self._adopt(n, old)
        except BaseException:           # cut short as it began (a handler that raised): once more
            self._adopt(n, old)
            raise
        return n

    def _adopt(self, n: int, old: int) -> None:
        """Checkpoint ``n`` is the worker's; ``old``, which it replaces, goes (in the process that
        serves on: a restored one finds it gone already). Each part may be done already."""
        self.n = n
        self.arena = runtime().arena
        self.refresh.mark()
        if old and old != n and not restored_into(n):
            if self.rescue is not None:
                self.rescue.renew_holder()
            try:
                snapshots.discard(old)
            except NoSuchCheckpoint:    # discarded already: this is the second run
                pass
            except Exception as e:  # noqa: BLE001 - the new checkpoint is taken; the old one costs memory only
                log.warning("forkpoint: could not discard the previous worker checkpoint %d: %s", old, e)


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
