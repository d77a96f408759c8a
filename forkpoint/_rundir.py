"""Where a program's control socket lives, and how stale ones are told apart from live ones.

``<base>/forkpoint-<PID>/control.sock``: one private directory per program, mode 0700, owned by
the program's user, with the socket itself mode 0600. ``<base>`` is ``$XDG_RUNTIME_DIR`` when it is
set, absolute, a directory owned by the user and writable, else the temporary directory
(``$TMPDIR``, ``$TEMP``, ``$TMP``, ``/tmp``, ``/var/tmp``, ``/usr/tmp``, the first usable one).
A per-PID directory (rather than one per user) lets the client find the socket from the PID alone
and lets the shepherd remove everything it created with one ``rmdir``. A directory left by a
SIGKILLed shepherd is removed by the next forkpoint program of the same user that starts in the
same base directory (its PID is gone, or the process now holding that PID started after the
directory was last modified).

The server (``_control``) and the client (``operator``) both use this module.
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import struct
from collections.abc import Mapping

from . import _procfs

log = logging.getLogger("forkpoint")

DIR_PREFIX = "forkpoint-"
SOCKET_NAME = "control.sock"
_UCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


def peercred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel took them at connect()."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def _usable_dir(path: str, owner: int | None = None) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or (owner is not None and st.st_uid != owner):
        return False
    return os.access(path, os.W_OK | os.X_OK)


def temp_candidates(environ: Mapping[str, str]) -> list[str]:
    out = [environ.get(k, "") for k in ("TMPDIR", "TEMP", "TMP")] + ["/tmp", "/var/tmp", "/usr/tmp"]
    return [p for p in out if p and os.path.isabs(p)]


def base_dirs(environ: Mapping[str, str] | None = None) -> list[str]:
    """The usable base directories for this user, in order of preference (XDG_RUNTIME_DIR, temp)."""
    environ = os.environ if environ is None else environ
    out = []
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and _usable_dir(xdg, owner=os.geteuid()):
        out.append(xdg)
    for path in temp_candidates(environ):
        if _usable_dir(path):
            out.append(path)
            break
    return out


def remove_dir(path: str) -> None:
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def cleanup_stale(base: str) -> list[str]:
    """Remove this user's socket directories in ``base`` whose program is gone; returns them.

    A directory is stale when no process has its PID, or the process that has it now started
    after the directory was last modified (the PID was reused). The caller's own PID counts as
    stale too: the caller is about to create its directory.
    """
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    me, uid = os.getpid(), os.geteuid()
    for name in names:
        if not name.startswith(DIR_PREFIX) or not name[len(DIR_PREFIX):].isdigit():
            continue
        pid = int(name[len(DIR_PREFIX):])
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        if pid != me:
            started = _procfs.process_start(pid)
            if started is not None and started <= st.st_mtime + 2.0:   # btime has 1 s resolution
                continue
            if started is not None and _answers(os.path.join(path, SOCKET_NAME), pid):
                continue      # the clock stepped, but the program is there: never remove a live one
        try:
            remove_dir(path)
            removed.append(path)
            log.debug("removed stale operator directory %s", path)
        except OSError as e:
            log.debug("could not remove stale operator directory %s: %s", path, e)
    return removed


def _answers(path: str, pid: int) -> bool:
    """Whether a socket at ``path`` accepts a connection from process ``pid`` (not a clock reading)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
        return peercred(probe)[0] == pid
    except OSError:
        return False
    finally:
        probe.close()


def socket_candidates(pid: int) -> list[str]:
    """Where the control socket of program ``pid`` may be, most likely first.

    The listening sockets the kernel knows of (/proc/net/unix, readable by anyone) come first;
    then the paths the program's own environment (when readable) and ours would give.
    """
    suffix = f"/{DIR_PREFIX}{pid}/{SOCKET_NAME}"
    out = _procfs.listening_unix_sockets(suffix)
    owner = _procfs.owner_of(pid)
    bases: list[str] = []
    for env in (_procfs.environ_of(pid), os.environ):
        if env.get("XDG_RUNTIME_DIR"):
            bases.append(env["XDG_RUNTIME_DIR"])
        bases.extend(temp_candidates(env))
    if owner is not None:
        bases.append(f"/run/user/{owner}")
    out.extend(os.path.join(b, suffix.lstrip("/")) for b in bases if os.path.isabs(b))
    return list(dict.fromkeys(out))
