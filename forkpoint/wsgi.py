"""``forkpoint.wsgi.protect(app)``: a WSGI application that survives crashes, hangs and poisoned requests.

Wrap the application where it is defined; the server's command line does not change
(``gunicorn app:app``, any ``--workers``). Each worker process becomes its own forkpoint program the
first time it serves, so gunicorn still sees its worker under the same PID.

* ``mode="transaction"``: every request is a checkpointed transaction (as ``@checkpointed``). A
  segfault or abort in the application, a hang past ``timeout``, or an exception that escapes it
  undoes every change the request made; the client gets a 500. (Flask and Django answer a view's
  exception with a 500 of their own unless told to let it escape: the first request logs a
  warning that says how.) The response is produced inside the transaction and buffered (a
  ``wsgi.file_wrapper`` response is passed through), so a request that fails never sends half a
  response. Costs a fork per request.
* ``mode="restart"``: one checkpoint, taken when the worker first serves (before the first
  request runs), replaced every ``refresh`` seconds after a request while no other runs. A crash
  or a timeout restores the worker to it, warm and under the same PID; the client of the request
  that failed gets a 500 (``_serving.Rescue``), and that request's key is blamed. A few
  microseconds per request. Built for gunicorn's sync worker (one request at a time per worker).

In both modes a key (``key(environ)``, by default method, path and query) that failed
``quarantine_after`` times is answered 503 without running the application.
"""
from __future__ import annotations

import gc
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import snapshots
from ._errors import Quarantined, Recovered, ThreadsAlive, WrongThread
from ._qlookup import quiet
from ._serving import (
    FAILED,
    MODES,
    REFUSED,
    Records,
    Refresh,
    Rescue,
    WorkerCheckpoint,
    check_common,
    is_async,
    key_from,
    merge_policy,
    restored_into,
)
from .checkpointed import checkpointed
from .recovery import _key, _known, is_quarantined, mark, unmark
from .watchdog import Deadline

log = logging.getLogger("forkpoint")

