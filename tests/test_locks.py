"""Invariant 10 for files: the program holds the POSIX record locks it held, as without forkpoint.

A POSIX lock (``fcntl.lockf``, ``F_SETLK``; SQLite's) belongs to the process that took it: a fork
does not copy it, an exec drops it with the file's close-on-exec descriptors, and a death releases
it. forkpoint's start is an exec, a checkpoint a fork, and a restore a death, so each of them used
to let go of the program's locks (a daemon's lock on its PID file let a second instance start).
Each scenario runs the same program with ``FP=1`` and without forkpoint, and another process
probes the locks the way a second instance would.
"""
from __future__ import annotations

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(60)

HEADER = r"""
    import ctypes, fcntl, os, signal, subprocess, sys, time
    FP = os.environ.get("FP") == "1"
    os.chdir(os.path.dirname(os.path.abspath(__file__)))     # the test's own directory
    if FP:
        import forkpoint as fp
    PROBE = ("import fcntl, sys\n"
             "f = open(sys.argv[1], 'r+')\n"
             "start, length, how = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]\n"
             "try:\n"
             "    fcntl.lockf(f, (fcntl.LOCK_EX if how == 'ex' else fcntl.LOCK_SH) | fcntl.LOCK_NB,"
             " length, start)\n"
             "    print('free')\n"
             "except OSError:\n"
             "    print('held')\n")

    def probe(path, start=0, length=0, how="ex"):
        # Another process, as a second instance of the program would try the lock.
        out = subprocess.run([sys.executable, "-c", PROBE, path, str(start), str(length), how],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr

    def until_free(path, start=0, length=0):
        for _ in range(2000):          # a killed process lets go of its locks as it is torn down
            if probe(path, start, length) == "free":
                return "free"
            time.sleep(0.005)
        return "held"
"""


def _both(code: str, tmp_path) -> list[str]:
    """The program's lines with forkpoint, checked against the same program without it."""
    got = []
    for fp in ("1", "0"):
        r = run_py(HEADER + code, tmp_path, FP=fp)
        assert r.returncode == 0, f"FP={fp}:\n{r.stdout}\n{r.stderr}"
        got.append(r.stdout.splitlines())
    assert got[0] == got[1], f"with forkpoint:\n{got[0]}\nwithout:\n{got[1]}"
    return got[0]


def test_a_pid_file_lock_taken_before_the_start_is_held_after_start_restore_and_crash(tmp_path):
    lines = _both("""
    pidfile = open("app.pid", "w")
    fcntl.lockf(pidfile, fcntl.LOCK_EX | fcntl.LOCK_NB)      # a daemon's single-instance lock
    pidfile.write(str(os.getpid()))
    pidfile.flush()
    step = fp.persist_int("step") if FP else None
    if FP:
        fp.recover_on(signal.SIGSEGV)
        n = fp.tsetjmp()
    for _ in range(1 if FP else 3):     # with forkpoint: the checkpoint, and two restores of it
        print("checkpoint:", probe("app.pid"), flush=True)
    i = step.add() if FP else 3
    if i == 1:
        fp.tlongjmp(n)
    if i == 2:
        ctypes.string_at(0)                     # a real segfault, rolled back
    print("after a jump and a crash:", probe("app.pid"))
    """, tmp_path)
    assert lines == ["checkpoint: held"] * 3 + ["after a jump and a crash: held"]


