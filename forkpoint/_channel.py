"""The messages between the shepherd and the processes of a program, defined once.

Each process has its own SOCK_SEQPACKET socketpair with the shepherd: message boundaries are kept,
delivery is reliable and ordered, and a channel end can travel to the shepherd with SCM_RIGHTS. A
frozen snapshot blocks in ``recv`` on its channel; that blocking read *is* the saved state waiting.

Every message is one of the dataclasses below, sent as a small JSON object whose ``op`` names its
class. The channels are private socketpairs, never reachable by path, so the only malformed message
is a corrupted one: ``recv`` raises ``MalformedMessage`` for it and the channel stays usable.

The restore protocol, top to bottom::

    live process                     shepherd                         keeper / spare
    tsetjmp: Snap(n) ------------->  registers checkpoint n
             clone() ----------------------------------------------> keeper: Hello(n, pid)+channel
                                     <------------------------------ (on the live process's channel)
                                     Fork --------------------------> keeper forks a spare:
                                     <------------------------------ Spare(n, pid)+channel
                                                                      (or ForkFailed: it stays)
    tlongjmp: Restore(n) --------->  decides (policy), kills the caller,
                                     Wake(n, ...) ------------------> spare returns from tsetjmp
                                     <------------------------------ Up (it runs as the live process)
                                     Fork --------------------------> keeper replaces the spare

A live process in a server's restart mode also says ``Holder(pid)`` (a pidfd with it) when it made
the process that shares its descriptor table (``_fdholder``); nothing answers it.

Hello and Spare carry a pidfd of the new process besides its channel: the shepherd checks with it
that the process is still there (not already reaped, its pid possibly recycled) before it takes
the pid into its registry. A keeper that dies while a spare lives is replaced by that spare
(``Promote``); a restore that cannot get a spare at all (no fork possible) wakes the keeper
itself, which consumes the checkpoint.
"""
from __future__ import annotations

import array
import json
import os
import socket
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

MAX_MESSAGE = 1 << 16
_CMSG_SPACE = socket.CMSG_SPACE(4 * 4)      # room for up to four descriptors


class Op(str, Enum):
    """The wire name of each message."""

    SNAP = "snap"
    HELLO = "hello"
    SPARE = "spare"
    UP = "up"
    RESTORE = "restore"
    DISCARD = "discard"
    LIST = "list"
    THROTTLE = "throttle"
    POLICY = "policy"
    CONFIGURE = "configure"
    CHILD = "child"
    QUARANTINE = "quarantine"
    FORK_FAILED = "forkfailed"
    WAKE = "wake"
    FORK = "fork"
    PROMOTE = "promote"
    HOLDER = "holder"
    OK = "ok"
    ERROR = "error"


class ErrorKind(str, Enum):
    NOSUCH = "nosuch"        # the program raises NoSuchCheckpoint
    CONFIG = "config"        # ... ConfigurationError
    UNKNOWN = "unknown"      # ... ForkpointError


class MalformedMessage(ValueError):
    """A message that is not one of the protocol's, or whose fields do not fit it."""


class Message:
    """Base of every message; ``OP`` is its wire name."""

    OP: ClassVar[Op]


# ---- from the program to the shepherd --------------------------------------------------------------
@dataclass
class Snap(Message):
    """The live process is about to fork checkpoint ``n`` (sent before the fork, signals blocked)."""

    OP = Op.SNAP
    n: int
    pin: bool
    spares: int
    # A protected call checkpointed for itself (@checkpointed, WSGI transactions) says here which
    # input it processes and when it must be over: riding on this message costs it nothing after
    # the fork, where every page it writes is copied.
    key: str | None = None
    deadline: float = 0.0         # CLOCK_MONOTONIC; 0: none


@dataclass
class Hello(Message):
    """A new keeper introduces itself, on the channel of the live process that forked it; the
    keeper's own channel travels with it."""

    OP = Op.HELLO
    n: int
    pid: int
    error: str = ""          # it could not make its channel (sent without one), and exits


@dataclass
class Spare(Message):
    """A keeper forked a spare of checkpoint ``n``; the spare's channel travels with it."""

    OP = Op.SPARE
    n: int
    pid: int


@dataclass
class ForkFailed(Message):
    """A keeper could not fork a spare of checkpoint ``n`` (``errno``); it goes on serving."""

    OP = Op.FORK_FAILED
    n: int
    errno: int
    error: str


@dataclass
class Holder(Message):
    """The live process made ``pid`` to hold its descriptor table (``_fdholder``); a pidfd of it
    travels with this. Not a process of the program's: the shepherd keeps it out of the program's
    children and kills it when the program ends."""

    OP = Op.HOLDER
    pid: int


