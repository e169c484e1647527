"""
The scan: what a login learns of a Maildir's messages, from ``new/`` and
``cur/`` (blocking, for a thread; no Twisted here).

A scan lists both directories once and keeps the result as compact columns
(:class:`Scan`).  Sizes come from the ``,W=`` field of a file name when
there is one (names made by :mod:`popserv.stores.maildir.deliver` and by Dovecot
have it), else from the index (:mod:`popserv.stores.maildir.index`); only other
files are read, in a few threads.  Messages ``dovecot-uidlist`` lists come
first, in Dovecot's order (see :mod:`popserv.stores.maildir.uidls`), then the
others by delivery time and unique name.
"""

from __future__ import annotations

import gc
import os
import threading
from array import array
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from operator import itemgetter
from typing import Any

from attrs import define, frozen

from popserv.core.body import WireSizeCounter
from popserv.core.files import open_regular, read_regular
from popserv.interfaces import Listing
from popserv.stores.maildir.columns import PackedStrings
from popserv.stores.maildir.commonnames import Match, common_columns, split_common
from popserv.stores.maildir.index import Entry, load_index, storable
from popserv.stores.maildir.names import parse_name, seen
from popserv.stores.maildir.places import Places, chasing, list_messages
from popserv.stores.maildir.uidlist import UIDLIST_FILE, Uidlist, parse_uidlist
from popserv.stores.maildir.uidls import UidlScheme, assign_uidls

#: Read size when a message's wire size has to be counted.
READ_CHUNK = 64 * 1024

#: Stands for an empty unique name (a file named ``:2,S``) in ``Scan.uniques``,
#: where "" means "the same as the UIDL".  No file name can contain ``/``.
EMPTY_UNIQUE = "/"


def _measure(places: Places, size_needed: bool, where: int, name: str) -> tuple[int | None, float]:
    """The wire size (if needed; reads the whole file) and mtime of a message."""
    fd, status = open_regular(name, dir_fd=places[where])
    try:
        if not size_needed:
            return None, status.st_mtime
        # A cold scan reads every file, and in a busy server each system call
        # waits for the GIL again: a short read past the size fstat gave is
        # the end, without one more read() to be told so.
        counter = WireSizeCounter()
        remaining = status.st_size
        while chunk := os.read(fd, READ_CHUNK):
            counter.feed(chunk)
            remaining -= len(chunk)
            if remaining <= 0 and len(chunk) < READ_CHUNK:
                break
        return counter.result(), status.st_mtime
    finally:
        os.close(fd)


#: Cap on the ``dovecot-uidlist`` bytes read per message listed, plus a header;
#: a Dovecot line is a UID, a few fields and a file name.
_UIDLIST_BYTES_PER_MESSAGE = 1024
_UIDLIST_HEADER_BYTES = 4096


def _read_uidlist(maildir: int, messages: int) -> Uidlist | None:
    """The Maildir's ``dovecot-uidlist``, or None if there is none or it is unusable."""
    limit = _UIDLIST_HEADER_BYTES + _UIDLIST_BYTES_PER_MESSAGE * messages
    try:
        data = read_regular(UIDLIST_FILE, limit, dir_fd=maildir)
    except OSError:
        return None
    return parse_uidlist(data) if data is not None else None


@frozen
class Scan:
    """A scan's result: the listing, where each message's file is, and what to log."""

    listing: Listing
    #: Each message's unique name, "" where it is its UIDL (as usual); None if always.
    uniques: PackedStrings | None
    #: The rest of each file name (``:2,S``), shared strings; and NEW or CUR.
    infos: list[str]
    places: bytearray
    #: Files read to learn their size, and sizes the index had.
    counted: int
    indexed: int
    #: Messages whose UIDL came from ``dovecot-uidlist``, and its damaged lines.
    uidlist_listed: int
    uidlist_skipped: int
    #: The index to write (entries, possibly none), or None if it is current.
    index_update: dict[str, Entry] | None
    #: The listing cache's key and scheme to store this scan under once the
    #: login is answered; None if it is not to be stored (read from it, or unsettled).
    cache_as: tuple[list[Any], str] | None = None

    def file_of(self, index: int) -> tuple[int, str]:
        """Where message ``index``'s file was (NEW or CUR), and its name there."""
        unique = self.uniques[index] if self.uniques is not None else ""
        if not unique:
            unique = self.listing.uids[index]
        elif unique == EMPTY_UNIQUE:
            unique = ""
        return self.places[index], unique + self.infos[index]


