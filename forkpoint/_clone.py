"""A fork that makes an exact copy, optionally as a sibling of the caller.

``os.fork()`` runs Python's at-fork hooks in the child (``random`` reseeds itself, ``threading``
rebuilds its state, ...). A snapshot must be the program exactly as it was, like the paper's core
image, so forkpoint calls the clone(2) system call directly: the copy continues with the same random
sequence and the same interpreter state. This is safe because forkpoint refuses to checkpoint while
other threads are alive, so no lock can be held by a thread that does not exist in the copy.

With ``CLONE_PARENT`` the new process becomes a child of the caller's parent. Every snapshot and
spare is thereby a direct child of the shepherd, not of the live program: the program's own
``os.wait()`` never sees them, the shepherd reaps them all, and ``PR_SET_PDEATHSIG`` ties each of them
to the shepherd's life.
"""
from __future__ import annotations

import ctypes
import os
import platform
import signal

CLONE_PARENT = 0x00008000
CLONE_PIDFD = 0x00001000

# clone(2) takes (flags, stack, ...) first on these architectures; with the rest zero the
# differences in argument order after those two do not matter.
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())

# PyDLL keeps the GIL held across the call: the child must come back holding it, like the parent.
_libc = ctypes.PyDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SUPPORTED = _SYS_CLONE is not None


def clone(sibling: bool) -> int:
    """Fork this process without Python's at-fork hooks; return the child's pid, or 0 in the child.

    ``sibling=True`` makes the child a child of our parent (CLONE_PARENT).
    """
    return _clone(int(signal.SIGCHLD) | (CLONE_PARENT if sibling else 0), 0)


def clone_pidfd(sibling: bool) -> tuple[int, int]:
    """``clone`` that also returns a pidfd of the child (CLONE_PIDFD, Linux 5.2): ``(pid, pidfd)``
    in the caller, ``(0, -1)`` in the child. The pidfd is made by the same system call, so it can
    never refer to a process that later took a recycled pid; it is close-on-exec, and the child
    does not have it."""
    fd = ctypes.c_int(-1)
    pid = _clone(int(signal.SIGCHLD) | CLONE_PIDFD | (CLONE_PARENT if sibling else 0), ctypes.addressof(fd))
    return (pid, fd.value) if pid else (0, -1)


def _clone(flags: int, parent_tid: int) -> int:
    if _SYS_CLONE is None:
        raise OSError(f"forkpoint does not support this architecture ({platform.machine()})")
    pid = _syscall(ctypes.c_long(_SYS_CLONE), ctypes.c_ulong(flags), ctypes.c_ulong(0),
                   ctypes.c_ulong(parent_tid), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)