@dataclass
class Up(Message):
    """A woken spare now runs as the live process."""

    OP = Op.UP


@dataclass
class Restore(Message):
    """``tlongjmp``: kill me and wake checkpoint ``n``. Answered only by an ``Error``.

    ``pending``: the signals pending in the caller as it asked (bit ``s - 1`` for signal ``s``);
    it blocks every signal from before it reads them until it is killed. The shepherd passes them
    on without reading the caller's /proc status on the restore path (see ``Shepherd._retire``).
    """

    OP = Op.RESTORE
    n: int
    sig: int
    reason: str
    pending: int = 0


@dataclass
class Discard(Message):
    """Discard checkpoint ``n``; ``quiet`` asks for no reply; ``current`` resets the current state."""

    OP = Op.DISCARD
    n: int
    quiet: bool = False
    current: int | None = None


@dataclass
class ListCheckpoints(Message):
    """Answered by ``Ok`` with ``checkpoints`` once every keeper has introduced itself."""

    OP = Op.LIST


@dataclass
class Throttle(Message):
    """Before tsetjmp forks a new keeper: answered by ``Ok`` once few enough killed processes are
    left and the keeper of checkpoint ``n`` (this process's previous one, whose pidfd comes with
    the message) has introduced itself or is gone. The bound on processes."""

    OP = Op.THROTTLE
    n: int = 0


@dataclass
class SetPolicy(Message):
    """Replace the recovery policy, or with ``merge`` add ``signals`` and ``settings`` to it."""

    OP = Op.POLICY
    signals: list[int]
    to: int = 0
    merge: bool = False
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Configure(Message):
    OP = Op.CONFIGURE
    settings: dict[str, Any]


@dataclass
class ChildQuery(Message):
    """What became of child ``pid`` (pid <= 0: of any child) that the shepherd holds? Answered by
    ``Ok``: ``pid`` and ``status`` (claimed: asked once), or ``alive`` with a pidfd per running
    child, or nothing at all (no such child). ``known``, with pid <= 0: the children the asking
    memory knew at its checkpoint, the only held ones (with those from before ``start()``) that a
    wait for any child is given (``_orphans``)."""

    OP = Op.CHILD
    pid: int
    known: list[int] | None = None


@dataclass
class QuarantineOp(Message):
    """``forkpoint.quarantine(key)`` (``action`` "add") or ``release(key)`` ("release") by hand:
    the shepherd is the one writer of the quarantine tables. Answered by ``Ok`` (``found``)."""

    OP = Op.QUARANTINE
    action: str
    key: str


# ---- from the shepherd to the program ---------------------------------------------------------------
@dataclass
class Wake(Message):
    """To a spare: become the live process, restored to checkpoint ``n``."""

    OP = Op.WAKE
    n: int
    from_state: int
    sig: int
    reason: str
    attempt: int
    t: float                 # CLOCK_MONOTONIC when the shepherd saw the failure
    hold: bool = False       # signals wait for it: after Up, keep them blocked until the shepherd's Ok
    replay: int = 0          # signals (bit s - 1) the shepherd sends again after the Up (_shepherd_signals)


@dataclass
class Fork(Message):
    """To a keeper: fork a spare."""

    OP = Op.FORK


@dataclass
class Promote(Message):
    """To a spare whose keeper died: become the checkpoint's keeper."""

    OP = Op.PROMOTE


@dataclass
class Ok(Message):
    OP = Op.OK
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Error(Message):
    OP = Op.ERROR
    kind: ErrorKind
    message: str


_CLASSES: dict[str, type[Message]] = {
    cls.OP.value: cls for cls in (Snap, Hello, Spare, ForkFailed, Up, Restore, Discard, ListCheckpoints,
                                  Throttle, SetPolicy, Configure, ChildQuery, Wake, Fork, Promote, Ok,
                                  Error, QuarantineOp, Holder)}
# The JSON types each field may hold, read once from the annotations.
_TYPES = {"int": (int,), "bool": (bool,), "str": (str,), "float": (int, float),
          "int | None": (int, type(None)), "str | None": (str, type(None)), "list[int]": (list,),
          "list[int] | None": (list, type(None)),
          "dict[str, Any]": (dict,), "ErrorKind": (str,)}
_FIELDS: dict[type[Message], list[tuple[str, tuple[type, ...]]]] = {
    cls: [(f.name, _TYPES[str(f.type)]) for f in fields(cls)] for cls in _CLASSES.values()}  # type: ignore[arg-type]


