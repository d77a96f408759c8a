"""The terminal's mode across a restore, in a real pty: the restored program finds the terminal in
the mode it had at the checkpoint, as its memory holds it, and only as the terminal's foreground
job does forkpoint set it (``forkpoint/_terminal.py``)."""
from __future__ import annotations

import os
import pty
import select
import sys
import time

import pytest
from conftest import clean_env, program, wait_exit

pytestmark = pytest.mark.timeout(60)

HEADER = """
    import os, sys, signal, time, ctypes, termios, tty
    import forkpoint as fp
    fp.recover_on(signal.SIGSEGV)

    def mode():
        lflag = termios.tcgetattr(0)[3]
        return f"icanon={bool(lflag & termios.ICANON)} echo={bool(lflag & termios.ECHO)}"
"""


def run_in_pty(code: str, tmp_path, timeout: float = 30.0) -> tuple[int, str]:
    """Run ``code`` as the session leader of a new pty (its terminal's foreground job, as a
    terminal window runs a command); its exit code and everything it wrote to the terminal."""
    path = program(code, tmp_path)
    env = clean_env()
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execve(sys.executable, [sys.executable, str(path)], env)
        finally:
            os._exit(127)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 0.2)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:         # EIO: every holder of the terminal's other side is gone
                break
            if not chunk:
                break
            out += chunk
    finally:
        code = wait_exit(pid)
        os.close(fd)
    return code, out.decode(errors="replace").replace("\r", "")


def test_a_restore_gives_the_terminal_back_the_mode_of_the_checkpoint(tmp_path):
    """Restored to before its ``tty.setraw()``, a program found the terminal still raw (no echo,
    Enter and Ctrl-C doing nothing) while its memory held it cooked; a line editor that saves the
    mode it finds then left it raw after the program's end."""
    code, out = run_in_pty(HEADER + """
    print("before", mode(), flush=True)
    fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        tty.setraw(0)
        ctypes.string_at(0)
    print("restored", mode(), flush=True)
    """, tmp_path)
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith(("before", "restored"))]
    assert lines == ["before icanon=True echo=True", "restored icanon=True echo=True"], out


def test_a_program_restored_in_the_background_leaves_the_terminal_alone(tmp_path):
    """Invariant: the mode is set only while the program is the terminal's foreground job; in the
    background it belongs to the job in front (here one that set raw mode), and must be left as
    that job made it."""
    code, out = run_in_pty(HEADER + """
    front = fp.persist_int("front")
    fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        child = os.fork()
        if child == 0:                               # the job in front, whose mode is raw
            os.setpgid(0, 0)
            time.sleep(30)
            os._exit(0)
        os.setpgid(child, child)
        front.value = child
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        os.tcsetpgrp(0, child)
        tty.setraw(0)
        ctypes.string_at(0)
    print("restored", mode(), "in front", os.tcgetpgrp(0) == os.getpgrp(), flush=True)
    os.kill(front.value, signal.SIGKILL)
    """, tmp_path)
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("restored")]
    assert lines == ["restored icanon=False echo=False in front False"], out
