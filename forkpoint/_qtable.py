"""The quarantine table: quarantined key digests that a reader checks without a lock.

One format serves three places: the program's own quarantine in its arena (``process`` scope, and
the keys a shared store could not take yet), the shepherd's mirror of a Redis store in the arena,
and the host store (a 0600 file, ``_qhost``). A reader (the live process, on every request) reads
one generation word; while it is unchanged, the parsed copy it already has is the table. Writers
are serialised by their owner (the shepherd, or ``flock`` on the host file) and follow a seqlock:
the generation is odd while a write is under way and even once it is committed.

Every word is checked. Each slot and each record carries a CRC; the header carries a CRC over its
layout; a slot count or a ring position out of range is a corruption. A reader never trusts a torn
read: it takes the union of its last good copy and what it reads while a writer is at work. A
writer finding an odd generation (its predecessor died mid-write) or a bad header rebuilds the table
from the entries that pass their checks, and says what it dropped.

Layout (native byte order; 8-byte words)::

    header (512 bytes): magic, generation, slot capacity, failure ring capacity, release ring
                        capacity, flags (1: key texts), slots used, failures written, releases
                        written, header CRC, label length, the service's hashing key, label
                        (the service)
    slots   (capacity x 64): digest, since, expires (0: never), failures, signal, worker pid,
                             flags, text length, text CRC, CRC, marker
    texts   (capacity x 256, only with key texts): the key of the slot with the same index
    failures (ring x 128): seq, time, digest, worker pid, signal, host, reason, CRC
    releases (ring x 128): seq, time, digest, pid, uid, who, CRC
"""
from __future__ import annotations

import os
import struct
import time
import zlib
from typing import Protocol

from ._record import Record
from .arena import QUARANTINE_SIZE, Arena, find_region

MAGIC = 0x314C4254515046  # "FPQTBL1"
HEADER = 512
SKEY_OFF = 96                  # 32 bytes: the service's hashing key (host stores; see _qkeys)
LABEL_OFF = 128
LABEL_MAX = HEADER - LABEL_OFF
(_W_MAGIC, _W_GEN, _W_QCAP, _W_FCAP, _W_RCAP, _W_FLAGS, _W_COUNT, _W_FSEQ, _W_RSEQ, _W_CRC,
 _W_LABEL) = range(11)
GEN_WORD = _W_GEN                               # odd while a writer is at work (see Reader)
_F_TEXT = 1

SLOT = struct.Struct("=16sddIIIIHHI")          # 56 bytes, then CRC and marker
SLOT_SIZE = 64
SLOT_MARK = 0x534C5146                          # "FQLS"
TEXT_SIZE = 256
FAIL = struct.Struct("=Qd16sIIi32s48s")         # 124 bytes, then CRC
REL = struct.Struct("=Qd16sII64s20s")           # 124 bytes, then CRC
REC_SIZE = 128
HOST_MAX = 32
REASON_MAX = 48
BY_MAX = 64


class TableCorrupted(Exception):
    """The table's header does not describe a table of this layout."""


class Entry(Record):
    __slots__ = ("digest", "since", "expires", "failures", "sig", "pid", "key")

    def __init__(self, digest: bytes, since: float, expires: float = 0.0, failures: int = 0, sig: int = 0,
                 pid: int = 0, key: str | None = None) -> None:
        self.digest = digest
        self.since = since
        self.expires = expires        # wall-clock time; 0: until released
        self.failures = failures
        self.sig = sig
        self.pid = pid
        self.key = key

    def live(self, now: float) -> bool:
        return not self.expires or self.expires > now


class Failure(Record):
    __slots__ = ("t", "digest", "pid", "sig", "host", "reason")

    def __init__(self, t: float, digest: bytes, pid: int, sig: int, host: str, reason: str) -> None:
        self.t = t
        self.digest = digest
        self.pid = pid
        self.sig = sig
        self.host = host
        self.reason = reason


class Release(Record):
    __slots__ = ("t", "digest", "pid", "uid", "by")

    def __init__(self, t: float, digest: bytes, pid: int, uid: int, by: str) -> None:
        self.t = t
        self.digest = digest
        self.pid = pid
        self.uid = uid
        self.by = by


class Backing(Protocol):
    def read(self, off: int, n: int) -> bytes: ...
    def write(self, off: int, data: bytes) -> None: ...
    def word(self, i: int) -> int: ...
    def set_word(self, i: int, v: int) -> None: ...


