"""A program run from an interactive shell in a real terminal: job control through the shell
(Ctrl-Z, ``bg``, ``fg``, a background read) behaves as without forkpoint, across restores.

A real pty with ``bash -i`` in it, keys typed as a user types them; the program is the shell's job.
"""
from __future__ import annotations

import os
import pty
import re
import select
import shutil
import sys
import time

import pytest
from conftest import clean_env, program, wait_exit

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")]

PROMPT = b"PROMPT$ "


class Shell:
    """An interactive bash in a new pty (its session leader), as a terminal window starts one."""

    def __init__(self, tmp_path) -> None:
        env = clean_env(PS1=PROMPT.decode(), TERM="dumb", HISTFILE="/dev/null")
        env.pop("PROMPT_COMMAND", None)
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(tmp_path)
            os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], env)
        self.pid, self.fd = pid, fd
        self.out = bytearray()
        self.pos = 0
        self.expect(PROMPT)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, pattern: bytes, timeout: float = 15.0) -> bytes:
        """What came up to ``pattern`` (a regular expression), from where the last match ended."""
        rx = re.compile(pattern if pattern != PROMPT else re.escape(PROMPT))
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.out, self.pos)
            if m:
                seen = bytes(self.out[self.pos:m.end()])
                self.pos = m.end()
                return seen
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"{pattern!r} not seen in {timeout}s; output: "
                                     f"{bytes(self.out[-800:])!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"pty closed before {pattern!r}; output: {bytes(self.out[-800:])!r}")
            self.out += chunk

    def run(self, line: bytes) -> bytes:
        self.send(line + b"\n")
        return self.expect(PROMPT)

    def close(self) -> None:
        os.close(self.fd)            # the terminal window closes: bash hangs up its jobs
        wait_exit(self.pid)


def test_fg_after_a_restore_in_the_background_continues_the_job(tmp_path):
    """A job put in the background with Ctrl-Z and ``bg`` crashes there and is restored; the
    restored process reads the terminal, and the job stops (tty input), as a background read does
    without forkpoint. ``fg`` must then continue it, and it reads what is typed next. The face's
    mirrored stop unblocked SIGTTIN while the kernel's copy for the group was still pending in the
    shepherd (a SIGCHLD of the killed process had been read just before): the face stopped on that
    copy, and its own kill stopped it again as ``fg`` continued it: the shell said "Stopped" again at
    once ($? 149) and the next line typed went to the shell (2 of 3 runs of 10 rounds before the fix; 15 here)."""
    path = program("""
        import ctypes, signal, sys, time
        import forkpoint as fp
        fp.recover_on(signal.SIGSEGV, max_recoveries=1000)
        fp.tsetjmp()
        line = input("> ")                # a REPL's prompt, then a read of the terminal
        print("got", line.strip(), flush=True)
        if line.strip() == "end":
            sys.exit(0)
        time.sleep(0.5)
        ctypes.string_at(0)               # back to the checkpoint, which reads the terminal again
    """, tmp_path)
    sh = Shell(tmp_path)
    try:
        for i in range(15):               # a new program each round: its first restore
            sh.send(f"{sys.executable} {path}\n".encode())
            time.sleep(0.5)
            sh.send(b"go\n")
            sh.expect(rb"got go")
            sh.send(b"\x1a")              # Ctrl-Z during its sleep
            sh.expect(rb"Stopped.*\r\n" + re.escape(PROMPT))
            sh.run(b"bg")
            sh.expect(rb"recovered \(killed by SIGSEGV\)")
            deadline = time.monotonic() + 10
            while b"Stopped (tty input)" not in sh.run(b"jobs -l"):
                assert time.monotonic() < deadline, f"round {i}: the restored job did not stop on its read: {bytes(sh.out[-600:])!r}"
                time.sleep(0.1)
            sh.send(b"fg\n")
            sh.expect(re.escape(str(path).encode()) + rb"\r\n")
            time.sleep(0.3)               # a second stop would be reported by now
            sh.send(b"end\n")
            seen = sh.expect(rb"got end|" + re.escape(PROMPT))
            assert seen.endswith(b"got end"), f"round {i}: fg did not continue the job: {seen!r}"
            sh.expect(PROMPT)
            assert b"status=0" in sh.run(b"echo status=$?")
        sh.send(b"exit\n")
    finally:
        sh.close()
