"""
Compact per-message columns for large maildrops.

A Python ``str`` costs about 50 bytes before its first character, and a
list or tuple slot 8 more; for 100,000 UIDLs that is most of a session's
memory.  :class:`PackedStrings` keeps all of them in one string, joined by
NUL (which neither a file name nor a UIDL holds), with an array of offsets,
and cuts one out when it is asked for; a run of them is one slice of that
string split at its NULs, which is what a UIDL listing asks for.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from typing import overload

#: Between two strings; none may hold it.
SEPARATOR = "\0"


def stops_of(strings: Sequence[str]) -> array[int]:
    """
    The offset just past each string's end (and past its separator) in
    ``SEPARATOR.join(strings)``: one C-level pass.
    """
    total = sum(map(len, strings)) + len(strings)
    typecode = "I" if total < 2**32 else "Q"
    return array(typecode, accumulate(map((1).__add__, map(len, strings))))


class PackedStrings(Sequence[str]):
    """An immutable sequence of strings without NUL, stored as one string plus offsets."""

    __slots__ = ("_blob", "_stops")

    def __init__(self, strings: Iterable[str] = ()) -> None:
        items = strings if isinstance(strings, (list, tuple)) else list(strings)
        self._blob = SEPARATOR.join(items)
        if self._blob.count(SEPARATOR) != max(len(items) - 1, 0):
            raise ValueError("a packed string may not hold a NUL")
        self._stops = stops_of(items)

    @classmethod
    def from_parts(cls, blob: str, stops: array[int]) -> PackedStrings:
        """Rebuild from :meth:`parts` (the caller checked that they fit together)."""
        self = cls.__new__(cls)
        self._blob = blob
        self._stops = stops
        return self

    def parts(self) -> tuple[str, array[int]]:
        """The strings joined by :data:`SEPARATOR`, and :func:`stops_of` them."""
        return self._blob, self._stops

    def __len__(self) -> int:
        return len(self._stops)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        stops = self._stops
        if isinstance(index, slice):
            start, stop, step = index.indices(len(stops))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            if start >= stop:
                return []
            # One slice, split at its separators: C-level, no step per string.
            return self._blob[stops[start - 1] if start else 0 : stops[stop - 1] - 1].split(
                SEPARATOR
            )
        if index < 0:
            index += len(stops)
        if not 0 <= index < len(stops):
            raise IndexError("PackedStrings index out of range")
        return self._blob[stops[index - 1] if index else 0 : stops[index] - 1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._blob.split(SEPARATOR) if self._stops else ())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedStrings):
            return self._blob == other._blob and self._stops == other._stops
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PackedStrings({list(self)!r})"
