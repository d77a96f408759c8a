"""The program's children keep their true exit statuses across ``start()`` and every restore.

A child started before ``start()`` is a child of the original process, which became the shepherd;
a child started by a live process that a restore then killed is re-parented to the shepherd (it is
the child subreaper). Either way ``waitpid`` in the live process fails with ECHILD, and Python's
``subprocess`` turns that ECHILD into a silent exit status 0. So the live process replaces the
``os`` wait functions (``install``): when the kernel says "not your child", they ask the shepherd,
which reaps such children and keeps their statuses (``_shepherd``: ``ChildQuery``), and then a ring
in the arena where every live process records the children it reaped itself (a restored process can
hold a ``Popen`` for a child that a rolled-back process had already waited for).

A wait for "any child" also looks in that ring for the children this process's memory knew at
its last checkpoint and has not seen end (``at_checkpoint``): a process rolled back to before a
wait for any child must still be given the children that a rolled-back process reaped, and only
those it had started itself (not those started after its checkpoint).

Where it ends: only a child nobody recorded (for example one reaped by ``os.waitid`` or by C code)
still gets ECHILD, as it would without forkpoint. ``os.waitid`` itself is not replaced. A blocking
wait for "any child" while the shepherd holds some of them looks at the real ones and asks the
shepherd again every 50 ms.
"""
from __future__ import annotations

import errno
import os
import resource
import select
import sys
from collections.abc import Callable

from . import _procfs
from ._channel import ChildQuery, Message
from .arena import Arena

_real_waitpid = os.waitpid
_real_wait = os.wait
_real_wait3 = os.wait3
_real_wait4 = os.wait4

Ask = Callable[[Message], tuple[dict, list[int]]]
_arena: Arena | None = None
_ask: Ask | None = None
_POLL = 0.05          # seconds between looks at the real children while waiting for "any child"
# The children this memory knew at its last checkpoint and has not seen end, oldest first (process
# memory: a restore rolls it back with the rest).
_unwaited: dict[int, None] = {}
_UNWAITED_MAX = 4096
_ring_seen = 0        # the ring's count up to which this memory has looked for them
# The children this memory has seen end, with the ring's sequence number of that end (process
# memory too): a ring record no newer than it is a status this memory has already been given, and
# a second wait for that pid gets ECHILD, as from the kernel. Only a process rolled back to before
# the wait (whose memory does not have the entry) is given the status from the ring.
_ended: dict[int, int] = {}
_ENDED_MAX = 4096


def at_checkpoint(threads: bool) -> None:
    """``tsetjmp()``, before its fork, with every signal blocked: add this process's children to
    those it has not seen end (``threads``: other threads may have started some). A child held by
    the shepherd is not among them, but stays if an earlier checkpoint had it."""
    if _arena is None:
        return
    try:
        for pid in _procfs.own_children(threads):
            _unwaited[pid] = None
        while len(_unwaited) > _UNWAITED_MAX:
            del _unwaited[next(iter(_unwaited))]
    except Exception:  # noqa: BLE001 - called with every signal blocked: it must not raise
        pass


def _note(pid: int, status: int) -> None:
    global _ring_seen
    if pid > 0 and _arena is not None and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
        _unwaited.pop(pid, None)
        count = _arena.reaped_count()
        _arena.note_reaped(pid, status)
        _seen_end(pid, count)
        if _ring_seen == count:         # nothing another process wrote is left unread
            _ring_seen = count + 1


def _seen_end(pid: int, seq: int) -> None:
    _ended.pop(pid, None)
    _ended[pid] = seq
    while len(_ended) > _ENDED_MAX:
        del _ended[next(iter(_ended))]


def _from_ring(pid: int) -> tuple[int, int] | None:
    """A child this memory had not seen end, that a process since rolled back reaped (pid -1 or
    0: the ring does not say which group a child was in). Only the live process writes the ring,
    so once this memory has read what others wrote, there is nothing to look for until a restore."""
    global _ring_seen
    if pid < -1 or not _unwaited or _arena is None:
        return None
    count = _arena.reaped_count()
    if count == _ring_seen:
        return None
    for child in list(_unwaited):
        entry = _arena.reaped_entry(child)
        if entry is None:
            continue
        try:
            got = _real_waitpid(child, os.WNOHANG)
        except ChildProcessError:       # not ours: the status a rolled-back process collected
            del _unwaited[child]
            _seen_end(child, entry[0])
            return child, entry[1]
        if got[0] == child:             # ours (its pid was used before), and it has just ended
            _note(*got)
            return got
    _ring_seen = count
    return None


def _echild() -> ChildProcessError:
    return ChildProcessError(errno.ECHILD, os.strerror(errno.ECHILD))


