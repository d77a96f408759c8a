"""The program's children that the shepherd holds, and their exit statuses until the program asks.

Children the original process started before ``start()`` are the shepherd's children from the
moment it takes over; children of a live process that a restore killed are re-parented to it (it is
the child subreaper). The shepherd reaps them like every other child, so it must keep their
statuses for the program (``_children`` asks with a ``ChildQuery``).

*Attributed* children are those known to be the program's: found by a scan of /proc at start and
after each restore (children of the shepherd, or of the live process being retired). Only they
count for "wait for any child", with those reaped while a scan is due (a child of the retired live
process that ended before the scan came: most likely the program's, and asked for by a restored
program's ``os.wait()``); a status the shepherd reaped from a process it never attributed (an
orphaned grandchild at other times) is given only to a wait for that PID.

Of the attributed children, a wait for any child is given only those the asking memory knows: the
children it had at its checkpoint (``ChildQuery.known``) and those the program started before
``start()``, which every memory of it knows. A child that only a rolled-back attempt started is
none of the restored program's: its ``os.wait()`` waited for it, for ever if it never ended (the
workers of a process pool the crashed step made), where the same program without that step gets
ECHILD. A wait for its PID (kept in ``persist()`` memory) still gets it.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

from . import _procfs
from .arena import Arena

MAX_EXITED = 4096       # statuses kept unclaimed; the oldest go first


class Orphans:
    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.me = os.getpid()
        self.alive: dict[int, int] = {}                                 # pid -> process group
        self.exited: OrderedDict[int, tuple[int, int, bool]] = OrderedDict()  # pid -> (status, pgid, ours)
        self.first: set[int] = set()        # started before start(): known to every memory

    def scan(self, parents: set[int], ignore: Callable[[int], bool], first: bool = False) -> None:
        """Attribute the children of ``parents`` (the shepherd, retired live processes); ``first``:
        the scan at start, whose children the program started before ``start()``."""
        for pid, pgid in _procfs.children_of(parents | {self.me}):
            if not ignore(pid) and pid not in self.alive and pid not in self.exited:
                self.alive[pid] = pgid
                if first:
                    self.first.add(pid)
        self._publish()

    def reaped(self, pid: int, status: int, ours: bool = False) -> None:
        """The shepherd reaped ``pid``, which is none of forkpoint's own processes; ``ours``: count
        it as the program's even if no scan attributed it (its parent was a retired live process)."""
        pgid = self.alive.pop(pid, None)
        if pgid is None and ours:
            pgid = os.getpgid(0)        # the program's group, where a retired live process was
        self.exited[pid] = (status, pgid or 0, pgid is not None)
        self.exited.move_to_end(pid)
        while len(self.exited) > MAX_EXITED:
            self.exited.popitem(last=False)
        self._publish()

    def forget(self, pid: int) -> None:
        """``pid`` is one of forkpoint's own processes after all (a scan found it first)."""
        self.first.discard(pid)
        if self.alive.pop(pid, None) is not None or self.exited.pop(pid, None) is not None:
            self._publish()

    def claim(self, pid: int, group: int, known: set[int] | None = None) -> tuple[int, int] | None:
        """Take the status of ``pid`` (pid > 0), or of any attributed child in the process group
        that waitpid's ``pid`` argument names (-1 any, 0 ``group``, < -1 that group) that the
        asking memory knows (``known``; None: every one)."""
        if pid > 0:
            entry = self.exited.pop(pid, None)
        else:
            entry = None
            for p, (_status, pgid, ours) in self.exited.items():
                if ours and self._matches(pid, pgid, group) and self._knows(known, p):
                    entry = self.exited.pop(p)
                    pid = p
                    break
        if entry is None:
            return None
        self.first.discard(pid)
        self._publish()
        return pid, entry[0]

    def running(self, pid: int, group: int, dying: set[int], known: set[int] | None = None) -> list[int]:
        """The held children a wait for ``pid`` is waiting on, still running (or not yet reaped:
        a child of a live process that is still ``dying`` is re-parented only when it is dead)."""
        if pid > 0:
            if pid in self.alive or _procfs.parent_of(pid) in dying | {self.me}:
                return [pid]
            return []
        return [p for p, pgid in self.alive.items()
                if self._matches(pid, pgid, group) and self._knows(known, p)]

    @staticmethod
    def _matches(pid: int, pgid: int, group: int) -> bool:
        return pid == -1 or (pid == 0 and pgid == group) or (pid < -1 and pgid == -pid)

    def _knows(self, known: set[int] | None, pid: int) -> bool:
        return known is None or pid in known or pid in self.first

    def _publish(self) -> None:
        held = len(self.alive) + sum(1 for _, _, ours in self.exited.values() if ours)
        self.arena.set_orphans(held)
