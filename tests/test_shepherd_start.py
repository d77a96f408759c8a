"""The shepherd's start: what its fresh interpreter imports before it can answer the program.

Invariant protected: the program's first checkpoint waits for the exec'd shepherd to import
``forkpoint._shepherd`` and everything it imports (a job runner that forks a process per job waits
for it once per job), so that import stays free of the heavy modules only some features or only
the program need: ``dataclasses`` (and ``inspect``, ``ast``, ``dis`` with it), the hashing and URL
modules of shared quarantine scopes, ``tempfile``, ``secrets``, ``pickle``. Load-independent:
the modules are counted, not timed. The boot is the shepherd's own (``_shepherd._BOOT``), with its
``main()`` replaced by a listing of ``sys.modules``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from forkpoint import _shepherd

pytestmark = pytest.mark.timeout(60)

# Imported by none of the shepherd's modules at its start (each only for a rare path or a feature,
# imported where it is needed; see _record, _qkeys.parse_scope, arena.cache_in, _rundir._mkdtemp).
ABSENT = ("dataclasses", "inspect", "ast", "dis", "hashlib", "_hashlib", "hmac", "secrets",
          "random", "urllib.parse", "ipaddress", "tempfile", "shutil", "bz2", "lzma", "pickle")
# The shepherd's modules, stdlib and forkpoint, on Python 3.11: 114 (154 with dataclasses and the rest).
MAX_MODULES = 125


def _boot_modules() -> list[str]:
    assert _shepherd._BOOT.endswith("main()")
    listing = "import json;print(json.dumps(sorted(sys.modules)))"
    boot = _shepherd._BOOT[: -len("main()")] + listing
    out = subprocess.run([sys.executable, "-I", "-S", "-c", boot, str(ROOT), "fp-shepherd"],
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def test_the_shepherd_imports_few_modules():
    modules = _boot_modules()
    assert "forkpoint._shepherd" in modules
    present = [m for m in ABSENT if m in modules]
    assert not present, f"the shepherd's start imports {present}"
    # (the package is the boot's empty stand-in: none of the public API, none of the program's side)
    assert "forkpoint.snapshots" not in modules and "forkpoint._runtime" not in modules
    if sys.version_info[:2] == (3, 11):
        assert len(modules) <= MAX_MODULES, f"{len(modules)} modules at the shepherd's start: {modules}"
