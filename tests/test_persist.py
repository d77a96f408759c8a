"""persist() and cache(): memory that survives a rollback, and never comes back torn."""
from __future__ import annotations

import os

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(90)

HEADER = """
    import os, sys, signal, time, ctypes, random
    import forkpoint as fp
"""


def test_persist_survives_rollback_even_for_regions_made_after_the_checkpoint(tmp_path):
    r = run_py(HEADER + """
    early = fp.persist("early", 16)
    n = fp.tsetjmp()
    late = fp.persist("late", 32)          # created after checkpoint n was taken
    counter = fp.persist_int("counter")
    arr = fp.persist_array("arr", 4)
    class Point(ctypes.Structure):
        _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_double)]
    pt = fp.persist_struct("pt", Point)
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        early[:5] = b"hello"
        late[:5] = b"world"
        counter.value = 41
        arr[2] = 2.5
        pt.x, pt.y = 7, 1.5
        fp.tlongjmp(n)
    counter.add()
    print(bytes(early[:5]), bytes(late[:5]), counter.value, arr[2], pt.x, pt.y, len(late))
    h = fp.history()
    print("history", len(h), h[-1].from_state, h[-1].to_state, h[-1].reason)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "b'hello' b'world' 42 2.5 7 1.5 32"
    assert lines[1] == "history 1 1 1 tlongjmp"


def test_cache_returns_only_what_was_put_in(tmp_path):
    r = run_py(HEADER + """
    try:
        fp.cache(fp.OUT, "never")
    except KeyError:
        print("missing: KeyError")
    fp.cache(fp.IN, "blob", b"validated")
    fp.cache(fp.IN, "obj", {"users": ["a", "b"], "n": 3})
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        fp.cache(fp.IN, "obj", {"users": ["a", "b", "c"], "n": 4})
        fp.tlongjmp(n)
    print(fp.cache(fp.OUT, "blob"), fp.cache(fp.OUT, "obj"))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["missing: KeyError", "b'validated' {'users': ['a', 'b', 'c'], 'n': 4}"]


def test_corrupted_cache_entry_is_refused(tmp_path):
    r = run_py(HEADER + """
    from forkpoint._runtime import runtime
    fp.cache(fp.IN, "data", b"x" * 1000)
    arena = runtime().arena
    raw = bytes(arena.map)
    off = raw.index(b"B" + b"x" * 1000)
    arena.map[off + 500] = ord("y")          # a stray write into the stored copy
    try:
        fp.cache(fp.OUT, "data")
    except fp.CacheCorrupted as e:
        print("refused:", e)
    fp.cache(fp.IN, "data", b"fresh")        # a new IN repairs it
    print(fp.cache(fp.OUT, "data"))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["refused: cache entry 'data' failed its checksum", "b'fresh'"]


def test_bad_input_is_refused_and_the_program_goes_on(tmp_path):
    r = run_py(HEADER + """
    fp.configure(arena_size=4 << 20)
    def attempt(label, fn, *exc):
        try:
            fn()
            print(label, "ACCEPTED")
        except exc as e:
            print(label, type(e).__name__)
    attempt("negative", lambda: fp.persist("a", -1), ValueError)
    attempt("zero", lambda: fp.persist("a", 0), ValueError)
    attempt("huge", lambda: fp.persist("a", 1 << 40), fp.ArenaFull)
    attempt("float", lambda: fp.persist("a", 1.5), TypeError)
    attempt("not-str", lambda: fp.persist(b"a", 8), TypeError)
    attempt("empty", lambda: fp.persist("", 8), ValueError)
    attempt("long", lambda: fp.persist("n" * 65, 8), ValueError)
    r = fp.persist("a", 8)
    attempt("other-size", lambda: fp.persist("a", 16), fp.RegionMismatch)
    attempt("kind", lambda: fp.cache(fp.OUT, "a"), fp.RegionMismatch)
    attempt("past-end", lambda: r.__setitem__(slice(0, 9), b"123456789"), ValueError)
    attempt("index", lambda: r.__setitem__(8, 1), IndexError)
    attempt("direction", lambda: fp.cache(3, "x", b""), ValueError)
    i = 0
    try:
        while True:
            fp.persist(f"fill{i}", 256 << 10)
            i += 1
    except fp.ArenaFull as e:
        print("full after", i, "regions:", "arena_size" in str(e))
    print("still works", fp.tsetjmp(), bytes(r))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for label, exc in [("negative", "ValueError"), ("zero", "ValueError"), ("huge", "ArenaFull"),
                       ("float", "TypeError"), ("not-str", "TypeError"), ("empty", "ValueError"),
                       ("long", "ValueError"), ("other-size", "RegionMismatch"), ("kind", "RegionMismatch"),
                       ("past-end", "ValueError"), ("index", "IndexError"), ("direction", "ValueError")]:
        assert f"{label} {exc}" in out, out
    assert "full after" in out and "True" in out
    assert "still works 1 b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'" in out


def test_writers_killed_at_random_points_never_tear_entries(tmp_path):
    """Crash consistency: a SIGKILLed writer leaves the old or the new entry, never a torn one."""
    r = run_py(HEADER + """
    import hashlib
    fp.start()
    arena = fp._runtime.runtime().arena
    rng = random.Random(7)
    def payload(i):
        body = hashlib.sha256(str(i).encode()).digest() * rng.choice([1, 30, 3000])
        return {"i": i, "body": body}
    fp.cache(fp.IN, "entry", payload(0))
    seen = set()
    kills = 0
    for round in range(150):
        rfd, wfd = os.pipe()
        # The writer shares the arena, as a live process the shepherd kills does: a raw clone, as
        # forkpoint makes its own processes (an os.fork() child gets a copy of the arena).
        pid = fp._clone.clone(False)
        if pid == 0:
            i = round * 1000
            while True:
                i += 1
                fp.cache(fp.IN, "entry", payload(i))
                fp.persist(f"r{i % 97}", 64)[:8] = i.to_bytes(8, "little")
                if wfd is not None:
                    os.write(wfd, b"1")          # one complete write done: kill from here on
                    wfd = None
        os.close(wfd)
        os.read(rfd, 1)
        os.close(rfd)
        time.sleep(rng.random() * 0.003)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        got = fp.cache(fp.OUT, "entry")          # raises CacheCorrupted if torn
        assert got["body"] == hashlib.sha256(str(got["i"]).encode()).digest() * (len(got["body"]) // 32)
        assert got["i"] > round * 1000, "the writer's first complete write must be visible"
        seen.add(got["i"])
        for j in range(97):
            fp.persist(f"r{j}", 64)
    print("kills", kills, "distinct", len(seen) == 150, "names", len(arena.names()))
    """, tmp_path, timeout=80)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:4] == ["kills", "150", "distinct", "True"]


def test_arena_costs_what_is_touched_not_what_is_reserved(tmp_path):
    r = run_py(HEADER + """
    import psutil
    fp.configure(arena_size=2 << 30)              # 2 GiB reserved
    before = psutil.Process().memory_full_info().uss
    region = fp.persist("big", 1 << 30)
    after_reserve = psutil.Process().memory_full_info().uss
    region[: 64 << 20] = bytes(64 << 20)          # touch 64 MiB
    after_touch = psutil.Process().memory_full_info().uss
    print((after_reserve - before) >> 20, (after_touch - before) >> 20)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    reserved_mib, touched_mib = map(int, r.stdout.split())
    assert reserved_mib < 16, "reserving the arena must not allocate it"
    assert 60 <= touched_mib < 100, "touched pages are what the arena costs"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a probe as another user")
def test_arena_is_invisible_to_other_users(tmp_path):
    """No world-readable file anywhere; another user cannot open the memfd through /proc either."""
    shm_before = set(os.listdir("/dev/shm"))
    r = run_py(HEADER + """
    import subprocess, pwd
    fp.persist("secret", 16)[:6] = b"secret"
    fp.tsetjmp()
    fd = fp._runtime.runtime().arena.fd
    print("link", os.readlink(f"/proc/self/fd/{fd}"))
    nobody = pwd.getpwnam("nobody")
    probe = subprocess.run(
        ["/bin/sh", "-c", f"head -c 6 /proc/{os.getpid()}/fd/{fd}"],
        preexec_fn=lambda: (os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid)),
        capture_output=True, text=True)
    print("nobody", probe.returncode, "Permission denied" in probe.stderr, "secret" in probe.stdout)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "link /memfd:forkpoint-arena (deleted)" in r.stdout
    assert "nobody 1 True False" in r.stdout
    assert set(os.listdir("/dev/shm")) == shm_before
