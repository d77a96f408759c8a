"""The shepherd's part that restores: a failure or a request, a decision, a wake-up.

A restore starts from ``tlongjmp()`` (``_on_restore``), a crash that faulthandler reports before
the process dies (``_on_fault``), a death (``_on_live_death``), a deadline (``_shepherd_limits``)
or the operator. ``_failure`` asks the policy (backoff, crash loops, quarantine), kills the failed
process and records the jump; ``_wake`` sends ``Wake`` to a spare of the checkpoint, which becomes
the live process, or waits for the keeper's next copy. A checkpoint lost meanwhile falls back to
the best other one (``_fall_back``); none left ends the program as the failure would have.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from . import _channel, _threadmarks
from ._channel import ErrorKind, Restore, Wake
from ._faultreport import FaultReports
from ._loop import EventLoop
from ._qkeeper import Keeper
from ._registry import Checkpoint, Proc, Role
from ._sigutil import REPORTED_SIGNALS, signame
from .arena import Arena
from .policy import Action, Decision, RecoveryPolicy

log = logging.getLogger("forkpoint")

_REPORT_BACKSTOP = 1.0        # a crash report nothing claimed is written out after this long
_AWAIT_KEEPER = 5.0           # seconds a restore waits for a keeper's hello or copy before it falls back
_LOOP_WINDOW = 2.0            # seconds a keeper stays at normal priority after a restore waited for a copy
_PARAM = os.sched_param(0)    # the only priority SCHED_IDLE and SCHED_OTHER take


class Restores:
    """The ``Shepherd``'s restore methods (a part of it: the parts share one object)."""

    if TYPE_CHECKING:   # what this part uses of the rest of the shepherd (``Shepherd.__init__``)
        arena: Arena
        loop: EventLoop
        ckpts: dict[int, Checkpoint]
        current: int
        live: Proc | None
        live_up: bool
        restoring: bool
        recoveries: int
        backoff: Callable[[], None] | None
        pending_signals: list[tuple[int, bool]]
        policy: RecoveryPolicy
        quarantine: Keeper
        reports: FaultReports | None
        can_raise: bool
        throttled: bool

        def _answer_list(self, force: bool = False) -> None: ...
        def _discard(self, n: int, why: str, level: int = logging.INFO) -> None: ...
        def _drain(self, proc: Proc) -> None: ...
        def _retire(self, proc: Proc) -> None: ...
        def _send(self, proc: Proc, msg: _channel.Message) -> bool: ...
        def nosuch(self, n: int) -> str: ...
        def shutdown(self, code: int = 0, sig: int = 0) -> NoReturn: ...
        # (signals: _shepherd_signals)
        def _carry_late_signals(self) -> None: ...
        def _in_terminal_foreground(self) -> bool: ...
        def _replay(self, ck: Checkpoint, keeper: Proc | None = None) -> int: ...
        def _sent_from_outside(self, sig: int) -> bool: ...

    def _on_restore(self, proc: Proc, msg: Restore, fds: list[int]) -> None:
        """``tlongjmp(n)``: the caller waits, signals blocked, until it is killed (or refused)."""
        if msg.n not in self.ckpts:
            self._send(proc, _channel.Error(ErrorKind.NOSUCH, self.nosuch(msg.n)))
            return
        proc.reported_pending = msg.pending
        self._failure(msg.n, msg.sig, msg.reason or "tlongjmp", proc)

    def _on_live_death(self, status: int) -> None:
        if os.WIFEXITED(status):
            self.shutdown(code=os.WEXITSTATUS(status))
        sig = os.WTERMSIG(status)
        pol = self.policy.policy
        armed = self.arena.deadline()
        self.arena.clear_deadlines()
        if sig == signal.SIGKILL and armed is not None and time.monotonic() >= armed[0] - 0.05:
            target = self._usable(armed[1] or self.current)
            if target:                    # the watchdog's kill timer: a hang the handler could not cut
                self._failure(target, signal.SIGALRM, "timeout (stuck in native code: killed)", None)
                return
        if sig in pol.signals and not self._sent_from_outside(sig):
            wanted = pol.to or self.current
            target = self._usable(wanted)
            if target:
                self._failure(target, sig, f"killed by {signame(sig)}", None)
                return
            log.error("live process died by %s and there is no checkpoint %sto restore: ending",
                      signame(sig), f"{wanted} " if wanted else "")
        self.shutdown(sig=sig)

    def _on_fault_report(self, act: bool = True) -> None:
        """faulthandler in the live process reports a fatal signal, before the process dies.

        A report's first line names the signal, which decides at once whether to restore. With
        ``act=False`` (the death is being handled already) the report is only read: it must never
        be taken for a fault of the process restored after it. The text goes to the program's
        stderr once the shepherd knows what became of the crash (``_failure``, ``shutdown``), in
        one piece; a report nothing claims within a second is written as it is, never lost.
        """
        reports = self.reports
        if reports is None:
            return
        had = bool(reports.pending)
        sigs = reports.read()
        if sigs is None:
            self.loop.remove(reports.fd)
            reports.close()
            return
        if reports.pending and not had:
            self.loop.after(_REPORT_BACKSTOP, self._unclaimed_report)
        if act:
            for sig in sigs:
                self._on_fault(sig)

    def _unclaimed_report(self) -> None:
        if self.reports is None or not self.reports.pending:
            return
        if any(self._sent_from_outside(s) for s in REPORTED_SIGNALS):
            self.reports.take()     # the program handled a signal sent to it: it did not crash
        else:
            self.reports.flush()

    def _on_fault(self, sig: int) -> None:
        live = self.live
        if live is None or self._sent_from_outside(sig):
            return                      # a signal sent to the program: it dies or copes as it would
        self._drain(live)               # a checkpoint it took just before comes first
        pol = self.policy.policy
        target = pol.to or self.current
        if sig not in pol.signals or target not in self.ckpts:
            return                      # it dies as it would have; the reaper takes it from there
        # It is inside faulthandler's C handler. The whole report comes first (it is written in
        # microseconds, then the process enters exit); then the process is killed, because a
        # Python handler faulthandler chains to must not run program code beside the restored one.
        assert self.reports is not None
        self.reports.collect(live.pid)
        self.live = None
        self._retire(live)
        self._failure(target, sig, f"killed by {signame(sig)}", None)

    def _usable(self, wanted: int) -> int:
        """``wanted`` if it is a checkpoint, else the one to restore instead (0: none).

        A checkpoint can be gone because forkpoint's own machinery failed (its keeper was killed
        before it introduced itself: the OOM killer during a large fork); the program then goes
        back to the newest checkpoint before it, or failing that the oldest after it.
        """
        if not wanted or wanted in self.ckpts:
            return wanted
        alt = self._alternative(wanted)
        if alt:
            log.warning("checkpoint %d is gone: restoring checkpoint %d instead", wanted, alt)
        return alt

    def _alternative(self, lost: int) -> int:
        """The checkpoint to use in place of ``lost``: settled ones first, older before newer."""
        def rank(m: int) -> tuple[bool, bool, int]:
            ck = self.ckpts[m]
            settled = not ck.awaiting and (ck.keeper is not None or bool(ck.spares))
            return (settled, m < lost, m if m < lost else -m)
        others = [m for m in self.ckpts if m != lost]
        return max(others, key=rank) if others else 0

    def _failure(self, target: int, sig: int, cause: str, requester: Proc | None,
                 operator: bool = False, blame: str | None = None) -> None:
        """The live process failed (or asked to go back): decide, record, and restore or give up.
        ``blame``: the input whose work failed, when it is not the main thread's mark (a thread's
        work past its deadline)."""
        detected = time.monotonic()
        key = blame if blame is not None else self.arena.processing()
        if blame is None and sig and self.reports is not None and self.reports.pending:
            # The main thread's mark is not whose code crashed in another thread (_threadmarks).
            key = _threadmarks.blamed(self.arena, self.reports.pending, key)
        ck_failed = self.ckpts.get(self.current)
        if ck_failed is not None and ck_failed.key is not None:
            key = ck_failed.key         # a protected call failed inside its own checkpoint
        self.arena.set_processing(None)
        _threadmarks.clear(self.arena)
        self.arena.clear_deadlines()
        from_state = self.current
        if operator:
            decision = Decision(Action.RESTORE, target, 0.0, 1, cause, None)
        else:
            shared = self._count_failure(key, sig, cause) if key is not None else None
            decision = self.policy.decide(target, sig, key, sorted(self.ckpts), time.time(), cause,
                                          budgeted=bool(sig), key_failures=shared,
                                          served=self.arena.served())
        if requester is not None:
            self.live = None
            self._retire(requester)
        if decision.quarantine is not None:
            self._record_quarantine(decision.quarantine, from_state, target, sig, cause)
        if decision.action is Action.GIVE_UP:
            self._record_history(from_state, target, sig, decision.reason, key)
            log.error("%s", decision.reason)
            if sig:
                self.shutdown(sig=sig)
            self.shutdown(code=os.EX_SOFTWARE)
        self.recoveries += 1
        self.restoring = True
        escalated = decision.target != target
        log.log(logging.WARNING if escalated else logging.INFO, "restoring checkpoint %d from %d (%s)%s",
                decision.target, from_state, decision.reason,
                f" after {decision.delay:g}s backoff" if decision.delay else "")
        if self.reports is not None and sig:
            # Before the restored process runs, so that its output comes after the report.
            self.reports.flush(f"forkpoint: recovered from {signame(sig)}: restoring checkpoint "
                               f"{decision.target} (from state {from_state}); the crash:\n")
        wake = Wake(decision.target, from_state, sig, decision.reason, decision.attempt, detected)
        self.current = decision.target
        ck = self.ckpts[decision.target]
        ck.deadline = 0.0               # the restored process answers for the call, in time
        voluntary = requester is not None and not sig and not cause.startswith("exception")
        ck.after_failure = not voluntary
        ck.replay_due = bool(ck.delivered) and not voluntary

        def restore() -> None:
            if self.backoff is not restore and decision.delay > 0:
                return                   # a signal already cut the backoff short
            self.backoff = None
            # recorded when it happens, so the restored process finds it in history()
            self._record_history(from_state, decision.target, sig, decision.reason, key)
            self._wake(ck, wake)

        if decision.delay > 0:
            self.backoff = restore
            self.loop.after(decision.delay, restore)
        else:
            restore()
        self._carry_late_signals()

    def _record_history(self, from_state: int, to_state: int, sig: int, reason: str,
                        key: str | None) -> None:
        """Append to the jump history; a damaged arena costs the record, never the restore."""
        try:
            self.arena.append_history(from_state, to_state, sig, reason[:64], key)
        except Exception:  # noqa: BLE001 - contained: the restore matters more than its record
            log.exception("could not record the restore to %d in the jump history", to_state)

    def _count_failure(self, key: str, sig: int, cause: str) -> int | None:
        """Record the failure where the quarantine's scope shares it (before the restore); the
        failures of ``key`` within the policy's window wherever they happened, or None."""
        pol = self.policy.policy
        try:
            return self.quarantine.failed(key, sig, cause[:64], pol.quarantine_after, pol.within,
                                          pol.quarantine_size)
        except Exception:  # noqa: BLE001 - contained: the restore matters more than the record
            log.exception("could not record the failure of input %r", key)
            return None

    def _record_quarantine(self, key: str, from_state: int, target: int, sig: int, cause: str) -> None:
        pol = self.policy.policy
        try:
            self.quarantine.quarantined(key, pol.quarantine_after, sig, pol.quarantine_size)
        except Exception:  # noqa: BLE001 - contained: the restore matters more than the quarantine
            log.exception("could not quarantine input %r", key)
            return
        self._record_history(from_state, target, sig, "quarantined", key)
        log.warning("quarantined input %r: it failed %d time(s) (%s)", key,
                    self.policy.policy.quarantine_after, cause)

    def _wake(self, ck: Checkpoint, wake: Wake) -> None:
        if self.ckpts.get(ck.n) is not ck:
            self._fall_back(wake, ck, "it vanished")
            return
        self._replay_when_known(ck, wake)
        wake.hold = bool(self.pending_signals) or self._in_terminal_foreground()
        while ck.spares:
            spare = ck.spares.pop(0)
            # The replacement is asked for first: once the spare is awake it may take this CPU
            # from us for milliseconds, and a crash loop waits for that copy. The keeper is at
            # SCHED_IDLE then, so that its wake-up cannot take the CPU from us either (an urgent
            # keeper did, and on a busy machine the Wake went out 5 ms late); a crash loop raises
            # it only once the spare is awake.
            self._replenish(ck)
            if self._send(spare, wake):
                self._went_live(spare, wake)
                if ck.forking and ck.looping_until > time.monotonic():
                    self._keeper_urgent(ck, True)
                return
            self._retire(spare)
        ck.pending = wake
        # A restore that waits for a copy is a crash loop, or the start of one: while it lasts,
        # the keeper forks at normal priority (not behind the restored process at SCHED_IDLE).
        # It keeps no copy beyond the spares asked for: that bound (invariant 12) holds here too.
        ck.looping_until = time.monotonic() + _LOOP_WINDOW
        if ck.awaiting:      # the keeper will be asked to fork as soon as it introduces itself
            self.loop.after(_AWAIT_KEEPER, lambda: self._check_pending(ck, wake))
            return
        if ck.keeper is None:
            self._discard(ck.n, "its processes are gone")   # falls back to another checkpoint
            return
        self._urge(ck)
        self.loop.after(_AWAIT_KEEPER, lambda: self._check_pending(ck, wake))

    def _replay_when_known(self, ck: Checkpoint, wake: Wake, keeper: Proc | None = None) -> None:
        """Decide what a failure's restore into ``ck`` replays (``_replay``) once a process of
        ``ck`` is there to say what the program does with each signal. Decided at the failure, a
        checkpoint whose keeper had not introduced itself yet (a busy machine) answered "unknown"
        for every signal, and none was handled again."""
        if ck.replay_due and (keeper or ck.keeper or ck.spares):
            ck.replay_due = False
            wake.replay |= self._replay(ck, keeper)

    def _went_live(self, proc: Proc, wake: Wake) -> None:
        proc.role, proc.lived, proc.held = Role.LIVE, True, wake.hold
        self.live, self.live_up = proc, False
        self.restoring = False

    def _urge(self, ck: Checkpoint) -> None:
        """Ask a keeper for a copy that a restore is waiting for, at normal priority.

        Keepers fork in the background under SCHED_IDLE; on a machine whose CPUs are busy that
        work barely runs, and here the program itself waits for it. The shepherd lowers the keeper
        again once the copy is in (``_on_spare``). A copy already on its way serves the restore: no second one
        is asked for.
        """
        keeper = ck.keeper
        if keeper is None:
            return
        self._keeper_urgent(ck, True)
        if not ck.forking and not self.throttled:     # else asked again when the throttle lifts
            keeper.may_fork = True
            if self._send(keeper, _channel.Fork()):
                ck.forking += 1

    def _wake_keeper(self, ck: Checkpoint) -> None:
        """No spare can be forked for a restore: the keeper itself becomes the live process.

        The checkpoint is used up by this (there is nothing left to copy it from), which is still
        better than ending a program that has it.
        """
        wake, ck.pending = ck.pending, None
        keeper = ck.keeper
        if wake is None or keeper is None:
            return
        self.ckpts.pop(ck.n, None)
        ck.keeper = None
        self._replay_when_known(ck, wake, keeper)
        for spare in ck.spares:
            self._retire(spare)
        wake.hold = bool(self.pending_signals) or self._in_terminal_foreground()
        if not self._send(keeper, wake):
            self._retire(keeper)
            self._fall_back(wake, ck, "its keeper is gone")
            return
        log.warning("checkpoint %d restored from its keeper itself: no copy could be forked; "
                    "the checkpoint is used up", ck.n)
        self._went_live(keeper, wake)
        self.loop.after(0.0, self._answer_list)

    def _check_pending(self, ck: Checkpoint, wake: Wake) -> None:
        """A restore still waits for this checkpoint's keeper: it never introduced itself, or it
        forks nothing (stopped, starved). Restore another checkpoint rather than wait forever."""
        if ck.pending is not wake or self.ckpts.get(ck.n) is not ck:
            return
        if not self._alternative(ck.n):     # nothing else to go to: it is still the best hope
            log.warning("a restore has waited %gs for checkpoint %d; still waiting", _AWAIT_KEEPER, ck.n)
            self.loop.after(_AWAIT_KEEPER, lambda: self._check_pending(ck, wake))
            return
        ck.pending = None
        if ck.awaiting:
            self._discard(ck.n, f"its keeper never introduced itself within {_AWAIT_KEEPER:g}s")
        self._fall_back(wake, ck, f"no copy of it came within {_AWAIT_KEEPER:g}s")

    def _fall_back(self, wake: Wake, lost_ck: Checkpoint, why: str) -> None:
        """A restore to checkpoint ``lost_ck`` cannot happen: restore the best other one, or end
        as the failure would have ended the program if none is left. A failure's restore replays
        there what reached the program since that one was taken (``_replay``); what the lost one
        had queued already stays queued."""
        lost = lost_ck.n
        alt = self._alternative(lost)
        if not alt:
            log.error("checkpoint %d was lost (%s) while a restore to it was pending, and no other "
                      "checkpoint is left: ending", lost, why)
            self._give_up(wake)
        log.warning("checkpoint %d was lost (%s) while a restore to it was pending: restoring "
                    "checkpoint %d instead", lost, why, alt)
        self.current = alt
        self._record_history(wake.from_state, alt, wake.sig, f"fell back from {lost}", None)
        ck = self.ckpts[alt]
        ck.after_failure = lost_ck.after_failure
        ck.replay_due = bool(ck.delivered) and ck.after_failure
        self._wake(ck, Wake(alt, wake.from_state, wake.sig, wake.reason, wake.attempt, wake.t,
                            replay=wake.replay))

    def _give_up(self, wake: Wake) -> NoReturn:
        """A restore that was decided cannot happen: end as the failure would have ended it."""
        if wake.sig:
            self.shutdown(sig=wake.sig)
        self.shutdown(code=os.EX_SOFTWARE)

    def _keeper_urgent(self, ck: Checkpoint, urgent: bool) -> None:
        """Run the keeper's forks at normal priority (restores wait for them) or at SCHED_IDLE.

        The shepherd sets it, not the keeper: a keeper that lowered itself after each fork would fork
        the next copy of a crash loop at idle priority, behind the restored process on its CPU.
        """
        if not self.can_raise or ck.keeper is None or ck.keeper_urgent == urgent:
            return
        try:
            os.sched_setscheduler(ck.keeper.pid, os.SCHED_OTHER if urgent else os.SCHED_IDLE, _PARAM)
        except OSError:
            return
        ck.keeper_urgent = urgent

    def _replenish(self, ck: Checkpoint) -> None:
        """Ask the keeper for the spares the checkpoint is short of (none while a fork is out)."""
        if self.ckpts.get(ck.n) is not ck or ck.keeper is None or ck.awaiting or self.throttled:
            return
        if len(ck.spares) + ck.forking < ck.want_spares:
            ck.keeper.may_fork = True
            if self._send(ck.keeper, _channel.Fork()):
                ck.forking += 1