class MemBacking:
    """A table in memory shared by the program's processes (an arena region)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.words = view.cast("Q")

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.view[off:off + n])

    def write(self, off: int, data: bytes) -> None:
        self.view[off:off + len(data)] = data

    def word(self, i: int) -> int:
        return int(self.words[i])

    def set_word(self, i: int, v: int) -> None:
        self.words[i] = v & 0xFFFF_FFFF_FFFF_FFFF


_WORD = struct.Struct("=Q")


class FileBacking:
    """A table in a file, read with pread: a truncated file is an error, never a SIGBUS."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, off: int, n: int) -> bytes:
        data = os.pread(self.fd, n, off)
        if len(data) != n:
            raise TableCorrupted(f"short read: {len(data)} of {n} bytes at {off} (the file was truncated)")
        return data

    def write(self, off: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, off)
            view, off = view[n:], off + n

    def word(self, i: int) -> int:
        data = os.pread(self.fd, 8, i * 8)
        if len(data) != 8:
            raise TableCorrupted("short read of a header word (the file was truncated)")
        return int(_WORD.unpack(data)[0])

    def set_word(self, i: int, v: int) -> None:
        self.write(i * 8, _WORD.pack(v & 0xFFFF_FFFF_FFFF_FFFF))


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _fit(text: str, n: int) -> bytes:
    raw = text.encode()[:n]
    while raw:                           # never cut a UTF-8 sequence in half
        try:
            raw.decode()
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return raw


