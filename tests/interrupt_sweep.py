"""An interrupt at every point of one forkpoint call, in turn: run by tests/test_interrupt_sweep.py.

``python interrupt_sweep.py CALL`` makes CALL (one of ``CALLS``) again and again; the k-th time, a
KeyboardInterrupt is raised at the k-th point where CPython could run a pending Python signal
handler inside it, as a Ctrl-C typed at that moment would. After each call it checks what such an
interrupt must never leave behind, and that a checkpoint still restores; it stops at the first
call that runs to its end with no point left, and prints one line per violation, then a summary.

Where CPython runs handlers, and how that is modelled: tests/interrupt_tracer.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import sys
import time

from interrupt_tracer import Interrupter, blocked_mask

import forkpoint as fp
from forkpoint import _procfs, _runtime

logged: list[str] = []


class Catch(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logged.append(record.getMessage())


logging.getLogger("forkpoint").addHandler(Catch(logging.WARNING))

API = sys.argv[1]
fp.recover_on(signal.SIGSEGV, max_recoveries=100_000)
fp.start()
rt = _runtime.runtime()
K = fp.persist_int("k")          # survives the restores the checks make
BAD = fp.persist_int("bad")
base = fp.tsetjmp(pin=True)

# -- the calls ---------------------------------------------------------------------------------------
plain = fp.checkpointed(lambda: 1)
with_timeout_and_key = fp.checkpointed(lambda x: x, timeout=5, key=str)


def call_watchdog() -> None:
    with fp.watchdog(5, hard_after=5):
        pass


def call_tlongjmp() -> None:
    n = fp.tsetjmp()
    if fp.chkpt_status(fp.CHKPT_RECOVERED) and fp.chkpt_status(fp.CKPT_TO_STATE) == n:
        return
    fp.tlongjmp(n)


def wsgi_app(environ: dict, start_response: object) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return [b"ok"]


wsgi_protected = None


def call_wsgi() -> None:
    global wsgi_protected
    if wsgi_protected is None:
        from forkpoint import wsgi
        wsgi_protected = wsgi.protect(wsgi_app, timeout=5)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "QUERY_STRING": "", "SERVER_NAME": "x",
               "SERVER_PORT": "80", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
               "wsgi.url_scheme": "http"}
    body = wsgi_protected(environ, lambda status, headers, exc_info=None: None)
    try:
        b"".join(body)
    finally:
        if hasattr(body, "close"):      # the response iterable's close ends the transaction
            body.close()


wsgi_restart = None
server_side, _client_side = socket.socketpair()     # the request's connection, as gunicorn gives it


def call_wsgi_restart() -> None:
    global wsgi_restart
    if wsgi_restart is None:
        from forkpoint import wsgi
        wsgi_restart = wsgi.protect(wsgi_app, mode="restart", timeout=5)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "QUERY_STRING": "", "gunicorn.socket": server_side,
               "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http"}
    body = wsgi_restart(environ, lambda status, headers, exc_info=None: None)
    try:
        b"".join(body)
    finally:
        if hasattr(body, "close"):
            body.close()


asgi_loop = asyncio.new_event_loop()
asgi_protected = None


async def asgi_app(scope: dict, receive: object, send: object) -> None:
    await asyncio.sleep(0)          # a second step: the steps after the first one are _Steps'
    await asyncio.create_task(asyncio.sleep(0))     # a task of the request's (asgi._mark_tasks)
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


async def asgi_receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def asgi_send(message: dict) -> None:
    pass


async def asgi_checkpoint() -> None:
    """The worker's checkpoint, as the wrapper takes it once uvicorn listens."""
    asgi_protected._checked_loop()  # type: ignore[union-attr]
    asgi_protected._checkpoint()  # type: ignore[union-attr]


