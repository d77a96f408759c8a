"""C libraries' idle worker threads, which a checkpoint's copy would be left waiting for.

OpenBLAS, the linear algebra that numpy's and scipy's wheels bundle, starts its worker threads as
it is loaded and keeps them for the process's life; OpenMP's runtimes (``libgomp`` in
scikit-learn's and torch's wheels, and any C extension built with ``-fopenmp``) keep theirs after
the first parallel loop. ``fork()`` copes with OpenBLAS's: its at-fork handler ends them before the
fork, and each process starts new ones at its next threaded call. forkpoint's copies are made by
clone(2) itself, which runs no at-fork handler (``_clone``), so a copy kept the library's record of
threads that did not exist in it: after a restore, the first matrix product (or parallel loop)
large enough to be threaded waited for them for ever. And those threads alone made every
checkpoint refuse with ``ThreadsAlive``: ``import numpy`` was enough, and ``forkpoint.start()``
before it did not help, since the first product started them again.

So before it counts the threads that would stop a checkpoint (or a start), forkpoint asks each
such library it finds loaded to end its idle pool, with the call the library provides for it:
OpenBLAS's at-fork handler itself (``blas_thread_shutdown_``; numpy 2.5's OpenBLAS does not
export it, and ``_elfsym`` finds it in the library's symbol table), and OpenMP 5.0's
``omp_pause_resource_all(omp_pause_hard)``. Each does nothing when its pool is empty, and each
library starts a new pool at its next threaded call, in the program and in its copies, as after
an ``os.fork()``. The price is small beside the copy itself (measured 2026-11-29, numpy with two
OpenBLAS threads, medians of 25): ``tsetjmp()`` 4.0-4.6 ms against 3.9-4.0 with no pool at all,
and the first 600x600 product after it 23 ms against 20-23 (the copy-on-write faults of its
buffers dominate; the next takes 7-8 ms, 13.5-14 on one thread). OpenMP's ``threadprivate``
values of its worker threads do not survive a hard pause.

The libraries are found by file name in ``/proc/self/maps``, which is read only when the process has
threads besides the caller: a program without them pays nothing.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Callable

from . import _elfsym, _procfs

log = logging.getLogger("forkpoint")

_OMP_PAUSE_HARD = 2
# (the libraries' file names, the call that ends an idle pool, its argument)
_POOLS: tuple[tuple[re.Pattern[str], str, tuple[int, ...]], ...] = (
    (re.compile(r"openblas"), "blas_thread_shutdown_", ()),
    (re.compile(r"^lib(g|i)?omp5?[.-]"), "omp_pause_resource_all", (_OMP_PAUSE_HARD,)),
)
_Pool = tuple[str, str, tuple[int, ...], Callable[..., int]]     # (library, call's name, args, call)
_found: list[_Pool] = []
_scanned: set[str] = set()      # the libraries looked at, with or without such a call


def other_threads() -> int:
    """Threads of this process besides the caller, once the idle pools above are ended.

    One ``stat`` of ``/proc/self/task`` when there are none, as before this module: every
    ``tsetjmp()`` asks, and that call costs 80-100 us on a cold cache here."""
    if not _procfs.other_threads(settle=False):
        return 0
    end_idle_pools()
    return _procfs.other_threads()


def end_idle_pools() -> int:
    """Ask every loaded library of ``_POOLS`` to end its idle threads; return how many were asked.

    The libraries found before are asked first; the maps are read again only if threads remain
    that Python did not start (a library loaded since), which keeps a checkpoint with numpy's
    pool running at about 0.1 ms for the call instead of 0.4 with the read, also with
    ``allow_threads=True`` and threads of the program's own.

    With ``allow_threads=True`` a thread of the program may be inside a threaded BLAS call as its
    pool is ended: the same hazard as an ``os.fork()`` from a program with threads, whose at-fork
    handler does the same."""
    asked = _ask(_found)
    if not asked or _procfs.other_threads(settle=False) > threading.active_count() - 1:
        asked += _ask(_find())
    return asked


def _find() -> list[_Pool]:
    new = []
    for path in _procfs.mapped_libraries():
        if path in _scanned:
            continue
        _scanned.add(path)
        name = os.path.basename(path).lower()
        for pattern, symbol, args in _POOLS:
            fn = _function(path, symbol, len(args)) if pattern.search(name) else None
            if fn is not None:
                new.append((name, symbol, args, fn))
    _found.extend(new)
    return new


def _ask(pools: list[_Pool]) -> int:
    for name, symbol, args, fn in pools:
        fn(*args)
        log.debug("forkpoint: %s(%s) in %s before copying the process", symbol,
                  ", ".join(map(str, args)), name)
    return len(pools)


def _function(path: str, symbol: str, nargs: int) -> Callable[..., int] | None:
    """The library's call, exported or (numpy 2.5's OpenBLAS hides it) found in its ``.symtab``."""
    try:        # RTLD_NOLOAD: a handle of the copy already loaded, or nothing
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None
    argtypes = [ctypes.c_int] * nargs
    fn = getattr(lib, symbol, None)
    if fn is not None:
        fn.restype = ctypes.c_int
        fn.argtypes = argtypes
        return fn   # type: ignore[no-any-return]
    address = _elfsym.hidden_function(path, lib, symbol)
    if address is None:
        return None
    return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(address)   # type: ignore[no-any-return]
