"""Checkpoints as frozen processes: ``tsetjmp``, ``tlongjmp`` and ``chkpt_status``.

``tsetjmp()`` forks a frozen copy of the program (``_frozen``) that waits on its channel to the
shepherd; ``tlongjmp(n)`` asks the shepherd to kill the caller and wake a copy of checkpoint *n*,
which returns from its ``tsetjmp()`` a second time. docs/architecture.md describes the model.
"""
from __future__ import annotations

import _signal
import errno
import fcntl
import gc
import logging
import os
import resource
import signal
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import (
    _channel,
    _children,
    _clone,
    _connections,
    _eventloop,
    _locks,
    _logqueues,
    _procfs,
    _qkeys,
    _qlookup,
    _sigutil,
    _terminal,
)
from ._errors import ConfigurationError, NoSuchCheckpoint, resource_error
from ._frozen import Saved, frozen, resume
from ._runtime import _Runtime, runtime
from ._sigutil import FATAL_SIGNALS

log = logging.getLogger("forkpoint")

CHKPT_RECOVERED = 1
CKPT_FROM_STATE = 2
CKPT_TO_STATE = 3
CKPT_SIGTYPE = 4
CKPT_NUMCHKPTS = 5

__all__ = ["CHKPT_RECOVERED", "CKPT_FROM_STATE", "CKPT_NUMCHKPTS", "CKPT_SIGTYPE", "CKPT_TO_STATE",
           "FATAL_SIGNALS", "CheckpointInfo", "checkpoints", "chkpt_status", "configure", "current_state",
           "discard", "recover_on", "recovery_seconds", "restore_reason", "shepherd_pid", "start",
           "tlongjmp", "tsetjmp"]

_rt = runtime()
_held: Saved | None = None


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


def _handler_signal() -> int:
    """The signal whose Python handler is on the stack, or 0: tlongjmp(0) from a handler reports it.

    A handler is called as ``handler(signum, frame)``: look for a frame running the code of a
    handler installed now whose first argument (or second, for a bound method) is a signal that
    handler is installed for. The installed handlers are read first, one C call per signal (about
    5 us for all of them), so that only their own frames have their locals read: reading the
    locals of every frame with two or three arguments on the way (a program's methods) cost a jump
    from program code 30 frames deep 22-24 us, 60 deep 43-47 us.
    """
    codes = set()               # by identity: hashing a code object hashes its bytecode
    for s in _SIGNAL_NUMBERS:           # _code_of, inline: a call per signal is most of the cost
        h = _getsignal(s)
        if type(h) is _Method:
            h = h.__func__
        if type(h) is _Function:
            codes.add(id(h.__code__))
    if not codes:
        return 0
    f: Any = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if id(code) in codes and 2 <= code.co_argcount <= 3:
            for var in code.co_varnames[: code.co_argcount - 1]:
                v = f.f_locals.get(var)
                if type(v) is int or isinstance(v, signal.Signals):
                    try:
                        h = _signal.getsignal(int(v))
                    except (ValueError, OSError):
                        continue
                    if _code_of(h) is code:
                        return int(v)
        f = f.f_back
    return 0


def _code_of(handler: Any) -> Any:
    """The code a Python function or bound method handler runs (None for anything else). Found by
    type, not by attribute: a handler object's own ``__getattr__`` is program code, which neither
    a jump nor a frozen spare's warming may run."""
    if type(handler) is _Method:
        handler = handler.__func__
    return handler.__code__ if type(handler) is _Function else None


_SIGNAL_NUMBERS = tuple(int(s) for s in signal.valid_signals())
_getsignal, _Method, _Function = _signal.getsignal, types.MethodType, types.FunctionType