def call_asgi(nested: bool) -> None:
    """One request; ``nested``: inside a watchdog and, around the traced call (``AROUND``), an
    input being processed, so each step nests its marks (``_nested``)."""
    global asgi_protected
    if asgi_protected is None:
        from forkpoint import asgi
        asgi_protected = asgi.protect(asgi_app, timeout=5)
        asgi_loop.run_until_complete(asgi_checkpoint())
    scope = {"type": "http", "method": "GET", "path": "/x", "query_string": b"", "headers": []}
    request = asgi_protected(scope, asgi_receive, asgi_send)
    if nested:
        with fp.watchdog(5, hard_after=5):
            asgi_loop.run_until_complete(request)
    else:
        asgi_loop.run_until_complete(request)


def settle_loop() -> None:
    """An interrupt out of a loop callback leaves the request's task pending: the program's loop
    runs on, and the request ends."""
    for _ in range(100):
        pending = [t for t in asyncio.all_tasks(asgi_loop) if not t.done()]
        if not pending:
            return
        try:
            asgi_loop.run_until_complete(asyncio.wait(pending))
        except KeyboardInterrupt:   # the point's, raised in the request's task and re-raised in the
            pass                    # request that awaits it: out of the loop, as asyncio does


def call_wsgi_restart_nested() -> None:
    """A restart-mode request inside a watchdog and, around the traced call (``AROUND``), an input
    being processed: its key and deadline nest (``mark``, ``Deadline``)."""
    with fp.watchdog(5, hard_after=5):
        call_wsgi_restart()


def holder_attached() -> None:
    """Before each ``wsgi_renew`` point, untraced: the worker makes its holder as its first request
    after a restore does (each point runs in a process restored after the point before)."""
    r = wsgi_restart.rescue  # type: ignore[union-attr]
    if r.owner != _runtime.runtime().owner_pid:
        r._attach()


def call_processing() -> None:
    with fp.processing("some-key"):
        pass


stored = [0]        # the value the cache call stores, and the last one a whole call stored
whole = [0]


def call_cache() -> None:
    stored[0] += 1
    fp.cache(fp.IN, "c", {"v": stored[0], "pad": "x" * 300})


CALLS = {
    "tsetjmp": lambda: fp.tsetjmp(),
    "tsetjmp_no_spare": lambda: fp.tsetjmp(spares=0),
    "tlongjmp": call_tlongjmp,
    "discard": lambda: fp.discard(fp.tsetjmp()),
    "checkpoints": fp.checkpoints,
    "checkpointed": plain,
    "checkpointed_timeout_key": lambda: with_timeout_and_key(3),
    "watchdog": call_watchdog,
    "wsgi_transaction": call_wsgi,
    "wsgi_restart": call_wsgi_restart,
    "wsgi_restart_nested": call_wsgi_restart_nested,
    "asgi": lambda: call_asgi(False),
    "asgi_nested": lambda: call_asgi(True),
    "asgi_refresh": lambda: asgi_protected._checkpoint(),  # type: ignore[union-attr]
    "wsgi_refresh": lambda: wsgi_restart.refresh_now(),  # type: ignore[union-attr]
    "wsgi_renew": lambda: wsgi_restart.refresh_now(),  # type: ignore[union-attr]
    "processing": call_processing,
    "quarantine": lambda: (fp.quarantine("qk"), fp.release("qk")),
    "cache": call_cache,
    "recover_on": lambda: fp.recover_on(signal.SIGSEGV, max_recoveries=100_000),
}
call = CALLS[API]
if API == "cache":
    call_cache()        # the entry exists: the sweep is of a store (a first one scans the directory)
    whole[0] = stored[0]
if API.startswith("asgi"):
    call_asgi(False)    # the worker's checkpoint is taken: the sweep is of a request
if API.startswith(("wsgi_restart", "wsgi_refresh", "wsgi_renew")):
    call_wsgi_restart()  # the worker's checkpoint is taken: the sweep is of a request (3,232 points
    #                     with the first one, the checkpoint's; swept once by hand: none bad)

# -- what an interrupt must never leave behind ------------------------------------------------------------
mask0 = blocked_mask()
alarm0 = signal.getsignal(signal.SIGALRM)


