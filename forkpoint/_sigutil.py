"""Signal plumbing: a signalfd for the shepherd, and helpers to freeze and thaw a process's signals.

The shepherd reads signals from a signalfd instead of running handlers, because it needs each
signal's ``si_code``: a SIGINT typed at the terminal (``SI_KERNEL``) already reached the live
program, which shares the terminal's process group, and must not be forwarded a second time.
"""
from __future__ import annotations

import ctypes
import os
import signal
import struct

SI_KERNEL = 0x80
SFD_NONBLOCK = 0o4000
SFD_CLOEXEC = 0o2000000
_SIGINFO = struct.Struct("=IiiIIiIIiiIIQQqqQQ")  # the head of struct signalfd_siginfo (128 bytes)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.signalfd.restype = ctypes.c_int

ALL_SIGNALS = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def _sigset_bytes(sigs: set[int]) -> bytes:
    words = [0] * 16  # sigset_t is 1024 bits in glibc
    for s in sigs:
        words[(s - 1) // 64] |= 1 << ((s - 1) % 64)
    return struct.pack("16Q", *words)


def open_signalfd(sigs: set[int]) -> int:
    """A non-blocking signalfd for ``sigs`` (the caller must block them)."""
    buf = ctypes.create_string_buffer(_sigset_bytes(sigs))
    fd = _libc.signalfd(-1, buf, SFD_NONBLOCK | SFD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def read_signalfd(fd: int) -> list[tuple[int, int, int]]:
    """Pending signals as (signo, code, sender pid)."""
    out = []
    while True:
        try:
            data = os.read(fd, 128 * 16)
        except BlockingIOError:
            return out
        for off in range(0, len(data) - 127, 128):
            signo, _errno, code, pid = _SIGINFO.unpack_from(data, off)[:4]
            out.append((signo, code, pid))


def block_all() -> set[int]:
    """Block every blockable signal; return the previous mask."""
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, ALL_SIGNALS))


def restore_mask(mask: set[int]) -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def drain_pending() -> None:
    """Discard signals that arrived while this process was frozen; they were not meant for it."""
    pending = signal.sigpending()
    while pending:
        signal.sigtimedwait(pending, 0)
        pending = signal.sigpending()
