"""``watchdog(seconds)`` and ``Deadline``: roll back code that runs too long.

Both record a deadline in the arena, a word of shared memory the shepherd reads every 50 ms (and
then on time, once it has seen the deadline ahead): past it, the shepherd kills the live process and
restores the recorded checkpoint as a timeout (``_shepherd_limits.Limits._watchdog_tick``). SIGKILL
reaches the process whatever it is doing, so this also cuts code stuck in C.

* ``watchdog(seconds)`` (the public context manager) first tries a SIGALRM handler that rolls back
  with ``tlongjmp``; the deadline recorded is ``seconds + hard_after``, the last resort. Blocks of
  different tasks may overlap without nesting: one timer and one record serve the earliest
  (``_Blocks``), in a record of their own.
* ``Deadline`` guards every protected call (``@checkpointed(timeout=...)``, the WSGI and ASGI
  wrappers) and records the timeout itself: no handler, no timer. With a checkpoint per call,
  every page a call writes after the checkpoint's fork is a copy-on-write fault (2.4 us each on
  the development machine); a SIGALRM handler and timer installed and removed per call wrote some
  20 pages more, a POSIX kill timer set through ctypes 10 more. Setting and clearing a deadline
  writes two words of the arena and touches a handful of objects. docs/architecture.md has the
  measurements.
"""
from __future__ import annotations

import _signal
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import _eventloop, _frozen, _runtime, _sigutil
from .snapshots import current_state, tlongjmp

log = logging.getLogger("forkpoint")

__all__ = ["Alarm", "Deadline", "watchdog"]

_ITIMER_REAL = signal.ITIMER_REAL
_SIGALRM = int(signal.SIGALRM)
_ALRM_ONLY = (_SIGALRM,)
_DFL = signal.SIG_DFL
_setitimer = _signal.setitimer
_getitimer = _signal.getitimer
_getsignal = _signal.getsignal
_set_handler = _signal.signal          # the C function: no enum conversion
_sigtimedwait = _signal.sigtimedwait
_monotonic = time.monotonic
_block_all_into = _sigutil.block_all_into
_unset_mask = _sigutil.unset_mask
_restore_blocked = _sigutil.restore_blocked
_rt = _runtime.runtime()
_get_ident = threading.get_ident
_main_thread = threading.main_thread

_NEVER = float("inf")       # the deadline of a block whose roll-back was refused: it came once
# The interval of every timer the blocks set (never reached: ``_on_alarm`` sets the next one), so
# that one the program sets inside a block, or its handler does, is told apart (``_Blocks.adopt``).
# Above ``_timer``'s longest: once it came, the timer's time left is above that.
_MARK = 3e8