__all__ = ["protect"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def protect(app: WSGIApp, *, mode: str = "transaction", timeout: float | None = None,
            key: Callable[[dict[str, Any]], Any] | None = None, quarantine_after: int = 2,
            refresh: float | None = None) -> WSGIApp:
    """Wrap WSGI application ``app`` (see the module docstring for the two modes).

    ``timeout``: seconds a request may run before it is cut (None: no limit). ``key``: a function
    of the WSGI environ naming the input, for quarantine. ``quarantine_after``: failures of one key
    before it is refused with 503. ``refresh``: in restart mode, seconds after which the checkpoint
    is taken again (between requests), so that caches warmed since are kept.
    """
    check_common(app, timeout, key, quarantine_after, refresh)
    if is_async(app):
        raise TypeError(f"{_name(app)} is an ASGI application (a coroutine function), not a WSGI "
                        "one: use forkpoint.asgi.protect")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode == "transaction":
        if refresh is not None:
            raise ValueError("refresh= applies to mode='restart' (a transaction keeps no checkpoint "
                             "between requests)")
        return _Transaction(app, timeout, key, quarantine_after)
    return _Restart(app, timeout, key, quarantine_after, refresh)


def _name(app: Any) -> str:
    return getattr(app, "__qualname__", None) or type(app).__qualname__


def _default_key(environ: dict[str, Any]) -> str:
    return key_from(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", ""),
                    environ.get("QUERY_STRING", ""))


def _freeze() -> None:
    """Move the worker's heap, as it is when it first serves, out of the cyclic GC's way.

    A collection writes the header of every object it examines; after a checkpoint's fork each of
    those pages is copied. The objects alive at the first request (the application, the server,
    their modules) live as long as the worker, so, as CPython's documentation advises for pre-fork
    servers, ``gc.freeze()`` moves them to the permanent generation that later collections skip.
    """
    gc.freeze()


def _refusal() -> str | None:
    """Why no request of this worker can be protected, if the server calls the application from a
    thread other than the main one (gunicorn ``--threads N``: its gthread worker; a threaded
    server): a checkpoint copies one thread, and the others serve requests meanwhile."""
    here = threading.current_thread()
    if here is threading.main_thread():
        return None
    lib = _greenlets()
    if lib is not None:
        return (f"forkpoint.wsgi.protect: the server runs requests side by side in {lib}'s greenlets "
                f"of one process (as gunicorn -k {lib} does): a checkpoint or a restore of the worker "
                "would take the other requests in flight with it (their connections and their "
                "changes), so no request can be protected, and each is answered 500. Run gunicorn "
                "with its sync worker (no -k) and more --workers instead, or an asyncio server "
                "with forkpoint.asgi.protect.")
    return (f"forkpoint.wsgi.protect: the server calls the application from thread {here.name!r}, "
            "not the worker's main thread (as gunicorn's gthread worker does, with --threads N: its "
            "threads serve requests side by side): a checkpoint copies only one thread, so no "
            "request can be protected, and each is answered 500. Run gunicorn without --threads "
            "(its sync worker, one request at a time per worker) and with more --workers instead.")


def _greenlets() -> str | None:
    """The greenlet library whose monkey-patching makes each greenlet look like a thread of its own
    ("Dummy-N"), if one did: gevent (gunicorn ``-k gevent``) or eventlet (``-k eventlet``). Its
    workers serve many requests at once in one OS thread; the message for ``--threads`` (a pool
    of OS threads, "run without --threads") misled there (an audit, 2026-11-29)."""
    monkey: Any = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return "gevent"
    patcher: Any = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("thread"):
        return "eventlet"
    return None


def _caught_by_framework(app: Any) -> str | None:
    """Why an exception in ``app``'s views never reaches a transaction, if its framework answers it
    with a 500 of its own (None: it escapes, or the framework is not known here).

    Flask (``PROPAGATE_EXCEPTIONS`` unset, outside debug and testing) and Django (unless
    ``DEBUG_PROPAGATE_EXCEPTIONS``) catch a view's exception and answer 500 themselves: the
    transaction then commits what the view changed before it raised (a dict corrupted halfway
    stayed so, under gunicorn, for both). Only the framework's own application object is
    recognised, not one wrapped in middleware; neither framework is imported here."""
    flask: Any = sys.modules.get("flask")
    if flask is not None and isinstance(app, getattr(flask, "Flask", ())):
        flask_app: Any = app
        propagate = flask_app.config.get("PROPAGATE_EXCEPTIONS")
        if not (propagate if propagate is not None else flask_app.testing or flask_app.debug):
            return ("Flask answers an exception in a view with a 500 of its own, so the request's "
                    "changes are kept; set app.config['PROPAGATE_EXCEPTIONS'] = True for "
                    "forkpoint to undo them (crashes and timeouts are undone either way)")
        return None
    handlers: Any = sys.modules.get("django.core.handlers.wsgi")
    if handlers is not None and isinstance(app, getattr(handlers, "WSGIHandler", ())):
        from django.conf import settings  # (loaded: the application is Django's)
        if not getattr(settings, "DEBUG_PROPAGATE_EXCEPTIONS", False):
            return ("Django answers an exception in a view with a 500 of its own, so the request's "
                    "changes are kept; set DEBUG_PROPAGATE_EXCEPTIONS = True in the settings for "
                    "forkpoint to undo them (crashes and timeouts are undone either way)")
    return None


def _file_wrapper(environ: dict[str, Any]) -> tuple[type, ...]:
    """The server's ``wsgi.file_wrapper`` class, as an isinstance() argument (empty if none)."""
    wrapper = environ.get("wsgi.file_wrapper")
    return (wrapper,) if isinstance(wrapper, type) else ()


def _answer(start_response: StartResponse, what: tuple[str, int, bytes]) -> list[bytes]:
    line, _, body = what
    start_response(line, [("Content-Type", "text/plain; charset=utf-8"),
                          ("Content-Length", str(len(body)))])
    return [body]


class _Base:
    def __init__(self, app: WSGIApp, timeout: float | None, key: Callable[..., Any] | None,
                 quarantine_after: int) -> None:
        self.app = app
        self.timeout = timeout
        self.keyfn = key
        self.quarantine_after = quarantine_after
        self.refused = False            # a refusal was logged (see _refusal)
        self.unprotected: str | None = None     # why requests run unprotected now (_unprotected)
        self.__wrapped__ = app

    def _unprotected(self, e: ThreadsAlive, what: str, level: int = logging.ERROR) -> None:
        """No checkpoint beside the threads of ``e`` (a library's: Sentry's SDK starts two at its
        first event): ``what`` goes on without one, as without forkpoint, said at ERROR once per
        episode. Answering 500 instead, as before, made every request after Sentry's first event
        fail in transaction mode: an outage forkpoint caused."""
        why = str(e).partition(":")[0]
        level = logging.DEBUG if why == self.unprotected else level
        self.unprotected = why
        hint = (". Restart mode, whose checkpoint is taken before the first request, keeps its "
                "protection while such threads live") if isinstance(self, _Transaction) else ""
        log.log(level, "forkpoint.wsgi.protect: %s; %s (%s)%s", what, why, e, hint)

    def check_thread(self) -> None:
        """Refuse a request the server runs outside the worker's main thread (``_refusal``): raise
        for it (the server answers 500), said once in the log."""
        why = _refusal()
        if why is None:
            return
        if not self.refused:
            self.refused = True
            log.error("%s", why)
        raise WrongThread(why)

    def key(self, environ: dict[str, Any]) -> str:
        if self.keyfn is None:
            return _default_key(environ)
        k = self.keyfn(environ)
        return k if type(k) is str and 0 < len(k) <= 64 else _key(k)


# ---- transaction mode -----------------------------------------------------------------------------
def _txn_key(environ: dict[str, Any], k: str, ran: list[bool]) -> str:
    return k


class _Transaction(_Base):
    """Each request a transaction: ``@checkpointed`` around the application and its response."""

    def __init__(self, app: WSGIApp, timeout: float | None, key: Callable[..., Any] | None,
                 quarantine_after: int) -> None:
        super().__init__(app, timeout, key, quarantine_after)
        self._call = checkpointed(timeout=timeout, rollback_on_exception=True, key=_txn_key,
                                  quarantine_after=quarantine_after)(self._run)
        self.frozen = False

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        k = self.key(environ)
        if not self.frozen:
            self.check_thread()
            self.frozen = True
            why = _caught_by_framework(self.app)
            if why is not None:
                log.warning("forkpoint.wsgi.protect (transaction mode): %s", why)
            _freeze()
        ran: list[bool] = []    # this call's application was called (its checkpoint was taken): not
        # a flag in the environ, which a middleware's copy of it or a protected application nested
        # in this one carries into another call, whose own checkpoint's refusal it then re-raised
        try:
            status, headers, exc_info, body = self._call(environ, k, ran)
        except Quarantined:
            return _answer(start_response, REFUSED)
        except Recovered as e:
            log.warning("request %r failed (%s): its changes were undone", k, e.reason)
            return _answer(start_response, FAILED)
        except ThreadsAlive as e:
            if ran:                     # the application's own, not the request's checkpoint
                raise
            self._unprotected(e, "this request runs without a checkpoint")
            status, headers, exc_info, body = self._run(environ, k, ran)
        else:
            self.unprotected = None
        if exc_info is not None:
            start_response(status, headers, exc_info)
        else:
            start_response(status, headers)
        return body

    def _run(self, environ: dict[str, Any], k: str,
             ran: list[bool]) -> tuple[str, list[Any], Any, Iterable[bytes]]:
        """The application and its whole response, inside the transaction."""
        ran.append(True)
        got: list[Any] = []
        written: list[bytes] = []

        def start_response(status: str, headers: list[Any], exc_info: Any = None) -> Callable[[bytes], None]:
            if got and exc_info is None:
                raise AssertionError("start_response called twice without exc_info (PEP 3333)")
            got[:] = [status, headers, exc_info]
            return written.append

        result = self.app(environ, start_response)
        wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(result, wrapper):
            if not got:
                raise RuntimeError("the application returned a file without calling start_response")
            return got[0], got[1], got[2], result     # sent by the server after the commit
        try:
            body = written + [bytes(chunk) for chunk in result]
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not got:
            raise RuntimeError("the application returned without calling start_response")
        return got[0], got[1], got[2], body


# ---- restart mode ---------------------------------------------------------------------------------
class _Abandon(StopIteration):
    """Raised into the server for the request a restored process was checkpointed in, when another
    request failed: that request was answered long ago. gunicorn closes the (already closed)
    connection quietly on StopIteration, without writing or logging it again."""


class _Restart(_Base, WorkerCheckpoint):
    """One checkpoint per worker; a failure restores it (see the module docstring)."""

    def __init__(self, app: WSGIApp, timeout: float | None, key: Callable[..., Any] | None,
                 quarantine_after: int, refresh: float | None) -> None:
        super().__init__(app, timeout, key, quarantine_after)
        self.n = 0                      # the restart checkpoint, in this worker
        self.seq = 0                    # requests started in this process
        self.rescue: Rescue | None = None
        self.refresh = Refresh(refresh)
        self.deadline = Deadline()
        self.record_of = Records()
        self.known: dict[tuple[str, str, str], tuple[str, tuple[bytes, int]]] = {}
        self.arena: Any = None
        self.prepared = False           # the policy merged and the heap frozen (_checkpoint)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        # The usual request: a dictionary read for its key and record, one word for the quarantine,
        # three arena writes and the two system calls that park its socket. Few Python calls: in a
        # real worker each one is cold (its code, frame and objects left the CPU caches during the
        # server's own work), and the bookkeeping took 3-6 times its in-process time there.
        if self.keyfn is None:
            seen = (environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", ""),
                    environ.get("QUERY_STRING", ""))
            known = self.known.get(seen) or self._know(seen)
            k, record = known
        else:
            k = self.key(environ)
            record = self.record_of(k)
        self.seq += 1
        seq = self.seq
        if self.n == 0:
            self.check_thread()
            if is_quarantined(k):
                return _answer(start_response, REFUSED)
            try:
                failed_here = self._checkpoint(seq)
            except ThreadsAlive as e:       # no checkpoint yet: this request as without forkpoint
                self._unprotected(e, "the worker's checkpoint is put off to the next request")
                return self.app(environ, start_response)
            self.unprotected = None
            if failed_here is not None:     # the restored process, inside this very request
                if failed_here:
                    return _answer(start_response, FAILED)
                raise _Abandon("forkpoint: restored into a request that was answered before")
        arena = self.arena
        if not quiet() and k in _known.keys_of(arena):
            return _answer(start_response, REFUSED)
        # The request's key (and deadline) in the arena: one call, unless an enclosing one is there.
        # Undone whatever raises from here on, also a signal handler (a Ctrl-C, an application's
        # SIGALRM timeout) run as a call returns: left marked, the key would be blamed and the
        # worker restored at the deadline, long after the request was answered.
        marked: Any = None
        entered = False
        slot = -1
        rescue = self.rescue
        assert rescue is not None
        try:
            entered = arena.enter_step(record, self.timeout or 0.0, self.n)   # all or nothing
            if not entered:
                try:
                    marked = mark(k)
                except Quarantined:
                    return _answer(start_response, REFUSED)
                if self.timeout is not None:
                    self.deadline.set(self.timeout, self.n)
            sock = environ.get("gunicorn.socket")
            slot = rescue.hold(sock.fileno() if sock is not None else -1, seq)
            result = self.app(environ, start_response)
            whole = type(result) is list or isinstance(result, tuple) or \
                isinstance(result, _file_wrapper(environ))
        except BaseException:
            self._done(marked, slot, entered)
            raise
        if whole:
            # the application's part is over (self._done, inline)
            done = False
            try:
                if marked is None:
                    arena.leave_step()
                    arena.count_served()
                else:
                    self._done_nested(marked)
                rescue.release(slot)
                done = True
            finally:
                if not done:                # cut short by a handler that raised: once more
                    self._done(marked, slot)
            refresh = self.refresh
            if refresh.every is not None and refresh.due():
                return _Closing(self, result, None, None)
            return result
        return _Closing(self, result, marked, slot)

    def _know(self, seen: tuple[str, str, str]) -> tuple[str, tuple[bytes, int]]:
        """The default key of a request with this method, path and query, and its arena record."""
        if len(self.known) >= 1024:
            self.known.clear()
        k = key_from(*seen)
        known = self.known[seen] = (k, self.record_of(k))
        return known

    def _done(self, marked: Any, slot: int, entered: bool = True) -> None:
        """Undo the request's bookkeeping: its step (``entered``) or its nested marks, and its
        rescue slot; each part may be undone already (a cleanup cut short, done again)."""
        if marked is not None:
            self._done_nested(marked)           # (counted served by unmark)
        elif entered:
            self.arena.leave_step()
            self.arena.count_served()
        assert self.rescue is not None
        self.rescue.release(slot)

    def _done_nested(self, marked: Any) -> None:
        if self.timeout is not None:
            self.deadline.clear()
        unmark(marked)

    def _checkpoint(self, seq: int) -> bool | None:
        """Take the restart checkpoint before request ``seq`` runs.

        Returns None in the process that goes on serving; in a restored process, whether the
        request that failed is this one (True: answer it 500 here) or another (False).
        """
        if not self.prepared:
            # Once: a checkpoint put off (ThreadsAlive) is tried again at each request, and each
            # merge was a round trip to the shepherd and one more policy kept (and replayed) for
            # the worker's life, each freeze kept the cyclic garbage of the requests before.
            merge_policy(self.quarantine_after)     # starts forkpoint in this worker
            _freeze()
            self.prepared = True
        if self.rescue is None:
            self.rescue = Rescue(2, "wsgi-inflight")   # one in use, one a holder may still answer on
        n = self.take_checkpoint()
        log.info("forkpoint: worker checkpoint %d taken before request %d", n, seq)
        if not restored_into(n):
            return None
        return self._after_restore(seq)

    def _after_restore(self, own: int) -> bool:
        """In the restored process: answer the clients of the requests that failed."""
        rescue = self.rescue
        assert rescue is not None
        own_failed = rescue.in_flight(own)
        answered, closed = rescue.rescue(own)
        log.warning("forkpoint: worker restored to checkpoint %d (%s); %d client(s) answered 500, "
                    "%d closed", self.n, snapshots.restore_reason(), answered + int(own_failed), closed)
        return own_failed

    def refresh_now(self) -> None:
        """Between requests (the response's close()): replace the checkpoint with one taken now."""
        old = self.n
        try:
            n = self.take_checkpoint()
        except ThreadsAlive as e:       # the checkpoint it has stays; tried again when next due
            self.refresh.mark()
            self._unprotected(e, "the refresh of the worker's checkpoint is put off", logging.WARNING)
            return
        self.unprotected = None
        if restored_into(n):
            self._after_restore(-1)
            return
        log.info("forkpoint: worker checkpoint %d replaces %d", n, old)


class _Closing:
    """The response of a request in restart mode: the application's code may still run while it
    is iterated, so the request stays marked until ``close()``; a due refresh happens there."""

    def __init__(self, owner: _Restart, result: Iterable[bytes], marked: Any, slot: int | None) -> None:
        self.owner = owner
        self.result = result
        self.marked = marked
        self.slot = slot
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        first = True
        for chunk in self.result:
            if first and self.slot is not None and chunk:
                first = False
                assert self.owner.rescue is not None
                self.owner.rescue.started(self.slot)
            yield chunk

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            if self.slot is not None:
                done = False
                try:
                    self.owner._done(self.marked, self.slot)
                    done = True
                finally:
                    if not done:            # cut short by a handler that raised: once more
                        self.owner._done(self.marked, self.slot)
        if self.owner.refresh.due():
            self.owner.refresh_now()