#: What a scan keeps of each file while it works: NEW or CUR, the file name,
#: and the wire size and delivery time the name gives, if it does.
_Found = tuple[int, str, "int | None", "int | None"]


def _found(places: Sequence[tuple[list[Match], list[str]]]) -> dict[str, _Found]:
    """Each message by unique name; seen in two places, the last (``cur/``) wins."""
    found: dict[str, _Found] = {}
    for where, (common, others) in enumerate(places):
        # Tuples of numbers and strings only, not the parsed object:
        # the garbage collector stops tracking those, so 100,000 of
        # them do not set off full collections, each of which holds
        # the GIL (and stalls the reactor) for tens of milliseconds.
        for unique, stamp, wire, info in common:
            found[unique] = (where, unique + info, int(wire), int(stamp))
        for name in others:
            parsed = parse_name(name)
            found[parsed.unique] = (where, name, parsed.wire_size, parsed.timestamp)
    return found


@define
class _Measured:
    """What :func:`_measure_all` found: sizes and times the names lack."""

    #: unique name -> (NEW or CUR, file name, wire size, delivery time)
    messages: dict[str, tuple[int, str, int, float]]
    #: Index entries for the messages whose names lack either.
    entries: dict[str, Entry]
    counted: int = 0
    indexed: int = 0


#: A cold scan of files without ``,W=`` reads them in this many threads:
#: most of a read is waiting on the disk and in the kernel, which threads
#: overlap (a cold scan of 100,000 small files on 2 cores: 8.7 s in one
#: thread, 5.7 s in two, 4.3 s in four; more were slower, and when the files
#: are in the page cache four cost 2.6 s against 1.9 in two).
_MEASURE_THREADS = 4
#: Files per thread job, and the most read without extra threads.
_MEASURE_BATCH = 256

#: Where a measured file was found, its name there, and (wire size, mtime).
_Measurement = tuple[int, str, tuple["int | None", float]]


def _measure_batch(places: Places, batch: list[_Found]) -> list[_Measurement | None]:
    """Measure each file (None: deleted by someone else meanwhile)."""
    out: list[_Measurement | None] = []
    for where, name, size, _ in batch:
        try:
            measure = partial(_measure, places, size is None)
            out.append(chasing(places, where, name, measure))
        except FileNotFoundError:
            out.append(None)
    return out


def _measure_files(places: Places, files: list[_Found]) -> list[_Measurement | None]:
    """:func:`_measure_batch` of ``files``, in several threads when there are many."""
    if len(files) <= _MEASURE_BATCH:
        return _measure_batch(places, files)
    batches = [files[at : at + _MEASURE_BATCH] for at in range(0, len(files), _MEASURE_BATCH)]
    pool = ThreadPoolExecutor(_MEASURE_THREADS, thread_name_prefix="popserv-measure")
    try:
        return [
            outcome
            for batch in pool.map(partial(_measure_batch, places), batches)
            for outcome in batch
        ]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _measure_all(places: Places, found: dict[str, _Found], known: dict[str, Entry]) -> _Measured:
    """Each message's wire size and delivery time: from its name, the index, or its file."""
    result = _Measured({}, {})
    unknown: list[str] = []
    for unique, (where, name, named_size, timestamp) in found.items():
        size: int | None = named_size
        received: float | None = timestamp
        if size is None or received is None:
            entry = known.get(unique)
            if entry is None:
                unknown.append(unique)
                continue
            if size is None:
                size = entry[0]
                result.indexed += 1
            if received is None:
                received = entry[1]
            if storable(unique):
                result.entries[unique] = (size, received)
        result.messages[unique] = (where, name, size, received)
    measurements = _measure_files(places, [found[unique] for unique in unknown])
    for unique, measurement in zip(unknown, measurements, strict=True):
        if measurement is None:
            continue
        where, name, (counted_size, mtime) = measurement
        _, _, size, received = found[unique]
        if size is None:
            assert counted_size is not None
            size = counted_size
            result.counted += 1
        if received is None:
            received = mtime
        if storable(unique):
            result.entries[unique] = (size, received)
        result.messages[unique] = (where, name, size, received)
    return result


#: Scans of at least this many files hold off the cyclic garbage collector.
_GC_PAUSE_FILES = 10_000