# ---- the public API ------------------------------------------------------------------------------
def tsetjmp(pin: bool = False, *, allow_threads: bool | None = None, spares: int | None = None,
            key: str | None = None, deadline: float = 0.0, _drop: tuple[int, ...] = ()) -> int:
    """Take checkpoint *n* (1, 2, 3, ... over the program's life) and return *n*.

    When the program is later restored to *n*, execution goes on by returning *n* from this same
    call again; ``chkpt_status(CHKPT_RECOVERED)`` tells the two apart. ``pin=True`` keeps the
    checkpoint when older ones are discarded to stay within ``max_checkpoints``. ``spares`` (default
    ``configure(spares=...)``, 1) is how many ready copies are kept so that a restore is a wake-up;
    0 makes a restore fork the copy on demand (slower, but the checkpoint costs one fork, not two).
    ``key`` and ``deadline`` are for a protected call checkpointed for itself: the input to blame if
    the process fails while this checkpoint is current, and the ``time.monotonic()`` past which the
    shepherd restores it as a timeout. (``_drop``: descriptors the checkpoint's processes let go
    of, which the program goes on using: a server's idle keep-alive connections, whose FIN must not
    wait for a frozen copy; a process restored there finds an unconnected socket at each number.)
    """
    rt = _rt
    rt.check_caller()
    stopped: list[Any] = []     # filled as they are stopped: a handler that raises finds them here
    try:
        rt.check_threads(allow_threads, stopped)
        if stopped:
            # Logging listeners' threads, stopped for the copy (_logqueues): the checkpoint is taken
            # by this same call again, with this thread alone, and they start again as it returns,
            # in the process that goes on and in every one restored there.
            return tsetjmp(pin, allow_threads=allow_threads, spares=spares, key=key, deadline=deadline,
                           _drop=_drop)
    finally:
        if stopped:
            _logqueues.start(stopped)
    rt.ensure_started()
    assert rt.arena is not None
    spares = rt.config.spares if spares is None else spares
    if not isinstance(spares, int) or spares < 0:
        raise ConfigurationError(f"spares must be an int >= 0, got {spares!r}")
    # The bound on processes: wait while killed processes are still being torn down, or while the
    # keeper of our previous checkpoint has not even started (a SCHED_IDLE keeper on a busy machine:
    # a tight loop of tsetjmp() would pile them up). Two arena words; no wait in the usual case.
    rt.wait_killed()
    prev = rt.keeper
    if rt.arena.throttled() or (prev is not None and rt.arena.introduced() < prev.n):
        rt.request(_channel.Throttle(prev.n if prev else 0), (prev.fd,) if prev and prev.fd >= 0 else ())
    if rt.config.gc_freeze:
        gc.collect()
        gc.freeze()
    n = rt.arena.take_id()
    _sigutil.flush_stdio()
    try:
        fds = _procfs.open_files(rt.arena.file)
    except OSError as e:
        raise resource_error(f"could not take checkpoint {n}: cannot read /proc/self/fd", e) from e
    locks = _locks.held(rt.owner_pid, fds.regular)
    if locks:
        _warn_sqlite(n, locks)
    policy = os.sched_getscheduler(0)
    saved = Saved(mask=None, offsets=fds.offsets,
                  itimer=signal.getitimer(signal.ITIMER_REAL), key=rt.arena.processing(),
                  loop=_eventloop.running_loop(), locks=locks,
                  cpu_timers=(signal.getitimer(signal.ITIMER_VIRTUAL), signal.getitimer(signal.ITIMER_PROF)),
                  policy=None if policy == os.SCHED_OTHER else (policy, os.sched_getparam(0).sched_priority),
                  taken=time.monotonic(),
                  connections=_connections.at_checkpoint(fds.sockets, fds.stdio)
                  if rt.config.reset_connections and fds.sockets else (),
                  terminal=_terminal.at_checkpoint(fds.devices) if fds.devices else (),
                  drop=_drop)
    # The shepherd hears of the checkpoint before the fork: after it, every page this process
    # writes is copied on first write, so the parent's side of the fork restores its signal mask
    # and records the current state, nothing more: the keeper's pidfd is written by clone(2)
    # itself. The keeper introduces itself (pid and channel) from its own side.
    if not _room_for_keeper(rt, fds.how_many):  # first: the previous keeper's pidfd is kept on refusal
        raise resource_error(f"could not take checkpoint {n}: no two free descriptors for the keeper's "
                             "channel", OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
    # A failed clone below loses the previous keeper's pidfd: a transaction's commit then leaves
    # that keeper to the shepherd, as on kernels without pidfds.
    keeper = rt.expect_keeper(n)
    global _held
    _held = saved                       # freed at the next checkpoint, not on the way out of this one
    try:
        saved.mask = _sigutil.block_all_set()   # from the announcement to the fork, nothing interrupts
    except BaseException:               # a handler that ran as signals were blocked raised
        rt.forget_keeper()
        raise
    # The children this memory will still expect to end (no other thread, unless allowed); here,
    # where no interrupt can leave the list's descriptor open (the interrupt sweep found that).
    _children.at_checkpoint(rt.config.allow_threads if allow_threads is None else allow_threads)
    rt.chan.send(_channel.encode_snap(n, bool(pin), spares, key, deadline))
    # Recorded before the fork, whose parent side then writes one page fewer (a copy-on-write
    # fault, 10-30 us here); nothing can read it in between, with every signal blocked.
    before, rt.current = rt.current, n
    try:
        pid = _clone.clone(True, keeper.buf)
    except BaseException as e:
        rt.current = before
        rt.forget_keeper()
        _sigutil.set_mask(saved.mask)
        _channel.send(rt.chan, _channel.Discard(n, quiet=True, current=rt.current))
        if isinstance(e, OSError):
            raise resource_error(f"could not take checkpoint {n}: the fork failed", e) from e
        raise
    if pid == 0:
        resume(rt, saved, frozen(rt, n, spares, saved, _warm_restore_path))
        return n
    keeper.pid = pid        # before the mask: a handler that raises there finds the state recorded
    _sigutil.set_mask(saved.mask)
    return n


_sqlite_warned: set[str] = set()


def _warn_sqlite(n: int, locks: tuple[_locks.Lock, ...]) -> None:
    """Say it (once a database) when a checkpoint is taken inside a SQLite write transaction."""
    for lock in _locks.sqlite_writers(locks):
        path = lock.file
        if path not in _sqlite_warned:
            _sqlite_warned.add(path)
            log.warning("checkpoint %d is taken inside a SQLite write transaction on %s: a rollback to "
                        "it cannot undo what the transaction writes to the file after it, and its commit "
                        "would then corrupt the database; commit first, or use journal_mode=WAL", n, path)


def _room_for_keeper(rt: _Runtime, open_fds: int) -> bool:
    """Whether a keeper forked now could make its channel: two free descriptors below the limit.

    The keeper's table is ours as it is at the fork, and its channel is a socket pair. Asked before
    the fork (after it, every page the parent touches is a copy-on-write fault), and while the
    previous keeper's pidfd is still open, so a refusal leaves that pidfd alone; the new keeper's
    pidfd, made by the clone, takes a slot in the parent only. With ``open_fds`` descriptors open,
    at least ``limit - open_fds`` slots below the limit are free, which settles it without a system
    call in the usual case; only near the limit (or with descriptors above a lowered limit) is it
    asked with two dups.
    """
    assert rt.chan is not None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft - open_fds >= 2:
        return True
    got = []
    try:
        for _ in range(2):
            got.append(fcntl.fcntl(rt.chan.fileno(), fcntl.F_DUPFD_CLOEXEC, 0))
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        return False
    finally:
        for fd in got:
            os.close(fd)
    return True


def _warm_restore_path() -> None:
    """``tlongjmp()``'s own steps, without effect, for a frozen spare to run (``_frozen._prewarm``):
    a restored program's next ``tlongjmp()`` then finds those pages already its own. Not the stdio
    flush: ``sys.stdout`` may be the program's own object, and a snapshot never runs program code."""
    rt = _rt
    rt.check_caller()
    _handler_signal()
    mask = _sigutil.unset_mask()
    _sigutil.block_all_into(mask)
    _sigutil.restore_blocked(mask)
    _channel.encode(_channel.Restore(rt.current, 0, "tlongjmp", _sigutil.pending_mask()))


def tlongjmp(n: int = 0, sig: int = 0, reason: str | None = None) -> NoReturn:
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
    _sigutil.flush_stdio()
    old = _sigutil.unset_mask()
    try:
        _sigutil.block_all_into(old)    # a handler that raises as it returns: nothing was asked
        msg = _channel.Restore(target, int(sig), reason or ("signal" if sig else "tlongjmp"),
                               _sigutil.pending_mask())
    except BaseException:
        _sigutil.restore_blocked(old)
        raise
    try:
        rt.request(msg, blocked=True)
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
    (``max_recoveries``, ``within``, ``backoff``, ``backoff_max``, ``quarantine_after``,
    ``quarantine_size``; see ``forkpoint.policy``) bound crash loops.
    """
    rt = _rt
    rt.check_caller()
    sigs = [int(signal.Signals(s)) for s in signals]
    for s in sigs:
        handler = signal.getsignal(s)
        if s in _sigutil.FAULT_SIGNALS and callable(handler):
            log.warning("a Python handler is installed for %s: a real fault in C code never reaches "
                        "it and spins forever, so the shepherd cannot recover it; leave %s at "
                        "SIG_DFL and let recover_on() handle it", signal.Signals(s).name,
                        signal.Signals(s).name)
    if not isinstance(to, int) or to < 0:
        raise NoSuchCheckpoint(f"invalid checkpoint number {to!r}")
    rt.ensure_started()
    msg = _channel.SetPolicy(sigs, to, settings=policy)
    rt.request(msg)
    rt.policies = [msg]
    rt.policy_generation += 1
    if _sigutil.REPORTED_SIGNALS.intersection(sigs):
        rt.watch_faults()


def merge_policy(signals: tuple[int, ...], **policy: Any) -> None:
    """Add ``signals`` (and settings) to the recovery policy without replacing it."""
    rt = _rt
    rt.check_caller()
    rt.ensure_started()
    sigs = [int(signal.Signals(s)) for s in signals]
    msg = _channel.SetPolicy(sigs, merge=True, settings=policy)
    rt.request(msg)
    rt.policies.append(msg)
    if _sigutil.REPORTED_SIGNALS.intersection(sigs):
        rt.watch_faults()


def discard(n: int) -> None:
    """Discard checkpoint ``n``: its processes exit and ``tlongjmp(n)`` raises NoSuchCheckpoint."""
    rt = _rt
    rt.check_caller()
    if not isinstance(n, int) or n <= 0 or not rt.started:
        raise NoSuchCheckpoint(f"no checkpoint {n!r}")
    rt.request(_channel.Discard(n))


def end_transaction(n: int, current: int) -> None:
    """Discard checkpoint ``n`` without waiting, and make ``current`` the current state again.

    For a transaction that committed: its entry checkpoint is no longer needed, and the state to
    go back to is again the one before the call.
    """
    rt = _rt
    old = _sigutil.block_all_set()   # both or neither: the shepherd's current state must follow ours
    try:
        rt.current = current
        rt.chan.send(_channel.encode_commit(n, current))
    finally:
        _sigutil.set_mask(old)
    # Kill the keeper ourselves rather than wait for the shepherd to: until it is gone, every page
    # this process writes is still copied (measured: +40% requests/s for a trivial handler).
    rt.kill_keeper(n)


def checkpoints() -> list[CheckpointInfo]:
    """The live checkpoints, oldest first, with their memory (USS and PSS of keeper and spares)."""
    rt = _rt
    if not rt.started:
        return []
    rt.check_caller()
    reply = rt.request(_channel.ListCheckpoints())
    return [CheckpointInfo(**c) for c in reply["checkpoints"]]


def configure(**settings: Any) -> None:
    """Change settings: ``max_checkpoints``, ``spares``, ``allow_threads``, ``max_snapshot_memory``,
    ``gc_freeze``, ``reset_connections``, ``quarantine_ttl``, and before the first checkpoint ``arena_size``,
    ``shepherd_exec``, ``quarantine`` (``"process"``, ``"host"`` or ``"redis://HOST:PORT/DB"``),
    ``service`` and ``quarantine_keys`` (``"hashed"`` or ``"plain"``); docs/architecture.md."""
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
        # (reset_connections only: allow_threads and gc_freeze took any truth value before it)
        if key == "reset_connections" and not isinstance(value, bool):
            raise ConfigurationError(f"{key} must be True or False, got {value!r}")
        if key == "max_snapshot_memory" and value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigurationError("max_snapshot_memory must be a positive int (bytes) or None")
        if key in _QUARANTINE_SETTINGS:
            if rt.started and key != "quarantine_ttl":
                raise ConfigurationError(f"{key} can only be set before the first checkpoint")
            _QUARANTINE_SETTINGS[key](value, key)
    for key, value in settings.items():
        setattr(rt.config, key, _qkeys.parse_ttl(value) if key == "quarantine_ttl" else value)
    if any(k in _QUARANTINE_SETTINGS for k in settings) and not rt.started:
        rt.qsettings = None                # resolved again at the next use
        _qlookup.forget()                  # (and its lookup made afresh)
    if rt.started:
        if "quarantine_ttl" in settings:
            assert rt.qsettings is not None
            rt.qsettings.ttl = rt.config.quarantine_ttl
        shepherds = ("max_checkpoints", "max_snapshot_memory", "quarantine_ttl")
        rt.request(_channel.Configure({k: v for k, v in vars(rt.config).items()
                                       if k in settings and k in shepherds}))


_QUARANTINE_SETTINGS: dict[str, Any] = {
    "quarantine": lambda v, k: v is None or _qkeys.parse_scope(v, k),
    "service": lambda v, k: v is None or _qkeys.parse_service(v, k),
    "quarantine_ttl": _qkeys.parse_ttl,
    "quarantine_keys": lambda v, k: v is None or _qkeys.parse_keys(v, k),
}


def shepherd_pid() -> int:
    """The program's public PID (the shepherd's), or this process's own before the first checkpoint."""
    return _rt.shepherd_pid or os.getpid()


