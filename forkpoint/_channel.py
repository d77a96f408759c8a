"""Messages between the shepherd and the processes of a program.

Each process has its own SOCK_SEQPACKET socketpair with the shepherd: message boundaries are kept,
delivery is reliable and ordered, and a channel end can travel to the shepherd with SCM_RIGHTS. A
frozen snapshot blocks in ``recv`` on its channel; that blocking read *is* the saved state waiting.
Messages are small JSON objects: the channels are private socketpairs, never reachable by path.
"""
from __future__ import annotations

import array
import json
import socket
from typing import Any

MAX_MESSAGE = 1 << 16


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one message and any descriptors with it; ``(None, [])`` means the peer is gone."""
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        return None, list(fds)
    return json.loads(data), list(fds)
