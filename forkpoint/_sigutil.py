"""Signal plumbing: a signalfd for the shepherd, and helpers to freeze and thaw a process's signals.

The shepherd reads signals from a signalfd instead of running handlers, because it needs each
signal's ``si_code``: a SIGINT typed at the terminal (``SI_KERNEL``) already reached the live
program, which shares the terminal's process group, and must not be forwarded a second time.
"""
from __future__ import annotations

import _signal
import ctypes
import functools
import mmap
import os
import signal
import struct
import sys
from collections.abc import Iterable

SI_KERNEL = 0x80
SFD_NONBLOCK = 0o4000
SFD_CLOEXEC = 0o2000000
_SIGINFO = struct.Struct("=IiiIIiIIiiIIQQqqQQ")  # the head of struct signalfd_siginfo (128 bytes)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.signalfd.restype = ctypes.c_int

ALL_SIGNALS = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}

# What a program commonly dies of in native code: the default of recover_on() users and of
# @checkpointed. faulthandler reports each of them from inside the dying process.
FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT)
REPORTED_SIGNALS = frozenset(FATAL_SIGNALS)
# A real fault re-executes the faulting instruction, so a Python-level handler for one never runs.
FAULT_SIGNALS = REPORTED_SIGNALS - {signal.SIGABRT}
ITIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
# What the shepherd passes on to the live process when it is sent to the program's PID: every signal
# a user can send, except the two that belong to job control and to the shepherd itself: SIGCHLD
# (its own children) and SIGCONT (it continues the live process only if that one is stopped).
FORWARDED = frozenset(ALL_SIGNALS - {signal.SIGCHLD, signal.SIGCONT})
# The terminal sends these to its whole foreground process group, the live process included.
TTY_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGWINCH, signal.SIGTSTP,
                         signal.SIGTTIN, signal.SIGTTOU})
# Job-control stops: a live process stopped by one of these stops the shepherd too (the face PID
# is what the shell waits on), and a SIGCONT to the face continues it.
STOP_SIGNALS = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
# Pending (blocked) in a live process that is being retired, these are passed on to the process
# restored after it: signals from users and terminals. A retired process's own timers, children,
# pipes and faults are its own business (SIGALRM, SIGCHLD, SIGPIPE, ...), and are passed on only
# if the shepherd itself forwarded them to it.
CARRIED = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGWINCH, signal.SIGPWR, *STOP_SIGNALS,
                     *range(signal.SIGRTMIN, signal.SIGRTMAX + 1)})
# What a signal does to a process that neither catches nor ignores it (signal(7)).
DEFAULT_IGNORED = frozenset({signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH})


def disposition(sig: int, ignored: int, caught: int) -> str:
    """What ``sig`` does to a process whose SigIgn/SigCgt masks are ``ignored``/``caught``:
    "ignore", "catch", "stop" or "terminate" (which includes dumping core)."""
    bit = 1 << (sig - 1)
    if ignored & bit:
        return "ignore"
    if caught & bit:
        return "catch"
    if sig in DEFAULT_IGNORED:
        return "ignore"
    if sig in STOP_SIGNALS or sig == signal.SIGSTOP:
        return "stop"
    return "terminate"


def signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _sigset_bytes(sigs: Iterable[int]) -> bytes:
    words = [0] * 16  # sigset_t is 1024 bits in glibc
    for s in sigs:
        words[(s - 1) // 64] |= 1 << ((s - 1) % 64)
    return struct.pack("16Q", *words)


def open_signalfd(sigs: Iterable[int]) -> int:
    """A non-blocking signalfd for ``sigs`` (the caller must block them)."""
    buf = ctypes.create_string_buffer(_sigset_bytes(sigs))
    fd = _libc.signalfd(-1, buf, SFD_NONBLOCK | SFD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def read_signalfd(fd: int) -> list[tuple[int, int, int]]:
    """Pending signals as (signo, code, sender pid)."""
    out: list[tuple[int, int, int]] = []
    while True:
        try:
            data = os.read(fd, 128 * 16)
        except BlockingIOError:
            return out
        for off in range(0, len(data) - 127, 128):
            signo, _errno, code, pid = _SIGINFO.unpack_from(data, off)[:4]
            out.append((signo, code, pid))


# Masks are kept as raw sigset_t buffers and changed through libc directly. Right after a fork
# every page the process writes is copied on first touch, and converting Python sets of Signals
# members touches dozens of pages (0.2 ms measured); a raw call touches almost none.
# The how-arguments are plain ints: an enum member costs a conversion, and pages, on every call. These
# two calls cannot block, so they keep the GIL (PyDLL): releasing and taking it back is more work,
# on the restore path and right after tsetjmp()'s fork.
_nogil = ctypes.PyDLL(None)
_pthread_sigmask = _nogil.pthread_sigmask
_pthread_sigmask.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_sigpending = _nogil.sigpending
_sigpending.argtypes = [ctypes.c_void_p]
_SIG_BLOCK = int(signal.SIG_BLOCK)
_SIG_SETMASK = int(signal.SIG_SETMASK)
_ALL = ctypes.create_string_buffer(_sigset_bytes(ALL_SIGNALS), 128)
_EMPTY = bytes(128)


def new_mask() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(128)


def block_all(old: ctypes.Array[ctypes.c_char] | None = None) -> ctypes.Array[ctypes.c_char]:
    """Block every blockable signal; return (in ``old`` if given) the previous mask."""
    old = old if old is not None else new_mask()
    _pthread_sigmask(_SIG_BLOCK, _ALL, old)
    return old


def restore_mask(mask: ctypes.Array[ctypes.c_char]) -> None:
    _pthread_sigmask(_SIG_SETMASK, mask, None)


# Blocking every signal is the first step of a section that must not be interrupted, and it cannot
# come before the section's ``try``: CPython runs the Python handlers of signals that arrived just
# before the block right after the call that blocked them returns, and one that raises there
# (KeyboardInterrupt) would leave the program with every signal blocked. So the block is the first
# thing inside the ``try`` (``block_all_into``), into a buffer marked "not filled": the kernel never
# reports SIGKILL as blocked, so a previous mask with that bit set was never written, and there is
# nothing to restore.
_UNSET = b"\xff" * 128


# ``block_all(old)`` as a C call with no Python frame of its own: the only point where a pending
# handler can run (and raise) is right after it returns, with every signal blocked and ``old`` filled.
block_all_into = functools.partial(_pthread_sigmask, _SIG_BLOCK, _ALL)


def unset_mask(mask: ctypes.Array[ctypes.c_char] | None = None) -> ctypes.Array[ctypes.c_char]:
    """A buffer (``mask``, or a new one) for ``block_all``'s previous mask, marked "not filled"."""
    if mask is None:
        return ctypes.create_string_buffer(_UNSET, 128)
    mask.raw = _UNSET
    return mask


# ``restore_mask(mask)`` as a C call with no Python frame, for a ``finally`` reached with no Python
# call since the block: a function's entry is where CPython 3.12 runs a handler pending since before
# the block, and one that raised at ``restore_blocked``'s entry would skip the restore. Such a
# ``finally`` makes ``restore_blocked``'s test inline (``not mask[1][0] & 1``: a subscript and a
# test, no point where a handler runs), then calls this.
set_mask_of = functools.partial(_pthread_sigmask, _SIG_SETMASK)


def restore_blocked(mask: ctypes.Array[ctypes.c_char]) -> None:
    """``restore_mask(mask)`` if ``block_all(mask)`` filled it (see ``unset_mask``); else nothing."""
    if not mask[1][0] & 1:              # SIGKILL is bit 8: set only in an unfilled buffer
        _pthread_sigmask(_SIG_SETMASK, mask, None)


def flush_stdio() -> None:
    """Flush Python's and C's stdio so that no buffered output is copied into a fork."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    _libc.fflush(None)


# The mask a checkpoint keeps (``_frozen.Saved.mask``) is a set of plain ints (``block_all_set``), put back
# through ``_signal`` (the C function under ``signal``, whose Python wrapper would turn every number
# into a ``Signals`` member): ``tsetjmp()`` restores its mask right after the fork, where each page
# the call touches is copied, and a ctypes call there touched about 14 pages against about 7 for
# this one (minor faults counted around 200 forks).
_ALL_INTS = frozenset(int(s) for s in ALL_SIGNALS)


def block_all_set() -> set[int]:
    """Block every blockable signal; return the previous mask as a set of signal numbers.

    ``_signal.pthread_sigmask`` runs the Python handlers of signals that came before the block
    once the block is in place, and if one raises (Ctrl-C), the previous mask is lost with the
    return value: it is read first (handlers that raise there raise before anything changed), and
    put back before the exception goes on. Two calls through ``_signal`` touch fewer pages than
    one through ctypes (see above), and this runs on every protected call.
    """
    before = _signal.pthread_sigmask(_SIG_BLOCK, ())
    try:
        return _signal.pthread_sigmask(_SIG_BLOCK, _ALL_INTS)  # type: ignore[no-any-return]
    except BaseException:
        _signal.pthread_sigmask(_SIG_SETMASK, before)
        raise


def set_mask(mask: set[int]) -> None:
    """Make ``mask`` (from ``block_all_set``) the signal mask again. Handlers of signals it unblocks
    run before this returns."""
    _signal.pthread_sigmask(_SIG_SETMASK, mask)


def mask_of(sigs: Iterable[int]) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_sigset_bytes(sigs), 128)


_PENDING = new_mask()


def pending_mask() -> int:
    """The signals pending in this thread or process, as a mask (bit ``s - 1`` for signal ``s``)."""
    buf = _PENDING
    _sigpending(buf)
    return int.from_bytes(buf.raw[:8], sys.byteorder)


def drain_pending() -> None:
    """Discard signals that arrived while this process was frozen; they were not meant for it."""
    buf = _PENDING
    _sigpending(buf)
    if buf.raw == _EMPTY:
        return
    pending = signal.sigpending()
    while pending:
        signal.sigtimedwait(pending, 0)
        pending = signal.sigpending()


# An instruction that faults with each signal: ud2, int3 and a division by zero (x86_64), udf and
# brk (aarch64, whose division by zero does not trap).
_FAULT_CODE: dict[str, dict[int, bytes]] = {
    "x86_64": {signal.SIGILL: b"\x0f\x0b", signal.SIGTRAP: b"\xcc",
               signal.SIGFPE: b"\x31\xc9\x31\xc0\x99\xf7\xf9"},
    "aarch64": {signal.SIGILL: b"\x00\x00\x00\x00", signal.SIGTRAP: b"\x00\x00\x20\xd4"},
}


def fault(sig: int) -> None:
    """Die by ``sig`` through a real fault of this process; return if none can be made here.

    For a PID namespace's init, which the kernel protects from every signal sent to it (its own
    included) but not from a fault it makes: the kernel forces that signal's default action on
    it. SIGABRT is glibc's ``abort()``, which then ends init as it ends it (a SIGSEGV on x86_64).
    The caller has set the default action and disabled core dumps.
    """
    if sig == signal.SIGABRT:
        os.abort()
    try:
        if sig == signal.SIGSEGV:
            ctypes.string_at(0)               # strlen(NULL)
        elif sig == signal.SIGBUS:            # a page of a file that was cut short
            fd = os.memfd_create("fp-bus")
            os.ftruncate(fd, mmap.PAGESIZE)
            page = mmap.mmap(fd, mmap.PAGESIZE)
            os.ftruncate(fd, 0)
            ctypes.string_at(ctypes.addressof(ctypes.c_char.from_buffer(page)), 1)
        elif sig in _FAULT_CODE.get(os.uname().machine, {}):
            page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            page.write(_FAULT_CODE[os.uname().machine][sig])
            ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    except (OSError, ValueError):         # no memfd, no executable mapping (a hardened kernel)
        pass


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_ALTSTACKS: list[mmap.mmap] = []


def large_altstack(size: int = 256 << 10) -> mmap.mmap:
    """Give signal handlers a roomy alternate stack; return the mapping, which must stay alive.

    faulthandler installs an alternate stack of 2 * SIGSTKSZ and CPython runs every signal handler
    on it (SA_ONSTACK) without blocking other signals, so a burst of signals nests one kernel frame
    per signal there. With AVX-512 a frame takes about 3.4 KB (MINSIGSTKSZ 3376 on the development
    machine), and five signals at once overflowed it into the malloc heap ("corrupted double-linked
    list" at exit, reproduced without forkpoint on CPython 3.11.7). The pages of this mapping are
    only allocated when a signal touches them.
    """
    stack = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Kept here before the kernel has it, for the process's life: a Ctrl-C handled as the call
    # returns (or anything raised before the caller keeps the mapping) freed it while it was the
    # signal stack, and the next signal killed the process by SIGSEGV, with no crash report (the
    # kernel cannot write a handler's frame there): 5 of 60 runs of a SIGINT flood on a busy machine.
    _ALTSTACKS.append(stack)
    st = _StackT(ctypes.addressof(ctypes.c_char.from_buffer(stack)), 0, size)
    if _libc.sigaltstack(ctypes.byref(st), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return stack
