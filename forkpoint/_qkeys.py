"""Quarantine settings: the scope, the service, the time to live, and how input keys are hashed.

A quarantine has a *scope* (``forkpoint.configure(quarantine=...)`` or ``FORKPOINT_QUARANTINE``):

* ``process`` (the default): the program's own quarantine, in its arena;
* ``host``: shared by every forkpoint program of the same service and user on this machine, in a
  0600 file of the user's private runtime directory (``_qhost``);
* ``redis://HOST[:PORT][/DB]``: shared by every program of the service that points at that Redis
  (``_qredis``).

The *service* is ``configure(service=...)``, else ``FORKPOINT_SERVICE``, else the command line of
the program's process group leader (the workers of one gunicorn or uvicorn server are in their
master's group, so they share with no configuration), else the program's own command line.

Keys are hashed before a shared store sees them: BLAKE2b-128, keyed with a digest of the service
name, so the same key gives the same digest on every host of the service and a different one in
another service. Nothing of a request leaves the process unless ``quarantine_keys="plain"`` asks
for the key text to be stored beside its digest.
"""
from __future__ import annotations

import math
import os
import re
import socket
import sys
from collections.abc import Mapping
from typing import Any

from ._errors import ConfigurationError
from ._record import Record

try:
    # hashlib.blake2b is this very class; hashlib itself loads OpenSSL (3 ms of the shepherd's start).
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - an interpreter without the module
    from hashlib import blake2b

ENV_SCOPE = "FORKPOINT_QUARANTINE"
ENV_SERVICE = "FORKPOINT_SERVICE"
ENV_TTL = "FORKPOINT_QUARANTINE_TTL"
ENV_KEYS = "FORKPOINT_QUARANTINE_KEYS"
MAX_KEY = 256                  # bytes of a key's text
MAX_SERVICE = 4096             # bytes of a service name
DIGEST_HEX = 32                # a key digest: 16 bytes, shown as 32 hex digits
_HEX = re.compile(r"[0-9a-f]{32}")
_SHEPHERD_MARK = "fp-shepherd"  # argv[6] of an exec'd shepherd: the program's own argv follows


class Scope(Record):
    """A parsed scope; immutable and hashable, as the frozen dataclass it was."""

    __slots__ = ("kind", "host", "port", "db", "username", "password")
    kind: str                   # "process", "host" or "redis"
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    def __init__(self, kind: str, host: str = "", port: int = 0, db: int = 0, username: str | None = None,
                 password: str | None = None) -> None:
        for name, value in zip(self.__slots__, (kind, host, port, db, username, password), strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(getattr(self, name) for name in self.__slots__))

    def __reduce__(self) -> tuple[type[Scope], tuple[Any, ...]]:
        # copy, deepcopy and pickle set a slotted object's fields with setattr, which refuses
        return (Scope, tuple(getattr(self, name) for name in self.__slots__))

    @property
    def shared(self) -> bool:
        return self.kind != "process"

    def __str__(self) -> str:
        """The scope as it may be logged and shown: a Redis password is never part of it."""
        if self.kind != "redis":
            return self.kind
        auth = "***@" if self.password is not None or self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}"


def parse_scope(text: object, source: str = "quarantine") -> Scope:
    """``process``, ``host`` or ``redis://[user:password@]HOST[:PORT][/DB]``."""
    if not isinstance(text, str):
        raise ConfigurationError(f"{source} must be a str ('process', 'host' or 'redis://HOST:PORT/DB'), "
                                 f"not {type(text).__name__}")
    t = text.strip()
    if t in ("process", "host"):
        return Scope(t)
    if not t.lower().startswith("redis://"):
        raise ConfigurationError(f"{source}: unknown quarantine scope {text!r}: expected 'process', 'host' "
                                 "or 'redis://HOST[:PORT][/DB]'")
    # Imported here, not with the module: only a Redis scope needs it (urllib.parse and the
    # ipaddress it imports are 5 ms of the shepherd's start otherwise). The first parse of a Redis
    # scope is in configure() or the shepherd's start (Keeper), never later in a long run.
    from urllib.parse import unquote, urlsplit  # noqa: PLC0415
    try:
        u = urlsplit(t)
        port = u.port if u.port is not None else 6379
    except ValueError as e:
        raise ConfigurationError(f"{source}: bad Redis URL {_redact(t)!r}: {e}") from None
    if not u.hostname:
        raise ConfigurationError(f"{source}: bad Redis URL {_redact(t)!r}: no host")
    if u.query or u.fragment:
        raise ConfigurationError(f"{source}: bad Redis URL {_redact(t)!r}: no query or fragment allowed")
    path = u.path.strip("/")
    if path and not path.isdigit():
        raise ConfigurationError(f"{source}: bad Redis URL {_redact(t)!r}: the database must be a "
                                 f"number, got {path!r}")
    if not 0 < port < 65536:
        raise ConfigurationError(f"{source}: bad Redis URL {_redact(t)!r}: port {port} out of range")
    return Scope("redis", u.hostname, port, int(path or 0),
                 unquote(u.username) if u.username else None,
                 unquote(u.password) if u.password is not None else None)


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)


