"""POSIX record locks (``fcntl.lockf``, ``F_SETLK``, SQLite's locks), which a checkpoint must carry.

A POSIX record lock belongs to the process that took it (to its descriptor table): ``fork()`` does
not copy it into the child, ``exec`` drops it with every close-on-exec descriptor of its file, and
the owner's death releases it. A checkpoint is a fork, the shepherd is an exec, and a restore kills
the process that held the program's locks, so without this module a program lost every such lock at
its first ``tsetjmp()`` and again at each restore: a daemon's lock on its PID file let a second
instance start, and SQLite's connection went on believing in locks nobody held.

So the locks a process holds are read from the kernel (``held``: one read of ``/proc/locks`` when
there are none, which is the usual case) when forkpoint starts and at every checkpoint, and the
process that goes on as the program takes them again (``take``) before it runs program code: the
live process at the start, once the original process has let them go; a restored process, once the
process it replaces is gone. ``flock()`` and open-file-description locks (``F_OFD_SETLK``) belong to
the open file, which every copy shares, and need nothing.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from . import _procfs

log = logging.getLogger("forkpoint")

# SQLite's lock bytes in a database file (rollback-journal mode): a write lock on RESERVED_BYTE is a
# write transaction in progress (sqlite3.c: PENDING_BYTE 0x40000000, RESERVED_BYTE one after it).
_SQLITE_RESERVED = 0x40000001
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)      # Linux 3.15
_FLOCK = "hhqqi4x"      # struct flock on x86_64 and aarch64: type, whence, start, len, pid
_WHOLE = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)     # a write lock of the whole file
_NONE = struct.pack("h", fcntl.F_UNLCK)                             # no lock conflicts with it
_WAIT = 10.0            # seconds a process waits for a lock before it goes on without it
_SAY_AFTER = 1.0        # seconds of waiting after which it says what it waits for


class Lock(NamedTuple):
    """A POSIX lock, with a descriptor of this process that can take it again."""

    fd: int
    write: bool
    start: int
    length: int         # 0: to the end of the file, however far it grows

    @property
    def file(self) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{self.fd}")
        except OSError:
            return f"descriptor {self.fd}"


def held(pid: int, files: list[int]) -> tuple[Lock, ...]:
    """The POSIX locks that this process (real pid ``pid``) holds on ``files``, one descriptor of
    each regular file it has open (``_procfs.open_files``).

    Asked of each file with ``F_OFD_GETLK``: an open-file-description lock is another owner than
    this process, so the kernel reports this process's own POSIX locks as conflicts, one system
    call a file without locks. (``/proc/locks`` lists them all at once, but reading it takes a
    machine-wide write lock that waits for an RCU grace period: 6 ms median, up to 26 ms, when
    read after 50 ms without, measured here; 8 us in a tight loop.)
    """
    found: list[Lock] = []
    ask = fcntl.fcntl
    for fd in files:
        try:            # the usual case, no lock on the file: one call, nothing decoded
            if ask(fd, _OFD_GETLK, _WHOLE)[:2] == _NONE:
                continue
        except OSError:
            continue
        _ranges(fd, pid, found)
    return tuple(found)


def _ranges(fd: int, pid: int, found: list[Lock]) -> None:
    """``held`` for one file with locks: every lock of ``pid`` on it, range by range."""
    todo = [(0, 0)]                 # ranges (start, length; 0: to the end of the file) to ask
    while todo:
        start, length = todo.pop()
        try:
            got = fcntl.fcntl(fd, _OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET,
                                                           start, length, 0))
        except OSError:
            return
        kind, _, lstart, llen, lpid = struct.unpack(_FLOCK, got)
        if kind == fcntl.F_UNLCK:
            continue
        if lpid == pid:
            found.append(Lock(fd, kind == fcntl.F_WRLCK, lstart, llen))
        # The kernel reports one conflicting lock of the range, not the lowest: ask on both
        # sides of it.
        if lstart > start:
            todo.append((start, lstart - start))
        if llen:
            end = start + length if length else 0
            if not end or lstart + llen < end:
                todo.append((lstart + llen, end - lstart - llen if end else 0))


def sqlite_writers(locks: tuple[Lock, ...]) -> list[Lock]:
    """The locks of SQLite databases (rollback-journal mode) with a write transaction open, as
    ``locks`` show it. A checkpoint taken there cannot be rolled back to safely: the pages the
    transaction writes to the file after it (a full page cache spills them, its journal keeps
    their old contents) stay in the file, while the restored connection goes on from its own
    earlier idea of the journal, and its commit corrupts the database. (WAL mode keeps the
    database file untouched until a commit, and was measured safe.)"""
    return [lk for lk in locks if lk.write and lk.start <= _SQLITE_RESERVED
            and (lk.length == 0 or lk.start + lk.length > _SQLITE_RESERVED)]


def release_all(files: list[int]) -> None:
    """Let go of every POSIX lock this process holds on ``files`` (one descriptor of each regular
    file it has open): the shepherd, which holds the original process's descriptors, leaves the
    program's locks to the live process."""
    for fd in files:
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0, os.SEEK_SET)
        except OSError:
            pass


