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
which drops the signals of each batch the shepherd judged (``drain``), and only those, so that
one judgement never sees a signal of an earlier one. A signal it has been asked to drop and has
not dropped yet (it did not run: a loaded machine, a SIGSTOP) is ``unsure``: its pending copy may
be an earlier one, and that signal alone is judged as before the witness existed. Every other
signal is still told apart by it. (It used to drop everything it had pending, and to be set aside
whole while a drop was unanswered: a group signal that came between the shepherd's read of its
pending set and the drop was dropped unjudged, and one that came while it was set aside was
judged without it, and stayed pending, to make a later signal to the PID look like the group's.)
It only knows about its own group: a program that moved its live process to another group, and
per-process kills (systemd's cgroup kill), are judged as before.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import sys

from . import _procfs

log = logging.getLogger("forkpoint")

_DRAIN_WAIT_MS = 50        # how long the shepherd waits for its answer (it may not be running:
#                            a SIGSTOP to the group, a loaded machine); the answer is read later
_MASK_BYTES = 8            # a request: the signals to drop, bit ``s - 1`` for signal ``s``
_MAX_OWED = 64             # requests unanswered before the next ones are merged into one


class Witness:
    """The shepherd's side: the witness's pid, a pipe to ask it to drop signals and one for its answer."""

    def __init__(self, pid: int, ask: int, answer: int) -> None:
        self.pid = pid
        self._ask = ask
        self._answer = answer
        self._owed: list[int] = []   # the masks it was asked to drop and has not answered yet, in order
        self._later = 0              # signals to ask it to drop once it has answered (too many owed)
        self._gone = False           # its end of a pipe is gone: never asked again
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

    def unsure(self) -> int:
        """The signals whose pending copy here may be one it was asked to drop (the drop is not
        answered yet), as a mask (bit ``s - 1`` for signal ``s``): those alone are judged without it.
        Every other signal it has pending went to the group and has not been judged yet."""
        if self._gone:
            return -1
        if self._owed:
            self._collect()
        if self._later and len(self._owed) < _MAX_OWED:
            self.drain(0)             # what could not be asked while too many were owed
        unsure = self._later
        for mask in self._owed:
            unsure |= mask
        return unsure

    def pending(self) -> int:
        """The signals it has pending, as a mask (bit ``s - 1`` for signal ``s``); 0 if unknown."""
        return _procfs.pending_mask(self.pid)

    def drain(self, mask: int) -> None:
        """Have it drop the signals of ``mask`` (just judged), and wait (briefly) until it has.

        Only those: another signal it has pending came after its pending set was read, and its
        copy to the shepherd is judged next. Asked in order, it answers in order."""
        mask |= self._later
        if self._gone or not mask:
            return
        if len(self._owed) >= _MAX_OWED:     # it has not run for that long: one request, later
            self._later = mask
            return
        try:
            os.write(self._ask, mask.to_bytes(_MASK_BYTES, "little"))
        except OSError:
            self._gone = True
            return
        self._later = 0
        self._owed.append(mask)
        if len(self._owed) > 1:       # it has not answered the one before: it is not running now
            return
        p = select.poll()
        p.register(self._answer, select.POLLIN)
        if p.poll(_DRAIN_WAIT_MS):
            self._collect()

    def _collect(self) -> None:
        try:
            done = len(os.read(self._answer, 64))
        except BlockingIOError:
            return
        except OSError:
            done = 0
        if not done:                 # its end is gone: never usable again
            self._gone = True
            return
        del self._owed[:done]

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
# from its start (posix_spawn's mask) and never reads them but when asked to drop some (a mask of
# 8 bytes, written at once: a pipe keeps writes this small whole). It
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
    while ask_for := os.read(ask, 8):
        mask = int.from_bytes(ask_for, "little")
        drop = {s for s in every if mask >> (int(s) - 1) & 1}
        while drop and signal.sigtimedwait(drop, 0) is not None:
            pass
        os.write(answer, b"k")
"""
