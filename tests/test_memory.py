"""Snapshot memory: the budget (max_snapshot_memory) and the gc_freeze setting.

The budget is enforced by the shepherd once a second from the PSS of each checkpoint's processes;
a live program that rewrites its heap makes every checkpoint hold a full copy of it.
"""
from __future__ import annotations

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(90)

HEADER = """
    import gc, os, sys, time
    import forkpoint as fp
"""


def test_memory_budget_discards_oldest_unpinned_checkpoint(tmp_path):
    r = run_py(HEADER + """
    MB = 1 << 20
    heap = bytearray(b"\\x01") * (32 * MB)

    def rewrite(value):
        # one write per page: the live process copies every page, each checkpoint keeps its own
        heap[::4096] = bytes([value]) * len(range(0, len(heap), 4096))

    fp.configure(max_snapshot_memory=48 * MB)
    a = fp.tsetjmp(pin=True)
    if fp.chkpt_status(fp.CHKPT_RECOVERED):
        print("restored", a, heap[0], flush=True)
        sys.exit(0)
    rewrite(2)
    b = fp.tsetjmp()
    rewrite(3)
    c = fp.tsetjmp()
    rewrite(4)
    deadline = time.monotonic() + 20
    while b in [x.id for x in fp.checkpoints()] and time.monotonic() < deadline:
        time.sleep(0.05)
    print("ids", [x.id for x in fp.checkpoints()], flush=True)
    try:
        fp.tlongjmp(b)
    except fp.NoSuchCheckpoint as e:
        print("nosuch", b, e, flush=True)
    fp.tlongjmp(a)            # the pinned one is kept regardless of the budget
    """, tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "ids [1, 3]", r.stdout + r.stderr    # 1 pinned, 3 current, 2 the oldest unpinned
    assert lines[1].startswith("nosuch 2 "), r.stdout
    assert lines[2] == "restored 1 1", r.stdout
    assert "checkpoint 2 discarded" in r.stderr and "budget" in r.stderr, r.stderr
    assert "checkpoint 1 discarded" not in r.stderr and "checkpoint 3 discarded" not in r.stderr


def test_no_budget_discards_nothing(tmp_path):
    r = run_py(HEADER + """
    heap = bytearray(b"\\x01") * (8 << 20)
    ids = []
    for v in range(3):
        ids.append(fp.tsetjmp())
        heap[::4096] = bytes([v + 2]) * len(range(0, len(heap), 4096))
    time.sleep(1.5)
    print("ids", [x.id for x in fp.checkpoints()], flush=True)
    """, tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ids [1, 2, 3]"
    assert "discarded" not in r.stderr


def test_gc_freeze_setting_freezes_the_heap_at_checkpoint_time(tmp_path):
    r = run_py(HEADER + """
    class Rec:
        __slots__ = ("id", "name")
        def __init__(self, i):
            self.id, self.name = i, str(i)
    data = {i: Rec(i) for i in range(50000)}
    before = gc.get_freeze_count()      # not 0 on every Python: 3.12 starts with objects frozen
    fp.tsetjmp()
    print("default", gc.get_freeze_count() == before, flush=True)
    fp.configure(gc_freeze=True)
    n = fp.tsetjmp()
    print("frozen", gc.get_freeze_count() >= len(data), flush=True)
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        fp.tlongjmp(n)
    print("restored frozen", gc.get_freeze_count() >= len(data), flush=True)
    """, tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    # the restored copy returns from the same tsetjmp, so "frozen" is printed again before the last line
    assert r.stdout.splitlines() == ["default True", "frozen True", "frozen True", "restored frozen True"], \
        r.stdout
