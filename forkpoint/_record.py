"""A plain record class: ``__slots__`` and an ``__init__`` written out, compared and shown as a dataclass.

The shepherd imports the modules that define its records and messages before it can answer the
program's first request, and a program that forks a process per job waits for that once per job.
``@dataclass`` costs there: ``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``,
``tokenize``), about 8 ms, and generating each class's methods with ``exec`` costs a few hundred
microseconds more, some thirty classes in all. A subclass lists its fields in ``__slots__``, in the
order of its ``__init__``'s parameters; equality (same class, every field equal) and the repr are a
dataclass's, and like a dataclass with ``eq`` a record is not hashable.
"""
from __future__ import annotations

from typing import Any, ClassVar


class Record:
    __slots__: ClassVar[tuple[str, ...]] = ()
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        for name in self.__slots__:
            a, b = getattr(self, name), getattr(other, name)
            if a is not b and a != b:
                return False
        return True

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({inner})"

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (``dataclasses.asdict`` for a record of plain values)."""
        return {name: getattr(self, name) for name in self.__slots__}