def test_a_rollback_holds_the_locks_of_its_checkpoint_and_no_others(tmp_path):
    """Ranges and kinds too: a write lock on bytes 0-9, a read lock on 10-19 (others may share
    it, not take it), none on 20-29 until after the checkpoint. After the rollback the program
    holds exactly what it held at the checkpoint, including a lock it had let go of since."""
    lines = _both("""
    f = open("data", "w+")
    f.write("x" * 100)
    f.flush()
    fcntl.lockf(f, fcntl.LOCK_EX, 10, 0)
    fcntl.lockf(f, fcntl.LOCK_SH, 10, 10)
    def state():
        # (bytes 20-29: a rolled-back process holds its own locks until it is torn down)
        return [probe("data", 0, 10), probe("data", 10, 10, "sh"), probe("data", 10, 10),
                until_free("data", 20, 10)]
    step = fp.persist_int("step") if FP else None
    if FP:
        n = fp.tsetjmp()
    print("at the checkpoint:", *state(), flush=True)
    if not FP or step.add() == 1:
        fcntl.lockf(f, fcntl.LOCK_UN, 10, 0)        # let go after the checkpoint
        fcntl.lockf(f, fcntl.LOCK_EX, 10, 20)       # and taken after it
        print("after:", probe("data", 0, 10), probe("data", 20, 10), flush=True)
        if FP:
            fp.tlongjmp(n)
        # without forkpoint, the rollback by hand: the checkpoint's locks again
        fcntl.lockf(f, fcntl.LOCK_UN, 10, 20)
        fcntl.lockf(f, fcntl.LOCK_EX, 10, 0)
        print("at the checkpoint:", *state(), flush=True)
    print("rolled back:", probe("data", 0, 10), until_free("data", 20, 10))
    """, tmp_path)
    assert lines == ["at the checkpoint: held free held free", "after: free held",
                     "at the checkpoint: held free held free", "rolled back: held free"]


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_sqlite_keeps_other_writers_out_of_a_transaction_rolled_back_into(tmp_path, journal):
    """A SQLite write transaction open at the checkpoint (Python's sqlite3 opens one before the
    first write and keeps it until ``commit()``), a crash after more writes, and the restored
    program commits. Another process must be refused meanwhile ("database is locked"), as without
    forkpoint; before the locks were carried, it was let in and one side's rows were lost.
    In WAL mode the database is then exactly as without the crash. In rollback-journal mode the
    file keeps what the crashed attempt spilled into it, which no rollback of memory can undo:
    forkpoint says so when the checkpoint is taken."""
    code = """
    import sqlite3
    JOURNAL = sys.argv[1]
    OTHER = ("import sqlite3, sys\\n"
             "c = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)\\n"
             "try:\\n"
             "    c.execute('BEGIN IMMEDIATE'); c.execute('insert into t values (555, 1)')\\n"
             "    c.execute('COMMIT'); print('other writer let in')\\n"
             "except sqlite3.OperationalError as e:\\n"
             "    print('other writer refused:', e)\\n")
    if FP:
        fp.recover_on(signal.SIGSEGV)
    c = sqlite3.connect("app.db", isolation_level=None, timeout=0)
    c.execute(f"PRAGMA journal_mode={JOURNAL}")
    c.execute("PRAGMA cache_size=5")              # small: the crashed attempt spills pages
    c.execute("create table t(x, pad)")
    c.execute("BEGIN")
    for i in range(200):
        c.execute("insert into t values (?, ?)", (i, "p" * 500))
    c.execute("COMMIT")
    c.execute("BEGIN IMMEDIATE")
    c.execute("insert into t values (1000, 'a')")  # open at the checkpoint
    if FP:
        fp.tsetjmp()
        if not fp.chkpt_status(fp.CHKPT_RECOVERED):
            c.execute("update t set pad = ?", ("q" * 700,))
            c.execute("delete from t where x % 3 = 0")
            ctypes.string_at(0)
    print(subprocess.run([sys.executable, "-c", OTHER, "app.db"], capture_output=True, text=True,
                         timeout=20).stdout.strip())
    c.execute("insert into t values (2000, 'b')")
    c.execute("COMMIT")
    c.close()
    if JOURNAL == "wal":
        c = sqlite3.connect("app.db")
        print("rows", c.execute("select count(*), sum(x in (1000, 2000)), sum(x = 555) from t").fetchone())
        print("integrity", c.execute("pragma integrity_check").fetchone()[0])
    """
    got = []
    for fp in ("1", "0"):
        (tmp_path / "app.db").unlink(missing_ok=True)
        r = run_py(HEADER + code, tmp_path, journal, FP=fp)
        assert r.returncode == 0, f"FP={fp}:\n{r.stdout}\n{r.stderr}"
        got.append((r.stdout.splitlines(), r.stderr))
    assert got[0][0] == got[1][0], got
    assert got[0][0][0] == "other writer refused: database is locked"
    if journal == "wal":
        assert got[0][0][1:] == ["rows (202, 2, 0)", "integrity ok"]
        assert "SQLite write transaction" not in got[0][1]
    else:
        assert "checkpoint 1 is taken inside a SQLite write transaction on" in got[0][1], got[0][1]
