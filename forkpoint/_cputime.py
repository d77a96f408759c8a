"""The program's CPU time, counted as one process would count it.

After ``start()`` the program runs in a child of the shepherd, and after every restore in another
child, and a process's CPU clock starts at 0: ``time.process_time()`` fell back to about 0 at the
start and at each restore, so a job runner that timed its jobs in CPU time got negative durations.
The live process replaces the functions that read that clock (``install``), so that they count the
whole program: the original process up to ``start()``, and every live process since, including
the attempts a restore rolled back (that time was spent), but none of forkpoint's own processes
(the shepherd, the keepers, a spare before its wake-up).

The arena holds what the processes no longer live used: the original process adds its own before
``start()`` forks, and the shepherd adds each live process's when it reaps it (``wait4``'s
rusage, less what the process had used before it became live). A killed process is reaped only
once it is torn down, after its successor runs, so the arena also holds the highest value any
live process answered, and none answers less: the clock never runs backwards, and it may stand
still (for as long as a teardown takes) before the rolled-back attempt's time is added.

Replaced: ``time.process_time[_ns]``, ``time.clock_gettime[_ns]`` for
``CLOCK_PROCESS_CPUTIME_ID``, ``os.times()`` (user and system) and ``resource.getrusage`` for
``RUSAGE_SELF`` (``ru_utime`` and ``ru_stime``; its other fields stay the live process's). A child
the program forks gets the real functions back: its clock is its own, as without forkpoint.

Where it ends: code that took a reference to a function before forkpoint started (``from time
import process_time``), C code, ``time.thread_time()`` (a thread's own), CPU timers and
``RLIMIT_CPU`` (the kernel's, per process), and the children's times (``RUSAGE_CHILDREN``).
"""
from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

from . import _identity
from .arena import Arena, usage_ns

_real_process_time = time.process_time
_real_process_time_ns = time.process_time_ns
_real_clock_gettime = time.clock_gettime
_real_clock_gettime_ns = time.clock_gettime_ns
_real_times = os.times
_real_getrusage = resource.getrusage

_CPU = time.CLOCK_PROCESS_CPUTIME_ID
_SELF = resource.RUSAGE_SELF
_arena: Arena | None = None
_live0 = (0, 0)      # this process's own (user, system) ns when it became live
# A warmed spare's clock as it blocked (waking adds next to nothing), and its arena write, made ready
_ready: tuple[tuple[int, int], Callable[[], None]] | None = None


def own_ns() -> tuple[int, int]:
    """This process's own (user, system) CPU time, ns."""
    return usage_ns(_real_getrusage(_SELF))


def install(arena: Arena) -> None:
    """In the first live process, right after ``start()``'s fork (the original process has added
    its own time to the arena before it)."""
    global _arena
    _arena = arena
    became_live()
    time.process_time, time.process_time_ns = _process_time, _process_time_ns
    time.clock_gettime, time.clock_gettime_ns = _clock_gettime, _clock_gettime_ns
    os.times, resource.getrusage = _times, _getrusage


def frozen() -> None:
    """A spare has warmed up and blocks until a restore wakes it: its clock stands still until
    then, so it is read now, and what ``became_live`` writes is made ready, off the restore's path
    (each page it would first write there is a copy-on-write fault)."""
    global _ready
    if _arena is not None:
        live0 = own_ns()
        _ready = (live0, _arena.live_cpu_writer(_identity.real_pid(), *live0))


def became_live() -> None:
    """This process runs program code from now on (a woken spare, after its Up; ``install``): what
    its clock counted so far was forkpoint's, and the shepherd subtracts it too when it reaps the
    process."""
    global _live0, _ready
    if _arena is None:
        return
    ready, _ready = _ready, None
    if ready is None:
        _live0 = own_ns()
        _arena.set_live_cpu(_identity.real_pid(), *_live0)
    else:
        _live0, write = ready
        write()


def forget_in_forked_child() -> None:
    """A child the program forked counts its own time, as without forkpoint."""
    global _arena
    _arena = None
    time.process_time, time.process_time_ns = _real_process_time, _real_process_time_ns
    time.clock_gettime, time.clock_gettime_ns = _real_clock_gettime, _real_clock_gettime_ns
    os.times, resource.getrusage = _real_times, _real_getrusage


def _raise(words: Any, i: int, value: int) -> int:
    """At least what any live process answered before (``words[i]``), and remember it."""
    seen = int(words[i])
    if value <= seen:
        return seen
    words[i] = value
    return value


def _split_ns(arena: Arena, own: Any) -> tuple[int, int]:
    """The program's (user, system) CPU time, ns, from this process's own rusage ``own``."""
    user, system = usage_ns(own)
    base_user, base_sys = arena.cpu_base()
    seen = arena.cpu_seen()
    return (_raise(seen, 0, base_user + user - _live0[0]),
            _raise(seen, 1, base_sys + system - _live0[1]))


def _process_time_ns() -> int:
    arena = _arena
    if arena is None:
        return _real_process_time_ns()
    own = _real_clock_gettime_ns(_CPU)
    base_user, base_sys = arena.cpu_base()
    return _raise(arena.cpu_seen(), 2, base_user + base_sys + own - _live0[0] - _live0[1])


def _process_time() -> float:
    return _process_time_ns() / 1e9


def _clock_gettime_ns(clk_id: int, /) -> int:
    return _process_time_ns() if clk_id == _CPU and _arena is not None else _real_clock_gettime_ns(clk_id)


def _clock_gettime(clk_id: int, /) -> float:
    return _process_time_ns() / 1e9 if clk_id == _CPU and _arena is not None else _real_clock_gettime(clk_id)


def _times() -> os.times_result:
    real = _real_times()
    arena = _arena
    if arena is None:
        return real
    user, system = _split_ns(arena, _real_getrusage(_SELF))
    return os.times_result((user / 1e9, system / 1e9, real.children_user, real.children_system,
                            real.elapsed))


def _getrusage(who: int, /) -> resource.struct_rusage:
    real = _real_getrusage(who)
    arena = _arena
    if who != _SELF or arena is None:
        return real
    user, system = _split_ns(arena, real)
    return resource.struct_rusage((user / 1e9, system / 1e9, *tuple(real)[2:]))
