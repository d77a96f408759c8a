"""A running asyncio loop survives ``start()`` and every restore.

``start()`` and a restore both continue the program in another process, inside whatever coroutine
called ``tsetjmp()``. Three things about a running loop are tied to the process it ran in:

* CPython 3.10 and 3.11 record the PID with the running loop (``_asyncio``'s running-loop holder)
  and report no running loop in any other process, so every ``await asyncio.sleep()`` raises
  ``RuntimeError('no running event loop')``. ``rejoin`` sets the loop again in the new process.
* The epoll instance behind the loop's selector is shared by fork: the process that was rolled back
  went on adding and removing descriptors in it after the checkpoint, so the kernel's interest list
  no longer matches what the restored loop believes is registered (a connection it still serves
  could never be reported ready). ``rejoin`` gives the restored loop a new epoll instance holding
  exactly its own registrations.

A byte in the loop's self-pipe is a signal whose C handler ran (in the process that was rolled
back, or before the checkpoint) and whose ``add_signal_handler`` callback has not: asyncio reads
the byte and schedules the callback in one go. So a restore keeps those bytes (dropping them all
lost a SIGTERM that came during a step that then crashed: its callback never ran), except the
bytes of signals the shepherd sends the restored process again (``drop``: after a failure, every
signal that reached the program since the checkpoint, ``_shepherd_signals._replay``), which would
otherwise be handled twice.

Nothing here imports asyncio: a program that never did has no loop to rejoin. Other event loops
(uvloop, trio) are not covered.
"""
from __future__ import annotations

import os
import select
import selectors
import sys
import threading
from typing import Any


def running_loop() -> Any:
    """The asyncio loop running in this thread now, or None."""
    aio = sys.modules.get("asyncio")
    return aio.events._get_running_loop() if aio is not None else None


_CO_ASYNC_GENERATOR = 0x200     # inspect.CO_ASYNC_GENERATOR
_CO_GENERATOR = 0x20            # inspect.CO_GENERATOR


def suspended_in_task(frame: Any) -> bool:
    """Whether ``frame`` is a coroutine's, suspended at an ``await`` of a task of the loop running
    here now (a ``watchdog()`` block that awaits: its frame is not on the stack when the alarm's
    handler runs in the loop's own frame)."""
    loop = running_loop()
    if loop is None:
        return False
    for task in sys.modules["asyncio"].all_tasks(loop):
        coro = task.get_coro()
        while coro is not None:
            if getattr(coro, "cr_frame", None) is frame or getattr(coro, "gi_frame", None) is frame:
                return True
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    # An async generator's block (an @asynccontextmanager's, an async iterator's) is on no task's
    # chain of awaits: suspended at its yield, or awaited through an asend() object. Only at an
    # expiry, so the one heap scan that finds the generator owning the frame is affordable.
    if frame.f_code.co_flags & _CO_ASYNC_GENERATOR:
        import gc  # noqa: PLC0415
        for ref in gc.get_referrers(frame):
            if getattr(ref, "ag_frame", None) is frame:
                return True     # not on the stack: suspended (ag_running is True when awaited)
    return False


def suspended_generator(frame: Any) -> bool:
    """Whether ``frame`` is a live generator's, suspended at a ``yield`` (a ``watchdog()`` block in
    an ``@contextmanager``'s generator, or in one that a loop iterates: the code it guards runs in
    the caller, and the generator's frame is on no stack when the alarm comes). A generator left
    suspended by an interrupt on entry is not live: the ``with`` it was entered by drops it, and
    its close runs the block's exit. Only at an expiry (one heap scan)."""
    if not frame.f_code.co_flags & _CO_GENERATOR:
        return False
    import gc  # noqa: PLC0415
    return any(getattr(ref, "gi_frame", None) is frame for ref in gc.get_referrers(frame))


