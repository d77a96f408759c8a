"""Input quarantine: the program's side of the paper's input filtering.

``processing(key)`` writes the key of the input being worked on into the arena, where the shepherd
reads it when the live process dies or rolls back; a key that keeps failing is quarantined by the
shepherd (see ``policy``), in the arena, so every later process of the program refuses it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ._errors import Quarantined
from ._runtime import runtime
from .arena import Arena, add_quarantine, load_quarantine, remove_quarantine

__all__ = ["is_quarantined", "processing", "quarantine", "quarantined", "release"]


def _arena() -> Arena:
    return runtime().arena_or_create()


def _key(key: object) -> str:
    if not isinstance(key, str):
        key = repr(key)
    if not key or len(key.encode()) > 256:
        raise ValueError("an input key must be a non-empty str of at most 256 bytes")
    return key


def quarantine(key: str) -> None:
    """Quarantine ``key`` by hand (bounded: the oldest key is released when the store is full)."""
    add_quarantine(_arena(), _key(key))


def is_quarantined(key: str) -> bool:
    return _key(key) in load_quarantine(_arena())


def quarantined() -> list[str]:
    """The quarantined keys, oldest first."""
    return load_quarantine(_arena())


def release(key: str) -> bool:
    """Take ``key`` out of quarantine; returns whether it was there."""
    return remove_quarantine(_arena(), _key(key))


@contextmanager
def processing(key: str) -> Iterator[str]:
    """Mark ``key`` as the input being processed; refuse it with ``Quarantined`` if it is."""
    arena, key = _arena(), _key(key)
    if key in load_quarantine(arena):
        raise Quarantined(key)
    outer = arena.processing()
    arena.set_processing(key)
    try:
        yield key
    finally:
        arena.set_processing(outer)
