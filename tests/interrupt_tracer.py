"""Raise KeyboardInterrupt at the k-th point where CPython could run a pending signal handler, as a
Ctrl-C typed at that moment would: for tests/interrupt_sweep.py and tests/interrupt_start.py.

Where handlers run (CPython 3.11-3.13): at a function's start (RESUME), after a loop's back edge,
and as a call into C code returns, inside that CALL (3.13: or CALL_KW) instruction; not as a Python
function returns (such calls run inline, with no check). The tracer raises before the next
instruction, which a different exception-table entry may cover than the CALL: such points are
listed in ``not_modelled``, to be read by hand. A handler runs only if its signal could have
arrived: SIGINT was not blocked at that point, or at some instruction since the point before (a
signal that came just before forkpoint blocked every signal runs its handler as the block returns).

Each place (an instruction of a function) is tried at its first ``REPEATS`` passes of a call only:
a loop's later turns, or a function called once per item, meet the same code in the same kind of
state. Without the limit, a scan over the process's open files or sockets was most of a sweep's
points (1,266 in a worker checkpoint's refresh, 140 s of a suite run; 176 and 22 s with it). Set
FORKPOINT_SWEEP_REPEATS=0 to try every pass.
"""
from __future__ import annotations

import ctypes
import dis
import os
import signal
import sys
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_mask_buf = ctypes.create_string_buffer(128)
_CALL_OPS = {dis.opmap[name] for name in ("CALL", "CALL_KW", "CALL_FUNCTION_EX") if name in dis.opmap}
_JUMP_BACK = dis.opmap["JUMP_BACKWARD"]
_RESUME = dis.opmap["RESUME"]
REPEATS = int(os.environ.get("FORKPOINT_SWEEP_REPEATS", "3"))


def sigint_blocked() -> bool:
    _libc.pthread_sigmask(0, None, _mask_buf)       # SIG_BLOCK with no set: read the mask
    return bool(_mask_buf.raw[0] & 1 << (signal.SIGINT - 1))


def blocked_mask() -> int:
    with open("/proc/thread-self/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))


def _place(frame: Any) -> str:
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"


class Interrupter:
    """``with Interrupter(k, skip=file):`` raises at the k-th point (in the live process only; not
    in frames of ``skip``, the harness's own file); ``seen`` counts the points passed. ``only``: a
    directory; points are counted in frames of its files alone (forkpoint's, not an event loop's
    own machinery, whose robustness to an interrupt is asyncio's affair)."""

    def __init__(self, k: int, skip: str, only: str | None = None) -> None:
        self.k, self.skip = k, os.path.abspath(skip)
        self.only = os.path.abspath(only) + os.sep if only else None
        self.seen, self.where = 0, ""
        self.not_modelled: set[str] = set()
        self._pid = _libc.getpid()      # a restore makes another process the live one: per use
        self._since = False
        self._last_op: dict[int, int] = {}
        self._last_off: dict[int, int] = {}
        self._inline: set[int] = set()
        self._tables: dict[Any, list[Any]] = {}
        self._passes: dict[tuple[Any, int], int] = {}   # place -> points passed there

    def __enter__(self) -> Interrupter:
        self._pid = _libc.getpid()
        self._since = not sigint_blocked()
        sys.settrace(self._enter)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(None)

    def _handler_of(self, code: Any, offset: int) -> int | None:
        table = self._tables.get(code)
        if table is None:
            table = self._tables[code] = dis._parse_exception_table(code)  # type: ignore[attr-defined]
        return next((e.target for e in table if e.start <= offset < e.end), None)

    def _enter(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == self.skip:
            return None
        if self.only is not None and not frame.f_code.co_filename.startswith(self.only):
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        frame.f_trace = self._local          # (3.13 reports opcodes only to a frame's own f_trace)
        return self._local(frame, event, arg)

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        key = id(frame)
        if event == "return":
            self._last_op.pop(key, None)
            self._last_off.pop(key, None)
            self._inline.discard(key)
            return self._local
        if event not in ("call", "opcode") or _libc.getpid() != self._pid:
            return self._local
        code = frame.f_code
        op = _RESUME if event == "call" else code.co_code[frame.f_lasti]
        prev = self._last_op.get(key)
        self._last_op[key] = op
        if event == "call":
            if frame.f_back is not None:
                self._inline.add(id(frame.f_back))      # the caller's CALL ran this frame inline
        elif key in self._inline:
            self._inline.discard(key)
            prev = None
        unblocked = not sigint_blocked()
        after_call = prev in _CALL_OPS
        if event == "opcode":
            last = self._last_off.get(key, -1)
            self._last_off[key] = frame.f_lasti
            if after_call and self._handler_of(code, last) != self._handler_of(code, frame.f_lasti):
                if self._since or unblocked:
                    self.not_modelled.add(_place(frame))
                self._since = unblocked
                return self._local
        if op == _RESUME or after_call or prev == _JUMP_BACK:
            eligible = unblocked or self._since
            self._since = unblocked
            if eligible and REPEATS:
                place = (code, frame.f_lasti)
                passes = self._passes[place] = self._passes.get(place, 0) + 1
                eligible = passes <= REPEATS        # (passed as a point where nothing is raised)
            if eligible:
                self.seen += 1
                if self.seen == self.k:
                    self.where = f"{_place(frame)} @{frame.f_lasti} {dis.opname[op]}"
                    raise KeyboardInterrupt
        elif unblocked:
            self._since = True
        return self._local
