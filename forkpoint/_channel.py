"""The messages between the shepherd and the processes of a program, defined once.

Each process has its own SOCK_SEQPACKET socketpair with the shepherd: message boundaries are kept,
delivery is reliable and ordered, and a channel end can travel to the shepherd with SCM_RIGHTS. A
frozen snapshot blocks in ``recv`` on its channel; that blocking read *is* the saved state waiting.

Every message is one of the classes below, sent as a small JSON object whose ``op`` names its
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
from enum import Enum
from typing import Any, ClassVar

from ._record import Record

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


class Message(Record):
    """Base of every message; ``OP`` is its wire name, ``__slots__`` its fields in wire order
    (a plain class: ``_record``)."""

    OP: ClassVar[Op]
    __slots__ = ()

    def __init__(self) -> None:      # a message without fields (decode's errors name __init__)
        pass


# ---- from the program to the shepherd --------------------------------------------------------------
class Snap(Message):
    """The live process is about to fork checkpoint ``n`` (sent before the fork, signals blocked)."""

    OP = Op.SNAP
    __slots__ = ("n", "pin", "spares", "key", "deadline")
    n: int
    pin: bool
    spares: int
    # A protected call checkpointed for itself (@checkpointed, WSGI transactions) says here which
    # input it processes and when it must be over: riding on this message costs it nothing after
    # the fork, where every page it writes is copied.
    key: str | None
    deadline: float  # CLOCK_MONOTONIC; 0: none

    def __init__(self, n: int, pin: bool, spares: int, key: str | None = None, deadline: float = 0.0) -> None:
        self.n = n
        self.pin = pin
        self.spares = spares
        self.key = key
        self.deadline = deadline


class Hello(Message):
    """A new keeper introduces itself, on the channel of the live process that forked it; the
    keeper's own channel travels with it."""

    OP = Op.HELLO
    __slots__ = ("n", "pid", "error")
    n: int
    pid: int
    error: str  # it could not make its channel (sent without one), and exits

    def __init__(self, n: int, pid: int, error: str = "") -> None:
        self.n = n
        self.pid = pid
        self.error = error


class Spare(Message):
    """A keeper forked a spare of checkpoint ``n``; the spare's channel travels with it."""

    OP = Op.SPARE
    __slots__ = ("n", "pid")
    n: int
    pid: int

    def __init__(self, n: int, pid: int) -> None:
        self.n = n
        self.pid = pid


class ForkFailed(Message):
    """A keeper could not fork a spare of checkpoint ``n`` (``errno``); it goes on serving."""

    OP = Op.FORK_FAILED
    __slots__ = ("n", "errno", "error")
    n: int
    errno: int
    error: str

    def __init__(self, n: int, errno: int, error: str) -> None:
        self.n = n
        self.errno = errno
        self.error = error


class Holder(Message):
    """The live process made ``pid`` to hold its descriptor table (``_fdholder``); a pidfd of it
    travels with this. Not a process of the program's: the shepherd keeps it out of the program's
    children and kills it when the program ends."""

    OP = Op.HOLDER
    __slots__ = ("pid",)
    pid: int

    def __init__(self, pid: int) -> None:
        self.pid = pid


class Up(Message):
    """A woken spare now runs as the live process."""

    OP = Op.UP
    __slots__ = ()


class Restore(Message):
    """``tlongjmp``: kill me and wake checkpoint ``n``. Answered only by an ``Error``.

    ``pending``: the signals pending in the caller as it asked (bit ``s - 1`` for signal ``s``);
    it blocks every signal from before it reads them until it is killed. The shepherd passes them
    on without reading the caller's /proc status on the restore path (see ``Shepherd._retire``).
    """

    OP = Op.RESTORE
    __slots__ = ("n", "sig", "reason", "pending")
    n: int
    sig: int
    reason: str
    pending: int

    def __init__(self, n: int, sig: int, reason: str, pending: int = 0) -> None:
        self.n = n
        self.sig = sig
        self.reason = reason
        self.pending = pending


class Discard(Message):
    """Discard checkpoint ``n``; ``quiet`` asks for no reply; ``current`` resets the current state."""

    OP = Op.DISCARD
    __slots__ = ("n", "quiet", "current")
    n: int
    quiet: bool
    current: int | None

    def __init__(self, n: int, quiet: bool = False, current: int | None = None) -> None:
        self.n = n
        self.quiet = quiet
        self.current = current


class ListCheckpoints(Message):
    """Answered by ``Ok`` with ``checkpoints`` once every keeper has introduced itself."""

    OP = Op.LIST
    __slots__ = ()


class Throttle(Message):
    """Before tsetjmp forks a new keeper: answered by ``Ok`` once few enough killed processes are
    left and the keeper of checkpoint ``n`` (this process's previous one, whose pidfd comes with
    the message) has introduced itself or is gone. The bound on processes."""

    OP = Op.THROTTLE
    __slots__ = ("n",)
    n: int

    def __init__(self, n: int = 0) -> None:
        self.n = n


