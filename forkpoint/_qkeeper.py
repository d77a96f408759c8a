"""The shepherd's side of the quarantine: failures are recorded and keys quarantined here.

The shepherd is the one writer of the program's quarantine tables in the arena (the live process
asks it, ``_channel.QuarantineOp``), and it records every failure: never the crashing process.

* ``process`` scope: the program's own table (``_qtable.LOCAL``), as before issue 15.
* ``host`` scope: the service's host store (``_qhost``), in one locked transaction per failure:
  the failure is appended, the failures of that key within the policy's window are counted across
  every program of the service, and the key is quarantined there once they reach
  ``quarantine_after``. This happens before the restore, so the next request on any worker sees it.
* ``redis`` scope: the shepherd never waits for the network. A failure is counted at once against
  what it knows (its own failures and those other programs published), quarantined in its own
  table if that reaches ``quarantine_after``, and handed to the Redis link (``_qredis``), whose
  thread records it and counts again in Redis. What Redis holds reaches the live process through a
  mirror table in the arena that only this module writes.

When the shared store cannot be used (Redis slow, down or answering garbage; the host store busy,
unsafe or damaged beyond use), the program's own table takes the quarantines, as ``process`` scope
would; one WARNING says so, one more says when the store is back, and what was recorded meanwhile
is written to it then. The program's own table holds, at shared scopes, only what the shared store
has not taken yet.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._loop import EventLoop
from ._qhost import HostStore, StoreUnavailable
from ._qkeys import Settings, as_digest, digest, service_id
from ._qredis import RELEASES_KEEP, RedisLink
from ._qtable import LOCAL, MIRROR, Entry, Failure, Release, Table, arena_table
from .arena import MIRROR_REGION, QUARANTINE_REGION, Arena

log = logging.getLogger("forkpoint")

_RETRY = 1.0                   # seconds between attempts to write to an unavailable host store
_TEXTS = 4096                  # key texts this shepherd remembers for listings (never shared)
_PENDING = 1024                # failures kept for a host store that is unavailable


def hexd(dg: bytes) -> str:
    return dg.hex()


class Keeper:
    def __init__(self, arena: Arena, settings: Settings, loop: EventLoop, face: int) -> None:
        self.arena = arena
        self.s = settings
        self.scope = settings.parsed
        self.skey = settings.skey
        self.loop = loop
        self.face = face
        self.texts: dict[bytes, str] = {}
        self.decided: set[bytes] = set()
        self.down: str | None = None
        self.garbage = False
        self.retrying = False
        self.watching = False
        self.watched = -1
        self.repushed: dict[bytes, float] = {}
        self.mirrored: tuple[Any, ...] | None = None
        self.pending_failures: list[Failure] = []
        self.pending_releases: dict[bytes, Release] = {}
        self.recent: dict[bytes, deque[tuple[float, int, str]]] = {}   # redis: (t, pid, host)
        self.remote: dict[bytes, Entry] = {}
        self.remote_failures: list[Failure] = []
        self.remote_releases: list[Release] = []
        self.remote_keys: dict[bytes, str] = {}
        self.store = HostStore(settings.service) if self.scope.kind == "host" else None
        self.link: RedisLink | None = None
        self.mirror: Table | None = None
        if self.scope.kind == "redis":
            self.mirror = arena_table(arena, MIRROR_REGION, MIRROR)

    def start(self) -> None:
        """Begin sharing (Redis: the link's threads start; nothing here waits for the network)."""
        if self.scope.kind == "redis":
            self.link = RedisLink(self.s, self.face)
            self.loop.add_reader(self.link.fd, self._on_link)
            self.link.start()

    def close(self) -> None:
        """The program ends: give Redis half a second to take what is still queued."""
        if self.link is not None and self.down is None and not self.link.flush(0.5):
            log.warning("quarantine store %s: records not written before the program ended", self.where)

    @property
    def where(self) -> str:
        if self.store is not None:
            return self.store.path or "the host store"
        return str(self.scope) if self.scope.shared else "the program's arena"

    # -- keys ---------------------------------------------------------------------------------------
    def digest(self, key: str) -> bytes:
        dg = digest(key, self.skey)
        if len(self.texts) >= _TEXTS:
            self.texts.pop(next(iter(self.texts)))
        self.texts[dg] = key
        return dg

    def resolve(self, key: str) -> tuple[bytes, str | None]:
        """A key as the program or an operator names it: its text, or the hex digest a listing shows."""
        dg = digest(key, self.skey)
        if self._known(dg):
            return dg, key
        alt = as_digest(key)
        if alt is not None and self._known(alt):
            return alt, self.texts.get(alt)
        return dg, key

    def _known(self, dg: bytes) -> bool:
        if dg in self.remote:
            return True
        for e in self._local_entries():
            if e.digest == dg:
                return True
        if self.store is not None:
            try:
                return any(e.digest == dg for e in self.store.table().read_entries()[0])
            except Exception:  # noqa: BLE001 - a listing, best effort
                return False
        return False

    def text_of(self, dg: bytes, stored: str | None = None) -> str | None:
        return stored or self.texts.get(dg) or self.remote_keys.get(dg)

    # -- the program's own table ----------------------------------------------------------------------
    def _local(self, create: bool) -> Table | None:
        return arena_table(self.arena, QUARANTINE_REGION, LOCAL, create=create)

    @contextmanager
    def _local_tx(self, create: bool = False) -> Iterator[Table]:
        t = self._local(create)
        if t is None:
            raise StoreUnavailable(2, "the program's quarantine table is missing from its arena")
        problems = t.begin(QUARANTINE_REGION)
        if problems:
            log.warning("the program's quarantine table was damaged (%s): rebuilt", "; ".join(problems))
        try:
            yield t
        finally:
            t.commit()

    def _local_entries(self) -> list[Entry]:
        t = self._local(False)
        if t is None:
            return []
        try:
            t.check_header()
            return t.read_entries()[0]
        except Exception:  # noqa: BLE001 - a damaged table lists as empty; writers rebuild it
            return []

    def _put(self, t: Table, entry: Entry, size: int, why: str) -> list[Entry]:
        """Quarantine ``entry`` in ``t`` (bounded: the oldest go); returns what was released."""
        now = time.time()
        entries = [e for e in t.read_entries()[0] if e.digest != entry.digest]
        expired = [e for e in entries if not e.live(now)]
        entries = [e for e in entries if e.live(now)]
        entries.append(entry)
        entries.sort(key=lambda e: e.since)
        evicted = entries[:-size] if len(entries) > size else []
        t.store(entries[-size:])
        for e in expired:
            t.add_release(Release(now, e.digest, self.face, os.geteuid(), "expired (quarantine_ttl)"))
        for e in evicted:
            t.add_release(Release(now, e.digest, self.face, os.geteuid(), f"evicted: {why} full"))
        if evicted:
            log.warning("quarantine full (%d keys): released the oldest %s", size,
                        [self.text_of(e.digest, e.key) or hexd(e.digest) for e in evicted])
        return evicted

    def _drop(self, t: Table, dg: bytes) -> Entry | None:
        entries = t.read_entries()[0]
        gone = [e for e in entries if e.digest == dg]
        if gone:
            t.store([e for e in entries if e.digest != dg])
        return gone[0] if gone else None

    def _entry(self, dg: bytes, key: str | None, failures: int, sig: int, now: float, local: bool) -> Entry:
        expires = now + self.s.ttl if self.s.ttl else 0.0
        keep = key if (local or self.s.plain) else None
        return Entry(dg, now, expires, failures, sig, self.face, keep)

    # -- a failure (called by the shepherd while no live process runs program code) -------------------
    def failed(self, key: str, sig: int, reason: str, after: int, within: float, size: int) -> int | None:
        """Record a failure of ``key``; the failures of it within ``within`` seconds wherever they
        happened (None: only this program knows, and the recovery policy counts)."""
        now = time.time()
        dg = self.digest(key)
        f = Failure(now, dg, self.face, sig, self.s.host, reason)
        try:
            with self._local_tx(create=True) as t:
                t.add_failure(f)
        except Exception:  # noqa: BLE001 - the record is a convenience; the decision is below
            log.exception("could not record the failure of input %r in the program's arena", key)
        if self.store is not None:
            try:
                with self.store.transaction() as t:
                    self._catch_up(t)
                    t.add_failure(f)
                    count = sum(1 for x in t.failures() if x.digest == dg and now - x.t <= within)
                    live = [e for e in t.read_entries()[0] if e.digest == dg and e.live(now)]
                    if count >= after and not live:
                        self._put(t, self._entry(dg, key, count, sig, now, False), size, "host quarantine")
                        self.decided.add(dg)
                    elif live:
                        self.decided.add(dg)
                        count = max(count, after)
                self._available()
                return count
            except StoreUnavailable as e:
                self._unavailable(str(e))
                if len(self.pending_failures) < _PENDING:
                    self.pending_failures.append(f)
                self._retry_later()
                return None
        if self.link is not None:
            q = self.recent.setdefault(dg, deque(maxlen=64))
            q.append((now, self.face, self.s.host))
            while q and now - q[0][0] > within:
                q.popleft()
            self.link.submit({"op": "failure", "d": hexd(dg), "t": now, "sig": sig, "reason": reason,
                              "key": key if self.s.plain else None, "after": after, "within": within,
                              "ttl": self.s.ttl or 0})
            if dg in self.remote and self.remote[dg].live(now):
                return max(len(q), after)
            return len(q)
        return None

    def quarantined(self, key: str, failures: int, sig: int, size: int) -> None:
        """The recovery policy quarantined ``key``: make it so wherever this scope shares it.

        The program's own table keeps it too, whatever becomes of the shared store (a Redis that
        lost its data, a host store rebuilt empty): sharing never makes the program refuse less
        than ``process`` scope would. A release anywhere takes it out again (``_watch``).
        """
        dg = self.digest(key)
        self.decided.discard(dg)
        now = time.time()
        with self._local_tx(create=True) as t:
            self._put(t, self._entry(dg, key, failures, sig, now, True), size, "quarantine")
        if self.link is not None:
            self.link.submit({"op": "quarantine", "d": hexd(dg), "since": now,
                              "expires": now + self.s.ttl if self.s.ttl else 0.0, "failures": failures,
                              "sig": sig, "key": key if self.s.plain else None})
        self._watch_later()

    # -- by hand: forkpoint.quarantine()/release() in the program, or an operator ---------------------
    def add(self, key: str, size: int) -> None:
        dg = self.digest(key)
        now = time.time()
        entry = self._entry(dg, key, 0, 0, now, self.store is None)
        if self.store is not None:
            try:
                with self.store.transaction() as t:
                    self._catch_up(t)
                    self._put(t, entry, size, "host quarantine")
                self._available()
            except StoreUnavailable as e:
                self._unavailable(str(e))
                self._retry_later()
        with self._local_tx() as t:
            self._put(t, self._entry(dg, key, 0, 0, now, True), size, "quarantine")
        self._watch_later()
        if self.link is not None:
            self.link.submit({"op": "quarantine", "d": hexd(dg), "since": now, "expires": entry.expires,
                              "failures": 0, "sig": 0, "key": key if self.s.plain else None})

    def release(self, key: str, by: str, pid: int, uid: int) -> bool:
        """Take ``key`` (its text, or the hex digest a listing shows) out of quarantine everywhere
        this scope reaches; returns whether it was quarantined."""
        dg, text = self.resolve(key)
        now = time.time()
        rec = Release(now, dg, pid, uid, by)
        found = False
        try:
            with self._local_tx() as t:
                if self._drop(t, dg) is not None:
                    found = True
                    t.add_release(rec)
        except StoreUnavailable:
            pass
        if self.store is not None:
            try:
                with self.store.transaction() as t:
                    self._catch_up(t)
                    if self._drop(t, dg) is not None:
                        found = True
                        t.add_release(rec)
                self._available()
            except StoreUnavailable as e:
                self._unavailable(str(e))
                self.pending_releases[dg] = rec
                self._retry_later()
        if self.link is not None:
            if dg in self.remote:
                found = True
                self.remote.pop(dg)
            self.pending_releases[dg] = rec
            self._write_mirror()
            self.link.submit({"op": "release", "d": hexd(dg), "t": now, "by": by,
                              "key": text if self.s.plain else None})
        return found

    # -- the host store: catching up after an outage ---------------------------------------------------
    def _catch_up(self, t: Table) -> None:
        """Write to the host store what was recorded while it could not be used (lock held)."""
        if not (self.pending_failures or self.pending_releases or self.down):
            return
        for f in self.pending_failures:
            t.add_failure(f)
        self.pending_failures = []
        entries = t.read_entries()[0]
        mine = self._local_entries()
        have = {e.digest for e in entries}
        add = [e for e in mine if e.digest not in have]
        if add:
            shared = [Entry(e.digest, e.since, e.expires, e.failures, e.sig, e.pid,
                            e.key if self.s.plain else None) for e in add]
            entries = sorted(entries + shared, key=lambda e: e.since)[-t.q_cap:]
        for dg, rec in self.pending_releases.items():
            if any(e.digest == dg for e in entries):
                entries = [e for e in entries if e.digest != dg]
                t.add_release(rec)
        self.pending_releases = {}
        t.store(entries)

    def _retry_later(self) -> None:
        if self.retrying:
            return
        self.retrying = True

        def retry() -> None:
            self.retrying = False
            if self.store is None or self.down is None:
                return
            try:
                with self.store.transaction() as t:
                    self._catch_up(t)
                self._available()
            except StoreUnavailable as e:
                self._unavailable(str(e))
                self._retry_later()
        self.loop.after(_RETRY, retry)

    # -- outages ------------------------------------------------------------------------------------------
    def _unavailable(self, why: str) -> None:
        if self.down is None:
            log.warning("quarantine store %s unavailable (%s): this program uses its own quarantine "
                        "until it is back", self.where, why)
        self.down = why

    def _available(self, caught_up: str = "") -> None:
        if self.down is not None:
            self.down = None
            log.warning("quarantine store %s available again%s", self.where, caught_up)

    # -- Redis: what the link's thread found --------------------------------------------------------------
    def _on_link(self) -> None:
        assert self.link is not None
        changed = False
        for kind, data in self.link.results():
            if kind == "down":
                self._unavailable(data)
            elif kind == "up":
                self._available(data)
            elif kind == "garbage":
                self._garbage(data)
            elif kind == "sync":
                entries, failures, releases, keys, bad = data
                if bad:
                    self._garbage(f"{bad} entr{'y' if bad == 1 else 'ies'} that forkpoint did not write")
                else:
                    self.garbage = False
                self.remote = entries
                self.remote_failures, self.remote_releases = failures, releases
                self.remote_keys.update(keys)
                for dg in [d for d, r in self.pending_releases.items() if r.t <= data_time(releases, d)]:
                    self.pending_releases.pop(dg, None)
                changed = True
            elif kind == "quarantined":
                entry, key = data
                self.remote[entry.digest] = entry
                if key:
                    self.remote_keys[entry.digest] = key
                changed = True
            elif kind == "released":
                dg, rec = data
                self.remote.pop(dg, None)
                self.remote_releases.append(rec)
                del self.remote_releases[:-RELEASES_KEEP]
                if dg in self.pending_releases and self.pending_releases[dg].t <= rec.t:
                    self.pending_releases.pop(dg, None)
                changed = True
            elif kind == "failure":
                f, key = data
                if key:
                    self.remote_keys[f.digest] = key
                self.remote_failures.append(f)
                del self.remote_failures[:-256]
                if (f.pid, f.host) != (self.face, self.s.host):
                    q = self.recent.setdefault(f.digest, deque(maxlen=64))
                    q.append((f.t, f.pid, f.host))
            elif kind == "confirmed":
                changed = True
        if changed:
            self._write_mirror()
            self._reconcile()

    def _garbage(self, what: str) -> None:
        if not self.garbage:
            log.warning("quarantine store %s answered garbage (%s): ignored", self.where, what)
        self.garbage = True

    def _write_mirror(self) -> None:
        if self.mirror is None:
            return
        now = time.time()
        entries = sorted((e for d, e in self.remote.items()
                          if d not in self.pending_releases and e.live(now)), key=lambda e: e.since)
        written = tuple((e.digest, e.expires, e.key) for e in entries)
        if written == self.mirrored and self._mirror_intact(len(written)):
            return                        # a periodic read that changed nothing: readers keep theirs
        self.mirrored = written
        try:
            problems = self.mirror.begin(MIRROR_REGION)
            if problems:
                log.warning("the quarantine mirror was damaged (%s): rebuilt", "; ".join(problems))
            self.mirror.store(entries[-self.mirror.q_cap:])
            self.mirror.commit()
        except Exception:  # noqa: BLE001 - contained: the program's own table still applies
            log.exception("could not update the quarantine mirror")

    def _mirror_intact(self, n: int) -> bool:
        assert self.mirror is not None
        try:
            self.mirror.check_header()
            got, bad = self.mirror.read_entries()
            return not bad and len(got) == n and not self.mirror.generation() & 1
        except Exception:  # noqa: BLE001 - damaged: rewritten
            return False

    def _reconcile(self) -> None:
        """After news from Redis: drop from the program's own table what was released anywhere;
        write again what Redis lost (a restart without persistence) and nobody released."""
        now = time.time()
        mine = self._local_entries()
        released = self._released(mine, self.remote_releases)
        if released:
            self._drop_local(released)
        if self.link is None or self.down is not None:
            return
        for e in mine:
            if e.digest in released or e.digest in self.remote or not e.live(now):
                continue
            if now - self.repushed.get(e.digest, 0.0) < _RETRY * 5:
                continue
            self.repushed[e.digest] = now
            self.link.submit({"op": "quarantine", "d": hexd(e.digest), "since": e.since, "expires": e.expires,
                              "failures": e.failures, "sig": e.sig,
                              "key": e.key if self.s.plain else None})

    @staticmethod
    def _released(mine: list[Entry], releases: list[Release]) -> set[bytes]:
        last: dict[bytes, float] = {}
        for r in releases:
            last[r.digest] = max(r.t, last.get(r.digest, 0.0))
        return {e.digest for e in mine if last.get(e.digest, -1.0) >= e.since}

    def _drop_local(self, digests: set[bytes]) -> None:
        try:
            with self._local_tx() as t:
                t.store([e for e in t.read_entries()[0] if e.digest not in digests])
        except StoreUnavailable:
            pass

    def _watch_later(self) -> None:
        """At host scope: while the program's own table holds keys, follow the host store's
        releases (an operator's ``forkpoint quarantine release`` reaches every program within a
        second)."""
        if self.store is None or self.watching:
            return
        self.watching = True
        self.loop.after(_RETRY, self._watch)

    def _watch(self) -> None:
        self.watching = False
        mine = self._local_entries()
        if self.store is None or not mine:
            return
        try:
            t = self.store.table()
            gen = t.generation()
            if gen != self.watched:
                self.watched = gen
                released = self._released(mine, t.releases())
                if released:
                    self._drop_local(released)
        except Exception:  # noqa: BLE001 - the store is checked again in a second
            pass
        self._watch_later()

    # -- what operators see -------------------------------------------------------------------------------
    def listing(self) -> list[str]:
        now = time.time()
        out: dict[bytes, Entry] = {}
        for e in self._shared_entries() + self._local_entries():
            if e.live(now):
                out.setdefault(e.digest, e)
        return [self.text_of(e.digest, e.key) or hexd(e.digest)
                for e in sorted(out.values(), key=lambda e: e.since)]

    def _shared_entries(self) -> list[Entry]:
        if self.store is not None:
            try:
                return self.store.table().read_entries()[0]
            except Exception:  # noqa: BLE001 - a listing of what can be read
                return []
        if self.link is not None:
            return [e for d, e in self.remote.items() if d not in self.pending_releases]
        return []

    def report(self) -> dict[str, Any]:
        now = time.time()
        local = self._local(False)
        failures: list[Failure] = []
        releases: list[Release] = []
        entries: list[tuple[Entry, str]] = []
        if local is not None:
            try:
                failures += local.failures()
                releases += local.releases()
            except Exception:  # noqa: BLE001
                pass
        if self.store is not None:
            try:
                t = self.store.table()
                entries += [(e, "host") for e in t.read_entries()[0]]
                failures = t.failures() + [f for f in failures if self.down is not None]
                releases = t.releases() + releases
            except Exception as e:  # noqa: BLE001
                self._unavailable(str(e))
        elif self.link is not None:
            entries += [(e, "redis") for d, e in self.remote.items() if d not in self.pending_releases]
            failures = self.remote_failures[-256:] + [f for f in failures if self.down is not None]
            releases = self.remote_releases[-64:] + releases
        shared = {e.digest for e, _ in entries}
        entries += [(e, "local") for e in self._local_entries() if e.digest not in shared]
        return {"scope": str(self.scope), "service": self.s.service, "service_id": service_id(self.s.service),
                "service_source": self.s.service_source, "store": self.where, "host": self.s.host,
                "pid": self.face, "available": self.down is None, "error": self.down, "ttl": self.s.ttl,
                "garbage": self.garbage,
                "quarantined": [entry_json(e, where, self.text_of(e.digest, e.key), now)
                                for e, where in entries if e.live(now)],
                "failures": [failure_json(f, self.text_of(f.digest)) for f in failures],
                "releases": [release_json(r, self.text_of(r.digest)) for r in releases]}


def data_time(releases: list[Release], dg: bytes) -> float:
    """When Redis last recorded a release of ``dg`` (0 if it has none)."""
    return max((r.t for r in releases if r.digest == dg), default=0.0)


def entry_json(e: Entry, where: str, key: str | None, now: float) -> dict[str, Any]:
    return {"digest": hexd(e.digest), "key": key, "since": e.since, "expires": e.expires or None,
            "failures": e.failures, "signal": e.sig, "pid": e.pid, "where": where}


def failure_json(f: Failure, key: str | None) -> dict[str, Any]:
    return {"time": f.t, "digest": hexd(f.digest), "key": key, "host": f.host, "pid": f.pid,
            "signal": f.sig, "reason": f.reason}


def release_json(r: Release, key: str | None) -> dict[str, Any]:
    return {"time": r.t, "digest": hexd(r.digest), "key": key, "by": r.by, "pid": r.pid, "uid": r.uid}
