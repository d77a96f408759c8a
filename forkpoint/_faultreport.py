"""Crash reports from faulthandler, read by the shepherd while the crashing process still runs.

The live process enables faulthandler on a socket whose read end the shepherd holds (see
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
import socket
import time

from . import _parking, _procfs

# faulthandler's first line names the signal (Python/faulthandler.c: faulthandler_handlers).
_HEADER = re.compile(rb"Fatal Python error: (Segmentation fault|Bus error|Floating point "
                     rb"exception|Aborted|Illegal instruction)\n")
_SIGNALS = {b"Segmentation fault": signal.SIGSEGV, b"Bus error": signal.SIGBUS,
            b"Floating point exception": signal.SIGFPE, b"Aborted": signal.SIGABRT,
            b"Illegal instruction": signal.SIGILL}


class FaultReports:
    """The read end of the fault socket: report text, and the signals its headers name."""

    def __init__(self, fd: int, writer: int | None = None) -> None:
        self.fd: int | None = fd
        os.set_blocking(fd, False)
        # The write end every process of the program shares, held here only to set its buffer.
        self.writer = socket.socket(fileno=writer) if writer is not None else None
        self.wide = False
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
                self._read_all()
                return
            now = time.monotonic()
            if now - last > quiet or now - start > limit:
                return
            if select.select([self.fd], [], [], 0.0002)[0]:
                if self._read_all() is None:
                    return
                last = time.monotonic()

    def _read_all(self) -> int | None:
        """Read until nothing is there; the number of bytes read (None at EOF)."""
        total = 0
        while True:
            before = len(self.pending)
            if self.read() is None:
                return None
            if len(self.pending) == before:
                return total
            total += len(self.pending) - before

    def held(self) -> bool:
        """Whether the program holds its crashes in their reports (``_parking.hold_reports``)."""
        return self.writer is not None and not self.wide and _parking.held(self.writer)

    def widen(self) -> None:
        """Let a held report through without waiting for each read: once the shepherd has taken
        what it needs from the crashing process, the rest of its 60-100 small writes, a few at a
        time per read, would delay the restore. Setting the size wakes a writer waiting for room."""
        if self.writer is not None and not self.wide:
            self._set_buffer(1 << 20)           # (the kernel caps it at net.core.wmem_max)
            self.wide = True

    def narrow(self) -> None:
        if self.writer is not None and self.wide:
            self._set_buffer(1)                 # (the kernel raises it to its least, 4.6 kB)
            self.wide = False

    def _set_buffer(self, size: int) -> None:
        assert self.writer is not None
        try:
            self.writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:
            pass

    def take(self) -> bytes:
        """The report text read so far, which the caller now owns."""
        report, self.pending = self.pending, b""
        return report

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

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
