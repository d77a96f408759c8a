"""The shepherd's registry: the program's processes, each in one role, and its checkpoints.

A checkpoint is a keeper (the frozen process forked by ``tsetjmp()``) and the spares it forks, ready
copies that a restore wakes. The shepherd's parts (``_shepherd``, ``_shepherd_signals``,
``_shepherd_restores``, ``_shepherd_limits``) share these records and nothing else of their own.
"""
from __future__ import annotations

import enum
import socket
import time
from dataclasses import dataclass, field

from ._channel import Wake


class Role(enum.Enum):
    LIVE = "live"             # runs program code; at most one
    KEEPER = "keeper"         # checkpoint n itself; forks spares
    SPARE = "spare"           # a ready copy of a keeper; a restore wakes it
    DYING = "dying"           # killed, or its work is over; only a keeper's hello may still come
    HOLDER = "holder"         # shares a live process's descriptor table (_fdholder); not the program's
    WITNESS = "witness"       # holds the signals sent to the program's group (_witness); not the program's


@dataclass
class Proc:
    pid: int
    role: Role
    n: int
    chan: socket.socket | None
    lived: bool = False           # has run program code: its channel carries keepers' hellos
    # A keeper that may have forked a spare: one of a checkpoint taken with spares, or asked for a
    # copy. Only such a keeper's unreported forks are looked for when it is killed (_kill_forks:
    # a read of the kernel's child lists and of each child's stat, on every committed transaction).
    may_fork: bool = False
    forwarded: set[int] = field(default_factory=set)   # signals the shepherd sent it
    held: bool = False            # woken with Wake.hold: it waits for an Ok after its Up
    reported_pending: int | None = None   # its pending signals as its Restore gave them
    cpu0: tuple[int, int] = (0, 0)   # its own CPU time (user, system ns) when it became live


@dataclass
class Checkpoint:
    n: int
    keeper: Proc | None
    pinned: bool
    taken: float = field(default_factory=time.time)
    spares: list[Proc] = field(default_factory=list)
    pending: Wake | None = None   # a restore waiting for a spare of this checkpoint
    want_spares: int = 1
    looping_until: float = 0.0    # a restore had to wait for a copy: the keeper forks urgently until then
    keeper_urgent: bool = False   # the keeper was raised from SCHED_IDLE for copies a restore needs
    awaiting: bool = False        # the keeper has not introduced itself yet
    announcer: Proc | None = None  # the live process that took it: its keeper says hello on its channel
    key: str | None = None        # a protected call's input and deadline (see _channel.Snap)
    deadline: float = 0.0
    forking: int = 0              # spares asked of the keeper (or owed by a new one) not yet arrived
    fork_failures: int = 0        # failed forks in a row (the process limit): asked again later
    # Signals from users and terminals that reached the live process after this checkpoint was
    # announced: a rollback to it undoes their handlers' work, so they are handled again (_replay).
    delivered: set[int] = field(default_factory=set)
    after_failure: bool = False   # the restore pending into it is a failure's (not a plain tlongjmp)
    replay_due: bool = False      # that restore must replay them (decided at its wake)
