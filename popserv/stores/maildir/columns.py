"""
Compact per-message columns for large maildrops.

A Python ``str`` costs about 50 bytes before its first character, and a
list or tuple slot 8 more; for 100,000 UIDLs that is most of a session's
memory.  :class:`PackedStrings` keeps all of them in one string with an
array of end offsets instead, and slices one out when it is asked for.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from typing import overload


class PackedStrings(Sequence[str]):
    """An immutable sequence of strings stored as one string plus offsets."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, strings: Iterable[str] = ()) -> None:
        items = strings if isinstance(strings, (list, tuple)) else list(strings)
        self._blob = "".join(items)
        typecode = "I" if len(self._blob) < 2**32 else "Q"
        self._ends = array(typecode, accumulate(map(len, items)))

    @classmethod
    def from_parts(cls, blob: str, ends: array[int]) -> PackedStrings:
        """Rebuild from :meth:`parts` (the caller checked that they fit together)."""
        self = cls.__new__(cls)
        self._blob = blob
        self._ends = ends
        return self

    def parts(self) -> tuple[str, array[int]]:
        """All the strings joined, and the end offset of each."""
        return self._blob, self._ends

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            if start >= stop:
                return []
            # The bounds of each string, then one C-level pass to cut them out.
            ends = self._ends
            bounds = ends[start - 1 : stop] if start else array(ends.typecode, [0]) + ends[:stop]
            return list(map(self._blob.__getitem__, map(slice, bounds, bounds[1:])))
        ends = self._ends
        if index < 0:
            index += len(ends)
        if not 0 <= index < len(ends):
            raise IndexError("PackedStrings index out of range")
        return self._blob[ends[index - 1] if index else 0 : ends[index]]

    def __iter__(self) -> Iterator[str]:
        blob = self._blob
        start = 0
        for end in self._ends:
            yield blob[start:end]
            start = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedStrings):
            return self._blob == other._blob and self._ends == other._ends
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PackedStrings({list(self)!r})"