class Table:
    """One quarantine table over a backing; see the module docstring."""

    def __init__(self, backing: Backing, q_cap: int, f_cap: int, r_cap: int, text: bool) -> None:
        self.b = backing
        self.q_cap, self.f_cap, self.r_cap, self.text = q_cap, f_cap, r_cap, text
        self.text_off = HEADER + q_cap * SLOT_SIZE
        self.fail_off = self.text_off + (q_cap * TEXT_SIZE if text else 0)
        self.rel_off = self.fail_off + f_cap * REC_SIZE
        self.size = self.rel_off + r_cap * REC_SIZE

    @staticmethod
    def size_of(q_cap: int, f_cap: int, r_cap: int, text: bool) -> int:
        return HEADER + q_cap * SLOT_SIZE + (q_cap * TEXT_SIZE if text else 0) + (f_cap + r_cap) * REC_SIZE

    # -- the header ---------------------------------------------------------------------------------
    def _layout(self) -> tuple[int, ...]:
        return (MAGIC, self.q_cap, self.f_cap, self.r_cap, _F_TEXT if self.text else 0)

    def _header_crc(self, rest: bytes) -> int:
        return zlib.crc32(struct.pack("=5Q", *self._layout()) + rest)

    def label(self) -> str:
        n = self.b.word(_W_LABEL)
        return self.b.read(LABEL_OFF, n).decode(errors="replace") if 0 < n <= LABEL_MAX else ""

    def check_header(self) -> None:
        """Raise TableCorrupted unless the header describes this table and its CRC holds."""
        head = self.b.read(0, HEADER)
        w = struct.unpack_from("=11Q", head)
        if w[_W_MAGIC] != MAGIC:
            raise TableCorrupted("not a quarantine table (bad magic)")
        if (w[_W_QCAP], w[_W_FCAP], w[_W_RCAP], w[_W_FLAGS]) != self._layout()[1:]:
            raise TableCorrupted("the table's layout is not this version's")
        n = w[_W_LABEL]
        if n > LABEL_MAX:
            raise TableCorrupted("bad label length")
        if w[_W_CRC] != self._header_crc(head[SKEY_OFF:LABEL_OFF + n]):
            raise TableCorrupted("the header failed its checksum")
        if w[_W_COUNT] > self.q_cap:
            raise TableCorrupted(f"slot count {w[_W_COUNT]} beyond the capacity {self.q_cap}")

    def skey(self) -> bytes:
        return self.b.read(SKEY_OFF, 32)

    def format(self, label: str, skey: bytes = b"", zeroed: bool = False) -> None:
        """Make an empty table (the caller writes alone). The generation keeps growing.

        ``zeroed``: the backing is known to hold zeros (a new arena region): writing them again
        would make every page of the table resident, in the program and in each copy of its arena.
        """
        gen = self.b.word(_W_GEN) | 1
        self.b.set_word(_W_GEN, gen)                         # odd: readers keep their copy
        self.b.set_word(_W_MAGIC, 0)
        if not zeroed:
            self.b.write(8 * 2, bytes(HEADER - 16))
            zero = bytes(1 << 16)
            for off in range(HEADER, self.size, len(zero)):
                self.b.write(off, zero[:min(len(zero), self.size - off)])
        raw = _fit(label, LABEL_MAX)
        for i, v in zip((_W_QCAP, _W_FCAP, _W_RCAP, _W_FLAGS), self._layout()[1:], strict=True):
            self.b.set_word(i, v)
        key = skey[:32].ljust(32, b"\0")
        self.b.write(SKEY_OFF, key)
        self.b.write(LABEL_OFF, raw)
        self.b.set_word(_W_LABEL, len(raw))
        self.b.set_word(_W_CRC, self._header_crc(key + raw))
        self.b.set_word(_W_MAGIC, MAGIC)
        self.b.set_word(_W_GEN, gen + 1)

    def generation(self) -> int:
        return self.b.word(_W_GEN)

    # -- slots --------------------------------------------------------------------------------------
    def _parse(self, raw: bytes, texts: bytes | None, i: int) -> Entry | None:
        body = raw[:SLOT.size]
        crc, mark = struct.unpack_from("=II", raw, SLOT.size)
        if mark != SLOT_MARK or crc != zlib.crc32(body):
            return None
        dg, since, expires, failures, sig, pid, _flags, tlen, _r, tcrc = SLOT.unpack(body)
        key = None
        if texts is not None and 0 < tlen <= TEXT_SIZE:
            t = texts[i * TEXT_SIZE:i * TEXT_SIZE + tlen]
            if zlib.crc32(t) == tcrc:
                key = t.decode(errors="replace")
        return Entry(dg, since, expires, failures, sig, pid, key)

    def read_entries(self, count: int | None = None) -> tuple[list[Entry], int]:
        """The entries that pass their checks, in slot order, and how many did not."""
        if count is None:
            count = self.b.word(_W_COUNT)
        if count > self.q_cap:
            raise TableCorrupted(f"slot count {count} beyond the capacity {self.q_cap}")
        if count == 0:
            return [], 0
        raw = self.b.read(HEADER, count * SLOT_SIZE)
        texts = self.b.read(self.text_off, count * TEXT_SIZE) if self.text else None
        out, bad = [], 0
        for i in range(count):
            e = self._parse(raw[i * SLOT_SIZE:(i + 1) * SLOT_SIZE], texts, i)
            if e is None:
                bad += 1
            else:
                out.append(e)
        return out, bad

    def snapshot(self) -> tuple[int, int, list[Entry]]:
        """A lock-free read: (generation before, generation after, entries). The entries are
        consistent when both generations are equal and even."""
        g1 = self.b.word(_W_GEN)
        entries, _ = self.read_entries()
        g2 = self.b.word(_W_GEN)
        return g1, g2, entries

    # -- writing (one writer at a time: the caller serialises) ---------------------------------------
    def begin(self, label: str, skey: bytes = b"") -> list[str]:
        """Start a write; rebuild first if the table is damaged. Returns what was found wrong."""
        problems: list[str] = []
        try:
            self.check_header()
        except TableCorrupted as e:
            problems.append(f"{e}: rebuilt empty")
            self.format(label, skey)
        gen = self.b.word(_W_GEN)
        if gen & 1:
            problems.append("a write was interrupted")
        self.b.set_word(_W_GEN, gen | 1)          # odd: readers keep their copy until commit
        entries, bad = self.read_entries()
        if bad:
            problems.append(f"{bad} damaged entr{'y' if bad == 1 else 'ies'} dropped")
            self.store(entries)
        return problems

    def commit(self) -> None:
        gen = self.b.word(_W_GEN)
        self.b.set_word(_W_GEN, (gen | 1) + 1)

    def store(self, entries: list[Entry]) -> None:
        """Write ``entries`` as the whole table (inside begin/commit)."""
        entries = entries[:self.q_cap]
        slots = bytearray(len(entries) * SLOT_SIZE)
        texts = bytearray(len(entries) * TEXT_SIZE) if self.text else None
        for i, e in enumerate(entries):
            tlen = tcrc = 0
            if texts is not None and e.key:
                t = _fit(e.key, TEXT_SIZE)
                texts[i * TEXT_SIZE:i * TEXT_SIZE + len(t)] = t
                tlen, tcrc = len(t), zlib.crc32(t)
            body = SLOT.pack(e.digest, e.since, e.expires, min(e.failures, 0xFFFFFFFF), e.sig & 0xFFFFFFFF,
                             e.pid & 0xFFFFFFFF, 1, tlen, 0, tcrc)
            slots[i * SLOT_SIZE:(i + 1) * SLOT_SIZE] = body + struct.pack("=II", zlib.crc32(body), SLOT_MARK)
        old = min(self.b.word(_W_COUNT), self.q_cap)
        if texts is not None and texts:
            self.b.write(self.text_off, bytes(texts))
        if slots:
            self.b.write(HEADER, bytes(slots))
        if old > len(entries):
            self.b.write(HEADER + len(entries) * SLOT_SIZE, bytes((old - len(entries)) * SLOT_SIZE))
        self.b.set_word(_W_COUNT, len(entries))

    # -- the failure and release rings -----------------------------------------------------------------
    def add_failure(self, f: Failure) -> None:
        if not self.f_cap:
            return
        seq = self.b.word(_W_FSEQ) + 1
        body = FAIL.pack(seq, f.t, f.digest, f.pid & 0xFFFFFFFF, f.sig & 0xFFFFFFFF, 0,
                         _fit(f.host, HOST_MAX), _fit(f.reason, REASON_MAX))
        self.b.write(self.fail_off + ((seq - 1) % self.f_cap) * REC_SIZE,
                     body + struct.pack("=I", zlib.crc32(body)))
        self.b.set_word(_W_FSEQ, seq)

    def failures(self) -> list[Failure]:
        """The failures recorded, oldest first (damaged records are skipped)."""
        if not self.f_cap:
            return []
        seq = self.b.word(_W_FSEQ)
        raw = self.b.read(self.fail_off, self.f_cap * REC_SIZE)
        out = []
        for s in range(max(1, seq - self.f_cap + 1), seq + 1):
            off = ((s - 1) % self.f_cap) * REC_SIZE
            body = raw[off:off + FAIL.size]
            if struct.unpack_from("=I", raw, off + FAIL.size)[0] != zlib.crc32(body):
                continue
            rseq, t, dg, pid, sig, _r, host, reason = FAIL.unpack(body)
            if rseq == s:
                out.append(Failure(t, dg, pid, sig, _text(host), _text(reason)))
        return out

    def add_release(self, r: Release) -> None:
        if not self.r_cap:
            return
        seq = self.b.word(_W_RSEQ) + 1
        body = REL.pack(seq, r.t, r.digest, r.pid & 0xFFFFFFFF, r.uid & 0xFFFFFFFF, _fit(r.by, BY_MAX), b"")
        self.b.write(self.rel_off + ((seq - 1) % self.r_cap) * REC_SIZE,
                     body + struct.pack("=I", zlib.crc32(body)))
        self.b.set_word(_W_RSEQ, seq)

    def releases(self) -> list[Release]:
        if not self.r_cap:
            return []
        seq = self.b.word(_W_RSEQ)
        raw = self.b.read(self.rel_off, self.r_cap * REC_SIZE)
        out = []
        for s in range(max(1, seq - self.r_cap + 1), seq + 1):
            off = ((s - 1) % self.r_cap) * REC_SIZE
            body = raw[off:off + REL.size]
            if struct.unpack_from("=I", raw, off + REL.size)[0] != zlib.crc32(body):
                continue
            rseq, t, dg, pid, uid, by, _r = REL.unpack(body)
            if rseq == s:
                out.append(Release(t, dg, pid, uid, _text(by)))
        return out


