"""The shepherd: the program's original process, which plays the kernel's part.

On first use the original process forks the live program and then execs this small module in
place of itself. ``exec`` keeps its PID, its parent and its children, but drops the application's
heap, which a forked shepherd would otherwise pin for the program's whole life. It then:

* reaps every process of the program (all are its direct children, see ``_clone``) and learns
  from ``waitpid`` how the live process ended;
* holds the registry of checkpoints and carries out restores: it kills the failing live process
  (after moving it to SCHED_IDLE, so the teardown of its heap does not compete with the restored
  process) and wakes a spare of the checkpoint;
* forwards signals sent to the program's PID to the live process, exactly once;
* exits with the live program's exit status, or dies by the same signal, after killing every
  snapshot.

A restore, from the request to the woken spare, reads top to bottom in "restores" below:
``_on_restore`` (or ``_on_fault``, ``_on_live_death``) -> ``_failure`` -> ``_wake``.
"""
from __future__ import annotations

import enum
import functools
import json
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import _budget, _channel, _prctl, _procfs, _sigutil
from ._channel import (
    ChildQuery,
    Configure,
    Discard,
    ErrorKind,
    Hello,
    ListCheckpoints,
    Message,
    Restore,
    SetPolicy,
    Snap,
    Spare,
    Up,
    Wake,
)
from ._control import ControlServer
from ._faultreport import FaultReports
from ._loop import EventLoop
from ._orphans import Orphans
from ._sigutil import FORWARDED, REPORTED_SIGNALS, TTY_SIGNALS, signame
from .arena import Arena, HistoryRecord, add_quarantine, load_quarantine
from .policy import Action, Decision, Policy, RecoveryPolicy

log = logging.getLogger("forkpoint")

EX_SOFTWARE = 70
_ENV = "FORKPOINT_SHEPHERD_ARGS"
_BOOT = "import sys;sys.path.insert(0,sys.argv[1]);from forkpoint._shepherd import main;main()"
_REPORT_BACKSTOP = 1.0        # a crash report nothing claimed is written out after this long
_OUTSIDE_WINDOW = 1.0         # a fault signal this recent from outside is no crash of the program
_PARAM = os.sched_param(0)    # the only priority SCHED_IDLE and SCHED_OTHER take
_LOOP_WINDOW = 2.0            # seconds a checkpoint keeps an extra spare after a restore waited for one


class Role(enum.Enum):
    LIVE = "live"             # runs program code; at most one
    KEEPER = "keeper"         # checkpoint n itself; forks spares
    SPARE = "spare"           # a ready copy of a keeper; a restore wakes it
    DYING = "dying"           # killed, or its work is over; only a keeper's hello may still come


@dataclass
class Proc:
    pid: int
    role: Role
    n: int
    chan: socket.socket | None
    lived: bool = False           # has run program code: its channel carries keepers' hellos


@dataclass
class Checkpoint:
    n: int
    keeper: Proc | None
    pinned: bool
    taken: float = field(default_factory=time.time)
    spares: list[Proc] = field(default_factory=list)
    pending: Wake | None = None   # a restore waiting for a spare of this checkpoint
    want_spares: int = 1
    forking: int = 0              # copies the keeper was asked for (or owes from birth), not yet here
    looping_until: float = 0.0    # a restore had to wait for a copy: one more is kept until then
    keeper_urgent: bool = False   # the keeper was raised from SCHED_IDLE for copies a restore needs
    awaiting: bool = False        # the keeper has not introduced itself yet
    announcer: Proc | None = None  # the live process that took it: its keeper says hello on its channel


def become_shepherd(chan: socket.socket, arena: Arena, live_pid: int, pgid: int, config: Any,
                    faults: int) -> NoReturn:
    """Turn the original process into the shepherd."""
    args = {"chan": chan.fileno(), "arena_fd": arena.fd, "arena_size": arena.size, "faults": faults,
            "live": live_pid, "pgid": pgid, "max_checkpoints": config.max_checkpoints,
            "max_snapshot_memory": config.max_snapshot_memory,
            "level": logging.getLogger("forkpoint").getEffectiveLevel()}
    try:
        if config.shepherd_exec and sys.executable:
            os.set_inheritable(chan.fileno(), True)
            os.set_inheritable(arena.fd, True)
            os.set_inheritable(faults, True)
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = dict(os.environ, **{_ENV: json.dumps(args)})
            for which in _sigutil.ITIMERS:
                signal.setitimer(which, 0)   # exec keeps timers; the live process has its own copy
            argv = [sys.executable, "-I", "-S", "-c", _BOOT, root, "fp-shepherd", *sys.orig_argv]
            try:
                os.execve(sys.executable, argv, env)
            except OSError as e:
                log.warning("could not exec the shepherd (%s); it runs in the original process", e)
        Shepherd(chan, arena, args).run()
    except BaseException:
        log.exception("the shepherd failed; the program ends")
        raise
    finally:
        os._exit(EX_SOFTWARE)


