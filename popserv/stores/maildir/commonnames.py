"""
Maildir names of the common shape, parsed and ordered a whole directory at
a time with C-speed string operations (pure, no I/O).

Dovecot and :func:`popserv.stores.maildir.names.make_unique` name files
``TIME.ID,S=<stored>,W=<wire>:2,FLAGS``.  A cold login to 100,000 such files
spent most of its time building per-name objects and tuple keys; here one
regular expression runs over all the names of a directory joined by NUL
(which no file name contains), and the columns a session keeps are made by
``zip``, ``map`` and ``array`` without a Python-level loop.

Only names whose meaning is certain are taken; :func:`split_common` hands
back the others for :func:`~popserv.stores.maildir.names.parse_name`, and a test
checks that both parsers agree wherever this one answers.
"""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Sequence
from operator import itemgetter

from attrs import frozen

from popserv.stores.maildir.names import MAX_UIDL_LENGTH, seen

#: ``TIME.REST[,S=N],W=N`` then nothing or ``:INFO``, where TIME has exactly
#: ten digits (2001 to 2286) so that ordering by the whole unique name is
#: ordering by time first; REST avoids ``,`` (fields follow it), ``:`` (the
#: info separator) and ``!``/``;`` (separators on other systems), and
#: everything is printable ASCII, so that the unique name is its own UIDL
#: when it is short enough.  Groups: unique, time, wire size, info.
_COMMON = re.compile(
    r"\0((\d{10})\.[\x22-\x2b\x2d-\x39\x3c-\x7e]*(?:,S=\d{1,20})?,W=(\d{1,20}))(:[^\0]*)?(?=\0)",
    re.ASCII,
)

#: What :func:`split_common` gives for each name it takes.
Match = tuple[str, str, str, str]


def split_common(names: Sequence[str]) -> tuple[list[Match], list[str]]:
    """
    The (unique, time, wire size, info) text of each name of the common
    shape, and the other names, each in the order given.
    """
    matches = _COMMON.findall("\0" + "\0".join(names) + "\0")
    if len(matches) == len(names):
        return matches, []
    taken = {unique + info for unique, _, _, info in matches}
    return matches, [name for name in names if name not in taken]


@frozen
class CommonColumns:
    """A maildrop of common names, ordered by delivery time then unique name."""

    uniques: Sequence[str]
    sizes: array[int]
    received: array[float]
    #: The info part of each name (``:2,S``), one shared string per kind.
    infos: list[str]
    seen: tuple[bool, ...]
    #: Where each file is: an index into the places given.
    places: bytearray


def common_columns(places: Sequence[list[Match]]) -> CommonColumns | None:
    """
    Columns for the matches of each place (``new/``, ``cur/``), or None when
    these names cannot be served as they are: a unique name in two places
    (a message moving during the listing) or too long to be its own UIDL.
    """
    matches = [match for found in places for match in found]
    where = bytearray()
    for index, found in enumerate(places):
        where += bytes([index]) * len(found)
    if not matches:
        return CommonColumns((), array("q"), array("d"), [], (), bytearray())
    uniques, times, wires, infos = zip(*matches, strict=True)
    if len(set(uniques)) != len(uniques) or max(map(len, uniques)) > MAX_UIDL_LENGTH:
        return None
    order = sorted(range(len(uniques)), key=uniques.__getitem__)
    if len(order) > 1:
        take = itemgetter(*order)
        uniques, times, wires, infos = take(uniques), take(times), take(wires), take(infos)
        where = bytearray(take(where))
    shared = list(map(sys.intern, infos))
    seen_of = {info: seen(info) for info in set(shared)}
    return CommonColumns(
        uniques,
        array("q", map(int, wires)),
        array("d", map(float, times)),
        shared,
        tuple(map(seen_of.__getitem__, shared)),
        where,
    )
