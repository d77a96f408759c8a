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
shepherd writes the history (and quarantine) only while no live process runs program code.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import pickle
import struct
import time
import zlib
from typing import Any, NamedTuple

from ._errors import (
    ArenaFull,
    CacheCorrupted,
    ConfigurationError,
    ForkpointError,
    RegionMismatch,
    resource_error,
)

log = logging.getLogger("forkpoint")

MAGIC = 0x31544B50464B5246  # "FRKFPKT1"
VERSION = 1
DEFAULT_SIZE = 256 << 20
MIN_SIZE = 1 << 20
MAX_NAME = 64

# Header words (8 bytes each) at offset 0.
(_H_MAGIC, _H_VERSION, _H_SIZE, _H_NEXT_ID, _H_TOP, _H_HISTORY, _H_START, _H_WD_AT, _H_WD_TO,
 _H_FACE_PPID, _H_ORPHANS, _H_REAPED, _H_THROTTLE, _H_INTRODUCED) = range(14)
_PROCESSING_OFF = 512          # generation word, length word, then up to 256 bytes of key
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
_HIST_REC = struct.Struct("=Qdqqqq80s")  # seq, time, from, to, sig, kind+key-length, reason/key
_HIST_SIZE = 128

_DIR_OFF = _HIST_OFF + _HIST_CAP * _HIST_SIZE
_DIR_SLOTS = 512
_SLOT_WORDS = 24
_SLOT_SIZE = _SLOT_WORDS * 8
_DATA_OFF = _DIR_OFF + _DIR_SLOTS * _SLOT_SIZE
# Slot words: 0 commit, 1 name length, 2..9 name, 10 checksum of words 0..9 and 11..12, 11 offset and
# 12 size (persist), 13..16 and 17..20 the two cache buffers (off, cap, len, crc), 21 cache generation.
_GEN = 21
_COMMIT_PERSIST = 0x5053_0000_0000_0001
_COMMIT_CACHE = 0x4341_0000_0000_0002
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


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a region name must be a str, not {type(name).__name__}")
    raw = name.encode()
    if not raw or len(raw) > MAX_NAME:
        raise ValueError(f"a region name must be 1 to {MAX_NAME} bytes of UTF-8, got {len(raw)}")
    return name


