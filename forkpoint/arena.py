"""The arena: the program's memory that survives a rollback.

``persist()`` regions, ``cache()`` entries, the jump history, the quarantine, the key being processed
and the armed watchdog's deadline all live in one *arena*: a memfd mapped ``MAP_SHARED`` before the
program's first fork, so the live process, every snapshot (also those taken before a region existed)
and the shepherd (which maps the memfd again after its exec) see the same bytes. The memfd is
reserved at its full size but the kernel allocates its pages only when they are first touched, so
the cost is what is used. It has no name in any filesystem: only processes holding the descriptor,
or allowed to ptrace the program (the same user, or root), can reach it.

Crash consistency. A writer can be SIGKILLed at any instruction. Every structure is therefore
written so that one aligned 8-byte store commits it: a directory slot becomes valid when its commit
word is written last; a cache entry is double-buffered and a generation counter says which buffer
is current, so a torn write only ever touches the inactive buffer; the space allocator is bumped
before an entry that uses the space is committed (a kill leaks the space, never overlaps it). Two
processes never write at once: only the live process writes regions and cache entries, and the
shepherd writes the history only while no live process runs program code (the quarantine
tables, ``_qtable``, have their own single writer and lock-free readers).

Stray writes. The program can write anywhere in the arena by mistake (a bad index into a persist
region's memoryview cannot, but ctypes can), so every word forkpoint itself relies on is checked,
and a damaged one is detected and reported, never used as if it were valid:

* the counters (next checkpoint id, allocator top, history sequence) are kept twice, each copy
  with its complement beside it; a damaged copy is repaired from the other (they only grow, so
  after a kill between the two the larger valid one is right); both damaged: ``CacheCorrupted``;
* a directory slot's name, offset and size are under a checksum that also covers its commit word;
  a slot that is neither free (all zero), nor being created, nor validly committed is damaged,
  and a name that cannot be found while a damaged slot exists is refused with ``CacheCorrupted``
  (naming the slot), never given a fresh zeroed region;
* a cache entry's generation word carries a checksum of itself; each buffer's checksum covers its
  offset, capacity and length as well as the bytes; a buffer's placement (offset, capacity) has
  its own check word, verified before the buffer is reused for a new value;
* each history record, the key being processed and the armed watchdog's record carry checksums;
  a damaged one is left out (and logged), never returned.

The throttle, "introduced" and "holders lost" words are hints that the shepherd's answers (or a
look at /proc) make authoritative; the words of ``_identity``/``_children``/``_cputime`` (face
parent, orphans, reaped children, CPU time) are not covered here.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _sigutil
from ._errors import (
    ArenaFull,
    CacheCorrupted,
    ConfigurationError,
    RegionMismatch,
    ResourceExhausted,
    resource_error,
)

log = logging.getLogger("forkpoint")

MAGIC = 0x31544B50464B5246  # "FRKFPKT1"
VERSION = 2
DEFAULT_SIZE = 256 << 20
MIN_SIZE = 1 << 20
MAX_NAME = 64

# Header words (8 bytes each) at offset 0.
(_H_MAGIC, _H_VERSION, _H_SIZE, _H_NEXT_ID, _H_TOP, _H_HISTORY, _H_START, _H_WD_AT, _H_WD_TO,
 _H_FACE_PPID, _H_ORPHANS, _H_REAPED, _H_THROTTLE, _H_INTRODUCED, _H_HOLDERS_LOST) = range(15)
# The program's CPU time (``_cputime``), nanoseconds: what processes no longer live used (user,
# system), the live process's own clock when it became live (its pid, user, system), and the
# highest values any live process answered (user, system, their sum).
(_H_CPU_USER, _H_CPU_SYS, _H_CPU_LIVE, _H_CPU_LIVE_USER, _H_CPU_LIVE_SYS, _H_CPU_SEEN_USER,
 _H_CPU_SEEN_SYS, _H_CPU_SEEN) = range(15, 23)
_CPU_WORDS = range(_H_CPU_USER, _H_CPU_SEEN + 1)
# Second copies and checks of the counters, and the watchdog record's check (see "Stray writes").
_C_NEXT_ID = (_H_NEXT_ID, 32, 33, 34)     # (value, its complement), (second value, its complement)
_C_TOP = (_H_TOP, 35, 36, 37)
_C_HISTORY = (_H_HISTORY, 38, 39, 40)
_H_WD_CHECK = 41
# The earliest hard deadline of the ``watchdog()`` blocks in force (``watchdog._Blocks``): a record
# of its own, as blocks of different tasks start and end in any order around the steps and calls
# that write the one above (each of those puts back what it found, which a block must not undo).
_H_AL_AT, _H_AL_TO, _H_AL_CHECK = 42, 43, 44
# Inputs done (``processing()`` blocks left, requests of the WSGI and ASGI wrappers ended), however
# they ended: the shepherd's evidence that a program it restores serves between its failures.
_H_SERVED = 45
_MASK = 0xFFFF_FFFF_FFFF_FFFF
_PROCESSING_OFF = 512          # (unused) word, length word with the key's checksum, then the key
# Children the live process reaped itself, newest last: (pid, status) word pairs, a ring.
_REAPED_OFF = 2048
_REAPED_CAP = 128
_PROCESSING_MAX = 256
_WD_UNHANDLED = 1 << 62         # flag in the watchdog's target word: see Arena.set_watchdog
_Q = struct.Struct("Q")
_D = struct.Struct("d")
_HEADER_SIZE = 4096

_HIST_OFF = _HEADER_SIZE
_HIST_CAP = 1024
_HIST_REC = struct.Struct("=Qdqqqq80s")  # seq|crc<<32, time, from, to, sig, kind+key-length, reason/key
_HIST_SIZE = 128

_DIR_OFF = _HIST_OFF + _HIST_CAP * _HIST_SIZE
_DIR_SLOTS = 512
_SLOT_WORDS = 24
_SLOT_SIZE = _SLOT_WORDS * 8
_DATA_OFF = _DIR_OFF + _DIR_SLOTS * _SLOT_SIZE
# Slot words: 0 commit, 1 name length, 2..9 name, 10 checksum of words 0..9 and 11..12, 11 offset and
# 12 size (persist), 13..16 and 17..20 the two cache buffers (off, cap, len, crc), 21 cache generation
# (with its checksum), 22 and 23 the placement checks of the two buffers.
_GEN = 21
_PLACED = 22
_COMMIT_PERSIST = 0x5053_0000_0000_0001
_COMMIT_CACHE = 0x4341_0000_0000_0002
_CREATING = 0x4352_0000_0000_0003          # being created: a kill leaves it reusable, never valid
_ZERO_SLOT = bytes(_SLOT_WORDS * 8)
_ALIGN = 64

_TAG_BYTES = b"B"
_TAG_PICKLE = b"P"


class HistoryRecord(NamedTuple):
    """One entry of the jump history: a restore, or a decision of the recovery policy."""

    seq: int
    time: float
    from_state: int
    to_state: int
    signal: int
    reason: str
    key: str | None


_WD_PAIR = struct.Struct("<QQ")


def usage_ns(usage: Any) -> tuple[int, int]:
    """The (user, system) CPU time of a ``resource.struct_rusage``, in ns (the ``_cputime`` words)."""
    return round(usage.ru_utime * 1e6) * 1000, round(usage.ru_stime * 1e6) * 1000   # microseconds


def processing_record(key: str) -> tuple[bytes, int]:
    """The key as ``Arena.set_processing_record`` stores it: its bytes, and its length and check."""
    raw = key.encode()[:_PROCESSING_MAX]
    return raw, len(raw) | zlib.crc32(raw, len(raw)) << 32


def _wd_check(raw: int, target: int) -> int:
    return zlib.crc32(_WD_PAIR.pack(raw, target), 0x5744) | 1 << 40      # never 0


def _gen_check(slot: int, gen: int) -> int:
    return zlib.crc32(struct.pack("<QQ", slot, gen), 0x47454E) | 1 << 31    # never 0


def _placement_check(slot: int, which: int, off: int, cap: int) -> int:
    return zlib.crc32(struct.pack("<QQQQ", slot, which, off, cap), 0x504C43) | 1 << 40


def _buffer_check(off: int, cap: int, n: int, body_crc: int) -> int:
    """The checksum of a cache buffer: of its bytes, and of where it is and how long."""
    return zlib.crc32(struct.pack("<QQQ", off, cap, n), body_crc) | (n & 0xFFFF_FFFF) << 32


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a region name must be a str, not {type(name).__name__}")
    raw = name.encode()
    if not raw or len(raw) > MAX_NAME:
        raise ValueError(f"a region name must be 1 to {MAX_NAME} bytes of UTF-8, got {len(raw)}")
    return name


_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value
# The arena's copy is made through calls that keep the GIL (a PyDLL's): ``os.lseek`` and
# ``os.copy_file_range`` release it, and a thread of the program writing a cache entry meanwhile
# tore the copy (the entry failed its checksum in the child in 100 of 100 forks).
_held = ctypes.PyDLL(None, use_errno=True)
_lseek = _held.lseek
_lseek.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int]
_lseek.restype = ctypes.c_long
_copy_range = getattr(_held, "copy_file_range", None)     # glibc 2.27+
if _copy_range is not None:
    _copy_range.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_long), ctypes.c_int,
                            ctypes.POINTER(ctypes.c_long), ctypes.c_size_t, ctypes.c_uint]
    _copy_range.restype = ctypes.c_ssize_t


def _seek(fd: int, off: int, whence: int) -> int:
    """``lseek``, the GIL held; -1 past the last data (ENXIO)."""
    got = _lseek(fd, off, whence)
    if got < 0:
        e = ctypes.get_errno()
        if e == errno.ENXIO:
            return -1
        raise OSError(e, os.strerror(e))
    return int(got)


def _copy_extents(src: int, dst: int, end: int, view: memoryview, into: mmap.mmap | None) -> bool:
    """Copy the pages of ``src`` below ``end`` that hold data (not holes) to ``dst``, the GIL held
    throughout: in the kernel (``copy_file_range``), or from ``view`` (src's mapping) into
    ``into`` (dst's). False, having copied part, if the kernel refuses to copy between them."""
    off = 0
    while off < end:
        start = _seek(src, off, os.SEEK_DATA)
        if start < 0 or start >= end:
            break
        stop = min(_seek(src, start, os.SEEK_HOLE), end)
        if into is not None:
            with memoryview(into) as out:
                out[start:stop] = view[start:stop]          # one memcpy, in C
            start = stop
        while start < stop:
            assert _copy_range is not None
            a, b = ctypes.c_long(start), ctypes.c_long(start)
            done = _copy_range(src, ctypes.byref(a), dst, ctypes.byref(b), stop - start, 0)
            if done > 0:
                start += done
                continue
            e = ctypes.get_errno() if done < 0 else errno.EIO
            if e in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                return False                # older kernels: not between these files
            raise OSError(e, f"the arena's copy stopped short: {os.strerror(e)}")
        off = stop
    return True


def _map_over(m: mmap.mmap, size: int, fd: int) -> None:
    """Map ``fd`` shared over the pages of ``m``, at the same address (every view stays valid)."""
    anchor = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(anchor)
    del anchor
    got = _mmap(addr, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
    if got in (None, _MAP_FAILED) or got != addr:
        e = ctypes.get_errno()
        raise OSError(e, f"could not map the arena's copy: {os.strerror(e)}")


def _file_of(fd: int) -> tuple[int, int]:
    """(device, inode) of ``fd``: how a checkpoint's scan of open files knows the arena's memfd."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _mmap_descriptor(fd: int, file: tuple[int, int]) -> int | None:
    """The duplicate of ``fd`` that Python's ``mmap`` keeps for itself (None on 3.13+ with
    ``trackfd=False``, or if there is not exactly one). ``take_copy`` turns it into the child's
    copy: left as it is, it kept the parent's memfd open in every child the program forked."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        other = int(name)
        try:
            if other != fd and _file_of(other) == file:
                found.append(other)
        except OSError:
            pass                        # (the listing's own descriptor, closed since)
    return found[0] if len(found) == 1 else None


class Arena:
    """The shared memory of one program; see the module docstring for the layout rules."""

    def __init__(self, fd: int, size: int, *, create: bool) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.file = _file_of(fd)
        # Only the program's arena is ever copied for a child (the shepherd maps it again).
        self.map_fd = _mmap_descriptor(fd, self.file) if create else None
        self.words = memoryview(self.map).cast("Q")
        self._slot_of: dict[str, int] = {}
        if create:
            self.words[_H_VERSION] = VERSION
            self.words[_H_SIZE] = size
            self._set_counter(_C_NEXT_ID, 1)
            self._set_counter(_C_TOP, _DATA_OFF)
            self._set_counter(_C_HISTORY, 0)
            self.words[_H_START] = struct.unpack("Q", struct.pack("d", time.time()))[0]
            self.words[_H_MAGIC] = MAGIC
        elif self.words[_H_MAGIC] != MAGIC or self.words[_H_SIZE] != size:
            raise ConfigurationError("descriptor does not hold a forkpoint arena")

    def copy(self) -> int:
        """A new memfd holding what this arena holds now (for ``take_copy`` in a forked child).

        Made by the parent just before ``fork()``, in the forking thread, through calls that keep
        the GIL, so that the copy is the memory as it is at the fork; another thread of the
        program can still run between two of the copy's bytecodes and write the arena (a torn
        cache entry then fails its checksum in the child: 1 of 200 forks under a writing thread,
        docs/reliability.md). Copied
        by the child after it (the parent running on), it mixed in what the parent wrote since:
        47 of 50 children saw a value written after their fork, and 96 of 100 held a cache entry
        torn between the parent's writes (a review's scripts, 2026-11-28). Only the pages in use
        are copied (``SEEK_DATA``, ``copy_file_range``): the cost grows with what ``persist()``
        and ``cache()`` hold, not with the arena's size (docs/architecture.md, "Persistent memory").
        """
        fd = os.memfd_create("forkpoint-arena", os.MFD_CLOEXEC)
        into = None
        try:
            os.ftruncate(fd, self.size)         # (these calls let other threads run: not after)
            if _copy_range is None:
                into = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with memoryview(self.map) as view:
                while not _copy_extents(self.fd, fd, min(self.allocated(), self.size), view, into):
                    into = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        finally:
            if into is not None:
                into.close()
        return fd

    def take_copy(self, fd: int) -> None:
        """Make ``fd`` (from ``copy``, made at the fork) this process's arena, at the same address.

        For a child the program forks itself (``os.fork``, ``multiprocessing``, the workers of a
        gunicorn master that loaded the application, a ``persist()`` among it): the child is a
        program of its own. Sharing the arena made its checkpoints and restores part of the
        parent's (ids, jump history), and let the key it processed or the deadline it armed be
        taken for the parent's by the parent's shepherd: a parent rolled back for its child's
        hang. The copy is mapped over the shared mapping (``MAP_FIXED``), so every view the child
        holds keeps working and now shows its own memory, as ordinary memory after a fork; what
        describes the parent's run (checkpoint ids, history, the input being processed, the
        watchdog, the process words) starts afresh.

        The mapping's own duplicate of the parent's descriptor (Python's ``mmap`` keeps one) is
        made a duplicate of the copy under the same number, which the ``mmap`` object still owns:
        left open, it kept the parent's memory allocated for as long as the child lived.
        """
        _map_over(self.map, self.size, fd)
        if self.map_fd is not None:
            os.dup2(fd, self.map_fd, inheritable=False)
        old, self.fd = self.fd, fd
        os.close(old)
        self.file = _file_of(fd)
        w = self.words
        self._set_counter(_C_NEXT_ID, 1)
        self._set_counter(_C_HISTORY, 0)
        w[_PROCESSING_OFF // 8 + 1] = 0
        w[_H_WD_AT] = 0
        w[_H_AL_AT] = 0
        for word in (_H_FACE_PPID, _H_ORPHANS, _H_REAPED, _H_THROTTLE, _H_INTRODUCED, _H_HOLDERS_LOST,
                     *_CPU_WORDS):
            w[word] = 0
        w[_H_START] = struct.unpack("Q", struct.pack("d", time.time()))[0]

    # -- counters kept twice, each with its complement ---------------------------------------------
    def allocated(self) -> int:
        """The allocator's top: it moves whenever a region is made, so a reader that looked for a
        region and did not find it need not look again (a scan of the directory, about 0.3 ms)
        until it has moved."""
        return self._counter(_C_TOP, "allocator")

    def _counter(self, c: tuple[int, int, int, int], what: str) -> int:
        w = self.words
        a, b = int(w[c[0]]), int(w[c[2]])
        ok_a, ok_b = int(w[c[1]]) == a ^ _MASK, int(w[c[3]]) == b ^ _MASK
        if ok_a and ok_b:
            if a != b:                        # a kill between the two copies: the larger is right
                self._set_counter(c, max(a, b))
            return max(a, b)
        if ok_a or ok_b:
            good = a if ok_a else b
            log.error("arena: %s had a damaged copy (a stray write?); repaired from the other", what)
            self._set_counter(c, good)
            return good
        raise CacheCorrupted(f"the arena's {what} is corrupted (both copies): a stray write into the "
                             "persistent memory")

    def _set_counter(self, c: tuple[int, int, int, int], value: int) -> None:
        w = self.words
        w[c[0]] = value
        w[c[1]] = value ^ _MASK
        w[c[2]] = value
        w[c[3]] = value ^ _MASK

    @classmethod
    def create(cls, size: int = DEFAULT_SIZE) -> Arena:
        if not isinstance(size, int) or size < MIN_SIZE:
            raise ConfigurationError(f"arena size must be an int of at least {MIN_SIZE} bytes")
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        hint = f"or make the arena smaller than {size} bytes: forkpoint.configure(arena_size=...)"
        # Made with signals blocked: a handler that raised (Ctrl-C's) as memfd_create returned, before
        # its descriptor was stored, leaked it (the interrupt sweep of the start); one that raises as
        # they come back finds it held, and closed below.
        fd = -1
        old = _sigutil.unset_mask()
        try:
            try:
                _sigutil.block_all_into(old)    # inside the try: see _sigutil.unset_mask
                fd = os.memfd_create("forkpoint-arena", os.MFD_CLOEXEC)
            finally:
                if not old[1][0] & 1:           # filled (_sigutil.restore_blocked), inline: see set_mask_of
                    _sigutil.set_mask_of(old, None)
            os.ftruncate(fd, size)
            return cls(fd, size, create=True)
        except BaseException as e:
            made = fd >= 0
            if made:
                os.close(fd)
            if not isinstance(e, OSError) or isinstance(e, ResourceExhausted):
                raise
            what = (f"could not map the persistent arena of {size} bytes" if made
                    else "could not create the persistent arena (memfd_create)")
            raise resource_error(what, e, hint) from e

    # -- counters -------------------------------------------------------------------------------
    def take_id(self) -> int:
        n = self._counter(_C_NEXT_ID, "checkpoint counter")
        self._set_counter(_C_NEXT_ID, n + 1)
        return n

    @property
    def checkpoints_taken(self) -> int:
        return self._counter(_C_NEXT_ID, "checkpoint counter") - 1

    # -- the key being processed (written by the live process, read by the shepherd) -------------
    def set_processing(self, key: str | None) -> None:
        if key is None:
            self.words[_PROCESSING_OFF // 8 + 1] = 0
            return
        self.set_processing_record(processing_record(key))

    def set_processing_record(self, record: tuple[bytes, int]) -> None:
        """``set_processing`` with the key encoded and checked beforehand (``processing_record``):
        for a key marked at every step of a coroutine."""
        raw, word = record
        w = _PROCESSING_OFF // 8 + 1
        self.words[w] = 0
        self.map[_PROCESSING_OFF + 16:_PROCESSING_OFF + 16 + len(raw)] = raw
        self.words[w] = word                # length and check: one store

    def processing_now(self) -> tuple[bytes, int] | None:
        """The record ``set_processing_record`` wrote, as it is (None: nothing marked): for work
        handed to a thread to be marked with it there (``_threadmarks``). Read by the live process,
        in the thread that wrote it; the shepherd checks it where it reads it."""
        word = int(self.words[_PROCESSING_OFF // 8 + 1])
        n = word & 0xFFFF_FFFF
        if not word or not 0 < n <= _PROCESSING_MAX:
            return None
        return bytes(self.map[_PROCESSING_OFF + 16:_PROCESSING_OFF + 16 + n]), word

    def processing(self) -> str | None:
        word = int(self.words[_PROCESSING_OFF // 8 + 1])
        if word == 0:
            return None
        n = word & 0xFFFF_FFFF
        raw = self.map[_PROCESSING_OFF + 16:_PROCESSING_OFF + 16 + n] if 0 < n <= _PROCESSING_MAX else b""
        if not raw or zlib.crc32(raw, n) != word >> 32:
            log.error("arena: the record of the input being processed is corrupted (a stray write?): "
                      "it is ignored")
            return None
        return raw.decode(errors="replace")

    # -- the deadlines (written by the live process, read by the shepherd) ---------------------------
    def set_watchdog(self, kill_at: float | None, target: int = 0, handled: bool = True) -> None:
        """Record that the shepherd must SIGKILL the live process at ``kill_at`` (CLOCK_MONOTONIC)
        and restore checkpoint ``target`` (0: its current one) as a timeout; None clears it.

        ``handled``: a watchdog's own SIGALRM handler rolls back before that, unless the process
        is stuck in C (the deadline is its last resort); False: nothing else cuts the block, the
        deadline is the timeout itself (a protected call's ``timeout=``).
        """
        if kill_at is None:
            self.words[_H_WD_AT] = 0
            return
        raw = _Q.unpack(_D.pack(kill_at))[0]
        to = target | (0 if handled else _WD_UNHANDLED)
        self.words[_H_WD_AT] = 0
        self.words[_H_WD_TO] = to
        self.words[_H_WD_CHECK] = _wd_check(raw, to)
        self.words[_H_WD_AT] = raw

    def enter_step(self, record: tuple[bytes, int], seconds: float, target: int) -> bool:
        """``set_processing_record(record)`` and, unless ``seconds`` is 0, a deadline ``seconds``
        from now, unhandled (as ``watchdog.Deadline``), in one call: for every request and every
        step of a protected coroutine. False, writing nothing, when an input is being processed
        or a deadline is armed already (the caller then takes the general path, which nests)."""
        words = self.words
        w = _PROCESSING_OFF // 8 + 1
        if words[_H_WD_AT] or words[w]:
            return False
        # Every call before the first write: an interrupt (a handler that raises as a call returns
        # or a function starts) then leaves nothing written; the writes make no calls.
        at = to = check = 0
        if seconds:
            at = _Q.unpack(_D.pack(time.monotonic() + seconds))[0]
            to = target | _WD_UNHANDLED
            check = _wd_check(at, to)
        raw, word = record
        self.map[_PROCESSING_OFF + 16:_PROCESSING_OFF + 16 + len(raw)] = raw
        words[w] = word
        if seconds:
            words[_H_WD_TO] = to
            words[_H_WD_CHECK] = check
            words[_H_WD_AT] = at
        return True

    def count_served(self) -> None:
        """One more input done, in the live process (``served``)."""
        words = self.words
        words[_H_SERVED] = (words[_H_SERVED] + 1) & _MASK

    def served(self) -> int:
        """How many inputs the program's live processes have done: ``policy.RecoveryPolicy.decide``
        starts its count of failures afresh after a failure paid for by as many inputs served."""
        return int(self.words[_H_SERVED])

    def leave_step(self) -> None:
        """Undo ``enter_step``: no deadline, no input being processed."""
        words = self.words
        words[_H_WD_AT] = 0
        words[_PROCESSING_OFF // 8 + 1] = 0

    def watchdog(self) -> tuple[float, int] | None:
        """The deadline ``set_watchdog`` recorded, as (kill_at, target); None if there is none."""
        got = self._deadline(_H_WD_AT, _H_WD_TO, _H_WD_CHECK)
        return None if got is None else got[:2]

    def set_alarm(self, kill_at: float | None, target: int = 0) -> None:
        """Record the ``watchdog()`` blocks' earliest hard deadline (their handler comes first), or
        clear it: ``set_watchdog``'s twin, for the blocks alone."""
        words = self.words
        words[_H_AL_AT] = 0
        if kill_at is None:
            return
        raw = _Q.unpack(_D.pack(kill_at))[0]
        words[_H_AL_TO] = target
        words[_H_AL_CHECK] = _wd_check(raw, target)
        words[_H_AL_AT] = raw

    def deadline(self) -> tuple[float, int, bool] | None:
        """The earliest deadline recorded, of a protected call or step and of the ``watchdog()``
        blocks: (kill_at, target, handled), ``handled`` if it is a block's last resort."""
        got = [d for d in (self._deadline(_H_WD_AT, _H_WD_TO, _H_WD_CHECK),
                           self._deadline(_H_AL_AT, _H_AL_TO, _H_AL_CHECK)) if d is not None]
        return min(got) if got else None

    def clear_deadlines(self) -> None:
        """Forget every deadline (the process they were set by is gone)."""
        self.words[_H_WD_AT] = 0
        self.words[_H_AL_AT] = 0

    def _deadline(self, at: int, to_word: int, check: int) -> tuple[float, int, bool] | None:
        """One deadline record, read by the shepherd while the live process may be rewriting it.

        The writer clears ``at`` first and sets it last, so a record is whole whenever ``at`` is
        set; but a read that began before a rewrite can take the old ``at`` with the new target
        and check. Read again: a rewrite in progress shows as a change, and only a record read
        twice the same and still not matching its check is damaged; one that changes at every
        read is taken as none, this time. (Taken for damage, such reads logged an error now and
        then with blocks entered and left in a loop.)"""
        words = self.words
        for _ in range(4):
            raw = int(words[at])
            if raw == 0:
                return None
            to, got = int(words[to_word]), int(words[check])
            if got == _wd_check(raw, to):
                return _D.unpack(_Q.pack(raw))[0], to & ~_WD_UNHANDLED, not to & _WD_UNHANDLED
            if (int(words[at]), int(words[to_word]), int(words[check])) == (raw, to, got):
                log.error("arena: the armed watchdog's record is corrupted (a stray write?): it is "
                          "ignored")
                return None
        return None     # rewritten at every read: none this time, the next reading will tell

    # -- the process bound (written by the shepherd, read by tsetjmp and keepers) ----------------
    def set_throttle(self, on: bool) -> None:
        """Too many killed processes are still being torn down: take no checkpoint, fork no spare."""
        self.words[_H_THROTTLE] = 1 if on else 0

    def throttled(self) -> bool:
        """A hint only: tsetjmp then asks the shepherd, whose answer is authoritative."""
        return self.words[_H_THROTTLE] != 0

    def holder_lost(self) -> None:
        """A server worker's descriptor holder (``_fdholder``) was killed: each worker looks
        whether it was its own at its next request (a hint, like the throttle word)."""
        self.words[_H_HOLDERS_LOST] += 1

    def holders_lost(self) -> int:
        return int(self.words[_H_HOLDERS_LOST])

    def set_introduced(self, n: int) -> None:
        """The newest checkpoint whose keeper introduced itself (or was given up on)."""
        self.words[_H_INTRODUCED] = n

    def introduced(self) -> int:
        return int(self.words[_H_INTRODUCED])

    # -- what the program sees of its own process (see _identity and _children) -----------------
    def set_face_ppid(self, ppid: int) -> None:
        """The face PID's parent now (written by the original process, then by the shepherd).

        Stored as ``ppid + 1``: a parent of 0 is a real answer (the face's parent is outside its
        PID namespace: a container's init, a process entered with ``nsenter -p``), and the word's
        0 means "not written yet". Stored as itself, a 0 was read as unset and the program was
        given the shepherd instead: 1 as init, its own PID when entered.
        """
        self.words[_H_FACE_PPID] = ppid + 1

    def face_ppid(self) -> int | None:
        """The face PID's parent, or None if none was written."""
        word = int(self.words[_H_FACE_PPID])
        return word - 1 if word else None

    def set_orphans(self, n: int) -> None:
        """How many of the program's children the shepherd holds (written by the shepherd only)."""
        self.words[_H_ORPHANS] = n

    def orphans(self) -> int:
        return int(self.words[_H_ORPHANS])

    def add_cpu(self, user_ns: int, sys_ns: int) -> None:
        """CPU time of the program's that no live process counts any more (written by the original
        process before ``start()``'s fork, then by the shepherd only)."""
        w = self.words
        w[_H_CPU_USER] = (w[_H_CPU_USER] + max(user_ns, 0)) & _MASK
        w[_H_CPU_SYS] = (w[_H_CPU_SYS] + max(sys_ns, 0)) & _MASK

    def cpu_base(self) -> tuple[int, int]:
        return int(self.words[_H_CPU_USER]), int(self.words[_H_CPU_SYS])

    def set_live_cpu(self, pid: int, user_ns: int, sys_ns: int) -> None:
        """The CPU clock of live process ``pid`` when it became live (written by that process; the
        pid last, so that the shepherd never takes another process's clock for this one's)."""
        self.live_cpu_writer(pid, user_ns, sys_ns)()

    def live_cpu_writer(self, pid: int, user_ns: int, sys_ns: int) -> Callable[[], None]:
        """``set_live_cpu(pid, user_ns, sys_ns)``, made ready by a frozen spare and called once it
        is woken: the call then writes no page the spare still shares with its keeper."""
        w = self.words

        def write() -> None:
            w[_H_CPU_LIVE] = 0
            w[_H_CPU_LIVE_USER] = user_ns
            w[_H_CPU_LIVE_SYS] = sys_ns
            w[_H_CPU_LIVE] = pid
        return write

    def live_cpu(self) -> tuple[int, int, int]:
        w = self.words
        return int(w[_H_CPU_LIVE]), int(w[_H_CPU_LIVE_USER]), int(w[_H_CPU_LIVE_SYS])

    def cpu_seen(self) -> memoryview:
        """The words of the highest CPU times answered (user, system, sum), to read and raise."""
        return self.words[_H_CPU_SEEN_USER:_H_CPU_SEEN + 1]

    def note_reaped(self, pid: int, status: int) -> None:
        """Record that the live process reaped child ``pid`` (single writer: the live process).

        A restored process may still hold a ``Popen`` for a child that a rolled-back process
        reaped; the status is kept here so that it never has to guess one.
        """
        seq = int(self.words[_H_REAPED])
        w = (_REAPED_OFF + (seq % _REAPED_CAP) * 16) // 8
        self.words[w] = 0                      # invalid while it is rewritten
        self.words[w + 1] = status & 0xFFFFFFFF
        self.words[w] = pid
        self.words[_H_REAPED] = seq + 1

    def reaped_count(self) -> int:
        """How many children live processes have recorded in all (the ring's sequence number)."""
        return int(self.words[_H_REAPED])

    def reaped_entry(self, pid: int) -> tuple[int, int] | None:
        """The newest record of child ``pid`` in the ring, if any: (its sequence number, the status
        the live process collected)."""
        seq = int(self.words[_H_REAPED])
        for i in range(seq - 1, max(seq - _REAPED_CAP, 0) - 1, -1):
            w = (_REAPED_OFF + (i % _REAPED_CAP) * 16) // 8
            if self.words[w] == pid:
                return i, int(self.words[w + 1])
        return None

    # -- history (single writer: the shepherd) ----------------------------------------------------
    def append_history(self, from_state: int, to_state: int, sig: int, reason: str,
                       key: str | None = None) -> int:
        seq = self._counter(_C_HISTORY, "history counter") + 1
        off = _HIST_OFF + ((seq - 1) % _HIST_CAP) * _HIST_SIZE
        rk = reason.encode()[:64]
        kb = (key or "").encode()[: 80 - len(rk)]
        packed = _HIST_REC.pack(0, time.time(), from_state, to_state, sig,
                                (len(rk) << 16) | (len(kb) + (1 if key is not None else 0)), rk + kb)
        self.map[off:off + _HIST_REC.size] = packed
        # valid once its first word (sequence number and a checksum of the rest) is set
        self.words[off // 8] = seq | zlib.crc32(packed[8:], seq) << 32
        self._set_counter(_C_HISTORY, seq)
        return seq

    def history(self) -> list[HistoryRecord]:
        count = self._counter(_C_HISTORY, "history counter")
        out = []
        for seq in range(max(1, count - _HIST_CAP + 1), count + 1):
            off = _HIST_OFF + ((seq - 1) % _HIST_CAP) * _HIST_SIZE
            rseq, t, fr, to, sig, lens, text = _HIST_REC.unpack_from(self.map, off)
            if rseq & 0xFFFF_FFFF != seq:
                continue                # not written (a kill before its commit), or overwritten
            if rseq >> 32 != zlib.crc32(self.map[off + 8:off + _HIST_SIZE], seq):
                log.error("arena: jump history record %d is corrupted (a stray write?): left out", seq)
                continue
            rl, kl = lens >> 16, lens & 0xFFFF
            key = text[rl:rl + kl - 1].decode(errors="replace") if kl else None
            out.append(HistoryRecord(seq, t, fr, to, sig, text[:rl].decode(errors="replace"), key))
        return out

    # -- directory --------------------------------------------------------------------------------
    def _slot_word(self, slot: int, i: int) -> int:
        return (_DIR_OFF + slot * _SLOT_SIZE) // 8 + i

    def _slot_name(self, slot: int) -> str | None:
        w = self._slot_word(slot, 0)
        if self.words[w] not in (_COMMIT_PERSIST, _COMMIT_CACHE):
            return None
        n = int(self.words[w + 1])
        if not 0 < n <= MAX_NAME:
            return None
        start = (w + 2) * 8
        return self.map[start:start + n].decode(errors="replace")

    def _meta_crc(self, slot: int) -> int:
        w = self._slot_word(slot, 0)
        head = bytes(self.words[w + 1:w + 10]) + bytes(self.words[w + 11:w + 13])
        return zlib.crc32(head) ^ int(self.words[w])

    def _damaged(self, slot: int) -> bool:
        """A slot that is neither free (all zero), nor being created, nor validly committed."""
        w = self._slot_word(slot, 0)
        commit = self.words[w]
        if commit in (_COMMIT_PERSIST, _COMMIT_CACHE):
            return bool(self.words[w + 10] != self._meta_crc(slot))
        if commit == 0:
            return bytes(self.words[w:w + _SLOT_WORDS]) != _ZERO_SLOT
        return commit != _CREATING

    def _legible_name(self, slot: int) -> str:
        w = self._slot_word(slot, 0)
        n = int(self.words[w + 1])
        raw = self.map[(w + 2) * 8:(w + 2) * 8 + n] if 0 < n <= MAX_NAME else b""
        return f"slot {slot}" + (f" ({raw.decode(errors='replace')!r}?)" if raw else "")

    def _find(self, name: str) -> int | None:
        slot = self._slot_of.get(name)
        if slot is not None and self._slot_name(slot) == name:
            return slot
        damaged = []
        for slot in range(_DIR_SLOTS):
            found = self._slot_name(slot)
            if found == name:
                self._slot_of[name] = slot
                return slot
            if self._damaged(slot):
                damaged.append(slot)
        if damaged:   # the entry asked for may be the damaged one: never hand out a fresh region
            raise CacheCorrupted(f"{name!r} not found and the arena's directory is corrupted (a stray "
                                 f"write?): {', '.join(self._legible_name(s) for s in damaged)}")
        return None

    def _alloc(self, size: int, what: str) -> int:
        top = max(self._counter(_C_TOP, "allocator"), _DATA_OFF)
        off = (top + _ALIGN - 1) // _ALIGN * _ALIGN
        if off + size > self.size:
            raise ArenaFull(f"{what}: needs {size} bytes, {max(0, self.size - off)} of the arena's "
                            f"{self.size} are free (forkpoint.configure(arena_size=...))")
        self._set_counter(_C_TOP, off + size)     # bumped before use: a kill leaks, never overlaps
        return off

    def _new_slot(self, name: str, commit: int, off_or_gen: int, size: int) -> int:
        for slot in range(_DIR_SLOTS):
            w = self._slot_word(slot, 0)
            state = self.words[w]
            if not (state == _CREATING or (state == 0 and not self._damaged(slot))):
                continue
            raw = name.encode()
            self.words[w] = _CREATING        # a kill from here on leaves it reusable, never valid
            self.words[w + 1:w + _SLOT_WORDS] = memoryview(bytes(_SLOT_SIZE - 8)).cast("Q")
            self.words[w + 1] = len(raw)
            self.map[(w + 2) * 8:(w + 2) * 8 + len(raw)] = raw
            self.words[w + 11] = off_or_gen
            self.words[w + 12] = size
            if commit == _COMMIT_CACHE:            # generation 0, with its check: nothing stored yet
                self.words[w + _GEN] = _gen_check(slot, 0)
            self.words[w + 10] = zlib.crc32(bytes(self.words[w + 1:w + 10])
                                            + bytes(self.words[w + 11:w + 13])) ^ commit
            self.words[w] = commit          # the slot exists from this store on
            self._slot_of[name] = slot
            return slot
        raise ArenaFull(f"the arena's directory is full ({_DIR_SLOTS} names)")

    def _check_slot(self, slot: int, name: str) -> None:
        w = self._slot_word(slot, 0)
        if self.words[w + 10] != self._meta_crc(slot):
            raise CacheCorrupted(f"the directory entry of {name!r} is corrupted")

    # -- persist ----------------------------------------------------------------------------------
    def persist(self, name: str, size: int) -> memoryview:
        name = _check_name(name)
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if size > self.size - _DATA_OFF:
            raise ArenaFull(f"a region of {size} bytes can never fit in an arena of {self.size} bytes")
        slot = self._find(name)
        if slot is None:
            off = self._alloc(size, f"persist({name!r})")
            slot = self._new_slot(name, _COMMIT_PERSIST, off, size)
        w = self._slot_word(slot, 0)
        self._check_slot(slot, name)
        if self.words[w] != _COMMIT_PERSIST:
            raise RegionMismatch(f"{name!r} is a cache entry, not a persistent region")
        off, have = int(self.words[w + 11]), int(self.words[w + 12])
        if have != size:
            raise RegionMismatch(f"persistent region {name!r} has {have} bytes, not {size}")
        return memoryview(self.map)[off:off + size]

    # -- cache ------------------------------------------------------------------------------------
    def _generation(self, slot: int, name: str) -> int:
        """The cache entry's generation (0: nothing stored yet), its own checksum verified."""
        word = int(self.words[self._slot_word(slot, _GEN)])
        gen = word >> 32
        if word & 0xFFFF_FFFF != _gen_check(slot, gen):     # never 0: set when the slot is made
            raise CacheCorrupted(f"cache entry {name!r}: its generation word is corrupted (a stray "
                                 "write?): which copy is current is unknown")
        return gen

    def cache_in(self, name: str, data: Any) -> None:
        name = _check_name(name)
        if isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data)
            body = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
            tag = _TAG_BYTES
        else:
            # Only the program caches (forkpoint.persist imports pickle with the package, so this is a
            # lookup there); the shepherd never does, and starts 2 ms sooner without pickle.
            import pickle  # noqa: PLC0415
            tag, body = _TAG_PICKLE, memoryview(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
        size = 1 + body.nbytes
        slot = self._find(name)
        if slot is None:
            slot = self._new_slot(name, _COMMIT_CACHE, 0, 0)
        self._check_slot(slot, name)
        w = self._slot_word(slot, 0)
        if self.words[w] != _COMMIT_CACHE:
            raise RegionMismatch(f"{name!r} is a persistent region, not a cache entry")
        gen = self._generation(slot, name)
        which = (gen + 1) & 1
        b = w + 13 + 4 * which               # the inactive buffer
        off, cap = int(self.words[b]), int(self.words[b + 1])
        placed = int(self.words[w + _PLACED + which]) == _placement_check(slot, which, off, cap) and cap
        if not placed or cap < size or off < _DATA_OFF or off + cap > self.size:
            if cap and not placed:           # its placement words were damaged: never write there
                log.error("arena: cache entry %r: a buffer's placement is corrupted (a stray write?); "
                          "a new one is allocated", name)
                cap = 0
            cap = max(size, 2 * min(cap, self.size))
            if _DATA_OFF + cap > self.size:
                cap = size
            off = self._alloc(cap, f"cache(IN, {name!r})")
            # Its check computed first: between these stores no handler can run (a Ctrl-C's would
            # have made the placement look damaged at the next store), only a kill can land.
            placement = _placement_check(slot, which, off, cap)
            self.words[b + 1] = 0
            self.words[b] = off
            self.words[b + 1] = cap
            self.words[w + _PLACED + which] = placement
        self.map[off:off + 1] = tag
        self.map[off + 1:off + size] = body            # one copy, straight into the arena
        self.words[b + 2] = size
        self.words[b + 3] = _buffer_check(off, cap, size, zlib.crc32(body, zlib.crc32(tag)))
        nxt = gen + 1
        self.words[w + _GEN] = nxt << 32 | _gen_check(slot, nxt)   # commit: OUT reads this buffer now

    def cache_out(self, name: str) -> Any:
        name = _check_name(name)
        slot = self._find(name)
        if slot is None:
            raise KeyError(name)
        self._check_slot(slot, name)
        w = self._slot_word(slot, 0)
        if self.words[w] != _COMMIT_CACHE:
            raise RegionMismatch(f"{name!r} is a persistent region, not a cache entry")
        gen = self._generation(slot, name)
        if gen == 0:
            raise KeyError(name)
        b = w + 13 + 4 * (gen & 1)
        off, cap, n, crc = (int(x) for x in self.words[b:b + 4])
        if not (_DATA_OFF <= off and n <= cap and off + cap <= self.size and n >= 1):
            raise CacheCorrupted(f"cache entry {name!r} points outside the arena")
        payload = memoryview(self.map)[off:off + n]      # checked in place, copied once
        try:
            if _buffer_check(off, cap, n, zlib.crc32(payload)) != crc:
                raise CacheCorrupted(f"cache entry {name!r} failed its checksum")
            tag, body = payload[:1].tobytes(), payload[1:]
            if tag == _TAG_BYTES:
                return body.tobytes()
            if tag == _TAG_PICKLE:
                import pickle  # noqa: PLC0415 - see cache_in
                return pickle.loads(body)
        finally:
            payload.release()
        raise CacheCorrupted(f"cache entry {name!r} has an unknown type tag")

    def names(self) -> list[str]:
        return [n for n in (self._slot_name(s) for s in range(_DIR_SLOTS)) if n is not None]


# ---- the quarantine tables (``_qtable``): regions of the arena, found by name ---------------------------
QUARANTINE_SIZE = 1024          # keys kept; the oldest is released when a new one does not fit
QUARANTINE_REGION = "forkpoint:quarantine"           # the program's own quarantine
MIRROR_REGION = "forkpoint:quarantine-mirror"        # the shepherd's copy of a Redis store


def find_region(arena: Arena, name: str, size: int) -> memoryview | None:
    """Region ``name`` of ``size`` bytes if it exists; never allocates (a reader's and the
    shepherd's way in: only the live process, or a process with no live process beside it, may
    allocate)."""
    slot = arena._find(name)
    if slot is None:
        return None
    return arena.persist(name, size)