def parse_ttl(value: object, source: str = "quarantine_ttl") -> float | None:
    """None (permanent until released) or a positive, finite number of seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("", "none", "never", "0"):
            return None
        try:
            value = float(value)
        except ValueError:
            raise ConfigurationError(f"{source} must be a positive number of seconds or None, "
                                     f"got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigurationError(f"{source} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def parse_keys(value: object, source: str = "quarantine_keys") -> bool:
    """``"hashed"`` (the default) or ``"plain"``; returns whether key texts are stored."""
    if value in ("hashed", "plain"):
        return value == "plain"
    raise ConfigurationError(f"{source} must be 'hashed' or 'plain', got {value!r}")


def parse_service(value: object, source: str = "service") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{source} must be a non-empty str, got {value!r}")
    if len(value.encode()) > MAX_SERVICE:
        raise ConfigurationError(f"{source} must be at most {MAX_SERVICE} bytes")
    return value


def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]
    if _SHEPHERD_MARK in argv[:8]:      # a forkpoint program's face: its own argv follows the mark
        argv = argv[argv.index(_SHEPHERD_MARK) + 1:]
    return argv or None


def default_service(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(service, where it came from): FORKPOINT_SERVICE, the group leader's or our command line."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_SERVICE):
        return parse_service(environ[ENV_SERVICE], ENV_SERVICE), ENV_SERVICE
    pgid = os.getpgrp()
    argv = _cmdline(pgid)
    if argv:
        return " ".join(argv), f"command line of process group leader {pgid}"
    return " ".join(sys.orig_argv), "the program's own command line"


def service_key(service: str) -> bytes:
    return blake2b(service.encode(), digest_size=32, person=b"fp-service").digest()


def service_id(service: str) -> str:
    """A short name for the service in file names and Redis keys (no text of the service)."""
    return blake2b(service.encode(), digest_size=8, person=b"fp-svc-id").hexdigest()


_HASHERS: dict[bytes, Any] = {}


def digest(key: str, skey: bytes) -> bytes:
    """The key's digest for the service whose hashing key is ``skey`` (0.7 us: a keyed hasher is
    made once per service and copied, where making one per key costs 1.8 us)."""
    base = _HASHERS.get(skey)
    if base is None:
        base = _HASHERS[skey] = blake2b(digest_size=16, key=skey)
    h = base.copy()
    h.update(key.encode())
    return h.digest()


def as_digest(text: str) -> bytes | None:
    """The digest that ``text`` spells in hex (as listings show it), if it is one."""
    t = text.strip().lower()
    return bytes.fromhex(t) if _HEX.fullmatch(t) else None


def check_key(key: object) -> str:
    if not isinstance(key, str):
        key = repr(key)
    if not key or len(key.encode()) > MAX_KEY:
        raise ValueError(f"an input key must be a non-empty str of at most {MAX_KEY} bytes")
    return key


class Settings(Record):
    """The quarantine settings of one program, resolved once (before the shepherd starts)."""

    __slots__ = ("scope", "service", "service_source", "ttl", "plain", "sys_path", "host")

    def __init__(self, scope: str = "process", service: str = "", service_source: str = "",
                 ttl: float | None = None, plain: bool = False, sys_path: list[str] | None = None,
                 host: str | None = None) -> None:
        self.scope = scope
        self.service = service
        self.service_source = service_source
        self.ttl = ttl
        self.plain = plain
        self.sys_path: list[str] = [] if sys_path is None else sys_path
        self.host = socket.gethostname() if host is None else host

    @property
    def explicit(self) -> bool:
        """Whether the service was named (not derived from a command line)."""
        return self.service_source in (ENV_SERVICE, "configure(service=...)")

    @property
    def parsed(self) -> Scope:
        return parse_scope(self.scope)

    @property
    def skey(self) -> bytes:
        return service_key(self.service)

    def to_args(self) -> dict[str, Any]:
        args = self.as_dict()
        args["sys_path"] = list(self.sys_path)       # (a copy, as dataclasses.asdict made)
        return args

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Settings:
        return cls(**{k: v for k, v in args.items() if k in cls.__slots__})


def resolve(scope: str | None, service: str | None, ttl: object, keys: str | None,
            environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``configure()`` values (None: not set) and the environment."""
    environ = os.environ if environ is None else environ
    if scope is None:
        sc = parse_scope(environ.get(ENV_SCOPE) or "process", ENV_SCOPE)
    else:
        sc = parse_scope(scope)
    if service is None:
        svc, how = default_service(environ)
    else:
        svc, how = parse_service(service), "configure(service=...)"
    t = parse_ttl(environ.get(ENV_TTL), ENV_TTL) if ttl is None and environ.get(ENV_TTL) else parse_ttl(ttl)
    plain = parse_keys(keys if keys is not None else (environ.get(ENV_KEYS) or "hashed"),
                       "quarantine_keys" if keys is not None else ENV_KEYS)
    text = scope if scope is not None else (environ.get(ENV_SCOPE) or "process")
    return Settings(scope=text.strip() if sc.kind == "redis" else sc.kind, service=svc, service_source=how,
                    ttl=t, plain=plain, sys_path=[p for p in sys.path if isinstance(p, str)])
