"""One process, as Python code sees it: the face PID, the face's parent, and signals to itself.

After ``start()`` the program runs in a child of the shepherd, and after every restore in another
child; only the shepherd keeps the PID the outside world knows (the *face* PID). Real software
notices the move: gunicorn's worker compares ``os.getppid()`` with its master's PID and exits when
it changes, programs write ``os.getpid()`` to PID files and logs, and a program that signals itself
with ``os.kill(os.getpid(), sig)`` expects the signal before the call returns.

So the live process replaces three functions of the ``os`` module (``install``):

* ``os.getpid()`` returns the face PID, before and after any number of restores;
* ``os.getppid()`` returns the face's parent *now*: the shepherd keeps it in the arena and rewrites
  it when that parent dies (so gunicorn's orphan check still works when its master is killed);
* ``os.kill(face, sig)`` signals the calling process itself, so a signal a program sends itself
  arrives before the call returns, as it would without forkpoint; any other target is unchanged.
  When the face is a PID namespace's init (a container's PID 1), the kernel drops every signal
  init sends itself that it does not handle (SIGKILL and SIGSTOP too): so does the replacement,
  where the live process, not being init, would have died or stopped;
* ``os.setpgrp()``, ``os.setpgid(0, 0)`` and ``os.setsid()`` answer as the face would when it leads
  its process group (a shell with job control, systemd and ``setsid`` all make it so): making
  itself a group leader changes nothing, and a new session is refused with EPERM. The live
  process, a child, could do both: it left the terminal's foreground group, and Ctrl-C, Ctrl-Z
  and terminal reads no longer reached the program. (A face that leads no group gets the calls
  as they are: the live process, not the program, moves.)

A child the program forks itself (``os.fork``, ``multiprocessing``) gets the real functions back
through an at-fork hook: it sees its own PID, and its parent as the face PID while the live process
that forked it runs (after a restore it is the shepherd's child, whose PID is the face PID anyway).
The replacements answer the same in such a child, for code that bound them before the fork.

``multiprocessing.util.Finalize`` binds ``os.getpid`` as a default argument when it is first
imported and runs a finalizer only where ``getpid()`` still equals the PID taken when the finalizer
was made. Bound before the start (the real function) it disagreed with every finalizer of the live
process, and bound after it, with every finalizer of a forked child: pools were not terminated,
and a child's last ``Queue.put()`` was lost (its feeder thread was not flushed). So ``install``
binds the replacement there too.

Where it ends: C code that calls ``getpid(2)`` directly, ``/proc/self`` (the real process), code
that took a reference to the function before forkpoint started (``from os import getpid``), and
tools that look a PID up in ``/proc`` (``psutil.Process()`` describes the shepherd).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any

from . import _procfs, _sigutil
from .arena import Arena

_real_getpid = os.getpid
_real_getppid = os.getppid
_real_kill = os.kill
_real_setpgrp = os.setpgrp
_real_setpgid = os.setpgid
_real_setsid = os.setsid

_face = 0                  # the face PID; 0 until install()
_arena: Arena | None = None
_parent_live = 0           # in a forked child: the real PID of the live process that forked it
_forked = False            # this is a child the program forked: the replacements answer as os does


def real_pid() -> int:
    """This process's own PID, whatever ``os.getpid()`` says."""
    return _real_getpid()


def real_setpgid(pid: int, pgrp: int) -> None:
    """``setpgid(2)`` itself: forkpoint's own processes move between groups (keepers and spares
    leave the program's group, a restored process rejoins it), which ``os.setpgid`` answers as
    for the face in the live process and every copy of it."""
    _real_setpgid(pid, pgrp)


def real_ppid() -> int:
    """This process's real parent (the shepherd, for the program's own processes)."""
    return _real_getppid()


def _getpid() -> int:
    return _real_getpid() if _forked else _face


def _getppid() -> int:
    if _forked:
        return _child_getppid()
    arena = _arena
    ppid = arena.face_ppid() if arena is not None else None
    return ppid if ppid is not None else _real_getppid()    # (0: a parent outside the namespace)


