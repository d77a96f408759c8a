"""The shepherd's part that passes signals on to the program, exactly once.

Every signal sent to the program's PID reaches the shepherd (the face), which reads them from a
signalfd with their sender and passes each one on to the live process, or keeps it for the process
being restored. Signals that went to the whole process group (the witness has them too,
``_witness``) or that a terminal sent to its foreground group reached the live process already and
are not passed on again. A rollback undoes what their handlers did, so after a failure those that
reached the program since the checkpoint are handled again (``_replay``). The shepherd also
mirrors the live process's job-control stops on the face, which is what the shell waits on.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from . import _channel, _procfs, _sigutil
from ._faultreport import FaultReports
from ._loop import EventLoop
from ._registry import Checkpoint, Proc, Role
from ._sigutil import CARRIED, REPORTED_SIGNALS, STOP_SIGNALS, TTY_SIGNALS, signame
from ._witness import Witness

log = logging.getLogger("forkpoint")

# Signals handled again after a rollback (see _replay): those from users and terminals, but not the
# job-control stops, whose handlers (curses) redraw a terminal rather than change the program.
REPLAYED = CARRIED - STOP_SIGNALS
_OUTSIDE_WINDOW = 1.0         # a fault signal this recent from outside is no crash of the program
_SNAP_HEAD = _channel.encode_snap(0, False, 0, None, 0.0)[:len('{"op":"snap"')]


class SignalRouting:
    """The ``Shepherd``'s signal methods (a part of it: the parts share one object)."""

    if TYPE_CHECKING:   # what this part uses of the rest of the shepherd (``Shepherd.__init__``, ``run``)
        loop: EventLoop
        me: int
        pgid: int
        ckpts: dict[int, Checkpoint]
        current: int
        live: Proc | None
        live_up: bool
        ending: bool
        backoff: Callable[[], None] | None
        reports: FaultReports | None
        witness: Witness | None
        sfd: int
        session_leader: bool
        tty_fd: int | None
        has_tty: bool
        need_reap: bool
        pending_signals: list[tuple[int, bool]]
        unread: list[tuple[int, set[int], frozenset[int] | set[int]]]
        forwarded_fatal: dict[int, float]

        def _on_message(self, proc: Proc) -> None: ...
        def _reap(self) -> None: ...
        def shutdown(self, code: int = 0, sig: int = 0) -> NoReturn: ...

    def _on_signals(self) -> None:
        self._read_signals(reap=True)

    def _reap_later(self) -> None:
        if self.need_reap:
            self.need_reap = False
            self._reap()
            self._mirror_stop()

    def _read_signals(self, retiring: Proc | None = None, reap: bool = False) -> None:
        """Read the shepherd's signals and pass each one on to the program exactly once.

        Called first in every turn of the loop and again just before a live process is retired
        (``retiring``: it was live when these came; what is not its own copy is kept for its
        successor). A terminal's signal is judged at once, by who was in the terminal's group
        when it came; with ``reap``, deaths read with the signals are handled next (the reaper
        may also read what a dead process said last, a restored process's Up among it), and the
        other signals are passed on after that, so that nothing is sent to a process that is
        already dead.
        """
        if self.ending:
            return
        got = _sigutil.read_signalfd(self.sfd)
        if any(sig in REPLAYED for sig, _, _ in got):
            self._take_snaps(retiring or self.live)
        live = retiring or (self.live if self.live_up else None)
        rest = []
        for sig, code, sender in got:
            if sig == signal.SIGCHLD:
                if not reap and not self.need_reap:
                    self.need_reap = True    # the signalfd no longer says so: reap on the next turn
                    self.loop.after(0.0, self._reap_later)
            elif code != _sigutil.SI_KERNEL or sig == signal.SIGCONT:
                rest.append((sig, sender))
            elif sig == signal.SIGHUP and self.session_leader:
                self._deliver(sig, False, live, retiring)   # a hangup reaches the session leader alone
            elif sig in TTY_SIGNALS and live is None and not self._restored_has(sig, tty=True):
                self._deliver(sig, True, None)    # no live process was in the terminal's group
            elif sig in TTY_SIGNALS:
                self._delivered(sig)              # the live (or restored) process has its own copy
            # else: typed at the terminal (the live process has it too), or about the shepherd
            # itself (SIGXCPU, SIGXFSZ)
        if reap and any(sig == signal.SIGCHLD for sig, _, _ in got):
            self.need_reap = False
            self._reap()
            self._mirror_stop()
            live = retiring or (self.live if self.live_up else None)
        group = self._sent_to_group(got, live)
        for sig, sender in rest:
            bit = 1 << (sig - 1)
            if sig == signal.SIGCONT:
                self._continue_live()     # whoever sent it (a hangup sends it too)
            elif sender == self.me or (self.live is not None and sender == self.live.pid):
                continue    # our own (SIGPIPE of a closed channel), or the program's signal to its group
            elif group & bit:
                group &= ~bit   # sent to the program's whole group: the live process got its own copy
                self._delivered(sig)
            elif sig < signal.SIGRTMIN and self._has_pending(live or self.live, sig):
                self._delivered(sig)    # the same, judged without the witness: its copy is pending
            else:
                self._deliver(sig, False, live, retiring)

    def _take_snaps(self, proc: Proc | None) -> None:
        """Register the checkpoints ``proc`` announced before the signals just read were judged.

        The live process announces a checkpoint before its fork; a signal passed on now reaches
        it after that, so a rollback to that checkpoint must have it handled again (``_replay``).
        The signalfd is read first in every turn of the loop: on a busy machine, where the
        shepherd ran only after both had come, a SIGTERM handled after the checkpoint counted as
        handled before it, and was lost with the step that crashed. Only ``Snap`` messages are
        taken here, in order; anything after the first other message waits for its turn.
        """
        while proc is not None and proc.chan is not None and proc.role is not Role.DYING:
            try:
                head = proc.chan.recv(len(_SNAP_HEAD), socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:
                return
            if head != _SNAP_HEAD:
                return
            self._on_message(proc)

    def _sent_to_group(self, got: list[tuple[int, int, int]], live: Proc | None) -> int:
        """The signals of this batch that went to the program's whole process group, as a mask:
        those the witness has pending (``_witness``), if ``live`` is in that group (it then got
        its own copy; mid-restore, with no live process, the restored one did not). The witness
        drops them, and only them, before it answers; until it has, a copy it has of the same
        signal may be this one's, and that signal alone is judged without it (``unsure``)."""
        witness = self.witness
        batch = 0
        for sig, _, _ in got:
            if sig != signal.SIGCHLD:
                batch |= 1 << (sig - 1)
        if witness is None or not batch:
            return 0
        unsure = witness.unsure()     # (answers first: a drop answered now was done before this read)
        mask = witness.pending() & batch
        if mask:
            witness.drain(mask)
        if not mask or live is None:
            return 0
        stat = _procfs.read_stat(live.pid)
        in_group = stat is not None and len(stat) > 2 and stat[2] == str(self.pgid)
        return mask & ~unsure if in_group else 0

    def _restored_has(self, sig: int, tty: bool) -> bool:
        """Whether the spare being woken (not up yet) got this terminal signal itself.

        It got it if it had rejoined the terminal's process group when the signal came: it keeps
        every signal blocked until the shepherd has read its own signals after its Up (Wake.hold,
        set whenever the program is a terminal's foreground job), so it still has it pending. A
        signal it does not have came before it rejoined, and only the shepherd can pass it on.
        (Unblocked and not pending happens only without the hold, when no terminal signals the
        group: it is taken as handled.)
        """
        waking = self.live
        if waking is None or self.live_up:
            return False
        state = _procfs.signal_state(waking.pid)
        if state is None:
            return False
        pgrp, pending, blocked = state
        bit = 1 << (sig - 1)
        if pgrp != self.pgid:
            return False
        return bool(pending & bit) or not blocked & bit

    def _has_pending(self, proc: Proc | None, sig: int) -> bool:
        """Whether ``proc`` has ``sig`` pending: sent to the whole group, it has its own copy."""
        if proc is None:
            return False
        state = _procfs.signal_state(proc.pid)
        return state is not None and bool(state[1] & 1 << (sig - 1))

    def _deliver(self, sig: int, tty: bool, live: Proc | None, retiring: Proc | None = None) -> None:
        if retiring is not None:      # it will not handle it (crashing, or about to be killed)
            self.pending_signals.append((sig, False))
            return
        if live is not None:
            if self._crash_reported():
                # It is crashing (faulthandler wrote a report this turn): it would never handle
                # this. Judged again once the report is read and the crash handled.
                self.loop.after(0.0, lambda: self._deliver(sig, tty, self.live if self.live_up else None))
                return
            self._forward(sig, live)
            return
        # Mid-restore: what the program does with this signal is in the checkpoint being restored.
        action = self._disposition(sig)
        if action == "ignore" or self._init_drops(sig, action=action):
            return
        if action == "terminate":
            log.warning("%s arrived while the program was being restored and it does not handle it: "
                        "ending", signame(sig))
            self.shutdown(sig=sig)
        self.pending_signals.append((sig, tty))
        if self.backoff is not None:       # the program must see it now, not after the backoff
            log.info("%s cuts the backoff short", signame(sig))
            self.loop.after(0.0, self.backoff)

    def _forward(self, sig: int, live: Proc | None = None) -> None:
        live = live or (self.live if self.live_up else None)
        if live is not None and self._init_drops(sig, live):
            return
        if sig in REPORTED_SIGNALS:     # sent from outside: a command to the program, not a crash
            self.forwarded_fatal[sig] = time.monotonic()
        if live is not None:
            try:
                os.kill(live.pid, sig)
                live.forwarded.add(sig)
                self._delivered(sig)
            except ProcessLookupError:
                self.pending_signals.append((sig, False))
        else:
            self.pending_signals.append((sig, False))

    def _init_drops(self, sig: int, proc: Proc | None = None, action: str = "") -> bool:
        """Whether ``sig`` is dropped, as the kernel drops it, because the face is a PID
        namespace's init (a container's PID 1 without an init of its own) and the program does
        not handle it: ``proc`` (the live process) or, mid-restore, the checkpoint being
        restored, whose ``action`` for it the caller has read.

        The kernel never delivers to init a signal whose action is the default (SIGKILL and
        SIGSTOP from an ancestor namespace excepted, and those never reach the signalfd); the
        shepherd blocks every signal, so they reach it all. Passed on, one killed (or stopped)
        the live process, which is not init, and so the program; mid-restore it ended the
        program. Handled or ignored ones go on as before. A fault signal that forkpoint's own
        faulthandler catches (``recover_on``) counts as handled: the program's own Python
        handler cannot be read from here. A signal the live process blocks is queued for init
        too, whatever its action (a program that waits for SIGTERM with ``sigwait()`` or a
        signalfd gets it), so it is passed on; inside ``sigwait()`` the kernel unblocks the
        awaited signals for the wait, which ``/proc`` shows, so that system call counts as
        blocking them. This also passes one that arrives while forkpoint blocks every signal for
        a moment in the live process (``tsetjmp()``); mid-restore, where the program's mask is not
        known, the checkpoint's action alone decides. (Only read when the face is init.)
        """
        if self.me != 1:
            return False
        if proc is not None:
            masks = _procfs.status_masks(proc.pid, "SigBlk", "SigIgn", "SigCgt")
            if masks is None:
                action = "unknown"
            elif masks["SigBlk"] & (1 << (sig - 1)) or _procfs.waits_for_signals(proc.pid):
                return False
            else:
                action = _sigutil.disposition(sig, masks["SigIgn"], masks["SigCgt"])
        if action in ("terminate", "stop"):
            log.debug("%s dropped: the program is init of its PID namespace and does not handle it",
                      signame(sig))
            return True
        return False

    def _delivered(self, sig: int) -> None:
        """``sig`` reached the live process: a rollback to any checkpoint there is now must have
        it handled again."""
        if sig in REPLAYED:
            for ck in self.ckpts.values():
                ck.delivered.add(sig)

    def _replay(self, ck: Checkpoint, keeper: Proc | None = None) -> int:
        """Queue for the process restored into ``ck`` the signals that reached the program after
        ``ck`` was taken and that it handles there.

        Their handlers ran in processes whose work the rollback undoes: uvicorn's SIGTERM handler
        had set ``should_exit``, asyncio.run's Ctrl-C handler had cancelled the main task, and a
        request that then crashed (or hung until its timeout) took that with it: the server kept
        serving, the program ran on. Handled again, they do what they did once. (Signals still
        pending in the process that failed are carried over anyway; these are not counted twice.)
        A signal whose handler only had effects outside memory (a log line) has them twice.
        Returns them as a mask: the restored asyncio loop drops their bytes from its self-pipe,
        where the failed process's C handler may have left them unread (``_eventloop``).

        Only after a failure (a crash, a timeout, an exception rolled back, an operator's
        restore), not after a plain ``tlongjmp()``: a program that jumps back as its own control
        flow handled its signals as it went, and a Ctrl-C it caught once would otherwise be
        raised again at every later jump to an older checkpoint.
        """
        queued = {s for s, _ in self.pending_signals}
        mask = 0
        for sig in sorted(ck.delivered - queued):
            if self._disposition(sig, keeper) == "catch":
                self.pending_signals.append((sig, False))
                mask |= 1 << (sig - 1)
        return mask

    def _child_exited(self) -> None:
        """One of the program's children that the shepherd holds (started before ``start()``, or
        by a live process that a restore killed) exited: the kernel told the shepherd, its parent
        now, so the program would never hear of it. Its SIGCHLD goes to the live process (after
        the Up of one being restored), whose handler or asyncio child watcher then finds the
        status through ``os.waitpid`` (``_children``)."""
        live = self.live if self.live_up else None
        if live is None:
            self.pending_signals.append((signal.SIGCHLD, False))
            return
        try:
            os.kill(live.pid, signal.SIGCHLD)
        except ProcessLookupError:
            self.pending_signals.append((signal.SIGCHLD, False))

    def _crash_reported(self) -> bool:
        fd = self.reports.fd if self.reports is not None else None
        if fd is None:
            return False
        p = select.poll()
        p.register(fd, select.POLLIN)
        return bool(p.poll(0))

    def _disposition(self, sig: int, keeper: Proc | None = None) -> str:
        """What the checkpoint being restored does with ``sig`` ("unknown" if no process of it is
        there to ask): its frozen processes have the program's handlers, only blocked. (``keeper``:
        one already taken out of the registry to be woken itself.)"""
        ck = self.ckpts.get(self.current)
        proc = (ck.keeper or (ck.spares[0] if ck.spares else None)) if ck is not None else None
        proc = proc or keeper
        masks = _procfs.signal_dispositions(proc.pid) if proc is not None else None
        return _sigutil.disposition(sig, *masks) if masks is not None else "unknown"

    def _mirror_stop(self) -> None:
        """The live process stopped for job control (Ctrl-Z, SIGTTIN): stop the face PID too, which
        is what the shell waits on, with the same signal; it continues when the job does."""
        live = self.live
        if live is None:
            return
        try:
            info = os.waitid(os.P_PID, live.pid, os.WSTOPPED | os.WNOHANG)
        except ChildProcessError:
            return
        if info is None or info.si_code != os.CLD_STOPPED or info.si_status not in STOP_SIGNALS:
            return
        sig = info.si_status
        # Sent while still blocked, then unblocked: the face stops once. SIGTTIN, SIGTTOU and a
        # terminal's SIGTSTP go to the whole group, and the face's own copy may still be pending,
        # unread, when the live process's stop is reaped (a SIGCHLD read just before, such as a
        # killed process's after a restore): unblocking first stopped the face on that copy, and
        # the kill then stopped it again once the job was continued, so `fg` stopped at once.
        os.kill(self.me, sig)
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})   # stops here, until the job is continued
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
        self._continue_live()

    def _continue_live(self) -> None:
        """SIGCONT reached the face: continue the live process if it is still stopped."""
        live = self.live
        if live is not None and _procfs.state(live.pid) == "T":
            try:
                os.kill(live.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _sent_from_outside(self, sig: int) -> bool:
        """Whether ``sig`` was forwarded to the live process a moment ago (kill -ABRT PID)."""
        return time.monotonic() - self.forwarded_fatal.get(sig, float("-inf")) < _OUTSIDE_WINDOW

    def _in_terminal_foreground(self) -> bool:
        """Whether the program is the foreground job of a terminal, which may signal its group."""
        if self.tty_fd is not None:
            try:
                return os.tcgetpgrp(self.tty_fd) == self.pgid
            except OSError:
                return False
        if not self.has_tty:        # no controlling terminal at start, so none now (a restore's
            return False            # path: reading /proc/self/stat took 0.1 ms)
        return _procfs.terminal_foreground() == self.pgid

    def _carry_late_signals(self) -> None:
        """Signals that reached a retired tlongjmp() caller after it asked go to its successor.

        Runs in the same turn of the loop as the kill, so before the reap (reaping happens only in
        the SIGCHLD callback): the killed process still holds them. They are passed on after the
        restored process's Up, without ``Wake.hold`` (decided before they were known).
        """
        unread, self.unread = self.unread, []
        for pid, seen, carried in unread:
            late = [s for s in _procfs.pending_signals(pid) if s in carried and s not in seen]
            self.pending_signals.extend((s, False) for s in late)
