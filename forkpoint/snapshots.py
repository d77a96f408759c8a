"""Checkpoints as frozen processes: ``tsetjmp``, ``tlongjmp`` and ``chkpt_status``.

Process roles, all direct children of the shepherd (see ``_clone``):

* the **live** process runs the program; there is exactly one.
* a **keeper** is checkpoint *n* itself: forked by ``tsetjmp()``, it never runs program code again.
  It waits on its channel and forks spares when the shepherd asks.
* a **spare** is a ready copy of a keeper. A restore wakes a spare, which returns from the same
  ``tsetjmp()`` call as the new live process; the keeper then forks a replacement in the background.
  A restore is therefore a wake-up, not a fork, and a checkpoint can be restored any number of times.

Frozen processes block every signal, sit in a process group of their own (so terminal and group
signals never reach them), die with the shepherd (``PR_SET_PDEATHSIG``), and, where the process may
later leave it, run the keeper's background forks under ``SCHED_IDLE``.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import _channel, _clone, _prctl, _sigutil
from ._errors import ConfigurationError, ForkpointError, NoSuchCheckpoint, ThreadsAlive, WrongThread
from .persist import DEFAULT_SIZE, Arena

log = logging.getLogger("forkpoint")

CHKPT_RECOVERED = 1
CKPT_FROM_STATE = 2
CKPT_TO_STATE = 3
CKPT_SIGTYPE = 4
CKPT_NUMCHKPTS = 5

# The signals a program commonly dies of in native code; recover_on() accepts any.
_ITIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
_FAULTS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
_REPORTED = _FAULTS | {signal.SIGABRT}      # what faulthandler reports from inside the process
FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT)


@dataclass
class Config:
    """Settings; see ``forkpoint.configure``."""

    max_checkpoints: int = 16
    arena_size: int = DEFAULT_SIZE
    spares: int = 1
    allow_threads: bool = False
    shepherd_exec: bool = True
    max_snapshot_memory: int | None = None
    gc_freeze: bool = False


@dataclass
class CheckpointInfo:
    """One live checkpoint, as ``forkpoint.checkpoints()`` reports it."""

    id: int
    pid: int
    age: float
    pinned: bool
    spares: list[int] = field(default_factory=list)
    uss: int = 0
    pss: int = 0

    @property
    def memory(self) -> int:
        """Memory held only by this checkpoint's processes (USS, bytes)."""
        return self.uss


@dataclass
class _Saved:
    """What a snapshot must put back when it wakes, beyond its memory."""

    mask: Any
    offsets: dict[int, int]
    itimer: tuple[float, float]
    key: str | None = None


def _can_leave_sched_idle() -> bool:
    """SCHED_IDLE -> SCHED_OTHER needs CAP_SYS_NICE or an RLIMIT_NICE of at least 20 - nice."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    if int(line.split()[1], 16) & (1 << 23):
                        return True
        return resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, ValueError):
        return False


def _set_idle(pid: int = 0) -> None:
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        pass


def _file_offsets() -> dict[int, int]:
    """Offsets of the regular files open for reading now.

    fork() shares open file descriptions, so the live process moves the snapshot's offsets too;
    a restore puts them back. Write-only and append-mode files are left alone: they are logs and
    redirected output, which a rewind would overwrite.
    """
    out = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if flags & os.O_ACCMODE == os.O_WRONLY or flags & os.O_APPEND:
                continue
            out[fd] = os.lseek(fd, 0, os.SEEK_CUR)   # pipes, sockets and ttys fail with ESPIPE
        except OSError:
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            del out[fd]
    return out


def _other_threads() -> int:
    """Threads of this process besides the caller, native ones included.

    A thread that ``join()`` has just returned for may still be leaving the kernel's list for a
    moment, so when Python knows of no other thread the count is given a few milliseconds to settle.
    """
    deadline = time.monotonic() + 0.1
    while True:
        n = os.stat("/proc/self/task").st_nlink - 3      # ".", ".." and one entry per thread
        if n == 0 or threading.active_count() > 1 or time.monotonic() > deadline:
            return n
        time.sleep(0.001)


def _flush_stdio() -> None:
    """Flush Python's and C's stdio so that no buffered output is copied into the snapshot."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    _sigutil._libc.fflush(None)


