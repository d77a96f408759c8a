"""The shepherd's link to a Redis quarantine store: two threads, so the shepherd's loop never waits.

Every restore goes through the shepherd's event loop, so nothing here runs on it. ``submit()``
queues an operation and returns; a *worker* thread applies the queue to Redis in order (each
operation one Lua script, so a failure is recorded, counted and, at ``quarantine_after``, turned
into a quarantine atomically) and re-reads the whole store every ``SYNC_EVERY`` seconds; a
*listener* thread follows the service's pub/sub channel, so a quarantine made anywhere reaches
this program in milliseconds. Their findings come back through ``results()``, which the loop calls
when the link's pipe is readable; the keeper (``_qkeeper``) turns them into the mirror table the
live process reads. Lookups never touch the network.

Redis may be slow, down or answer garbage: every call has a 0.5 s timeout and no retry of its own,
the link reports ``down`` (the keeper logs one warning per outage and the program uses its own
quarantine), keeps what it could not write, reconnects with a growing delay (0.2 s to 2 s), writes
the backlog once Redis answers again, and then reports ``up``. Entries that are not what forkpoint
writes are skipped and reported as ``garbage``.

The shepherd is started with ``python -I -S``: the program's ``sys.path`` (in the settings) is added
before ``redis`` is imported, in the worker thread. Keys, for service id S (``_qkeys.service_id``)::

    forkpoint:services                 set of service ids
    forkpoint:service:S                hash: label (an explicit service name only), seen
    forkpoint:q:S:q                    hash: key digest (hex) -> quarantine entry (JSON)
    forkpoint:q:S:f:<digest>           sorted set: the key's failures within the window (by time)
    forkpoint:q:S:log                  list: the service's last 256 failures (JSON)
    forkpoint:q:S:r                    list: the last 64 releases (JSON): who released what
    forkpoint:q:S:events               pub/sub channel: "q HEX JSON", "r HEX JSON", "f JSON"
"""
from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from ._qkeys import DIGEST_HEX, Settings, service_id
from ._qtable import Entry, Failure, Release

log = logging.getLogger("forkpoint")

TIMEOUT = 0.5                  # seconds for any one Redis call
SYNC_EVERY = 2.0               # seconds between full reads of the store
MAX_QUEUE = 10000              # operations kept while Redis is unreachable
LOG_KEEP = 256
RELEASES_KEEP = 64

