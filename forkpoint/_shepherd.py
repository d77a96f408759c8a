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
"""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import select
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _channel, _prctl, _sigutil
from .persist import Arena
from .policy import Decision, Policy, RecoveryPolicy

log = logging.getLogger("forkpoint")

FORWARDED = {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH, signal.SIGALRM}
# The terminal sends these to its whole foreground process group, the live process included.
TTY_SIGNALS = {signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGWINCH}
EX_SOFTWARE = 70
# faulthandler's first line names the signal (Python/faulthandler.c: faulthandler_handlers).
_FAULT_HEADER = re.compile(rb"Fatal Python error: (Segmentation fault|Bus error|Floating point "
                           rb"exception|Aborted|Illegal instruction)\n")
_FAULT_SIGNALS = {"Segmentation fault": signal.SIGSEGV, "Bus error": signal.SIGBUS,
                  "Floating point exception": signal.SIGFPE, "Aborted": signal.SIGABRT,
                  "Illegal instruction": signal.SIGILL}
_ENV = "FORKPOINT_SHEPHERD_ARGS"
_BOOT = "import sys;sys.path.insert(0,sys.argv[1]);from forkpoint._shepherd import main;main()"


@dataclass
class Proc:
    pid: int
    role: str                     # live, keeper, spare or dying
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
    pending: dict[str, Any] | None = None
    want_spares: int = 1
    awaiting: bool = False        # the keeper has not introduced itself yet
    announcer: Any = None         # the live process that took it: its keeper says hello on its channel


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def become_shepherd(chan: socket.socket, arena: Arena, live_pid: int, pgid: int, config: Any,
                    faults: int) -> None:
    """Turn the original process into the shepherd; never returns."""
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
            for which in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
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


def main() -> None:
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


def _pending_signals(pid: int) -> list[int]:
    """Signals pending (blocked, not yet delivered) in process ``pid``, from /proc/PID/status."""
    mask = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")):
                    mask |= int(line.split()[1], 16)
    except (OSError, ValueError):
        return []
    return [sig for sig in range(1, 65) if mask >> (sig - 1) & 1]


def _smaps(pid: int) -> tuple[int, int]:
    """(USS, PSS) of a process in bytes, from /proc/PID/smaps_rollup."""
    uss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Private_Clean", "Private_Dirty"):
                    uss += int(rest.split()[0]) * 1024
                elif key == "Pss":
                    pss = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return uss, pss


class Shepherd:
    def __init__(self, chan: socket.socket, arena: Arena, args: dict[str, Any]) -> None:
        self.arena = arena
        self.pgid = args["pgid"]
        self.max_checkpoints = args["max_checkpoints"]
        self.max_memory = args.get("max_snapshot_memory")
        self.procs: dict[int, Proc] = {}
        self.ckpts: dict[int, Checkpoint] = {}
        self.policy = RecoveryPolicy()
        self.current = 0
        self.started = time.time()
        self.recoveries = 0
        self.pending_signals: list[int] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.sel = selectors.DefaultSelector()
        self.live: Proc | None = self._add(args["live"], "live", 0, chan)
        self.live_up = True
        self.operator: Any = None
        self.reaped_unknown: list[tuple[int, float]] = []   # recently reaped pids we did not know
        self.list_waiters: list[Proc] = []
        self.list_batch = 0
        self.faults: int | None = args.get("faults")
        self.fault_tail = b""
        self.fault_report = b""

    # -- bookkeeping ----------------------------------------------------------------------------
    def _add(self, pid: int, role: str, n: int, chan: socket.socket | None) -> Proc:
        """Track a process; a keeper is added with pid 0 until it introduces itself."""
        proc = Proc(pid, role, n, chan, lived=(role == "live"))
        if pid:
            self.procs[pid] = proc
        if chan is not None:
            chan.setblocking(True)
            self.sel.register(chan, selectors.EVENT_READ, lambda p=proc: self._on_message(p))
        return proc

    def _close(self, proc: Proc) -> None:
        if proc.chan is not None:
            try:
                self.sel.unregister(proc.chan)
            except (KeyError, ValueError):
                pass
            proc.chan.close()
            proc.chan = None

    def _retire(self, proc: Proc) -> None:
        """Kill a process whose work is over, its teardown kept out of the live process's way.

        The kill comes before the channel is closed: a process blocked on its channel (a live
        process inside tlongjmp) must never see EOF while it can still run, or it would raise into
        program code next to the restored process.
        """
        proc.role = "dying"
        if proc.pid <= 0:     # a keeper that has not introduced itself: EOF on its channel ends it
            self._close(proc)
            return
        if proc.lived:        # signals forwarded to it but still blocked there go to its successor
            self.pending_signals.extend(s for s in _pending_signals(proc.pid) if s in FORWARDED)
        try:
            os.sched_setscheduler(proc.pid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not proc.lived:   # a live process's keepers may still introduce themselves on its channel
            self._close(proc)

    def _send(self, proc: Proc, msg: dict[str, Any]) -> bool:
        if proc.chan is None:
            return False
        try:
            _channel.send(proc.chan, msg)
            return True
        except OSError:
            return False

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + delay, fn))

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> None:
        _prctl.set_child_subreaper(True)
        _prctl.set_name("fp-shepherd")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:                 # two channels per checkpoint, and the operator's clients
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        for which in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
            signal.setitimer(which, 0)   # exec kept the program's timers; the live process has them
        watched = FORWARDED | {signal.SIGCHLD}
        _sigutil.block_all()
        self.sfd = _sigutil.open_signalfd(watched)
        for s in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(s, signal.SIG_DFL)     # stop and continue with the job, like the program
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        _sigutil.restore_mask(_sigutil.mask_of(watched))
        self.sel.register(self.sfd, selectors.EVENT_READ, self._on_signals)
        if self.faults is not None:
            os.set_blocking(self.faults, False)
            self.sel.register(self.faults, selectors.EVENT_READ, self._on_fault_report)
        try:
            from .operator import OperatorServer
            self.operator = OperatorServer(self)
        except ImportError:
            pass
        except Exception as e:  # noqa: BLE001 - the program runs without operator control
            log.warning("operator socket unavailable: %s", e)
        self._reap()   # the live process may have died before we watched SIGCHLD
        if self.max_memory:
            self.after(1.0, self._memory_tick)
        while True:
            timeout = None
            if self.timers:
                timeout = max(0.0, min(t for t, _ in self.timers) - time.monotonic())
            for key, _ in self.sel.select(timeout):
                key.data()
            now = time.monotonic()
            due = [t for t in self.timers if t[0] <= now]
            if due:
                self.timers = [t for t in self.timers if t[0] > now]
                for _, fn in due:
                    fn()

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

    def _on_fault_report(self, act: bool = True) -> None:
        """faulthandler in the live process reports a fatal signal, before the process dies.

        The text goes on to the program's stderr, where faulthandler would have written it; a
        report's first line names the signal, which decides at once whether to restore. With
        ``act=False`` (the death is being handled already) the report is only passed on: it must
        never be taken for a fault of the process restored after it.
        """
        if self.faults is None:
            return
        try:
            chunk = os.read(self.faults, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.sel.unregister(self.faults)
            self.faults = None
            return
        if not self.fault_report:
            self.after(0.05, self._flush_fault_report)     # a report arrives in many small writes
        self.fault_report += chunk
        text = self.fault_tail + chunk
        end = 0
        for header in _FAULT_HEADER.finditer(text):
            end = header.end()
            if act:
                self._on_fault(_FAULT_SIGNALS[header.group(1).decode()])
        self.fault_tail = text[max(end, len(text) - 64):]     # a header split across two reads

    def _flush_fault_report(self) -> None:
        report, self.fault_report = self.fault_report, b""
        try:
            os.write(2, report)
        except OSError:
            pass

    def _on_fault(self, sig: int) -> None:
        live = self.live
        if live is None:
            return
        self._drain(live)               # a checkpoint it took just before comes first
        pol = self.policy.policy
        target = pol.to or self.current
        if sig not in pol.signals or target not in self.ckpts:
            return                      # it dies as it would have; the reaper takes it from there
        # It is inside faulthandler's C handler; a handler it chains to must not run program code
        # beside the restored process, so it is killed now (its report may be cut short).
        self.live = None
        self._retire(live)
        self._failure(target, sig, f"killed by {_signame(sig)}", None)

    def _forward(self, sig: int) -> None:
        if self.live is not None and self.live_up:
            try:
                os.kill(self.live.pid, sig)
            except ProcessLookupError:
                self.pending_signals.append(sig)
        else:
            self.pending_signals.append(sig)

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
            now = time.monotonic()
            self.reaped_unknown = [(p, t) for p, t in self.reaped_unknown if now - t < 10.0][-63:]
            self.reaped_unknown.append((pid, now))
            return
        self._drain(proc)     # what it said before dying (a checkpoint it took) comes first
        self.procs.pop(pid, None)
        if proc.role == "dying":
            return
        if proc is not self.live:
            self._close(proc)
        # A live process's channel stays open until EOF: keepers it forked introduce themselves
        # on it, possibly after it died.
        if proc is self.live:
            self.live = None
            proc.role = "dying"       # only its keepers' hellos may still arrive on its channel
            self._on_fault_report(act=False)   # its report, if any, is in the pipe by now
            self._on_live_death(status)
            return
        ck = self.ckpts.get(proc.n)
        if ck is None:
            return
        log.warning("checkpoint %d lost its %s process %d (status %d)", proc.n, proc.role, pid, status)
        if proc.role == "keeper":
            ck.keeper = None
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
        except ValueError as e:             # a malformed message is dropped, the channel kept
            log.error("dropped a malformed message from process %d: %s", proc.pid, e)
            return
        except OSError:
            msg, fds = None, []
        if msg is None or not isinstance(msg, dict):
            self._close(proc)
            for fd in fds:
                os.close(fd)
            if proc.lived:                  # no keeper can introduce itself on this channel now
                for ck in [c for c in self.ckpts.values() if c.awaiting and c.announcer is proc]:
                    self._discard(ck.n, "its keeper never introduced itself")
            return
        op = msg.get("op")
        if proc.role == "dying" and op != "hello":
            for fd in fds:
                os.close(fd)
            return
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            for fd in fds:
                os.close(fd)
            self._send(proc, {"op": "error", "message": f"unknown request {op!r}"})
            return
        try:
            handler(proc, msg, fds)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            log.error("could not handle %r from process %d: %r", op, proc.pid, e)

    def _op_snap(self, proc: Proc, msg: dict[str, Any], fds: list[int]) -> None:
        n = int(msg["n"])
        if n in self.ckpts:                 # ids are never reused: only a corrupted arena does this
            self._discard(n, "its id was taken again")
        self.ckpts[n] = Checkpoint(n, None, bool(msg.get("pin")), awaiting=True, announcer=proc,
                                   want_spares=int(msg["spares"]))
        self.current = n
        self._enforce_bounds()

    def _op_hello(self, proc: Proc, msg: dict[str, Any], fds: list[int]) -> None:
        """A keeper introduces itself, on the channel of the live process that forked it."""
        n, pid = int(msg["n"]), int(msg["pid"])
        if not fds:                                  # its channel was lost (EMFILE): it cannot serve
            os.kill(pid, signal.SIGKILL)
            self._discard(n, "its keeper's channel was lost")
            return
        keeper = self._add(pid, "keeper", n, socket.socket(fileno=fds[0]))
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
            self._urge(keeper)
        self._answer_list()

    def _op_spare(self, proc: Proc, msg: dict[str, Any], fds: list[int]) -> None:
        n = int(msg["n"])
        if not fds:
            os.kill(int(msg["pid"]), signal.SIGKILL)
            return
        spare = self._add(int(msg["pid"]), "spare", n, socket.socket(fileno=fds[0]))
        ck = self.ckpts.get(n)
        if ck is None:
            self._retire(spare)
            return
        ck.spares.append(spare)
        if ck.pending is not None:
            info, ck.pending = ck.pending, None
            self._wake(ck, info)

    def _op_up(self, proc: Proc, msg: dict[str, Any], fds: list[int]) -> None:
        if proc is self.live:
            self.live_up = True
            pending, self.pending_signals = self.pending_signals, []
            for sig in pending:
                self._forward(sig)

    def _op_restore(self, proc: Proc, msg: dict[str, Any], fds: list[int]) -> None:
        n = int(msg["n"])
        if n not in self.ckpts:
            self._send(proc, {"op": "error", "kind": "nosuch", "message": self._nosuch(n)})
            return
        self._failure(n, int(msg.get("sig", 0)), str(msg.get("reason") or "tlongjmp"), proc)

    def _op_discard(self, proc: Proc, msg: dict[str, Any], fds: list[int]) -> None:
        n = int(msg["n"])
        quiet = bool(msg.get("quiet"))
        if "current" in msg and proc is self.live:
            self.current = int(msg["current"])
        if n not in self.ckpts:
            if not quiet:
                self._send(proc, {"op": "error", "kind": "nosuch", "message": self._nosuch(n)})
            return
        self._discard(n, "discarded by the program")
        if not quiet:
            self._send(proc, {"op": "ok"})

    def _op_list(self, proc: Proc, msg: dict[str, Any], fds: list[int]) -> None:
        # Answered once every keeper has introduced itself, so that each entry has its pid.
        self.list_waiters.append(proc)
        if len(self.list_waiters) == 1:     # a backstop for this batch of waiters only
            batch = self.list_batch
            self.after(1.0, lambda: self._answer_list(force=batch == self.list_batch))
        self._answer_list()

    def _answer_list(self, force: bool = False) -> None:
        if not self.list_waiters or (not force and any(c.awaiting for c in self.ckpts.values())):
            return
        self.list_batch += 1
        waiters, self.list_waiters = self.list_waiters, []
        listing = self.describe()
        for proc in waiters:
            self._send(proc, {"op": "ok", "checkpoints": listing})

    def _op_policy(self, proc: Proc, msg: dict[str, Any], fds: list[int]) -> None:
        try:
            if msg.get("merge"):
                self.policy.policy = self.policy.policy.merged(msg)
            else:
                self.policy.policy = Policy.from_message(msg)
        except (ValueError, TypeError) as e:
            self._send(proc, {"op": "error", "kind": "config", "message": str(e)})
            return
        self._send(proc, {"op": "ok"})

    def _op_configure(self, proc: Proc, msg: dict[str, Any], fds: list[int]) -> None:
        self.max_checkpoints = msg.get("max_checkpoints", self.max_checkpoints)
        if "max_snapshot_memory" in msg:
            first = not self.max_memory
            self.max_memory = msg["max_snapshot_memory"]
            if self.max_memory and first:
                self.after(0.0, self._memory_tick)
        self._enforce_bounds()
        self._send(proc, {"op": "ok"})

    def _nosuch(self, n: int) -> str:
        have = ", ".join(map(str, sorted(self.ckpts))) or "none"
        return f"no checkpoint {n} (live checkpoints: {have})"

    # -- restores -------------------------------------------------------------------------------
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
        if sig in pol.signals:
            target = pol.to or self.current
            if target in self.ckpts:
                self._failure(target, sig, f"killed by {_signame(sig)}", None)
                return
            log.error("live process died by %s and there is no checkpoint %sto restore: ending",
                      _signame(sig), f"{target} " if target else "")
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
            decision = Decision("restore", target, 0.0, 1, cause, None)
        else:
            decision = self.policy.decide(target, sig, key, sorted(self.ckpts), time.time(), cause,
                                          budgeted=bool(sig))
        if requester is not None:
            self.live = None
            self._retire(requester)
        if decision.quarantine is not None:
            from .recovery import add_quarantine

            add_quarantine(self.arena, decision.quarantine, self.policy.policy.quarantine_size)
            self.arena.append_history(from_state, target, sig, "quarantined", decision.quarantine)
            log.warning("quarantined input %r: it failed %d time(s) (%s)", decision.quarantine,
                        self.policy.policy.quarantine_after, cause)
        if decision.action == "give_up":
            self.arena.append_history(from_state, target, sig, decision.reason[:64], key)
            log.error("%s", decision.reason)
            if sig:
                self.shutdown(sig=sig)
            self.shutdown(code=EX_SOFTWARE)
        self.recoveries += 1
        escalated = decision.target != target
        log.log(logging.WARNING if escalated else logging.INFO, "restoring checkpoint %d from %d (%s)%s",
                decision.target, from_state, decision.reason,
                f" after {decision.delay:g}s backoff" if decision.delay else "")
        info = {"op": "wake", "from": from_state, "sig": sig, "reason": decision.reason,
                "attempt": decision.attempt, "t": detected}
        self.current = decision.target
        ck = self.ckpts[decision.target]

        def restore() -> None:
            # recorded when it happens, so the restored process finds it in history()
            self.arena.append_history(from_state, decision.target, sig, decision.reason[:64], key)
            self._wake(ck, info)

        if decision.delay > 0:
            self.after(decision.delay, restore)
        else:
            restore()

    def _wake(self, ck: Checkpoint, info: dict[str, Any]) -> None:
        if self.ckpts.get(ck.n) is not ck:
            log.error("checkpoint %d vanished before it could be restored: ending", ck.n)
            self._give_up(info)
        while ck.spares:
            spare = ck.spares.pop(0)
            if self._send(spare, dict(info, n=ck.n)):
                spare.role, spare.lived = "live", True
                self.live, self.live_up = spare, False
                self._replenish(ck)
                return
            self._retire(spare)
        ck.pending = info
        if ck.awaiting:      # the keeper will be asked to fork as soon as it introduces itself
            self.after(5.0, lambda: self._check_awaiting(ck, info))
            return
        if ck.keeper is None or not self._urge(ck.keeper):
            log.error("checkpoint %d cannot be restored: its keeper is gone", ck.n)
            self._give_up(info)

    def _urge(self, keeper: Proc) -> bool:
        """Ask a keeper for a copy that a restore is waiting for, at normal priority.

        Keepers fork in the background under SCHED_IDLE; on a machine whose CPUs are busy that
        work barely runs, and here the program itself waits for it. The keeper goes back to
        SCHED_IDLE after the fork.
        """
        try:
            os.sched_setscheduler(keeper.pid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
        return self._send(keeper, {"op": "fork"})

    def _check_awaiting(self, ck: Checkpoint, info: dict[str, Any]) -> None:
        if ck.pending is info and (self.ckpts.get(ck.n) is not ck or ck.awaiting):
            log.error("checkpoint %d never got its keeper: ending", ck.n)
            self._give_up(info)

    def _give_up(self, info: dict[str, Any]) -> None:
        """A restore that was decided cannot happen: end as the failure would have ended it."""
        if info.get("sig"):
            self.shutdown(sig=int(info["sig"]))
        self.shutdown(code=EX_SOFTWARE)

    def _replenish(self, ck: Checkpoint) -> None:
        if ck.keeper is not None and len(ck.spares) < ck.want_spares:
            self._send(ck.keeper, {"op": "fork"})

    def restore_by_operator(self, n: int, reason: str) -> None:
        if self.live is not None:
            live, self.live = self.live, None
            self._retire(live)
        self._failure(n, 0, f"operator: {reason}"[:64], None, operator=True)

    # -- registry -------------------------------------------------------------------------------
    def _discard(self, n: int, why: str) -> None:
        ck = self.ckpts.pop(n, None)
        if ck is None:
            return
        log.info("discarding checkpoint %d: %s", n, why)
        self.after(0.0, self._answer_list)
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

    def memory(self, ck: Checkpoint) -> tuple[int, int]:
        uss = pss = 0
        for proc in ([ck.keeper] if ck.keeper else []) + ck.spares:
            u, p = _smaps(proc.pid)
            uss += u
            pss += p
        return uss, pss

    def _memory_tick(self) -> None:
        if not self.max_memory:
            return
        sizes = {n: self.memory(ck)[1] for n, ck in self.ckpts.items()}
        total = sum(sizes.values())
        for n in sorted(sizes):
            if total <= self.max_memory:
                break
            ck = self.ckpts[n]
            if ck.pinned or n == self.current:
                continue
            log.warning("checkpoint %d discarded: snapshots hold %d bytes (PSS), budget %d",
                        n, total, self.max_memory)
            self._discard(n, "memory budget")
            total -= sizes[n]
        self.after(1.0, self._memory_tick)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        now = time.time()
        for n in sorted(self.ckpts):
            ck = self.ckpts[n]
            uss, pss = self.memory(ck)
            out.append({"id": n, "pid": ck.keeper.pid if ck.keeper else 0, "age": now - ck.taken,
                        "pinned": ck.pinned, "spares": [p.pid for p in ck.spares], "uss": uss, "pss": pss})
        return out

    # -- the end --------------------------------------------------------------------------------
    def shutdown(self, code: int = 0, sig: int = 0) -> None:
        """Kill every process of the program, reap them, and end as the program ended."""
        for proc in list(self.procs.values()):
            if proc.role != "dying":
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
        if self.operator is not None:
            self.operator.close()
        if self.faults is not None:
            try:
                self.fault_report += os.read(self.faults, 65536)
            except OSError:
                pass
            self._flush_fault_report()
        if sig:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            os.kill(os.getpid(), sig)
            time.sleep(0.5)
            os._exit(128 + sig)
        os._exit(code)
