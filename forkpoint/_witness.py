"""A process in the program's process group that tells the shepherd which signals the whole group got.

A signal sent to the program's process group from outside (``kill -TERM -PGID``, ``kill %1`` in a
shell, coreutils ``timeout``) reaches the live process directly and the shepherd too, and the
shepherd cannot tell it from a signal sent to its PID alone: ``si_code`` and the sender are the same.
Forwarding it would make the program handle it twice; not forwarding a signal sent to the PID would
lose it. The shepherd used to decide by whether the live process still had its own copy pending,
which it usually had handled already: a handler ran twice.

The kernel delivers a process-group signal to every member under one lock, before ``kill()``
returns. So a member that blocks every signal and never reads them holds, when the shepherd reads
its own copy, a pending copy of exactly the signals that went to the whole group. The witness is
that member: a small process that the program's original process spawns before the live process
exists, which blocks everything from its first instruction, ends when the shepherd is gone, and
whose pending signals are cleared (``drain``) after each batch the shepherd judged, so that one
judgement never sees a signal of an earlier one. It only knows about its own group: a program
that moved its live process to another group, and per-process kills (systemd's cgroup kill), are
judged as before.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import sys

from . import _procfs

log = logging.getLogger("forkpoint")

_DRAIN_WAIT_MS = 50        # a witness that does not answer in this long (stopped: SIGSTOP to the
#                            group) is not asked again until its answer comes


class Witness:
    """The shepherd's side: the witness's pid, a pipe to ask it to drain and one for its answer."""

    def __init__(self, pid: int, ask: int, answer: int) -> None:
        self.pid = pid
        self._ask = ask
        self._answer = answer
        self._owed = 0               # drains asked for and not answered yet
        for fd in (ask, answer):     # (inherited across the shepherd's exec: no further)
            os.set_inheritable(fd, False)

    @classmethod
    def spawn(cls, shepherd: int) -> Witness | None:
        """Start the witness, with every signal blocked from its first instant; None if it cannot
        be started (signals are then judged without it).

        Called by the program's original process (``shepherd``, its pid) before it makes the live
        process, so that a signal sent to the group from then on is pending in the witness when
        the shepherd reads its own copy. ``posix_spawn`` (a vfork) costs the same whatever the
        program's heap, and the witness runs a few lines of its own, not forkpoint: it holds none
        of the program's descriptors but stdio and its two pipes, and imports nothing of it.
        """
        fds: list[int] = []
        try:
            ask_r, ask_w = os.pipe2(os.O_CLOEXEC)
            fds += (ask_r, ask_w)
            answer_r, answer_w = os.pipe2(os.O_CLOEXEC)
            fds += (answer_r, answer_w)
            os.set_blocking(answer_r, False)
            keep = {0, 1, 2, ask_r, answer_w}
            actions = [(os.POSIX_SPAWN_CLOSE, fd) for fd in map(int, os.listdir("/proc/self/fd"))
                       if fd not in keep and _is_open(fd)]    # (not the listing's own, closed)
            for fd in (ask_r, answer_w):
                os.set_inheritable(fd, True)
            every = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
            # Its code goes through its environment, so that ``ps`` shows a short command line.
            pid = os.posix_spawn(sys.executable,
                                 [sys.executable, "-I", "-S", "-c", _BOOT, str(shepherd),
                                  str(ask_r), str(answer_w)],
                                 {_ENV: _CODE}, file_actions=actions, setsigmask=every)
        except (OSError, ValueError) as e:
            for fd in fds:
                os.close(fd)
            log.info("no witness of group signals (%s)", e)
            return None
        os.close(ask_r)
        os.close(answer_w)
        return cls(pid, ask_w, answer_r)

    def fds(self) -> tuple[int, int]:
        """Its pipes' ends on this side: for the shepherd's arguments across its exec."""
        return self._ask, self._answer

    def usable(self) -> bool:
        """Whether its pending signals mean something now: every drain asked for was answered."""
        if self._owed:
            self._collect()
        return not self._owed

    def pending(self) -> int:
        """The signals it has pending, as a mask (bit ``s - 1`` for signal ``s``); 0 if unknown."""
        return _procfs.pending_mask(self.pid)

    def drain(self) -> None:
        """Have it drop every signal it has pending, and wait (briefly) until it has."""
        try:
            os.write(self._ask, b"d")
        except OSError:
            return
        self._owed += 1
        p = select.poll()
        p.register(self._answer, select.POLLIN)
        if p.poll(_DRAIN_WAIT_MS):
            self._collect()

    def _collect(self) -> None:
        try:
            self._owed -= len(os.read(self._answer, 64))
        except BlockingIOError:
            pass
        except OSError:
            self._owed = 1 << 30     # its end is gone: never usable again

    def stop(self) -> None:
        """End it (the start failed after it was spawned), and reap it: it is this process's child."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        """Close this process's ends of its pipes (the live process must not hold them)."""
        for fd in (self._ask, self._answer):
            try:
                os.close(fd)
            except OSError:
                pass


def _is_open(fd: int) -> bool:
    try:
        os.stat(fd)
    except OSError:
        return False
    return True


# The witness's whole life (argv: the shepherd's pid, its end of each pipe). It blocks every signal
# from its start (posix_spawn's mask) and never reads them but when asked to drop them all. It
# ends at EOF on its pipe, that is when the shepherd is gone (no process of the program but the
# shepherd holds the pipe's other end); ctypes (for PR_SET_PDEATHSIG) would cost it 1.5 MB.
_ENV = "FORKPOINT_WITNESS"
_BOOT = f"import os;exec(os.environ.pop({_ENV!r}))"
_CODE = """
import os, signal, sys
if os.getppid() == int(sys.argv[1]):
    with open("/proc/self/comm", "w") as f:
        f.write("fp-witness")
    ask, answer = int(sys.argv[2]), int(sys.argv[3])
    every = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    while os.read(ask, 1):
        while signal.sigtimedwait(every, 0) is not None:
            pass
        os.write(answer, b"k")
"""
