"""Everything forkpoint reads from ``/proc``, in one place.

Each reader tolerates a process that vanishes while it is read (it is a race the kernel allows at
any moment): a reader answers "gone" or an empty value instead of raising.
"""
from __future__ import annotations

import fcntl
import os
import re
import resource
import stat
import threading
import time
from typing import NamedTuple

_CAP_SYS_NICE = 23
_PF_EXITING = 0x4              # include/linux/sched.h: the task is in do_exit()


def read_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name), or None if the process is gone."""
    try:
        return _stat_fields(pid)
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()


def parent_of(pid: int) -> int | None:
    """The parent PID of ``pid`` now, or None if it is gone."""
    fields = read_stat(pid)
    return int(fields[1]) if fields else None


def exiting(pid: int) -> bool:
    """Whether ``pid`` is gone, a zombie, or already inside exit (its user-space work is over)."""
    fields = read_stat(pid)
    if fields is None or fields[0] in ("Z", "X", "x"):
        return True
    try:
        return bool(int(fields[6]) & _PF_EXITING)
    except (IndexError, ValueError):
        return False


def children_of(parents: set[int]) -> list[tuple[int, int]]:
    """(pid, process group) of every process whose parent is in ``parents``.

    Where the kernel lists each task's children (CONFIG_PROC_CHILDREN), this reads those lists: a
    few reads, where a scan of every /proc/*/stat takes about 20 us a process (3-4 ms on a machine
    with 200 processes, run after each restore, where a program that fails every 50 ms met it on
    its next restore). Without the lists, it scans.
    """
    if _CHILDREN_LISTS:
        listed = _listed_children(parents)
        if listed is not None:
            return listed
    out: list[tuple[int, int]] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        fields = read_stat(int(name))
        if fields is not None and len(fields) > 2 and int(fields[1]) in parents:
            out.append((int(name), int(fields[2])))
    return out


_CHILDREN_LISTS = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _listed_children(parents: set[int]) -> list[tuple[int, int]] | None:
    """``children_of`` from the kernel's per-task lists; None if a list cannot be read."""
    me = os.getpid()
    kids: list[int] = []
    # This process last: a child whose parent dies meanwhile is re-parented to it (the subreaper),
    # so it shows in one of the lists either way.
    for parent in sorted(parents, key=lambda p: p == me):
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:       # gone: its children went to the subreaper
            continue
        except OSError:
            return None
        try:
            kids.extend(_listed_in(f"/proc/{parent}/task", tids))
        except (OSError, ValueError):
            return None
    out = []
    for pid in dict.fromkeys(kids):
        fields = read_stat(pid)
        if fields is not None and len(fields) > 2 and int(fields[1]) in parents:
            out.append((pid, int(fields[2])))
    return out


def own_children(threads: bool = True) -> list[int]:
    """This process's children, from the kernel's per-task lists (empty where those cannot be
    read): every thread's, or with ``threads=False`` (the caller knows it is alone) the calling
    thread's, three system calls (9 us warm, about 110 after a 10 ms spin here)."""
    try:
        if not threads:
            return [int(x) for x in _read_all("/proc/thread-self/children").split()]
        return _listed_in("/proc/self/task", os.listdir("/proc/self/task"))
    except (OSError, ValueError):
        return []


def _listed_in(tasks: str, tids: list[str]) -> list[int]:
    """The children in the kernel's lists of the threads ``tids`` under ``tasks`` (one's
    /proc/PID/task), skipping threads that ended."""
    kids: list[int] = []
    for tid in tids:
        try:
            kids.extend(int(x) for x in _read_all(f"{tasks}/{tid}/children").split())
        except FileNotFoundError:
            continue
    return kids


def _read_all(path: str) -> bytes:
    # (An interrupt between the open and the try leaves the descriptor open: tsetjmp() calls
    # own_children with every signal blocked.)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        while len(chunks[-1]) > 60000:  # (a list that short comes whole: no read for its end)
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks)
    finally:
        os.close(fd)


def alive_since(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, field 22 of its stat): with it, a pid that was
    reused since is told apart from the process it named. None only when the process is known to
    be gone, a zombie or exiting; 0 when it is there but its stat could not be read (no descriptor
    left, no memory): "gone" must never be a guess."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return 0
    if fields[0] in ("Z", "X", "x"):
        return None
    try:
        return None if int(fields[6]) & _PF_EXITING else int(fields[19])
    except (IndexError, ValueError):
        return 0


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), or None if it is gone or a zombie."""
    fields = read_stat(pid)
    if fields is None or fields[0] in ("Z", "X", "x"):
        return None
    try:
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return 0.0   # alive, start unknown: treat as older than anything


def comm(pid: int) -> str:
    """The command name of ``pid`` (what ``ps -o comm`` shows), or '?' if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def owner_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def environ_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` started with, if this user may read it; else empty."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return {}
    out = {}
    for item in data.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def pending_mask(pid: int) -> int:
    """Signals pending (blocked, not yet delivered) in process ``pid``, from /proc/PID/status, as
    a mask (bit ``s - 1`` for signal ``s``); 0 if it cannot be read."""
    mask = 0
    try:     # one read of raw bytes: a restore waits for this (a text file read line by line: 5x)
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        for key in (b"\nSigPnd:", b"\nShdPnd:"):
            at = data.find(key)
            if at >= 0:
                mask |= int(data[at + 8:data.index(b"\n", at + 8)], 16)
    except (OSError, ValueError):
        return 0
    return mask


def pending_signals(pid: int) -> list[int]:
    """Signals pending (blocked, not yet delivered) in process ``pid``, from /proc/PID/status."""
    mask = pending_mask(pid)
    out = []
    while mask:                         # one step per pending signal (a killed process has SIGKILL)
        low = mask & -mask
        out.append(low.bit_length())
        mask ^= low
    return out


def signal_state(pid: int) -> tuple[int, int, int] | None:
    """(process group, pending signals, blocked signals) of ``pid`` as bit masks (bit ``s - 1``
    for signal ``s``); None if it is gone."""
    fields = read_stat(pid)
    pending = blocked = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")):
                    pending |= int(line.split()[1], 16)
                elif line.startswith("SigBlk:"):
                    blocked = int(line.split()[1], 16)
    except (OSError, ValueError):
        return None
    return (int(fields[2]), pending, blocked) if fields else None


def status_masks(pid: int | str, *keys: str) -> dict[str, int] | None:
    """The hexadecimal masks ``keys`` of ``/proc/PID/status`` ("SigBlk", "CapEff", ...); None if
    it cannot be read or lacks one of them."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    found[key] = int(value, 16)
    except (OSError, ValueError):
        return None
    return found if len(found) == len(keys) else None


def signal_dispositions(pid: int) -> tuple[int, int] | None:
    """(SigIgn, SigCgt) of process ``pid``: the signals it ignores and catches; None if gone."""
    masks = status_masks(pid, "SigIgn", "SigCgt")
    return (masks["SigIgn"], masks["SigCgt"]) if masks is not None else None


# rt_sigtimedwait(2), which sigwait(), sigwaitinfo() and sigtimedwait() make
_SIGTIMEDWAIT = {"x86_64": 128, "aarch64": 137}.get(os.uname().machine, -1)


def waits_for_signals(pid: int) -> bool:
    """Whether process ``pid``'s main thread is inside ``sigwait()`` and friends now: the kernel
    unblocks the awaited signals for that wait, so SigBlk no longer shows them."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            first = f.read().split(None, 1)[0]
    except (OSError, IndexError):
        return False
    return first.isdigit() and int(first) == _SIGTIMEDWAIT


def terminal_foreground() -> int:
    """The foreground process group of this process's controlling terminal (0: none)."""
    fields = read_stat(os.getpid())
    try:
        return int(fields[5]) if fields and int(fields[4]) else 0
    except (ValueError, IndexError):
        return 0


def minor_faults(pid: int) -> int | None:
    """Minor page faults of ``pid`` so far (copy-on-write copies among them); None if gone."""
    fields = read_stat(pid)
    try:
        return int(fields[7]) if fields else None
    except (ValueError, IndexError):
        return None


def state(pid: int) -> str:
    """The state letter of ``pid`` (R, S, D, T, t, Z, ...), or '' if it is gone."""
    fields = read_stat(pid)
    return fields[0] if fields else ""


def smaps(pid: int) -> tuple[int, int]:
    """(USS, PSS) of a process in bytes, from /proc/PID/smaps_rollup; (0, 0) if it is gone."""
    uss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Private_Clean", "Private_Dirty"):
                    uss += int(rest.split()[0]) * 1024
                elif key == "Pss":
                    pss = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return uss, pss


def can_leave_sched_idle() -> bool:
    """SCHED_IDLE -> SCHED_OTHER needs CAP_SYS_NICE or an RLIMIT_NICE of at least 20 - nice."""
    if has_capability(_CAP_SYS_NICE):
        return True
    try:
        return resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, ValueError):
        return False


def has_capability(bit: int) -> bool:
    """Whether this process has capability ``bit`` (``CAP_*`` of linux/capability.h) in effect."""
    masks = status_masks("self", "CapEff")
    return masks is not None and bool(masks["CapEff"] >> bit & 1)


def file_offsets() -> dict[int, int]:
    """Offsets of the regular files this process has open only for reading now.

    fork() shares open file descriptions, so the live process moves the snapshot's offsets too;
    a restore puts them back, so that input can be read again. A file open for writing (write-only,
    read-write, or append) keeps the offset the rolled-back process left: a rewind would make the
    restored process's next write overwrite bytes already written (a log, a temporary file).
    """
    return open_files().offsets


class OpenFiles(NamedTuple):
    """What ``tsetjmp()`` needs to know of this process's descriptors, from one listing."""

    offsets: dict[int, int]      # ``file_offsets()``
    how_many: int                # descriptors open, the listing's own not counted
    regular: list[int]           # one descriptor of each regular file open
    sockets: dict[int, int]      # socket descriptor -> inode
    stdio: set[int]              # inodes of descriptors 0-2 that are sockets
    devices: dict[int, int]      # descriptor -> device number, of those of 0-2 that are character devices


def open_files(own_file: tuple[int, int] = (0, 0)) -> OpenFiles:
    """``file_offsets()``, how many descriptors this process has open (``tsetjmp()`` knows from
    that count, without a system call more, that the keeper will have room for its channel), one
    descriptor of each regular file open (``_locks`` asks them for the POSIX locks this process
    holds), its sockets (``_connections``) and the terminals among 0-2 (``_terminal``).

    ``own_file`` is the (device, inode) of forkpoint's arena memfd, open twice (the descriptor and
    the mapping's duplicate): no file of the program's, so neither its mode nor its locks are
    asked (three system calls of about 30 in a checkpoint).
    """
    out = {}
    regular = []
    inodes = set()
    sockets: dict[int, int] = {}
    stdio: set[int] = set()
    devices: dict[int, int] = {}
    names = os.listdir("/proc/self/fd")
    for name in names:
        fd = int(name)
        try:   # tsetjmp() waits for this: pipes and sockets cost one fstat each
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                if stat.S_ISSOCK(st.st_mode):
                    sockets[fd] = st.st_ino
                    if fd <= 2:
                        stdio.add(st.st_ino)
                elif fd <= 2 and stat.S_ISCHR(st.st_mode):
                    devices[fd] = st.st_rdev
                continue
            if (st.st_dev, st.st_ino) == own_file:
                continue
            if (st.st_dev, st.st_ino) not in inodes:
                inodes.add((st.st_dev, st.st_ino))
                regular.append(fd)
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                out[fd] = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:     # closed meanwhile (the directory's own descriptor)
            continue
    return OpenFiles(out, len(names) - 1, regular, sockets, stdio, devices)


def open_fd_count() -> int:
    """Descriptors this process has open (the one that reads the count included)."""
    return len(os.listdir("/proc/self/fd"))


# A line of /proc/PID/maps: address, perms, offset, device, inode, then the path (spaces allowed).
_LIBRARY_LINE = re.compile(rb"^\S+ \S+ \S+ \S+ \S+ +(/[^\n]*\.so[^/\n]*)$", re.MULTILINE)


def mapped_libraries() -> list[str]:
    """Every shared library mapped into this process, once each (``/proc/self/maps``; about 0.3
    ms with numpy loaded: a line-by-line parse in Python took 1.6)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            data = f.read()
    except OSError:
        return []
    # " (deleted)": a library replaced on disk since it was loaded (an upgrade under a running
    # daemon); its loaded name is still the path, which dlopen(RTLD_NOLOAD) finds.
    return list(dict.fromkeys(os.fsdecode(path.removesuffix(b" (deleted)"))
                              for path in _LIBRARY_LINE.findall(data)))


def other_threads(settle: bool = True) -> int:
    """Threads of this process besides the caller, native ones included.

    A thread that ``join()`` has just returned for may still be leaving the kernel's list for a
    moment, so when Python knows of no other thread the count is given a few milliseconds to settle
    (``settle=False``: the count as it is).
    """
    n = os.stat("/proc/self/task").st_nlink - 3          # ".", ".." and one entry per thread
    if n == 0 or not settle:
        return n
    deadline = time.monotonic() + 0.1
    while n and threading.active_count() == 1 and time.monotonic() <= deadline:
        time.sleep(0.001)
        n = os.stat("/proc/self/task").st_nlink - 3
    return n


def listening_unix_sockets(suffix: str) -> list[tuple[str, int]]:
    """(path, inode) of bound Unix sockets whose path ends in ``suffix`` (/proc/net/unix is readable
    by anyone)."""
    out: list[tuple[str, int]] = []
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.rstrip("\n").split(None, 7)
                if len(parts) == 8 and parts[7].endswith(suffix):
                    try:
                        out.append((parts[7], int(parts[6])))
                    except ValueError:
                        continue
    except OSError:
        pass
    return out


def socket_inodes(pid: int) -> set[int] | None:
    """Inodes of the sockets process ``pid`` holds; None if its descriptors are closed to us."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    out = set()
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            try:
                out.add(int(link[8:-1]))
            except ValueError:
                continue
    return out
