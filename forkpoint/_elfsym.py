"""The address of a function a loaded library has but does not export.

numpy 2.5's OpenBLAS hides ``blas_thread_shutdown_`` (its at-fork handler, which
``_nativepools`` calls) from the dynamic symbol table; numpy 2.4's exported it. The wheel keeps
its full symbol table (``.symtab``), so the function's offset in the file is still written down,
and the library's load address (``dlinfo``) turns it into an address in this process.

A wrong address would be called at a checkpoint, so an answer is given only when the same
reading finds an *exported* function of the library exactly where the dynamic linker says it is.
Only 64-bit little-endian ELF (x86_64, aarch64, the architectures forkpoint supports) is read.
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator
from typing import BinaryIO

_SHT_SYMTAB, _SHT_DYNSYM = 2, 11
_STT_FUNC = 2
_SECTION = struct.Struct("<IIQQQQIIQQ")    # Elf64_Shdr
_SYMBOL = struct.Struct("<IBBHQQ")          # Elf64_Sym: name, info, other, shndx, value, size


_RTLD_DI_LINKMAP = 2


class _LinkMap(ctypes.Structure):
    _fields_ = [("l_addr", ctypes.c_size_t), ("l_name", ctypes.c_char_p)]     # (the rest unused)


_libdl = ctypes.CDLL(None, use_errno=True)
_dlinfo = _libdl.dlinfo
_dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
_dlinfo.restype = ctypes.c_int
_dlsym = _libdl.dlsym
_dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_dlsym.restype = ctypes.c_void_p


def hidden_function(path: str, lib: ctypes.CDLL, name: str) -> int | None:
    """The run-time address of function ``name`` in the loaded library ``path`` (whose handle is
    ``lib``), read from its ``.symtab``; None when it cannot be found and checked."""
    try:
        with open(path, "rb") as f:
            elf = _Elf(f)
            value = elf.function(_SHT_SYMTAB, name.encode())
            base = _load_base(lib)
            if value is None or base is None or not _checked(elf, lib, base):
                return None
    except (OSError, ValueError, struct.error, ctypes.ArgumentError):
        return None
    return base + value


class _Elf:
    """The section headers of an open ELF file, and its symbol tables read on demand (a few MB of
    a library of tens of MB)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        head = self._read(0, 64)
        if head[:6] != b"\x7fELF\x02\x01":          # 64-bit, little-endian
            raise ValueError("not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        if shentsize != _SECTION.size:
            raise ValueError("unexpected section header size")
        table = self._read(shoff, shnum * shentsize)
        self.sections = [_SECTION.unpack_from(table, i * shentsize) for i in range(shnum)]

    def _read(self, offset: int, size: int) -> bytes:
        self.f.seek(offset)
        data = self.f.read(size)
        if len(data) != size:
            raise ValueError("truncated ELF file")
        return data

    def symbols(self, kind: int) -> Iterator[tuple[bytes, int, int]]:
        """(name, type, value) of each defined symbol of the table of type ``kind``."""
        for _name, typ, _flags, _addr, offset, size, link, _info, _align, _entsize in self.sections:
            if typ != kind or link >= len(self.sections):
                continue
            symbols = self._read(offset, size)
            names = self._read(self.sections[link][4], self.sections[link][5])
            for entry in range(0, size - _SYMBOL.size + 1, _SYMBOL.size):
                st_name, info, _other, shndx, value, _size = _SYMBOL.unpack_from(symbols, entry)
                if shndx and value:
                    yield names[st_name:names.find(b"\0", st_name)], info & 0xF, value
            return

    def function(self, kind: int, name: bytes) -> int | None:
        for symbol, typ, value in self.symbols(kind):
            if typ == _STT_FUNC and symbol == name:
                return value
        return None


def _checked(elf: _Elf, lib: ctypes.CDLL, base: int) -> bool:
    """Whether an exported function lies where this reading of the file puts it (``dlsym``)."""
    for symbol, typ, value in elf.symbols(_SHT_DYNSYM):
        if typ != _STT_FUNC:
            continue
        address = _dlsym(lib._handle, symbol)
        if address:
            return bool(address == base + value)
    return False


def _load_base(lib: ctypes.CDLL) -> int | None:
    """The library's load address, from the dynamic linker's own record of it (``dlinfo``; a
    callback of ``dl_iterate_phdr`` would run Python under the linker's lock)."""
    link_map = ctypes.POINTER(_LinkMap)()
    if _dlinfo(lib._handle, _RTLD_DI_LINKMAP, ctypes.byref(link_map)) != 0 or not link_map:
        return None
    return int(link_map.contents.l_addr)
