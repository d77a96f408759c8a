"""Input quarantine and the watchdog: the program's side of the recovery policy.

``processing(key)`` writes the key of the input being worked on into the arena, where the shepherd
reads it when the live process dies or rolls back; a key that keeps failing is quarantined by the
shepherd (see ``policy``), in the arena, so every later process of the program refuses it.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._errors import ForkpointError, Quarantined
from .persist import Arena

log = logging.getLogger("forkpoint")

_ENTRY = "forkpoint:quarantine"
DEFAULT_QUARANTINE_SIZE = 1024


def _load(arena: Arena) -> list[str]:
    try:
        keys = json.loads(arena.cache_out(_ENTRY))
    except KeyError:
        return []
    except (ForkpointError, ValueError, TypeError) as e:
        # A damaged quarantine must not take the program (or the shepherd) down: start afresh.
        log.error("the quarantine store is unreadable (%s); it is reset", e)
        return []
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def add_quarantine(arena: Arena, key: str, size: int = DEFAULT_QUARANTINE_SIZE) -> list[str]:
    """Add ``key``; when full, the oldest key is released (and logged). Returns the evicted keys."""
    keys = [k for k in _load(arena) if k != key]
    keys.append(key)
    evicted = keys[:-size] if len(keys) > size else []
    if evicted:
        log.warning("quarantine full (%d keys): released the oldest %s", size, evicted)
    arena.cache_in(_ENTRY, json.dumps(keys[-size:]).encode())
    return evicted


def _arena() -> Arena:
    from . import snapshots

    return snapshots.runtime().arena_or_create()


def _key(key: object) -> str:
    if not isinstance(key, str):
        key = repr(key)
    if not key or len(key.encode()) > 256:
        raise ValueError("an input key must be a non-empty str of at most 256 bytes")
    return key


def quarantine(key: str) -> None:
    """Quarantine ``key`` by hand (bounded: the oldest key is released when the store is full)."""
    add_quarantine(_arena(), _key(key))


def is_quarantined(key: str) -> bool:
    return _key(key) in _load(_arena())


def quarantined() -> list[str]:
    """The quarantined keys, oldest first."""
    return _load(_arena())


def release(key: str) -> bool:
    """Take ``key`` out of quarantine; returns whether it was there."""
    arena, key = _arena(), _key(key)
    keys = _load(arena)
    if key not in keys:
        return False
    keys.remove(key)
    arena.cache_in(_ENTRY, json.dumps(keys).encode())
    return True


@contextmanager
def processing(key: str) -> Iterator[str]:
    """Mark ``key`` as the input being processed; refuse it with ``Quarantined`` if it is."""
    arena, key = _arena(), _key(key)
    if key in _load(arena):
        raise Quarantined(key)
    outer = arena.processing()
    arena.set_processing(key)
    try:
        yield key
    finally:
        arena.set_processing(outer)


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
    from .snapshots import current_state, runtime, tlongjmp

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

    from . import _sigutil

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
