"""Where a program's control socket lives, and how stale ones are told apart from live ones.

``<userdir>/forkpoint-<PID>/control.sock``: one directory per program, mode 0700, with the socket
itself mode 0600, inside a directory that belongs to the program's user alone:

* ``$XDG_RUNTIME_DIR`` when it is set, absolute, a directory owned by the user and closed to
  everyone else (mode 0700, as the XDG specification makes it);
* else a private directory of the user's in the temporary directory (``$TMPDIR``, ``$TEMP``,
  ``$TMP``, ``/tmp``, ``/var/tmp``, ``/usr/tmp``, the first usable one): ``forkpoint-u<UID>``,
  created 0700 and checked after the fact (a directory, not a link, owned by the user, closed to
  others). Anyone can create that name first in a world-writable directory; a directory that does
  not pass the check is never used, and a fresh one with a random name (``forkpoint-u<UID>-*``,
  from ``mkdtemp``) is made instead.

So no other user can create, replace or remove anything on the path to the socket: another user
creating ``/tmp/forkpoint-<PID>`` for a PID they expect (the name this module used to use) no
longer matters. A per-PID directory (rather than one socket per user) lets the shepherd remove
everything it created with one ``rmdir``. A directory left by a SIGKILLed shepherd is removed by
the next forkpoint program of the same user that starts in the same user directory (its PID is
gone, or the process now holding that PID started after the directory was last modified, and no
one listens on its socket: a PID says nothing across PID namespaces, which share ``/tmp``).

Clients find the socket from the PID alone: the kernel's list of bound sockets
(``/proc/net/unix``, readable by anyone) gives its path and inode, and the target's own
descriptors (``/proc/PID/fd``, readable by its user and root: whoever may control it) say which
of those sockets it holds, so a decoy bound by anyone else under a matching name is never even
connected to. SO_PEERCRED confirms the server's PID once connected.

The server (``_control``) and the client (``operator``) both use this module.
"""
from __future__ import annotations

import errno
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
NOTIFY_NAME = "notify.sock"     # the systemd notification relay's datagram socket (_notify)
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


def is_private(path: str, uid: int | None = None) -> bool:
    """Whether ``path`` is a directory (not a link) of ``uid`` (default: ours) closed to others."""
    uid = os.geteuid() if uid is None else uid
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077


def temp_candidates(environ: Mapping[str, str]) -> list[str]:
    out = [environ.get(k, "") for k in ("TMPDIR", "TEMP", "TMP")] + ["/tmp", "/var/tmp", "/usr/tmp"]
    return [p for p in out if p and os.path.isabs(p)]


def user_dir_name(uid: int) -> str:
    return f"{DIR_PREFIX}u{uid}"


def xdg_dir(environ: Mapping[str, str]) -> str | None:
    """``$XDG_RUNTIME_DIR`` if it is set, absolute, ours, writable and closed to others."""
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and _usable_dir(xdg, owner=os.geteuid()):
        try:
            if not os.stat(xdg).st_mode & 0o077:
                return xdg
        except OSError:
            return None
        log.warning("XDG_RUNTIME_DIR %s is open to other users: not used for forkpoint's files", xdg)
    return None


def _private_in(tmp: str) -> str | None:
    """This user's private directory in the world-writable ``tmp``, made and checked; a fresh
    randomly named one if the usual name was taken by someone else (or cannot be used)."""
    uid = os.geteuid()
    path = os.path.join(tmp, user_dir_name(uid))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and st.st_mode & 0o077:
            os.chmod(path, 0o700)           # ours, but opened up (umask, an older version): close it
    except OSError:
        pass
    if is_private(path, uid):
        return path
    try:
        owner = os.lstat(path).st_uid
    except OSError:
        owner = -1
    try:
        fresh = _mkdtemp(user_dir_name(uid) + "-", tmp)
    except OSError:
        return None
    log.warning("%s is not a private directory of uid %d (owner uid %d): the operator socket goes "
                "in %s instead", path, uid, owner, fresh)
    return fresh if is_private(fresh, uid) else None


