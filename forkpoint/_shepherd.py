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

from . import _budget, _channel, _locks, _prctl, _procfs, _sigutil, _threadmarks
from ._channel import (
    ChildQuery,
    Configure,
    Discard,
    ErrorKind,
    ForkFailed,
    Hello,
    Holder,
    ListCheckpoints,
    Message,
    QuarantineOp,
    Restore,
    SetPolicy,
    Snap,
    Spare,
    Throttle,
    Up,
    Wake,
)
from ._control import ControlServer
from ._faultreport import FaultReports
from ._loop import EventLoop
from ._orphans import Orphans
from ._qkeeper import Keeper
from ._qkeys import Settings
from ._sigutil import CARRIED, FORWARDED, REPORTED_SIGNALS, STOP_SIGNALS, TTY_SIGNALS, signame
from ._witness import Witness
from .arena import QUARANTINE_SIZE, Arena, HistoryRecord, usage_ns
from .policy import Action, Decision, Policy, RecoveryPolicy

log = logging.getLogger("forkpoint")

EX_SOFTWARE = 70
_ENV = "FORKPOINT_SHEPHERD_ARGS"
# The package's __init__ imports the whole public API (a third of the shepherd's start-up): the
# shepherd needs none of it, so its package is an empty module whose path is forkpoint's folder.
_BOOT = ("import sys,types;r=sys.argv[1];sys.path.insert(0,r);p=types.ModuleType('forkpoint');"
         "p.__path__=[r+'/forkpoint'];sys.modules['forkpoint']=p;from forkpoint._shepherd import main;main()")
_REPORT_BACKSTOP = 1.0        # a crash report nothing claimed is written out after this long
_OUTSIDE_WINDOW = 1.0         # a fault signal this recent from outside is no crash of the program
_WATCHDOG_TICK = 0.05         # how often the watchdog's hard deadline in the arena is checked
_UNKNOWN_TTL = 10.0           # seconds a reaped unknown pid is remembered (see Shepherd._alive)
_AWAIT_KEEPER = 5.0           # seconds a restore waits for a keeper's hello or copy before it falls back
# Descriptors the shepherd keeps free beyond its channels: a message's two descriptors (a channel
# and a pidfd), the channel of a live process that died and is not at EOF yet, and a /proc read.
_FD_RESERVE = 4
# Killed processes still being torn down, at most (the bound on processes, docs/reliability.md):
# at this many no checkpoint is taken and no spare forked until some are gone; from half of it on,
# killed processes are torn down at normal priority instead of SCHED_IDLE.
DYING_MAX = 4
_PARAM = os.sched_param(0)    # the only priority SCHED_IDLE and SCHED_OTHER take
_WITNESS_AGAIN = 1.0          # seconds before a witness that died is replaced (at most one a second)
_LOOP_WINDOW = 2.0            # seconds a keeper stays at normal priority after a restore waited for a copy
# Signals handled again after a rollback (see _replay): those from users and terminals, but not the
# job-control stops, whose handlers (curses) redraw a terminal rather than change the program.
REPLAYED = CARRIED - STOP_SIGNALS


_SNAP_HEAD = _channel.encode_snap(0, False, 0, None, 0.0)[:len('{"op":"snap"')]


class Role(enum.Enum):
    LIVE = "live"             # runs program code; at most one
    KEEPER = "keeper"         # checkpoint n itself; forks spares
    SPARE = "spare"           # a ready copy of a keeper; a restore wakes it
    DYING = "dying"           # killed, or its work is over; only a keeper's hello may still come
    HOLDER = "holder"         # shares a live process's descriptor table (_fdholder); not the program's
    WITNESS = "witness"       # holds the signals sent to the program's group (_witness); not the program's


@dataclass
class Proc:
    pid: int
    role: Role
    n: int
    chan: socket.socket | None
    lived: bool = False           # has run program code: its channel carries keepers' hellos
    # A keeper that may have forked a spare: one of a checkpoint taken with spares, or asked for a
    # copy. Only such a keeper's unreported forks are looked for when it is killed (_kill_forks:
    # a read of the kernel's child lists and of each child's stat, on every committed transaction).
    may_fork: bool = False
    forwarded: set[int] = field(default_factory=set)   # signals the shepherd sent it
    held: bool = False            # woken with Wake.hold: it waits for an Ok after its Up
    reported_pending: int | None = None   # its pending signals as its Restore gave them
    cpu0: tuple[int, int] = (0, 0)   # its own CPU time (user, system ns) when it became live