def take(locks: tuple[Lock, ...], shepherd: int, raise_holders: bool,
         nudge: Callable[[], None] | None = None) -> None:
    """Take ``locks`` for this process, waiting while the process that had them lets go of them.

    That is the original process (until its exec) or a process being torn down after a restore:
    the kernel releases a dead process's locks only after it has freed its memory, which the
    shepherd leaves to idle priority. So a holder that is the shepherd's child is raised to normal
    priority where that is allowed (``raise_holders``), and its exit is waited for on a pidfd. A
    lock that another program took meanwhile (the program had let go of it after the checkpoint)
    is waited for up to ``_WAIT`` seconds, then given up with an error in the log: waiting without
    end would leave the program deaf to every signal (they are blocked until it runs again).
    ``nudge`` is called once if a lock is not free at once: it wakes what may hold it for a dead
    process (a server worker's descriptor holder, ``_fdholder``).
    """
    for lock in locks:
        how = (fcntl.LOCK_EX if lock.write else fcntl.LOCK_SH) | fcntl.LOCK_NB
        start = time.monotonic()
        said = False
        watched = 0             # the holder whose exit is waited for
        poller = None
        try:
            while True:
                try:
                    fcntl.lockf(lock.fd, how, lock.length, lock.start, os.SEEK_SET)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        log.error("could not take back the lock of file %s (descriptor %d): %s",
                                  lock.file, lock.fd, e)
                        break
                waited = time.monotonic() - start
                if waited > _WAIT:
                    log.error("gave up the lock of file %s (descriptor %d) after %gs: process %s "
                              "holds it", lock.file, lock.fd, _WAIT, _holder(lock) or "unknown")
                    break
                if nudge is not None:
                    nudge()
                    nudge = None
                holder = _holder(lock)
                if not said and waited > _SAY_AFTER:
                    said = True
                    log.warning("waiting for the lock of file %s (descriptor %d), held by process %s",
                                lock.file, lock.fd, holder or "unknown")
                if holder and holder != watched:
                    watched = holder
                    if poller is not None:      # another process holds it now
                        poller.close()
                    poller = _exit_of(holder, shepherd, raise_holders)
                if poller is not None:
                    if not poller.poll(2):
                        continue        # still there (its locks may still go another way)
                    poller.close()      # gone: its locks go a moment later
                    poller = None
                time.sleep(0.0005)
        finally:
            if poller is not None:
                poller.close()


class _Exit:
    """A wait for one process's exit on its pidfd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.p = select.poll()
        self.p.register(fd, select.POLLIN)

    def poll(self, ms: int) -> bool:
        return bool(self.p.poll(ms))

    def close(self) -> None:
        os.close(self.fd)


def _exit_of(pid: int, shepherd: int, raise_it: bool) -> _Exit | None:
    """A wait for the exit of ``pid`` if it is one of the program's processes (a child of the
    shepherd: a process being torn down), raised to normal priority first where allowed."""
    if _procfs.parent_of(pid) != shepherd:
        return None
    if raise_it:
        try:
            os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
    try:
        return _Exit(os.pidfd_open(pid))
    except (OSError, AttributeError):
        return None


def _holder(lock: Lock) -> int:
    """The pid that holds a lock conflicting with ``lock`` (F_GETLK), or 0."""
    kind = fcntl.F_WRLCK if lock.write else fcntl.F_RDLCK
    try:
        got = fcntl.fcntl(lock.fd, fcntl.F_GETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, lock.start,
                                                              lock.length, 0))
    except OSError:
        return 0
    return int(struct.unpack(_FLOCK, got)[4])
