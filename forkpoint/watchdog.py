"""``watchdog(seconds)``: roll back a block of code that runs too long.

A SIGALRM handler rolls back with ``tlongjmp``; a POSIX timer that SIGKILLs the process is armed
behind it for code stuck in C, where no Python handler can run (see ``_KillTimer``).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import _sigutil
from ._runtime import runtime
from .snapshots import current_state, tlongjmp

log = logging.getLogger("forkpoint")

__all__ = ["watchdog"]


class _KillTimer:
    """A POSIX timer that SIGKILLs this process: the watchdog's last resort.

    A Python signal handler only runs between bytecodes; code stuck in C (a regular expression that
    backtracks forever, a native library spinning) never returns to the interpreter, so the SIGALRM
    handler never runs. The kernel delivers SIGKILL regardless, and the shepherd, which sees the
    death and the deadline recorded in the arena, restores the checkpoint as for a timeout.
    """

    class _SigEvent(ctypes.Structure):
        _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                    ("_pad", ctypes.c_byte * 48)]

    class _ITimerSpec(ctypes.Structure):
        _fields_ = [("interval", ctypes.c_long * 2), ("value", ctypes.c_long * 2)]

    _libc = ctypes.CDLL(None, use_errno=True)

    def __init__(self, seconds: float) -> None:
        self.id = ctypes.c_void_p()
        ev = self._SigEvent(signo=signal.SIGKILL, notify=0)          # SIGEV_SIGNAL
        if self._libc.timer_create(time.CLOCK_MONOTONIC, ctypes.byref(ev), ctypes.byref(self.id)) != 0:
            raise OSError(ctypes.get_errno(), "timer_create")
        whole = int(seconds)
        spec = self._ITimerSpec(value=(ctypes.c_long * 2)(whole, int((seconds - whole) * 1e9)))
        if self._libc.timer_settime(self.id, 0, ctypes.byref(spec), None) != 0:
            self.cancel()
            raise OSError(ctypes.get_errno(), "timer_settime")

    def cancel(self) -> None:
        self._libc.timer_delete(self.id)


@contextmanager
def watchdog(seconds: float, *, to: int = 0, hard_after: float = 1.0) -> Iterator[None]:
    """Roll back to checkpoint ``to`` (0: the current one) if the block runs longer than ``seconds``.

    A SIGALRM timer is armed on entry and cleared on exit; the program's own handler and timer are
    put back (the timer with the time spent in the block deducted). If the handler cannot run
    ``hard_after`` seconds past the deadline (the program is stuck in C code), the process is
    SIGKILLed and the shepherd restores the checkpoint all the same; ``CKPT_SIGTYPE`` is SIGALRM
    either way.
    """
    if not seconds > 0:
        raise ValueError(f"watchdog needs a positive number of seconds, got {seconds!r}")
    if not hard_after > 0:
        raise ValueError(f"hard_after must be a positive number of seconds, got {hard_after!r}")

    owner: Any = sys._getframe(1)    # the frame running the with statement, past contextlib's
    while owner is not None and owner.f_code.co_filename == contextlib.__file__:  # (ExitStack too)
        owner = owner.f_back

    def _expired(signum: int, frame: Any) -> None:
        # A with block interrupted right after __enter__ never runs __exit__ (CPython bpo-29988):
        # a timer that outlived its block must not roll back code that has moved on.
        f = frame
        while f is not None and f is not owner:
            f = f.f_back
        if f is None:
            log.warning("watchdog: a timer outlived its block (interrupted on entry); ignored")
            signal.setitimer(signal.ITIMER_REAL, 0)
            if killer is not None:
                killer.cancel()
            if arena is not None:
                arena.set_watchdog(*outer) if outer is not None else arena.set_watchdog(None)
            return
        log.warning("watchdog: block ran longer than %gs, rolling back", seconds)
        tlongjmp(to, sig=signal.SIGALRM, reason="timeout")

    arena = runtime().arena if runtime().started else None
    outer = arena.watchdog() if arena is not None else None    # an enclosing watchdog's record
    killer = None
    unset = object()
    old_handler: Any = unset
    # Set up and torn down with every signal blocked: a handler that raises (Ctrl-C) must not
    # land between two of these steps and leave a timer, a kill timer or the handler behind.
    mask = _sigutil.block_all()
    try:
        old_handler = signal.signal(signal.SIGALRM, _expired)   # raises outside the main thread
        old_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
        started = time.monotonic()
        if arena is not None:
            arena.set_watchdog(started + seconds + hard_after, to or current_state())
            killer = _KillTimer(seconds + hard_after)
    except BaseException:               # undo whatever was armed, then let the error through
        signal.setitimer(signal.ITIMER_REAL, 0)
        if arena is not None:
            arena.set_watchdog(*outer) if outer is not None else arena.set_watchdog(None)
        if old_handler is not unset:
            signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        _sigutil.restore_mask(mask)
        raise
    try:
        _sigutil.restore_mask(mask)     # a signal that arrived meanwhile runs here, inside the try
        yield
    finally:
        mask = _sigutil.block_all()
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if killer is not None:
                killer.cancel()
            if arena is not None:
                arena.set_watchdog(*outer) if outer is not None else arena.set_watchdog(None)
            if signal.SIGALRM in signal.sigpending():       # expired as the block ended: it did end
                signal.sigtimedwait({signal.SIGALRM}, 0)
            signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
            if old_timer[0] > 0:
                left = max(old_timer[0] - (time.monotonic() - started), 1e-6)
                signal.setitimer(signal.ITIMER_REAL, left, old_timer[1])
        finally:
            _sigutil.restore_mask(mask)