def main() -> NoReturn:
    """Entry point after the exec."""
    args = json.loads(os.environ.pop(_ENV))
    # The shepherd has no application logging configuration: its warnings go to stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"forkpoint[{os.getpid()}]: %(message)s"))
    logger = logging.getLogger("forkpoint")
    logger.addHandler(handler)
    logger.setLevel(max(logging.WARNING, args["level"]) if args["level"] else logging.WARNING)
    chan = socket.socket(fileno=args["chan"])
    arena = Arena(args["arena_fd"], args["arena_size"], create=False)
    try:
        Shepherd(chan, arena, args).run()
    except BaseException:
        logger.exception("the shepherd failed; the program ends")
        raise
    finally:
        os._exit(EX_SOFTWARE)


class _ListWaiters:
    """Processes waiting for ``checkpoints()``: answered together once every keeper has its pid."""

    def __init__(self) -> None:
        self.waiting: list[Proc] = []
        self.batch = 0


class Shepherd:
    def __init__(self, chan: socket.socket, arena: Arena, args: dict[str, Any]) -> None:
        self.arena = arena
        self.pgid = args["pgid"]
        self.max_checkpoints = args["max_checkpoints"]
        self.max_memory = args.get("max_snapshot_memory")
        self.loop = EventLoop()
        self.loop.on_error = self._after_internal_error
        self.procs: dict[int, Proc] = {}
        self.ckpts: dict[int, Checkpoint] = {}
        self.policy = RecoveryPolicy()
        self.current = 0
        self.started = time.time()
        self.recoveries = 0
        self.restoring = False                  # a restore was decided and no spare woken yet
        self.unidle = _procfs.can_leave_sched_idle()   # keepers may go back to normal priority
        self.pending_signals: list[int] = []
        self.forwarded_fatal: dict[int, float] = {}   # fault signal -> when one was forwarded
        self._unread: list[int] = []            # retired live processes whose pending signals wait
        self.live: Proc | None = self._add(args["live"], Role.LIVE, 0, chan)
        self.live_up = True
        self.control: ControlServer | None = None
        self.reaped_unknown: list[tuple[int, float]] = []   # recently reaped pids we did not know
        self.lists = _ListWaiters()
        self.orphans = Orphans(arena)
        self.retired_live: set[int] = set()     # live processes killed since the last orphan scan
        self.scan_pending = False
        self.parent_fd: int | None = None       # a pidfd of the face's parent
        faults = args.get("faults")
        self.reports = FaultReports(faults) if faults is not None else None
        self._handlers: dict[type[Message], Callable[[Proc, Any, list[int]], None]] = {
            Snap: self._on_snap, Hello: self._on_hello, Spare: self._on_spare, Up: self._on_up,
            Restore: self._on_restore, Discard: self._on_discard, ListCheckpoints: self._on_list,
            SetPolicy: self._on_policy, Configure: self._on_configure, ChildQuery: self._on_child}

    # -- what the control server sees (``_control.Controlled``) ---------------------------------------
    @property
    def live_pid(self) -> int | None:
        return self.live.pid if self.live is not None else None

    def checkpoint_ids(self) -> list[int]:
        return sorted(self.ckpts)

    def history(self) -> list[HistoryRecord]:
        return self.arena.history()

    def quarantined(self) -> list[str]:
        return load_quarantine(self.arena)

    def nosuch(self, n: int) -> str:
        have = ", ".join(map(str, sorted(self.ckpts))) or "none"
        return f"no checkpoint {n} (live checkpoints: {have})"

    def restore_by_operator(self, n: int, reason: str) -> None:
        if self.live is not None:
            live, self.live = self.live, None
            self._retire(live)
        self._failure(n, 0, f"operator: {reason}"[:64], None, operator=True)

    def discard_by_operator(self, n: int, why: str) -> None:
        self._discard(n, why)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        now = time.time()
        for n in sorted(self.ckpts):
            ck = self.ckpts[n]
            uss, pss = self._memory(ck)
            out.append({"id": n, "pid": ck.keeper.pid if ck.keeper else 0, "age": now - ck.taken,
                        "pinned": ck.pinned, "spares": [p.pid for p in ck.spares], "uss": uss, "pss": pss})
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def _add(self, pid: int, role: Role, n: int, chan: socket.socket | None) -> Proc:
        """Track a process; a keeper is added with pid 0 until it introduces itself."""
        proc = Proc(pid, role, n, chan, lived=(role is Role.LIVE))
        if pid:
            self.procs[pid] = proc
        if chan is not None:
            chan.setblocking(True)
            self.loop.add_reader(chan, functools.partial(self._on_message, proc))
        return proc

    def _close(self, proc: Proc) -> None:
        if proc.chan is not None:
            self.loop.remove(proc.chan)
            proc.chan.close()
            proc.chan = None

    def _retire(self, proc: Proc) -> None:
        """Kill a process whose work is over, its teardown kept out of the live process's way.

        The kill comes before the channel is closed: a process blocked on its channel (a live
        process inside tlongjmp) must never see EOF while it can still run, or it would raise into
        program code next to the restored process. Signals pending in a process that ran program
        code are read later, by ``_pass_on_pending`` (see there).
        """
        proc.role = Role.DYING
        if proc.pid <= 0:     # a keeper that has not introduced itself: EOF on its channel ends it
            self._close(proc)
            return
        if proc.lived:
            self._unread.append(proc.pid)
            self._orphans_of(proc.pid)
        try:
            os.sched_setscheduler(proc.pid, os.SCHED_IDLE, _PARAM)
        except OSError:
            pass
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not proc.lived:   # a live process's keepers may still introduce themselves on its channel
            self._close(proc)

    def _pass_on_pending(self) -> None:
        """Signals forwarded to a retired live process but still blocked there go to its successor.

        Read from /proc after the kill, off the restore path (the caller runs this once the spare
        is woken): a killed process keeps its pending signals until it is reaped, and drops any
        signal sent after the SIGKILL, so the set read now is the one it had when it was killed.
        Nothing is reaped before this runs: reaping happens only in the loop's SIGCHLD callback.
        """
        pids, self._unread = self._unread, []
        for pid in pids:
            self.pending_signals.extend(s for s in _procfs.pending_signals(pid) if s in FORWARDED)

    def _send(self, proc: Proc, msg: Message) -> bool:
        if proc.chan is None:
            return False
        try:
            _channel.send(proc.chan, msg)
            return True
        except OSError:
            return False

    def _close_fds(self, fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> NoReturn:
        _prctl.set_child_subreaper(True)
        _prctl.set_name("fp-shepherd")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:                 # two channels per checkpoint, and the operator's clients
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        for which in _sigutil.ITIMERS:
            signal.setitimer(which, 0)   # exec kept the program's timers; the live process has them
        watched = FORWARDED | {signal.SIGCHLD}
        _sigutil.block_all()
        self.sfd = _sigutil.open_signalfd(watched)
        for s in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(s, signal.SIG_DFL)     # stop and continue with the job, like the program
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        _sigutil.restore_mask(_sigutil.mask_of(watched))
        self.loop.add_reader(self.sfd, self._on_signals)
        if self.reports is not None:
            self.loop.add_reader(self.reports.fd, self._on_fault_report)
        try:
            self.control = ControlServer(self, self.loop)
        except Exception as e:  # noqa: BLE001 - the program runs without operator control
            log.warning("operator socket unavailable: %s", e)
        self.orphans.scan(set(), self.procs.__contains__)   # children the program started before us
        self._watch_parent()
        self._reap()   # the live process may have died before we watched SIGCHLD
        if self.max_memory:
            self.loop.after(_budget.INTERVAL, self._memory_tick)
        self.loop.run_forever()
        raise AssertionError("the shepherd's loop ended")  # pragma: no cover

    def _after_internal_error(self) -> None:
        """After a contained fault in the shepherd: go on only if the program still has a way on."""
        if self.live is None and not self.restoring:
            log.error("no live process and no restore under way after an internal error: ending")
            self.shutdown(code=EX_SOFTWARE)

    # -- signals, deaths and crash reports -------------------------------------------------------
    def _on_signals(self) -> None:
        reap = False
        for sig, code, _pid in _sigutil.read_signalfd(self.sfd):
            if sig == signal.SIGCHLD:
                reap = True
            elif code == _sigutil.SI_KERNEL and sig in TTY_SIGNALS and self.live is not None and self.live_up:
                continue  # typed at the terminal: the live process received it directly
            else:
                self._forward(sig)
        if reap:
            self._reap()

    def _forward(self, sig: int) -> None:
        if sig in REPORTED_SIGNALS:     # sent from outside: a command to the program, not a crash
            self.forwarded_fatal[sig] = time.monotonic()
        if self.live is not None and self.live_up:
            try:
                os.kill(self.live.pid, sig)
            except ProcessLookupError:
                self.pending_signals.append(sig)
        else:
            self.pending_signals.append(sig)

    def _sent_from_outside(self, sig: int) -> bool:
        """Whether ``sig`` was forwarded to the live process a moment ago (kill -ABRT PID)."""
        return time.monotonic() - self.forwarded_fatal.get(sig, float("-inf")) < _OUTSIDE_WINDOW

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

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, status)

    def _on_exit(self, pid: int, status: int) -> None:
        if self.live is not None and self.live.pid != pid:
            self._drain(self.live)    # a committed transaction may have discarded this process
        proc = self.procs.get(pid)
        if proc is None:
            log.debug("reaped adopted orphan %d", pid)
            self.orphans.reaped(pid, status)
            now = time.monotonic()
            self.reaped_unknown = [(p, t) for p, t in self.reaped_unknown if now - t < 10.0][-63:]
            self.reaped_unknown.append((pid, now))
            return
        self._drain(proc)     # what it said before dying (a checkpoint it took) comes first
        self.procs.pop(pid, None)
        if proc.role is Role.DYING:
            return
        if proc is not self.live:
            self._close(proc)
        # A live process's channel stays open until EOF: keepers it forked introduce themselves
        # on it, possibly after it died.
        if proc is self.live:
            self.live = None
            proc.role = Role.DYING    # only its keepers' hellos may still arrive on its channel
            self._orphans_of(pid)
            self._on_fault_report(act=False)   # its report, if any, is in the pipe by now
            self._on_live_death(status)
            return
        ck = self.ckpts.get(proc.n)
        if ck is None:
            return
        log.warning("checkpoint %d lost its %s process %d (status %d)", proc.n, proc.role.value, pid, status)
        if proc.role is Role.KEEPER:
            ck.keeper, ck.forking = None, 0
            if not ck.spares:
                self._discard(ck.n, "its processes died")
        elif proc in ck.spares:
            ck.spares.remove(proc)
            if ck.keeper is None and not ck.spares and not ck.awaiting:
                self._discard(ck.n, "its processes died")
            else:
                self._replenish(ck)

    # -- messages -------------------------------------------------------------------------------
    def _drain(self, proc: Proc) -> None:
        while proc.chan is not None and select.select([proc.chan], [], [], 0)[0]:
            self._on_message(proc)

    def _on_message(self, proc: Proc) -> None:
        try:
            msg, fds = _channel.recv(proc.chan) if proc.chan is not None else (None, [])
        except _channel.MalformedMessage as e:    # dropped, the channel kept
            log.error("dropped a malformed message from process %d: %s", proc.pid, e)
            return
        except OSError:
            msg, fds = None, []
        if msg is None:
            self._close(proc)
            self._close_fds(fds)
            if proc.lived:                  # no keeper can introduce itself on this channel now
                for ck in [c for c in self.ckpts.values() if c.awaiting and c.announcer is proc]:
                    self._discard(ck.n, "its keeper never introduced itself")
            return
        if proc.role is Role.DYING and not isinstance(msg, Hello):
            self._close_fds(fds)
            return
        handler = self._handlers.get(type(msg))
        if handler is None:
            self._close_fds(fds)
            self._send(proc, _channel.Error(ErrorKind.UNKNOWN, f"unexpected message {msg.OP.value!r}"))
            return
        try:
            handler(proc, msg, fds)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            self._close_fds(fds)
            log.error("could not handle %r from process %d: %r", msg.OP.value, proc.pid, e)

    def _on_snap(self, proc: Proc, msg: Snap, fds: list[int]) -> None:
        n = msg.n
        if n in self.ckpts:                 # ids are never reused: only a corrupted arena does this
            self._discard(n, "its id was taken again")
        self.ckpts[n] = Checkpoint(n, None, msg.pin, awaiting=True, announcer=proc, want_spares=msg.spares,
                                   forking=msg.spares)     # a keeper forks its first spares unasked
        self.current = n
        self._enforce_bounds()

    def _on_hello(self, proc: Proc, msg: Hello, fds: list[int]) -> None:
        """A keeper introduces itself, on the channel of the live process that forked it."""
        n, pid = msg.n, msg.pid
        if not fds:                                  # its channel was lost (EMFILE): it cannot serve
            os.kill(pid, signal.SIGKILL)
            self._discard(n, "its keeper's channel was lost")
            return
        keeper = self._add(pid, Role.KEEPER, n, socket.socket(fileno=fds[0]))
        ck = self.ckpts.get(n)
        died = [e for e in self.reaped_unknown if e[0] == pid]
        if died:                                     # it died before we read this
            self.reaped_unknown.remove(died[0])
            self.procs.pop(pid, None)
            self._close(keeper)
            self._discard(n, "its keeper died")
            return
        if ck is None or not ck.awaiting:
            self._retire(keeper)
            return
        ck.keeper, ck.awaiting = keeper, False
        if ck.pending is not None:
            self._urge(ck)
        self._answer_list()

    def _on_spare(self, proc: Proc, msg: Spare, fds: list[int]) -> None:
        ck = self.ckpts.get(msg.n)
        if ck is not None and ck.forking:
            ck.forking -= 1
        if ck is not None and (not ck.forking or ck.looping_until < time.monotonic()):
            self._keeper_urgent(ck, False)     # raised again after the wake that needs its next copy
        if not fds:
            os.kill(msg.pid, signal.SIGKILL)
            return
        spare = self._add(msg.pid, Role.SPARE, msg.n, socket.socket(fileno=fds[0]))
        if ck is None:
            self._retire(spare)
            return
        ck.spares.append(spare)
        if ck.pending is not None:
            wake, ck.pending = ck.pending, None
            self._wake(ck, wake)

    def _on_up(self, proc: Proc, msg: Up, fds: list[int]) -> None:
        if proc is self.live:
            self.live_up = True
            pending, self.pending_signals = self.pending_signals, []
            for sig in pending:
                self._forward(sig)

    def _on_discard(self, proc: Proc, msg: Discard, fds: list[int]) -> None:
        if msg.current is not None and proc is self.live:
            self.current = msg.current
        if msg.n not in self.ckpts:
            if not msg.quiet:
                self._send(proc, _channel.Error(ErrorKind.NOSUCH, self.nosuch(msg.n)))
            return
        self._discard(msg.n, "discarded by the program")
        if not msg.quiet:
            self._send(proc, _channel.Ok())

    def _on_list(self, proc: Proc, msg: ListCheckpoints, fds: list[int]) -> None:
        # Answered once every keeper has introduced itself, so that each entry has its pid.
        lists = self.lists
        lists.waiting.append(proc)
        if len(lists.waiting) == 1:     # a backstop for this batch of waiters only
            batch = lists.batch
            self.loop.after(1.0, lambda: self._answer_list(force=batch == lists.batch))
        self._answer_list()

    def _answer_list(self, force: bool = False) -> None:
        lists = self.lists
        if not lists.waiting or (not force and any(c.awaiting for c in self.ckpts.values())):
            return
        lists.batch += 1
        waiters, lists.waiting = lists.waiting, []
        listing = self.describe()
        for proc in waiters:
            self._send(proc, _channel.Ok({"checkpoints": listing}))

    def _on_policy(self, proc: Proc, msg: SetPolicy, fds: list[int]) -> None:
        try:
            if msg.merge:
                self.policy.policy = self.policy.policy.merged(msg.signals, msg.settings)
            else:
                self.policy.policy = Policy.build(msg.signals, msg.to, msg.settings)
        except (ValueError, TypeError) as e:
            self._send(proc, _channel.Error(ErrorKind.CONFIG, str(e)))
            return
        self._send(proc, _channel.Ok())

    def _on_configure(self, proc: Proc, msg: Configure, fds: list[int]) -> None:
        settings = msg.settings
        self.max_checkpoints = settings.get("max_checkpoints", self.max_checkpoints)
        if "max_snapshot_memory" in settings:
            first = not self.max_memory
            self.max_memory = settings["max_snapshot_memory"]
            if self.max_memory and first:
                self.loop.after(0.0, self._memory_tick)
        self._enforce_bounds()
        self._send(proc, _channel.Ok())

    def _on_child(self, proc: Proc, msg: ChildQuery, fds: list[int]) -> None:
        """The live process waits for a child the kernel says is not its own (see ``_children``)."""
        self._reap()
        group = os.getpgid(0)
        got = self.orphans.claim(msg.pid, group)
        if got is not None:
            self._send(proc, _channel.Ok({"pid": got[0], "status": got[1]}))
            return
        dying = {p.pid for p in self.procs.values() if p.lived and p.role is Role.DYING}
        running = [p for p in self.orphans.running(msg.pid, group, dying) if p not in self.procs]
        for pid in dying:        # the program waits for its teardown now: no longer idle work
            try:
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
            except OSError:
                pass
        pidfds = []
        for pid in running:
            try:
                pidfds.append(os.pidfd_open(pid))
            except OSError:
                pass
        try:
            if proc.chan is not None and running:
                _channel.send(proc.chan, _channel.Ok({"alive": len(running)}), tuple(pidfds))
            else:
                self._send(proc, _channel.Ok({}))
        except OSError:
            pass
        finally:
            self._close_fds(pidfds)

    def _orphans_of(self, live_pid: int) -> None:
        """A live process is gone or going: its children become the shepherd's (scanned soon)."""
        self.retired_live.add(live_pid)
        if not self.scan_pending:
            self.scan_pending = True
            self.loop.after(0.05, self._scan_orphans)    # off the restore's path; batched

    def _scan_orphans(self) -> None:
        self.scan_pending = False
        parents, self.retired_live = self.retired_live, set()
        self.orphans.scan(parents, self.procs.__contains__)

    def _watch_parent(self) -> None:
        """Keep the face's parent in the arena (``os.getppid()`` in the program) as it changes.

        A pidfd of the parent turns readable when the parent dies; the kernel has re-parented us
        by then. Checking ``getppid()`` again after opening the pidfd rules out a recycled PID.
        """
        if self.parent_fd is not None:
            self.loop.remove(self.parent_fd)
            os.close(self.parent_fd)
            self.parent_fd = None
        while True:
            ppid = os.getppid()
            try:
                fd = os.pidfd_open(ppid)
            except OSError:         # no pidfds (Linux < 5.3): the program sees the first parent
                self.arena.set_face_ppid(ppid)
                return
            if os.getppid() == ppid:
                break
            os.close(fd)
        self.arena.set_face_ppid(ppid)
        self.parent_fd = fd
        self.loop.add_reader(fd, self._watch_parent)

    # -- restores: a request, a crash report or a death, then _failure, then _wake ----------------
    def _on_restore(self, proc: Proc, msg: Restore, fds: list[int]) -> None:
        """``tlongjmp(n)``: the caller waits, signals blocked, until it is killed (or refused)."""
        if msg.n not in self.ckpts:
            self._send(proc, _channel.Error(ErrorKind.NOSUCH, self.nosuch(msg.n)))
            return
        self._failure(msg.n, msg.sig, msg.reason or "tlongjmp", proc)

    def _on_live_death(self, status: int) -> None:
        if os.WIFEXITED(status):
            self.shutdown(code=os.WEXITSTATUS(status))
        sig = os.WTERMSIG(status)
        pol = self.policy.policy
        armed = self.arena.watchdog()
        self.arena.set_watchdog(None)
        if sig == signal.SIGKILL and armed is not None and time.monotonic() >= armed[0] - 0.05:
            target = armed[1] or self.current
            if target in self.ckpts:      # the watchdog's kill timer: a hang the handler could not cut
                self._failure(target, signal.SIGALRM, "timeout (stuck in native code: killed)", None)
                return
        if sig in pol.signals and not self._sent_from_outside(sig):
            target = pol.to or self.current
            if target in self.ckpts:
                self._failure(target, sig, f"killed by {signame(sig)}", None)
                return
            log.error("live process died by %s and there is no checkpoint %sto restore: ending",
                      signame(sig), f"{target} " if target else "")
        self.shutdown(sig=sig)

    def _failure(self, target: int, sig: int, cause: str, requester: Proc | None,
                 operator: bool = False) -> None:
        """The live process failed (or asked to go back): decide, record, and restore or give up."""
        detected = time.monotonic()
        key = self.arena.processing()
        self.arena.set_processing(None)
        self.arena.set_watchdog(None)
        from_state = self.current
        if operator:
            decision = Decision(Action.RESTORE, target, 0.0, 1, cause, None)
        else:
            decision = self.policy.decide(target, sig, key, sorted(self.ckpts), time.time(), cause,
                                          budgeted=bool(sig))
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
            self.shutdown(code=EX_SOFTWARE)
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

        def restore() -> None:
            # recorded when it happens, so the restored process finds it in history()
            self._record_history(from_state, decision.target, sig, decision.reason, key)
            self._wake(ck, wake)

        if decision.delay > 0:
            self.loop.after(decision.delay, restore)
        else:
            restore()
        self._pass_on_pending()

    def _record_history(self, from_state: int, to_state: int, sig: int, reason: str,
                        key: str | None) -> None:
        """Append to the jump history; a damaged arena costs the record, never the restore."""
        try:
            self.arena.append_history(from_state, to_state, sig, reason[:64], key)
        except Exception:  # noqa: BLE001 - contained: the restore matters more than its record
            log.exception("could not record the restore to %d in the jump history", to_state)

    def _record_quarantine(self, key: str, from_state: int, target: int, sig: int, cause: str) -> None:
        try:
            add_quarantine(self.arena, key, self.policy.policy.quarantine_size)
        except Exception:  # noqa: BLE001 - contained: the restore matters more than the quarantine
            log.exception("could not quarantine input %r", key)
            return
        self._record_history(from_state, target, sig, "quarantined", key)
        log.warning("quarantined input %r: it failed %d time(s) (%s)", key,
                    self.policy.policy.quarantine_after, cause)

    def _wake(self, ck: Checkpoint, wake: Wake) -> None:
        if self.ckpts.get(ck.n) is not ck:
            log.error("checkpoint %d vanished before it could be restored: ending", ck.n)
            self._give_up(wake)
        while ck.spares:
            spare = ck.spares.pop(0)
            # The replacement is asked for first: once the spare is awake it may take this CPU
            # from us for milliseconds, and a crash loop waits for that copy. The keeper is at
            # SCHED_IDLE then, so that its wake-up cannot take the CPU from us either (an urgent
            # keeper did, and on a busy machine the Wake went out 5 ms late); a crash loop raises
            # it only once the spare is awake.
            self._replenish(ck)
            if self._send(spare, wake):
                spare.role, spare.lived = Role.LIVE, True
                self.live, self.live_up = spare, False
                self.restoring = False
                if ck.forking and ck.looping_until > time.monotonic():
                    self._keeper_urgent(ck, True)
                return
            self._retire(spare)
        ck.pending = wake
        # A restore that waits for a copy is a crash loop, or the start of one: while it lasts,
        # the keeper keeps one copy ahead, so that the next restore finds a spare that has had
        # the time to warm up instead of one still taking its first copy-on-write faults.
        ck.looping_until = time.monotonic() + _LOOP_WINDOW
        if ck.awaiting:      # the keeper will be asked to fork as soon as it introduces itself
            self.loop.after(5.0, lambda: self._check_awaiting(ck, wake))
            return
        if ck.keeper is None or not self._urge(ck):
            log.error("checkpoint %d cannot be restored: its keeper is gone", ck.n)
            self._give_up(wake)

    def _urge(self, ck: Checkpoint) -> bool:
        """Get a copy that a restore is waiting for from the keeper, at normal priority.

        Keepers fork in the background under SCHED_IDLE; on a machine whose CPUs are busy that
        work barely runs, and here the program itself waits for it. The keeper goes back to
        SCHED_IDLE after the fork. A copy already on its way serves the restore: no second one
        is asked for.
        """
        keeper = ck.keeper
        assert keeper is not None
        self._keeper_urgent(ck, True)
        if ck.forking:
            return True
        if not self._send(keeper, _channel.Fork()):
            return False
        ck.forking += 1
        return True

    def _check_awaiting(self, ck: Checkpoint, wake: Wake) -> None:
        if ck.pending is wake and (self.ckpts.get(ck.n) is not ck or ck.awaiting):
            log.error("checkpoint %d never got its keeper: ending", ck.n)
            self._give_up(wake)

    def _give_up(self, wake: Wake) -> NoReturn:
        """A restore that was decided cannot happen: end as the failure would have ended it."""
        if wake.sig:
            self.shutdown(sig=wake.sig)
        self.shutdown(code=EX_SOFTWARE)

    def _keeper_urgent(self, ck: Checkpoint, urgent: bool) -> None:
        """Run the keeper's forks at normal priority (restores wait for them) or at SCHED_IDLE.

        The shepherd sets it, not the keeper: a keeper that lowered itself after each fork would fork
        the next copy of a crash loop at idle priority, behind the restored process on its CPU.
        """
        if not self.unidle or ck.keeper is None or ck.keeper_urgent == urgent:
            return
        try:
            os.sched_setscheduler(ck.keeper.pid, os.SCHED_OTHER if urgent else os.SCHED_IDLE, _PARAM)
        except OSError:
            return
        ck.keeper_urgent = urgent

    def _replenish(self, ck: Checkpoint) -> None:
        """Ask the keeper for the copies still missing, counting those already on their way."""
        want = ck.want_spares + (ck.looping_until > time.monotonic())
        while ck.keeper is not None and len(ck.spares) + ck.forking < want:
            if not self._send(ck.keeper, _channel.Fork()):
                return
            ck.forking += 1

    # -- registry -------------------------------------------------------------------------------
    def _discard(self, n: int, why: str) -> None:
        ck = self.ckpts.pop(n, None)
        if ck is None:
            return
        log.info("discarding checkpoint %d: %s", n, why)
        self.loop.after(0.0, self._answer_list)
        for proc in ([ck.keeper] if ck.keeper else []) + ck.spares:
            self._retire(proc)
        if ck.pending is not None:       # a restore was waiting for this checkpoint's spare
            log.error("checkpoint %d was lost (%s) while a restore to it was pending: ending", n, why)
            self._give_up(ck.pending)

    def _enforce_bounds(self) -> None:
        while len(self.ckpts) > self.max_checkpoints:
            victims = [n for n, ck in self.ckpts.items() if not ck.pinned and n != self.current]
            if not victims:
                break
            self._discard(min(victims), f"more than {self.max_checkpoints} checkpoints")

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
        sizes = {n: self._memory(ck)[1] for n, ck in self.ckpts.items()}
        keep = {n for n, ck in self.ckpts.items() if ck.pinned or n == self.current}
        for n, total in _budget.victims(sizes, self.max_memory, keep.__contains__):
            log.warning("checkpoint %d discarded: snapshots hold %d bytes (PSS), budget %d",
                        n, total, self.max_memory)
            self._discard(n, "memory budget")
        self.loop.after(_budget.INTERVAL, self._memory_tick)

    # -- the end --------------------------------------------------------------------------------
    def shutdown(self, code: int = 0, sig: int = 0) -> NoReturn:
        """Kill every process of the program, reap them, and end as the program ended."""
        for proc in list(self.procs.values()):
            if proc.role is not Role.DYING:
                self._retire(proc)
            try:        # the program is over: let the killed processes finish dying at once
                os.sched_setscheduler(proc.pid, os.SCHED_OTHER, os.sched_param(0))
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        while self.procs and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.002)
            else:
                self.procs.pop(pid, None)
        if self.control is not None:
            self.control.close()
        if self.reports is not None:
            self.reports.read()
            if any(self._sent_from_outside(s) for s in REPORTED_SIGNALS) and sig not in REPORTED_SIGNALS:
                self.reports.take()     # handled a signal sent to it, then ended another way
            self.reports.flush()
        if sig:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            os.kill(os.getpid(), sig)
            time.sleep(0.5)
            os._exit(128 + sig)
        os._exit(code)