class _Blocks:
    """The ``watchdog()`` blocks in force in this process, and the program's own alarm behind them.

    Blocks need not nest: two tasks of an event loop each enter one and leave in any order. So no
    block saves what was there and puts it back (the block entered first, ending first, would
    cancel the other's timer, and the other, ending, would put back a hard deadline long past):
    the process's one ITIMER_REAL is set to the earliest deadline of the blocks in force, and the
    arena's alarm record, the shepherd's last resort, to their earliest hard deadline. The first
    block takes the program's own SIGALRM handler and timer over, and the last gives them back,
    the time spent deducted. Meanwhile the program's timer is one more deadline (its handler, a
    Python function, is called on time), and a handler or timer the program sets inside the
    blocks, its handler's next ``alarm()`` included, becomes its own (``adopt``: the blocks'
    timers carry the interval ``_MARK``) and outlives them. Changed only with every signal
    blocked.
    """

    __slots__ = ("alarms", "handler", "timer", "since", "own_due")

    def __init__(self) -> None:
        self.alarms: list[Alarm] = []      # armed, in the order they were armed
        self.handler: Any = None
        self.timer: tuple[float, float] = (0.0, 0.0)
        self.since = 0.0
        # When the program's own timer falls due, if its handler is a Python function: it is
        # then called on time, among the blocks' deadlines (a job runner's SIGALRM timeout).
        self.own_due = _NEVER

    def program(self, timer: bool = True) -> None:
        """Set the timer (unless set already) and the hard deadline for the blocks in force (one
        at least)."""
        alarms = self.alarms
        if len(alarms) == 1:
            soonest = last = alarms[0]
        else:
            soonest, last = min(alarms, key=_due), min(alarms, key=_kill_at)
        if timer:
            self.adopt(came=False)
            due = min(soonest.due, self.own_due)
            _setitimer(_ITIMER_REAL, _timer(due - _monotonic()), _MARK)
        arena = _rt.arena if _rt.chan is not None else None        # (started)
        if arena is not None:
            arena.set_alarm(last.kill_at, last.record)

    def forget_in_forked_child(self) -> None:
        """A child the program forks inside blocks (``os.fork``, ``multiprocessing``) has no timer
        (fork does not copy it) and is not in the parent's blocks: their deadlines, in the list,
        would fire into the child at its own first block. forkpoint's own copies are cloned
        without at-fork hooks and keep them."""
        if not self.alarms:
            return
        for alarm in self.alarms:
            alarm.armed = False         # the child's way out of their blocks does nothing
        self.alarms.clear()
        self.own_due = _NEVER
        old, self.handler = self.handler, None
        _set_handler(_SIGALRM, old if old is not None else _DFL)

    def resumed(self, elapsed: float) -> None:
        """In a process restored into a checkpoint taken inside blocks (``_frozen.resume_hooks``,
        signals blocked): each block runs again from there with the time it had left at the
        checkpoint, as its timer does (``_frozen._real_timer``), so its deadlines move on by the
        ``elapsed`` seconds since; and their hard deadline, cleared by the shepherd at the
        restore, is recorded again. (The deadlines of the first run made the next block that
        started or ended set a timer long past: every retry was cut as a timeout.)"""
        if not self.alarms:
            return
        for alarm in self.alarms:
            if alarm.due != _NEVER:
                alarm.due += elapsed
            alarm.kill_at += elapsed
        self.program()

    def started(self) -> None:
        """forkpoint has just started (``_runtime.started_hooks``): the hard deadline of blocks
        entered before, which had no shepherd to record it for."""
        if self.alarms:
            self.program(timer=False)

    def adopt(self, came: bool) -> None:
        """The timer or handler of SIGALRM the program (its handler, called by ``own_alarm``, or
        code inside a block) set while blocks are in force becomes its own, put aside like the
        one it had at the first block (signals blocked). ``came``: a SIGALRM has come."""
        left, interval = _getitimer(_ITIMER_REAL)
        if interval != _MARK:           # not the blocks' timer: the program's (0: cancelled)
            now = _monotonic()
            self.timer, self.since = (left, interval), now
            self.own_due = now if came else now + left if left > 0 else _NEVER
        handler = _getsignal(_SIGALRM)
        if handler is not _on_alarm:
            self.handler = handler
            _set_handler(_SIGALRM, _on_alarm)
        if not callable(self.handler):
            self.own_due = _NEVER

    def own_alarm(self, signum: int, frame: Any) -> None:
        """The program's own timer has come while blocks are in force (``_on_alarm``): its
        handler runs now, as without them (it used to wait for the last block's end). A
        periodic timer is due again an interval later."""
        mask = _unset_mask(_reprogram_mask)
        try:
            _block_all_into(mask)
            handler = self.handler
            interval = self.timer[1]
            if interval > 0:
                self.own_due += interval * max(1, int((_monotonic() - self.own_due) // interval) + 1)
                self.timer, self.since = (interval, interval), self.own_due - interval
            else:
                self.timer, self.own_due = (0.0, 0.0), _NEVER
            if self.alarms:
                self.program()
        finally:
            _restore_blocked(mask)
        try:
            handler(signum, frame)
        finally:
            _reprogram()        # what the handler set (a next alarm()) is the program's

    def give_back(self) -> None:
        """No block left: the program's handler and timer, as if no block had been."""
        left, interval = _setitimer(_ITIMER_REAL, 0)
        ours = interval == _MARK
        if ours and left > _MARK / 2:           # it expired as the last block ended:
            _sigtimedwait(_ALRM_ONLY, 0)        # that block did end, drop its signal
        if _rt.arena is not None:
            _rt.arena.set_alarm(None)
        old, self.handler = self.handler, None
        if _getsignal(_SIGALRM) is _on_alarm:   # (else the program set its own inside: it stays)
            _set_handler(_SIGALRM, old if old is not None else _DFL)
        if not ours:            # the program set its timer inside the block: it stays as it is
            if left > 0:
                _setitimer(_ITIMER_REAL, left, interval)
            return
        left, interval = self.timer
        if left > 0:
            left = max(left - (_monotonic() - self.since), 1e-6)
            _setitimer(_ITIMER_REAL, left, interval)


def _timer(seconds: float) -> float:
    """A timer for ``seconds`` that ``setitimer`` takes: a deadline years away (or ``inf``) gets
    one that fires early, and ``_on_alarm`` sets it again."""
    return min(max(seconds, 1e-6), 1e8)


def _due(alarm: Alarm) -> float:
    return alarm.due


def _kill_at(alarm: Alarm) -> float:
    return alarm.kill_at


_blocks = _Blocks()
os.register_at_fork(after_in_child=_blocks.forget_in_forked_child)
_frozen.resume_hooks.append(_blocks.resumed)
_runtime.started_hooks.append(_blocks.started)
_EARLY = 1e-3       # a timer set in microseconds may come this much before the monotonic deadline


def _on_alarm(signum: int, frame: Any) -> None:
    """SIGALRM while blocks are in force: the one past its deadline rolls back (see ``Alarm``)."""
    blocks = _blocks
    alarms = blocks.alarms
    if alarms:          # a timer the program set inside the blocks, come now, is its own
        mask = _unset_mask(_reprogram_mask)
        try:
            _block_all_into(mask)
            blocks.adopt(came=True)
        finally:
            _restore_blocked(mask)
    while alarms:
        soonest = min(alarms, key=_due)
        now = _monotonic()
        if blocks.own_due <= min(soonest.due, now + _EARLY):
            blocks.own_alarm(signum, frame)     # the program's own timer, on time
            return
        if soonest.due > now + _EARLY:          # the timer was for a block that has ended
            _reprogram()
            return
        soonest.expired(frame)                  # rolls back, or forgets a block that is gone


def _reprogram() -> None:
    mask = _unset_mask(_reprogram_mask)
    try:
        _block_all_into(mask)
        if _blocks.alarms:
            _blocks.program()
    finally:
        _restore_blocked(mask)


_reprogram_mask = _sigutil.new_mask()


class Alarm:
    """One armed ``watchdog()`` block: its deadline, which rolls back by a SIGALRM handler, and the
    hard deadline behind it, which the shepherd enforces by a kill (see ``_Blocks``).

    ``arm()`` puts the block among those in force, ``disarm()`` takes it out. Both run with every
    signal blocked, so a Ctrl-C cannot leave half of it armed; ``disarm()`` of an alarm that is not
    armed does nothing. An interrupt can still land as ``disarm()`` is entered, before its block,
    and skip it whole: the caller calls it again if ``armed`` is still set (see ``watchdog``).

    ``target`` is the checkpoint to roll back to (0: the current one at expiry); it may be set after
    ``arm()``, for a checkpoint taken inside the guarded section. ``record`` is the checkpoint the
    shepherd restores if it has to kill the process at the hard deadline (0: its current one
    then; default ``target``). ``owner``, if given, is the frame that must still be on the stack
    (or suspended in a task) when the deadline comes (see ``watchdog``).
    """

    __slots__ = ("seconds", "hard_after", "target", "record", "owner", "armed", "reason", "mask",
                 "due", "kill_at")

    def __init__(self, seconds: float, hard_after: float = 1.0, target: int = 0, owner: Any = None,
                 reason: str = "timeout", record: int | None = None) -> None:
        self.seconds = seconds
        self.hard_after = hard_after
        self.target = target
        self.record = target if record is None else record
        self.owner = owner
        self.armed = False
        self.reason = reason
        self.mask = _sigutil.new_mask()
        self.due = self.kill_at = 0.0

    def arm(self) -> None:
        if _get_ident() != _main_thread().ident:
            # Only the first block installs the handler, which refuses another thread: a thread's
            # block armed while the main thread was in one ran unguarded (the handler runs in the
            # main thread, where its frame is not) and, ending last, could not give the
            # program's SIGALRM handler back.
            raise ValueError("watchdog() works in the main thread only (its SIGALRM handler runs there)")
        mask = _unset_mask(self.mask)
        try:
            _block_all_into(mask)    # inside the try: see _sigutil.unset_mask
            blocks = _blocks
            alarms = blocks.alarms
            first = not alarms
            if first:
                blocks.handler = _set_handler(_SIGALRM, _on_alarm)   # main thread only: raises first
            try:
                now = _monotonic()
                self.due = due = now + self.seconds
                self.kill_at = due + self.hard_after
                if first:       # the program's timer put aside as this block's is set: one call
                    blocks.timer = left, _ = _setitimer(_ITIMER_REAL, _timer(self.seconds), _MARK)
                    blocks.since = now
                    blocks.own_due = now + left if left > 0 and callable(blocks.handler) else _NEVER
                alarms.append(self)
                self.armed = True
                blocks.program(timer=not first or blocks.own_due < due)
            except BaseException:           # undo whatever was armed, then let the error through
                if self.armed:
                    self._forget()              # (the last block gives the program's back)
                elif first:                     # (the timer was not changed)
                    old, blocks.handler = blocks.handler, None
                    _set_handler(_SIGALRM, old if old is not None else _DFL)
                raise
        finally:
            _restore_blocked(mask)   # a signal that arrived meanwhile runs here

    def _forget(self) -> None:
        """Out of the blocks in force (signals blocked); the last one gives the program's back."""
        self.armed = False
        blocks = _blocks
        alarms = blocks.alarms
        if alarms and alarms[-1] is self:       # the one armed last (nested blocks, and one alone)
            alarms.pop()
        elif self in alarms:                    # (identity: an Alarm has no __eq__)
            alarms.remove(self)
        else:
            return
        if alarms:
            blocks.program()
        else:
            blocks.give_back()

    def disarm(self) -> None:
        if not self.armed:
            return
        mask = _unset_mask(self.mask)
        raised = None
        try:
            try:
                _block_all_into(mask)
            except BaseException as e:  # noqa: BLE001 - raised again below
                # A handler of a signal that came just before the block ran as it returned, and
                # raised (Ctrl-C): the alarm is disarmed all the same, or its timer and hard
                # deadline would outlive the block; what it raised comes after.
                raised = e
            self._forget()
        finally:
            _restore_blocked(mask)
        if raised is not None:
            raise raised

    def expired(self, frame: Any) -> None:
        """Past the deadline (``_on_alarm``, in the handler of SIGALRM): roll back."""
        # A with block interrupted right after __enter__ never runs __exit__ (CPython bpo-29988):
        # a timer that outlived its block must not roll back code that has moved on.
        owner = self.owner
        if owner is not None:
            f = frame
            while f is not None and f is not owner:
                f = f.f_back
            # A coroutine's block that awaits is not on the stack: the loop runs the handler; nor
            # is a block in a generator suspended at its yield (an @contextmanager's).
            if f is None and not _eventloop.suspended_in_task(owner) and \
                    not _eventloop.suspended_generator(owner):
                log.warning("watchdog: a timer outlived its block (interrupted on entry); ignored")
                self.disarm()
                return
        log.warning("watchdog: block ran longer than %gs, rolling back", self.seconds)
        # Once: if the roll-back is refused, the block runs on under its hard deadline alone (and
        # the other blocks' timers go on).
        self.due = _NEVER
        try:
            tlongjmp(self.target, sig=signal.SIGALRM, reason=self.reason)
        finally:
            _reprogram()


class Deadline:
    """A protected call's timeout: recorded in the arena, enforced by the shepherd (see module doc).

    ``set(seconds, target)`` before the call (before its checkpoint's fork, when there is one),
    ``clear()`` after it; an enclosing call's deadline is put back, and an earlier one is left in
    place (a ``watchdog()`` block's are in a record of their own, and the shepherd takes the
    earliest of both). ``target`` 0 is the shepherd's current checkpoint when the
    deadline passes: the call's own checkpoint, taken after ``set``.
    """

    __slots__ = ("arena", "outer")

    def __init__(self) -> None:
        self.arena: Any = None
        self.outer: tuple[float, int] | None = None

    def set(self, seconds: float, target: int = 0) -> None:
        arena = _rt.arena
        if arena is None or _rt.chan is None:
            raise RuntimeError("a deadline needs forkpoint started (the shepherd enforces it)")
        outer = arena.watchdog()
        at = _monotonic() + seconds
        if outer is not None and outer[0] <= at:
            self.arena, self.outer = None, None     # the enclosing deadline comes first: it stays
            return
        self.arena, self.outer = arena, outer
        arena.set_watchdog(at, target, handled=False)

    def clear(self) -> None:
        arena = self.arena
        if arena is not None:      # forgotten once cleared: an interrupt before leaves it to redo
            outer = self.outer
            if outer is None:
                arena.set_watchdog(None)
            else:
                arena.set_watchdog(outer[0], outer[1], handled=False)
            self.arena = None


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
    # tlongjmp(to) rolls back to the state current at expiry when ``to`` is 0; the kill timer's
    # record names the state current on entry, as the shepherd cannot know better.
    alarm = Alarm(seconds, hard_after, to, owner, record=to or current_state())
    try:
        alarm.arm()         # inside the try: an interrupt as it unblocks signals is cleaned up
        yield
    finally:
        try:
            alarm.disarm()
        finally:
            # A handler that raised as disarm() began (Ctrl-C's, run at a function's entry)
            # skipped it whole: the timer would fire later into code that has moved on, or the
            # shepherd kill it at the hard deadline. Once more; what was raised goes on after.
            if alarm.armed:
                alarm.disarm()