def _query(pid: int) -> tuple[dict, list[int]]:
    """What the shepherd knows of child ``pid`` (or of any child, for pid <= 0), with a pidfd for
    each child it holds that is still running. An empty answer means it knows of none."""
    if _ask is None:
        raise _echild()
    return _ask(ChildQuery(pid, list(_unwaited) if pid <= 0 else None))


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _block(fds: list[int], timeout: float | None) -> None:
    """Sleep until one of the pidfds turns readable (its process exited), or ``timeout``."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    try:
        if not fds and timeout is None:
            timeout = _POLL             # no pidfd to wait on (pidfd_open failed): look again later
        poller.poll(None if timeout is None else timeout * 1000)
    finally:
        _close(fds)


def _wait_held(pid: int, options: int) -> tuple[int, int]:
    """waitpid for a child the kernel says is not ours (pid > 0)."""
    pause = 0.0
    while True:
        if pause:                       # it exited, but its dying parent still holds its status
            _block([], pause)
        pause = min(2 * pause or 0.002, _POLL)
        data, fds = _query(pid)
        if "status" in data:
            _close(fds)
            # Claimed from the shepherd, which forgets it now: recorded like a child reaped here,
            # so that a process restored to before this wait finds the status again.
            _note(pid, int(data["status"]))
            return pid, int(data["status"])
        if not data.get("alive"):
            entry = _arena.reaped_entry(pid) if _arena is not None else None
            if entry is None or entry[0] <= _ended.get(pid, -1):
                raise _echild()         # never recorded, or this memory has seen it end already
            _unwaited.pop(pid, None)
            _seen_end(pid, entry[0])
            return pid, entry[1]
        if options & os.WNOHANG:
            _close(fds)
            return 0, 0
        _block(fds, None)               # until it exits (its pidfd turns readable)


def _wait_any(pid: int, options: int) -> tuple[int, int]:
    """waitpid for any child (pid <= 0) while the shepherd holds some of the program's children."""
    while True:
        real_alive = True
        try:
            got = _real_waitpid(pid, options | os.WNOHANG)
        except ChildProcessError:
            real_alive = False
        else:
            if got[0] > 0:
                _note(*got)
                return got
        data, fds = _query(pid)
        if "status" in data:
            _close(fds)
            _note(int(data["pid"]), int(data["status"]))    # as in _wait_held
            return int(data["pid"]), int(data["status"])
        if not real_alive and not data.get("alive"):
            raise _echild()
        if options & os.WNOHANG:
            _close(fds)
            return 0, 0
        # Asked again every _POLL seconds even with no child of its own: a process the shepherd
        # held may turn out to be forkpoint's own (found by its scan before it reported), and a
        # wait for it would never end.
        _block(fds, _POLL)


def _waitpid(pid: int, options: int, /) -> tuple[int, int]:
    if pid <= 0 and _unwaited:
        got = _from_ring(pid)
        if got is not None:
            return got
    if pid <= 0 and _arena is not None and _arena.orphans():
        return _wait_any(pid, options)
    try:
        got = _real_waitpid(pid, options)
    except ChildProcessError:
        # The shepherd may hold children it has not counted in the arena yet (it scans for them
        # when it starts and after each restore): ask before answering ECHILD.
        return _wait_held(pid, options) if pid > 0 else _wait_any(pid, options)
    _note(*got)
    return got


def _wait() -> tuple[int, int]:
    return _waitpid(-1, 0)



def _wait4(pid: int, options: int) -> tuple[int, int, resource.struct_rusage]:
    got4 = _from_ring(pid) if pid <= 0 and _unwaited else None
    if got4 is not None:
        return got4 + (resource.struct_rusage((0.0, 0.0) + (0,) * 14),)
    if not (pid <= 0 and _arena is not None and _arena.orphans()):
        try:
            got = _real_wait4(pid, options)
        except ChildProcessError:
            pass
        else:
            _note(got[0], got[1])
            return got
    p, status = _waitpid(pid, options)      # held by the shepherd: no resource usage to report
    # (made here: a struct_rusage kept at module level trips CPython 3.11 at interpreter exit)
    return p, status, resource.struct_rusage((0.0, 0.0) + (0,) * 14)


def _wait3(options: int) -> tuple[int, int, resource.struct_rusage]:
    return _wait4(-1, options)


for _mine, _theirs in ((_waitpid, _real_waitpid), (_wait, _real_wait), (_wait3, _real_wait3),
                       (_wait4, _real_wait4)):
    _mine.__doc__ = _theirs.__doc__


def install(arena: Arena, ask: Ask) -> None:
    """Let this (live) process wait for the children the shepherd holds."""
    global _arena, _ask, _ring_seen
    _arena, _ask = arena, ask
    _ring_seen = arena.reaped_count()
    os.waitpid, os.wait, os.wait3, os.wait4 = _waitpid, _wait, _wait3, _wait4
    _patch_subprocess(_real_waitpid, _waitpid)


def forget_in_forked_child() -> None:
    """A child the program forks has children of its own, none of them held by the shepherd."""
    global _arena, _ask
    _arena = _ask = None
    _unwaited.clear()
    _ended.clear()
    os.waitpid, os.wait, os.wait3, os.wait4 = _real_waitpid, _real_wait, _real_wait3, _real_wait4
    _patch_subprocess(_waitpid, _real_waitpid)


def _patch_subprocess(old: object, new: object) -> None:
    """``subprocess`` binds ``os.waitpid`` once, as a default argument (3.10-3.12) or in a class
    (3.13+), for use from ``__del__``. A later import binds the replacement by itself."""
    sub = sys.modules.get("subprocess")
    if sub is None:
        return
    safe = getattr(sub, "_del_safe", None)
    if safe is not None and getattr(safe, "waitpid", None) is old:
        safe.waitpid = new
    poll = getattr(getattr(sub, "Popen", None), "_internal_poll", None)
    defaults = getattr(poll, "__defaults__", None)
    if poll is not None and defaults and any(d is old for d in defaults):
        poll.__defaults__ = tuple(new if d is old else d for d in defaults)
