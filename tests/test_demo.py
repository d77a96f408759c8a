"""The main job: `forkpoint demo` runs end to end, exits 0, and leaves nothing behind."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import clean_env


@pytest.mark.timeout(90)
def test_demo_runs_and_every_expectation_holds():
    r = subprocess.run([sys.executable, "-m", "forkpoint", "demo"], capture_output=True, text=True,
                       timeout=60, env=clean_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: every failure cost one request" in r.stdout
    table = r.stdout[r.stdout.index("event "):]
    assert "segfault in C code                 rolled back (killed by SIGSEGV)" in table
    assert "endless loop (watchdog 0.5 s)      rolled back (timeout)" in table
    assert "corrupt store (invariant check)    rolled back (invariant" in table
    assert "same segfault input again          refused: quarantined" in table
    # the server's PID is the same in every row
    pids = {line.split()[-1] for line in table.splitlines()[1:] if line and line[0].isalpha()
            and line.split()[-1].isdigit()}
    assert len(pids) == 1
