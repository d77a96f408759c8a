"""The worker's checkpoint (asgi._Protected._poll) is never taken while the loop holds a socket it
has accepted and not yet made a transport of (_accept_connection ran, _accept_connection2's task
has not): in-process, with the checkpoint recorded instead of taken."""
from __future__ import annotations

import asyncio
import inspect
import socket
import threading
import time

from forkpoint import asgi


def _unstarted_accepts(loop):
    return [t for t in asyncio.all_tasks(loop)
            if t.get_coro().__qualname__.endswith("_accept_connection2")
            and inspect.getcoroutinestate(t.get_coro()) == inspect.CORO_CREATED]


async def _app(scope, receive, send):
    pass


def _run(n: int, busy: bool = False, late_bind: bool = False, thread: bool = False):
    """A server with a client waiting in its backlog; _poll comes due as a timer in the turn that
    accepts it (the order of asyncio's turns: the sockets' callbacks, then the timers due)."""
    loop = asyncio.new_event_loop()
    p = asgi._Protected(_app, None, None, 2, 1.0 if n else None)
    p.loop, p.n, p.watching = loop, n, True
    taken = []

    def checkpoint(idle=None):
        taken.append(len(_unstarted_accepts(loop)))
        p.n += 1
    p._checkpoint = checkpoint
    clients = []

    async def main():
        servers = [await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)]
        port = servers[0].sockets[0].getsockname()[1]
        spin = None
        if busy:                # a task that always has a next step queued
            async def spinner():
                while True:
                    await asyncio.sleep(0)
            spin = asyncio.ensure_future(spinner())
        if thread:
            # A first try that settles (the loop busy) and then waits for a thread; the next
            # try, a second later, comes due in the turn that accepts a client.
            worker = threading.Thread(target=time.sleep, args=(0.3,))
            worker.start()
            tries = []
            quiesce = asgi._asgiloop.quiesce_threads
            asgi._asgiloop.quiesce_threads = lambda *a, **k: tries.append(loop.time()) or quiesce(*a, **k)
            try:
                p._poll()
                while not tries:
                    await asyncio.sleep(0)
                worker.join()
                def connect():
                    clients.append(socket.create_connection(("127.0.0.1", port)))
                    time.sleep(0.1)
                loop.call_at(tries[0] + 0.95, connect)    # the try again: at + 1.0
                await asyncio.sleep(1.3)
            finally:
                asgi._asgiloop.quiesce_threads = quiesce
        elif late_bind:
            # A second bind comes up a turn later (Hypercorn's binds, one after the other),
            # with a client waiting.
            lst = socket.create_server(("127.0.0.1", 0))
            p._poll()                                  # sees the first socket listening
            await asyncio.sleep(0)
            servers.append(await loop.create_server(asyncio.Protocol, sock=lst))
            while p.settling < asgi._SETTLE - 1:
                await asyncio.sleep(0)
            clients.append(socket.create_connection(lst.getsockname()))
        else:
            clients.append(socket.create_connection(("127.0.0.1", port)))
            loop.call_later(0, p._poll)
            time.sleep(0.02)                           # both due in the same turn
        for _ in range(200):
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        if spin is not None:
            spin.cancel()
        return servers

    try:
        servers = loop.run_until_complete(main())
        for s in servers:
            s.close()
    finally:
        for c in clients:
            c.close()
        loop.close()
    return taken


def test_a_refresh_is_not_taken_with_an_accepted_socket_not_yet_a_transport():
    taken = _run(n=1)
    assert all(k == 0 for k in taken), taken


def test_the_first_checkpoint_is_not_taken_with_an_accepted_socket_after_earlier_settling():
    # Settling turns spent on an earlier try (connections came and went before the first
    # checkpoint, lifespan off) do not leave the next try without the guard.
    taken = _run(n=0, busy=True, thread=True)
    assert all(k == 0 for k in taken), taken


def test_a_socket_that_listens_while_the_loop_settles_does_not_accept_into_the_checkpoint():
    taken = _run(n=0, busy=True, late_bind=True)
    assert all(k == 0 for k in taken), taken
