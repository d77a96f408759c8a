"""forkpoint's state inside one process of the program, and the start that creates the shepherd.

There is one ``_Runtime`` per process (``runtime()``). Its ``ensure_started`` is the program's
first use of forkpoint: the original process clones the live program and becomes the shepherd
(``_shepherd.become_shepherd``), so the PID the outside world knows stays with the shepherd.
"""
from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import (
    _channel,
    _children,
    _clone,
    _cputime,
    _eventloop,
    _identity,
    _locks,
    _logqueues,
    _nativepools,
    _notify,
    _prctl,
    _procfs,
    _qkeys,
    _qlookup,
    _sigutil,
    _threadmarks,
)
from ._errors import (
    ConfigurationError,
    ForkpointError,
    NoSuchCheckpoint,
    ThreadsAlive,
    WrongThread,
    resource_error,
)
from ._qhost import HostStore
from ._qtable import LOCAL, MIRROR, arena_table
from ._shepherd import DYING_MAX, become_shepherd
from ._witness import Witness
from .arena import DEFAULT_SIZE, MIRROR_REGION, QUARANTINE_REGION, Arena

log = logging.getLogger("forkpoint")
# Called in the live process as forkpoint starts, signals blocked, before the program goes on: the
# upper layers' state that needs the shepherd (``watchdog._Blocks``: a block entered before the
# start records its hard deadline).
started_hooks: list[Callable[[], None]] = []


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
    # A restore shuts down the program's connections to servers that the rolled-back code used
    # (_connections); False keeps them as they are.
    reset_connections: bool = True
    # The quarantine (``_qkeys``); None: from the environment, else the default.
    quarantine: str | None = None
    service: str | None = None
    quarantine_ttl: float | None = None
    quarantine_keys: str | None = None


class KeeperRef:
    """Checkpoint ``n``'s keeper, by a pidfd (which cannot hit a recycled pid) that clone(2) writes.

    In the keeper itself and every copy of it the buffer still reads -1: the kernel writes the
    pidfd into the parent's memory only, and the child's descriptor table does not have it.
    """

    __slots__ = ("buf", "n", "pid")

    def __init__(self, n: int) -> None:
        self.n = n
        self.buf = ctypes.c_int(-1)
        self.pid = 0                # set once clone() has returned it

    @property
    def fd(self) -> int:
        return self.buf.value


