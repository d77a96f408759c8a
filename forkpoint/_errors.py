"""Every exception forkpoint raises, in one place.

Each one leaves the calling program running and unharmed: a refused request changes nothing.
"""
from __future__ import annotations


class ForkpointError(Exception):
    """Base class of forkpoint's own errors."""


class NoSuchCheckpoint(ForkpointError, LookupError):
    """The checkpoint asked for was never taken, was discarded, or the number is invalid."""


class ThreadsAlive(ForkpointError, RuntimeError):
    """Other threads are alive: fork() copies only the calling thread, so a snapshot would be broken."""


class WrongThread(ForkpointError, RuntimeError):
    """A checkpoint call came from a thread other than the main thread."""


class NotStarted(ForkpointError, RuntimeError):
    """The operation needs the shepherd, which is not running in this process."""


class ConfigurationError(ForkpointError, ValueError):
    """A setting is invalid, or can no longer be changed (e.g. after the first checkpoint)."""


class ArenaFull(ForkpointError, MemoryError):
    """The persistent arena has no room left for the requested region or entry."""


class RegionMismatch(ForkpointError, ValueError):
    """persist() was asked for an existing name with a different size."""


class CacheCorrupted(ForkpointError):
    """A cache entry failed its checksum: it is refused rather than returned as garbage."""


class Quarantined(ForkpointError):
    """The input key is quarantined: it crashed the program repeatedly and is refused."""

    def __init__(self, key: str) -> None:
        super().__init__(f"input {key!r} is quarantined after repeated crashes")
        self.key = key


class Recovered(ForkpointError):
    """Raised by a @checkpointed call in the process that was restored after that call failed.

    Attributes describe the failure: ``signal`` (0 if none), ``reason``, ``attempts``,
    ``from_state``, ``to_state``, ``recovery_seconds`` (failure seen to restored process running),
    and for an exception ``exc_type``, ``exc_message``, ``traceback``.
    """

    def __init__(self, *, signal: int, reason: str, attempts: int, from_state: int, to_state: int,
                 exc_type: str | None = None, exc_message: str | None = None,
                 traceback: str | None = None, recovery_seconds: float = 0.0) -> None:
        what = f"signal {signal}" if signal else reason
        super().__init__(f"call rolled back to checkpoint {to_state} after {what} (attempt {attempts})")
        self.signal = signal
        self.reason = reason
        self.attempts = attempts
        self.from_state = from_state
        self.to_state = to_state
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback
        self.recovery_seconds = recovery_seconds


class OperatorError(ForkpointError):
    """An operator request failed; ``kind`` names the reason (see ``forkpoint.operator``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