class SetPolicy(Message):
    """Replace the recovery policy, or with ``merge`` add ``signals`` and ``settings`` to it."""

    OP = Op.POLICY
    __slots__ = ("signals", "to", "merge", "settings")
    signals: list[int]
    to: int
    merge: bool
    settings: dict[str, Any]

    def __init__(self, signals: list[int], to: int = 0, merge: bool = False,
                 settings: dict[str, Any] | None = None) -> None:
        self.signals = signals
        self.to = to
        self.merge = merge
        self.settings = {} if settings is None else settings


class Configure(Message):
    OP = Op.CONFIGURE
    __slots__ = ("settings",)
    settings: dict[str, Any]

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings


class ChildQuery(Message):
    """What became of child ``pid`` (pid <= 0: of any child) that the shepherd holds? Answered by
    ``Ok``: ``pid`` and ``status`` (claimed: asked once), or ``alive`` with a pidfd per running
    child, or nothing at all (no such child). ``known``, with pid <= 0: the children the asking
    memory knew at its checkpoint, the only held ones (with those from before ``start()``) that a
    wait for any child is given (``_orphans``)."""

    OP = Op.CHILD
    __slots__ = ("pid", "known")
    pid: int
    known: list[int] | None

    def __init__(self, pid: int, known: list[int] | None = None) -> None:
        self.pid = pid
        self.known = known


class QuarantineOp(Message):
    """``forkpoint.quarantine(key)`` (``action`` "add") or ``release(key)`` ("release") by hand:
    the shepherd is the one writer of the quarantine tables. Answered by ``Ok`` (``found``)."""

    OP = Op.QUARANTINE
    __slots__ = ("action", "key")
    action: str
    key: str

    def __init__(self, action: str, key: str) -> None:
        self.action = action
        self.key = key


# ---- from the shepherd to the program ---------------------------------------------------------------
class Wake(Message):
    """To a spare: become the live process, restored to checkpoint ``n``."""

    OP = Op.WAKE
    __slots__ = ("n", "from_state", "sig", "reason", "attempt", "t", "hold", "replay")
    n: int
    from_state: int
    sig: int
    reason: str
    attempt: int
    t: float  # CLOCK_MONOTONIC when the shepherd saw the failure
    hold: bool  # signals wait for it: after Up, keep them blocked until the shepherd's Ok
    replay: int  # signals (bit s - 1) the shepherd sends again after the Up (_shepherd_signals)

    def __init__(self, n: int, from_state: int, sig: int, reason: str, attempt: int, t: float,
                 hold: bool = False, replay: int = 0) -> None:
        self.n = n
        self.from_state = from_state
        self.sig = sig
        self.reason = reason
        self.attempt = attempt
        self.t = t
        self.hold = hold
        self.replay = replay


class Fork(Message):
    """To a keeper: fork a spare."""

    OP = Op.FORK
    __slots__ = ()


class Promote(Message):
    """To a spare whose keeper died: become the checkpoint's keeper."""

    OP = Op.PROMOTE
    __slots__ = ()


class Ok(Message):
    OP = Op.OK
    __slots__ = ("data",)
    data: dict[str, Any]

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = {} if data is None else data


class Error(Message):
    OP = Op.ERROR
    __slots__ = ("kind", "message")
    kind: ErrorKind
    message: str

    def __init__(self, kind: ErrorKind, message: str) -> None:
        self.kind = kind
        self.message = message


_CLASSES: dict[str, type[Message]] = {
    cls.OP.value: cls for cls in (Snap, Hello, Spare, ForkFailed, Up, Restore, Discard, ListCheckpoints,
                                  Throttle, SetPolicy, Configure, ChildQuery, Wake, Fork, Promote, Ok,
                                  Error, QuarantineOp, Holder)}
# The JSON types each field may hold, read once from the annotations (``__slots__`` gives the order).
_TYPES = {"int": (int,), "bool": (bool,), "str": (str,), "float": (int, float),
          "int | None": (int, type(None)), "str | None": (str, type(None)), "list[int]": (list,),
          "list[int] | None": (list, type(None)),
          "dict[str, Any]": (dict,), "ErrorKind": (str,)}


def _fields_of(cls: type[Message]) -> list[tuple[str, tuple[type, ...]]]:
    names: tuple[str, ...] = cls.__slots__
    return [(name, _TYPES[cls.__dict__["__annotations__"][name]]) for name in names]


_FIELDS: dict[type[Message], list[tuple[str, tuple[type, ...]]]] = {
    cls: _fields_of(cls) for cls in _CLASSES.values()}


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
    return json.dumps({"op": msg.OP.value, **msg.as_dict()}, separators=(",", ":")).encode()


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
# so that each page they touch is copied. ``encode()`` builds a message and walks its fields
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
