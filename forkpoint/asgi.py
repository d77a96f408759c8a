"""``forkpoint.asgi.protect(app)``: an ASGI application whose worker restarts warm after a crash or a hang.

Wrap the application where it is defined; the command line does not change (``uvicorn app:app``,
any ``--workers``). An event loop runs many requests at once, so there is no per-request
transaction: the worker is checkpointed once, as soon as it listens and its server's startup is
done, before it holds any connection (right after the ASGI lifespan startup), and every
``refresh`` seconds after that whenever no request is in flight, no connection is open but idle
keep-alive ones (the checkpoint's processes let go of those: ``_idle_connections``) and no thread
runs but idle executor and AnyIO worker threads (which are stopped first). A segfault or abort
anywhere in the worker, or a request whose code runs (without yielding to the loop) longer than
``timeout``, restores that checkpoint: the worker serves on warm, under the same PID.

* Every request the application had begun on the worker fails the same way: its client gets a
  500 from the restored process (or a closed connection if its response had started;
  ``_serving.Rescue``). A request the server had read but not yet passed to the application (the
  loop was held by the step that crashed) has no rescue slot: its client sees a closed
  connection, as when a worker dies without forkpoint (a stress run: 3 such requests in each of
  30 crashes after a step that held the loop 0.3 s).
* Only the request whose code was running is blamed: its key is written to the arena at every step
  of its coroutine and cleared when the step yields, so the shepherd knows whose step crashed.
  A key that failed ``quarantine_after`` times is answered 503 without running the application.
  Work a request hands to a thread (a plain ``def`` endpoint, ``asyncio.to_thread``) is marked with
  the request in that thread, so that a crash there blames it and no other (``_threadmarks``); and
  work handed off before the response started must end by the time the response is due, as a
  thread cannot be cancelled: past that the worker is restored and the request blamed.
* So are the tasks a request's code creates (Starlette's ``BaseHTTPMiddleware``, and so FastAPI's
  ``@app.middleware("http")``, runs the application in one; Django's ``ASGIHandler`` runs the whole
  request in one): each of their steps is marked with the request and has its deadline
  (``_mark_tasks``).
* A request that merely waits longer than ``timeout`` before its response starts (the loop is
  fine) is cancelled and answered 500 without a restore and without blame. A response that has
  started (a stream) and work after a complete response (``BackgroundTasks``) are not timed, nor is
  a websocket session: only their steps are (``_Expiry``).

Costs a few microseconds per request and per step. Needs asyncio's own event loop: under uvloop
(``uvicorn[standard]`` picks it), the lifespan startup fails with a message saying to run uvicorn
with ``--loop asyncio``. Granian and Daphne are refused the same way (``_asgiloop.unsupported_server``):
their connections are not the loop's.
"""
from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from contextvars import ContextVar
from types import CoroutineType as _CoroutineType
from typing import Any

