"""The snapshot memory budget (``configure(max_snapshot_memory=...)``).

A snapshot costs what the live program has rewritten since it was taken (copy-on-write), and a
new snapshot takes its share of every page it maps with the live process, so the cost of the
checkpoints changes while the program runs. The budget bounds the PSS of every checkpoint's
keeper and spares, summed; the oldest checkpoints are discarded until the total fits (pinned
checkpoints and the current one never are).

It is checked when a checkpoint is announced and every ``INTERVAL`` seconds, for every checkpoint
but the newest, from an upper bound that costs almost nothing to keep:

* each checkpoint's PSS as last measured (smaps_rollup of its processes, milliseconds for a large
  heap, so a checkpoint is measured once, when it is no longer the newest, and again only when
  its processes change: a new spare takes its own share);
* plus one page for every minor fault the live process has taken since (each copy-on-write copy
  is one fault; a new sharer or a discard only lowers the others' PSS);
* when that bound passes the budget, everything is measured again (at most every
  ``MEASURE_EVERY`` seconds); a discarded checkpoint is taken to free only what it held alone (its
  USS), so the bound stays an upper bound in between.

So at every instant the total is at most the budget plus the newest checkpoint's own memory: its
share of the pages it maps with the live process, and each page the live process rewrote since
(every such page was shared with the newest checkpoint). That is the "one checkpoint's worth".
"""
from __future__ import annotations

import mmap
import time
from collections.abc import Callable, Iterable, Mapping

from . import _procfs

INTERVAL = 1.0          # seconds between checks besides those at each checkpoint
MEASURE_EVERY = 0.25    # seconds between measurements of every checkpoint, at most


class Budget:
    """The upper bound on snapshot memory, kept between measurements."""

    def __init__(self) -> None:
        self.pss: dict[int, int] = {}        # checkpoint -> PSS when last measured
        self.uss: dict[int, int] = {}        # checkpoint -> USS when last measured
        self.growth = 0                      # bytes the live process may have copied since
        self.base: tuple[int, int] | None = None   # (live pid, its minor faults) at the last check
        self.measured_at = float("-inf")

    def grow(self, live_pid: int | None) -> None:
        """Add what the live process may have copied since the last check."""
        faults = _procfs.minor_faults(live_pid) if live_pid else None
        if faults is not None and self.base is not None and self.base[0] == live_pid:
            self.growth += max(0, faults - self.base[1]) * mmap.PAGESIZE
        elif self.base is not None:
            # A new live process: what its predecessor copied after the last check is unknown.
            self.pss.clear()
        self.base = (live_pid, faults) if live_pid and faults is not None else None

    def bound(self, ids: Iterable[int]) -> int:
        return sum(self.pss.get(n, 0) for n in ids) + self.growth

    def unmeasured(self, ids: Iterable[int]) -> list[int]:
        return [n for n in ids if n not in self.pss]

    def may_measure_all(self) -> bool:
        return time.monotonic() - self.measured_at >= MEASURE_EVERY

    def measured(self, sizes: Mapping[int, tuple[int, int]], everything: bool) -> None:
        """Measurements, checkpoint -> (USS, PSS); ``everything``: of every checked checkpoint."""
        for n, (uss, pss) in sizes.items():
            self.uss[n], self.pss[n] = uss, pss
        if everything:
            self.growth = 0
            self.measured_at = time.monotonic()

    def victims(self, ids: Iterable[int], limit: int, keep: Callable[[int], bool]) -> list[tuple[int, int]]:
        """Which checkpoints to discard, oldest first, with the bound before each discard."""
        ids = sorted(ids)
        total = self.bound(ids)
        out = []
        for n in ids:
            if total <= limit:
                break
            if keep(n):
                continue
            out.append((n, total))
            total -= self.uss.get(n, 0)      # what discarding it surely frees: see discarded()
        return out

    def discarded(self, n: int) -> None:
        """Checkpoint ``n`` is gone: it freed at least what it held alone (its USS); the rest of
        its PSS may pass to other checkpoints, so it stays in the bound (as growth)."""
        pss, uss = self.pss.pop(n, 0), self.uss.pop(n, 0)
        self.growth += max(0, pss - uss)
