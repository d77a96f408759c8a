"""The host quarantine store: one table file per service in the user's private runtime directory.

Where: ``$XDG_RUNTIME_DIR/forkpoint-quarantine/`` when ``$XDG_RUNTIME_DIR`` is set, absolute, ours
and closed to others; otherwise ``forkpoint-quarantine-<uid>`` in the temporary directory. The
directory is created 0700 and used only if it is a real directory (not a symlink), ours, and closed
to group and others; each store is ``<service id>.qt``, 0600, opened with ``O_NOFOLLOW`` and used
only if it is a regular file of ours closed to others. So another user can neither read a store
nor write one (a directory another user planted is refused, and the program falls back to its own
quarantine with one warning).

A store is a ``_qtable.Table``. The live process reads it with ``pread`` (one 8-byte read of the
generation word per lookup: 1 us here, where a ``stat`` of the path is 4 us and a memory map could
turn a truncated file into SIGBUS). Writers (shepherds recording failures, ``forkpoint.quarantine``
and ``release``, the CLI) take ``flock`` without blocking, retrying for at most a few milliseconds:
a writer that is stopped while holding the lock costs the others their shared record (they fall
back to their own quarantine), never a wait. A store of the wrong size, with a bad header, or left
mid-write by a writer that died is rebuilt from the entries that pass their checks, with a warning.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager

from . import _rundir
from ._qkeys import service_id, service_key
from ._qtable import FileBacking, Reader, Table, TableCorrupted

log = logging.getLogger("forkpoint")

Q_CAP = 1024
F_CAP = 256
R_CAP = 64
SIZE = Table.size_of(Q_CAP, F_CAP, R_CAP, True)
LOCK_WAIT = 0.005              # seconds a writer tries for the lock before falling back
DIR_NAME = "forkpoint-quarantine"
SUFFIX = ".qt"
_REOPEN_EVERY = 1.0            # a reader checks that its file is still the store's this often


class StoreUnavailable(OSError):
    """The host store cannot be used now (busy, unsafe, or the filesystem refused)."""


def _private(path: str, create: bool) -> str:
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    elif not os.path.lexists(path):
        raise StoreUnavailable(errno.ENOENT, f"{path} does not exist")
    if not _rundir.is_private(path):
        raise StoreUnavailable(errno.EPERM, f"{path} is not a private directory of uid {os.geteuid()} "
                                            "(a directory, ours, mode 0700): refused")
    return path


def store_dir(create: bool = True) -> str:
    """The user's private directory for host stores (see the module docstring)."""
    xdg = _rundir.xdg_dir(os.environ)
    if xdg is not None:
        return _private(os.path.join(xdg, DIR_NAME), create)
    for base in _rundir.temp_candidates(os.environ):
        if os.path.isdir(base):    # the first temporary directory only: every program must agree
            return _private(os.path.join(base, f"{DIR_NAME}-{os.geteuid()}"), create)
    raise StoreUnavailable(errno.ENOENT, "no temporary directory for the host quarantine store")


def _open(path: str, write: bool) -> int:
    flags = (os.O_RDWR | os.O_CREAT if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise StoreUnavailable(errno.EPERM, f"{path} is not a private file of uid {os.geteuid()}: "
                                                "refused")
    except BaseException:
        os.close(fd)
        raise
    return fd


class HostStore:
    """The host store of one service (see the module docstring)."""

    def __init__(self, service: str, directory: str | None = None) -> None:
        self.service = service
        self.dir = directory
        self.path = ""
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None

    def _locate(self) -> str:
        if self.dir is None:
            self.dir = store_dir()
        self.path = os.path.join(self.dir, service_id(self.service) + SUFFIX)
        return self.path

    def _fd(self) -> int:
        """A descriptor of the store's file as it is now (reopened if it was replaced or removed)."""
        path = self.path or self._locate()
        if self.fd is not None:
            try:
                st = os.stat(path, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == self.ident:
                    return self.fd
            except FileNotFoundError:
                pass
            self.close()
        if not os.path.isdir(self.dir or ""):
            self.dir = None
            path = self._locate()
        fd = _open(path, write=True)
        st = os.fstat(fd)
        self.fd, self.ident = fd, (st.st_dev, st.st_ino)
        return fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = self.ident = None

    def table(self) -> Table:
        return Table(FileBacking(self._fd()), Q_CAP, F_CAP, R_CAP, True)

    @contextmanager
    def transaction(self, wait: float = LOCK_WAIT) -> Iterator[Table]:
        """The table, locked for writing, checked (and rebuilt if damaged); committed on success."""
        try:
            fd = self._fd()
        except OSError as e:
            raise StoreUnavailable(e.errno or errno.EIO, f"host quarantine store: {e}") from e
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(errno.EBUSY, f"{self.path} stayed locked for {wait * 1e3:g} ms "
                                                        "(a writer is stuck)") from None
                time.sleep(0.0002)
        try:
            size = os.fstat(fd).st_size
            table = Table(FileBacking(fd), Q_CAP, F_CAP, R_CAP, True)
            if size != SIZE:
                if size:
                    log.warning("host quarantine store %s has %d bytes, not %d: rebuilt", self.path, size,
                                SIZE)
                os.ftruncate(fd, SIZE)
                try:
                    os.posix_fallocate(fd, 0, SIZE)    # a full filesystem fails here, not mid-write
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                table.format(self.service, service_key(self.service))
            problems = table.begin(self.service, service_key(self.service))
            if problems and size == SIZE:
                log.warning("host quarantine store %s was damaged (%s): rebuilt", self.path,
                            "; ".join(problems))
            yield table
            table.commit()
        except (OSError, TableCorrupted) as e:
            if isinstance(e, StoreUnavailable):
                raise
            raise StoreUnavailable(getattr(e, "errno", None) or errno.EIO,
                                   f"host quarantine store {self.path}: {e}") from e
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def ensure(self) -> None:
        """Create the store if it does not exist (and check it), so readers find it at once."""
        with self.transaction(wait=0.05):
            pass


class HostReader:
    """The live process's view of a host store: never waits, never raises."""

    def __init__(self, store: HostStore) -> None:
        self.store = store
        self.reader: Reader | None = None
        self.fd: int | None = None
        self.next_check = 0.0

    def _reopen(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd, self.reader = None, None
        path = self.store.path or self.store._locate()
        fd = _open(path, write=False)
        self.fd = fd
        self.reader = Reader(Table(FileBacking(fd), Q_CAP, F_CAP, R_CAP, True))

    def current(self) -> dict[bytes, float]:
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + _REOPEN_EVERY
            try:
                if self.fd is None:
                    self._reopen()
                else:
                    st = os.stat(self.store.path, follow_symlinks=False)
                    mine = os.fstat(self.fd)
                    if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
                        self._reopen()
            except OSError:
                pass          # keep what we have; the program's own quarantine still applies
        if self.reader is None:
            return {}
        return self.reader.current()
