"""Crash reports from faulthandler, read by the shepherd while the crashing process still runs.

The live process enables faulthandler on a pipe whose read end the shepherd holds (see
``_runtime.watch_faults``). faulthandler's C handler writes "Fatal Python error: Segmentation
fault" and a traceback before the process dies; the kernel would tell the shepherd of the death only
after tearing the process's memory down, tens of milliseconds later for a large heap. The first line
names the signal, so the shepherd can decide on it at once.
"""
from __future__ import annotations

import os
import re
import select
import signal
import time

from . import _procfs

# faulthandler's first line names the signal (Python/faulthandler.c: faulthandler_handlers).
_HEADER = re.compile(rb"Fatal Python error: (Segmentation fault|Bus error|Floating point "
                     rb"exception|Aborted|Illegal instruction)\n")
_SIGNALS = {b"Segmentation fault": signal.SIGSEGV, b"Bus error": signal.SIGBUS,
            b"Floating point exception": signal.SIGFPE, b"Aborted": signal.SIGABRT,
            b"Illegal instruction": signal.SIGILL}


class FaultReports:
    """The read end of the fault pipe: report text, and the signals its headers name."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        os.set_blocking(fd, False)
        self.pending = b""          # report text not yet copied to stderr
        self._tail = b""            # the end of what was read: a header split across two reads

    def read(self) -> list[int] | None:
        """Read what is there; return the signals of the headers in it, or None at EOF."""
        if self.fd is None:
            return []
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:         # nothing there yet (EAGAIN)
            return []
        if not chunk:
            return None
        self.pending += chunk
        text = self._tail + chunk
        end = 0
        sigs: list[int] = []
        for header in _HEADER.finditer(text):
            end = header.end()
            sigs.append(int(_SIGNALS[header.group(1)]))
        self._tail = text[max(end, len(text) - 64):]
        return sigs

    def collect(self, pid: int, quiet: float = 0.005, limit: float = 0.05) -> None:
        """Read until dying process ``pid`` has written its whole report.

        faulthandler writes the report, then re-raises the signal; once the kernel has the
        process in exit (or it is gone) nothing more can come. A process that does not exit (a
        Python handler it chains to swallowed the signal) is given ``quiet`` seconds of silence,
        and the whole wait at most ``limit``: the shepherd's loop is held meanwhile.
        """
        start = last = time.monotonic()
        while self.fd is not None:
            if _procfs.exiting(pid):
                self.read()
                return
            now = time.monotonic()
            if now - last > quiet or now - start > limit:
                return
            if select.select([self.fd], [], [], 0.0002)[0]:
                if self.read() is None:
                    return
                last = time.monotonic()

    def take(self) -> bytes:
        """The report text read so far, which the caller now owns."""
        report, self.pending = self.pending, b""
        return report

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def flush(self, header: str = "") -> None:
        """Copy what was read to the program's stderr, where faulthandler would have written it,
        in one write, after ``header`` (a line saying what became of the crash)."""
        report = self.take()
        if report:
            write_stderr(header.encode() + report)


def write_stderr(data: bytes) -> None:
    while data:
        try:
            data = data[os.write(2, data):]
        except InterruptedError:
            continue
        except OSError:
            return
