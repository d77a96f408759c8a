"""Whose code a thread runs: blame for a crash in work that an input handed to a thread.

The arena's processing mark (``Arena.enter_step``, ``processing()``) names the input whose code the
*main* thread runs; the shepherd blames it for a crash. Work an input hands to a thread runs after
the step that handed it off has yielded: Starlette and FastAPI run a plain ``def`` endpoint in an
AnyIO worker thread, ``asyncio.to_thread`` and ``run_in_executor`` use a ``ThreadPoolExecutor``.
A crash there found the main thread's mark cleared (nobody blamed: the same request crashed the
worker until the recovery budget ran out) or set by another request's step running meanwhile (an
innocent request blamed, and quarantined).

So work handed off while an input is marked (in the main thread: its mark; in a thread running
marked work: that work's) is wrapped to mark it again in the thread that runs it, in this region:
an entry per thread running marked work (thread id, the key as ``Arena.set_processing_record``
stores it, a deadline and the hand-off's serial number), written when the work starts and cleared
when it ends. Word 0 holds the main thread's id. The shepherd reads the crashing thread's id from
faulthandler's report (``Current thread 0x...``) and blames (``blamed``): that thread's entry if it
has one; the main thread's mark if it is the main thread; nobody if it is another thread (its work
was handed off by no marked input, or the table was full): never the main thread's mark for a
crash in another thread.

A thread cannot be cancelled, so work that hangs there (a C library stuck, a deadlock) kept its
request unanswered for ever where the server waits for the thread (Django's sync views under ASGI:
asgiref waits for its thread however the request is cancelled) and kept a pool thread for ever
everywhere. So an entry carries the deadline of the input that handed the work off, if it has one
(an ASGI request's response due: ``install``'s ``timer``, until its response starts: ``untime``), and
the shepherd cuts a live process whose thread is still running that work past it (``Overdue``), as
it cuts a step past its own.

Costs nothing per request that hands nothing off; a hand-off (tens of microseconds of thread
wake-up already) gets a closure, and its thread a few stores before and after the work.
"""
from __future__ import annotations

import logging
import re
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any

from .arena import _PROCESSING_MAX, Arena, find_region

log = logging.getLogger("forkpoint")

__all__ = ["REGION", "Overdue", "blamed", "clear", "install"]

REGION = "forkpoint:thread-marks"
_HEAD = 8                                   # words: the main thread's id, then unused
_ENTRY = 4 + _PROCESSING_MAX // 8           # words: thread id, length and check, deadline, serial, key
_KEY = 4                                    # (the word where an entry's key starts)
ENTRIES = 64                                # threads running marked work at once
SIZE = (_HEAD + ENTRIES * _ENTRY) * 8
_CURRENT = re.compile(rb"Current thread (0x[0-9a-fA-F]+)")

_get_ident = threading.get_ident
_D = struct.Struct("d")
_Q = struct.Struct("Q")


def _untimed() -> None:
    return None