def _handler_signal() -> int:
    """The signal whose Python handler is on the stack, or 0: tlongjmp(0) from a handler reports it.

    A handler is called as ``handler(signum, frame)``: look for a frame whose code is the handler
    installed for the signal number in its first argument (or second, for a bound method).
    """
    f: Any = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if 2 <= code.co_argcount <= 3:
            for var in code.co_varnames[: code.co_argcount - 1]:
                v = f.f_locals.get(var)
                if type(v) is int or isinstance(v, signal.Signals):
                    try:
                        h = signal.getsignal(v)
                    except (ValueError, OSError):
                        continue
                    if getattr(getattr(h, "__func__", h), "__code__", None) is code:
                        return int(v)
        f = f.f_back
    return 0


class _Runtime:
    """forkpoint's state inside one process of the program."""

    def __init__(self) -> None:
        self.config = Config()
        self.arena: Arena | None = None
        self.chan: Any = None
        self.shepherd_pid = 0
        self.owner_pid = 0
        self.pgid = 0
        self.comm = ""
        self.current = 0
        self.recovered = False
        self.from_state: int | None = None
        self.to_state: int | None = None
        self.sigtype = 0
        self.reason = ""
        self.attempt = 0
        self.recovery_seconds = 0.0
        self.unidle = False
        self.keeper: tuple[int, int] | None = None     # (checkpoint, pidfd) of the newest keeper
        self.fault_fd: int | None = None                # faulthandler's pipe to the shepherd
        self.altstack: Any = None
        self.policy_generation = 0                      # bumped by recover_on(), which replaces

    # -- checks -----------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.chan is not None

    def check_caller(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise WrongThread("forkpoint checkpoints can only be taken and restored from the main thread")
        if self.started and os.getpid() != self.owner_pid:
            raise ForkpointError(
                f"process {os.getpid()} is a child the program forked; only the program's live "
                f"process ({self.owner_pid}) can use its checkpoints")

    def check_threads(self, allow: bool | None) -> None:
        allow = self.config.allow_threads if allow is None else allow
        n = _other_threads() + 1
        if n > 1 and not allow:
            names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
            raise ThreadsAlive(
                f"{n - 1} other thread(s) alive ({', '.join(names) or 'native threads'}): fork() "
                "copies only this thread, so a snapshot would lose them; stop them, or pass "
                "allow_threads=True if the snapshot does not need them")

    def arena_or_create(self) -> Arena:
        if self.arena is None:
            self.arena = Arena.create(self.config.arena_size)
        return self.arena

    # -- start: the original process becomes the shepherd -----------------------------------------
    def ensure_started(self) -> None:
        if self.started:
            return
        if not _clone.SUPPORTED:
            raise ForkpointError("forkpoint supports Linux on x86_64 and aarch64 only")
        n = _other_threads() + 1
        if n > 1:
            raise ThreadsAlive(
                f"{n - 1} other thread(s) alive: forkpoint's first use turns this process into the "
                "shepherd and continues the program in a forked copy, which threads cannot follow; "
                "call forkpoint.start() before starting threads")
        arena = self.arena_or_create()
        self.pgid = os.getpgrp()
        self.comm = _prctl.get_name()
        self.unidle = _can_leave_sched_idle()
        mine, theirs = _channel.pair()
        fault_r, fault_w = os.pipe()
        _flush_stdio()
        old = _sigutil.block_all()
        timers = [(w, signal.getitimer(w)) for w in _ITIMERS]
        parent = os.getpid()
        _prctl.set_child_subreaper(True)
        try:
            pid = _clone.clone(sibling=False)
        except BaseException:
            _sigutil.restore_mask(old)
            os.close(fault_r)
            os.close(fault_w)
            raise
        if pid == 0:  # the live program goes on here
            theirs.close()
            os.close(fault_r)
            self.fault_fd = fault_w
            os.register_at_fork(after_in_child=_forget_in_forked_child)
            self.chan = mine
            self.shepherd_pid = parent
            self.owner_pid = os.getpid()
            _prctl.set_pdeathsig(signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(70)
            for which, value in timers:      # fork() does not copy interval timers; exec keeps them
                if value[0] > 0:
                    signal.setitimer(which, *value)
            _sigutil.restore_mask(old)
            log.debug("started: shepherd %d, live %d", parent, self.owner_pid)
            return
        mine.close()
        os.close(fault_w)
        from . import _shepherd  # never returns

        _shepherd.become_shepherd(theirs, arena, pid, self.pgid, self.config, fault_r)

    def watch_faults(self) -> None:
        """Report fatal signals to the shepherd the moment they happen, through faulthandler.

        The kernel tells the shepherd of a death only after it has torn the dead process's memory
        down (62 ms for a 1 GB heap the process had written). faulthandler's C-level handler writes
        "Fatal Python error: Segmentation fault" and the traceback to this pipe while the process is
        still in the handler, so the shepherd can wake the checkpoint at once; the process then dies
        by the signal as usual. Every process of the program inherits the write end; only the live
        one runs code. The shepherd copies the text to the program's stderr, where it would have
        gone.
        """
        import faulthandler

        if self.fault_fd is None or self.altstack is not None:
            return
        if faulthandler.is_enabled():
            log.info("faulthandler was enabled: forkpoint sends its reports through the shepherd")
        faulthandler.enable(file=self.fault_fd, all_threads=True)
        self.altstack = _sigutil.large_altstack()

    # -- the newest keeper, which a committing transaction kills itself --------------------------
    def hold_keeper(self, n: int, pid: int) -> None:
        """Keep a pidfd of checkpoint ``n``'s keeper (a pidfd cannot hit a recycled pid)."""
        if self.keeper is not None:
            os.close(self.keeper[1])
            self.keeper = None
        try:
            self.keeper = (n, os.pidfd_open(pid))
        except (OSError, AttributeError):      # before Linux 5.3: the shepherd kills it alone
            pass

    def kill_keeper(self, n: int) -> None:
        if self.keeper is None or self.keeper[0] != n:
            return
        _, fd = self.keeper
        self.keeper = None
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- requests to the shepherd -----------------------------------------------------------------
    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        # Signals wait until the reply is in: a handler that raised between the send and the recv
        # would leave the reply queued, and every later request would read its predecessor's.
        old = _sigutil.block_all()
        try:
            _channel.send(self.chan, msg)
            reply, _ = _channel.recv(self.chan)
        finally:
            _sigutil.restore_mask(old)
        if reply is None:
            raise ForkpointError("the shepherd is gone")
        if reply.get("op") == "error":
            kind = reply.get("kind")
            if kind == "nosuch":
                raise NoSuchCheckpoint(reply["message"])
            if kind == "config":
                raise ConfigurationError(reply["message"])
            raise ForkpointError(reply["message"])
        return reply


_rt = _Runtime()


def _forget_in_forked_child() -> None:
    """In a child the program forks itself (os.fork, multiprocessing): it is not part of forkpoint.

    Its copies of the channel and of the fault pipe are closed, so that it can neither be mistaken
    for the live process nor keep a dead live process's channel open; its fatal errors go to stderr.
    (forkpoint's own snapshots are made with a raw clone that runs no at-fork hooks.)
    """
    rt = _rt
    if rt.chan is not None:
        rt.chan.close()
        rt.chan = None
    if rt.keeper is not None:
        os.close(rt.keeper[1])
        rt.keeper = None
    if rt.fault_fd is not None:
        if rt.altstack is not None:
            import faulthandler

            faulthandler.enable(file=sys.stderr, all_threads=True)
        os.close(rt.fault_fd)
        rt.fault_fd = None


def runtime() -> _Runtime:
    return _rt


# ---- snapshot side -------------------------------------------------------------------------------
def _frozen(rt: _Runtime, n: int, spares: int) -> dict[str, Any]:
    """Run as keeper of checkpoint ``n``; return the wake-up message in a spare that goes live.

    Only a woken spare returns. Every other way out ends the process here, so a snapshot can
    never run program code by accident.
    """
    role = "keeper"
    try:
        if rt.unidle:
            _set_idle()          # first: the live process must get the CPU back at once
        shepherd = rt.shepherd_pid
        _prctl.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != shepherd:
            os._exit(0)
        os.setpgid(0, 0)
        _prctl.set_name(f"fp-snap-{n}")
        # Introduce ourselves on the live process's channel (inherited), with a channel of our
        # own: this work is ours, not the live process's, so it stays off tsetjmp()'s path.
        chan, theirs = _channel.pair()
        _channel.send(rt.chan, {"op": "hello", "n": n, "pid": os.getpid()}, (theirs.fileno(),))
        theirs.close()
        rt.chan.close()
        rt.chan = chan
        todo = ["fork"] * spares
        while True:
            msg: dict[str, Any] | None
            if todo:
                op, msg = todo.pop(), {"op": "warm"}
            else:
                msg, _ = _channel.recv(chan)
                if msg is None:
                    os._exit(0)
                op = msg["op"]
            if role == "spare" and op == "wake":
                return msg
            if role == "spare" and op == "warm":
                _prewarm(rt)
                continue
            if role == "keeper" and op == "fork":
                mine, theirs = _channel.pair()
                pid = _clone.clone(sibling=True)
                if pid == 0:
                    role = "spare"
                    chan.close()
                    theirs.close()
                    chan = mine
                    _prctl.set_pdeathsig(signal.SIGKILL)
                    if os.getppid() != shepherd:
                        os._exit(0)
                    _prctl.set_name(f"fp-spare-{n}")
                    if rt.unidle:
                        try:
                            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                        except OSError:      # privileges dropped since start: stay, but serve
                            pass
                    rt.chan = chan
                    todo.append("warm")
                    continue
                mine.close()
                _channel.send(chan, {"op": "spare", "n": n, "pid": pid}, (theirs.fileno(),))
                theirs.close()
                if rt.unidle:
                    _set_idle()          # the shepherd may have raised us for an urgent copy
            elif op == "exit":
                os._exit(0)
    except BaseException:  # noqa: BLE001 - a snapshot must never fall back into program code
        os._exit(70)


def _prewarm(rt: _Runtime) -> None:
    """Touch, while frozen, what a wake-up will touch.

    A spare shares every page with its keeper; the first write to each one after the wake-up is a
    copy-on-write fault on the restore path. Running the wake-up's machinery once without effect
    (same name, same process group, same mask, a message encoded and decoded) takes those faults
    now, in the background, for a few dozen private pages per spare.
    """
    try:
        _channel.json.loads(_channel.json.dumps({"op": "wake", "from": 0, "sig": 0, "reason": "x",
                                                 "attempt": 1, "t": time.monotonic(), "n": 0}))
        _prctl.set_name(_prctl.get_name())
        os.setpgid(0, os.getpgid(0))
        mask = _sigutil.new_mask()
        _sigutil.block_all(mask)
        _sigutil.restore_mask(mask)
        _sigutil.drain_pending()
        signal.getitimer(signal.ITIMER_REAL)
        log.isEnabledFor(logging.WARNING)
        for name in ("recovered", "from_state", "to_state", "sigtype", "reason", "attempt",
                     "recovery_seconds", "current", "owner_pid"):
            setattr(rt, name, getattr(rt, name))
    except Exception:  # noqa: BLE001 - warming is an optimisation only
        pass


def _resume(rt: _Runtime, n: int, saved: _Saved, msg: dict[str, Any]) -> None:
    """Turn a woken spare into the live program."""
    rt.owner_pid = os.getpid()
    _sigutil.drain_pending()        # before rejoining the terminal's group: what comes later is real
    try:
        os.setpgid(0, rt.pgid)
    except OSError as e:
        log.warning("restored process could not rejoin process group %d: %s", rt.pgid, e)
    _prctl.set_name(rt.comm)
    for fd, off in saved.offsets.items():
        try:
            os.lseek(fd, off, os.SEEK_SET)
        except OSError:
            pass
    if saved.itimer[0] > 0:
        signal.setitimer(signal.ITIMER_REAL, *saved.itimer)
    rt.current = n
    rt.recovered = True
    rt.from_state = int(msg["from"])
    rt.to_state = n
    rt.sigtype = int(msg["sig"])
    rt.reason = str(msg.get("reason", ""))
    rt.attempt = int(msg.get("attempt", 1))
    rt.recovery_seconds = time.monotonic() - float(msg.get("t", time.monotonic()))
    if saved.key is not None and rt.arena is not None:
        rt.arena.set_processing(saved.key)   # the checkpoint was taken inside processing(key)
    _sigutil.restore_mask(saved.mask)
    _channel.send(rt.chan, {"op": "up"})
    level = logging.INFO if rt.sigtype == 0 and rt.reason == "tlongjmp" else logging.WARNING
    log.log(level, "restored checkpoint %d (from state %d, signal %d: %s)",
            n, rt.from_state, rt.sigtype, rt.reason)


# ---- the public API ------------------------------------------------------------------------------
def tsetjmp(pin: bool = False, *, allow_threads: bool | None = None, spares: int | None = None) -> int:
    """Take checkpoint *n* (1, 2, 3, ... over the program's life) and return *n*.

    When the program is later restored to *n*, execution goes on by returning *n* from this same
    call again; ``chkpt_status(CHKPT_RECOVERED)`` tells the two apart. ``pin=True`` keeps the
    checkpoint when older ones are discarded to stay within ``max_checkpoints``. ``spares`` (default
    ``configure(spares=...)``, 1) is how many ready copies are kept so that a restore is a wake-up;
    0 makes a restore fork the copy on demand (slower, but the checkpoint costs one fork, not two).
    """
    rt = _rt
    rt.check_caller()
    rt.check_threads(allow_threads)
    rt.ensure_started()
    assert rt.arena is not None
    spares = rt.config.spares if spares is None else spares
    if not isinstance(spares, int) or spares < 0:
        raise ConfigurationError(f"spares must be an int >= 0, got {spares!r}")
    if rt.config.gc_freeze:
        import gc

        gc.collect()
        gc.freeze()
    n = rt.arena.take_id()
    _flush_stdio()
    saved = _Saved(mask=_sigutil.new_mask(), offsets=_file_offsets(),
                   itimer=signal.getitimer(signal.ITIMER_REAL), key=rt.arena.processing())
    # The shepherd hears of the checkpoint before the fork: after it, every page this process
    # touches is copied on first write, so the parent's side of the fork does as little as it
    # can. The keeper introduces itself (pid and channel) from its own side.
    _sigutil.block_all(saved.mask)      # from the announcement to the fork, nothing interrupts
    _channel.send(rt.chan, {"op": "snap", "n": n, "pin": bool(pin), "spares": spares})
    try:
        pid = _clone.clone(sibling=True)
    except BaseException:
        _sigutil.restore_mask(saved.mask)
        _channel.send(rt.chan, {"op": "discard", "n": n, "quiet": True})
        raise
    if pid == 0:
        msg = _frozen(rt, n, spares)
        _resume(rt, n, saved, msg)
        return n
    _sigutil.restore_mask(saved.mask)
    rt.hold_keeper(n, pid)
    rt.current = n
    return n


def tlongjmp(n: int = 0, sig: int = 0, reason: str | None = None) -> None:
    """Restore checkpoint ``n`` (0: the current state's); on success this call never returns.

    The process that calls it is killed and the checkpoint's copy resumes by returning ``n`` from
    its ``tsetjmp()``. An unknown, discarded or negative ``n`` raises ``NoSuchCheckpoint`` and
    changes nothing. Called from a Python signal handler, the handler's signal is what
    ``chkpt_status(CKPT_SIGTYPE)`` reports after the restore; ``sig`` sets it explicitly.
    """
    rt = _rt
    rt.check_caller()
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise NoSuchCheckpoint(f"invalid checkpoint number {n!r}")
    if reason is not None:
        reason = str(reason)[:200]
    if not rt.started:
        raise NoSuchCheckpoint(f"no checkpoint {n} (no checkpoint has been taken)")
    if not sig:
        sig = _handler_signal()
    target = n or rt.current
    if target == 0:
        raise NoSuchCheckpoint("no current checkpoint to restore")
    _flush_stdio()
    old = _sigutil.block_all()
    try:
        rt.request({"op": "restore", "n": target, "sig": int(sig),
                    "reason": reason or ("signal" if sig else "tlongjmp")})
    except NoSuchCheckpoint:
        _sigutil.restore_mask(old)
        raise
    except BaseException:
        # The shepherd went away mid-restore: it may already have woken the copy, so this
        # process must never run program code again.
        os._exit(70)
    while True:  # pragma: no cover - the shepherd kills this process
        if _channel.recv(rt.chan)[0] is None:
            os._exit(70)


def chkpt_status(kind: int) -> int:
    """The paper's chkpt_status(): see the ``CHKPT_*``/``CKPT_*`` constants."""
    rt = _rt
    if kind == CHKPT_RECOVERED:
        return 1 if rt.recovered else 0
    if kind == CKPT_FROM_STATE:
        if rt.from_state is None:
            raise OSError(errno.EINVAL, "no restore has happened")
        return rt.from_state
    if kind == CKPT_TO_STATE:
        if rt.to_state is None:
            raise OSError(errno.EINVAL, "no restore has happened")
        return rt.to_state
    if kind == CKPT_SIGTYPE:
        return rt.sigtype
    if kind == CKPT_NUMCHKPTS:
        return rt.arena.checkpoints_taken if rt.arena is not None else 0
    raise OSError(errno.EINVAL, f"unknown chkpt_status kind {kind!r}")


def start() -> None:
    """Start forkpoint now: the process becomes the shepherd and the program goes on in its copy.

    Any first use does this implicitly; call it early (before starting threads, before loading a
    large heap) to choose the moment.
    """
    _rt.check_caller()
    _rt.ensure_started()


def current_state() -> int:
    """The checkpoint most recently taken or restored to (0 before the first)."""
    return _rt.current


def restore_reason() -> str:
    """Why this process was restored ('' if it was not)."""
    return _rt.reason


def recovery_seconds() -> float:
    """How long the last restore took, from the moment the shepherd saw the failure (or the
    restore request) to this process running again; 0.0 if this process was not restored."""
    return _rt.recovery_seconds if _rt.recovered else 0.0


def recover_on(*signals: int, to: int = 0, **policy: Any) -> None:
    """Restore checkpoint ``to`` (0: the live state's) when the live process dies by one of ``signals``.

    Death by a real fault (SIGSEGV in C code, SIGABRT, SIGBUS, SIGFPE, SIGILL) or SIGKILL cannot be
    caught by Python; the shepherd sees it and wakes the checkpoint. Policy keywords
    (``max_recoveries``, ``within``, ``backoff``, ``stable_after``) bound crash loops.
    """
    rt = _rt
    rt.check_caller()
    sigs = [int(signal.Signals(s)) for s in signals]
    for s in sigs:
        handler = signal.getsignal(s)
        if s in _FAULTS and callable(handler):
            log.warning("a Python handler is installed for %s: a real fault in C code never reaches "
                        "it and spins forever, so the shepherd cannot recover it; leave %s at "
                        "SIG_DFL and let recover_on() handle it", signal.Signals(s).name,
                        signal.Signals(s).name)
    if not isinstance(to, int) or to < 0:
        raise NoSuchCheckpoint(f"invalid checkpoint number {to!r}")
    rt.ensure_started()
    rt.request({"op": "policy", "signals": sigs, "to": to, **policy})
    rt.policy_generation += 1
    if _REPORTED.intersection(sigs):
        rt.watch_faults()


def _merge_policy(signals: tuple[int, ...], **policy: Any) -> None:
    """Add ``signals`` (and settings) to the recovery policy without replacing it."""
    rt = _rt
    rt.ensure_started()
    sigs = [int(signal.Signals(s)) for s in signals]
    rt.request({"op": "policy", "merge": True, "signals": sigs, **policy})
    if _REPORTED.intersection(sigs):
        rt.watch_faults()


def discard(n: int) -> None:
    """Discard checkpoint ``n``: its processes exit and ``tlongjmp(n)`` raises NoSuchCheckpoint."""
    rt = _rt
    rt.check_caller()
    if not isinstance(n, int) or n <= 0 or not rt.started:
        raise NoSuchCheckpoint(f"no checkpoint {n!r}")
    rt.request({"op": "discard", "n": n})


def _release(n: int, current: int) -> None:
    """Discard checkpoint ``n`` without waiting, and make ``current`` the current state again.

    For a transaction that committed: its entry checkpoint is no longer needed, and the state to
    go back to is again the one before the call.
    """
    rt = _rt
    old = _sigutil.block_all()       # both or neither: the shepherd's current state must follow ours
    try:
        rt.current = current
        _channel.send(rt.chan, {"op": "discard", "n": n, "quiet": True, "current": current})
    finally:
        _sigutil.restore_mask(old)
    # Kill the keeper ourselves rather than wait for the shepherd to: until it is gone, every page
    # this process writes is still copied (measured: +40% requests/s for a trivial handler).
    rt.kill_keeper(n)


def checkpoints() -> list[CheckpointInfo]:
    """The live checkpoints, oldest first, with their memory (USS and PSS of keeper and spares)."""
    rt = _rt
    if not rt.started:
        return []
    rt.check_caller()
    reply = rt.request({"op": "list"})
    return [CheckpointInfo(**c) for c in reply["checkpoints"]]


def configure(**settings: Any) -> None:
    """Change settings: ``max_checkpoints``, ``spares``, ``allow_threads``, ``max_snapshot_memory``,
    ``gc_freeze``, and before the first checkpoint ``arena_size`` and ``shepherd_exec``."""
    rt = _rt
    for key, value in settings.items():
        if not hasattr(rt.config, key):
            raise ConfigurationError(f"unknown setting {key!r}")
        if key in ("arena_size",) and rt.arena is not None:
            raise ConfigurationError("arena_size can only be set before the arena is created")
        if key == "shepherd_exec" and rt.started:
            raise ConfigurationError("shepherd_exec can only be set before the first checkpoint")
        least = {"max_checkpoints": 1, "spares": 0}.get(key)
        if least is not None and (not isinstance(value, int) or value < least):
            raise ConfigurationError(f"{key} must be an int >= {least}")
        if key == "max_snapshot_memory" and value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigurationError("max_snapshot_memory must be a positive int (bytes) or None")
    for key, value in settings.items():
        setattr(rt.config, key, value)
    if rt.started:
        rt.request({"op": "configure", **{k: v for k, v in settings.items()
                                          if k in ("max_checkpoints", "max_snapshot_memory")}})


def shepherd_pid() -> int:
    """The program's public PID (the shepherd's), or this process's own before the first checkpoint."""
    return _rt.shepherd_pid or os.getpid()


