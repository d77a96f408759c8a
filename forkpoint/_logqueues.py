"""Logging's ``QueueListener`` threads: stopped for a copy of the process, started again after it.

Logging that must not block hands its records to a thread: ``logging.handlers.QueueListener``.
Litestar's default logging configuration starts one, and the logging cookbook shows services how
(``dictConfig``'s ``queue_handler`` from Python 3.12, its listener then started by hand). forkpoint's
copies hold one thread (``_clone``), so that thread alone refused every checkpoint and forkpoint's
start (``ThreadsAlive``): under gunicorn every request of a protected application was answered 500,
under uvicorn the worker was never checkpointed and a crash ended it as without forkpoint.

A listener's thread has no state of its own beyond its queue and handlers, which live in the heap
and are copied with it. ``stop()`` puts a sentinel behind the records queued and joins the thread
once it has handled them all, and ``start()`` makes a new thread on the same queue and handlers.
So forkpoint's start and each checkpoint stop the listeners first and start them again afterwards,
in the process that goes on and in every process restored there. A checkpoint then waits for what
the program had queued to be handled (a handler that blocks, on a dead log server, blocks it).
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

__all__ = ["is_listener_thread", "start", "stop"]


def _listener_of(t: threading.Thread) -> Any:
    """The ``QueueListener`` whose thread ``t`` is (None: not one)."""
    handlers = sys.modules.get("logging.handlers")
    if handlers is None:
        return None
    target = getattr(t, "_target", None)
    owner = getattr(target, "__self__", None)
    if isinstance(owner, handlers.QueueListener) and getattr(owner, "_thread", None) is t:
        return owner
    return None


def is_listener_thread(t: threading.Thread) -> bool:
    """Whether ``t`` is a ``QueueListener``'s thread, which ``stop`` ends for a copy."""
    return _listener_of(t) is not None


def stop(into: list[Any] | None = None) -> list[Any]:
    """Stop every running ``QueueListener`` once it has handled its queue; for ``start``.

    Each is listed (in ``into``, if given) before it is stopped: a handler that raises while a
    stop waits for the queue (a Ctrl-C) leaves it listed, for ``start`` to finish and start again,
    instead of a listener whose thread ends and is never started again (every record after it
    lost, without a word)."""
    stopped = [] if into is None else into
    if "logging.handlers" not in sys.modules:
        return stopped
    current = threading.current_thread()
    listeners = [lst for t in threading.enumerate()
                 if t is not current and (lst := _listener_of(t)) is not None]
    for lst in listeners:
        stopped.append(lst)
        _stopping[lst] = lst._thread
        lst.stop()
        _stopping.pop(lst, None)
    return stopped


def start(stopped: list[Any]) -> None:
    """Start again the listeners ``stop`` stopped (each that is still stopped). One whose stop was
    cut short has its sentinel queued: its thread ends once the queue is handled, which is waited
    for here, as ``stop`` would have."""
    for lst in stopped:
        t = _stopping.get(lst)
        running: Any = getattr(lst, "_thread", None)
        if t is not None and t is not threading.current_thread() and id(running) == id(t):
            # (not t.join() alone: one cut short by a handler marks the thread stopped while it
            # still runs, on 3.11: bpo-45274; the queue's join waits for its sentinel handled)
            q = getattr(lst, "queue", None)
            join = getattr(q, "join", None)
            if join is not None and hasattr(q, "task_done"):
                join()
            t.join()
            lst._thread = None
        _stopping.pop(lst, None)
        if getattr(lst, "_thread", None) is None:
            lst.start()


# A listener whose stop() is under way, and the thread it stops: one cut short is finished by start.
_stopping: weakref.WeakKeyDictionary[Any, threading.Thread] = weakref.WeakKeyDictionary()
