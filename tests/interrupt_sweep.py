"""An interrupt at every point of one forkpoint call, in turn: run by tests/test_interrupt_sweep.py.

``python interrupt_sweep.py CALL`` makes CALL (one of ``CALLS``) again and again; the k-th time, a
KeyboardInterrupt is raised at the k-th point where CPython could run a pending Python signal
handler inside it, as a Ctrl-C typed at that moment would. After each call it checks what such an
interrupt must never leave behind, and that a checkpoint still restores; it stops at the first
call that runs to its end with no point left, and prints one line per violation, then a summary.

Where handlers run (CPython 3.11-3.13): at a function's start (RESUME), after a loop's back edge,
and as a call into C code returns, inside that CALL (3.13: or CALL_KW) instruction; not as a Python function
returns (such calls run inline, with no check). The tracer raises before the next instruction,
which a different exception-table entry may cover than the CALL: such points are listed as not
modelled, to be read by hand. A handler runs only if its signal could have arrived: SIGINT was not
blocked at that point, or at some instruction since the point before (a signal that came just
before forkpoint blocked every signal runs its handler as the block returns).
"""
from __future__ import annotations

import ctypes
import dis
import io
import logging
import os
import signal
import sys

import forkpoint as fp
from forkpoint import _runtime

libc = ctypes.CDLL(None, use_errno=True)
_mask_buf = ctypes.create_string_buffer(128)


def sigint_blocked() -> bool:
    libc.pthread_sigmask(0, None, _mask_buf)       # SIG_BLOCK with no set: read the mask
    return bool(_mask_buf.raw[0] & 1 << (signal.SIGINT - 1))


def blocked_mask() -> int:
    with open("/proc/thread-self/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))


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
    "processing": call_processing,
    "quarantine": lambda: (fp.quarantine("qk"), fp.release("qk")),
    "cache": call_cache,
    "recover_on": lambda: fp.recover_on(signal.SIGSEGV, max_recoveries=100_000),
}
call = CALLS[API]
if API == "cache":
    call_cache()        # the entry exists: the sweep is of a store (a first one scans the directory)
    whole[0] = stored[0]

# -- the tracer --------------------------------------------------------------------------------------
CALL_OPS = {dis.opmap[name] for name in ("CALL", "CALL_KW", "CALL_FUNCTION_EX") if name in dis.opmap}
JUMP_BACK = dis.opmap["JUMP_BACKWARD"]
RESUME = dis.opmap["RESUME"]
HERE = os.path.abspath(__file__)
state = {"k": 0, "seen": 0, "since": False, "where": ""}
last_op: dict[int, int] = {}
last_off: dict[int, int] = {}
inline: set[int] = set()
not_modelled: set[str] = set()
tables: dict[object, list] = {}
real_pid = libc.getpid()


def handler_of(code: object, offset: int) -> int | None:
    table = tables.get(code)
    if table is None:
        table = tables[code] = dis._parse_exception_table(code)  # type: ignore[attr-defined]
    return next((e.target for e in table if e.start <= offset < e.end), None)


def place(frame: object) -> str:
    code = frame.f_code  # type: ignore[attr-defined]
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"  # type: ignore[attr-defined]


def local(frame, event, arg):  # noqa: ANN001, ANN201
    key = id(frame)
    if event == "return":
        last_op.pop(key, None)
        last_off.pop(key, None)
        inline.discard(key)
        return local
    if event not in ("call", "opcode") or libc.getpid() != real_pid:   # the live process only
        return local
    code = frame.f_code
    op = RESUME if event == "call" else code.co_code[frame.f_lasti]
    prev = last_op.get(key)
    last_op[key] = op
    if event == "call":
        if frame.f_back is not None:
            inline.add(id(frame.f_back))        # the caller's CALL ran this frame inline
    elif key in inline:
        inline.discard(key)
        prev = None
    unblocked = not sigint_blocked()
    after_call = prev in CALL_OPS
    if event == "opcode":
        if after_call and handler_of(code, last_off.get(key, -1)) != handler_of(code, frame.f_lasti):
            if state["since"] or unblocked:
                not_modelled.add(place(frame))
            state["since"] = unblocked
            last_off[key] = frame.f_lasti
            return local
        last_off[key] = frame.f_lasti
    if op == RESUME or after_call or prev == JUMP_BACK:
        eligible = unblocked or state["since"]
        state["since"] = unblocked
        if eligible:
            state["seen"] += 1
            if state["seen"] == state["k"]:
                state["where"] = f"{place(frame)} @{frame.f_lasti} {dis.opname[op]}"
                raise KeyboardInterrupt
    elif unblocked:
        state["since"] = True
    return local


def enter(frame, event, arg):  # noqa: ANN001, ANN201
    if frame.f_code.co_filename == HERE:
        return None
    frame.f_trace_opcodes = True
    frame.f_trace_lines = False
    frame.f_trace = local             # (3.13 reports opcodes only to a frame's own f_trace)
    return local(frame, event, arg)


# -- what an interrupt must never leave behind ------------------------------------------------------------
mask0 = blocked_mask()
alarm0 = signal.getsignal(signal.SIGALRM)


def violations(current_before: int) -> list[str]:
    out = []
    if blocked_mask() != mask0:
        out.append(f"signals left blocked: {blocked_mask():#x}")
    if signal.getsignal(signal.SIGALRM) is not alarm0:
        out.append(f"SIGALRM handler left: {signal.getsignal(signal.SIGALRM)}")
    if signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0):
        out.append(f"timer left: {signal.getitimer(signal.ITIMER_REAL)}")
    if rt.arena.watchdog() is not None:
        out.append(f"hard deadline left in the arena: {rt.arena.watchdog()}")
    if rt.arena.processing():
        out.append(f"key left marked as processing: {rt.arena.processing()!r}")
    if API.startswith("checkpointed") or API.startswith("wsgi"):
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
    if logged:
        out.append(f"logged: {logged[:2]}")
        del logged[:]
    if out:         # put things back, so that the next point is judged on its own
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm0)
        rt.arena.set_watchdog(None)
        rt.arena.set_processing(None)
        signal.pthread_sigmask(signal.SIG_SETMASK, {s for s in range(1, 65) if mask0 >> (s - 1) & 1})
    return out


while True:
    K.add()
    k = K.value
    real_pid = libc.getpid()           # a restore below makes another process the live one
    state.update(k=k, seen=0, since=not sigint_blocked(), where="")
    last_op.clear()
    last_off.clear()
    inline.clear()
    current_before = fp.current_state()
    interrupted = False
    sys.settrace(enter)
    try:
        call()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sys.settrace(None)
    bad = violations(current_before)
    n = fp.tsetjmp()                    # and the machinery still restores
    if not (fp.chkpt_status(fp.CHKPT_RECOVERED) and fp.chkpt_status(fp.CKPT_TO_STATE) == n):
        try:
            fp.tlongjmp(n)
        except Exception as e:  # noqa: BLE001
            bad.append(f"tlongjmp({n}) after it: {e!r}")
    if bad:
        BAD.add()
        print(f"point {k} at {state['where']}: {'; '.join(bad)}", flush=True)
    if not interrupted:
        for p in sorted(not_modelled):
            print(f"not modelled: {p}", flush=True)
        print(f"{API}: {k - 1} points, {BAD.value} bad", flush=True)
        break