def _mkdtemp(prefix: str, parent: str) -> str:
    """``tempfile.mkdtemp(prefix=prefix, dir=parent)``: a new 0700 directory with a random name, never
    one that exists. Not ``tempfile`` itself: it imports ``shutil``, ``random`` and the compression
    modules, 4 ms of the shepherd's start for a fallback it rarely takes."""
    for _ in range(100):
        path = os.path.join(parent, prefix + os.urandom(4).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return os.path.abspath(path)
    raise FileExistsError(errno.EEXIST, "no usable name for a temporary directory", parent)


def base_dirs(environ: Mapping[str, str] | None = None) -> list[str]:
    """This user's private directories for operator sockets, in order of preference
    (XDG_RUNTIME_DIR, then one in the temporary directory), created if needed."""
    environ = os.environ if environ is None else environ
    out = []
    xdg = xdg_dir(environ)
    if xdg is not None:
        out.append(xdg)
    for path in temp_candidates(environ):
        if _usable_dir(path):
            private = _private_in(path)
            if private is not None:
                out.append(private)
                break
    return out


def make_dir(path: str) -> None:
    """Create the program's directory ``path`` (in one of ``base_dirs()``), mode 0700 whatever the
    umask, and check it (the control socket and the notify relay are made in it)."""
    os.mkdir(path, 0o700)
    try:
        os.chmod(path, 0o700)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
            raise OSError(errno.EPERM, f"{path} is not a private directory")
    except BaseException:
        try:
            os.rmdir(path)
        except OSError:
            pass
        raise


def bind_private(sock: socket.socket, path: str) -> None:
    """Bind the AF_UNIX ``sock`` at ``path`` with mode 0600, whatever the umask."""
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)


def remove_dir(path: str) -> None:
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def cleanup_stale(base: str, keep: str = "") -> list[str]:
    """Remove this user's socket directories in ``base`` whose program is gone; returns them.

    A directory is stale when no process has its PID, or the process that has it now started
    after the directory was last modified (the PID was reused), and no one listens on its socket.
    The caller's own PID counts as stale too: the caller is about to create its directory, unless
    it is ``keep`` (the original process made it for the notification relay, ``_notify``, before
    it became the shepherd).

    A socket that is listened on is never removed, whatever its PID says: the PID is this PID
    namespace's reading of a name another namespace may have given (a program run with
    ``unshare --pid`` shares ``/tmp`` but sees none of the PIDs outside, and removed every live
    program's directory there: their clients then found the socket's path in /proc/net/unix but
    no file at it), and the clock may have stepped since the directory was made.
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
        if path == keep:
            continue
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
            if _listened(os.path.join(path, SOCKET_NAME)) or \
                    _listened(os.path.join(path, NOTIFY_NAME), socket.SOCK_DGRAM):
                continue      # a program is there (another namespace's PID, a clock step): keep it
                #               (its notify relay is bound before its shepherd listens)
        try:
            remove_dir(path)
            removed.append(path)
            log.debug("removed stale operator directory %s", path)
        except OSError as e:
            log.debug("could not remove stale operator directory %s: %s", path, e)
    return removed


def _listened(path: str, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether a process listens on the socket at ``path`` (it accepts connections, or its backlog
    is full; a datagram socket: is bound there), asked without waiting. Not whose it is:
    SO_PEERCRED gives 0 for a process outside this PID namespace, and no process of another user
    can bind in this user's directory."""
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.setblocking(False)
    try:
        probe.connect(path)
        return True
    except (BlockingIOError, InterruptedError):     # a full backlog: listened on, busy
        return True
    except OSError:                                 # refused (nobody listens), gone, not a socket
        return False
    finally:
        probe.close()


def socket_candidates(pid: int) -> list[str]:
    """Where the control socket of program ``pid`` may be, most likely first.

    The bound sockets the kernel knows of (/proc/net/unix) whose path fits; when this process may
    read ``pid``'s descriptors (its user, or root: whoever may control it), only those ``pid``
    holds, so decoys are skipped without a connection. Then the paths the program's environment
    (when readable) and ours would give, for a kernel that does not list bound paths.
    """
    suffix = f"/{DIR_PREFIX}{pid}/{SOCKET_NAME}"
    bound = _procfs.listening_unix_sockets(suffix)
    held = _procfs.socket_inodes(pid)
    owner = _procfs.owner_of(pid)
    if held is not None:
        out = [path for path, inode in bound if inode in held]
    else:
        out = [path for path, _inode in bound if _owned_by(path, owner)]
    bases: list[str] = []
    for env in (_procfs.environ_of(pid), os.environ):
        if env.get("XDG_RUNTIME_DIR"):
            bases.append(env["XDG_RUNTIME_DIR"])
        if owner is not None:
            bases.extend(os.path.join(t, user_dir_name(owner)) for t in temp_candidates(env))
    if owner is not None:
        bases.append(f"/run/user/{owner}")
    out.extend(p for p in (os.path.join(b, suffix.lstrip("/")) for b in bases if os.path.isabs(b))
               if _owned_by(p, owner))
    return list(dict.fromkeys(out))


def _owned_by(path: str, owner: int | None) -> bool:
    """Whether ``path`` is a socket that ``owner`` bound (a decoy of anyone else is not)."""
    try:
        st = os.lstat(path)
    except PermissionError:
        return True           # its directory is closed to us: let the connection say why
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and (owner is None or st.st_uid == owner)
