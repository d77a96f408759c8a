"""The shepherd's event loop: descriptors to watch, timers, and nothing else.

It is deliberately tiny (no asyncio): the shepherd runs in an interpreter started with ``-I -S``
and must stay small, and every restore goes through this loop, so its cost per event is a selector
wake-up and a dictionary look-up. A callback that raises is logged and the loop goes on: a fault in
one of forkpoint's handlers must not end a program that can still be saved. ``on_error`` lets the
owner check its own state after such a fault.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("forkpoint")


class EventLoop:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.on_error: Callable[[], None] | None = None
        self._first: set[Callable[[], None]] = set()

    # -- descriptors ----------------------------------------------------------------------------------
    def add_reader(self, fileobj: Any, callback: Callable[[], None], first: bool = False) -> None:
        """Call ``callback`` when ``fileobj`` is readable; with ``first``, before any other
        descriptor that is ready at the same time (the shepherd reads its signals first, so that
        a signal is judged by the state it arrived in)."""
        self.sel.register(fileobj, selectors.EVENT_READ, callback)
        if first:
            self._first.add(callback)

    def set_writer(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Watch a registered descriptor for writability instead of readability."""
        self.sel.modify(fileobj, selectors.EVENT_WRITE, callback)

    def remove(self, fileobj: Any) -> None:
        """Stop watching ``fileobj``; nothing happens if it was not watched."""
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    # -- timers -----------------------------------------------------------------------------------
    def after(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    # -- the loop -------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        while True:
            timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
            ready = [key.data for key, _ in self.sel.select(timeout)]
            if len(ready) > 1 and self._first:
                ready.sort(key=lambda fn: fn not in self._first)
            for fn in ready:
                self._call(fn)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._call(heapq.heappop(self._timers)[2])

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - contained: see the module's docstring
            log.exception("forkpoint: internal error in the shepherd (contained)")
            if self.on_error is not None:
                self.on_error()