from . import _asgiloop, _fdholder, _threadmarks, snapshots
from ._errors import ThreadsAlive
from ._qlookup import quiet
from ._runtime import runtime
from ._serving import (
    FAILED,
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
from .recovery import _key, _known
from .watchdog import Deadline

log = logging.getLogger("forkpoint")

__all__ = ["protect"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_current_task = asyncio.current_task
_INFLIGHT, _STARTED, _IDLE = Rescue.INFLIGHT, Rescue.STARTED, Rescue.IDLE
_SEQ = _fdholder.SEQ
SLOTS = 64              # requests in flight whose clients a restored process can still answer
_POLL = 0.05            # seconds between looks for a moment without connections (refresh)
_EAGER = 5.0            # seconds the check runs at every turn after the lifespan startup (_watch)
_SETTLE = 20            # turns of the loop the server's startup may take after it listens (_poll)


def protect(app: ASGIApp, *, timeout: float | None = None, key: Callable[[Scope], Any] | None = None,
            quarantine_after: int = 2, refresh: float | None = None) -> ASGIApp:
    """Wrap ASGI application ``app`` (see the module docstring).

    ``timeout``: seconds a request's code may run without yielding, and a request may wait before
    its response starts (None: no limit; websockets and started responses: steps only). ``key``:
    a function of the ASGI scope naming the input, for quarantine (by default method, path and
    query). ``quarantine_after``: failures of one key before it is refused with 503.
    ``refresh``: seconds after which the checkpoint is taken again, at a moment with no connection
    open, so that caches warmed since are kept.
    """
    check_common(app, timeout, key, quarantine_after, refresh)
    if not is_async(app) and _looks_like_wsgi(app):
        raise TypeError(f"{getattr(app, '__qualname__', type(app).__qualname__)} looks like a WSGI "
                        "application (a plain function of environ and start_response), not an ASGI "
                        "one: use forkpoint.wsgi.protect")
    return _Protected(app, timeout, key, quarantine_after, refresh)


def _looks_like_wsgi(app: Any) -> bool:
    try:
        params = list(inspect.signature(app).parameters.values())
    except (TypeError, ValueError):
        return False
    plain = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(plain) == 2 and len(params) == 2


def _default_key(scope: Scope) -> str:
    qs = scope.get("query_string", b"")
    return key_from(scope.get("method", "WS" if scope["type"] == "websocket" else "GET"),
                    scope.get("path", ""), qs.decode("latin-1") if qs else "")


class _Protected(WorkerCheckpoint):
    def __init__(self, app: ASGIApp, timeout: float | None, key: Callable[[Scope], Any] | None,
                 quarantine_after: int, refresh: float | None) -> None:
        self.app = app
        self.timeout = timeout
        self.keyfn = key
        self.quarantine_after = quarantine_after
        self.refresh = Refresh(refresh)
        self.__wrapped__ = app
        self.n = 0                      # the worker's checkpoint
        self.seq = 0
        self.inflight = 0
        self.rescue: Rescue | None = None
        self.slots: dict[Any, int] = {}         # connection (transport) -> its slot's state word
        self.known: dict[tuple[Any, ...], tuple[str, tuple[bytes, int]]] = {}
        self.arena: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watching = False
        self.eager = False
        self.eager_until = 0.0
        self.paused: list[tuple[int, Any, tuple[Any, ...]]] = []   # sockets not accepted on (_poll)
        self.settling = 0
        self.refused: str | None = None
        self.warned = False
        self.put_off = False            # a refresh is being put off (logged once, at INFO)
        # In a process restored into a refresh that let go of keep-alive connections: those
        # (aborted) transports, whose requests the loop had read already are not run (_checkpoint).
        self.dropped: frozenset[Any] = frozenset()
        self.expiry: _Expiry | None = None
        self.record_of = Records()

    # -- the worker's checkpoint -------------------------------------------------------------------
    def _checked_loop(self, receive: Any = None, send: Any = None) -> str | None:
        """On this process's first call: is its loop one forkpoint can carry over a restore, and its
        server (``receive``, ``send``: what it handed that call) one whose I/O is that loop's?"""
        loop = asyncio.get_running_loop()
        if loop is not self.loop:
            self.loop = loop
            self.expiry = _Expiry(loop, self.timeout) if self.timeout is not None else None
            self.refused = _asgiloop.unsupported(loop) or _asgiloop.unsupported_server(loop, receive, send)
            if self.refused:
                log.error("%s", self.refused)
        return self.refused

    def _watch(self, eager: bool = False) -> None:
        """Take the checkpoint from a loop callback as soon as it may be taken (module docstring).

        ``eager``: the server is about to listen (its lifespan startup is complete). The check then
        runs at every turn of the loop until it does: a turn that registers the listening socket
        runs no accept, and the next one runs callbacks queued before (this one) ahead of the
        accepts its select() found. So the checkpoint comes before any connection, even one that
        waited in the backlog of a socket bound by uvicorn's supervisor.
        """
        if self.loop is None:
            return
        if eager and not self.eager:
            # At every turn, but not forever: a server whose listening socket never shows in the
            # loop (one forkpoint does not know) held a core at 100% while idle (a Granian audit).
            self.eager_until = self.loop.time() + _EAGER
        self.eager = self.eager or eager
        if not self.watching:
            self.watching = True
            self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        loop = self.loop
        assert loop is not None
        if not self.paused and not _asgiloop.listening(loop):
            if self.eager and loop.time() < self.eager_until:
                loop.call_soon(self._poll)
            else:
                loop.call_later(_POLL, self._poll)
            return
        idle: list[Any] = []
        if self.inflight or (_asgiloop.client_connections(loop)
                             and not (self.n and (idle := self._idle_connections(loop)))):
            self._accept()
            loop.call_later(_POLL, self._poll)
            return
        first = not self.n
        if not first and _asgiloop.pending(loop):
            # The loop runs the callbacks of the sockets it found readable before the timers due
            # (a refresh's look is one), so what is queued now comes from this turn's sockets:
            # * a connection accepted, its socket in a task not yet run (_accept_connection2), no
            #   transport yet, which client_connections does not count: in the checkpoint, its
            #   FIN would never go (a review: 2 of 6 refreshes held such sockets, 8 clients
            #   waited for the end of their answers until they gave up);
            # * a request read, its task made and not yet run (uvicorn's) or a task woken to read
            #   it (Hypercorn's), its slot idle: a process restored there would run it again
            #   (the failed process served it; a review's count: 16 of 16 refreshes under steady
            #   traffic).
            loop.call_later(_POLL, self._poll)
            return
        if first and self.settling < _SETTLE and _asgiloop.pending(loop):
            # The server's startup goes on after its socket listens: uvicorn and Hypercorn log
            # "running on ..." in the next turn of the loop, and a program may write its PID file
            # or tell systemd it is ready there. A checkpoint taken before that tail made every
            # restore run it again (the line logged again after each crash). So the loop stops
            # accepting (connections wait in the backlog) until it has nothing left to run this
            # turn (at most _SETTLE turns: a loop that always has, takes it anyway).
            # At every turn: a server may begin to listen on another socket meanwhile (Hypercorn's
            # binds, one after another). This runs before the turn's accepts, so none is run.
            self.paused += _asgiloop.pause_accepting(loop)
            self.settling += 1
            loop.call_soon(self._poll)
            return
        # No thread may run beside a checkpoint, the first or a refresh: the application makes
        # idle ones as it serves (Starlette's plain def endpoints: AnyIO's worker threads;
        # asyncio.to_thread: the default executor), so they are stopped for a refresh too.
        left = _asgiloop.quiesce_threads(loop, wait=first)
        if left:
            self._accept()
            if first:
                log.warning("forkpoint: waiting for threads to end before the worker's checkpoint: %s",
                            ", ".join(left))
                loop.call_later(1.0, self._poll)
            else:
                self._put_off(left)
            return
        self.watching = self.eager = False
        if first:
            try:
                self._checkpoint()
            finally:        # in the process that took it and in every one restored there
                self._accept()
            return
        try:
            self._checkpoint(idle)
        except ThreadsAlive as e:       # a thread Python does not list (a C library's own)
            self._put_off([str(e)])
            return
        self.put_off = False

    def _accept(self) -> None:
        """Accept connections again, if ``_poll`` stopped the loop accepting them."""
        self.settling = 0               # (a later try settles afresh: its accepts ran before it)
        if self.paused and self.loop is not None:
            paused, self.paused = self.paused, []
            _asgiloop.resume_accepting(self.loop, paused)

    def _idle_connections(self, loop: asyncio.AbstractEventLoop) -> list[Any]:
        """For a refresh: the keep-alive connections, if every connection open is one that is idle
        between requests (none: the refresh waits). A checkpoint must not hold a connection: asyncio
        closes a socket without ``shutdown``, so a copy held by the checkpoint's processes would
        never let its FIN go. So a refresh waited for a moment with no connection open, and clients
        that keep theirs alive (a reverse proxy's upstream keep-alive, any HTTP client's pool)
        always had one: ``refresh=`` never moved the checkpoint under steady traffic (three
        clients, a request each every 0.3 s: no refresh in 6 s with ``refresh=0.5``). The
        checkpoint's processes now let go of these (``tsetjmp(_drop=)``), and a process restored
        there drops them (``_checkpoint``). Not a connection whose next request has begun
        to arrive (its socket has bytes the loop has not read): that one waits."""
        rescue = self.rescue
        if rescue is None or len(self.slots) < _asgiloop.client_connections(loop):
            return []           # (a connection not between requests: a websocket, a new one)
        # (Nor while the loop has callbacks queued, a request read this turn among them: _poll.)
        words = rescue.words
        idle = []
        for transport, w in self.slots.items():
            if int(words[w]) != _IDLE or transport.is_closing() or _asgiloop.unread(transport):
                return []
            idle.append(transport)
        return idle

    def _put_off(self, threads: list[str]) -> None:
        """A refresh is due but a thread it cannot stop runs (a job in the executor, another
        thread): try again in a second, saying so once per episode (DEBUG after), never with a
        traceback (a ``ThreadsAlive`` raised from the loop callback was logged at every try)."""
        assert self.loop is not None
        log.log(logging.DEBUG if self.put_off else logging.INFO,
                "forkpoint: refresh of the worker's checkpoint put off while other threads run: %s",
                ", ".join(threads))
        self.put_off = True
        self.watching = True
        self.loop.call_later(1.0, self._poll)

    def _checkpoint(self, idle: list[Any] | None = None) -> None:
        """Take the worker's checkpoint; ``idle``: keep-alive connections open, idle between
        requests, which its processes let go of (``_idle_connections``)."""
        merge_policy(self.quarantine_after)
        if not self.n:
            gc.freeze()         # the worker's heap at startup: see wsgi._freeze
        if self.rescue is None:
            self.rescue = Rescue(SLOTS, "asgi-inflight")
        if not self.n and self.loop is not None:
            # Work a request hands to a thread (a plain def endpoint) is marked with the request
            # there, so that a crash in it blames that request and no other (_threadmarks).
            _threadmarks.install(self.loop, runtime().arena_or_create(), _response_due)
            # So is a task that a request's step creates: its steps are the request's.
            _mark_tasks(self.loop, self)
        n = self.take_checkpoint(tuple(fd for fd in (_asgiloop.fd_of(t) for t in idle or ()) if fd >= 0))
        if restored_into(n):
            answered, closed = self.rescue.rescue()
            # The failed process served those connections on after the checkpoint, and the holder
            # of its descriptors has answered or closed them with the others (rescue); here their
            # descriptors are placeholders, dropped before the loop runs again. (Their slots are
            # free already: rescue() freed every slot.)
            # The loop may have read a request on one of them in the turn that took the refresh
            # (it runs the callbacks of the sockets it found readable before the timers due: under
            # steady traffic, every refresh), its task made and not yet run: the failed process
            # served it, so it must not run again here (__call__).
            self.dropped = frozenset(idle or ())
            for transport in idle or ():
                self.slots.pop(transport, None)
                transport.abort()
            log.warning("forkpoint: worker restored to checkpoint %d (%s); %d client(s) answered 500, "
                        "%d closed", n, snapshots.restore_reason(), answered, closed)
            return
        self.dropped = frozenset()
        log.info("forkpoint: worker checkpoint %d taken", n)

    # -- ASGI ---------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The usual request: a dictionary read for its key and record, one word for the quarantine,
        # two words of its connection's rescue slot, the step's mark. Few Python calls: in a real
        # worker each one is cold (see wsgi._Restart.__call__).
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                return await self._lifespan(scope, receive, send)
            if kind != "websocket":
                return await self.app(scope, receive, send)
        # The request's task, looked up in the loop it was made for: None when another loop runs
        # it (or on the first call). asyncio.get_running_loop() would also say, but it calls
        # getpid(2) every time, which took 3% of a real uvicorn worker's time in py-spy's samples.
        loop = self.loop
        task = _current_task(loop) if loop is not None else None
        if task is None:
            self._checked_loop(receive, send)
            task = _current_task(self.loop)
        if self.refused:
            raise RuntimeError(self.refused)
        if self.dropped and (getattr(getattr(send, "__self__", None), "transport", None) or
                             _transport_of(send, scope)) in self.dropped:
            return await _gone(receive)     # read before a restore, on a connection let go of
        if self.n == 0 and not self.watching:
            if not self.warned:
                self.warned = True
                log.warning("forkpoint: no ASGI lifespan startup was seen (lifespan off?): the worker "
                            "is checkpointed the first time it holds no connection")
            self._watch()
        record: tuple[bytes, int] | None = None
        if self.keyfn is None:
            seen = (kind, scope.get("method"), scope.get("path"), scope.get("query_string"))
            known = self.known.get(seen) or self._know(seen, scope)
            k, record = known
        else:
            k = self.keyfn(scope)
            if type(k) is not str or not 0 < len(k) <= 64:
                k = _key(k)
        if not quiet() and k in _known.keys_of(self.arena or runtime().arena_or_create()):
            if kind == "http":
                await _respond(send, REFUSED)
            else:
                if self.n and self.rescue is not None:    # (as for a websocket let in, below)
                    self._upgraded(send, self.rescue)
                await _refuse_websocket(scope, send)
            return None
        self.seq += 1
        seq = self.seq
        rescue = self.rescue if self.n else None
        words: Any = rescue.words if rescue is not None else None
        http = kind == "http"
        w = -1
        conn: Any = None
        expiry = None
        # From here on the request is in flight until the finally below, whatever raises: a
        # request counted and never uncounted would hold off every checkpoint after it (the
        # first one too, without a lifespan startup), and a slot left marked in flight would be
        # answered by a restore long after this request was.
        self.inflight += 1
        # The request in flight, for the tasks its code makes (_mark_tasks); and when its response
        # is due (0: no longer timed), for the work it hands to threads (_threadmarks).
        live: list[Any] = [True, 0.0]
        request = None
        try:
            request = _REQUEST.set(live)    # (its tasks inherit it: _mark_tasks)
            if rescue is not None and not http:
                self._upgraded(send, rescue)
            elif rescue is not None:
                conn = getattr(getattr(send, "__self__", None), "transport", None) or \
                    _transport_of(send, scope)
                w = self.slots.get(conn, -1) if conn is not None else -1
                if w >= 0:                # a request on a connection that holds a slot (Rescue.busy)
                    words[w + _SEQ] = seq
                    words[w] = _INFLIGHT
                elif conn is not None:
                    w = self._slot(conn, rescue)
            if w >= 0:
                # A plain function returning the server's own awaitable: no coroutine of ours per
                # send. Whether the response started is the slot's state word (read back below).
                def app_send(message: Message) -> Awaitable[None]:
                    if message["type"] == "http.response.start":
                        # Only while the slot is still this request's: uvicorn runs a request to
                        # its end after its client left, and that connection's loss freed the
                        # slot, which another connection's request may hold by now.
                        if words[w] == _INFLIGHT and words[w + _SEQ] == seq:
                            words[w] = _STARTED
                        if expiry is not None:      # answered: see _Expiry
                            expiry.due.pop(task, None)
                            live[1] = 0.0
                            _untime(live)
                    return send(message)
                began: list[bool] | None = None
            else:
                began = []

                def app_send(message: Message) -> Awaitable[None]:
                    if not began and message["type"] == "http.response.start":
                        began.append(True)
                        if expiry is not None:      # answered: see _Expiry
                            expiry.due.pop(task, None)
                            live[1] = 0.0
                            _untime(live)
                    return send(message)
            # A coroutine (driven by hand below); an application whose __call__ is a plain
            # function may raise here, before any coroutine exists.
            coro: Any = self.app(scope, receive, app_send)
            # A websocket's session is not a request whose response is due in ``timeout``: it
            # waits for its client as long as both like (each step still has the deadline).
            if task is not None and self.expiry is not None and http:
                expiry = self.expiry
                # Work in a thread gets one more ``timeout`` past the response's due time (which
                # _Expiry answers): cutting it restores the worker and fails every request in
                # flight there, so a thread that merely ran a little late must not; a stuck one is
                # cut all the same.
                live[1] = expiry.add(task) + expiry.timeout  # type: ignore[arg-type]
            if not self.n:
                await coro
            else:
                # The first step runs here, marked; most requests end in it, and only one that
                # suspends needs _Steps for the steps after.
                if record is None:
                    record = self.record_of(k)
                arena = self.arena
                if arena.enter_step(record, self.timeout or 0.0, self.n):
                    try:
                        pending = coro.send(None)
                    except StopIteration:
                        pending = _DONE
                    finally:
                        # Once more if a handler raised as it began (it makes no call, so only its
                        # start can be cut short): a step left marked would blame this request, and
                        # its deadline restore the worker, long after the step ended. Inline: a
                        # helper's own start could be cut short before its try.
                        try:
                            arena.leave_step()
                        except BaseException:
                            arena.leave_step()
                            raise
                    if pending is not _DONE:
                        await _Steps(coro, record, self, pending)
                else:
                    await _Steps(coro, record, self)
        except asyncio.CancelledError:
            if expiry is None or task not in expiry.expired:
                raise
            log.warning("forkpoint: request %r waited longer than %gs: cancelled", k, self.timeout)
            # A connection that no longer holds its slot was lost (the client closed it, its
            # response long complete: Starlette's BackgroundTasks run after it): there is no one
            # to answer, and the slot's word may be another connection's by now.
            if began is not None:
                started = bool(began)
            else:
                started = self.slots.get(conn) != w or int(words[w]) == _STARTED
            if not started and http:
                await _respond(send, FAILED)
        finally:
            self.inflight -= 1          # first, and with no call before it: nothing cuts it short
            live[0] = False             # (no call either) its tasks' later steps are nobody's
            try:
                self._ended(task, expiry, conn, w, words, seq)
            except BaseException:       # cut short by a handler that raised (Ctrl-C): once more
                self._ended(task, expiry, conn, w, words, seq)
                raise
            if request is not None:     # (left set if cut short: the request's task ends here)
                _REQUEST.reset(request)
            if self.n and not self.inflight and not self.watching and self.refresh.every is not None \
                    and self.refresh.due():
                self._watch()
        return None

    def _ended(self, task: Any, expiry: _Expiry | None, conn: Any, w: int, words: Any,
               seq: int) -> None:
        """The request is over: its timeout and, if its connection still holds it, its slot's state
        (idle: a restore now must not answer that connection). Each part may be done already.
        The slot is left alone once a later request on the connection has taken it: uvicorn reads
        the next request of a keep-alive connection as soon as a response is complete, while the
        task that sent it may still run (Starlette's BackgroundTasks); marking the slot idle then
        left that next request's client closed, not answered 500, by a restore."""
        if expiry is not None:
            expiry.done(task)
        if w >= 0 and self.slots.get(conn) == w and int(words[w + _SEQ]) == seq:
            words[w] = _IDLE                          # (Rescue.idle)
        if self.arena is not None:
            self.arena.count_served()

    def _know(self, seen: tuple[Any, ...], scope: Scope) -> tuple[str, tuple[bytes, int]]:
        """The default key of a request with this type, method, path and query, and its record."""
        if len(self.known) >= 1024:
            self.known.clear()
        k = _default_key(scope)
        known = self.known[seen] = (k, self.record_of(k))
        return known

    def _upgraded(self, send: Send, rescue: Rescue) -> None:
        """A websocket on a connection that held a slot for its HTTP requests: the server gives
        the connection another protocol, whose loss would never release the slot."""
        transport = getattr(getattr(send, "__self__", None), "transport", None) or \
            _transport_of(send, None)
        w = self.slots.pop(transport, -1) if transport is not None else -1
        if w >= 0:
            rescue.release(rescue.slot_of(w))

    def _slot(self, transport: Any, rescue: Rescue) -> int:
        """A rescue slot for the request's connection, held from its first request until it is
        lost (its protocol's ``connection_lost``), so a keep-alive connection records its socket
        once. Returns the slot's state word in ``rescue.words`` (-1: the server hides the socket,
        or no slot is free).

        With every slot taken, the slot of the oldest connection that is idle between requests is
        given to this one (that connection takes a slot again at its next request): idle
        keep-alive connections held them all (uvicorn keeps one 5 s after its last response,
        hypercorn keeps one its client closed as long), and a crash then left the clients of new
        connections with a closed connection instead of a 500."""
        protocol = transport.get_protocol()
        fd = _asgiloop.fd_of(transport)
        try:
            ino = os.fstat(fd).st_ino if fd >= 0 else 0
        except OSError:
            fd, ino = -1, 0
        slots = self.slots
        if fd >= 0 and rescue.full():
            words = rescue.words
            for idle, w in slots.items():
                if int(words[w]) == _IDLE:
                    del slots[idle]
                    rescue.release(rescue.slot_of(w))
                    break
        slot = rescue.hold(fd, self.seq, ino)
        if slot < 0 or protocol is None:
            rescue.release(slot)
            return -1
        lost = protocol.connection_lost
        if not getattr(lost, "_forkpoint_slot", False):   # (once: a connection may take a slot again)
            def connection_lost(exc: BaseException | None) -> None:
                w = slots.pop(transport, None)
                if w is not None:
                    rescue.release(rescue.slot_of(w))
                lost(exc)

            connection_lost._forkpoint_slot = True  # type: ignore[attr-defined]
            protocol.connection_lost = connection_lost
        w = slots[transport] = rescue.word(slot)
        return w

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self._checked_loop(receive, send)
        if refused:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                await send({"type": "lifespan.startup.failed", "message": refused})
            return None
        async def startup_send(message: Message) -> None:
            await send(message)
            if message.get("type") == "lifespan.startup.complete":
                self._watch(eager=True)     # the server listens next

        try:
            return await self.app(scope, receive, startup_send)
        except Exception:
            if self.n == 0:
                self._watch(eager=True)     # no lifespan support: uvicorn goes on starting
            raise


def _transport_of(send: Send, scope: Scope | None) -> Any:
    """The asyncio transport of the connection ``send`` answers on, where the server is not
    uvicorn (whose ``send`` is a method of its protocol, which has it: looked up inline by the
    caller). Hypercorn's asyncio worker passes ``HTTPStream.app_send``: the stream sends through
    its protocol (``H11Protocol``) to ``TCPServer.protocol_send``, which writes to an asyncio
    ``StreamWriter``. Without it no request had a rescue slot, and the client of every request a
    crash or a timeout failed saw a closed connection instead of the 500 (a Hypercorn audit,
    2026-11-29). None if not found, and for HTTP/2 (``scope``'s ``http_version``): the streams of
    a connection share its socket, and a rescue's raw HTTP/1.1 answer is no HTTP/2 frame."""
    if scope is not None and not str(scope.get("http_version", "1.1")).startswith("1"):
        return None
    owner = getattr(send, "__self__", None)
    for _ in range(4):
        if owner is None:
            return None
        writer = getattr(owner, "writer", None)
        if writer is not None:
            return getattr(writer, "transport", None)
        owner = getattr(getattr(owner, "send", None), "__self__", None)
    return None


async def _gone(receive: Receive) -> None:
    """A request (or websocket) whose connection a restored process dropped (``_checkpoint``): the
    failed process served it. Not run: its disconnect is awaited, so that the server sees a client
    gone, not an application that returned without a response (uvicorn logs that and writes 500)."""
    async def disconnect() -> None:
        while not str((await receive()).get("type", "")).endswith("disconnect"):
            pass

    try:
        await asyncio.wait_for(disconnect(), 5.0)
    except asyncio.TimeoutError:
        pass


async def _respond(send: Send, what: tuple[str, int, bytes]) -> None:
    _, status, body = what
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _refuse_websocket(scope: Scope, send: Send) -> None:
    """A quarantined websocket handshake: the same 503 as HTTP where the server lets the application
    answer the handshake with a response (the ASGI ``websocket.http.response`` extension: uvicorn's,
    hypercorn's), else a close before the accept (the server answers 403). Returning without either
    made uvicorn log "ASGI callable returned without completing handshake." and answer 500."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        _, status, body = REFUSED
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1013})     # try again later


_DONE = object()        # a coroutine's first step returned (or: nothing pending)
_UNREAD = object()      # a nested step had not read the input marked around it yet


def _unmark(arena: Any, deadline: Deadline | None, outer: Any) -> None:
    """Undo a nested step's marks; each may be undone already (``Deadline.clear`` forgets). The
    input marked around the step (``outer``: a ``processing()`` held across an await) is marked
    again, as WSGI and ``processing()`` itself do; ``_UNREAD``: nothing was marked yet."""
    if deadline is not None:
        deadline.clear()
    if outer is not _UNREAD:
        arena.set_processing(outer)


class _Expiry:
    """The ``timeout`` of every request in flight, on one timer of the loop: how long its client
    waits for the response to start. A request leaves it as its response starts: a stream (server-
    sent events, a download) and work after a complete response (Starlette's ``BackgroundTasks``)
    take as long as they take, as without forkpoint (the FastAPI audit of 2026-11-29 found both cut
    at ``timeout``, the background work lost without a word); a step that holds the loop past
    ``timeout`` is still cut by its own deadline, wherever it is. A websocket is a session, not a
    request, and never enters it.

    Every request gets the same timeout, so deadlines come in the order requests start: a dict
    from each request's task to its deadline keeps them in that order, and its first entry is the
    next to expire. That is one dict store and one pop per request, instead of a ``call_later``
    handle per request (its creation, a heap push and a cancel). A task cancelled for its timeout
    is in ``expired`` until its request ends.
    """

    __slots__ = ("loop", "timeout", "due", "expired", "handle", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.due: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.handle: asyncio.TimerHandle | None = None
        self.time = loop.time

    def add(self, task: asyncio.Task[Any]) -> float:
        """Time ``task``'s request; when its response is due (the loop's time: ``time.monotonic``)."""
        at = self.due[task] = self.time() + self.timeout
        if self.handle is None:
            self.handle = self.loop.call_at(at, self._due)
        return at

    def done(self, task: asyncio.Task[Any]) -> bool:
        """The request of ``task`` is over; whether its timeout had cancelled it."""
        self.due.pop(task, None)
        if self.expired and task in self.expired:
            self.expired.discard(task)
            return True
        return False

    def _due(self) -> None:
        self.handle = None
        due, now = self.due, self.loop.time()
        while due:
            task, at = next(iter(due.items()))
            if at > now:
                self.handle = self.loop.call_at(at, self._due)
                return
            del due[task]
            self.expired.add(task)
            task.cancel()


# The request whose code runs, as a cell that says whether it is still in flight: a task it made
# may outlive it (fire-and-forget work, a shared worker task a first request starts lazily).
# Its second item: when its response is due (0: it has started, or the request is not timed).
_REQUEST: ContextVar[list[Any] | None] = ContextVar("forkpoint.asgi.request", default=None)


def _response_due() -> list[Any] | None:
    """The timer of work that the request whose code runs hands to a thread now: its cell, whose
    due time is its response's (``_Expiry``), as a thread cannot be cancelled; work handed off after
    the response started (Starlette's sync ``BackgroundTasks``, a sync iterator streamed), or
    running still as it starts (``_threadmarks.untime``), is not timed."""
    return _REQUEST.get()


_untime = _threadmarks.untime


def _mark_tasks(loop: asyncio.AbstractEventLoop, owner: _Protected) -> None:
    """Drive each task that a request's code creates with ``_Steps`` too, marked with that request.

    Middleware and frameworks run a request's application in tasks of their own: Starlette's
    ``BaseHTTPMiddleware`` (FastAPI's ``@app.middleware("http")``) in an AnyIO task, Django's
    ``ASGIHandler`` the whole request. Unmarked, a crash there blamed nobody: the same request
    failed 500 again and again, never 503, until the recovery budget ran out and the worker died;
    and a step stuck in such a task had no deadline. A task that a request's code makes (its
    task's context says so: ``_REQUEST``, which tasks inherit) while a step is marked is wrapped
    with that step's record (the request's, or an input's nested in it), for as long as the request
    is in flight (``_TaskSteps``); any other (the server's own task per request, one made under a
    mark around the whole loop) is left alone.

    The loop's ``create_task`` is wrapped, not its task factory: a factory makes CPython 3.13.0 name
    every task "None", and one chained in front of the application's eager task factory hides it
    from AnyIO, which must then make its tasks with that factory's constructor (a POST through
    ``BaseHTTPMiddleware`` failed 500). So AnyIO's tasks under an eager factory, which it makes
    with that constructor, stay unmarked. Costs a context lookup per task created, and an arena
    read per task a request makes.
    """
    plain = loop.create_task
    if getattr(plain, "_forkpoint_marks", False):
        return

    def create_task(coro: Any, **kwargs: Any) -> Any:
        live = _REQUEST.get()
        if live is not None and live[0] and owner.n and type(coro) is _CoroutineType:
            record = owner.arena.processing_now()
            if record is not None:
                coro = _TaskSteps(coro, record, owner, live)
        return plain(coro, **kwargs)

    create_task._forkpoint_marks = True  # type: ignore[attr-defined]
    loop.create_task = create_task  # type: ignore[method-assign]


class _Steps:
    """Drive a request's coroutine one step at a time, marking the request as the one running.

    Each step (from a resumption to the next suspension) writes the request's key to the arena
    and sets its deadline; both are cleared when the step yields. A crash or a hang inside a step
    is then blamed on this request only, and a restore cuts a step that runs past ``timeout``.
    The request's first step is run by ``_Protected.__call__`` itself (most requests end there);
    ``pending`` is what it yielded, handed to the loop before the coroutine is resumed here.
    """

    __slots__ = ("coro", "record", "deadline", "arena", "timeout", "n", "pending")

    def __init__(self, coro: Any, record: tuple[bytes, int], owner: _Protected, pending: Any = _DONE) -> None:
        self.coro = coro
        self.record = record
        self.arena = owner.arena
        self.n = owner.n
        self.timeout = owner.timeout
        self.deadline: Deadline | None = None     # made when a deadline is armed already
        self.pending = pending      # what the coroutine's first step (run by the caller) yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        return self  # type: ignore[return-value]

    def __getattr__(self, name: str) -> Any:
        # Seen from outside, the coroutine driven: a task's coroutine is looked into by AnyIO,
        # whose cancel scopes ask inspect.getcoroutinestate() (cr_running, cr_frame, cr_suspended)
        # of every task they cancel (a POST through BaseHTTPMiddleware hung without this), by
        # asyncio's stack and repr (cr_frame, cr_code, __qualname__), and by a watchdog() whose
        # block is suspended at an await (the chain of cr_await, which this continues).
        if name == "coro":      # (not yet set)
            raise AttributeError(name)
        return getattr(self.coro, name)

    def __iter__(self) -> _Steps:
        return self

    def send(self, value: Any = None) -> Any:
        pending = self.pending
        if pending is not _DONE:
            self.pending = _DONE
            return pending
        arena = self.arena
        if arena.enter_step(self.record, self.timeout or 0.0, self.n):    # nothing enclosing
            try:
                return self.coro.send(value)
            finally:
                try:                # (as in _Protected.__call__)
                    arena.leave_step()
                except BaseException:
                    arena.leave_step()
                    raise
        return self._nested(self.coro.send, value)

    __next__ = send     # (value None: the loop resumes a task with next())

    def throw(self, *exc: Any) -> Any:
        self.pending = _DONE
        return self._nested(self.coro.throw, *exc)

    def _nested(self, step: Callable[..., Any], *args: Any) -> Any:
        """A step with a deadline armed already (a ``watchdog()`` around the loop), or a throw."""
        arena = self.arena
        deadline = None
        outer = _UNREAD
        try:        # the marks too: a handler that raises as one is made finds it undone below
            outer = arena.processing()
            arena.set_processing_record(self.record)
            if self.timeout is not None:
                deadline = self.deadline = self.deadline or Deadline()
                deadline.set(self.timeout, self.n)
            return step(*args)
        finally:
            try:
                _unmark(arena, deadline, outer)
            except BaseException:       # cut short by a handler that raised: once more
                _unmark(arena, deadline, outer)
                raise

    def close(self) -> None:
        self.coro.close()


class _TaskSteps(_Steps):
    """``_Steps`` for a task a request's code made: marked with the request while it is in flight,
    and nobody's after (a crash or a long step in work that outlives its request blames no request,
    as before: never the one that happened to start a shared worker task)."""

    __slots__ = ("live",)

    def __init__(self, coro: Any, record: tuple[bytes, int], owner: _Protected, live: list[Any]) -> None:
        super().__init__(coro, record, owner)
        self.live = live

    def send(self, value: Any = None) -> Any:
        if self.live[0]:
            return _Steps.send(self, value)
        return self.coro.send(value)

    __next__ = send

    def throw(self, *exc: Any) -> Any:
        if self.live[0]:
            return _Steps.throw(self, *exc)
        return self.coro.throw(*exc)