# Encoding and decoding by hand, to the byte what ``json`` produces and accepts for these messages,
# without its per-call setup (a few hundred bytecodes a message). Every restore carries three
# messages through the shepherd and one through the woken spare, on the restore path, and the live
# process sends one inside tsetjmp(), where every page it writes after the fork is a copy-on-write
# fault. Anything that is not a plain scalar (a dict, a list, an enum, a NaN) goes through ``json``.
_HEADS: dict[type[Message], str] = {cls: '{"op":"' + cls.OP.value + '"' for cls in _CLASSES.values()}
_NAMES: dict[type[Message], tuple[str, ...]] = {cls: tuple(name for name, _ in _FIELDS[cls])
                                                for cls in _CLASSES.values()}
_quote = json.encoder.encode_basestring_ascii          # json.dumps's own (C) string encoder
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # json.loads's own (C) scanner
_INFINITIES = (float("inf"), float("-inf"))


def _json_encode(msg: Message) -> bytes:
    return json.dumps({"op": msg.OP.value, **vars(msg)}, separators=(",", ":")).encode()


def encode(msg: Message) -> bytes:
    cls = type(msg)
    parts = [_HEADS[cls]]
    for name in _NAMES[cls]:
        v = getattr(msg, name)
        t = type(v)
        if t is int:
            text = int.__repr__(v)
        elif t is bool:
            text = "true" if v else "false"
        elif t is str:
            text = _quote(v)
        elif v is None:
            text = "null"
        elif t is float and v == v and v not in _INFINITIES:
            text = float.__repr__(v)
        else:
            return _json_encode(msg)
        parts.append(',"' + name + '":' + text)
    parts.append("}")
    return "".join(parts).encode()


# The two messages of every protected call, formatted in one operation each: ``Snap`` right before
# tsetjmp()'s fork and the committing ``Discard`` while the call's keeper still shares every page,
# so that each page they touch is copied. ``encode()`` builds a dataclass and walks its fields
# (timed in a gunicorn worker: 60 us for the commit's send to a socket nobody waited on, 75 us to the
# shepherd). Byte for byte what ``encode`` produces (tests/test_core.py checks it); anything but
# the plain types goes through ``encode``.
def encode_snap(n: int, pin: bool, spares: int, key: str | None, deadline: float) -> bytes:
    """``encode(Snap(n, pin, spares, key, deadline))``."""
    if (type(n) is int and type(pin) is bool and type(spares) is int and type(deadline) is float
            and deadline == deadline and deadline not in _INFINITIES and (key is None or type(key) is str)):
        return b'{"op":"snap","n":%d,"pin":%s,"spares":%d,"key":%s,"deadline":%r}' % (
            n, b"true" if pin else b"false", spares, b"null" if key is None else _quote(key).encode(),
            deadline)
    return encode(Snap(n, pin, spares, key, deadline))


def encode_commit(n: int, current: int) -> bytes:
    """``encode(Discard(n, quiet=True, current=current))``."""
    if type(n) is int and type(current) is int:
        return b'{"op":"discard","n":%d,"quiet":true,"current":%d}' % (n, current)
    return encode(Discard(n, quiet=True, current=current))


def decode(data: bytes) -> Message:
    try:
        text = data.decode()
        raw, end = _scan(text, 0)
        if end != len(text) or type(raw) is not dict:
            raise ValueError("not one JSON object")
        cls = _CLASSES[raw.pop("op")]
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
        raise MalformedMessage(f"not a forkpoint message: {data[:80]!r}") from e
    for name, types in _FIELDS[cls]:
        value = raw.get(name)
        if name in raw and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            raise MalformedMessage(f"{cls.__name__}.{name} cannot be {value!r}")
    if cls is Error:
        try:
            raw["kind"] = ErrorKind(raw.get("kind"))
        except ValueError:
            raw["kind"] = ErrorKind.UNKNOWN
    try:
        return cls(**raw)
    except TypeError as e:
        raise MalformedMessage(f"{cls.__name__}: {e}") from None


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, msg: Message, fds: tuple[int, ...] = ()) -> None:
    data = encode(msg)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.send(data)


def recv(sock: socket.socket, flags: int = 0) -> tuple[Message | None, list[int]]:
    """Receive one message and any descriptors with it; ``(None, [])`` means the peer is gone.

    A malformed message raises ``MalformedMessage`` after its descriptors were closed. ``flags``
    go to recvmsg (the shepherd passes MSG_DONTWAIT).
    """
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(MAX_MESSAGE, _CMSG_SPACE, flags)
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        return None, list(fds)
    try:
        return decode(data), list(fds)
    except MalformedMessage:
        for fd in fds:
            _close(fd)
        raise


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
