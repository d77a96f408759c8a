"""The few prctl(2) operations forkpoint needs.

python-prctl is used when it is importable (``pip install forkpoint[prctl]``, which needs libcap
headers to build); otherwise prctl(2) is called through ctypes, so a plain install works anywhere.
"""
from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

try:  # pragma: no cover - depends on the install
    import prctl as _pyprctl  # type: ignore[import-not-found]

    BACKEND = "python-prctl"
except ImportError:
    _pyprctl = None
    BACKEND = "ctypes"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_set_name = ctypes.PyDLL(None).prctl        # PR_SET_NAME cannot block: keep the GIL (restore path)
_set_name.argtypes = _libc.prctl.argtypes


def _call(option: int, arg: int | bytes = 0) -> None:
    if isinstance(arg, bytes):
        buf = ctypes.create_string_buffer(arg[:15])
        rc = _libc.prctl(option, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)
    else:
        rc = _libc.prctl(option, arg, 0, 0, 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_name(name: str) -> None:
    """Set this process's comm (what ``ps -o comm`` and ``top`` show); at most 15 bytes."""
    if _pyprctl is not None:
        _pyprctl.set_name(name[:15])
    else:
        _call(PR_SET_NAME, name.encode()[:15])


def prepare_name(name: str) -> Callable[[], None]:
    """``set_name(name)`` made ready in advance: calling the result sets the name in one C call.

    A woken spare sets its name on the restore path; building the buffer there would cost
    allocations and copy-on-write faults that the frozen spare can take beforehand.
    """
    if _pyprctl is not None:
        return functools.partial(_pyprctl.set_name, name[:15])
    buf = ctypes.create_string_buffer(name.encode()[:15])

    def setter(_buf: Any = buf, _addr: int = ctypes.addressof(buf)) -> None:   # _buf keeps it alive
        _set_name(PR_SET_NAME, _addr, 0, 0, 0)

    return setter


def get_name() -> str:
    with open("/proc/self/comm") as f:
        return f.read().rstrip("\n")


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies."""
    if _pyprctl is not None:
        _pyprctl.set_pdeathsig(sig)
    else:
        _call(PR_SET_PDEATHSIG, sig)


def set_child_subreaper(on: bool = True) -> None:
    """Make orphaned descendants re-parent to this process instead of init."""
    if _pyprctl is not None:
        _pyprctl.set_child_subreaper(on)
    else:
        _call(PR_SET_CHILD_SUBREAPER, 1 if on else 0)
