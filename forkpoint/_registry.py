"""The shepherd's registry: the program's processes, each in one role, and its checkpoints.

A checkpoint is a keeper (the frozen process forked by ``tsetjmp()``) and the spares it forks, ready
copies that a restore wakes. The shepherd's parts (``_shepherd``, ``_shepherd_signals``,
``_shepherd_restores``, ``_shepherd_limits``) share these records and nothing else of their own.
"""
from __future__ import annotations

import enum
import socket
import time

from ._channel import Wake
from ._record import Record


class Role(enum.Enum):
    LIVE = "live"             # runs program code; at most one
    KEEPER = "keeper"         # checkpoint n itself; forks spares
    SPARE = "spare"           # a ready copy of a keeper; a restore wakes it
    DYING = "dying"           # killed, or its work is over; only a keeper's hello may still come
    HOLDER = "holder"         # shares a live process's descriptor table (_fdholder); not the program's
    WITNESS = "witness"       # holds the signals sent to the program's group (_witness); not the program's


class Proc(Record):
    __slots__ = ("pid", "role", "n", "chan", "lived", "may_fork", "forwarded", "held", "reported_pending",
                 "cpu0")
    pid: int
    role: Role
    n: int
    chan: socket.socket | None
    lived: bool                   # has run program code: its channel carries keepers' hellos
    # A keeper that may have forked a spare: one of a checkpoint taken with spares, or asked for a
    # copy. Only such a keeper's unreported forks are looked for when it is killed (_kill_forks:
    # a read of the kernel's child lists and of each child's stat, on every committed transaction).
    may_fork: bool
    forwarded: set[int]           # signals the shepherd sent it
    held: bool                    # woken with Wake.hold: it waits for an Ok after its Up
    reported_pending: int | None  # its pending signals as its Restore gave them
    cpu0: tuple[int, int]         # its own CPU time (user, system ns) when it became live

    def __init__(self, pid: int, role: Role, n: int, chan: socket.socket | None, lived: bool = False,
                 may_fork: bool = False, forwarded: set[int] | None = None, held: bool = False,
                 reported_pending: int | None = None, cpu0: tuple[int, int] = (0, 0)) -> None:
        self.pid = pid
        self.role = role
        self.n = n
        self.chan = chan
        self.lived = lived
        self.may_fork = may_fork
        self.forwarded = set() if forwarded is None else forwarded
        self.held = held
        self.reported_pending = reported_pending
        self.cpu0 = cpu0


class Checkpoint(Record):
    __slots__ = ("n", "keeper", "pinned", "taken", "spares", "pending", "want_spares", "looping_until",
                 "keeper_urgent", "awaiting", "announcer", "key", "deadline", "forking", "fork_failures",
                 "delivered", "after_failure", "replay_due")
    n: int
    keeper: Proc | None
    pinned: bool
    taken: float
    spares: list[Proc]
    pending: Wake | None          # a restore waiting for a spare of this checkpoint
    want_spares: int
    looping_until: float          # a restore had to wait for a copy: the keeper forks urgently until then
    keeper_urgent: bool           # the keeper was raised from SCHED_IDLE for copies a restore needs
    awaiting: bool                # the keeper has not introduced itself yet
    announcer: Proc | None        # the live process that took it: its keeper says hello on its channel
    key: str | None               # a protected call's input and deadline (see _channel.Snap)
    deadline: float
    forking: int                  # spares asked of the keeper (or owed by a new one) not yet arrived
    fork_failures: int            # failed forks in a row (the process limit): asked again later
    # Signals from users and terminals that reached the live process after this checkpoint was
    # announced: a rollback to it undoes their handlers' work, so they are handled again (_replay).
    delivered: set[int]
    after_failure: bool           # the restore pending into it is a failure's (not a plain tlongjmp)
    replay_due: bool              # that restore must replay them (decided at its wake)

    def __init__(self, n: int, keeper: Proc | None, pinned: bool, taken: float | None = None,
                 spares: list[Proc] | None = None, pending: Wake | None = None, want_spares: int = 1,
                 looping_until: float = 0.0, keeper_urgent: bool = False, awaiting: bool = False,
                 announcer: Proc | None = None, key: str | None = None, deadline: float = 0.0,
                 forking: int = 0, fork_failures: int = 0, delivered: set[int] | None = None,
                 after_failure: bool = False, replay_due: bool = False) -> None:
        self.n = n
        self.keeper = keeper
        self.pinned = pinned
        self.taken = time.time() if taken is None else taken
        self.spares = [] if spares is None else spares
        self.pending = pending
        self.want_spares = want_spares
        self.looping_until = looping_until
        self.keeper_urgent = keeper_urgent
        self.awaiting = awaiting
        self.announcer = announcer
        self.key = key
        self.deadline = deadline
        self.forking = forking
        self.fork_failures = fork_failures
        self.delivered = set() if delivered is None else delivered
        self.after_failure = after_failure
        self.replay_due = replay_due
