"""``@checkpointed``: a request handler as a transaction, or a server loop that restarts warm.

A checkpoint is taken when the decorated function is entered. If the call fails (the process dies
by a fault signal, a watchdog timeout fires, or, with ``rollback_on_exception``, an exception
escapes), the program is rolled back to that checkpoint: every in-memory change the call made is
gone, ``persist()`` data stays, and sockets open at entry still work.

* A function that takes arguments is a **transaction**: in the restored process the call raises
  ``forkpoint.Recovered`` (or returns what ``on_recover(args, kwargs, info)`` returns), so the
  server can answer the client whose request failed and go on with the next one. A committed call
  discards its checkpoint without waiting for the shepherd.
* A function without parameters (a server loop: ``@checkpointed def serve(): ...``) has no input to
  blame or skip, so it is **restarted** from its entry checkpoint, warm, instead of raising.
  ``restart=`` overrides either default.

Per-call checkpoints default to ``spares=0``: most of them are never restored, so paying a second
fork for a ready copy on every request costs more than it saves (see docs/benchmarks.md); the entry
checkpoint of a restarting loop keeps the configured spare, since it is restored repeatedly.
"""
from __future__ import annotations

import functools
import inspect
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar, overload

from . import snapshots
from ._errors import Quarantined, Recovered
from ._qlookup import QUIET as _quiet
from ._qtable import GEN_WORD as _GEN
from ._runtime import runtime
from .recovery import _key, _known
from .watchdog import Deadline

log = logging.getLogger("forkpoint")
_rt = runtime()
_monotonic = time.monotonic

F = TypeVar("F", bound=Callable[..., Any])
_EXC_ENTRY = "forkpoint:exception"


def _recovered(n: int) -> Recovered:
    rt = runtime()
    exc: dict[str, Any] = {}
    if rt.reason.startswith("exception") and rt.arena is not None:
        try:
            saved = rt.arena.cache_out(_EXC_ENTRY)
            if isinstance(saved, dict) and saved.get("n") == n:
                exc = saved
        except (KeyError, Exception):  # noqa: BLE001 - the failure report is best effort
            exc = {}
    info = Recovered(signal=rt.sigtype, reason=rt.reason, attempts=rt.attempt,
                     from_state=rt.from_state or 0, to_state=n, exc_type=exc.get("type"),
                     exc_message=exc.get("message"), traceback=exc.get("traceback"),
                     recovery_seconds=rt.recovery_seconds)
    return info


@overload
def checkpointed(func: F) -> F: ...


@overload
def checkpointed(*, recover_on: tuple[int, ...] = ..., timeout: float | None = ...,
                 rollback_on_exception: bool = ..., key: Callable[..., Any] | None = ...,
                 quarantine_after: int | None = ..., on_recover: Callable[..., Any] | None = ...,
                 restart: bool | None = ..., spares: int | None = ...) -> Callable[[F], F]: ...