def rejoin(loop: Any, *, moved_heap: bool, drop: int = 0) -> None:
    """Make ``loop`` the running loop of this process again.

    ``moved_heap`` says that another process may have used the loop's selector since (a restore);
    after ``start()`` the only other holder is the shepherd, which never does. ``drop``: the
    signals (bit ``s - 1``) whose bytes are taken out of the loop's self-pipe.
    """
    aio = sys.modules.get("asyncio")
    if loop is None or aio is None:
        return
    aio.events._set_running_loop(loop)
    if not moved_heap:
        return
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, selectors.EpollSelector):
        _renew_epoll(selector)
    if drop:
        _drop_signals(loop, drop)


def _drop_signals(loop: Any, drop: int) -> None:
    """Take the bytes of the signals in ``drop`` out of the loop's self-pipe, keep the others."""
    ssock, csock = getattr(loop, "_ssock", None), getattr(loop, "_csock", None)
    if ssock is None or csock is None:
        return
    data = b""
    try:
        while chunk := ssock.recv(4096):
            data += chunk
    except (BlockingIOError, InterruptedError, OSError):
        pass
    keep = bytes(b for b in data if not (b and drop >> (b - 1) & 1))
    if keep:
        try:
            csock.send(keep)
        except OSError:
            pass


def _renew_epoll(selector: selectors.EpollSelector) -> None:
    fresh = select.epoll()
    for key in selector.get_map().values():
        mask = 0
        if key.events & selectors.EVENT_READ:
            mask |= select.EPOLLIN
        if key.events & selectors.EVENT_WRITE:
            mask |= select.EPOLLOUT
        fresh.register(key.fd, mask)
    old, selector._selector = selector._selector, fresh  # type: ignore[attr-defined]
    old.close()


def executor_idle(executor: Any) -> bool:
    """Whether every thread of a ``ThreadPoolExecutor`` waits for work (no job queued or running):
    each thread releases ``_idle_semaphore`` when its job is done, and a submission takes it back.
    Unknown internals count as busy."""
    try:
        return bool(executor._work_queue.empty()
                    and executor._idle_semaphore._value >= len(executor._threads))
    except AttributeError:
        return False


def stop_idle_executor(loop: Any) -> bool:
    """Shut the loop's default executor down if all its threads are idle (asyncio keeps them after
    ``to_thread()``, ``run_in_executor(None, ...)`` and host name lookups, and starts a new executor
    on next use); whether it did. A checkpoint cannot copy them, and with ``allow_threads=True``
    the restored loop waited for them for ever (its next ``to_thread()``, ``asyncio.run()``'s end)."""
    executor = getattr(loop, "_default_executor", None)
    if executor is None or not executor_idle(executor):
        return False
    loop._default_executor = None        # asyncio starts a new one on next use
    executor.shutdown(wait=True)
    return True


_WATCHER_PREFIXES = ("waitpid-", "asyncio-waitpid-")


def finish_child_watchers(limit: float = 1.0) -> bool:
    """Wait for asyncio's child-watcher threads whose child has been reaped; whether any ended.

    On 3.10 and 3.11 ``asyncio.create_subprocess_exec`` waits for each child in a thread of its
    own (``ThreadedChildWatcher``), which hands the exit status to the loop and then ends. ``await
    proc.wait()`` returns as soon as the loop has it, while the thread may not have ended yet: a
    ``tsetjmp()`` right after was refused in 3-6 of 60 tries. A thread whose child is gone (it is
    past its ``waitpid``) is joined; one still waiting for a running child is left, and refuses.
    """
    ended = False
    for t in threading.enumerate():
        if not t.name.startswith(_WATCHER_PREFIXES) or not t.is_alive():
            continue
        args: tuple[Any, ...] = getattr(t, "_args", ())  # (loop, pid, callback, args): threading's
        pid = args[1] if len(args) > 1 and isinstance(args[1], int) else 0
        if pid <= 0 or os.path.exists(f"/proc/{pid}"):
            continue                           # its child runs (or is not reaped yet): it stays
        t.join(limit)
        ended = ended or not t.is_alive()
    return ended