def table_holders() -> list[int]:
    """The live processes (besides this one) that share this process's descriptor table: a
    descriptor made now shows in their /proc/PID/fd as well."""
    r, w = os.pipe()
    try:
        mine = os.fstat(r).st_ino
        out = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() != "fp-fds":
                        continue
                with open(f"/proc/{name}/status") as f:
                    if "\tZ" in next(line for line in f if line.startswith("State:")):
                        continue
                if os.stat(f"/proc/{name}/fd/{r}").st_ino == mine:
                    out.append(int(name))
            except (OSError, StopIteration):
                continue
        return sorted(out)
    finally:
        os.close(r)
        os.close(w)


def descriptors() -> dict[int, str]:
    """This process's open descriptors and what each names (the listing's own one left out), but
    the pidfds of keepers: the newest checkpoint's, which a call that takes a checkpoint keeps,
    and those a committed call killed, closed once they are gone (``_Runtime.wait_killed``); and
    the two of a server worker's descriptor holder (judged on their own: exactly its own holder)."""
    out = {}
    kept = {fd for fd, _pid in rt.killed}
    if rt.keeper is not None:
        kept.add(rt.keeper.fd)
    for worker in (wsgi_restart, asgi_protected):
        holder = worker.rescue.holder if worker is not None and worker.rescue is not None else None
        if holder is not None:
            kept |= {holder.pidfd, holder.worker_fd}
    for name in os.listdir("/proc/self/fd"):
        if int(name) in kept:
            continue
        try:
            what = os.readlink(f"/proc/self/fd/{name}")
            if what == "anon_inode:[pidfd]":        # which process: a holder, a keeper, a worker
                with open(f"/proc/self/fdinfo/{name}") as f:
                    pid = next(line.split()[1] for line in f if line.startswith("Pid:"))
                what = f"pidfd of {pid} ({_procfs.comm(int(pid))})"
            out[int(name)] = what
        except (OSError, StopIteration):
            continue
    return out


