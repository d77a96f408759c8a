"""The shepherd's part that keeps the program within its bounds: descriptors, memory, time.

Each checkpoint costs the shepherd a channel per process, under its own ``ulimit -n``; the oldest
unpinned checkpoints go first when they do not fit, and the shepherd says so. The snapshots'
memory is kept within ``max_snapshot_memory`` (``_budget``). And a live process past a deadline
(a ``watchdog()``'s hard deadline, a restart-mode request's timeout, a protected call's
``timeout=``) is killed and its checkpoint restored as a timeout.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from . import _budget, _procfs, _threadmarks
from ._control import ControlServer
from ._loop import EventLoop
from ._registry import Checkpoint, Proc, Role
from .arena import Arena

log = logging.getLogger("forkpoint")

_WATCHDOG_TICK = 0.05         # how often the watchdog's hard deadline in the arena is checked
# Descriptors the shepherd keeps free beyond its channels: a message's two descriptors (a channel
# and a pidfd), the channel of a live process that died and is not at EOF yet, and a /proc read.
_FD_RESERVE = 4


class Limits:
    """The ``Shepherd``'s bounds (a part of it: the parts share one object)."""

    if TYPE_CHECKING:   # what this part uses of the rest of the shepherd (``Shepherd.__init__``, ``run``)
        arena: Arena
        loop: EventLoop
        procs: dict[int, Proc]
        ckpts: dict[int, Checkpoint]
        current: int
        live: Proc | None
        live_up: bool
        pending_signals: list[tuple[int, bool]]
        control: ControlServer | None
        budget: _budget.Budget
        max_checkpoints: int
        max_memory: int | None
        channels: int
        fd_base: int
        fd_limit: int
        fd_warned: float
        next_deadline: float
        threads_overdue: _threadmarks.Overdue

        def _discard(self, n: int, why: str, level: int = logging.INFO) -> None: ...
        def _drain(self, proc: Proc) -> None: ...
        def _retire(self, proc: Proc) -> None: ...
        def _victims(self) -> list[int]: ...
        # (restores: _shepherd_restores)
        def _failure(self, target: int, sig: int, cause: str, requester: Proc | None,
                     operator: bool = False, blame: str | None = None) -> None: ...

    def _start_limits(self) -> None:
        """As the loop starts: what the checkpoints leave of the descriptors for the operator's
        connections, and the timers of the memory and deadline checks."""
        self.fd_base = _procfs.open_fd_count() - self.channels - 1
        if self.control is not None:     # its connections come out of what checkpoints leave free
            self.control.max_connections = max(1, min(self.control.max_connections,
                                                      (self.fd_limit - self.fd_base - _FD_RESERVE) // 8))
        if self.max_memory:
            self.loop.after(_budget.INTERVAL, self._memory_tick)
        self.loop.after(_WATCHDOG_TICK, self._watchdog_tick)

    def _fd_need(self) -> int:
        """Descriptors the shepherd needs once every checkpoint has its keeper and spares."""
        conns = len(self.control.conns) if self.control is not None else 0
        held = self.channels - sum(1 for p in self.procs.values() if p.chan is not None
                                   and p.role in (Role.KEEPER, Role.SPARE))
        return (self.fd_base + held + conns + _FD_RESERVE
                + sum(1 + ck.want_spares for ck in self.ckpts.values() if not ck.awaiting))

    def _fd_note(self) -> str:
        return (f"the shepherd holds {self.channels + self.fd_base} descriptors of its {self.fd_limit} "
                "(ulimit -n)")

    def _fit_descriptors(self) -> None:
        """Keep checkpoints within the descriptors the shepherd has, oldest unpinned ones first,
        and say so: a channel that does not fit would silently lose its checkpoint."""
        if not self.fd_limit:
            return
        dropped = []
        while self._fd_need() > self.fd_limit:
            victims = self._victims()
            if victims:
                dropped.append(min(victims))
                self._discard(min(victims), "out of descriptors", level=logging.DEBUG)
                continue
            thin = [ck for ck in self.ckpts.values() if ck.want_spares]    # then fewer spares
            if not thin:
                break
            ck = max(thin, key=lambda c: c.n)
            ck.want_spares -= 1
            while len(ck.spares) > ck.want_spares:
                self._retire(ck.spares.pop())
        if dropped or self._fd_need() > self.fd_limit:
            now = time.monotonic()
            level = logging.WARNING if now - self.fd_warned > 10.0 else logging.INFO
            self.fd_warned = now if level == logging.WARNING else self.fd_warned
            log.log(level, "discarded checkpoint(s) %s: the shepherd's descriptor limit (ulimit -n %d) "
                    "holds %d checkpoint(s) here; raise it to keep max_checkpoints=%d",
                    dropped or "none", self.fd_limit, len(self.ckpts), self.max_checkpoints)

    def _memory(self, ck: Checkpoint) -> tuple[int, int]:
        uss = pss = 0
        for proc in ([ck.keeper] if ck.keeper else []) + ck.spares:
            u, p = _procfs.smaps(proc.pid)
            uss += u
            pss += p
        return uss, pss

    def _memory_tick(self) -> None:
        if not self.max_memory:
            return
        self._check_memory()
        self.loop.after(_budget.INTERVAL, self._memory_tick)

    def _check_memory(self) -> None:
        """Keep the snapshots' memory within the budget, every checkpoint but the newest (see
        ``_budget``): from an upper bound, measuring a checkpoint when it stops being the newest
        and everything only when the bound passes the budget."""
        if not self.max_memory or not self.ckpts:
            return
        b = self.budget
        b.grow(self.live.pid if self.live is not None else None)
        newest = max(self.ckpts)
        checked = [n for n in self.ckpts if n != newest and not self.ckpts[n].awaiting]
        b.measured({n: self._memory(self.ckpts[n]) for n in b.unmeasured(checked)}, everything=False)
        if b.bound(checked) > self.max_memory and b.may_measure_all():
            b.measured({n: self._memory(self.ckpts[n]) for n in checked}, everything=True)
        keep = {n for n, ck in self.ckpts.items() if ck.pinned or n == self.current}
        for n, total in b.victims(checked, self.max_memory, keep.__contains__):
            log.warning("checkpoint %d discarded: snapshots hold at most %d bytes (PSS), budget %d",
                        n, total, self.max_memory)
            self._discard(n, "memory budget")

    def _watchdog_tick(self) -> None:
        """Cut a live process past its deadline (``forkpoint.watchdog``, protected calls).

        Three kinds of deadline: one recorded in the arena (a watchdog's deadline plus ``hard_after``,
        for code stuck in C that never runs its SIGALRM handler; or a restart-mode request's
        timeout), the one a protected call sent with its own checkpoint (``Snap.deadline``), and
        those of work an ASGI request handed to a thread (``_threadmarks.Overdue``).
        Past either, the live process is killed here and the checkpoint restored as a timeout.
        Neither costs the call a timer or a handler: a POSIX timer set through ctypes and a
        SIGALRM handler cost every checkpointed call some 30 copy-on-write faults. The arena is
        read every 50 ms, which is how the shepherd learns of its deadline without a message; once
        seen less than two readings ahead, a deadline gets a timer of its own (``_at_deadline``),
        as a checkpoint's own deadline does from its ``Snap``: a deadline is then late only when it
        was set less than one reading before it falls due. (A deadline further ahead waits for a
        later reading: a server's requests end long before a timeout of seconds, and their
        deadlines then cost no timer.)
        """
        self.loop.after(_WATCHDOG_TICK, self._watchdog_tick)
        self._at_deadline(self._check_deadlines())

    def _at_deadline(self, deadline: float) -> None:
        """Check a deadline on time, not at the next tick (one timer at a time: the shepherd's
        timers cannot be cancelled, and a timer whose call committed or whose request ended finds
        nothing, and sets the next one)."""
        if 0 < deadline < self.next_deadline and deadline - time.monotonic() < 2 * _WATCHDOG_TICK:
            self.next_deadline = deadline
            self.loop.after(max(0.0, deadline - time.monotonic()), self._deadline_due)

    def _deadline_due(self) -> None:
        self.next_deadline = float("inf")
        self._at_deadline(self._check_deadlines())

    def _check_deadlines(self) -> float:
        """Restore the live process if it is past a deadline; return the earliest deadline still
        ahead (0: none)."""
        live = self.live
        if live is None or not self.live_up:
            return 0.0
        now = time.monotonic()
        armed, ck = self.arena.deadline(), self.ckpts.get(self.current)
        own = ck is not None and 0 < ck.deadline <= now
        if not own and (armed is None or now < armed[0]):
            thread, later = self.threads_overdue.check(self.arena, now)
            if thread is not None:
                return self._cut_thread(live, thread)
            ahead = [d for d in (ck.deadline if ck is not None else 0.0, armed[0] if armed else 0.0,
                                 later) if d > now]
            return min(ahead, default=0.0)
        self._drain(live)               # a transaction it committed meanwhile comes first
        if self.live is not live:
            return 0.0
        if own:
            if ck is None or self.ckpts.get(self.current) is not ck:
                return 0.0              # committed: the checkpoint is gone
            target, reason = ck.n, "timeout"
        else:
            if armed is None:
                return 0.0
            if self.arena.deadline() != armed:
                return 0.0              # the block ended, or the process moved on
            _, target, handled = armed
            target = target or self.current
            reason = "timeout (stuck in native code: killed)" if handled else "timeout"
        if target in self.ckpts and self.ckpts[target].awaiting:
            return 0.0                  # inside tsetjmp, before its keeper exists: next tick
        if target not in self.ckpts:    # nothing to restore: it dies, as a hang would end it
            log.error("live process %d is past its watchdog deadline and checkpoint %d is gone",
                      live.pid, target)
            os.kill(live.pid, signal.SIGKILL)
            return 0.0
        return self._cut(live, target, reason)

    def _cut(self, live: Proc, target: int, reason: str, blame: str | None = None) -> float:
        log.info("live process %d is past its deadline: %s", live.pid, reason)
        self.live = None
        held = len(self.pending_signals)
        self._retire(live)
        # A SIGALRM pending there is the watchdog's own timer, blocked by the stuck code: it is not
        # passed on to the restored process (where it would find no watchdog, or end it).
        self.pending_signals[held:] = [e for e in self.pending_signals[held:] if e[0] != signal.SIGALRM]
        self._failure(target, signal.SIGALRM, reason, None, blame=blame)
        return 0.0

    def _cut_thread(self, live: Proc, key: str) -> float:
        """Work that input ``key`` handed to a thread runs past that input's deadline: a thread
        cannot be cancelled, so the live process is cut as for a step past its deadline, and ``key``
        (not whatever the main thread runs now) is blamed."""
        self._drain(live)               # a checkpoint it took meanwhile comes first
        target = self.current
        if self.live is not live or target not in self.ckpts or self.ckpts[target].awaiting:
            return 0.0
        return self._cut(live, target, f"timeout (work of {key!r} in a thread)", blame=key)
