"""The frozen side of a checkpoint: the keeper's and the spare's loops, and the spare's resume.

Roles, all direct children of the shepherd (see ``_clone``):

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

import enum
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import (
    _channel,
    _clone,
    _connections,
    _cputime,
    _eventloop,
    _identity,
    _locks,
    _prctl,
    _sigutil,
    _terminal,
)
from ._runtime import _Runtime

log = logging.getLogger("forkpoint")


class Role(enum.Enum):
    KEEPER = "keeper"
    SPARE = "spare"


@dataclass(slots=True)
class Saved:
    """What a snapshot must put back when it wakes, beyond its memory."""

    mask: Any                        # the signal mask as a set of numbers (``_sigutil.block_all_set``)
    offsets: dict[int, int]
    itimer: tuple[float, float]
    key: str | None = None
    loop: Any = None                 # the asyncio loop running at the checkpoint
    locks: tuple[_locks.Lock, ...] = ()     # POSIX locks held at the checkpoint (fork drops them)
    # The CPU-time timers (ITIMER_VIRTUAL, ITIMER_PROF: profilers, CPU limits), which fork() does
    # not copy either, and the scheduling policy if it is not SCHED_OTHER (a program run under
    # ``chrt -b``; a spare leaves the keeper's SCHED_IDLE for SCHED_OTHER).
    cpu_timers: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    policy: tuple[int, int] | None = None
    taken: float = 0.0               # time.monotonic() at the checkpoint (see _real_timer)
    # The program's connections to servers, and how far their streams had gone (_connections).
    connections: tuple[_connections.Connection, ...] = ()
    terminal: tuple[_terminal.Mode, ...] = ()    # the terminals' modes (_terminal)
    # Descriptors the program goes on using that the snapshot lets go of (``drop_fds``).
    drop: tuple[int, ...] = ()

def set_idle(pid: int = 0) -> None:
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        pass


_UP = _channel.encode(_channel.Up())


class _Ready:
    """What a spare prepares while frozen, so that its wake-up only makes system calls.

    Objects a spare creates after its fork live on pages that are already its own, so using them
    on the restore path costs no copy-on-write fault; building them there would.
    """

    comm: Callable[[], None] | None = None      # sets the program's name back
    lock: Any = None                            # the restored process's fresh channel lock
    # The checkpoint's signal mask as a raw sigset: restoring it from the set of ints that tsetjmp()
    # keeps (``_sigutil.set_mask``) builds the old mask as a set of 62 ints, 8 more faults in a
    # spare's resume (17-19 -> 25-27, counted over 40 restores); the raw buffer, made while frozen,
    # is set through the ctypes call that the warming runs.
    mask: Any = None


def frozen(rt: _Runtime, n: int, spares: int, saved: Saved | None = None,
           warm_hook: Callable[[], None] | None = None) -> _channel.Wake:
    """Run as keeper of checkpoint ``n``; return the wake-up message in a spare that goes live.

    Only a woken spare (or a keeper woken because no spare could be forked) returns. Every other
    way out ends the process here, so a snapshot can never run program code by accident.
    ``saved`` and ``warm_hook`` (the caller's own restore path, run without effect) only serve the
    spare's warming.
    """
    role = Role.KEEPER
    try:
        if rt.unidle:
            set_idle()          # first: the live process must get the CPU back at once
        _Ready.comm = _Ready.lock = _Ready.mask = None  # the live process's (if restored): never reused
        if saved is not None and saved.drop:
            drop_fds(saved.drop)
        shepherd = rt.shepherd_pid
        _prctl.set_pdeathsig(signal.SIGKILL)
        if _identity.real_ppid() != shepherd:
            os._exit(0)
        _identity.real_setpgid(0, 0)
        _prctl.set_name(f"fp-snap-{n}")
        # Introduce ourselves on the live process's channel (inherited), with a channel of our
        # own and a pidfd of ourselves: this work is ours, not the live process's, so it stays off
        # tsetjmp()'s path.
        try:
            chan, theirs = _channel.pair()
        except OSError as e:
            _channel.send(rt.chan, _channel.Hello(n, _identity.real_pid(), f"cannot make its channel: {e}"))
            os._exit(70)
        me = _pidfd_of_self()
        _channel.send(rt.chan, _channel.Hello(n, _identity.real_pid()),
                      (theirs.fileno(),) + ((me,) if me >= 0 else ()))
        theirs.close()
        if me >= 0:
            os.close(me)
        rt.chan.close()
        rt.chan = chan
        _forget_lost_threads()
        forks_owed = spares
        warm = False
        while True:
            if role is Role.SPARE and warm:
                warm = False
                _prewarm(rt, saved, warm_hook, n)
                continue
            if role is Role.KEEPER and forks_owed and rt.arena is not None and rt.arena.throttled():
                for _ in range(forks_owed):    # the shepherd asks again once processes are gone
                    _channel.send(chan, _channel.ForkFailed(n, 0, "deferred"))
                forks_owed = 0
            if role is Role.KEEPER and forks_owed:
                forks_owed -= 1
                msg: _channel.Message | None = _channel.Fork()
            else:
                msg, _ = _channel.recv(chan)
                if msg is None:
                    os._exit(0)
            if isinstance(msg, _channel.Wake):
                if role is Role.KEEPER and rt.unidle:   # woken itself: no spare could be made
                    try:
                        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                    except OSError:
                        pass
                return msg
            if role is Role.SPARE and isinstance(msg, _channel.Promote):
                role = Role.KEEPER                      # our keeper died: we are checkpoint n now
                _prctl.set_name(f"fp-snap-{n}")         # (the shepherd sets our priority)
                continue
            if role is Role.KEEPER and isinstance(msg, _channel.Fork):
                try:
                    mine, theirs = _channel.pair()
                except OSError as e:
                    _channel.send(chan, _channel.ForkFailed(n, e.errno or 0, str(e)))
                    continue
                try:
                    pid, pidfd = _clone.clone_pidfd(sibling=True)
                except OSError as e:      # the process limit, or memory: say so, and stay
                    mine.close()
                    theirs.close()
                    _channel.send(chan, _channel.ForkFailed(n, e.errno or 0, str(e)))
                    continue
                if pid == 0:
                    role = Role.SPARE
                    forks_owed = 0      # the keeper's; a spare promoted later forks only when asked
                    _prctl.set_name(f"fp-spare-{n}")
                    chan.close()
                    theirs.close()
                    chan = mine
                    _prctl.set_pdeathsig(signal.SIGKILL)
                    if _identity.real_ppid() != shepherd:
                        os._exit(0)
                    if rt.unidle:
                        try:
                            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                        except OSError:      # privileges dropped since start: stay, but serve
                            pass
                    _Ready.comm = _Ready.lock = _Ready.mask = None   # made by the warming, if it gets there
                    rt.chan = chan
                    warm = True
                    continue
                mine.close()
                # (no pidfd before Linux 5.2: the shepherd then checks the pid alone)
                fds = (theirs.fileno(), pidfd) if pidfd >= 0 else (theirs.fileno(),)
                _channel.send(chan, _channel.Spare(n, pid), fds)
                theirs.close()
                if pidfd >= 0:
                    os.close(pidfd)     # our priority is the shepherd's to set from here on
    except BaseException:  # noqa: BLE001 - a snapshot must never fall back into program code
        os._exit(70)


def drop_fds(fds: tuple[int, ...]) -> None:
    """Let go of descriptors the live process goes on using (``tsetjmp(_drop=)``): each is
    replaced with an unconnected socket, so that its number stays taken and a restored process
    finds a socket there, which its event loop can still watch until the program closes it."""
    try:
        placeholder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:     # (no descriptor left: kept, and their FIN waits for this checkpoint)
        return
    for fd in fds:
        try:
            os.dup2(placeholder.fileno(), fd, inheritable=False)
        except OSError:
            pass
    placeholder.close()


def _forget_lost_threads() -> None:
    """Let ``threading`` know that the program's other threads are not in this copy.

    ``tsetjmp(allow_threads=True)`` copies only the calling thread, and the raw clone skips the
    at-fork hook with which ``threading`` forgets the others in a forked child: a restored program
    still listed them in ``threading.enumerate()``, and its exit waited for ever to join them (a
    ``ThreadPoolExecutor`` used once before the checkpoint was enough; found by an audit,
    2026-11-29). So the keeper does what ``os.fork()``'s child does for ``threading`` (on 3.13 the
    threads' handles, which the C side marks in a real fork, are marked done first), and nothing
    else of the at-fork hooks: every spare and restored process inherits it.
    """
    me = threading.current_thread()
    # Without threading's lock: a thread that is not in this copy may have held it at the clone
    # (a pool's worker starting), and enumerate() would wait for it for ever.
    listed = getattr(threading, "_enumerate", threading.enumerate)
    lost = [t for t in listed() if t is not me]
    if not lost:
        return
    for thread in lost:     # 3.13's C-level thread handle (3.14 renames it)
        handle = getattr(thread, "_handle", None) or getattr(thread, "_os_thread_handle", None)
        if handle is not None and hasattr(handle, "_set_done"):
            handle._set_done()
    if hasattr(threading, "_thread_shutdown") and any(not t.daemon for t in lost):
        # 3.13+: the interpreter's exit waits in C for every non-daemon thread it started, from
        # a list only a real fork's C side or the thread's own end clears (it spun for ever on
        # the lost ones). Wait instead for those threading still knows, as 3.12 did.
        threading._thread_shutdown = _join_threads      # type: ignore[attr-defined]
    after_fork = getattr(threading, "_after_fork", None)
    if after_fork is not None:
        after_fork()


def _join_threads() -> None:
    """The interpreter's wait at exit for the program's non-daemon threads (see above)."""
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            thread.join()


def _pidfd_of_self() -> int:
    """A pidfd of this process (-1 before Linux 5.3): the shepherd's proof that it is alive."""
    try:
        return os.pidfd_open(_identity.real_pid())
    except (OSError, AttributeError):
        return -1


def _prewarm(rt: _Runtime, saved: Saved | None, warm_hook: Callable[[], None] | None, n: int) -> None:
    """Touch, while frozen, what a wake-up will touch.

    A spare shares every page with its keeper; the first write to each one after the wake-up is a
    copy-on-write fault on the restore path. Running the wake-up's machinery once without effect
    (same name, same process group, same mask, a message encoded and decoded, the offsets and the
    log levels looked at) takes those faults now, in the background, for a few dozen private pages
    per spare. ``warm_hook`` does the same for the restored program's own next ``tlongjmp()``.

    The warming stops as soon as a wake-up is waiting on the channel: a restore that waits for this
    copy (a crash loop) is better served at once, taking those faults itself.
    """
    poller = select.poll()      # not select(): it fails for descriptors past 1023
    poller.register(rt.chan, select.POLLIN)

    def waited_for() -> bool:
        return bool(poller.poll(0))

    try:
        if waited_for():
            return
        own = _prctl.prepare_name(f"fp-spare-{n}")
        own()
        _Ready.comm = _prctl.prepare_name(rt.comm)
        _Ready.lock = threading.Lock()      # made here, after the fork: no thread can hold it
        if saved is not None:
            _Ready.mask = _sigutil.mask_of(saved.mask)
        _channel.decode(_channel.encode(_channel.Wake(0, 0, 0, "x", 1, time.monotonic())))
        _channel.decode(_UP)
        own()
        if waited_for():
            return
        _identity.real_setpgid(0, os.getpgid(0))
        mask = _sigutil.new_mask()
        _sigutil.block_all(mask)
        _sigutil.restore_mask(mask)
        _sigutil.drain_pending()
        signal.getitimer(signal.ITIMER_REAL)
        log.isEnabledFor(logging.WARNING)
        log.isEnabledFor(logging.INFO)
        rt.chan.fileno()
        if saved is not None:
            for fd, off in saved.offsets.items():
                fd + off
            (saved.itimer[0], saved.key, saved.mask, saved.cpu_timers, saved.policy, saved.connections)
        rt.owner_pid = _identity.real_pid()     # a spare's pid is the one it will run with
        for name in ("recovered", "from_state", "to_state", "sigtype", "reason", "attempt",
                     "recovery_seconds", "current", "owner_pid"):
            setattr(rt, name, getattr(rt, name))
        if warm_hook is not None and not waited_for():
            warm_hook()
        _cputime.frozen()
    except Exception:  # noqa: BLE001 - warming is an optimisation only
        pass


def _real_timer(saved: Saved) -> tuple[float, float]:
    """The checkpoint's ITIMER_REAL as the restored process arms it.

    A program's own ``alarm()`` or ``setitimer()`` counts wall-clock time, which a rollback does
    not turn back: it fires when it would have fired (at once, if that time has passed), or a
    crash loop would put an overall deadline off for ever. A ``forkpoint.watchdog()`` block's
    timer (its handler is the watchdog's) keeps what it had left at the checkpoint instead: the
    block runs again from there, with that much time.
    """
    left, interval = saved.itimer
    handler = signal.getsignal(signal.SIGALRM)
    if getattr(handler, "__qualname__", "") != "_on_alarm" or \
            getattr(handler, "__module__", "") != "forkpoint.watchdog":
        left = max(left - (time.monotonic() - saved.taken), 1e-6)
    return left, interval


# Called in a restored process, signals blocked, before program code, with the seconds since its
# checkpoint was taken: the upper layers' state that counts wall-clock time (``watchdog._Blocks``).
resume_hooks: list[Callable[[float], None]] = []


def resume(rt: _Runtime, saved: Saved, wake: _channel.Wake) -> None:
    """Turn a woken spare into the live program."""
    n = wake.n
    rt.owner_pid = _identity.real_pid()
    rt.chan_lock = _Ready.lock if _Ready.lock is not None else threading.Lock()
    _sigutil.drain_pending()        # before rejoining the terminal's group: what comes later is real
    try:
        _identity.real_setpgid(0, rt.pgid)
    except OSError as e:
        log.warning("restored process could not rejoin process group %d: %s", rt.pgid, e)
    if _Ready.comm is not None:
        _Ready.comm()
    else:
        _prctl.set_name(rt.comm)
    for fd, off in saved.offsets.items():
        try:
            os.lseek(fd, off, os.SEEK_SET)
        except OSError:
            pass
    if saved.terminal:              # (after rejoining the group: only as the foreground job)
        _terminal.restore(saved.terminal, rt.pgid)
    # Before any program code (a log handler included) can use one of them.
    reset = _connections.reset_used(saved.connections) if saved.connections else []
    if saved.itimer[0] > 0:
        signal.setitimer(signal.ITIMER_REAL, *_real_timer(saved))
    for hook in resume_hooks:
        hook(time.monotonic() - saved.taken)
    virtual, prof = saved.cpu_timers
    if virtual[0] > 0:
        signal.setitimer(signal.ITIMER_VIRTUAL, *virtual)
    if prof[0] > 0:
        signal.setitimer(signal.ITIMER_PROF, *prof)
    if saved.policy is not None:
        try:
            os.sched_setscheduler(0, saved.policy[0], os.sched_param(saved.policy[1]))
        except OSError as e:
            log.warning("restored process could not take back its scheduling policy %d: %s",
                        saved.policy[0], e)
    if saved.locks:                 # held by the process this one replaces until it is gone
        _locks.take(saved.locks, rt.shepherd_pid, rt.unidle, rt.lock_nudge)
    rt.current = n
    rt.recovered = True
    rt.from_state = wake.from_state
    rt.to_state = n
    rt.sigtype = wake.sig
    rt.reason = wake.reason
    rt.attempt = wake.attempt
    rt.recovery_seconds = time.monotonic() - wake.t
    if saved.key is not None and rt.arena is not None:
        rt.arena.set_processing(saved.key)   # the checkpoint was taken inside processing(key)
    _eventloop.rejoin(saved.loop, moved_heap=True, drop=wake.replay)
    rt.chan.send(_UP)
    _cputime.became_live()          # (the shepherd reads what it writes when it retires this one)
    if wake.hold:
        # Signals came for the program while it was being restored: the shepherd sends them now,
        # and they are handled here, before program code runs (which could crash at once and
        # take them along).
        _channel.recv(rt.chan)
    if _Ready.mask is not None:
        _sigutil.restore_mask(_Ready.mask)
    else:
        _sigutil.set_mask(saved.mask)
    # A recovery is worth a warning; a plain tlongjmp() is the program's own control flow.
    level = logging.INFO if rt.sigtype == 0 and rt.reason == "tlongjmp" else logging.WARNING
    if log.isEnabledFor(level):
        log.log(level, "recovered (%s): forkpoint restored checkpoint %d (from state %d) in %.1f ms",
                rt.reason, n, rt.from_state, rt.recovery_seconds * 1e3)
    if reset:
        log.warning("restored checkpoint %d: shut down the connection(s) to %s, so that their servers "
                    "drop what the rolled-back code began on them; the program's clients must connect "
                    "again", n, ", ".join(reset))