class _Runtime:
    """forkpoint's state inside one process of the program."""

    def __init__(self) -> None:
        self.config = Config()
        self.arena: Arena | None = None
        self.chan: Any = None
        self.shepherd_pid = 0
        self.owner_pid = 0
        self.caller = 0                 # the thread ident that check_caller() last passed
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
        # Wakes whatever may still hold a failed process's POSIX locks for it (the holder of a
        # server worker's descriptors, _serving): a restored process waits for those locks.
        self.lock_nudge: Callable[[], None] | None = None
        self.keeper: KeeperRef | None = None           # the newest keeper: its pidfd, from clone(2)
        self.killed: list[tuple[int, int]] = []        # (pidfd, pid) of keepers killed here, not yet gone
        self.fault_fd: int | None = None                # faulthandler's pipe to the shepherd
        self.altstack: Any = None
        self.faults_watched = False
        self.arena_copied = False       # a forked child's copy of its parent's arena (Arena.take_copy)
        self.policy_generation = 0                      # bumped by recover_on(), which replaces
        # The policy as the program set it (recover_on(), then merges): a child the program forks
        # starts its own forkpoint with it (_replay_policy).
        self.policies: list[_channel.SetPolicy] = []
        self.qsettings: _qkeys.Settings | None = None   # resolved at first use, fixed at start
        # One request on the channel at a time: a thread may wait for a child the shepherd holds
        # (asyncio's child watcher on 3.10/3.11 calls waitpid from a thread). A restored process
        # makes a new one: a thread the snapshot did not copy may have held this one.
        self.chan_lock = threading.Lock()

    # -- checks -----------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.chan is not None

    def check_caller(self) -> None:
        # The last caller that passed, by thread: the same thread is still the live process's main
        # thread. A child the program forks forgets it (_forget_in_forked_child), and forkpoint's
        # own copies are the live process when they run program code, so no getpid() is needed
        # (a system call of 10-15 us on a cold cache here). tsetjmp() asks on every protected
        # call, where each page touched is copied: the full check touched about 12.
        if _get_ident() == self.caller:
            return
        if threading.current_thread() is not threading.main_thread():
            raise WrongThread(_not_main_thread())
        if self.started:
            if _identity.real_pid() != self.owner_pid:
                raise ForkpointError(
                    f"process {_identity.real_pid()} is a child the program forked; only the program's "
                    "live process can use its checkpoints")
            self.caller = _get_ident()

    def check_threads(self, allow: bool | None, stopped: list[Any] | None = None) -> list[Any]:
        """Refuse a checkpoint beside threads (``ThreadsAlive``) unless ``allow``, after ending those
        forkpoint can end. Returns the logging listeners stopped (``_logqueues``), for the caller to
        start again after the copy (also with ``allow``: a copy must not count on their threads), also
        when this raises: each is put in ``stopped`` before it is stopped."""
        allow = self.config.allow_threads if allow is None else allow
        stopped = [] if stopped is None else stopped
        n = _nativepools.other_threads() + 1     # also with allow: a copy must not count on them
        if n > 1:
            _logqueues.stop(stopped)
        if stopped:
            n = _procfs.other_threads() + 1
        if n > 1 and not allow:
            loop = _eventloop.running_loop()
            if loop is not None and _eventloop.stop_idle_executor(loop):
                n = _procfs.other_threads() + 1
            if n > 1 and _eventloop.finish_child_watchers():
                n = _procfs.other_threads() + 1
        if n > 1 and not allow:
            _logqueues.start(stopped)
            names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
            raise ThreadsAlive(
                f"{n - 1} other thread(s) alive ({', '.join(names) or 'native threads'}): fork() "
                "copies only this thread, so a snapshot would lose them; stop them, or pass "
                "allow_threads=True if the snapshot does not need them" + _thread_hint(names, n - 1))
        return stopped

    def arena_or_create(self) -> Arena:
        if self.arena is None:
            arena = Arena.create(self.config.arena_size)
            try:
                # The program's quarantine table, made while this process is the arena's only writer.
                arena_table(arena, QUARANTINE_REGION, LOCAL, create=True)
            except BaseException:   # (a Ctrl-C): the next call makes a new arena; its memory goes now
                os.close(arena.fd)
                raise
            self.arena = arena
            _watch_forks()
        return self.arena

    def quarantine_settings(self) -> _qkeys.Settings:
        """The quarantine's scope, service and time to live (``_qkeys``), resolved once."""
        if self.qsettings is None:
            c = self.config
            self.qsettings = _qkeys.resolve(c.quarantine, c.service, c.quarantine_ttl, c.quarantine_keys)
        return self.qsettings

    # -- start: the original process becomes the shepherd -----------------------------------------
    def ensure_started(self) -> None:
        if self.started:
            return
        # The program goes on in a copy (a clone: one thread), the original becomes the shepherd:
        # a logging listener's thread is stopped for it and started again in the program.
        stopped: list[Any] = []
        try:
            if threading.active_count() > 1:
                _logqueues.stop(stopped)
            self._start()
        finally:
            if stopped:             # (no call otherwise: nothing to cut short after the start)
                _logqueues.start(stopped)

    def _start(self) -> None:
        if not _clone.SUPPORTED:
            raise ForkpointError("forkpoint supports Linux on x86_64 and aarch64 only")
        if threading.current_thread() is not threading.main_thread():
            # First: counted first, the pool's threads gave ThreadsAlive's advice to start before
            # starting threads, after which the same call failed with WrongThread.
            raise WrongThread(_not_main_thread())
        n = _nativepools.other_threads() + 1
        if n > 1:
            raise ThreadsAlive(
                f"{n - 1} other thread(s) alive: forkpoint's first use turns this process into the "
                "shepherd and continues the program in a forked copy, which threads cannot follow; "
                "call forkpoint.start() before starting threads")
        arena = self.arena_or_create()
        if self.arena_copied:           # the parent's threads' marks are not this program's
            _threadmarks.clear(arena)
        qs = self.quarantine_settings()
        if qs.parsed.kind == "redis":     # the shepherd's copy of the store, which the program reads
            arena_table(arena, MIRROR_REGION, MIRROR, create=True)
            _qlookup.forget()             # a lookup made before had no mirror to read
        elif qs.parsed.kind == "host":
            try:                          # so that every reader finds it from the first request
                HostStore(qs.service).ensure()
            except OSError as e:
                log.debug("host quarantine store not created yet: %s", e)
        arena.set_face_ppid(os.getppid())      # the shepherd keeps it up to date from now on
        loop = _eventloop.running_loop()
        self.pgid = os.getpgrp()
        self.comm = _prctl.get_name()
        self.unidle = _procfs.can_leave_sched_idle()
        _sigutil.flush_stdio()
        old = _sigutil.unset_mask()
        # Made with signals blocked, so that no interrupt (Ctrl-C) comes between making and listing:
        # closed if the start fails.
        socks: list[socket.socket] = []
        fds: list[int] = []
        subreaper = False
        witness = None
        notify = None
        what = "the fork of the live program failed"
        try:
            _sigutil.block_all_into(old)     # inside the try: see _sigutil.unset_mask
            witness = Witness.spawn(os.getpid())     # before the live process: see _witness
            notify = _notify.prepare(os.getpid())    # before it too: every copy has its address
            what = "no channel to the shepherd"
            mine, theirs = _channel.pair()
            socks += (mine, theirs)
            what = "no pipe for crash reports"
            fault_r, fault_w = os.pipe()
            fds += (fault_r, fault_w)
            what = "the fork of the live program failed"
            timers = [(w, signal.getitimer(w)) for w in _sigutil.ITIMERS]
            cpu = _cputime.own_ns()          # the program's so far: the live process counts it
            parent = os.getpid()
            what = "could not read the program's POSIX locks"
            # the shepherd lets go of them, the live process takes them
            locks = _locks.held(parent, _procfs.open_files().regular)
            what = "the fork of the live program failed"
            _prctl.set_child_subreaper(True)
            subreaper = True
            pid = _clone.clone(sibling=False)
        except BaseException as e:
            _sigutil.restore_blocked(old)
            for sock in socks:
                sock.close()
            for fd in fds:
                os.close(fd)
            if witness is not None:
                witness.stop()
            if notify is not None:
                notify.undo()
            if subreaper:
                _prctl.set_child_subreaper(False)
            if isinstance(e, OSError):
                raise resource_error(f"could not start forkpoint: {what}", e) from e
            raise
        if pid == 0:  # the live program goes on here
            theirs.close()
            os.close(fault_r)
            if witness is not None:
                witness.close()
            if notify is not None:
                notify.in_live()
            self.fault_fd = fault_w
            _forget_forks()
            self.chan = mine
            self.shepherd_pid = parent
            self.owner_pid = _identity.real_pid()
            _prctl.set_pdeathsig(signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(70)
            _identity.install(parent, arena)
            _children.install(arena, self.exchange)
            arena.add_cpu(*cpu)
            _cputime.install(arena)
            _eventloop.rejoin(loop, moved_heap=False)
            for which, value in timers:      # fork() does not copy interval timers; exec keeps them
                if value[0] > 0:
                    signal.setitimer(which, *value)
            _locks.take(locks, parent, raise_holders=False)   # nor POSIX locks
            for hook in started_hooks:
                hook()
            _sigutil.restore_mask(old)
            log.debug("started: shepherd %d, live %d", parent, self.owner_pid)
            self._replay_policy()
            return
        mine.close()
        os.close(fault_w)
        become_shepherd(theirs, arena, pid, self.pgid, self.config, fault_r, qs.to_args(), witness,
                        notify.to_args() if notify is not None else None)

    def _replay_policy(self) -> None:
        """A forked child starting forkpoint of its own: the recovery policy its parent set."""
        for msg in self.policies:
            self.request(msg)
            if _sigutil.REPORTED_SIGNALS.intersection(msg.signals):
                self.watch_faults()

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
        if self.fault_fd is None or self.faults_watched:
            return
        if faulthandler.is_enabled() and self.altstack is None:
            log.info("faulthandler was enabled: forkpoint sends its reports through the shepherd")
        faulthandler.enable(file=self.fault_fd, all_threads=True)
        if self.altstack is None:       # a forked child that starts its own forkpoint has one
            self.altstack = _sigutil.large_altstack()
        self.faults_watched = True

    # -- the newest keeper, which a committing transaction kills itself --------------------------
    def expect_keeper(self, n: int) -> KeeperRef:
        """Make room for a pidfd of checkpoint ``n``'s keeper, which its clone will fill in.

        Done before the fork: the pidfd of the keeper before is closed first, so the new keeper
        does not inherit it, and the parent's side of the fork only has the kernel write one int.
        """
        self.forget_keeper()
        self.keeper = KeeperRef(n)
        return self.keeper

    def forget_keeper(self) -> None:
        if self.keeper is not None:
            fd, self.keeper = self.keeper.fd, None
            if fd >= 0:
                os.close(fd)

    def kill_keeper(self, n: int) -> None:
        if self.keeper is None or self.keeper.n != n:
            return
        fd, pid, self.keeper = self.keeper.fd, self.keeper.pid, None
        if fd < 0:          # no pidfd (a kernel before 5.2): the shepherd kills it alone
            return
        # Counted until it is gone (the bound on processes); listed first, so that a handler that
        # raises as the kill returns cannot lose the pidfd.
        self.killed.append((fd, pid))
        try:
            signal.pidfd_send_signal(fd, _SIGKILL)
        except OSError:
            self.killed.remove((fd, pid))
            os.close(fd)

    def wait_killed(self) -> None:
        """Before a new keeper: at most DYING_MAX keepers this process killed may still be dying.

        A committed transaction kills its keeper itself (at idle priority, where it may leave that)
        without waiting; on a busy machine a tight loop of transactions would pile them up. Fewer
        than DYING_MAX in the list cannot break the bound, so they are not looked at: one poll()
        every DYING_MAX transactions, for all of them at once (it was one poll object and poll()
        per killed keeper in every call, about 14 page faults of tsetjmp()'s).
        """
        if len(self.killed) < DYING_MAX:    # fewer than that killed since the last look: no look
            return
        left = _not_gone(self.killed)
        while len(left) >= DYING_MAX:
            if self.unidle:                  # they finish dying at normal priority now
                for _fd, pid in left:
                    try:
                        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
                    except OSError:
                        pass
            poller = select.poll()
            for fd, _pid in left:
                poller.register(fd, select.POLLIN)
            poller.poll(1000)
            left = _not_gone(left)
        gone = [fd for fd, pid in self.killed if (fd, pid) not in left]
        self.killed = left
        # Off the list first, then closed in one C loop (map): a handler that raises (Ctrl-C) can
        # only come after the last close. Closed while still listed, a pidfd was closed a second
        # time at the next look: EBADF, or another descriptor of the program's that took its number.
        list(map(os.close, gone))

    # -- requests to the shepherd -----------------------------------------------------------------
    def request(self, msg: _channel.Message, send_fds: tuple[int, ...] = (), *,
                blocked: bool = False) -> dict[str, Any]:
        """Send ``msg`` (with ``send_fds``) and wait for the shepherd's answer: ``Ok``'s data, or
        the error it names.

        ``blocked``: the caller has blocked every signal already and restores its mask itself.
        """
        data, fds = self.exchange(msg, send_fds, blocked=blocked)
        for fd in fds:
            os.close(fd)
        return data

    def exchange(self, msg: _channel.Message, send_fds: tuple[int, ...] = (), *,
                 blocked: bool = False) -> tuple[dict[str, Any], list[int]]:
        """``request``, also returning the descriptors that came with the answer."""
        # Signals wait until the reply is in: a handler that raised between the send and the recv
        # would leave the reply queued, and every later request would read its predecessor's.
        old = None if blocked else _sigutil.unset_mask()
        try:
            if old is not None:
                _sigutil.block_all_into(old)     # inside the try: see _sigutil.unset_mask
            with self.chan_lock:
                _channel.send(self.chan, msg, send_fds)
                reply, fds = _channel.recv(self.chan)
        finally:
            if old is not None:
                _sigutil.restore_blocked(old)
        if reply is None:
            raise ForkpointError("the shepherd is gone")
        if isinstance(reply, _channel.Error):
            if reply.kind is _channel.ErrorKind.NOSUCH:
                raise NoSuchCheckpoint(reply.message)
            if reply.kind is _channel.ErrorKind.CONFIG:
                raise ConfigurationError(reply.message)
            raise ForkpointError(reply.message)
        if not isinstance(reply, _channel.Ok):
            raise ForkpointError(f"the shepherd answered {type(reply).__name__} to {type(msg).__name__}")
        return reply.data, fds


_rt = _Runtime()
_get_ident = threading.get_ident
_SIGKILL = int(signal.SIGKILL)      # a plain int: an enum member is one more page touched per commit


def _not_gone(killed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (pidfd, pid) pairs of ``killed`` whose process has not exited (a pidfd polls readable
    then), asked with one poll()."""
    p = select.poll()
    for fd, _pid in killed:
        p.register(fd, select.POLLIN)
    gone = {fd for fd, _ev in p.poll(0)}
    return [(fd, pid) for fd, pid in killed if fd not in gone]


def runtime() -> _Runtime:
    return _rt


def _not_main_thread() -> str:
    """WrongThread's message, which says where such a call comes from and what to do instead."""
    return (f"forkpoint starts, takes checkpoints and restores only in the main thread, and this "
            f"call came from thread {threading.current_thread().name!r}: a thread pool's or a "
            "scheduler's (concurrent.futures.ThreadPoolExecutor, APScheduler's thread executor, "
            "gunicorn --threads) cannot be checkpointed; run the protected work in the main "
            "thread, or in processes (a process pool) that each protect their own")


def _thread_hint(names: list[str], others: int) -> str:
    """What to do about the threads asyncio and C libraries keep, which ``allow_threads=True`` does
    not cover: a restored program still counts on them (its loop's next ``to_thread()`` and
    ``asyncio.run()``'s end waited for the default executor's threads for ever; on 3.10 and 3.11
    ``await proc.wait()`` for the child watcher's; a C library's next parallel call for its pool's).
    ``others`` counts the native threads too, which ``names`` lacks."""
    hints = []
    if any(name.startswith("asyncio_") for name in names):
        hints.append("a job still runs in asyncio's default executor (to_thread, run_in_executor, "
                     "host name lookups; forkpoint stops its threads when they are idle): take the "
                     "checkpoint once it is over")
    if any(name.startswith(("waitpid-", "asyncio-waitpid-")) for name in names):
        hints.append("asyncio's child watcher waits for a subprocess in a thread (Python 3.10 and "
                     "3.11): take the checkpoint once 'await proc.wait()' is over, or on Python 3.12+")
    if len(names) < others:
        hints.append("native threads are a C library's (forkpoint ends OpenBLAS's and OpenMP's idle "
                     "pools itself; another library's pool must be limited to one thread, or stopped)")
    if not hints:
        return ""
    return "; " + "; ".join(hints) + " (allow_threads=True would leave the restored program waiting for them)"


_forgets = False


def _forget_forks() -> None:
    """Register ``_forget_in_forked_child`` once (a forked child that starts forkpoint of its own
    inherits the hook: registered again, it ran twice in a grandchild, and the second run undid
    the first's ``os.getppid``)."""
    global _forgets
    if not _forgets:
        os.register_at_fork(after_in_child=_forget_in_forked_child)
        _forgets = True


def _forget_in_forked_child() -> None:
    """In a child the program forks itself (os.fork, multiprocessing): it is not part of forkpoint.

    Its copies of the channel and of the fault pipe are closed, so that it can neither be mistaken
    for the live process nor keep a dead live process's channel open; its fatal errors go to stderr.
    (forkpoint's own snapshots are made with a raw clone that runs no at-fork hooks.)
    """
    rt = _rt
    _identity.forget_in_forked_child()
    _children.forget_in_forked_child()
    _cputime.forget_in_forked_child()
    if rt.chan is not None:
        rt.chan.close()
        rt.chan = None
    rt.forget_keeper()
    killed, rt.killed = rt.killed, []
    list(map(os.close, (fd for fd, _pid in killed)))     # off the list first: see wait_killed
    if rt.fault_fd is not None:
        if rt.faults_watched:
            faulthandler.enable(file=sys.stderr, all_threads=True)
        os.close(rt.fault_fd)
        rt.fault_fd = None
    rt.faults_watched = False
    # If it starts forkpoint, it is a program of its own: no checkpoint yet, no restore behind it,
    # and @checkpointed functions merge their signals into its policy again.
    rt.current, rt.recovered, rt.from_state, rt.to_state = 0, False, None, None
    rt.sigtype, rt.reason, rt.attempt, rt.recovery_seconds = 0, "", 0, 0.0
    rt.shepherd_pid = rt.owner_pid = 0
    rt.caller = 0
    rt.lock_nudge = None
    rt.policy_generation += 1


_forks_watched = False
_copy_fd = -1        # the arena's copy for the child being forked (parent's side, until it is forked)
_copies_paused = False


@contextlib.contextmanager
def arena_copies_paused() -> Iterator[None]:
    """``os.fork()`` as without forkpoint, for a benchmark's baseline: no copy of the arena.

    The children forked meanwhile share this process's arena, as before the copy existed, so they
    must not use forkpoint; a fork floor's children only block and exit. Without this, the floor
    included the copy (1.2 ms -> 2.0 ms at 10 MB here) and flattered every ratio taken against it.
    """
    global _copies_paused
    _copies_paused = True
    try:
        yield
    finally:
        _copies_paused = False


def _watch_forks() -> None:
    """From the arena's creation on, a child the program forks gets a copy of it (once a process:
    at-fork hooks are inherited)."""
    global _forks_watched
    if not _forks_watched:
        os.register_at_fork(before=_copy_arena, after_in_parent=_close_copy,
                            after_in_child=_arena_in_forked_child)
        _forks_watched = True


def _copy_arena() -> None:
    """Just before ``os.fork()``: the arena as it is now, for the child (``Arena.copy``).

    Whether or not this process started forkpoint: a gunicorn master that made a ``persist()``
    region while loading the application forks workers that each start their own. Signals wait
    (a C-level mask, whose handlers run after the hook): CPython drops what an at-fork hook
    raises, and a Ctrl-C during the copy would have been lost with it.
    """
    global _copy_fd
    arena = _rt.arena
    if arena is None or _copies_paused:
        return
    old = _sigutil.unset_mask()
    try:
        _sigutil.block_all_into(old)
        _copy_fd = arena.copy()
    except Exception as e:  # noqa: BLE001 - the fork goes on; the child then detaches
        _copy_fd = -1
        log.warning("could not copy forkpoint's arena for a forked child (%s): the child's persist() "
                    "views stay shared with this process, and forkpoint makes it a new arena if it is "
                    "used", e)
    finally:
        _sigutil.restore_blocked(old)


def _close_copy() -> None:
    global _copy_fd
    fd, _copy_fd = _copy_fd, -1
    if fd >= 0:
        os.close(fd)


def _arena_in_forked_child() -> None:
    """A child the program forks has an arena of its own: the copy made at its fork."""
    global _copy_fd
    rt = _rt
    fd, _copy_fd = _copy_fd, -1
    if _copies_paused:                  # a benchmark's baseline: the child keeps the shared arena
        return
    if rt.arena is None:
        if fd >= 0:
            os.close(fd)
        return
    if fd < 0:                          # (the copy failed: said in the parent)
        rt.arena = None
        return
    old = _sigutil.unset_mask()
    try:
        _sigutil.block_all_into(old)
        rt.arena.take_copy(fd)
        rt.arena_copied = True
    except Exception as e:  # noqa: BLE001 - the child goes on; only the arena is not its own
        os.close(fd)
        rt.arena = None
        log.warning("a forked child could not map its copy of forkpoint's arena (%s): its persist() "
                    "views stay shared with its parent, and forkpoint makes it a new arena if it is "
                    "used", e)
    finally:
        _sigutil.restore_blocked(old)
