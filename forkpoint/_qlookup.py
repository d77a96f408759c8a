"""The live process's view of the quarantine: a digest and one or two lock-free table reads.

Every request asks ``contains(key)``: the key's digest (BLAKE2b, about 1 us), then the program's own
table in the arena (one word read while it is unchanged) and, at a shared scope, the shared view: the
host store (one 8-byte ``pread`` of its generation word) or the shepherd's mirror of Redis (one
word read in the arena). Nothing here waits, takes a lock, touches the network or raises: a store
that cannot be read counts as empty, and the program's own table (where the shepherd puts every
quarantine a shared store could not take) still applies.
"""
from __future__ import annotations

import time
from typing import Any

from ._errors import ForkpointError
from ._qhost import HostReader, HostStore
from ._qkeys import Settings, digest
from ._qtable import GEN_WORD, LOCAL, MIRROR, Entry, Geometry, MemBacking, Reader, Table, arena_table
from .arena import MIRROR_REGION, QUARANTINE_REGION, Arena

# The usual answer, "nothing is quarantined", without a call: a protected call checkpointed for
# itself asks it before its checkpoint while the previous call's keeper may still share every page,
# and every object a Python call touches (function, code object, bound method, int) has its
# reference count written, so that each page holding one is copied on write: the lookup's six calls
# cost 13-15 faults a call, about 25 us (benchmarks/servers.py, per call). Read inline as
# ``q[0] is not None and q[0][GEN_WORD] == q[1]`` (``quiet``): the program's own table's words, and the
# generation at which it was last read with no entry, while the quarantine is the program's own
# (at host or Redis scope the shared store must be read too, and q[0] stays None). Set by
# ``Lookup.contains``; None again whenever the lookup is made afresh.
QUIET: list[Any] = [None, 0]


def quiet() -> bool:
    """Whether nothing is quarantined, by ``QUIET`` alone (False: ask ``Lookup.contains``)."""
    q = QUIET
    return q[0] is not None and q[0][GEN_WORD] == q[1]


def _table(arena: Arena, name: str, geometry: Geometry) -> Table | None:
    try:
        return arena_table(arena, name, geometry)
    except ForkpointError:        # a damaged directory entry: the shepherd reports it when it writes
        return None


class Lookup:
    def __init__(self, settings: Settings, arena: Arena) -> None:
        self.settings = settings
        self.skey = settings.skey
        self.arena = arena
        local = _table(arena, QUARANTINE_REGION, LOCAL)
        self.local = Reader(local) if local is not None else None
        self.host: HostStore | None = None
        self.shared: HostReader | Reader | None = None
        kind = settings.parsed.kind
        if kind == "host":
            self.host = HostStore(settings.service)
            try:      # so that the reader opens it now: it looks again only once a second
                self.host.ensure()
            except OSError:
                pass  # the shepherd says so, once, when it cannot record a failure there
            self.shared = HostReader(self.host)
        elif kind == "redis":
            mirror = _table(arena, MIRROR_REGION, MIRROR)
            self.shared = Reader(mirror) if mirror is not None else None

    def contains(self, key: str) -> bool:
        local, shared = self.local, self.shared
        # Nothing quarantined (the usual case): no digest. A protected call asks this before its
        # checkpoint, while the previous call's keeper may still share every page; each page it
        # writes (a hash object, refcounts) is then copied on write: 18 faults, 35 us a call.
        lmap = local.current() if local is not None else None
        smap = shared.current() if shared is not None else None
        if not lmap and not smap:
            if shared is None and self.host is None and local is not None and not local.map:
                b = local.table.b
                if isinstance(b, MemBacking):       # (the Reader's gen and map agree: still empty)
                    QUIET[0], QUIET[1] = b.words, local.gen
            return False
        dg = digest(key, self.skey)
        for found in (lmap, smap):
            if not found:
                continue
            exp = found.get(dg)
            if exp is not None and (not exp or exp > time.time()):
                return True
        return False

    __contains__ = contains

    def _tables(self) -> list[Table]:
        out = []
        for name, geometry in ((QUARANTINE_REGION, LOCAL), (MIRROR_REGION, MIRROR)):
            t = _table(self.arena, name, geometry) if name == QUARANTINE_REGION or \
                self.settings.parsed.kind == "redis" else None
            if t is not None:
                out.append(t)
        if self.host is not None:
            try:
                out.append(self.host.table())
            except OSError:
                pass
        return out

    def keys(self) -> list[str]:
        """The quarantined keys, oldest first: their text where it is known, else the hex digest."""
        now = time.time()
        found: dict[bytes, Entry] = {}
        for t in self._tables():
            try:
                t.check_header()
                entries = t.read_entries()[0]
            except Exception:  # noqa: BLE001 - a listing of what can be read
                continue
            for e in entries:
                if e.live(now) and (e.digest not in found or (e.key and not found[e.digest].key)):
                    found[e.digest] = e
        return [e.key or e.digest.hex() for e in sorted(found.values(), key=lambda e: e.since)]


_current: tuple[int, int, Lookup] | None = None


def lookup(settings: Settings, arena: Arena) -> Lookup:
    """This process's lookup for these settings and this arena (made once)."""
    global _current
    if _current is None or _current[0] != id(settings) or _current[1] != id(arena):
        QUIET[0] = None
        _current = (id(settings), id(arena), Lookup(settings, arena))
    return _current[2]


def forget() -> None:
    """Make the next lookup start afresh (the shepherd's mirror of Redis now exists)."""
    global _current
    QUIET[0] = None
    _current = None
