"""What the ASGI wrapper needs to know about the asyncio loop it runs in, and the threads beside it.

A restart checkpoint of an ASGI worker must hold no client connection: the checkpoint's frozen
copies would keep every such socket open, so a connection the server closes later would never see
FIN (asyncio closes without ``shutdown``) and its client would wait forever. So the checkpoint is
taken from a loop callback once the server listens and no connection is open (at startup).

forkpoint refuses to checkpoint beside other threads (fork copies one). Four are common in a
uvicorn worker and are dealt with here: the default executor's idle threads (asyncio resolves host
names there) and AnyIO's idle worker threads (Starlette's plain ``def`` endpoints), which are shut
down (new ones start on next use) before the first checkpoint and every refresh; a logging
``QueueListener``'s thread (Litestar's default logging, dictConfig's ``queue_handler``), which the
checkpoint itself stops and starts again (``_logqueues``), so it is let be; and the health-check
thread of ``uvicorn --workers N``, which answers its supervisor's pings over a socketpair; its duty
moves into the event loop (``take_over_uvicorn_pings``), where it survives checkpoints and restores.

Only asyncio's selector loops are covered (as by ``_eventloop``); uvloop is not.
"""
from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import termios
import threading
from asyncio import selector_events
from typing import Any

from . import _eventloop
from ._logqueues import is_listener_thread

log = logging.getLogger("forkpoint")

__all__ = ["client_connections", "listening", "pause_accepting", "quiesce_threads", "resume_accepting",
           "unsupported", "unsupported_server"]


def unsupported(loop: asyncio.AbstractEventLoop) -> str | None:
    """Why forkpoint cannot protect an application running on ``loop`` (None: it can)."""
    if isinstance(loop, selector_events.BaseSelectorEventLoop):
        return None
    name = f"{type(loop).__module__}.{type(loop).__qualname__}"
    hint = " (uvicorn chose it: run uvicorn with --loop asyncio)" if "uvloop" in name else ""
    return (f"forkpoint.asgi.protect needs an asyncio selector event loop; this one is {name}{hint}: "
            "its state in the kernel cannot be carried over a restore")


_USE = "serve it with uvicorn (--loop asyncio) or hypercorn, which forkpoint supports"


def unsupported_server(loop: asyncio.AbstractEventLoop, receive: Any, send: Any) -> str | None:
    """Why forkpoint cannot protect an application served on ``loop`` by the server whose
    ``receive``/``send`` it was handed (None: none that forkpoint knows to be unfit).

    The worker's checkpoint needs the server's listening socket and connections in ``loop`` as
    asyncio's own server and transports (``listening``, ``client_connections``, the rescue slots);
    otherwise no checkpoint is ever taken and the application runs unprotected, with no word.

    * Granian: its Rust runtime accepts and serves the connections in threads of its own (3 with
      the defaults) and hands each request to the loop; none of its sockets is in the loop. A
      checkpoint beside those threads is refused (``ThreadsAlive``: fork copies one thread), and a
      restored worker would have none to serve with. Its ASGI ``receive``/``send`` are methods of
      ``granian.asgi.LifespanProtocol`` (lifespan) and ``granian._granian.ASGIHTTPProtocol``.
    * Daphne: its loop is asyncio's (Twisted's asyncio reactor), but its sockets are Twisted's
      (registered with ``add_reader``), neither an asyncio server nor asyncio transports. Its
      ``send`` is a ``functools.partial`` of a method of ``daphne.server.Server``.
    """
    for fn in (receive, send):
        owner = getattr(fn, "__self__", None)
        if owner is None and hasattr(fn, "func"):           # functools.partial
            owner = getattr(fn.func, "__self__", None)
        module = type(owner).__module__ if owner is not None else ""
        top = module.partition(".")[0]
        if top == "granian":
            return ("forkpoint.asgi.protect cannot protect an application served by Granian: its "
                    "connections are served by threads of its Rust runtime, outside the asyncio loop, "
                    "which no checkpoint can copy (fork copies one thread) and whose sockets a restored "
                    f"worker could not answer; {_USE}")
        if top == "daphne":
            return ("forkpoint.asgi.protect cannot protect an application served by Daphne: its "
                    "sockets are Twisted's, not asyncio's servers and transports, so the worker's "
                    f"checkpoint is never taken and no failed request can be answered; {_USE}")
    return None


