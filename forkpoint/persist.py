"""Memory that survives a rollback: the paper's ``persist()`` and ``cache()``, and the jump history.

Thin functions over the program's arena (``forkpoint.arena``): every process of the program maps the
same bytes, so what is written here survives every ``tlongjmp()`` and every crash.
"""
from __future__ import annotations

import ctypes
import pickle  # noqa: F401 - loaded with the package: Arena.cache_in/out import it (the shepherd does not)
import struct
from typing import Any, TypeVar

from ._runtime import runtime
from .arena import Arena, HistoryRecord

IN = 1
OUT = 2

__all__ = ["IN", "OUT", "HistoryRecord", "PersistentInt", "cache", "history", "persist", "persist_array",
           "persist_int", "persist_struct"]


def _arena() -> Arena:
    return runtime().arena_or_create()


def persist(name: str, size: int) -> memoryview:
    """Return the persistent region ``name`` of exactly ``size`` bytes, created zeroed if new.

    Every process of the program sees the same bytes, so values written survive ``tlongjmp()``,
    even to a checkpoint taken before the region existed. Writing through the view past ``size``
    is impossible (memoryview bounds).
    """
    return _arena().persist(name, size)


def cache(direction: int, name: str, data: Any = None) -> Any:
    """The paper's cache(): ``cache(IN, name, data)`` stores a validated copy; ``cache(OUT, name)``
    returns the last copy stored.

    Bytes-like data comes back as ``bytes``; anything else is pickled and comes back unpickled.
    Only an explicit IN changes what OUT returns. A corrupted entry raises ``CacheCorrupted``, a
    name never stored raises ``KeyError``.
    """
    if direction == IN:
        _arena().cache_in(name, data)
        return None
    if direction == OUT:
        if data is not None:
            raise TypeError("cache(OUT, name) takes no data")
        return _arena().cache_out(name)
    raise ValueError("direction must be forkpoint.IN or forkpoint.OUT")


def history() -> list[HistoryRecord]:
    """The jump history, oldest first: every restore and policy decision over the program's life."""
    return _arena().history()


class PersistentInt:
    """A signed 64-bit integer in persistent memory (``.value``), e.g. an iteration counter."""

    __slots__ = ("_view",)

    def __init__(self, view: memoryview) -> None:
        self._view = view

    @property
    def value(self) -> int:
        return self._view[0]

    @value.setter
    def value(self, v: int) -> None:
        self._view[0] = v

    def add(self, n: int = 1) -> int:
        view = self._view
        v = view[0] + n
        view[0] = v
        return v

    def __repr__(self) -> str:
        return f"PersistentInt({self._view[0]})"


def persist_int(name: str) -> PersistentInt:
    """A persistent int64 counter named ``name`` (starts at 0)."""
    return PersistentInt(persist(name, 8).cast("q"))


def persist_array(name: str, length: int, typecode: str = "d") -> memoryview:
    """A persistent array of ``length`` items with a struct typecode (default doubles)."""
    itemsize = struct.calcsize(typecode)
    return persist(name, length * itemsize).cast(typecode)  # type: ignore[call-overload]


S = TypeVar("S", bound=ctypes.Structure)


def persist_struct(name: str, ctype: type[S]) -> S:
    """A persistent instance of a ``ctypes.Structure`` subclass, backed by the arena."""
    return ctype.from_buffer(persist(name, ctypes.sizeof(ctype)))
