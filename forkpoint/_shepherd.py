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

One object in four modules, each a part of it: this one (the loop, the processes' lives, the
messages, the registry of checkpoints), ``_shepherd_signals`` (passing signals on),
``_shepherd_restores`` (a restore, from the request to the woken spare, reads top to bottom there:
``_on_restore`` (or ``_on_fault``, ``_on_live_death``) -> ``_failure`` -> ``_wake``) and
``_shepherd_limits`` (descriptors, memory, deadlines). Their records are in ``_registry``.
"""
from __future__ import annotations

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
from typing import Any, NoReturn

from . import _budget, _channel, _locks, _notify, _prctl, _procfs, _sigutil, _threadmarks
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
)
from ._control import ControlServer
from ._faultreport import FaultReports
from ._loop import EventLoop
from ._orphans import Orphans
from ._qkeeper import Keeper
from ._qkeys import Settings
from ._registry import Checkpoint, Proc, Role
from ._shepherd_limits import Limits
from ._shepherd_restores import Restores
from ._shepherd_signals import SignalRouting
from ._sigutil import CARRIED, FORWARDED, REPORTED_SIGNALS, STOP_SIGNALS, signame
from ._witness import Witness
from .arena import QUARANTINE_SIZE, Arena, HistoryRecord, usage_ns
from .policy import Policy, RecoveryPolicy

log = logging.getLogger("forkpoint")

EX_SOFTWARE = os.EX_SOFTWARE      # 70: how the program ends when forkpoint cannot go on
_ENV = "FORKPOINT_SHEPHERD_ARGS"
# The package's __init__ imports the whole public API (a third of the shepherd's start-up): the
# shepherd needs none of it, so its package is an empty module whose path is forkpoint's folder.
_BOOT = ("import sys,types;r=sys.argv[1];sys.path.insert(0,r);p=types.ModuleType('forkpoint');"
         "p.__path__=[r+'/forkpoint'];sys.modules['forkpoint']=p;from forkpoint._shepherd import main;main()")
_UNKNOWN_TTL = 10.0           # seconds a reaped unknown pid is remembered (see Shepherd._alive)
# Killed processes still being torn down, at most (the bound on processes, docs/reliability.md):
# at this many no checkpoint is taken and no spare forked until some are gone; from half of it on,
# killed processes are torn down at normal priority instead of SCHED_IDLE.
DYING_MAX = 4
_WITNESS_AGAIN = 1.0          # seconds before a witness that died is replaced (at most one a second)


def become_shepherd(chan: socket.socket, arena: Arena, live_pid: int, pgid: int, config: Any,
                    faults: int, quarantine: dict[str, Any] | None = None,
                    witness: Witness | None = None, notify: dict[str, Any] | None = None) -> NoReturn:
    """Turn the original process into the shepherd."""
    args = {"chan": chan.fileno(), "arena_fd": arena.fd, "arena_size": arena.size, "faults": faults,
            "live": live_pid, "pgid": pgid, "max_checkpoints": config.max_checkpoints,
            "max_snapshot_memory": config.max_snapshot_memory,
            "level": logging.getLogger("forkpoint").getEffectiveLevel(), "quarantine": quarantine or {},
            "witness": [witness.pid, *witness.fds()] if witness is not None else None, "notify": notify}
    try:
        # The program's POSIX locks are the live process's now: it waits for them (_locks).
        _locks.release_all(_procfs.open_files().regular)
        if config.shepherd_exec and sys.executable:
            os.set_inheritable(chan.fileno(), True)
            os.set_inheritable(arena.fd, True)
            os.set_inheritable(faults, True)
            for fd in witness.fds() if witness is not None else ():
                os.set_inheritable(fd, True)
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = dict(os.environ, **{_ENV: json.dumps(args)})
            if notify is not None:           # the relay's socket; the shepherd keeps systemd's address
                os.set_inheritable(notify["fd"], True)
                env[_notify.VARIABLE] = notify["real"]
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


class Shepherd(SignalRouting, Restores, Limits):
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
        self.relay: _notify.Relay | None = None
        self._notify_args = args.get("notify")
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
        self.threads_overdue = _threadmarks.Overdue()
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
        if self._notify_args:
            try:
                self.relay = _notify.Relay(self._notify_args, self.loop, self._ran_program)
            except Exception:  # noqa: BLE001 - the program runs on; systemd may reject its notifications
                log.exception("notify relay unavailable")
        try:
            self.control = ControlServer(self, self.loop, (self._notify_args or {}).get("dir", ""))
        except Exception as e:  # noqa: BLE001 - the program runs without operator control
            log.warning("operator socket unavailable: %s", e)
        self.orphans.scan(set(), self.procs.__contains__, first=True)   # started before start()
        self.quarantine.start()
        self._watch_parent()
        self._start_limits()
        self._reap()   # the live process may have died before we watched SIGCHLD
        self.loop.run_forever()
        raise AssertionError("the shepherd's loop ended")  # pragma: no cover

    def _start_witness(self) -> None:
        """A witness of group signals (``_witness``) in place of one that died, or never came."""
        if self.ending or self.witness is not None:
            return
        self.witness = Witness.spawn(self.me)
        if self.witness is not None:
            self.procs[self.witness.pid] = Proc(self.witness.pid, Role.WITNESS, 0, None)

    def _ran_program(self, pid: int) -> bool:
        """Whether ``pid`` is a process of ours that has run program code (the notify relay's test)."""
        proc = self.procs.get(pid)
        return proc is not None and proc.lived

    def _after_internal_error(self) -> None:
        """After a contained fault in the shepherd: go on only if the program still has a way on."""
        if self.live is None and not self.restoring:
            log.error("no live process and no restore under way after an internal error: ending")
            self.shutdown(code=EX_SOFTWARE)

    # -- deaths ---------------------------------------------------------------------------------
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
            if self.relay is not None:
                self.relay.gone(pid)
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
        known = set(msg.known) if msg.known is not None else None
        got = self.orphans.claim(msg.pid, group, known)
        if got is not None:
            self._send(proc, _channel.Ok({"pid": got[0], "status": got[1]}))
            return
        dying = {p.pid for p in self.procs.values() if p.lived and p.role is Role.DYING}
        running = [p for p in self.orphans.running(msg.pid, group, dying, known) if p not in self.procs]
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

            # else its channel is gone: it is dying, and its death (reaped) decides what comes next

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

    # -- the end --------------------------------------------------------------------------------
    def shutdown(self, code: int = 0, sig: int = 0) -> NoReturn:
        """Kill every process of the program, reap them, and end as the program ended."""
        self.ending = True
        if self.relay is not None:       # what the program said last reaches systemd before its end
            try:
                self.relay.close()
            except Exception:  # noqa: BLE001 - the program's end never waits on its notifications
                log.exception("notify relay: could not close")
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
            if self.me == 1:
                # The face is a PID namespace's init (a container's PID 1): the kernel drops the
                # signal init sends itself, and the program ended 0.5 s late by exit 128+sig where
                # its parent saw a death by the signal without forkpoint. The kernel does force a
                # real fault on init: die by one as the program did (a segfault, abort()); any
                # other signal could not have killed it from inside, so exit at once.
                _sigutil.fault(sig)
                os._exit(128 + sig)
            os.kill(os.getpid(), sig)
            time.sleep(0.5)
            os._exit(128 + sig)
        os._exit(code)