def listening(loop: Any) -> bool:
    """Whether a server accepts connections on ``loop`` (a listening socket is registered)."""
    return bool(_accepting(loop))


def _accepting(loop: Any) -> list[tuple[int, Any, tuple[Any, ...]]]:
    """The listening sockets' descriptors, and the reader callbacks asyncio's servers registered."""
    readers = [(fd, key.data[0]) for fd, key in list(loop._selector.get_map().items())
               if key.data[0] is not None]
    return [(fd, h._callback, h._args) for fd, h in readers
            if getattr(h._callback, "__name__", "") == "_accept_connection"]


def pause_accepting(loop: Any) -> list[tuple[int, Any, tuple[Any, ...]]]:
    """Stop ``loop`` accepting connections (they wait in the kernel's backlog); for
    ``resume_accepting``. So that the server's startup can finish before the worker's checkpoint
    without a connection coming first (``asgi._Protected._poll``)."""
    paused = _accepting(loop)
    for fd, _, _ in paused:
        loop._remove_reader(fd)         # (cancels its handle: callback and arguments are kept)
    return paused


def resume_accepting(loop: Any, paused: list[tuple[int, Any, tuple[Any, ...]]]) -> None:
    """Accept again on the sockets ``pause_accepting`` stopped, except one the server has closed
    since (``Server.close()`` closes it) or registered again itself."""
    if loop.is_closed():
        return
    registered = loop._selector.get_map()
    for fd, callback, args in paused:
        sock = args[1]                  # _accept_connection(protocol_factory, sock, ...)
        key = registered.get(fd)
        if sock.fileno() == fd and (key is None or key.data[0] is None):
            loop._add_reader(fd, callback, *args)


def client_connections(loop: Any) -> int:
    """The socket transports of connections ``loop``'s servers accepted that it holds a socket for
    (closing ones included).

    ``loop._transports`` is asyncio's own registry of them; it is weak, and a transport that has
    lost its connection stays there until it is collected, without its socket. Not a connection
    the program opened to a server (``create_connection``: an asyncpg, redis.asyncio or httpx
    pool's), which has no ``_server``: those stay open for the worker's life, and counted they
    kept the worker from ever taking its checkpoint (an asyncpg pool made in the lifespan
    startup: no checkpoint, a segfault ended uvicorn) or a refresh. ``_connections`` answers for
    them at a restore.
    """
    kind = selector_events._SelectorTransport  # type: ignore[attr-defined]
    return sum(1 for t in list(loop._transports.values())
               if isinstance(t, kind) and getattr(t, "_sock", None) is not None
               and getattr(t, "_server", None) is not None)


def pending(loop: Any) -> bool:
    """Whether callbacks are queued to run in ``loop`` (asyncio's ``_ready``: a task made or woken
    this turn, whose first or next step has not run); unknown internals count as pending."""
    ready = getattr(loop, "_ready", None)
    return ready is None or len(ready) > 0


def fd_of(transport: Any) -> int:
    """The descriptor of ``transport``'s socket (-1: none)."""
    sock = transport.get_extra_info("socket")
    try:
        return sock.fileno() if sock is not None else -1
    except (OSError, AttributeError, ValueError):
        return -1


def unread(transport: Any) -> int:
    """Bytes received on ``transport``'s socket that the loop has not read yet (-1: unknown)."""
    sock = transport.get_extra_info("socket")
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return buf[0]
    except (OSError, AttributeError, ValueError):
        return -1


