"""Input quarantine and the watchdog: the program's side of the recovery policy.

``processing(key)`` writes the key of the input being worked on into the arena, where the shepherd
reads it when the live process dies or rolls back; a key that keeps failing is quarantined by the
shepherd (see ``policy``), in the arena, so every later process of the program refuses it.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._errors import Quarantined
from .persist import Arena

log = logging.getLogger("forkpoint")

_ENTRY = "forkpoint:quarantine"
DEFAULT_QUARANTINE_SIZE = 1024


def _load(arena: Arena) -> list[str]:
    try:
        return list(json.loads(arena.cache_out(_ENTRY)))
    except KeyError:
        return []


def add_quarantine(arena: Arena, key: str, size: int = DEFAULT_QUARANTINE_SIZE) -> list[str]:
    """Add ``key``; when full, the oldest key is released (and logged). Returns the evicted keys."""
    keys = [k for k in _load(arena) if k != key]
    keys.append(key)
    evicted = keys[:-size] if len(keys) > size else []
    if evicted:
        log.warning("quarantine full (%d keys): released the oldest %s", size, evicted)
    arena.cache_in(_ENTRY, json.dumps(keys[-size:]).encode())
    return evicted


def _arena() -> Arena:
    from . import snapshots

    return snapshots.runtime().arena_or_create()


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
    return _key(key) in _load(_arena())


def quarantined() -> list[str]:
    """The quarantined keys, oldest first."""
    return _load(_arena())


def release(key: str) -> bool:
    """Take ``key`` out of quarantine; returns whether it was there."""
    arena, key = _arena(), _key(key)
    keys = _load(arena)
    if key not in keys:
        return False
    keys.remove(key)
    arena.cache_in(_ENTRY, json.dumps(keys).encode())
    return True


@contextmanager
def processing(key: str) -> Iterator[str]:
    """Mark ``key`` as the input being processed; refuse it with ``Quarantined`` if it is."""
    arena, key = _arena(), _key(key)
    if key in _load(arena):
        raise Quarantined(key)
    arena.set_processing(key)
    try:
        yield key
    finally:
        arena.set_processing(None)


@contextmanager
def watchdog(seconds: float, *, to: int = 0) -> Iterator[None]:
    """Roll back to checkpoint ``to`` (0: the current one) if the block runs longer than ``seconds``.

    A SIGALRM timer is armed on entry and cleared on exit; the program's own handler and timer are
    put back (the timer with the time spent in the block deducted).
    """
    from .snapshots import tlongjmp

    if not seconds > 0:
        raise ValueError(f"watchdog needs a positive number of seconds, got {seconds!r}")

    def _expired(signum: int, frame: Any) -> None:
        log.warning("watchdog: block ran longer than %gs, rolling back", seconds)
        tlongjmp(to, sig=signal.SIGALRM, reason="timeout")

    old_handler = signal.signal(signal.SIGALRM, _expired)
    old_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:
            left = max(old_timer[0] - (time.monotonic() - started), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, old_timer[1])