_FAILURE = """
local now, within, after = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, hex, channel, base = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
redis.call('ZADD', KEYS[1], now, member)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - within)
redis.call('EXPIRE', KEYS[1], math.ceil(within) + 60)
redis.call('LPUSH', KEYS[3], member)
redis.call('LTRIM', KEYS[3], 0, 255)
redis.call('PUBLISH', channel, 'f ' .. member)
local count = redis.call('ZCARD', KEYS[1])
if count >= after and redis.call('HEXISTS', KEYS[2], hex) == 0 then
  local e = cjson.decode(base)
  e['failures'] = count
  local enc = cjson.encode(e)
  redis.call('HSET', KEYS[2], hex, enc)
  redis.call('PUBLISH', channel, 'q ' .. hex .. ' ' .. enc)
  return {count, 1, enc}
end
return {count, 0, ''}
"""
_QUARANTINE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('PUBLISH', ARGV[3], 'q ' .. ARGV[1] .. ' ' .. ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
local gone = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if gone == 1 then
  redis.call('LPUSH', KEYS[3], ARGV[2])
  redis.call('LTRIM', KEYS[3], 0, 63)
  redis.call('PUBLISH', ARGV[3], 'r ' .. ARGV[1] .. ' ' .. ARGV[2])
end
return gone
"""


_R = TypeVar("_R", Failure, Release)


class Garbage(ValueError):
    """Redis held something forkpoint did not write."""


def _num(d: dict[str, Any], k: str, default: float = 0.0) -> float:
    v = d.get(k, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Garbage(f"{k} is {v!r}")
    return float(v)


def _str(d: dict[str, Any], k: str) -> str | None:
    v = d.get(k)
    if v is not None and not isinstance(v, str):
        raise Garbage(f"{k} is {v!r}")
    return v


def _digest(hexd: Any) -> bytes:
    if isinstance(hexd, bytes):
        hexd = hexd.decode("ascii", errors="replace")
    if not isinstance(hexd, str) or len(hexd) != DIGEST_HEX:
        raise Garbage(f"not a key digest: {hexd!r}"[:80])
    try:
        return bytes.fromhex(hexd)
    except ValueError:
        raise Garbage(f"not a key digest: {hexd!r}"[:80]) from None


def _obj(raw: Any) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        raise Garbage(f"not JSON: {bytes(raw)[:40]!r}") from None
    if not isinstance(d, dict):
        raise Garbage("not a JSON object")
    return d


def parse_entry(hexd: Any, raw: Any) -> tuple[Entry, str | None]:
    d = _obj(raw)
    e = Entry(_digest(hexd), _num(d, "since"), _num(d, "expires"), int(_num(d, "failures")),
              int(_num(d, "sig")), int(_num(d, "pid")))
    return e, _str(d, "key")


def parse_failure(raw: Any) -> tuple[Failure, str | None]:
    d = _obj(raw)
    f = Failure(_num(d, "t"), _digest(d.get("d")), int(_num(d, "pid")), int(_num(d, "sig")),
                _str(d, "host") or "", _str(d, "reason") or "")
    return f, _str(d, "key")


def parse_release(raw: Any) -> tuple[Release, str | None]:
    d = _obj(raw)
    r = Release(_num(d, "t"), _digest(d.get("d")), int(_num(d, "pid")), int(_num(d, "uid")),
                _str(d, "by") or "")
    return r, _str(d, "key")


class Store:
    """Synchronous access to one service's quarantine in Redis (the link's threads and the CLI)."""

    def __init__(self, client: Any, sid: str) -> None:
        self.c = client
        self.id = sid
        p = f"forkpoint:q:{self.id}:"
        self.qkey, self.logkey, self.rkey, self.channel = p + "q", p + "log", p + "r", p + "events"
        self.fprefix = p + "f:"
        self._failure = client.register_script(_FAILURE)
        self._quarantine = client.register_script(_QUARANTINE)
        self._release = client.register_script(_RELEASE)

    def register(self, label: str | None) -> None:
        self.c.sadd("forkpoint:services", self.id)
        fields = {"seen": str(time.time())}
        if label:
            fields["label"] = label
        self.c.hset(f"forkpoint:service:{self.id}", mapping=fields)

    def read(self) -> tuple[dict[bytes, Entry], dict[bytes, str], list[Failure], list[Release], int]:
        """(entries, key texts, failures oldest first, releases oldest first, garbage count)."""
        bad = 0
        entries: dict[bytes, Entry] = {}
        keys: dict[bytes, str] = {}
        for k, v in self.c.hgetall(self.qkey).items():
            try:
                e, key = parse_entry(k, v)
            except Garbage:
                bad += 1
                continue
            entries[e.digest] = e
            if key:
                keys[e.digest] = key
        failures, bad_failures = self._log(self.logkey, LOG_KEEP, parse_failure, keys)
        releases, bad_releases = self._log(self.rkey, RELEASES_KEEP, parse_release, keys)
        bad += bad_failures + bad_releases
        return entries, keys, failures, releases, bad

    def _log(self, name: str, keep: int, parse: Callable[[Any], tuple[_R, str | None]],
             keys: dict[bytes, str]) -> tuple[list[_R], int]:
        """The newest ``keep`` records of list ``name``, oldest first, and how many were garbage;
        the key texts they carry go into ``keys``."""
        records: list[_R] = []
        bad = 0
        for raw in reversed(self.c.lrange(name, 0, keep - 1)):
            try:
                record, key = parse(raw)
            except Garbage:
                bad += 1
                continue
            records.append(record)
            if key:
                keys.setdefault(record.digest, key)
        return records, bad

    def expire(self, entries: dict[bytes, Entry], pid: int) -> list[Release]:
        """Remove entries past their time to live (each once, whoever gets there first)."""
        now = time.time()
        out = []
        for dg, e in list(entries.items()):
            if e.live(now):
                continue
            entries.pop(dg)
            rec = Release(now, dg, pid, os.geteuid(), "expired (quarantine_ttl)")
            if self.release(dg.hex(), rec, None):
                out.append(rec)
        return out

    def failure(self, f: Failure, key: str | None, after: int, within: float, ttl: float
                ) -> tuple[int, Entry | None]:
        member = json.dumps({"t": f.t, "d": f.digest.hex(), "pid": f.pid, "sig": f.sig, "host": f.host,
                             "reason": f.reason, "n": os.urandom(4).hex(),
                             **({"key": key} if key else {})}, separators=(",", ":"))
        base = json.dumps({"since": f.t, "expires": f.t + ttl if ttl else 0, "sig": f.sig, "pid": f.pid,
                           "host": f.host, **({"key": key} if key else {})}, separators=(",", ":"))
        hexd = f.digest.hex()
        count, made, enc = self._failure(keys=[self.fprefix + hexd, self.qkey, self.logkey],
                                         args=[f.t, within, after, member, hexd, self.channel, base])
        return int(count), (parse_entry(hexd, enc)[0] if int(made) else None)

    def quarantine(self, e: Entry, host: str, key: str | None) -> bool:
        enc = json.dumps({"since": e.since, "expires": e.expires, "failures": e.failures, "sig": e.sig,
                          "pid": e.pid, "host": host, **({"key": key} if key else {})}, separators=(",", ":"))
        return bool(self._quarantine(keys=[self.qkey], args=[e.digest.hex(), enc, self.channel]))

    def release(self, hexd: str, rec: Release, key: str | None) -> bool:
        enc = json.dumps({"t": rec.t, "d": hexd, "pid": rec.pid, "uid": rec.uid, "by": rec.by,
                          **({"key": key} if key else {})}, separators=(",", ":"))
        return bool(self._release(keys=[self.qkey, self.fprefix + hexd, self.rkey],
                                  args=[hexd, enc, self.channel]))


def import_redis(sys_path: list[str]) -> Any:
    for p in sys_path:
        if p not in sys.path:
            sys.path.append(p)
    import redis  # noqa: PLC0415 - optional, and only at redis scope
    return redis


def client(redis: Any, settings: Settings, timeout: float = TIMEOUT) -> Any:
    from redis.backoff import NoBackoff  # noqa: PLC0415 - see import_redis
    from redis.retry import Retry  # noqa: PLC0415

    sc = settings.parsed
    return redis.Redis(host=sc.host, port=sc.port, db=sc.db, username=sc.username, password=sc.password,
                       socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                       client_name=f"forkpoint-{os.getpid()}")


class RedisLink:
    def __init__(self, settings: Settings, face: int) -> None:
        self.s = settings
        self.face = face
        self.fd, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._results: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._ops: deque[dict[str, Any]] = deque()
        self._cv = threading.Condition()
        self._down = False
        self._sync_now = False

    def start(self) -> None:
        threading.Thread(target=self._guard, args=(self._work,), name="fp-redis-worker", daemon=True).start()

    # -- from the shepherd's loop -------------------------------------------------------------------
    def submit(self, op: dict[str, Any]) -> None:
        with self._cv:
            self._ops.append(op)
            if len(self._ops) > MAX_QUEUE:
                self._ops.popleft()
            self._cv.notify()

    def flush(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until Redis has every queued record; False if not."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._ops and not self._down:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.01))
            return not self._ops

    def results(self) -> list[tuple[str, Any]]:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    # -- the threads ------------------------------------------------------------------------------------
    def _post(self, kind: str, data: Any = None) -> None:
        self._results.put((kind, data))
        try:
            os.write(self._wake, b"!")
        except BlockingIOError:
            pass

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - a dead thread must be reported, never silent
            self._post("down", f"the Redis link stopped: {type(e).__name__}: {e}")

    def _work(self) -> None:
        try:
            redis = import_redis(self.s.sys_path)
        except ImportError as e:
            self._post("down", f"the redis package cannot be imported ({e}): pip install 'forkpoint[redis]'")
            return
        sys.setswitchinterval(0.0005)   # this thread must not hold the GIL while a restore waits
        errors = (redis.RedisError, OSError, Garbage)
        store: Store | None = None
        delay = 0.2
        listening = False
        caught_up = 0
        while True:
            if store is None:
                try:
                    store = Store(client(redis, self.s), service_id(self.s.service))
                    store.register(self.s.service if self.s.explicit else None)
                    self._sync(store)
                    if not listening:
                        listening = True
                        threading.Thread(target=self._guard, args=(lambda: self._listen(redis),),
                                         name="fp-redis-listener", daemon=True).start()
                    delay = 0.2
                except errors as e:
                    store = None
                    self._fail(e)
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
            with self._cv:
                if not self._ops and not self._sync_now:
                    self._cv.wait(SYNC_EVERY)
                op = self._ops[0] if self._ops else None
                sync, self._sync_now = self._sync_now, False
            try:
                if op is not None:
                    self._apply(store, op)
                    with self._cv:
                        if self._ops and self._ops[0] is op:
                            self._ops.popleft()
                        self._cv.notify_all()
                    caught_up += self._down
                if op is None or sync:
                    self._sync(store)
                if self._down and not self._ops:
                    self._down = False
                    self._post("up", f"; {caught_up} record(s) kept meanwhile written to it"
                               if caught_up else "")
                    caught_up = 0
            except errors as e:
                store = None
                self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self._down = True
        garbage = isinstance(e, Garbage) or type(e).__name__ == "ResponseError"
        what = "answered garbage" if garbage else "unreachable"
        self._post("down", f"{what}: {type(e).__name__}: {str(e)[:200]}")

    def _sync(self, store: Store) -> None:
        entries, keys, failures, releases, bad = store.read()
        releases += store.expire(entries, self.face)
        self._post("sync", (entries, failures, releases, keys, bad))

    def _apply(self, store: Store, op: dict[str, Any]) -> None:
        kind, dg = op["op"], bytes.fromhex(op["d"])
        if kind == "failure":
            f = Failure(op["t"], dg, self.face, op["sig"], self.s.host, op["reason"])
            _count, made = store.failure(f, op.get("key"), op["after"], op["within"], op["ttl"])
            if made is not None:
                self._post("quarantined", (made, op.get("key")))
        elif kind == "quarantine":
            e = Entry(dg, op["since"], op["expires"], op["failures"], op["sig"], self.face)
            store.quarantine(e, self.s.host, op.get("key"))
            self._post("quarantined", (e, op.get("key")))
        elif kind == "release":
            rec = Release(op["t"], dg, self.face, os.geteuid(), op["by"])
            store.release(op["d"], rec, op.get("key"))
            self._post("released", (dg, rec))

    def _listen(self, redis: Any) -> None:
        delay = 0.2
        sid = service_id(self.s.service)
        channel = f"forkpoint:q:{sid}:events"
        while True:
            try:
                c = client(redis, self.s, timeout=max(TIMEOUT, 2.0))
                ps = c.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(channel)
                with self._cv:               # what was published before we listened: read it all
                    self._sync_now = True
                    self._cv.notify()
                delay = 0.2
                while True:
                    m = ps.get_message(timeout=1.0)
                    if m is not None and m.get("type") == "message":
                        self._event(m.get("data"))
            except (redis.RedisError, OSError) as e:
                self._fail(e)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _event(self, data: Any) -> None:
        try:
            if not isinstance(data, bytes):
                raise Garbage("not bytes")
            kind, _, rest = data.partition(b" ")
            if kind == b"f":
                self._post("failure", parse_failure(rest))
            elif kind in (b"q", b"r"):
                hexd, _, body = rest.partition(b" ")
                if kind == b"q":
                    e, key = parse_entry(hexd, body)
                    self._post("quarantined", (e, key))
                else:
                    r, _key = parse_release(body)
                    self._post("released", (_digest(hexd), r))
            else:
                raise Garbage(f"unknown event {kind[:10]!r}")
        except Garbage as e:
            self._post("garbage", f"an event on the channel: {e}")