def quiesce_threads(loop: Any, wait: bool = True) -> list[str]:
    """Stop the threads a checkpoint cannot copy, where that is safe; return those left running.

    Stopped: the default executor's threads (asyncio runs ``to_thread``, ``run_in_executor`` and
    host name lookups there; it starts a new executor on next use), AnyIO's idle worker threads of
    this loop (Starlette and FastAPI run plain ``def`` endpoints, dependencies and background tasks
    there; AnyIO starts new ones on next use) and uvicorn's health-check thread (its duty moves into
    the loop). An application makes the first two while it serves, so a refresh of the checkpoint
    finds them too, not only the first checkpoint: without this every refresh was refused
    (``ThreadsAlive``) and a crash went back to the startup state.

    ``wait``: the first checkpoint, which must come before any connection: an executor with no job
    queued is shut down and waited for, even if a job still runs. False (a refresh): threads are
    stopped only if each of them is idle now and none would be left, so that the loop never waits
    for a job and an executor is not shut down again and again for a checkpoint that another
    thread holds off; the caller tries again later.
    """
    main = threading.main_thread()
    others = [t for t in threading.enumerate() if t is not main and t.is_alive()]
    if not others:
        return []
    executor = getattr(loop, "_default_executor", None)
    pool = set(getattr(executor, "_threads", ()) or ()) if executor is not None else set()
    anyio_idle = [t for t in others if _idle_anyio_worker(t, loop)]
    if not wait:
        held = [t for t in others
                if t not in anyio_idle and not _is_uvicorn_ping_thread(t) and not is_listener_thread(t)
                and (t not in pool or not _eventloop.executor_idle(executor))]
        if held:
            return [t.name for t in held]
    if executor is not None and getattr(executor, "_work_queue", None) is not None \
            and executor._work_queue.empty():
        loop._default_executor = None        # asyncio starts a new one on next use
        executor.shutdown(wait=True)
    for t in anyio_idle:
        _stop_anyio_worker(t)
    for t in anyio_idle:
        t.join(1.0)
    for t in threading.enumerate():
        if t is not main and _is_uvicorn_ping_thread(t):
            take_over_uvicorn_pings(loop, t)
    # (a logging QueueListener's thread is stopped and started again by the checkpoint itself)
    return [t.name for t in threading.enumerate()
            if t is not main and t.is_alive() and not is_listener_thread(t)]


def _idle_anyio_worker(t: threading.Thread, loop: Any) -> bool:
    """An AnyIO worker thread of ``loop`` waiting for work: it is in its loop's idle list (AnyIO puts
    it back there, from the loop, once it has reported its job's result)."""
    kind = type(t)
    if kind.__name__ != "WorkerThread" or not kind.__module__.startswith("anyio."):
        return False
    idle = getattr(t, "idle_workers", None)
    return (getattr(t, "loop", None) is loop and idle is not None and t in idle
            and callable(getattr(t, "stop", None)))


def _stop_anyio_worker(t: Any) -> None:
    """Stop an idle AnyIO worker as AnyIO itself stops one idle for too long: off its loop's lists
    (so a checkpoint's copy does not hand work to a thread it has not got), its root task's
    callback removed, and told to end."""
    root = getattr(t, "root_task", None)
    if root is not None:
        root.remove_done_callback(t.stop)
    t.stop()


def _is_uvicorn_ping_thread(t: threading.Thread) -> bool:
    target = getattr(t, "_target", None)
    owner = getattr(target, "__self__", None)
    return (getattr(target, "__name__", "") == "always_pong" and owner is not None
            and type(owner).__module__.startswith("uvicorn.") and hasattr(owner, "child_conn"))


class _Stop:
    """Stands in for the uvicorn server while its ping thread answers its last ping: reading
    ``started`` raises SystemExit, which ends a thread without a traceback."""

    @property
    def started(self) -> bool:
        raise SystemExit


def take_over_uvicorn_pings(loop: Any, thread: threading.Thread) -> None:
    """Answer ``uvicorn --workers N``'s health checks from the event loop instead of ``thread``.

    The thread waits in ``child_conn.recv()``. It is sent one message of its own (through the copy
    of the supervisor's end this process holds) and ends as it reads its answer from ``_Stop``.
    If it took a real ping instead, that ping's answer comes from the loop with the rest: every
    message read leaves one answer, except the thread's last, which was ours.
    """
    owner = thread._target.__self__  # type: ignore[attr-defined]
    server = owner._server
    owner._server = _Stop()
    try:
        owner.parent_conn.send(b"ping")
        thread.join(10)
    finally:
        owner._server = server
    if thread.is_alive():
        log.warning("forkpoint: uvicorn's health-check thread did not stop")
        return
    conn = owner.child_conn

    def pong() -> None:
        try:
            conn.recv()
            conn.send(owner.server.started)
        except (OSError, EOFError):
            loop.remove_reader(conn.fileno())

    loop.add_reader(conn.fileno(), pong)
    log.info("forkpoint: uvicorn's health checks are answered from the event loop")
