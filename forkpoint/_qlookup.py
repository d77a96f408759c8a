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

from ._errors import ForkpointError
from ._qhost import HostReader, HostStore
from ._qkeys import Settings, digest
from ._qtable import LOCAL, MIRROR, Entry, Geometry, Reader, Table, arena_table
from .arena import MIRROR_REGION, QUARANTINE_REGION, Arena


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
        _current = (id(settings), id(arena), Lookup(settings, arena))
    return _current[2]


def forget() -> None:
    """Make the next lookup start afresh (the shepherd's mirror of Redis now exists)."""
    global _current
    _current = None