def _kill(pid: int, sig: int, /) -> None:
    if pid == _face and not _forked:
        if _face == 1 and _init_drops(sig):
            return
        pid = _real_getpid()
    _real_kill(pid, sig)


def _init_drops(sig: int) -> bool:
    """Whether the kernel drops ``sig`` that a PID namespace's init sends itself: every signal
    whose action is the default, SIGKILL and SIGSTOP included (only an ancestor namespace can
    force those on it). A fault signal is judged by Python's own handler: forkpoint's faulthandler
    (``recover_on``) catches it in the live process, where the program may have none. A blocked
    signal is queued for init too, whatever its action (``sigwait()``): sent."""
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        return True
    if not 0 < sig < signal.NSIG:
        return False                    # 0 probes, and a bad number fails as it would
    if sig in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        return False
    if sig in _sigutil.REPORTED_SIGNALS:
        return signal.getsignal(sig) == signal.SIG_DFL
    masks = _procfs.signal_dispositions(_real_getpid())
    return masks is not None and _sigutil.disposition(sig, *masks) in ("terminate", "stop")


def _leads_group() -> bool:
    """Whether the face leads the program's process group (the live process is in it)."""
    return not _forked and os.getpgid(0) == _face


def _setpgrp() -> None:
    if not _leads_group():
        _real_setpgrp()


def _setpgid(pid: int, pgrp: int, /) -> None:
    me = pid in (0, _face) and not _forked
    if me and pgrp in (0, _face) and _leads_group():
        return                          # already the leader of its own group
    _real_setpgid(0 if me else pid, pgrp)


def _setsid() -> None:
    if _leads_group():
        raise PermissionError(1, "Operation not permitted")    # a group leader cannot (setsid(2))
    _real_setsid()


def _child_getppid() -> int:
    ppid = _real_getppid()
    return _face if ppid == _parent_live else ppid


_getpid.__doc__ = _real_getpid.__doc__
_getppid.__doc__ = _real_getppid.__doc__
_kill.__doc__ = _real_kill.__doc__
_setpgrp.__doc__ = _real_setpgrp.__doc__
_setpgid.__doc__ = _real_setpgid.__doc__
_setsid.__doc__ = _real_setsid.__doc__


def install(face: int, arena: Arena) -> None:
    """Make this (live) process answer as the face PID (also in a child the program forked, which
    starts forkpoint of its own)."""
    global _face, _arena, _forked
    _face, _arena, _forked = face, arena, False
    _set(getpid=_getpid, getppid=_getppid, kill=_kill, setpgrp=_setpgrp, setpgid=_setpgid, setsid=_setsid)
    util = sys.modules.get("multiprocessing.util")
    if util is not None:                # else it binds ours when it is imported
        _rebind(util.Finalize.__call__, _real_getpid, _getpid)


def _rebind(fn: Any, old: Any, new: Any) -> None:
    """Replace ``old`` among ``fn``'s default arguments by ``new``."""
    defaults = getattr(fn, "__defaults__", None)
    if defaults and any(d is old for d in defaults):
        fn.__defaults__ = tuple(new if d is old else d for d in defaults)


def forget_in_forked_child() -> None:
    """In a child the live process forked: its own PID again, and the face PID as its parent.

    (At-fork hooks are inherited: in a grandchild this hook runs again and restores the real
    ``os.getppid`` as well.)
    """
    global _parent_live, _forked
    if os.getpid is _getpid:
        _parent_live = _real_getppid()
        _forked = True
        _set(getpid=_real_getpid, getppid=_child_getppid, kill=_real_kill)
    else:
        _set(getpid=_real_getpid, getppid=_real_getppid, kill=_real_kill)
    _set(setpgrp=_real_setpgrp, setpgid=_real_setpgid, setsid=_real_setsid)


def _set(**functions: Any) -> None:
    for name, fn in functions.items():
        setattr(os, name, fn)