@dataclass
class Checkpoint:
    n: int
    keeper: Proc | None
    pinned: bool
    taken: float = field(default_factory=time.time)
    spares: list[Proc] = field(default_factory=list)
    pending: Wake | None = None   # a restore waiting for a spare of this checkpoint
    want_spares: int = 1
    looping_until: float = 0.0    # a restore had to wait for a copy: the keeper forks urgently until then
    keeper_urgent: bool = False   # the keeper was raised from SCHED_IDLE for copies a restore needs
    awaiting: bool = False        # the keeper has not introduced itself yet
    announcer: Proc | None = None  # the live process that took it: its keeper says hello on its channel
    key: str | None = None        # a protected call's input and deadline (see _channel.Snap)
    deadline: float = 0.0
    forking: int = 0              # spares asked of the keeper (or owed by a new one) not yet arrived
    fork_failures: int = 0        # failed forks in a row (the process limit): asked again later
    # Signals from users and terminals that reached the live process after this checkpoint was
    # announced: a rollback to it undoes their handlers' work, so they are handled again (_replay).
    delivered: set[int] = field(default_factory=set)
    after_failure: bool = False   # the restore pending into it is a failure's (not a plain tlongjmp)
    replay_due: bool = False      # that restore must replay them (decided at its wake)


def become_shepherd(chan: socket.socket, arena: Arena, live_pid: int, pgid: int, config: Any,
                    faults: int, quarantine: dict[str, Any] | None = None,
                    witness: Witness | None = None) -> NoReturn:
    """Turn the original process into the shepherd."""
    args = {"chan": chan.fileno(), "arena_fd": arena.fd, "arena_size": arena.size, "faults": faults,
            "live": live_pid, "pgid": pgid, "max_checkpoints": config.max_checkpoints,
            "max_snapshot_memory": config.max_snapshot_memory,
            "level": logging.getLogger("forkpoint").getEffectiveLevel(), "quarantine": quarantine or {},
            "witness": [witness.pid, *witness.fds()] if witness is not None else None}
    try:
        # The program's POSIX locks are the live process's now: it waits for them (_locks).
        _locks.release_all(_procfs.open_files()[2])
        if config.shepherd_exec and sys.executable:
            os.set_inheritable(chan.fileno(), True)
            os.set_inheritable(arena.fd, True)
            os.set_inheritable(faults, True)
            for fd in witness.fds() if witness is not None else ():
                os.set_inheritable(fd, True)
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
    os.close(args["arena_fd"])       # the mapping keeps its own descriptor: one fewer to hold
    try:
        Shepherd(chan, arena, args).run()
    except BaseException:
        logger.exception("the shepherd failed; the program ends")
        raise
    finally:
        os._exit(EX_SOFTWARE)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signame(os.WTERMSIG(status))}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _exited(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has exited (a pidfd polls readable then)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has a message (or EOF) now; poll, since select() fails past fd 1023."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(0))


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
        self.budget = _budget.Budget()
        self.loop = EventLoop()
        self.loop.on_error = self._after_internal_error
        self.procs: dict[int, Proc] = {}
        self.ckpts: dict[int, Checkpoint] = {}
        self.policy = RecoveryPolicy()
        self.current = 0
        self.started = time.time()
        self.recoveries = 0
        self.restoring = False                  # a restore was decided and no spare woken yet
        # Signals for the program that arrived while no live process was up, with whether the
        # terminal sent them (then the restored process may have had its own copy).
        self.pending_signals: list[tuple[int, bool]] = []
        # Retired live processes whose pending signals are read again once the restore is under
        # way: (pid, signals already passed on, signals to carry). See _retire.
        self.unread: list[tuple[int, set[int], frozenset[int] | set[int]]] = []
        self.backoff: Callable[[], None] | None = None      # a restore waiting out its backoff
        self.need_reap = False
        self.ending = False
        self.me = os.getpid()
        self.session_leader = os.getsid(0) == self.me
        self.tty_fd = next((fd for fd in (0, 1, 2) if _isatty(fd)), None)
        stat = _procfs.read_stat(self.me)      # tty_nr: 0 when there is no controlling terminal
        self.has_tty = self.tty_fd is not None or bool(stat and len(stat) > 4 and stat[4] != "0")
        self.can_raise = _procfs.can_leave_sched_idle()
        self.throttled = False
        self.introduced = 0
        self.throttle_waiters: list[tuple[Proc, int, int | None]] = []   # (process, n, pidfd of keeper n)
        self.forwarded_fatal: dict[int, float] = {}   # fault signal -> when one was forwarded
        self.live_up = True
        self.control: ControlServer | None = None
        witness = args.get("witness")
        self.witness = Witness(*witness) if witness else None
        # Recently reaped pids we did not know: only consulted for a keeper or spare that came
        # without a pidfd (before Linux 5.3), and trimmed by age on every use.
        self.reaped_unknown: list[tuple[int, float]] = []
        self.channels = 0                       # channels open here (descriptors, see _fd_room)
        self.fd_limit = 0
        self.fd_base = 0
        self.fd_warned = 0.0
        self.orphans = Orphans(arena)
        self.live: Proc | None = self._add(args["live"], Role.LIVE, 0, chan)
        self.lists = _ListWaiters()
        self.retired_live: set[int] = set()     # live processes killed since the last orphan scan
        self.scan_pending = False
        self.parent_fd: int | None = None       # a pidfd of the face's parent
        self.next_deadline = float("inf")      # when the pending _deadline_due timer fires
        faults = args.get("faults")
        self.reports = FaultReports(faults) if faults is not None else None
        self.quarantine = Keeper(arena, Settings.from_args(args.get("quarantine") or {}), self.loop,
                                 os.getpid())
        self._handlers: dict[type[Message], Callable[[Proc, Any, list[int]], None]] = {
            Snap: self._on_snap, Hello: self._on_hello, Spare: self._on_spare, Up: self._on_up,
            Restore: self._on_restore, Discard: self._on_discard, ListCheckpoints: self._on_list,
            SetPolicy: self._on_policy, Configure: self._on_configure, ChildQuery: self._on_child,
            QuarantineOp: self._on_quarantine, ForkFailed: self._on_fork_failed, Throttle: self._on_throttle,
            Holder: self._on_holder}

    # -- what the control server sees (``_control.Controlled``) ---------------------------------------
    @property
    def live_pid(self) -> int | None:
        return self.live.pid if self.live is not None else None

    def checkpoint_ids(self) -> list[int]:
        return sorted(self.ckpts)

    def history(self) -> list[HistoryRecord]:
        return self.arena.history()

    def quarantined(self) -> list[str]:
        return self.quarantine.listing()

    def quarantine_report(self) -> dict[str, Any]:
        return self.quarantine.report()

    def release_by_operator(self, key: str, pid: int, uid: int) -> bool:
        return self.quarantine.release(key, f"operator uid {uid} (pid {pid}) via program {os.getpid()} "
                                            f"on {self.quarantine.s.host}", pid, uid)

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
            # A keeper or spare is a child of ours from its fork, and an orphan scan after a
            # restore may have come first (a keeper at SCHED_IDLE on a busy machine reports its
            # copy late) and counted it among the program's children: a restored program's
            # os.wait() then waited for a spare for ever.
            self.orphans.forget(pid)
        if chan is not None:
            chan.setblocking(True)
            self.channels += 1
            self.loop.add_reader(chan, functools.partial(self._on_message, proc))
        return proc

    def _close(self, proc: Proc) -> None:
        if proc.chan is not None:
            self.loop.remove(proc.chan)
            proc.chan.close()
            proc.chan = None
            self.channels -= 1

    def _alive(self, pid: int, pidfd: int | None) -> bool:
        """Whether the process that just introduced itself as ``pid`` is still ours to track.

        With its pidfd the answer is exact: a pidfd refers to that very process, so it reports
        ESRCH once the process was reaped here, even if its pid already belongs to another. Without
        one, a pid reaped here in the last seconds is taken for it.
        """
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, 0)
                return True
            except ProcessLookupError:
                return False
            except OSError:
                pass
            finally:
                os.close(pidfd)
        now = time.monotonic()
        self.reaped_unknown = [(p, t) for p, t in self.reaped_unknown if now - t < _UNKNOWN_TTL]
        return not any(p == pid for p, _ in self.reaped_unknown)

    def _retire(self, proc: Proc) -> None:
        """Kill a process whose work is over, its teardown kept out of the live process's way.

        The kill comes before the channel is closed: a process blocked on its channel (a live
        process inside tlongjmp) must never see EOF while it can still run, or it would raise into
        program code next to the restored process.
        """
        was_keeper = proc.role is Role.KEEPER
        proc.role = Role.DYING
        if proc.pid <= 0:     # a keeper that has not introduced itself: EOF on its channel ends it
            self._close(proc)
            return
        if proc.lived:        # signals for the program still blocked there go to its successor
            self._note_live_cpu(proc)            # before a successor writes its own there
            self._read_signals(retiring=proc)    # what came before this instant was for it
            carried = CARRIED | proc.forwarded
            if proc.reported_pending is None:
                seen = {s for s in _procfs.pending_signals(proc.pid) if s in carried}
            else:
                # A caller of tlongjmp() said what it had pending, with every signal blocked: the
                # restore need not wait for a read of its /proc status (60-100 us). What came
                # after it asked is read once the wake is out (_carry_late_signals); it stays
                # pending in the killed process until it is reaped, and the kernel drops what is
                # sent after the SIGKILL.
                mask = proc.reported_pending
                seen = {s for s in carried if mask >> (s - 1) & 1}
                self.unread.append((proc.pid, seen, carried))
            self.pending_signals.extend((s, False) for s in sorted(seen))
            self._orphans_of(proc.pid)
        # Torn down at idle priority, off the live process's way; but once several are waiting
        # for that (a busy machine starves SCHED_IDLE), at normal priority, so they are bounded.
        busy = self._dying() >= DYING_MAX // 2
        self._set_policy(proc.pid, os.SCHED_OTHER if busy else os.SCHED_IDLE)
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not proc.lived:   # a live process's keepers may still introduce themselves on its channel
            self._close(proc)
        if was_keeper and proc.may_fork:
            self._kill_forks(proc)
        self._update_throttle()

    def _kill_forks(self, keeper: Proc) -> None:
        """A spare the keeper forked but has not reported yet would outlive it (at idle priority,
        unknown here): kill it too, and count it among the processes being torn down. Spares
        stay in their keeper's process group until they are woken."""
        try:
            pgid = os.getpgid(keeper.pid)
        except OSError:
            return
        if pgid in (self.pgid, self.me):
            return
        for pid, group in _procfs.children_of({self.me}):
            if group == pgid and pid not in self.procs:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.procs[pid] = Proc(pid, Role.DYING, keeper.n, None)
                self.orphans.forget(pid)    # an orphan scan may have counted it (see _add)

    def _set_policy(self, pid: int, policy: int) -> None:
        if policy == os.SCHED_OTHER and not self.can_raise:
            return            # leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE
        try:
            os.sched_setscheduler(pid, policy, os.sched_param(0))
        except OSError:
            pass

    def _update_throttle(self) -> None:
        """Publish whether new processes must wait for killed ones (arena word, read by tsetjmp and
        keepers); when they may again, answer waiting tsetjmps and fork the spares put off."""
        on = self._dying() >= DYING_MAX
        if on == self.throttled:
            return
        self.throttled = on
        self.arena.set_throttle(on)
        if on:
            for p in self.procs.values():
                if p.role is Role.DYING:
                    self._set_policy(p.pid, os.SCHED_OTHER)
            return
        self._answer_throttled()
        self.loop.after(0.0, self._catch_up)

    def _catch_up(self) -> None:
        """Forks put off while killed processes were torn down."""
        self._retry_forks()
        for ck in list(self.ckpts.values()):
            self._replenish(ck)

    def _on_throttle(self, proc: Proc, msg: Throttle, fds: list[int]) -> None:
        pidfd = fds[0] if fds else None
        self._close_fds(fds[1:])
        self.throttle_waiters.append((proc, msg.n, pidfd))
        if pidfd is not None:         # readable when that keeper is gone: no hello will come
            self.loop.add_reader(pidfd, self._answer_throttled)
        self._answer_throttled()

    def _answer_throttled(self) -> None:
        """Let each waiting tsetjmp go once nothing holds it any more."""
        waiting: list[tuple[Proc, int, int | None]] = []
        for proc, n, pidfd in self.throttle_waiters:
            if pidfd is not None and (n <= self.introduced or _exited(pidfd)):
                self.loop.remove(pidfd)          # settled: no longer watched (it stays readable)
                os.close(pidfd)
                pidfd = None
            if pidfd is not None or self.throttled:
                waiting.append((proc, n, pidfd))
                continue
            self._send(proc, _channel.Ok())
        self.throttle_waiters = waiting

    def _set_introduced(self, n: int) -> None:
        if n > self.introduced:
            self.introduced = n
            self.arena.set_introduced(n)
            if self.throttle_waiters:
                self._answer_throttled()

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
        self.fd_limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
        for which in _sigutil.ITIMERS:
            signal.setitimer(which, 0)   # exec kept the program's timers; the live process has them
        watched = FORWARDED | {signal.SIGCHLD, signal.SIGCONT}
        _sigutil.block_all()
        if self.witness is not None:
            self.procs[self.witness.pid] = Proc(self.witness.pid, Role.WITNESS, 0, None)
        else:
            self._start_witness()     # (the original process could not: a late one beats none)
        self.sfd = _sigutil.open_signalfd(watched)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)     # when the live process stops, so does the face
        if signal.getsignal(signal.SIGPIPE) is not signal.SIG_IGN:
            # (Setting SIG_IGN drops a pending SIGPIPE: one sent to the program's PID while the
            # shepherd started, blocked here since, was lost. Python's start ignores it already.)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        _sigutil.restore_mask(_sigutil.mask_of(watched))
        self.loop.add_reader(self.sfd, self._on_signals, first=True)
        if self.reports is not None:
            self.loop.add_reader(self.reports.fd, self._on_fault_report)
        try:
            self.control = ControlServer(self, self.loop)
        except Exception as e:  # noqa: BLE001 - the program runs without operator control
            log.warning("operator socket unavailable: %s", e)
        self.orphans.scan(set(), self.procs.__contains__)   # children the program started before us
        self.quarantine.start()
        self._watch_parent()
        self.fd_base = _procfs.open_fd_count() - self.channels - 1
        if self.control is not None:     # its connections come out of what checkpoints leave free
            self.control.max_connections = max(1, min(self.control.max_connections,
                                                      (self.fd_limit - self.fd_base - _FD_RESERVE) // 8))
        self._reap()   # the live process may have died before we watched SIGCHLD
        if self.max_memory:
            self.loop.after(_budget.INTERVAL, self._memory_tick)
        self.loop.after(_WATCHDOG_TICK, self._watchdog_tick)
        self.loop.run_forever()
        raise AssertionError("the shepherd's loop ended")  # pragma: no cover

    def _start_witness(self) -> None:
        """A witness of group signals (``_witness``) in place of one that died, or never came."""
        if self.ending or self.witness is not None:
            return
        self.witness = Witness.spawn(self.me)
        if self.witness is not None:
            self.procs[self.witness.pid] = Proc(self.witness.pid, Role.WITNESS, 0, None)

    def _after_internal_error(self) -> None:
        """After a contained fault in the shepherd: go on only if the program still has a way on."""
        if self.live is None and not self.restoring:
            log.error("no live process and no restore under way after an internal error: ending")
            self.shutdown(code=EX_SOFTWARE)

    # -- signals, deaths and crash reports -------------------------------------------------------
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
        if action == "ignore":
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
        if sig in REPORTED_SIGNALS:     # sent from outside: a command to the program, not a crash
            self.forwarded_fatal[sig] = time.monotonic()
        live = live or (self.live if self.live_up else None)
        if live is not None:
            try:
                os.kill(live.pid, sig)
                live.forwarded.add(sig)
                self._delivered(sig)
            except ProcessLookupError:
                self.pending_signals.append((sig, False))
        else:
            self.pending_signals.append((sig, False))

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
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        try:
            os.kill(self.me, sig)           # stops here, until the job is continued
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
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, status, usage)

    def _note_live_cpu(self, proc: Proc) -> None:
        """What ``proc`` had used when it became live, as it wrote it (``_cputime``)."""
        pid, user, system = self.arena.live_cpu()
        if pid == proc.pid:
            proc.cpu0 = (user, system)

    def _count_cpu(self, proc: Proc, usage: resource.struct_rusage | None) -> None:
        """A process that ran program code is gone: its CPU time is the program's from now on."""
        if usage is None:
            return
        self._note_live_cpu(proc)
        user, system = usage_ns(usage)
        self.arena.add_cpu(user - proc.cpu0[0], system - proc.cpu0[1])

    def _on_exit(self, pid: int, status: int, usage: resource.struct_rusage | None = None) -> None:
        proc = self.procs.get(pid)
        if proc is None:
            # An orphan's status is kept before the live channel is read: a ChildQuery waiting
            # there, answered by that drain, found the child neither running nor reaped (it is
            # reaped, its status not kept yet) and the program's waitpid() raised ECHILD, which
            # subprocess turns into exit status 0.
            log.debug("reaped adopted orphan %d", pid)
            # Not attributed yet while a scan is pending: most likely a child of the live process
            # just retired, which ended before the scan (or was a zombie when its parent died).
            # It counts as the program's, for a wait for any child (which raised ECHILD for it)
            # and for SIGCHLD: a SIGCHLD too many finds nothing to wait for; one too few leaves a
            # job runner waiting for ever. (A keeper or spare that died before it introduced
            # itself is taken back when its message arrives: _on_hello, _on_spare.)
            ours = pid in self.orphans.alive or self.scan_pending
            self.orphans.reaped(pid, status, ours)
            if ours:
                self._child_exited()
            now = time.monotonic()
            self.reaped_unknown = [(p, t) for p, t in self.reaped_unknown if now - t < _UNKNOWN_TTL][-255:]
            self.reaped_unknown.append((pid, now))
            self._retry_forks()
            return
        # One of ours, whichever way it was registered: if an orphan scan counted it among the
        # program's children first, it must not stay counted as running once it is gone (a wait
        # for any child waited for it for ever: a stress run's job runner, 4 of 11 runs).
        self.orphans.forget(pid)
        if self.live is not None and self.live is not proc:
            self._drain(self.live)    # a committed transaction may have discarded this process
        self._drain(proc)     # what it said before dying (a checkpoint it took) comes first
        self.procs.pop(pid, None)
        if proc.lived:
            self._count_cpu(proc, usage)
        if proc.role is Role.HOLDER:
            if os.WIFSIGNALED(status):      # killed (one ends by itself once its work is done)
                self.arena.holder_lost()
            return
        if proc.role is Role.WITNESS:       # killed from outside: group signals judged without it
            if self.witness is not None and self.witness.pid == pid:
                self.witness.close()
                self.witness = None
            if not self.ending:
                log.info("the witness of group signals died (%s); another in %gs",
                         _describe_status(status), _WITNESS_AGAIN)
                self.loop.after(_WITNESS_AGAIN, self._start_witness)
            return
        if proc.role is Role.DYING:
            self._update_throttle()
            self._retry_forks()      # a process slot is free again
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
        log.warning("checkpoint %d lost its %s process %d (%s)", proc.n, proc.role.value, pid,
                    _describe_status(status))
        if proc is ck.keeper:
            ck.keeper = None
            ck.forking = 0                  # what it had forked was drained above; the rest is lost
            self._promote(ck)
        elif proc in ck.spares:
            ck.spares.remove(proc)
            self._replenish(ck)
        self._retry_forks()

    def _promote(self, ck: Checkpoint) -> None:
        """A checkpoint whose keeper died lives on in a spare, which becomes its keeper."""
        while ck.spares:
            heir = ck.spares.pop(0)
            if self._send(heir, _channel.Promote()):
                heir.role = Role.KEEPER
                # A spare runs at normal priority; as a keeper it forks at SCHED_IDLE unless a
                # restore waits for it. The shepherd sets that, never the keeper itself.
                ck.keeper, ck.keeper_urgent = heir, True
                self._keeper_urgent(ck, False)
                log.warning("checkpoint %d: spare %d is its keeper now", ck.n, heir.pid)
                self._replenish(ck)
                return
            self._retire(heir)
        self._discard(ck.n, "its keeper died and no spare was left")

    # -- messages -------------------------------------------------------------------------------
    def _drain(self, proc: Proc) -> None:
        while proc.chan is not None and _readable(proc.chan):
            self._on_message(proc)

    def _on_message(self, proc: Proc) -> None:
        # A channel reported ready in this select() batch may have been drained since by an earlier
        # callback of the same batch (_on_exit drains the live channel): a blocking recv would then
        # wait forever, with the whole loop (seen under gunicorn: a transaction's keeper reaped in
        # the same batch as the live process's next message). So the receive never blocks (one
        # system call, and no select(), which fails for descriptors past 1023).
        try:
            msg, fds = _channel.recv(proc.chan, socket.MSG_DONTWAIT) if proc.chan is not None else (None, [])
        except _channel.MalformedMessage as e:    # dropped, the channel kept
            log.error("dropped a malformed message from process %d: %s", proc.pid, e)
            return
        except (BlockingIOError, InterruptedError):
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
        if proc.role is Role.DYING and not isinstance(msg, (Hello, Holder)):
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
                                   key=msg.key, deadline=msg.deadline, forking=msg.spares)
        if msg.deadline:
            self._at_deadline(msg.deadline)
        self.current = n
        self._enforce_bounds()
        self._check_memory()

    def _on_hello(self, proc: Proc, msg: Hello, fds: list[int]) -> None:
        """A keeper introduces itself, on the channel of the live process that forked it.

        Its channel and a pidfd come with it. Without a channel (the keeper could not make one, or
        the descriptor did not fit here) the keeper cannot serve and exits by itself (it sees EOF).
        """
        n, pid = msg.n, msg.pid
        ck = self.ckpts.get(n)
        self._set_introduced(n)
        if not fds:
            self._discard(n, f"its keeper {msg.error or 'could not hand its channel over'}"
                             f"{'' if msg.error else ' (' + self._fd_note() + ')'}", level=logging.ERROR)
            return
        if not self._alive(pid, fds[1] if len(fds) > 1 else None):   # it died before we read this
            self.orphans.forget(pid)        # reaped as an orphan, maybe counted as the program's
            self._close_fds(fds[:1])
            self._discard(n, "its keeper died before it introduced itself")
            return
        keeper = self._add(pid, Role.KEEPER, n, socket.socket(fileno=fds[0]))
        keeper.may_fork = ck is None or ck.want_spares > 0      # it forks those unasked, at once
        if ck is None or not ck.awaiting:
            self._retire(keeper)
            return
        ck.keeper, ck.awaiting = keeper, False
        self._enforce_bounds()            # it counts from now on
        if ck.pending is not None:
            self._urge(ck)
        self._answer_list()

    def _on_holder(self, proc: Proc, msg: Holder, fds: list[int]) -> None:
        """The live process made a holder of its descriptor table: a child of ours that is none of
        the program's (an orphan scan may have counted it already, or reaped it)."""
        self.orphans.forget(msg.pid)
        self._close_fds(fds[1:])
        if self._alive(msg.pid, fds[0] if fds else None):
            self.procs[msg.pid] = Proc(msg.pid, Role.HOLDER, 0, None)

    def _on_spare(self, proc: Proc, msg: Spare, fds: list[int]) -> None:
        ck = self.ckpts.get(msg.n)
        if ck is not None and proc is ck.keeper:
            ck.forking = max(0, ck.forking - 1)
            if not ck.forking or ck.looping_until < time.monotonic():
                self._keeper_urgent(ck, False)    # raised again after the wake that needs its next copy
        if not fds:        # the descriptor did not fit here; the spare sees EOF and exits
            log.error("a spare of checkpoint %d was lost: %s", msg.n, self._fd_note())
            self._fork_lost(ck)
            return
        if not self._alive(msg.pid, fds[1] if len(fds) > 1 else None):
            self.orphans.forget(msg.pid)    # as in _on_hello
            self._close_fds(fds[:1])
            self._fork_lost(ck)
            return
        spare = self._add(msg.pid, Role.SPARE, msg.n, socket.socket(fileno=fds[0]))
        if ck is None or proc is not ck.keeper:
            self._retire(spare)
            return
        ck.fork_failures = 0
        ck.spares.append(spare)
        if self.max_memory and ck.n != max(self.ckpts):    # it takes its own share: measure again
            self.budget.measured({ck.n: self._memory(ck)}, everything=False)
        if ck.pending is not None:
            wake, ck.pending = ck.pending, None
            self._wake(ck, wake)
        elif len(ck.spares) > ck.want_spares:     # asked for by a restore that another copy served
            self._retire(ck.spares.pop())

    def _on_fork_failed(self, proc: Proc, msg: ForkFailed, fds: list[int]) -> None:
        """A keeper could not fork a spare (the process limit, memory): it goes on serving."""
        ck = self.ckpts.get(msg.n)
        if ck is None or proc is not ck.keeper:
            return
        ck.forking = max(0, ck.forking - 1)
        if ck.pending is None and not ck.forking:
            self._keeper_urgent(ck, False)
        if not msg.errno:                # put off by the throttle: asked again when it lifts
            if ck.pending is not None:
                self._urge(ck)
            return
        ck.fork_failures += 1
        log.warning("checkpoint %d: its keeper could not fork a spare (%s)%s", ck.n, msg.error,
                    "; the restore waiting for it wakes the keeper itself" if ck.pending is not None
                    and not self._dying() else "")
        self._fork_lost(ck)

    def _fork_lost(self, ck: Checkpoint | None) -> None:
        """A spare asked for did not come. A restore waiting for it asks again once a killed
        process is gone (freeing a process slot), and wakes the keeper itself when no fork can
        succeed; otherwise the spare is asked for again later."""
        if ck is None or self.ckpts.get(ck.n) is not ck:
            return
        if ck.pending is None:
            delay = min(5.0, 0.05 * 2 ** min(ck.fork_failures, 7))
            self.loop.after(delay, lambda: self._replenish(ck))
            return
        if self._dying() and ck.fork_failures <= 3:
            return              # _retry_forks asks again after the next death is reaped
        self._wake_keeper(ck)

    def _retry_forks(self) -> None:
        for ck in list(self.ckpts.values()):
            if ck.pending is not None and ck.keeper is not None and not ck.forking:
                self._urge(ck)

    def _dying(self) -> int:
        """Processes killed here and not reaped yet."""
        return sum(1 for p in self.procs.values() if p.role is Role.DYING)

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

    def _on_up(self, proc: Proc, msg: Up, fds: list[int]) -> None:
        if proc is self.live:
            # From its Up on, what the terminal sends reaches it. What came while it rejoined the
            # group is judged now, while it still blocks every signal and waits for our Ok (held:
            # the program is a terminal's foreground job), so the judgement is exact.
            if proc.held:
                self._read_signals()
            self.live_up = True
            pending, self.pending_signals = self.pending_signals, []
            for sig, _tty in pending:
                self._forward(sig)
            if proc.held:                # they are pending there now: it may unblock them
                proc.held = False
                self._send(proc, _channel.Ok())

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
        if "quarantine_ttl" in settings:
            self.quarantine.s.ttl = settings["quarantine_ttl"]
        if "max_snapshot_memory" in settings:
            first = not self.max_memory
            self.max_memory = settings["max_snapshot_memory"]
            if self.max_memory and first:
                self.loop.after(0.0, self._memory_tick)
        self._enforce_bounds()
        self._send(proc, _channel.Ok())

    def _on_quarantine(self, proc: Proc, msg: QuarantineOp, fds: list[int]) -> None:
        """``forkpoint.quarantine(key)`` or ``release(key)`` in the program (see ``_qkeeper``)."""
        try:
            if msg.action == "add":
                self.quarantine.add(msg.key, QUARANTINE_SIZE)
                found = True
            elif msg.action == "release":
                found = self.quarantine.release(msg.key, f"program {os.getpid()} on {self.quarantine.s.host}",
                                                os.getpid(), os.geteuid())
            else:
                self._send(proc, _channel.Error(ErrorKind.CONFIG,
                                                f"unknown quarantine operation {msg.action!r}"))
                return
        except Exception as e:  # noqa: BLE001 - the program gets the error, the shepherd goes on
            log.exception("quarantine %s of %r failed", msg.action, msg.key)
            self._send(proc, _channel.Error(ErrorKind.UNKNOWN, f"quarantine {msg.action} failed: {e}"))
            return
        self._send(proc, _channel.Ok({"found": found}))

    def _on_child(self, proc: Proc, msg: ChildQuery, fds: list[int]) -> None:
        """The live process waits for a child the kernel says is not its own (see ``_children``)."""
        if self.scan_pending:       # a restored process asks before the scan: attribute them now
            self._scan_orphans()
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
            self.loop.after(0.05, functools.partial(self._scan_tick, 0.05))   # off the restore's path

    def _scan_tick(self, delay: float) -> None:
        """Scan, and again while a retired live process is not reaped yet: a killed process hands
        its children over only at the very end of its exit, after its memory is torn down (at idle
        priority on a busy machine, later than the first scan: a child that had ended went
        uncounted, and a restored program's os.wait() raised ECHILD for it)."""
        self._scan_orphans()
        if self.retired_live:
            delay = min(2 * delay, 1.0)
            self.loop.after(delay, functools.partial(self._scan_tick, delay))
        else:
            self.scan_pending = False

    def _scan_orphans(self) -> None:
        parents = self.retired_live
        self.orphans.scan(parents, self.procs.__contains__)
        self.retired_live = {p for p in parents if p in self.procs}      # still dying

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
        proc.reported_pending = msg.pending
        self._failure(msg.n, msg.sig, msg.reason or "tlongjmp", proc)

    def _on_live_death(self, status: int) -> None:
        if os.WIFEXITED(status):
            self.shutdown(code=os.WEXITSTATUS(status))
        sig = os.WTERMSIG(status)
        pol = self.policy.policy
        armed = self.arena.watchdog()
        self.arena.set_watchdog(None)
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
                 operator: bool = False) -> None:
        """The live process failed (or asked to go back): decide, record, and restore or give up."""
        detected = time.monotonic()
        key = self.arena.processing()
        if sig and self.reports is not None and self.reports.pending:
            # The main thread's mark is not whose code crashed in another thread (_threadmarks).
            key = _threadmarks.blamed(self.arena, self.reports.pending, key)
        ck_failed = self.ckpts.get(self.current)
        if ck_failed is not None and ck_failed.key is not None:
            key = ck_failed.key         # a protected call failed inside its own checkpoint
        self.arena.set_processing(None)
        _threadmarks.clear(self.arena)
        self.arena.set_watchdog(None)
        from_state = self.current
        if operator:
            decision = Decision(Action.RESTORE, target, 0.0, 1, cause, None)
        else:
            shared = self._count_failure(key, sig, cause) if key is not None else None
            decision = self.policy.decide(target, sig, key, sorted(self.ckpts), time.time(), cause,
                                          budgeted=bool(sig), key_failures=shared)
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
            # else its channel is gone: it is dying, and its death (reaped) decides what comes next

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
        self.shutdown(code=EX_SOFTWARE)

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

    # -- registry -------------------------------------------------------------------------------
    def _discard(self, n: int, why: str, level: int = logging.INFO) -> None:
        ck = self.ckpts.pop(n, None)
        if ck is None:
            return
        log.log(level, "discarding checkpoint %d: %s", n, why)
        self.budget.discarded(n)
        self.loop.after(0.0, self._answer_list)
        for proc in ([ck.keeper] if ck.keeper else []) + ck.spares:
            self._retire(proc)
        if ck.pending is not None:       # a restore was waiting for this checkpoint's spare
            wake, ck.pending = ck.pending, None
            self._fall_back(wake, ck, why)

    def _enforce_bounds(self) -> None:
        """Discard the oldest checkpoints beyond the bounds. A checkpoint that is only announced
        (its keeper has not introduced itself) does not count yet: it may never exist (its fork can
        fail, its process be killed), and the one it would push out may be the last usable one."""
        while sum(1 for ck in self.ckpts.values() if not ck.awaiting) > self.max_checkpoints:
            victims = self._victims()
            if not victims:
                break
            self._discard(min(victims), f"more than {self.max_checkpoints} checkpoints")
        self._fit_descriptors()

    def _victims(self) -> list[int]:
        return [n for n, ck in self.ckpts.items() if not ck.pinned and not ck.awaiting and n != self.current]

    # -- descriptors: a channel per keeper and spare must fit under the shepherd's ulimit -n ----------
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

    # -- the watchdog's hard deadline ------------------------------------------------------------
    def _watchdog_tick(self) -> None:
        """Cut a live process past its deadline (``forkpoint.watchdog``, protected calls).

        Two kinds of deadline: one recorded in the arena (a watchdog's deadline plus ``hard_after``,
        for code stuck in C that never runs its SIGALRM handler; or a restart-mode request's
        timeout), and the one a protected call sent with its own checkpoint (``Snap.deadline``).
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
        armed, ck = self.arena.watchdog(), self.ckpts.get(self.current)
        own = ck is not None and 0 < ck.deadline <= now
        if not own and (armed is None or now < armed[0]):
            ahead = [d for d in (ck.deadline if ck is not None else 0.0, armed[0] if armed else 0.0)
                     if d > now]
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
            handled = self.arena.watchdog_handled()
            if self.arena.watchdog() != armed:
                return 0.0              # the block ended, or the process moved on
            target = armed[1] or self.current
            reason = "timeout (stuck in native code: killed)" if handled else "timeout"
        if target in self.ckpts and self.ckpts[target].awaiting:
            return 0.0                  # inside tsetjmp, before its keeper exists: next tick
        if target not in self.ckpts:    # nothing to restore: it dies, as a hang would end it
            log.error("live process %d is past its watchdog deadline and checkpoint %d is gone",
                      live.pid, target)
            os.kill(live.pid, signal.SIGKILL)
            return 0.0
        log.info("live process %d is past its deadline: %s", live.pid, reason)
        self.live = None
        held = len(self.pending_signals)
        self._retire(live)
        # A SIGALRM pending there is the watchdog's own timer, blocked by the stuck code: it is not
        # passed on to the restored process (where it would find no watchdog, or end it).
        self.pending_signals[held:] = [e for e in self.pending_signals[held:] if e[0] != signal.SIGALRM]
        self._failure(target, signal.SIGALRM, reason, None)
        return 0.0

    # -- the end --------------------------------------------------------------------------------
    def shutdown(self, code: int = 0, sig: int = 0) -> NoReturn:
        """Kill every process of the program, reap them, and end as the program ended."""
        self.ending = True
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
        try:
            self.quarantine.close()
        except Exception:  # noqa: BLE001 - the program's end never waits on its bookkeeping
            log.exception("could not flush the quarantine store")
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