def violations(current_before: int, fds_before: dict[int, str]) -> list[str]:
    out = []
    fds = descriptors()
    if len(fds) > len(fds_before):      # the call may replace a descriptor, never keep one more
        new = {fd: what for fd, what in fds.items() if fds_before.get(fd) != what}
        gone = {fd: what for fd, what in fds_before.items() if fds.get(fd) != what}
        out.append(f"{len(fds) - len(fds_before)} descriptor(s) more after the call: {new}, "
                   f"instead of {gone}")
    if blocked_mask() != mask0:
        out.append(f"signals left blocked: {blocked_mask():#x}")
    if signal.getsignal(signal.SIGALRM) is not alarm0:
        out.append(f"SIGALRM handler left: {signal.getsignal(signal.SIGALRM)}")
    if signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0):
        out.append(f"timer left: {signal.getitimer(signal.ITIMER_REAL)}")
    if rt.arena.deadline() is not None:
        out.append(f"hard deadline left in the arena: {rt.arena.deadline()}")
    if rt.arena.processing():
        out.append(f"key left marked as processing: {rt.arena.processing()!r}")
    if API.startswith("checkpointed") or API == "wsgi_transaction":
        if fp.current_state() != current_before:
            out.append(f"the call's checkpoint {fp.current_state()} left current after it "
                       f"(was {current_before})")
    if API == "cache":
        try:
            got = fp.cache(fp.OUT, "c")["v"]
        except Exception as e:  # noqa: BLE001
            out.append(f"cache(OUT): {e!r}")
        else:
            if got not in (stored[0], whole[0]):
                out.append(f"cache holds {got}: neither the last whole store {whole[0]} nor {stored[0]}")
            whole[0] = got
    worker = asgi_protected if API.startswith("asgi") else wsgi_restart
    if worker is not None:      # its checkpoint, and no other pinned one but the sweep's own
        pinned = [c.id for c in fp.checkpoints() if c.pinned]
        if sorted(pinned) != sorted({base, worker.n}):
            out.append(f"the worker's checkpoint is {worker.n}, the pinned ones {pinned}")
            for c in pinned:
                if c not in (base, worker.n):
                    fp.discard(c)
        want = [worker.rescue.holder.pid] if worker.rescue and worker.rescue.holder else []
        # The worker's table has no holder but its own (one is made lazily after a restore). A
        # holder just stopped (a renewal's old one) shares it until the kernel has torn it down.
        deadline = time.monotonic() + 2.0
        while (holders := table_holders()) and holders != want and time.monotonic() < deadline:
            time.sleep(0.01)
        if holders and holders != want:
            out.append(f"holders of the worker's descriptor table: {holders}, its own {want}")
            for pid in set(holders) - set(want):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        r = worker.rescue
        if r is not None and r.holder is not None:    # written down where a restored process looks
            e = r._entry(r.table)
            if r.words[e] != r.table or r.words[e + 1] != r.holder.pid:
                out.append(f"the holder's entry says table {r.words[e]}, pid {r.words[e + 1]}: "
                           f"its holder is {r.holder.pid} of table {r.table}")
                r.words[e + 1], r.words[e] = r.holder.pid, r.table
    if API.startswith(("wsgi_restart", "wsgi_refresh", "wsgi_renew")):
        r = wsgi_restart.rescue  # type: ignore[union-attr]
        if sorted(r.free) != list(range(r.slots)):
            out.append(f"rescue slots not all free once: {sorted(r.free)} of {r.slots}")
            r.free[:] = range(r.slots)
    if API.startswith("asgi"):
        settle_loop()
        p = asgi_protected
        if p.inflight:  # type: ignore[union-attr]
            out.append(f"{p.inflight} request(s) left counted in flight")  # type: ignore[union-attr]
            p.inflight = 0  # type: ignore[union-attr]
        if p.expiry.due:  # type: ignore[union-attr]
            out.append(f"request timeouts left: {len(p.expiry.due)}")  # type: ignore[union-attr]
            p.expiry.due.clear()  # type: ignore[union-attr]
    if logged:
        out.append(f"logged: {logged[:2]}")
        del logged[:]
    if out:         # put things back, so that the next point is judged on its own
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm0)
        rt.arena.clear_deadlines()
        rt.arena.set_processing(None)
        signal.pthread_sigmask(signal.SIG_SETMASK, {s for s in range(1, 65) if mask0 >> (s - 1) & 1})
    return out


ONLY = os.path.dirname(fp.__file__) if API.startswith("asgi") else None
# An input being processed around a nested call, outside the traced call: its steps must nest
# their marks inside it (a watchdog() block's deadline alone, a record of its own, does not make
# them nest). ``processing()`` itself is swept by its own call.
AROUND = (lambda: fp.processing("outer")) if API.endswith("_nested") else contextlib.nullcontext
not_modelled: set[str] = set()
while True:
    K.add()
    k = K.value
    if API == "wsgi_renew":
        holder_attached()       # a refresh in a worker with a holder: the holder is renewed
    current_before = fp.current_state()
    fds_before = descriptors()
    interrupted = False
    # An event loop's own machinery is not forkpoint's: its points are not counted (a call into it
    # from forkpoint still is, as an interrupt anywhere inside it).
    tracer = Interrupter(k, skip=__file__, only=ONLY)
    with AROUND():
        try:
            with tracer:
                call()
        except KeyboardInterrupt:
            interrupted = True
    not_modelled |= tracer.not_modelled
    bad = violations(current_before, fds_before)
    n = fp.tsetjmp()                    # and the machinery still restores
    if not (fp.chkpt_status(fp.CHKPT_RECOVERED) and fp.chkpt_status(fp.CKPT_TO_STATE) == n):
        try:
            fp.tlongjmp(n)
        except Exception as e:  # noqa: BLE001
            bad.append(f"tlongjmp({n}) after it: {e!r}")
    if bad:
        BAD.add()
        print(f"point {k} at {tracer.where}: {'; '.join(bad)}", flush=True)
    if not interrupted:
        for p in sorted(not_modelled):
            print(f"not modelled: {p}", flush=True)
        print(f"{API}: {k - 1} points, {BAD.value} bad", flush=True)
        break
