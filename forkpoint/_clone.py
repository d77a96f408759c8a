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
import errno
import os
import platform
import signal

CLONE_PARENT = 0x00008000
CLONE_PIDFD = 0x00001000
CLONE_FILES = 0x00000400

# clone(2) takes (flags, stack, parent_tid, ...) first on these architectures; with the rest zero
# the differences in argument order after those three do not matter.
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())

# PyDLL keeps the GIL held across the call: the child must come back holding it, like the parent.
_libc = ctypes.PyDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SUPPORTED = _SYS_CLONE is not None
_FLAGS = int(signal.SIGCHLD)
_pidfd_ok = True          # cleared for good when the kernel refuses CLONE_PIDFD (before Linux 5.2)


def clone(sibling: bool, pidfd: ctypes.c_int | None = None, share_files: bool = False) -> int:
    """Fork this process without Python's at-fork hooks; return the child's pid, or 0 in the child.

    ``sibling=True`` makes the child a child of our parent (CLONE_PARENT). ``pidfd``, if given,
    receives a pidfd of the child in the parent (CLONE_PIDFD; it stays as it was on kernels
    without it). ``share_files=True`` (CLONE_FILES) gives both processes one descriptor table:
    a descriptor either opens or closes is opened or closed for the other (``_fdholder``).

    After the system call every page of the parent is shared with the child, and each one the
    parent writes first is copied (a fault of a few microseconds). So the call takes plain ints
    and prepared objects, and the parent's side allocates nothing after it.
    """
    global _pidfd_ok
    if _SYS_CLONE is None:
        raise OSError(f"forkpoint does not support this architecture ({platform.machine()})")
    flags = _FLAGS | CLONE_PARENT if sibling else _FLAGS
    if share_files:
        flags |= CLONE_FILES
    if pidfd is not None and _pidfd_ok:
        pid = _syscall(_SYS_CLONE, flags | CLONE_PIDFD, 0, ctypes.byref(pidfd), 0, 0)
        if pid < 0 and ctypes.get_errno() == errno.EINVAL:
            _pidfd_ok = False
            pid = _syscall(_SYS_CLONE, flags, 0, 0, 0, 0)
    else:
        pid = _syscall(_SYS_CLONE, flags, 0, 0, 0, 0)
    if pid < 0:
        err = ctypes.get_errno()
        if pidfd is not None:
            # The kernel writes the pidfd's number before its last checks (a cgroup's pids.max
            # fails after it) and releases the descriptor when they fail: the number is not ours.
            pidfd.value = -1
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid  # type: ignore[no-any-return]


def clone_pidfd(sibling: bool, share_files: bool = False) -> tuple[int, int]:
    """``clone`` that also returns a pidfd of the child: ``(pid, pidfd)`` in the caller, ``(0, -1)``
    in the child. The pidfd is made by the same system call, so it can never refer to a process
    that later took a recycled pid; it is close-on-exec, and the child does not have it (unless it
shares the caller's descriptor table: ``share_files``). It is -1
    on kernels without CLONE_PIDFD (before Linux 5.2)."""
    fd = ctypes.c_int(-1)
    pid = clone(sibling, fd, share_files)
    return (pid, fd.value) if pid else (0, -1)
