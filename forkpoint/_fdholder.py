"""A process that shares the live worker's descriptor table, so that a restored worker can still
answer the clients of the requests that failed.

In restart mode the restored process comes from a checkpoint taken before the failed request's
connection was accepted: only the failed process had that socket, and it is killed. The kernel
frees a descriptor table when the last process using it is gone, so a process made with
``clone(CLONE_FILES)`` keeps every descriptor of the worker open after the worker's death, at the
same numbers. With such a *holder* beside it, the worker only writes down which descriptor each
request uses (four words of persistent memory) instead of sending each client socket into a
socketpair with SCM_RIGHTS and taking it out again (``_serving.Rescue``'s other way: 5 us in one
process, 11-18 us of a real gunicorn worker's CPU per request). Taking the socket out of the dead
process instead (``pidfd_getfd``) was measured and dropped: it needs ptrace access, which Docker's
default seccomp profile and a worker made non-dumpable (gunicorn ``--user``) refuse. Sharing a table
needs no permission at all.

The holder is a copy-on-write copy of the worker made right after a checkpoint or a restore, so
its pages are the checkpoint's, already kept by the keeper; it costs page tables and the few pages
it writes. It

* is a sibling of the worker (CLONE_PARENT), so a child of the shepherd, which registers it
  (``Holder``): it is never one of the program's children, and it is killed when the program ends;
* blocks every signal, has no fault report, and dies with the shepherd (PR_SET_PDEATHSIG);
* waits for the worker's death on a pidfd, and does nothing before it;
* then acts on the slots of its table that the restored worker hands it (answer 500, shut the
  socket down, or leave it to the restored process, which is inside that very request), frees
  each, and exits once no slot of its table is in use. That drops the last reference to the dead
  worker's descriptors, which the kernel then closes. A slot no restored process hands over (a
  restore to an unrelated checkpoint) is given up after ``LINGER`` seconds.

Its wake-up is a futex on a word of the same persistent memory (the *bell*), so neither side needs
a descriptor the other lacks: the restored process has the checkpoint's table, not the holder's.
"""
from __future__ import annotations

import ctypes
import faulthandler
import os
import platform
import select
import signal
import socket
import time
from typing import Any

from . import _channel, _clone, _identity, _prctl

LINGER = 10.0             # seconds a dead worker's slots are kept for a restore to hand them over

# slot states (a slot is four words: state, request number, descriptor, table id)
FREE, INFLIGHT, STARTED, IDLE = 0, 1, 2, 3
HAND_ANSWER, HAND_CLOSE, HAND_LEAVE = 4, 5, 6      # what the restored process asks of the holder
IN_USE = (INFLIGHT, STARTED, IDLE)

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1                    # shared (not _PRIVATE): between processes
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


SUPPORTED = _SYS_FUTEX is not None and _clone.SUPPORTED


def ring(bell: int) -> None:
    """Wake every holder waiting on the bell at address ``bell`` (its value was changed first)."""
    _syscall(_SYS_FUTEX, ctypes.c_void_p(bell), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)


class Holder:
    """The holder of this process's descriptor table, seen from the worker."""

    def __init__(self, pid: int, worker_fd: int, table: int) -> None:
        self.pid = pid
        self.worker_fd = worker_fd        # a pidfd of this worker, in the shared table
        self.table = table

    @classmethod
    def spawn(cls, words: memoryview, head: int, slots: int, table: int, bell: int,
              answer: bytes, chan: Any) -> Holder:
        """Make the holder of table ``table`` (raises OSError if it cannot be made).

        ``words`` is the slots' persistent memory (``head`` words, then four per slot) and ``bell``
        the address of its first word. ``chan`` is the live process's channel to the shepherd.
        """
        worker_fd = os.pidfd_open(_identity.real_pid())
        shepherd = _identity.real_ppid()
        try:
            pid, pidfd = _clone.clone_pidfd(sibling=True, share_files=True)
        except OSError:
            os.close(worker_fd)
            raise
        if pid == 0:                       # the holder
            try:
                _hold(worker_fd, shepherd, words, head, slots, table, bell, answer)
            finally:
                os._exit(0)
        try:
            # The shepherd takes it out of the program's children before anything else of it.
            _channel.send(chan, _channel.Holder(pid), (pidfd,) if pidfd >= 0 else ())
        except OSError:
            os.kill(pid, signal.SIGKILL)   # unregistered, it would count as the program's child
            os.close(worker_fd)
            raise
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        return cls(pid, worker_fd, table)

    def stop(self) -> None:
        """In the worker it serves: end it (a holder replaced while its worker lives)."""
        try:
            os.kill(self.pid, signal.SIGKILL)     # a child of the shepherd: its pid is not reused
        except OSError:                            # before the shepherd reaps it, and it never
            pass                                   # exits while the worker lives
        self.forget()

    def forget(self) -> None:
        """Close this process's copy of the worker's pidfd (in a restored process, the dead one's)."""
        try:
            os.close(self.worker_fd)
        except OSError:
            pass


def _hold(worker_fd: int, shepherd: int, words: memoryview, head: int, slots: int, table: int,
          bell: int, answer: bytes) -> None:
    """The holder's whole life. Every descriptor it touches is also the worker's."""
    faulthandler.disable()
    signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
    _prctl.set_pdeathsig(signal.SIGKILL)
    if _identity.real_ppid() != shepherd:
        return
    _prctl.set_name("fp-fds")
    select.select([worker_fd], [], [])     # readable once the worker is dead
    timeout = _Timespec(0, 50_000_000)     # a slot freed without a ring is seen within 50 ms
    addr = ctypes.c_void_p(bell)
    deadline = time.monotonic() + LINGER
    while time.monotonic() < deadline:
        rung = words[0] & 0xFFFFFFFF
        waiting = False
        for s in range(slots):
            w = head + 4 * s
            state = words[w]
            if words[w + 3] != table or state == FREE:
                continue
            if state in IN_USE:
                waiting = True
                continue
            fd = int(words[w + 2])
            if state != HAND_LEAVE and _is_client(fd):
                if state == HAND_ANSWER:
                    send_all(fd, answer)
                shutdown(fd)
            words[w] = FREE
        if not waiting:
            return
        _syscall(_SYS_FUTEX, addr, _FUTEX_WAIT, ctypes.c_uint(rung), ctypes.byref(timeout), None, 0)


def _is_client(fd: int) -> bool:
    """Whether ``fd`` is a connected stream socket: never shut a listening socket down (the whole
    server shares it), whatever a slot says."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return s.type == socket.SOCK_STREAM and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        return False
    finally:
        s.detach()


def send_all(fd: int, data: bytes, timeout: float = 1.0) -> bool:
    """Write all of ``data`` to socket ``fd`` (within ``timeout``); whether it went out."""
    s = socket.socket(fileno=fd)
    try:
        s.settimeout(timeout)          # the descriptor may be non-blocking (asyncio's)
        s.sendall(data)
        return True
    except OSError:
        return False
    finally:
        s.detach()


def shutdown(fd: int) -> None:
    """FIN now: the socket may still be held by a process that is being torn down."""
    s = socket.socket(fileno=fd)
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.detach()
