"""Recovery policy: how the shepherd decides what a crash costs.

Modelled on supervisors that have run for decades:

* Erlang/OTP restart intensity: at most ``max_recoveries`` recoveries of one kind (same checkpoint,
  same signal) within ``within`` seconds; past that, escalate.
  Deaths by a signal and jumps with a signal (a watchdog's SIGALRM) count; a plain ``tlongjmp()``
  is the program's own control flow and does not.
* Escalation as in Rx (SOSP 2005): first roll back further, to the checkpoint before the one that
  keeps failing (an older, simpler state); if the same failure exhausts a budget again within the
  window, give up: the program ends by the crash's own signal, so systemd or Kubernetes sees a real
  failure instead of a program that spins.
* systemd's growing ``RestartSec``: ``backoff`` seconds before the first repeat, doubling per repeat,
  capped at ``backoff_max``.
* The paper's input filtering: a crash that repeats while the same input key is being processed
  quarantines that key, so the restored program skips the input and serves the next one.

Counters are windows of timestamps, so a stable period resets them by itself: a program that crashes
once a day is never given up on. So does work: a budget is for a state that keeps failing, and a
failure blamed on an input after the restored program served at least as many inputs (outermost
``processing()`` blocks, the WSGI and ASGI wrappers' requests, ``Arena.served``) as failed in the
window is not that. The count
starts afresh there. A server whose distinct poisoned requests (a fuzzer, one bad upload retried
under new query strings) each crash it once, each then quarantined, was given up on at the sixth
within a minute while it answered everything else: a lone uvicorn ended. A state that fails every
input still exhausts its budget, unless something else is served as often as it fails (a health
check answered between every two failures: a count cannot tell inputs apart).
This module is pure logic; the shepherd feeds it events.
"""
from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ._record import Record
from .arena import QUARANTINE_SIZE

_COUNTS = ("max_recoveries", "quarantine_after", "quarantine_size")
_SECONDS = ("within", "backoff", "backoff_max")


class Policy(Record):
    __slots__ = ("signals", "to", "max_recoveries", "within", "backoff", "backoff_max", "quarantine_after",
                 "quarantine_size")

    def __init__(self, signals: set[int] | None = None, to: int = 0, max_recoveries: int = 5,
                 within: float = 60.0, backoff: float = 0.0, backoff_max: float = 30.0,
                 quarantine_after: int = 2, quarantine_size: int = QUARANTINE_SIZE) -> None:
        self.signals: set[int] = set() if signals is None else signals
        self.to = to
        self.max_recoveries = max_recoveries
        self.within = within
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.quarantine_after = quarantine_after
        self.quarantine_size = quarantine_size

    @classmethod
    def build(cls, signals: Iterable[int], to: int, settings: Mapping[str, Any]) -> Policy:
        """A policy from ``recover_on()``'s arguments; ValueError names a bad setting."""
        unknown = set(settings) - set(_COUNTS) - set(_SECONDS)
        if unknown:
            raise ValueError(f"unknown recovery policy setting(s): {', '.join(sorted(unknown))}")
        p = cls(signals=set(signals), to=int(to))
        for name in _COUNTS:
            if name in settings:
                v = settings[name]
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"{name} must be a positive int, got {v!r}")
                if name == "quarantine_size" and v > QUARANTINE_SIZE:
                    raise ValueError(f"quarantine_size must be at most {QUARANTINE_SIZE}, got {v!r}")
                setattr(p, name, v)
        for name in _SECONDS:
            if name in settings:
                v = settings[name]
                bad = not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0
                if bad or (name == "within" and v == 0):
                    raise ValueError(f"{name} must be a non-negative number of seconds, got {v!r}")
                setattr(p, name, float(v))
        return p

    def merged(self, signals: Iterable[int], settings: Mapping[str, Any]) -> Policy:
        """This policy with ``signals`` added and ``settings`` applied over its own."""
        base = {name: getattr(self, name) for name in _COUNTS + _SECONDS}
        return Policy.build(self.signals | set(signals), self.to, {**base, **settings})


