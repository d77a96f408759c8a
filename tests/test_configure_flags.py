"""configure()'s flags: a new check must not refuse values the older flags always took."""
from __future__ import annotations

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(60)


def test_configure_takes_any_truth_value_for_its_older_flags_as_before(tmp_path):
    """The check added with reset_connections refused allow_threads=1, gc_freeze=0 and
    allow_threads=None, which configure() had always taken; reset_connections itself is strict."""
    r = run_py("""
    import forkpoint as fp
    fp.configure(allow_threads=1, gc_freeze=0)
    fp.configure(allow_threads=None)
    print("accepted")
    try:
        fp.configure(reset_connections=1)
    except fp.ConfigurationError as e:
        print("refused:", e)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["accepted", "refused: reset_connections must be True or False, got 1"]
