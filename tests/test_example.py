"""The paper's section 3 example, both ways: a SIGSEGV sent by kill() handled by the paper's Python
handler, and a real NULL dereference recovered by the shepherd."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, clean_env

EXAMPLE = str(ROOT / "examples" / "paper_example.py")
pytestmark = pytest.mark.timeout(60)


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True, timeout=30,
                          env=clean_env(), input=input)


@pytest.mark.parametrize("fault", ["kill", "real"])
def test_the_corrupted_program_is_recovered(fault):
    r = run("--answer", "y", "--fault", fault)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "checkpoint 1 taken; do you want to corrupt the program"
    assert lines[1].startswith(f"corrupting the program ({fault} fault) in pid ")
    assert lines[2].startswith("recovered: back in state 1 from state 1 after SIGSEGV")
    assert len(lines) == 3, "output before the checkpoint must not be printed twice"


def test_answering_no_runs_normally_from_a_terminal_answer():
    r = run(input="n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "no corruption; exiting normally"