def checkpointed(func: Any = None, *, recover_on: tuple[int, ...] = snapshots.FATAL_SIGNALS,
                 timeout: float | None = None, rollback_on_exception: bool = False,
                 key: Callable[..., Any] | None = None, quarantine_after: int | None = None,
                 on_recover: Callable[..., Any] | None = None, restart: bool | None = None,
                 spares: int | None = None) -> Any:
    """Make each call of the decorated function a checkpointed transaction (see the module doc).

    ``recover_on``: signals whose death rolls the call back (default SIGSEGV, SIGBUS, SIGFPE,
    SIGILL, SIGABRT). ``timeout``: watchdog seconds. ``rollback_on_exception``: roll back on an
    uncaught exception too. ``key``: a function of the call's arguments giving the input key, so
    an input that keeps failing is quarantined (``quarantine_after`` failures, default 2) and
    later calls with it raise ``Quarantined`` without running. ``on_recover(args, kwargs, info)``:
    what a rolled-back call returns instead of raising ``Recovered``.
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"@checkpointed cannot protect the coroutine function {fn.__qualname__}: a checkpoint "
                "would freeze the whole event loop mid-await, and rolling back would undo every other "
                "task's work too. Put the crash-prone part in a synchronous function decorated with "
                "@checkpointed and call it from the coroutine, or protect the whole ASGI app with "
                "forkpoint.asgi.protect(app)")
        takes_args = bool(inspect.signature(fn).parameters)
        again = (not takes_args) if restart is None else restart
        per_call_spares = spares if spares is not None else (None if again else 0)
        policy: dict[str, Any] = {}
        if quarantine_after is not None:
            policy["quarantine_after"] = quarantine_after
        armed = -1          # the policy generation our signals were merged into
        seconds = float(timeout) if timeout is not None else 0.0
        restarted = Deadline()              # a restarting loop's deadline after a restore

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal armed
            rt = _rt
            if armed != rt.policy_generation:   # recover_on() replaced the policy
                snapshots.merge_policy(tuple(recover_on), **policy)
                armed = rt.policy_generation
            k = None
            if key is not None:
                k = key(*args, **kwargs)
                if type(k) is not str or not 0 < len(k) <= 64:    # (64 chars fit in 256 bytes)
                    k = _key(k)
                q = _quiet      # nothing quarantined, without a call (_qlookup.QUIET: 13-15 faults)
                if (q[0] is None or q[0][_GEN] != q[1]) and \
                        k in _known.keys_of(rt.arena or rt.arena_or_create()):
                    raise Quarantined(k)        # refused before paying for a checkpoint
            before = rt.current
            n = 0
            try:
                # The key and the deadline travel with the checkpoint's announcement to the
                # shepherd: nothing more is written per call (after the fork, every page written is
                # copied on write).
                n = snapshots.tsetjmp(spares=per_call_spares, key=k,
                                      deadline=_monotonic() + seconds if seconds else 0.0)
                if rt.recovered and rt.to_state == n:       # the restored process: the call failed
                    info = _recovered(n)
                    log.info("%s rolled back to its entry checkpoint %d: %s", fn.__qualname__, n,
                             info.reason)
                    if not again:
                        if on_recover is not None:
                            return on_recover(args, kwargs, info)
                        raise info
                    if seconds:                 # restarted warm: a fresh deadline, in the arena
                        restarted.clear()
                        restarted.set(seconds)
                try:
                    return fn(*args, **kwargs)
                except Exception as e:
                    if not rollback_on_exception:
                        raise
                    _save_exception(n, e)
                    # the checkpoint names the input, so the shepherd can quarantine it
                    snapshots.tlongjmp(n, reason=f"exception: {type(e).__name__}")
                    raise  # pragma: no cover - tlongjmp does not return
            finally:
                # Done again if cut short. A handler that raises (Ctrl-C's) runs as a call returns or
                # a function starts: as tsetjmp() unblocks signals after its fork (before ``n`` is
                # assigned), or as one of these calls begins. A commit skipped so would leave the
                # call's checkpoint current after the call, with its deadline: the shepherd would
                # later roll the program back into a call that is over.
                # (Twice, not a helper: a helper's own start is such a point.)
                try:
                    restarted.clear()
                    if not n and rt.current != before:     # taken; the handler raised as it ended
                        n = rt.current
                    if n and rt.current != before:          # not committed yet
                        snapshots.end_transaction(n, before)
                finally:
                    restarted.clear()
                    if not n and rt.current != before:
                        n = rt.current
                    if n and rt.current != before:
                        snapshots.end_transaction(n, before)

        return wrapper  # type: ignore[return-value]

    if func is not None:
        return decorate(func)
    return decorate


def _save_exception(n: int, e: BaseException) -> None:
    arena = runtime().arena
    if arena is None:
        return
    try:
        arena.cache_in(_EXC_ENTRY, {"n": n, "type": type(e).__name__, "message": str(e)[:2000],
                                    "traceback": "".join(traceback.format_exception(e))[-8000:]})
    except Exception:  # noqa: BLE001 - rolling back matters more than the report
        log.exception("could not record the exception before rolling back")
