"""Input quarantine: the program's side of the paper's input filtering.

``processing(key)`` writes the key of the input being worked on into the arena, where the shepherd
reads it when the live process dies or rolls back; a key that keeps failing is quarantined by the
shepherd (see ``policy`` and ``_qkeeper``), so every later process of the program refuses it, and
at ``host`` or ``redis://`` scope every program of the service (``_qkeys``).

A server asks whether a key is quarantined on every request, so the answer is a lock-free read that
costs one word (or one 8-byte ``pread`` at host scope) while nothing changed (``_qlookup``).
Quarantining and releasing by hand are done by the shepherd, the one writer of the program's
quarantine tables.
"""
from __future__ import annotations

import os
from types import TracebackType

from . import _channel
from ._errors import Quarantined
from ._loop import EventLoop
from ._qkeeper import Keeper
from ._qkeys import check_key
from ._qlookup import Lookup, lookup
from ._runtime import runtime
from .arena import QUARANTINE_SIZE, Arena

__all__ = ["is_quarantined", "processing", "quarantine", "quarantined", "release"]

_key = check_key


def _lookup() -> Lookup:
    rt = runtime()
    return lookup(rt.quarantine_settings(), rt.arena_or_create())


class _Known:
    """For the protected-call paths (``@checkpointed``, ``wsgi``, ``asgi``):
    ``not quiet() and key in _known.keys_of(arena)`` (``_qlookup.QUIET``)."""

    def keys_of(self, arena: Arena) -> Lookup:
        return lookup(runtime().quarantine_settings(), arena)


_known = _Known()


def _by_hand(op: str, key: str) -> bool:
    """Quarantine or release ``key``: through the shepherd once it runs, else in this process."""
    rt = runtime()
    settings = rt.quarantine_settings()
    if not rt.started and settings.parsed.kind == "redis":
        rt.check_caller()
        rt.ensure_started()           # only the shepherd talks to Redis
    if rt.started:
        return bool(rt.request(_channel.QuarantineOp(op, key)).get("found"))
    keeper = Keeper(rt.arena_or_create(), settings, EventLoop(), os.getpid())
    if op == "add":
        keeper.add(key, QUARANTINE_SIZE)
        return True
    return keeper.release(key, f"program {os.getpid()} on {settings.host}", os.getpid(), os.geteuid())


def quarantine(key: str) -> None:
    """Quarantine ``key`` by hand (bounded: the oldest key is released when the store is full)."""
    _by_hand("add", check_key(key))


def is_quarantined(key: str) -> bool:
    return _lookup().contains(check_key(key))


def quarantined() -> list[str]:
    """The quarantined keys, oldest first (at a shared scope, a key whose text this program cannot
    know is shown as its hex digest)."""
    return _lookup().keys()


def release(key: str) -> bool:
    """Take ``key`` (or the hex digest a listing shows) out of quarantine; returns whether it was."""
    return _by_hand("release", check_key(key))


def mark(key: str) -> tuple[Arena, str | None]:
    """``processing(key).__enter__()`` for one protected call, in as few steps as possible.

    Returns what ``unmark`` needs. Used on the path of every request (``@checkpointed(key=...)``,
    the WSGI and ASGI wrappers): with a checkpoint per call, every page this touches is copied on
    write, so it does the same work as ``processing`` without its layers of calls.
    """
    lk = _lookup()
    if lk.contains(key):
        raise Quarantined(key)
    arena = lk.arena
    outer = arena.processing()
    arena.set_processing(key)
    return arena, outer


def unmark(marked: tuple[Arena, str | None]) -> None:
    marked[0].set_processing(marked[1])
    if marked[1] is None:           # an input done, not a step of one (policy: served)
        marked[0].count_served()


class processing:  # noqa: N801 - used as a function: ``with processing(key):``
    """Mark ``key`` as the input being processed; refuse it with ``Quarantined`` if it is.

    ``with processing(key) as k:`` (``k`` is the key as stored). An enclosing ``processing()`` is
    put back on exit, so a failure after an inner block blames the outer input.
    """

    __slots__ = ("key", "_arena", "_outer")

    def __init__(self, key: str) -> None:
        self.key = check_key(key)
        self._arena: Arena | None = None
        self._outer: str | None = None

    def __enter__(self) -> str:
        self._arena, self._outer = mark(self.key)
        return self.key

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        arena, self._arena = self._arena, None
        if arena is not None:
            arena.set_processing(self._outer)
            if self._outer is None:     # an input done, not a step of an enclosing one
                arena.count_served()
