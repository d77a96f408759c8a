"""Operator control of a running program: list, restore and discard its checkpoints, and its status.

The client side of the control socket that the program's shepherd serves (``_control`` has the
protocol). ``request(pid, op, **fields)`` sends one request to the program whose PID (its
shepherd's, the one its parent and the shell know) is ``pid``; the ``forkpoint ls/restore/discard/
status PID`` commands are built on it.

The client finds the socket from the PID alone (``_rundir.socket_candidates``) and accepts a socket
only if SO_PEERCRED says its server is the PID asked for.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from . import _procfs, _rundir
from ._control import MAX_REQUEST, encode
from ._errors import OperatorError

log = logging.getLogger("forkpoint")

MAX_REPLY = 16 << 20           # what the client accepts

__all__ = ["MAX_REQUEST", "MAX_REPLY", "OperatorError", "connect", "request"]


def _not_a_program(pid: int, stale: bool) -> OperatorError:
    comm = _procfs.comm(pid)
    ppid = _procfs.parent_of(pid) or 0
    if comm.startswith(("fp-snap-", "fp-spare-")) or (ppid and _procfs.comm(ppid) == "fp-shepherd"):
        return OperatorError("notforkpoint", f"process {pid} ({comm}) is one of the processes of forkpoint "
                                             f"program {ppid}; use that PID")
    if comm == "fp-shepherd":
        return OperatorError("notforkpoint", f"process {pid} is a forkpoint program but its control "
                                             "socket was not found (see the program's stderr)")
    why = " (only a stale socket was found)" if stale else ""
    return OperatorError("notforkpoint", f"process {pid} ({comm}) is not a forkpoint program, or has not "
                                         f"taken a checkpoint yet: no control socket found{why}")


def connect(pid: int, timeout: float = 10.0) -> socket.socket:
    """A connection to the control socket of forkpoint program ``pid`` (its shepherd's PID).

    Every candidate socket is tried without waiting; one whose listen backlog is full (busy, or a
    decoy) is tried again in the next round, so that it can never keep the client from the others.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise OperatorError("invalid", f"invalid PID {pid!r}")
    if not os.path.exists(f"/proc/{pid}"):
        raise OperatorError("nosuchprocess", f"no process with PID {pid}")
    denied = None
    stale = busy = False
    deadline = time.monotonic() + timeout
    pending = _rundir.socket_candidates(pid)
    while pending:
        retry = []
        for path in pending:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except (BlockingIOError, InterruptedError):   # its listen backlog is full
                sock.close()
                retry.append(path)
                continue
            except PermissionError:
                sock.close()
                denied = denied or path
                continue
            except ConnectionRefusedError:
                sock.close()
                stale = True
                continue
            except OSError:
                sock.close()
                continue
            server_pid, server_uid, _ = _rundir.peercred(sock)
            if server_pid == pid:
                sock.settimeout(timeout)
                return sock
            sock.close()
            log.warning("%s is served by process %d (uid %d), not by %d: ignored", path, server_pid,
                        server_uid, pid)
        if not retry:
            break
        busy = True
        if time.monotonic() > deadline:
            raise OperatorError("busy", f"program {pid} is not accepting connections (its control "
                                        f"socket's backlog stayed full for {timeout:g}s)")
        time.sleep(0.01)
        pending = retry
    if denied:
        raise OperatorError("denied", f"permission denied: cannot reach {denied}: process {pid} belongs to "
                                      f"uid {_procfs.owner_of(pid)}; only that user or root may control it")
    raise _not_a_program(pid, stale and not busy)


def request(pid: int, op: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
    """Send one request to program ``pid`` and return its reply; raise OperatorError on failure."""
    with connect(pid, timeout) as sock:
        try:
            sock.sendall(encode({"op": op, **fields}))
        except (BrokenPipeError, ConnectionResetError):
            pass   # a refusal is sent without reading the request: read it below
        data = bytearray()
        while b"\n" not in data:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise OperatorError("timeout", f"program {pid} did not answer within {timeout:g}s") from None
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REPLY:
                raise OperatorError("too_large", f"program {pid} sent a reply larger than {MAX_REPLY} bytes")
    if not data:
        raise OperatorError("closed", f"program {pid} closed the connection without answering "
                                      "(it may have ended)")
    try:
        reply = json.loads(bytes(data).split(b"\n", 1)[0])
    except ValueError:
        raise OperatorError("malformed", f"program {pid} sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise OperatorError("malformed", f"program {pid} sent a malformed reply")
    if not reply.get("ok"):
        raise OperatorError(str(reply.get("kind", "error")), str(reply.get("error", "request refused")))
    return reply
