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

The loop's self-pipe is left as it is. A byte in it is a signal whose C handler ran (in the process
that was rolled back, or before the checkpoint) and whose ``add_signal_handler`` callback has not:
asyncio reads the byte and schedules the callback in one go. Dropping such bytes after a restore
lost the signal for good: a SIGTERM that came during a step that then crashed was never handled
(tests/test_signals.py).

Nothing here imports asyncio: a program that never did has no loop to rejoin. Other event loops
(uvloop, trio) are not covered.
"""
from __future__ import annotations

import select
import selectors
import sys
from typing import Any


def running_loop() -> Any:
    """The asyncio loop running in this thread now, or None."""
    aio = sys.modules.get("asyncio")
    return aio.events._get_running_loop() if aio is not None else None


def rejoin(loop: Any, *, moved_heap: bool) -> None:
    """Make ``loop`` the running loop of this process again.

    ``moved_heap`` says that another process may have used the loop's selector since (a restore);
    after ``start()`` the only other holder is the shepherd, which never does.
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