class _Marks:
    """The live process's side: entries taken and written by the threads that run marked work."""

    def __init__(self, arena: Arena, timer: Callable[[], list[Any] | None]) -> None:
        self.arena = arena
        self.timer = timer
        self.view = arena.persist(REGION, SIZE)
        self.words = self.view.cast("Q")
        self.main = _get_ident()
        self.words[0] = self.main
        self.free = list(range(ENTRIES - 1, -1, -1))
        self.running: dict[int, tuple[bytes, int]] = {}     # thread id -> the record it marks
        self.timed: dict[int, list[Any]] = {}      # entry -> the timer of its deadline (untime)
        self.serial = 0                 # of the hand-offs: tells the shepherd one piece of work
        self.lock = threading.Lock()

    def handed_off(self) -> tuple[bytes, int] | None:
        """The record of the input whose code is handing work off now (None: none marked)."""
        ident = _get_ident()
        if ident != self.main:
            return self.running.get(ident)
        return self.arena.processing_now()

    def enter(self, record: tuple[bytes, int], timer: list[Any] | None = None) -> int:
        """Mark this thread's work with ``record``, and with the deadline ``timer`` holds now
        (``[in flight, due]``; none once it says 0: ``untime``)."""
        ident = _get_ident()
        raw, word = record
        words = self.words
        with self.lock:
            if not self.free:
                return -1       # a crash in this thread then blames nobody
            e = self.free.pop()
            base = _HEAD + e * _ENTRY
            words[base + 1] = 0
            # Registered before its due time is read, under the lock: an untime() of this timer
            # either sees the entry (and waits for the lock) or came after the due time was zeroed.
            due = 0.0
            if timer is not None:
                self.timed[e] = timer
                due = timer[1] if timer[0] else 0.0
                if not due:
                    del self.timed[e]
            words[base + 2] = _Q.unpack(_D.pack(due))[0] if due else 0
            self.serial += 1
            words[base + 3] = self.serial
        words[base] = ident
        self.view[(base + _KEY) * 8:(base + _KEY) * 8 + len(raw)] = raw
        words[base + 1] = word      # length and check: one store
        self.running[ident] = record
        return e

    def leave(self, e: int, outer: tuple[bytes, int] | None) -> None:
        if e < 0:
            return
        self.words[_HEAD + e * _ENTRY + 1] = 0
        ident = _get_ident()
        if outer is None:
            self.running.pop(ident, None)
        else:
            self.running[ident] = outer
        with self.lock:
            if self.timed:
                self.timed.pop(e, None)
            self.free.append(e)

    def wrap(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func`` marked, when it runs, with the input handing it off now and its deadline (itself
        if no input is marked)."""
        record = self.handed_off()
        if record is None:
            return func
        timer = self.timer()

        def marked(*args: Any, **kwargs: Any) -> Any:
            outer = self.running.get(_get_ident())
            e = self.enter(record, timer)
            try:
                return func(*args, **kwargs)
            finally:
                self.leave(e, outer)

        return marked


_marks: _Marks | None = None


def install(loop: Any, arena: Arena, timer: Callable[[], list[Any] | None] = _untimed) -> None:
    """Mark work handed to threads from ``loop`` (its ``run_in_executor``, with the default or a
    thread pool executor) and from AnyIO on asyncio (``to_thread.run_sync``). Called in the live
    process's main thread before its first checkpoint; idempotent. ``timer()``, called as work is
    handed off, gives the handing input's ``[in flight, due]`` (or None): the work must end by
    ``due`` (``time.monotonic()``; 0: no deadline) while it is in flight and until ``untime``."""
    global _marks
    if _marks is None:
        _marks = _Marks(arena, timer)
    marks = _marks
    marks.timer = timer
    from concurrent.futures import ThreadPoolExecutor  # (not in the shepherd, which only reads)

    if not getattr(loop.run_in_executor, "_forkpoint_marks", False):
        plain = loop.run_in_executor

        def run_in_executor(executor: Any, func: Callable[..., Any], *args: Any) -> Any:
            if executor is None or isinstance(executor, ThreadPoolExecutor):
                func = marks.wrap(func)
            return plain(executor, func, *args)

        run_in_executor._forkpoint_marks = True  # type: ignore[attr-defined]
        loop.run_in_executor = run_in_executor
    _install_anyio(marks)


def untime(timer: list[Any]) -> None:
    """Work handed off with ``timer`` no longer has a deadline, though it runs on (an ASGI response
    has started: a stream's first chunk that a ``BaseHTTPMiddleware`` read on). The caller has
    zeroed ``timer``'s due time first (``enter`` reads it after registering the entry)."""
    marks = _marks
    if marks is None or not marks.timed:
        return
    words = marks.words
    with marks.lock:
        for e in [e for e, t in marks.timed.items() if t is timer]:
            words[_HEAD + e * _ENTRY + 2] = 0
            del marks.timed[e]


def _install_anyio(marks: _Marks) -> None:
    import sys

    if "anyio" not in sys.modules:
        return
    try:
        from anyio._backends import _asyncio as backend  # AnyIO's asyncio backend
        cls = backend.AsyncIOBackend
        plain = cls.run_sync_in_worker_thread.__func__  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        log.info("forkpoint: this AnyIO is unknown: a crash in its worker threads is blamed on nobody")
        return
    if getattr(plain, "_forkpoint_marks", False):
        return

    def run_sync_in_worker_thread(klass: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return plain(klass, marks.wrap(func), *args, **kwargs)

    run_sync_in_worker_thread._forkpoint_marks = True  # type: ignore[attr-defined]
    cls.run_sync_in_worker_thread = classmethod(run_sync_in_worker_thread)  # type: ignore[method-assign,assignment]


# -- the shepherd's side ----------------------------------------------------------------------------
_found: memoryview | None = None      # the region, once it exists (a region is never freed)
_missing_at = -1                      # the arena's allocator top when the region was not there


def _view(arena: Arena) -> memoryview | None:
    """The region in the shepherd, looked up until it exists, and only when a region was made since
    the last look: a scan of the arena's directory for a region that is not there takes about
    0.3 ms, and it ran on every restore (of a program that never handed work to a thread: the
    benchmark's restores went from 0.33-0.51 to 0.65-0.82 ms)."""
    global _found, _missing_at
    if _found is None:
        try:
            top = arena.allocated()
            if top == _missing_at:
                return None
            _found = find_region(arena, REGION, SIZE)
        except Exception:   # noqa: BLE001 - (a damaged arena: the quarantine says so where it matters)
            return None
        if _found is None:
            _missing_at = top
    return _found


def blamed(arena: Arena, report: bytes, key: str | None) -> str | None:
    """The key to blame for a crash whose faulthandler ``report`` is given, ``key`` being the main
    thread's mark: the crashing thread's entry, the main thread's mark if the main thread crashed,
    else None. ``key`` as it is where no work was ever handed off or the report names no thread."""
    m = _CURRENT.search(report)
    if m is None:
        return key
    view = _view(arena)
    if view is None:
        return key
    words = view.cast("Q")
    main = int(words[0])
    if not main:
        return key
    tid = int(m.group(1), 16)
    for e in range(ENTRIES):
        base = _HEAD + e * _ENTRY
        word = int(words[base + 1])
        if word and int(words[base]) == tid:
            raw = _key(view, base, word)
            if raw:
                return raw.decode(errors="replace")
            log.error("arena: the record of the input a thread was processing is corrupted (a stray "
                      "write?): it is ignored")
            return None
    return key if tid == main else None


def _key(view: memoryview, base: int, word: int) -> bytes:
    """The key of the entry at word ``base`` whose length and check are ``word``, if it matches
    its check (b"": damaged, or being rewritten)."""
    n = word & 0xFFFF_FFFF
    raw = bytes(view[(base + _KEY) * 8:(base + _KEY) * 8 + n]) if 0 < n <= _PROCESSING_MAX else b""
    return raw if raw and zlib.crc32(raw, n) == word >> 32 else b""


class Overdue:
    """The shepherd's reading of the threads' deadlines.

    An entry is read while its thread may rewrite it: its word (length and check) is read before
    and after the rest, and the key must match its check. Work is taken for overdue only when the
    same hand-off (entry, thread, key, deadline, serial) is seen past its deadline at two readings:
    a reading that straddles the end of one hand-off and the start of the next cannot cut a process
    by itself, nor can a request's short hand-offs one after another.
    """

    def __init__(self) -> None:
        self.seen: set[tuple[int, ...]] = set()

    def check(self, arena: Arena, now: float) -> tuple[str | None, float]:
        """(the key of work still running past its deadline, seen so twice, or None; the earliest
        deadline to look again at: one not yet due, or soon for one seen overdue once; 0: none)."""
        view = _view(arena)
        if view is None:
            self.seen.clear()
            return None, 0.0
        words = view.cast("Q")
        ahead = 0.0
        seen: set[tuple[int, ...]] = set()
        for e in range(ENTRIES):
            base = _HEAD + e * _ENTRY
            word = int(words[base + 1])
            if not word:
                continue
            raw_at = int(words[base + 2])
            if not raw_at:
                continue
            at = _D.unpack(_Q.pack(raw_at))[0]
            if not at <= now:           # (not yet; or a NaN, a damaged word: never)
                if at > now:
                    ahead = at if not ahead else min(ahead, at)
                continue
            tid, serial = int(words[base]), int(words[base + 3])
            raw = _key(view, base, word)
            if int(words[base + 1]) != word or not raw:
                continue        # rewritten meanwhile (or damaged): the next reading will tell
            sighting = (e, tid, word, raw_at, serial)
            if sighting in self.seen:
                self.seen.clear()
                return raw.decode(errors="replace"), 0.0
            seen.add(sighting)
        self.seen = seen
        if seen:
            soon = now + _RECHECK
            ahead = soon if not ahead else min(ahead, soon)
        return None, ahead


_RECHECK = 0.01     # seconds: how soon work seen past its deadline once is looked at again


def clear(arena: Arena) -> None:
    """No thread runs marked work (a restore: the restored process has none of the dead one's)."""
    view = _view(arena)
    if view is None:
        return
    words = view.cast("Q")
    for e in range(ENTRIES):
        words[_HEAD + e * _ENTRY + 1] = 0