class Reader:
    """A table as the live process sees it: digest -> expiry, re-read only when the generation moves."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.gen = -1
        self.map: dict[bytes, float] = {}

    def current(self) -> dict[bytes, float]:
        """Never waits: while a writer is at work, the union of the last good copy and a read."""
        t = self.table
        try:
            g = t.b.word(_W_GEN)
        except (TableCorrupted, OSError):      # a truncated or vanished file: what we had
            return self.map
        if g == self.gen:
            return self.map
        try:
            if t.b.word(_W_MAGIC) != MAGIC:
                return self.map
            g1, g2, entries = t.snapshot()
        except (TableCorrupted, OSError, struct.error):
            return self.map
        got = {e.digest: e.expires for e in entries}
        if g1 == g2 and not g1 & 1:
            self.gen, self.map = g1, got
            return got
        return {**self.map, **got}

    def contains(self, dg: bytes, now: float | None = None) -> bool:
        exp = self.current().get(dg)
        if exp is None:
            return False
        return not exp or exp > (time.time() if now is None else now)


# ---- the tables in the arena ------------------------------------------------------------------------
Geometry = tuple[int, int, int, bool]
LOCAL: Geometry = (QUARANTINE_SIZE, 64, 64, True)     # the program's own quarantine
MIRROR: Geometry = (QUARANTINE_SIZE, 0, 0, True)      # the shepherd's copy of a Redis store


def arena_table(arena: Arena, name: str, geometry: Geometry, create: bool = False) -> Table | None:
    """The table in region ``name`` of the arena; ``create`` allocates it (a writer's right only)."""
    size = Table.size_of(*geometry)
    view = arena.persist(name, size) if create else find_region(arena, name, size)
    if view is None:
        return None
    table = Table(MemBacking(view), *geometry)
    if create and table.b.word(_W_MAGIC) == 0:
        # Never formatted (its generation is the first word a format writes): the arena's new
        # regions are zeros. One whose format was cut short is formatted whole.
        table.format(name, zeroed=table.b.word(_W_GEN) == 0)
    return table
