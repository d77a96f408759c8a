"""Where a protected WSGI worker leaves the socket of the request it runs, for the shepherd.

A crash or a timeout in restart mode restores the worker to a checkpoint taken before the request's
connection was accepted: the restored process does not have the client's socket, and the failed
process that had it is about to die. So each request writes, into a region of the arena, which
descriptor holds its client and in which state the request is (three words, no system call);
when the shepherd is about to kill a failed live process, or learns that it is crashing, it takes
those descriptors out of it with ``pidfd_getfd(2)`` and answers the clients itself: a 500 if the
response had not begun, a closed connection otherwise.

A crashing process is still alive when the shepherd looks: faulthandler writes its report to a
socket whose send buffer is the smallest the kernel allows (``fault_channel``), so the report
blocks after a few hundred bytes until the shepherd reads it, and the shepherd takes the sockets
before it reads. Parking the socket with SCM_RIGHTS in a socket pair of the worker's own, as this
replaced, cost a ``sendmsg`` and a ``recv`` per request: 4.9 us in one process, 11-18 us of a real
gunicorn worker's CPU per request.

The request a checkpoint was taken in (the first one a worker serves) is the restored process's
own: it has that socket and answers it itself, so the shepherd leaves it alone (``W_OWN``).
"""
from __future__ import annotations

import logging
import os
import socket
import stat

from ._clone import take_fd
from .arena import Arena, find_region

log = logging.getLogger("forkpoint")

REGION = "forkpoint:wsgi-parked"
MAGIC = 0x4B52_4150_5046            # "FPPARK"
SLOTS = 1                           # gunicorn's sync worker: one request at a time
W_MAGIC, W_OWN = 0, 1               # then per slot: state, request number, descriptor, pid
HEADER_WORDS, SLOT_WORDS = 2, 4
SIZE = 8 * (HEADER_WORDS + SLOT_WORDS * SLOTS)

FREE, INFLIGHT, STARTED, ANSWERED, CLOSED = 0, 1, 2, 3, 4

FAILED = ("500 Internal Server Error", 500, b"forkpoint: the request failed and was rolled back\n")


def raw_response(status: tuple[str, int, bytes]) -> bytes:
    """A complete HTTP/1.1 response for a socket the server no longer knows (Connection: close)."""
    line, _, body = status
    return (f"HTTP/1.1 {line}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def slot_words(slot: int) -> int:
    """Index of ``slot``'s first word (its state; then its request number, its descriptor, and
    the pid of the process whose descriptor it is)."""
    return HEADER_WORDS + SLOT_WORDS * slot


def fault_channel() -> tuple[int, int]:
    """(read end, write end) for faulthandler's reports: a stream socket pair, not a pipe, so that
    a program that parks requests can shrink its send buffer (``hold_reports``)."""
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        r.shutdown(socket.SHUT_WR)
    except OSError:
        r.close()
        w.close()
        raise
    return r.detach(), w.detach()


HELD = 16384        # a send buffer below this: the program parks requests (``held``)


def hold_reports(fd: int) -> None:
    """Give the fault socket (write end ``fd``) the smallest send buffer the kernel allows (4.6 kB,
    each small write charged with its bookkeeping): a crashing process's report, written in dozens
    of small writes, then blocks after a few of them until the shepherd reads, and until then the
    process is alive and its descriptors can be taken. Only a program that parks requests asks
    for this: holding a crash in its report costs its restore about a millisecond (the shepherd
    widens the buffer once it has what it needs, and the crashing process then finishes on the
    shepherd's CPU)."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    finally:
        s.close()


def held(writer: socket.socket) -> bool:
    """Whether the program asked for its crashes to be held (``hold_reports``)."""
    try:
        return writer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < HELD
    except OSError:
        return False


def answer(fd: int, failed: bool) -> bool:
    """For the shepherd: end a client connection taken from a failed process, and close ``fd``.

    A 500 first if ``failed`` (the response had not begun), sent without waiting (an empty socket
    buffer takes it at once; a client that stopped reading gets only the FIN), then FIN with
    ``shutdown``: the dying process may hold the socket a moment longer. Anything but a socket is
    only closed. Returns whether the 500 went out whole.
    """
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        sent = False
        if failed:
            data = raw_response(FAILED)
            try:
                sent = s.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL) == len(data)
            except OSError:
                pass
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return sent
    finally:
        s.close()


class Taken:
    """The shepherd's side: the client sockets taken out of one failing live process.

    ``take(pid)`` while the process still lives (inside faulthandler's report, or just before the
    shepherd kills it), ``answer(pid)`` once its failure is certain (before the restored process
    is woken: it reads the states written here), ``drop()`` if the process turned out not to fail
    (a signal it handles): a taken socket the shepherd kept would keep its client waiting.
    """

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.region: memoryview | None = None       # found once: a region never moves
        self.pid = 0
        self.words: memoryview | None = None
        self.fds: list[tuple[int, int, int]] = []     # (state word, our descriptor, state)

    def take(self, pid: int) -> None:
        """Take the client sockets of the requests live process ``pid`` is serving. Never raises:
        a damaged arena or a process already gone only leaves those clients a closed connection
        (the restore must happen whatever this finds)."""
        if self.pid == pid:
            return
        self.drop()
        try:
            if self.region is None:
                found = find_region(self.arena, REGION, SIZE)
                if found is None:
                    return
                self.region = found.cast("Q")
            words = self.region
            if words[W_MAGIC] != MAGIC:
                return
            own = int(words[W_OWN])
            self.pid, self.words = pid, words
            for slot in range(SLOTS):
                w = slot_words(slot)
                state, seq, fd, owner = (int(x) for x in words[w:w + SLOT_WORDS])
                # Only a request of this very process: a descriptor number means nothing elsewhere.
                if state not in (INFLIGHT, STARTED) or seq == own or owner != pid:
                    continue
                try:
                    self.fds.append((w, take_fd(pid, fd), state))
                except OSError as e:
                    log.info("could not take the client socket of request %d from process %d: %s",
                             seq, pid, e)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("could not read the requests of process %d", pid)

    def answer(self, pid: int, alive: bool = True) -> tuple[int, int]:
        """Answer the clients of ``pid``'s requests: (answered 500, closed)."""
        if alive:
            self.take(pid)
        if self.pid != pid or self.words is None:
            return 0, 0
        answered = closed = 0
        for w, fd, state in self.fds:
            if _answer_quietly(fd, state == INFLIGHT):
                self.words[w] = ANSWERED
                answered += 1
            else:
                self.words[w] = CLOSED
                closed += 1
        self.fds, self.pid, self.words = [], 0, None
        return answered, closed

    def drop(self) -> None:
        for _, fd, _ in self.fds:
            os.close(fd)
        self.fds, self.pid, self.words = [], 0, None


def _answer_quietly(fd: int, failed: bool) -> bool:
    try:
        return answer(fd, failed)
    except Exception:  # noqa: BLE001 - one client's answer never stops the shepherd's restore
        log.exception("could not answer a failed request's client")
        return False