class _CollectorPause:
    """
    No cyclic garbage collection while a big scan builds its columns: the
    hundreds of thousands of short-lived tuples it makes set off collections
    that traverse the server's whole heap (70-170 ms of a 0.35 s scan of
    100,000 names, measured).  A scan makes no cycles; collection resumes
    when the last concurrent scan ends, unless it was off before.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._holders = 0
        self._was_enabled = False

    def __enter__(self) -> None:
        with self._guard:
            if not self._holders:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._holders += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._guard:
            self._holders -= 1
            if not self._holders and self._was_enabled:
                gc.enable()


_collector_paused = _CollectorPause()


def scan(maildir: int, places: Places, scheme: UidlScheme, use_index: bool) -> Scan:
    """
    Index the messages of the Maildir ``maildir`` (a directory descriptor;
    ``places``: its ``new/`` and ``cur/``): those ``dovecot-uidlist`` lists
    in Dovecot's order (see :mod:`popserv.stores.maildir.uidls`), then the others
    by delivery time and unique name.
    """
    names = list_messages(places)
    if sum(map(len, names)) < _GC_PAUSE_FILES:
        return _scan_names(maildir, places, scheme, use_index, names)
    with _collector_paused:
        return _scan_names(maildir, places, scheme, use_index, names)


def _scan_names(
    maildir: int,
    places: Places,
    scheme: UidlScheme,
    use_index: bool,
    names: tuple[list[str], list[str]],
) -> Scan:
    """:func:`scan` once the directories are listed."""
    count = sum(map(len, names))
    # None: an index is there but unusable, so it is rewritten whatever happens.
    loaded = load_index(maildir, count) if use_index else {}
    uidlist = _read_uidlist(maildir, count) if scheme.reads_uidlist else None
    records = uidlist.records if uidlist is not None else {}
    split = [split_common(listed) for listed in names]
    del names
    if scheme.names_are_uidls and not records and not any(others for _, others in split):
        columns = common_columns([common for common, _ in split])
        if columns is not None:
            return Scan(
                Listing(
                    uids=PackedStrings(columns.uniques),
                    sizes=columns.sizes,
                    received=columns.received,
                    seen=columns.seen,
                ),
                None,
                columns.infos,
                columns.places,
                counted=0,
                indexed=0,
                uidlist_listed=0,
                uidlist_skipped=uidlist.skipped if uidlist is not None else 0,
                # Every size and time is in the names: an index has nothing to keep.
                index_update={} if use_index and loaded != {} else None,
            )
    measured = _measure_all(places, _found(split), loaded or {})
    del split

    rows = []
    intern: dict[str, str] = {}
    for unique, (where, name, size, received) in measured.messages.items():
        record = records.get(unique)
        if record is None:
            key: tuple[object, ...] = (2, received, unique)
        elif record.pop3_order is None:
            key = (1, record.uid)
        else:
            key = (0, record.pop3_order, record.uid)
        info = name[len(unique) :]
        # The info part, ":2,S" and the like, is the same string for most.
        info = intern.setdefault(info, info)
        # Tuples, not objects: a scan may build 100,000 of them.
        rows.append((key, unique, where, info, size, received))
    if records:
        rows.sort(key=lambda row: row[0])
    else:
        # Every key is (2, received, unique): two stable sorts on single keys
        # give the same order, and compare floats and strings directly,
        # which is several times faster than comparing 100,000 tuples.
        rows.sort(key=itemgetter(1))
        rows.sort(key=itemgetter(5))

    seen_of = {info: seen(info) for info in intern}
    uniques = [row[1] for row in rows]
    uids = assign_uidls(uniques, scheme, uidlist)
    listing = Listing(
        uids=PackedStrings(uids),
        sizes=array("q", [row[4] for row in rows]),
        received=array("d", [row[5] for row in rows]),
        seen=tuple([seen_of[row[3]] for row in rows]),
    )
    own = all(uid is unique for uid, unique in zip(uids, uniques, strict=True))
    unique_column = (
        None
        if own
        else PackedStrings(
            "" if uid == unique else (unique or EMPTY_UNIQUE)
            for uid, unique in zip(uids, uniques, strict=True)
        )
    )
    return Scan(
        listing,
        unique_column,
        [row[3] for row in rows],
        bytearray(row[2] for row in rows),
        measured.counted,
        measured.indexed,
        sum(1 for unique in uniques if unique in records) if records else 0,
        uidlist.skipped if uidlist is not None else 0,
        measured.entries if use_index and measured.entries != loaded else None,
    )
