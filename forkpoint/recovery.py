"""Input quarantine: the program's side of the paper's input filtering.

``processing(key)`` writes the key of the input being worked on into the arena, where the shepherd
reads it when the live process dies or rolls back; a key that keeps failing is quarantined by the
shepherd (see ``policy``), in the arena, so every later process of the program refuses it.

A server asks ``is_quarantined(key)`` for every request, so the answer must not cost a decode of
the store each time: the decoded keys are kept with the store's commit counter (one arena word)
and decoded again only when the shepherd or ``quarantine()``/``release()`` changed it.
"""
from __future__ import annotations

from types import TracebackType

from ._errors import ForkpointError, Quarantined
from ._runtime import runtime
from .arena import QUARANTINE_ENTRY, Arena, add_quarantine, load_quarantine, remove_quarantine

__all__ = ["is_quarantined", "processing", "quarantine", "quarantined", "release"]


def _arena() -> Arena:
    return runtime().arena_or_create()


def _key(key: object) -> str:
    if not isinstance(key, str):
        key = repr(key)
    if not key or len(key.encode()) > 256:
        raise ValueError("an input key must be a non-empty str of at most 256 bytes")
    return key


class _Known:
    """The quarantined keys as last decoded, and the commit counter they were decoded at."""

    def __init__(self) -> None:
        self.arena: Arena | None = None
        self.word = -1
        self.generation = -1
        self.keys: frozenset[str] = frozenset()

    def keys_of(self, arena: Arena) -> frozenset[str]:
        if arena is not self.arena:
            self.arena, self.word, self.generation = arena, -1, -1
        if self.word < 0:
            try:
                word = arena.generation_word(QUARANTINE_ENTRY)
                if word is None:    # no store yet: an empty one, so that later calls read one word
                    arena.cache_in(QUARANTINE_ENTRY, b"[]")
                    word = arena.generation_word(QUARANTINE_ENTRY)
            except ForkpointError:  # a full or damaged arena: decode every time (logged there)
                word = None
            if word is None:
                return frozenset(load_quarantine(arena))
            self.word = word
        generation = int(arena.words[self.word])
        if generation != self.generation:
            self.keys = frozenset(load_quarantine(arena))
            self.generation = generation
        return self.keys


_known = _Known()


def quarantine(key: str) -> None:
    """Quarantine ``key`` by hand (bounded: the oldest key is released when the store is full)."""
    add_quarantine(_arena(), _key(key))


def is_quarantined(key: str) -> bool:
    return _key(key) in _known.keys_of(_arena())


def quarantined() -> list[str]:
    """The quarantined keys, oldest first."""
    return load_quarantine(_arena())


def release(key: str) -> bool:
    """Take ``key`` out of quarantine; returns whether it was there."""
    return remove_quarantine(_arena(), _key(key))


def mark(key: str) -> tuple[Arena, str | None]:
    """``processing(key).__enter__()`` for one protected call, in as few steps as possible.

    Returns what ``unmark`` needs. Used on the path of every request (``@checkpointed(key=...)``,
    the WSGI and ASGI wrappers): with a checkpoint per call, every page this touches is copied on
    write, so it does the same work as ``processing`` without its layers of calls.
    """
    arena = runtime().arena_or_create()
    if key in _known.keys_of(arena):
        raise Quarantined(key)
    outer = arena.processing()
    arena.set_processing(key)
    return arena, outer


def unmark(marked: tuple[Arena, str | None]) -> None:
    marked[0].set_processing(marked[1])


class processing:  # noqa: N801 - used as a function: ``with processing(key):``
    """Mark ``key`` as the input being processed; refuse it with ``Quarantined`` if it is.

    ``with processing(key) as k:`` (``k`` is the key as stored). An enclosing ``processing()`` is
    put back on exit, so a failure after an inner block blames the outer input.
    """

    __slots__ = ("key", "_arena", "_outer")

    def __init__(self, key: str) -> None:
        self.key = _key(key)
        self._arena: Arena | None = None
        self._outer: str | None = None

    def __enter__(self) -> str:
        arena = _arena()
        if self.key in _known.keys_of(arena):
            raise Quarantined(self.key)
        self._outer = arena.processing()
        self._arena = arena
        arena.set_processing(self.key)
        return self.key

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        arena, self._arena = self._arena, None
        if arena is not None:
            arena.set_processing(self._outer)