class Arena:
    """The shared memory of one program; see the module docstring for the layout rules."""

    def __init__(self, fd: int, size: int, *, create: bool) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self.map).cast("Q")
        self._slot_of: dict[str, int] = {}
        if create:
            self.words[_H_VERSION] = VERSION
            self.words[_H_SIZE] = size
            self.words[_H_NEXT_ID] = 1
            self.words[_H_TOP] = _DATA_OFF
            self.words[_H_START] = struct.unpack("Q", struct.pack("d", time.time()))[0]
            self.words[_H_MAGIC] = MAGIC
        elif self.words[_H_MAGIC] != MAGIC or self.words[_H_SIZE] != size:
            raise ConfigurationError("descriptor does not hold a forkpoint arena")

    @classmethod
    def create(cls, size: int = DEFAULT_SIZE) -> Arena:
        if not isinstance(size, int) or size < MIN_SIZE:
            raise ConfigurationError(f"arena size must be an int of at least {MIN_SIZE} bytes")
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        hint = f"or make the arena smaller than {size} bytes: forkpoint.configure(arena_size=...)"
        try:
            fd = os.memfd_create("forkpoint-arena", os.MFD_CLOEXEC)
        except OSError as e:
            raise resource_error("could not create the persistent arena (memfd_create)", e, hint) from e
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, create=True)
        except OSError as e:
            os.close(fd)
            raise resource_error(f"could not map the persistent arena of {size} bytes", e, hint) from e
        except BaseException:
            os.close(fd)
            raise

    # -- counters -------------------------------------------------------------------------------
    def take_id(self) -> int:
        n = int(self.words[_H_NEXT_ID])
        self.words[_H_NEXT_ID] = n + 1
        return n

    @property
    def checkpoints_taken(self) -> int:
        return int(self.words[_H_NEXT_ID]) - 1

    # -- the key being processed (written by the live process, read by the shepherd) -------------
    def set_processing(self, key: str | None) -> None:
        w = _PROCESSING_OFF // 8
        if key is None:
            self.words[w + 1] = 0
            return
        raw = key.encode()[:_PROCESSING_MAX]
        self.words[w + 1] = 0
        self.map[_PROCESSING_OFF + 16:_PROCESSING_OFF + 16 + len(raw)] = raw
        self.words[w + 1] = len(raw)

    def processing(self) -> str | None:
        n = int(self.words[_PROCESSING_OFF // 8 + 1])
        if n == 0 or n > _PROCESSING_MAX:
            return None
        return self.map[_PROCESSING_OFF + 16:_PROCESSING_OFF + 16 + n].decode(errors="replace")

    # -- the armed watchdog's hard deadline (written by the live process, read by the shepherd) ---
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
        self.words[_H_WD_TO] = target | (0 if handled else _WD_UNHANDLED)
        self.words[_H_WD_AT] = _Q.unpack(_D.pack(kill_at))[0]

    def watchdog(self) -> tuple[float, int] | None:
        raw = int(self.words[_H_WD_AT])
        if raw == 0:
            return None
        return _D.unpack(_Q.pack(raw))[0], int(self.words[_H_WD_TO]) & ~_WD_UNHANDLED

    def watchdog_handled(self) -> bool:
        """Whether the recorded deadline is a watchdog's last resort (see ``set_watchdog``)."""
        return not int(self.words[_H_WD_TO]) & _WD_UNHANDLED

    # -- the process bound (written by the shepherd, read by tsetjmp and keepers) ----------------
    def set_throttle(self, on: bool) -> None:
        """Too many killed processes are still being torn down: take no checkpoint, fork no spare."""
        self.words[_H_THROTTLE] = 1 if on else 0

    def throttled(self) -> bool:
        """A hint only: tsetjmp then asks the shepherd, whose answer is authoritative."""
        return self.words[_H_THROTTLE] != 0

    def set_introduced(self, n: int) -> None:
        """The newest checkpoint whose keeper introduced itself (or was given up on)."""
        self.words[_H_INTRODUCED] = n

    def introduced(self) -> int:
        return int(self.words[_H_INTRODUCED])

    # -- what the program sees of its own process (see _identity and _children) -----------------
    def set_face_ppid(self, ppid: int) -> None:
        """The face PID's parent now (written by the original process, then by the shepherd)."""
        self.words[_H_FACE_PPID] = ppid

    def face_ppid(self) -> int:
        return int(self.words[_H_FACE_PPID])

    def set_orphans(self, n: int) -> None:
        """How many of the program's children the shepherd holds (written by the shepherd only)."""
        self.words[_H_ORPHANS] = n

    def orphans(self) -> int:
        return int(self.words[_H_ORPHANS])

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

    def reaped(self, pid: int) -> int | None:
        """The status the live process collected for child ``pid`` most recently, if any."""
        seq = int(self.words[_H_REAPED])
        for i in range(seq - 1, max(seq - _REAPED_CAP, 0) - 1, -1):
            w = (_REAPED_OFF + (i % _REAPED_CAP) * 16) // 8
            if self.words[w] == pid:
                return int(self.words[w + 1])
        return None

    # -- history (single writer: the shepherd) ----------------------------------------------------
    def append_history(self, from_state: int, to_state: int, sig: int, reason: str,
                       key: str | None = None) -> int:
        seq = int(self.words[_H_HISTORY]) + 1
        off = _HIST_OFF + ((seq - 1) % _HIST_CAP) * _HIST_SIZE
        rk = reason.encode()[:64]
        kb = (key or "").encode()[: 80 - len(rk)]
        packed = _HIST_REC.pack(0, time.time(), from_state, to_state, sig,
                                (len(rk) << 16) | (len(kb) + (1 if key is not None else 0)), rk + kb)
        self.map[off:off + _HIST_REC.size] = packed
        self.words[off // 8] = seq            # the record is valid once its sequence number is set
        self.words[_H_HISTORY] = seq
        return seq

    def history(self) -> list[HistoryRecord]:
        count = int(self.words[_H_HISTORY])
        out = []
        for seq in range(max(1, count - _HIST_CAP + 1), count + 1):
            off = _HIST_OFF + ((seq - 1) % _HIST_CAP) * _HIST_SIZE
            rseq, t, fr, to, sig, lens, text = _HIST_REC.unpack_from(self.map, off)
            if rseq != seq:
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
            if found is not None and self.words[self._slot_word(slot, 10)] != self._meta_crc(slot):
                damaged.append(slot)
        if damaged:   # the entry asked for may be the damaged one: never hand out a fresh region
            raise CacheCorrupted(f"{name!r} not found and directory slot(s) {damaged} are corrupted")
        return None

    def _alloc(self, size: int, what: str) -> int:
        top = max(int(self.words[_H_TOP]), _DATA_OFF)    # never below the data area, even if damaged
        off = (top + _ALIGN - 1) // _ALIGN * _ALIGN
        if off + size > self.size:
            raise ArenaFull(f"{what}: needs {size} bytes, {max(0, self.size - off)} of the arena's "
                            f"{self.size} are free (forkpoint.configure(arena_size=...))")
        self.words[_H_TOP] = off + size     # bumped before use: a kill leaks, never overlaps
        return off

    def _new_slot(self, name: str, commit: int, off_or_gen: int, size: int) -> int:
        for slot in range(_DIR_SLOTS):
            w = self._slot_word(slot, 0)
            if self.words[w] in (_COMMIT_PERSIST, _COMMIT_CACHE):
                continue
            raw = name.encode()
            self.words[w:w + _SLOT_WORDS] = memoryview(bytes(_SLOT_SIZE)).cast("Q")
            self.words[w + 1] = len(raw)
            self.map[(w + 2) * 8:(w + 2) * 8 + len(raw)] = raw
            self.words[w + 11] = off_or_gen
            self.words[w + 12] = size
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
    def cache_in(self, name: str, data: Any) -> None:
        name = _check_name(name)
        if isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data)
            body = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
            tag = _TAG_BYTES
        else:
            tag, body = _TAG_PICKLE, memoryview(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
        size = 1 + body.nbytes
        slot = self._find(name)
        if slot is None:
            slot = self._new_slot(name, _COMMIT_CACHE, 0, 0)
        self._check_slot(slot, name)
        w = self._slot_word(slot, 0)
        if self.words[w] != _COMMIT_CACHE:
            raise RegionMismatch(f"{name!r} is a persistent region, not a cache entry")
        gen = int(self.words[w + _GEN])
        b = w + 13 + 4 * ((gen + 1) & 1)     # the inactive buffer
        off, cap = int(self.words[b]), int(self.words[b + 1])
        if cap < size or off < _DATA_OFF or off + cap > self.size:   # too small, or its words damaged
            cap = max(size, 2 * min(cap, self.size))
            if _DATA_OFF + cap > self.size:
                cap = size
            off = self._alloc(cap, f"cache(IN, {name!r})")
            self.words[b + 1] = 0
            self.words[b] = off
            self.words[b + 1] = cap
        off = int(self.words[b])
        self.map[off:off + 1] = tag
        self.map[off + 1:off + size] = body            # one copy, straight into the arena
        self.words[b + 2] = size
        self.words[b + 3] = zlib.crc32(body, zlib.crc32(tag)) ^ ((size & 0xFFFFFFFF) << 32)
        self.words[w + _GEN] = gen + 1      # commit: OUT reads this buffer from now on

    def cache_out(self, name: str) -> Any:
        name = _check_name(name)
        slot = self._find(name)
        if slot is None:
            raise KeyError(name)
        self._check_slot(slot, name)
        w = self._slot_word(slot, 0)
        if self.words[w] != _COMMIT_CACHE:
            raise RegionMismatch(f"{name!r} is a persistent region, not a cache entry")
        gen = int(self.words[w + _GEN])
        if gen == 0:
            raise KeyError(name)
        b = w + 13 + 4 * (gen & 1)
        off, cap, n, crc = (int(x) for x in self.words[b:b + 4])
        if not (_DATA_OFF <= off and n <= cap and off + cap <= self.size and n >= 1):
            raise CacheCorrupted(f"cache entry {name!r} points outside the arena")
        payload = memoryview(self.map)[off:off + n]      # checked in place, copied once
        try:
            if zlib.crc32(payload) ^ ((n & 0xFFFFFFFF) << 32) != crc:
                raise CacheCorrupted(f"cache entry {name!r} failed its checksum")
            tag, body = payload[:1].tobytes(), payload[1:]
            if tag == _TAG_BYTES:
                return body.tobytes()
            if tag == _TAG_PICKLE:
                return pickle.loads(body)
        finally:
            payload.release()
        raise CacheCorrupted(f"cache entry {name!r} has an unknown type tag")

    def generation_word(self, name: str) -> int | None:
        """The index in ``words`` of cache entry ``name``'s commit counter, or None if there is no
        such entry. The counter changes with every ``cache_in``, and a slot never moves, so a
        reader can keep what it decoded from the entry until that one word changes."""
        slot = self._find(name)
        if slot is None:
            return None
        return self._slot_word(slot, _GEN)

    def names(self) -> list[str]:
        return [n for n in (self._slot_name(s) for s in range(_DIR_SLOTS)) if n is not None]


# ---- the quarantine store: a cache entry holding the quarantined keys, oldest first -----------------
QUARANTINE_ENTRY = "forkpoint:quarantine"
QUARANTINE_SIZE = 1024          # keys kept; the oldest is released when a new one does not fit


def load_quarantine(arena: Arena) -> list[str]:
    try:
        keys = json.loads(arena.cache_out(QUARANTINE_ENTRY))
    except KeyError:
        return []
    except (ForkpointError, ValueError, TypeError) as e:
        # A damaged quarantine must not take the program (or the shepherd) down: start afresh.
        log.error("the quarantine store is unreadable (%s); it is reset", e)
        return []
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def add_quarantine(arena: Arena, key: str, size: int = QUARANTINE_SIZE) -> list[str]:
    """Add ``key``; when full, the oldest key is released (and logged). Returns the evicted keys."""
    keys = [k for k in load_quarantine(arena) if k != key]
    keys.append(key)
    evicted = keys[:-size] if len(keys) > size else []
    if evicted:
        log.warning("quarantine full (%d keys): released the oldest %s", size, evicted)
    arena.cache_in(QUARANTINE_ENTRY, json.dumps(keys[-size:]).encode())
    return evicted


def remove_quarantine(arena: Arena, key: str) -> bool:
    """Take ``key`` out of quarantine; returns whether it was there."""
    keys = load_quarantine(arena)
    if key not in keys:
        return False
    keys.remove(key)
    arena.cache_in(QUARANTINE_ENTRY, json.dumps(keys).encode())
    return True
