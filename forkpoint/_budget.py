"""The snapshot memory budget (``configure(max_snapshot_memory=...)``).

A snapshot costs what the live program has rewritten since it was taken (copy-on-write), so the
cost of each checkpoint grows while the program runs. The shepherd measures the PSS of every
checkpoint's processes once a second and discards the oldest until the total fits; pinned
checkpoints and the current one are never discarded.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

INTERVAL = 1.0      # seconds between measurements


def victims(sizes: Mapping[int, int], limit: int, keep: Callable[[int], bool]) -> list[tuple[int, int]]:
    """Which checkpoints to discard, oldest first, with the total PSS before each discard."""
    total = sum(sizes.values())
    out = []
    for n in sorted(sizes):
        if total <= limit:
            break
        if keep(n):
            continue
        out.append((n, total))
        total -= sizes[n]
    return out
