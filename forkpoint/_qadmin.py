"""Quarantine stores as an operator sees them: ``forkpoint quarantine list|release``.

Three ways in, one report format (the shepherd's, ``_qkeeper.Keeper.report``):

* ``--pid PID``: ask a running program through its control socket; works at every scope and shows
  what that program sees (its own table, and the host store or its mirror of Redis);
* ``--scope host``: read this user's host stores directly (every service, or ``--service``);
* ``--scope redis://HOST:PORT/DB``: read Redis directly (every service, or ``--service``).

Releasing by a key's text needs the service's hashing key: a host store keeps it in its header; for
Redis it comes from ``--service`` (or ``FORKPOINT_SERVICE``). A hex digest from a listing always works.
"""
from __future__ import annotations

import glob
import os
import socket
import sys
import time
from typing import Any

from . import operator
from ._errors import ConfigurationError
from ._qhost import SUFFIX, HostStore, StoreUnavailable, store_dir
from ._qkeeper import entry_json, failure_json, release_json
from ._qkeys import Settings, as_digest, digest, parse_scope, service_id, service_key
from ._qredis import Store, client, import_redis
from ._qtable import Entry, Release, Table


def _by() -> str:
    return f"operator uid {os.geteuid()} (pid {os.getpid()}) on {socket.gethostname()}"


def _report(scope: str, service: str, sid: str, store: str, entries: list[tuple[Entry, str]],
            failures: list[Any], releases: list[Any], keys: dict[bytes, str]) -> dict[str, Any]:
    now = time.time()
    return {"scope": scope, "service": service, "service_id": sid, "store": store, "available": True,
            "quarantined": [entry_json(e, where, e.key or keys.get(e.digest), now) for e, where in entries
                            if e.live(now)],
            "failures": [failure_json(f, keys.get(f.digest)) for f in failures],
            "releases": [release_json(r, keys.get(r.digest)) for r in releases]}


# ---- a running program ------------------------------------------------------------------------------
def program_report(pid: int, timeout: float) -> list[dict[str, Any]]:
    return [operator.request(pid, "quarantine", timeout)]


def program_release(pid: int, key: str, timeout: float) -> list[tuple[str, bool]]:
    reply = operator.request(pid, "release", timeout, key=key)
    return [(f"program {pid}", bool(reply["released"]))]


# ---- host stores ------------------------------------------------------------------------------------
def _host_stores(service: str | None) -> list[HostStore]:
    try:
        directory = store_dir(create=False)
    except (OSError, StoreUnavailable) as e:
        raise ConfigurationError(f"no host quarantine store for uid {os.geteuid()} on this machine ({e})") \
            from None
    if service is not None:
        paths = [os.path.join(directory, service_id(service) + SUFFIX)]
        if not os.path.exists(paths[0]):
            raise ConfigurationError(f"no host quarantine store for service {service!r} ({paths[0]})")
    else:
        paths = sorted(glob.glob(os.path.join(directory, "*" + SUFFIX)))
    out = []
    for path in paths:
        store = HostStore(service or "", directory)
        store.path = path
        out.append(store)
    return out


def _checked(store: HostStore) -> Table:
    t = store.table()
    t.check_header()
    return t


def host_report(service: str | None) -> list[dict[str, Any]]:
    out = []
    for store in _host_stores(service):
        try:
            t = _checked(store)
            label = t.label()
            out.append(_report("host", service or label, service_id(service) if service else
                               os.path.basename(store.path)[:-len(SUFFIX)], store.path,
                               [(e, "host") for e in t.read_entries()[0]], t.failures(), t.releases(), {}))
        except Exception as e:  # noqa: BLE001 - report each store, damaged or not
            out.append({"scope": "host", "service": service or "?", "store": store.path,
                        "available": False, "error": f"{type(e).__name__}: {e}", "quarantined": [],
                        "failures": [], "releases": []})
    return out


def host_release(key: str, service: str | None) -> list[tuple[str, bool]]:
    out = []
    for store in _host_stores(service):
        t = _checked(store)
        label = service or t.label()
        candidates = [digest(key, t.skey())]
        alt = as_digest(key)
        if alt is not None:
            candidates.append(alt)
        released = False
        with store.transaction() as tx:
            entries = tx.read_entries()[0]
            for dg in candidates:
                if any(e.digest == dg for e in entries):
                    tx.store([e for e in entries if e.digest != dg])
                    tx.add_release(Release(time.time(), dg, os.getpid(), os.geteuid(), _by()))
                    released = True
                    break
        out.append((label, released))
        store.close()
    return out


# ---- Redis ------------------------------------------------------------------------------------------
def _redis(scope: str) -> Any:
    sc = parse_scope(scope)
    if sc.kind != "redis":
        raise ConfigurationError(f"not a Redis scope: {scope!r}")
    try:
        redis = import_redis(sys.path)
    except ImportError:
        raise ConfigurationError("the redis package is not installed: "
                                 "pip install 'forkpoint[redis]'") from None
    return client(redis, Settings(scope=scope), timeout=5.0)


def _redis_services(c: Any, service: str | None) -> list[tuple[str, str]]:
    if service is not None:
        return [(service_id(service), service)]
    out = []
    for raw in sorted(c.smembers("forkpoint:services")):
        sid = raw.decode(errors="replace")
        label = c.hget(f"forkpoint:service:{sid}", "label")
        out.append((sid, label.decode(errors="replace") if label else f"(service id {sid})"))
    return out


def redis_report(scope: str, service: str | None) -> list[dict[str, Any]]:
    c = _redis(scope)
    out = []
    for sid, label in _redis_services(c, service):
        entries, keys, failures, releases, bad = Store(c, sid).read()
        rep = _report(str(parse_scope(scope)), label, sid, str(parse_scope(scope)),
                      [(e, "redis") for e in entries.values()], failures, releases, keys)
        if bad:
            rep["error"] = f"{bad} entries that forkpoint did not write were ignored"
        out.append(rep)
    return out


def redis_release(scope: str, key: str, service: str | None) -> list[tuple[str, bool]]:
    c = _redis(scope)
    out = []
    for sid, label in _redis_services(c, service):
        store = Store(c, sid)
        entries = store.read()[0]
        candidates = [digest(key, service_key(service))] if service is not None else []
        alt = as_digest(key)
        if alt is not None:
            candidates.append(alt)
        if not candidates:
            raise ConfigurationError("to release a key by its text at Redis scope, name its service "
                                     "(--service or FORKPOINT_SERVICE); or give the digest a listing shows")
        released = False
        for dg in candidates:
            if dg in entries:
                released = store.release(dg.hex(), Release(time.time(), dg, os.getpid(), os.geteuid(), _by()),
                                         None)
                break
        out.append((label, released))
    return out
