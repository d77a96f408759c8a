"""Every exception forkpoint raises, in one place.

Each one leaves the calling program running and unharmed: a refused request changes nothing.
"""
from __future__ import annotations

import errno
import os
import resource


class ForkpointError(Exception):
    """Base class of forkpoint's own errors."""


def _rebuilt(cls: type[BaseException], args: tuple[object, ...], state: dict[str, object]) -> BaseException:
    err = cls.__new__(cls, *args)       # sets args, as raising it did; __init__ is not run again
    err.__dict__.update(state)
    return err


class _Pickled:
    """Pickled as it is, attributes included, for the errors whose ``__init__`` does not take
    their own message: pickle rebuilds an exception as ``cls(*args)``, which raised ``TypeError``
    for ``Recovered`` (keyword-only) and doubled ``Quarantined``'s message, so a
    ``multiprocessing.Pool`` lost its result handler, a ``ProcessPoolExecutor`` broke, and Celery
    reported a bare ``ForkpointError`` (found by an audit of job runners, 2026-11-29)."""

    def __reduce__(self) -> tuple[object, ...]:
        assert isinstance(self, BaseException)
        return (_rebuilt, (type(self), self.args, dict(self.__dict__)))


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


class ResourceExhausted(ForkpointError, OSError):
    """The system refused forkpoint a process, memory or a file descriptor.

    An ``OSError`` too (``errno`` is the system's), so ``except OSError`` still catches it; the
    message says which limit was hit and what to change.
    """


def _limit(which: int) -> str:
    try:
        soft, _hard = resource.getrlimit(which)
    except (OSError, ValueError):
        return "?"
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def resource_error(what: str, err: OSError, hint: str = "") -> ResourceExhausted:
    """A ``ResourceExhausted`` for ``what`` (e.g. "could not fork checkpoint 3") that failed with
    ``err``, naming the limit to change; ``hint`` is added for the caller's own settings."""
    code = err.errno or 0
    if code == errno.EAGAIN:
        why = (f"the process limit is reached (ulimit -u is {_limit(resource.RLIMIT_NPROC)} for this "
               "user; or kernel.pid_max / kernel.threads-max): raise it, or keep fewer checkpoints "
               "(each costs 1 + spares processes: forkpoint.configure(max_checkpoints=..., spares=...))")
    elif code == errno.ENOMEM:
        why = ("the system is out of memory for it (vm.overcommit_memory, ulimit -v is "
               f"{_limit(resource.RLIMIT_AS)}): free memory or raise the limit")
    elif code == errno.EMFILE:
        why = (f"this process has too many open files (ulimit -n is {_limit(resource.RLIMIT_NOFILE)}): "
               "close descriptors or raise the limit")
    elif code == errno.ENFILE:
        why = "the system's file table is full (fs.file-max): close files or raise fs.file-max"
    elif code == errno.ENOENT and "/proc" in what:
        why = "/proc is not mounted: forkpoint needs procfs"
    else:
        why = _strerror(code) if code else str(err)
    return ResourceExhausted(code, f"{what}: {why}{'; ' + hint if hint else ''}")


def _strerror(code: int) -> str:
    try:
        return os.strerror(code)
    except ValueError:
        return f"error {code}"


class ArenaFull(ForkpointError, MemoryError):
    """The persistent arena has no room left for the requested region or entry."""


class RegionMismatch(ForkpointError, ValueError):
    """persist() was asked for an existing name with a different size."""


class CacheCorrupted(ForkpointError):
    """A cache entry failed its checksum: it is refused rather than returned as garbage."""


class Quarantined(_Pickled, ForkpointError):
    """The input key is quarantined: it crashed the program repeatedly and is refused."""

    def __init__(self, key: str) -> None:
        super().__init__(f"input {key!r} is quarantined after repeated crashes")
        self.key = key


class Recovered(_Pickled, ForkpointError):
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


class OperatorError(_Pickled, ForkpointError):
    """An operator request failed; ``kind`` names the reason (see ``forkpoint.operator``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
