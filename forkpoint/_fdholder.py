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
* does nothing while the worker lives (it looks at a pidfd of it once a second);
* acts on the slots of its table that a restored worker hands it (answer 500, shut the socket
  down, or leave it to the restored process, which is inside that very request) as soon as they
  are handed, keeps only those sockets from then on, frees each slot, and exits once no slot of
  its table is in use. That drops the last reference to the dead worker's descriptors, which the
  kernel then closes. A slot still in use by a process restored inside its request is waited for
  at most ``LINGER`` seconds.

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

from . import _channel, _clone, _identity, _prctl, _sigutil

LINGER = 60.0     # seconds a dead worker's holder waits for slots a restored process still uses

# A slot is SLOT words: its state, the request's number, the descriptor, the table's id, and the
# socket's inode (0: not checked; kept where a slot may outlive its socket, a keep-alive connection).
SLOT = 5
SEQ, FD, TABLE, INO = 1, 2, 3, 4
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

    def __init__(self, pid: int, pidfd: int, worker_fd: int, table: int) -> None:
        self.pid = pid
        self.pidfd = pidfd                # a pidfd of the holder (-1 on kernels without them)
        self.worker_fd = worker_fd        # a pidfd of this worker, in the shared table
        self.table = table

    @classmethod
    def spawn(cls, words: memoryview, head: int, slots: int, table: int, bell: int,
              answer: bytes, chan: Any) -> Holder:
        """Make the holder of table ``table`` (raises OSError if it cannot be made).

        ``words`` is the slots' persistent memory (``head`` words, the last of them the id of a
        table whose worker a restored process knows to be dead, then ``SLOT`` per slot) and
        ``bell`` the address of its first word. ``chan`` is the live process's channel to the
        shepherd.
        """
        # Every signal is blocked from before the clone to the handover: a handler that raised as
        # the clone returned would lose the new holder before anything held its pid (it would live
        # on, unused, until the worker's death). The block is the first thing inside the ``try``
        # (``_sigutil.unset_mask``); the handlers of signals that came meanwhile run at the end.
        mask = _sigutil.unset_mask()
        worker_fd = -1
        try:
            _sigutil.block_all_into(mask)
            worker_fd = os.pidfd_open(_identity.real_pid())
            shepherd = _identity.real_ppid()
            pid, pidfd = _clone.clone_pidfd(sibling=True, share_files=True)
        except BaseException:
            if worker_fd >= 0:
                os.close(worker_fd)
            _sigutil.restore_blocked(mask)
            raise
        if pid == 0:                       # the holder
            try:
                _hold(worker_fd, shepherd, words, head, slots, table, bell, answer)
            except BaseException as e:     # noqa: BLE001 - said on the worker's stderr, then gone
                _say(f"forkpoint: the holder of a worker's descriptors failed ({e!r}); the clients "
                     "of requests in flight when that worker fails will see a closed connection\n")
            finally:
                os._exit(0)
        try:
            holder = cls(pid, pidfd, worker_fd, table)
            # The shepherd takes it out of the program's children before anything else of it.
            _channel.send(chan, _channel.Holder(pid), (pidfd,) if pidfd >= 0 else ())
            _sigutil.restore_blocked(mask)
        except BaseException:              # (also a handler that raised as the signals came back)
            _kill(pid, pidfd)              # unregistered, it would count as the program's child
            os.close(worker_fd)
            if pidfd >= 0:
                os.close(pidfd)
            _sigutil.restore_blocked(mask)
            raise
        return holder

    def stop(self) -> None:
        """In the worker it serves: end it (a holder replaced while its worker lives)."""
        _kill(self.pid, self.pidfd)
        self.forget()

    def forget(self) -> None:
        """Close this process's copies of the pidfds (in a restored process, its predecessor's).
        Once each: a second call (a cleanup run again) must not close numbers that other files
        took, and must close what the first one did not reach (a handler that raised as the first
        close returned). Each number is dropped just before its close, with no call in between."""
        fd, self.worker_fd = self.worker_fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        fd, self.pidfd = self.pidfd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _kill(pid: int, pidfd: int) -> None:
    """SIGKILL the holder through its pidfd, which cannot name a process that took its pid."""
    try:
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        # Without pidfds (Linux < 5.3): the holder is a child of the shepherd, whose pid is not
        # reused before the shepherd reaps it; this runs just after the spawn or in the worker it
        # serves, which it never leaves before that worker's death.
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _say(text: str) -> None:
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass


def _hold(worker_fd: int, shepherd: int, words: memoryview, head: int, slots: int, table: int,
          bell: int, answer: bytes) -> None:
    """The holder's whole life. Every descriptor it touches is also the worker's.

    It acts on a slot as soon as a restored process hands it over: the shepherd killed the worker
    before it woke that process, so the worker can never run again, even if the kernel is still
    tearing it down (for a large heap on a busy machine, seconds: the pidfd says "exited" only
    then). From that moment, or from the worker's exit, it keeps only the descriptors of its
    slots: a dead worker's database connections, locks and pipes close as they would have.
    """
    faulthandler.disable()
    signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
    _prctl.set_pdeathsig(signal.SIGKILL)
    if _identity.real_ppid() != shepherd:
        return
    _prctl.set_name("fp-fds")
    worker = select.poll()
    worker.register(worker_fd, select.POLLIN)
    alive_wait = _Timespec(1, 0)            # while the worker lives: a look at its pidfd a second
    dead_wait = _Timespec(0, 50_000_000)    # then: a slot freed without a ring is seen in 50 ms
    addr = ctypes.c_void_p(bell)
    dead_since = 0.0
    try:
        while True:
            rung = words[0] & 0xFFFFFFFF
            handed = in_use = False
            mine: list[int] = []
            for s in range(slots):
                w = head + SLOT * s
                if words[w + TABLE] != table:
                    continue
                state = words[w]
                if state in IN_USE:
                    in_use = True
                elif state != FREE:
                    handed = True
                else:
                    continue
                mine.append(int(words[w + FD]))
            if not dead_since and (handed or worker.poll(0) or words[head - 1] == table):
                dead_since = time.monotonic()
                _close_all_but({worker_fd, *mine})
            if handed:
                for s in range(slots):
                    w = head + SLOT * s
                    state = words[w]
                    if words[w + TABLE] != table or state in IN_USE or state == FREE:
                        continue
                    fd, ino = int(words[w + FD]), int(words[w + INO])
                    if state != HAND_LEAVE and _is_client(fd, ino):
                        if state == HAND_ANSWER:
                            send_all(fd, answer)
                        shutdown(fd)
                    words[w] = FREE
            if dead_since and (not in_use or time.monotonic() - dead_since > LINGER):
                return
            _syscall(_SYS_FUTEX, addr, _FUTEX_WAIT, ctypes.c_uint(rung),
                     ctypes.byref(dead_wait if dead_since else alive_wait), None, 0)
    finally:
        for s in range(slots):          # handed over too late: free, so they cannot leak
            w = head + SLOT * s
            if words[w + TABLE] == table and words[w] >= HAND_ANSWER:
                words[w] = FREE


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _is_client(fd: int, ino: int) -> bool:
    """Whether ``fd`` is still the connected stream socket its slot recorded (``ino``, if not 0):
    never shut a listening socket down (the whole server shares it), whatever a slot says."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        if ino and os.fstat(fd).st_ino != ino:
            return False
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