class Action(enum.Enum):
    RESTORE = "restore"
    GIVE_UP = "give_up"


class Decision(NamedTuple):
    action: Action
    target: int
    delay: float
    attempt: int
    reason: str
    quarantine: str | None


class RecoveryPolicy:
    def __init__(self) -> None:
        self.policy = Policy()
        self._events: dict[tuple[int, int], deque[float]] = {}
        # Arena.served() at each failure in _events' windows (theirs, in the same order).
        self._served: dict[tuple[int, int], deque[int]] = {}
        self._escalated: dict[int, float] = {}
        self._key_events: dict[str, deque[float]] = {}
        self._decisions = 0

    def _prune(self, now: float) -> None:
        """Forget kinds and keys with no failure in the window (one per per-call checkpoint id)."""
        self._decisions += 1
        if self._decisions % 256:
            return
        tables: tuple[dict[Any, deque[float]], ...] = (self._events, self._key_events)
        for table in tables:
            for k in [k for k, q in table.items() if not self._window(q, now)]:
                del table[k]
        for k in [k for k in self._served if k not in self._events]:
            del self._served[k]

    def _window(self, q: deque[float], now: float) -> deque[float]:
        while q and now - q[0] > self.policy.within:
            q.popleft()
        return q

    def decide(self, target: int, sig: int, key: str | None, checkpoints: list[int],
               now: float, cause: str, budgeted: bool = True, key_failures: int | None = None,
               served: int | None = None) -> Decision:
        """A failure at checkpoint ``target`` (by ``sig``, while processing ``key``): what now?

        ``budgeted=False`` is for a jump the program asked for without a signal: it counts towards
        quarantining the input being processed, but the program is never given up on for it.
        ``key_failures``: the failures of ``key`` within the window wherever they happened, this
        one included, as a shared quarantine store counted them; None counts this program's only.
        ``served``: the inputs the program has done so far (``Arena.served``), None if unknown.
        """
        p = self.policy
        self._prune(now)
        quarantine = None
        if key is not None:
            kq = self._window(self._key_events.setdefault(key, deque()), now)
            kq.append(now)
            if (len(kq) if key_failures is None else key_failures) >= p.quarantine_after:
                quarantine = key
                kq.clear()
        kind = (target, sig)
        q = self._window(self._events.setdefault(kind, deque()), now)
        done = self._served.setdefault(kind, deque())
        while len(done) > len(q):
            done.popleft()
        # Only a failure blamed on an input can be one of different poisoned inputs: one outside
        # any input (after its block ended) says nothing of the state, whatever was served before.
        if q and key is not None and served is not None and served - done[0] >= len(q):
            q.clear()                   # paid for by the work since: not a state that keeps failing
            done.clear()
        q.append(now)
        done.append(served if served is not None else 0)
        attempt = len(q)
        if attempt <= p.max_recoveries or quarantine is not None or not budgeted:
            delay = min(p.backoff * 2 ** (attempt - 2), p.backoff_max) if attempt > 1 and p.backoff else 0.0
            return Decision(Action.RESTORE, target, delay, attempt, cause, quarantine)
        q.clear()
        done.clear()
        esc = self._escalated.get(sig)
        older = [c for c in checkpoints if c < target]
        if older and (esc is None or now - esc > p.within):
            self._escalated[sig] = now
            return Decision(Action.RESTORE, older[-1], 0.0, attempt,
                            f"{cause}; {p.max_recoveries} recoveries to {target} within "
                            f"{p.within:g}s, escalated to older checkpoint {older[-1]}", quarantine)
        return Decision(Action.GIVE_UP, target, 0.0, attempt,
                        f"{cause}; recovery budget exhausted ({p.max_recoveries} within "
                        f"{p.within:g}s{', after escalation' if esc is not None else ''}): giving up",
                        quarantine)
