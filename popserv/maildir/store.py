"""
The Maildir store: one user's Maildir opened, locked and indexed for a session.

Opening scans ``new/`` and ``cur/`` once, in the reactor's thread pool, and
keeps the result as compact columns.  Sizes come from the ``,W=`` field of
a file name when there is one (names made by :mod:`popserv.maildir.deliver`
and by Dovecot have it); only other files are read.

Other programs (an IMAP server, a mail client on the same Maildir) may move
a message from ``new/`` to ``cur/`` or change its flags while a session is
open.  That renames the file but keeps its unique part, so each access that
finds the file gone looks it up again by that unique part before deciding
the message is really gone.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

from attrs import define, evolve, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.body import WireSizeCounter
from popserv.errors import CommitFailed, MessageGone, storage_failure
from popserv.files import (
    READ_FLAGS,
    checked_regular,
    fsync_directory,
    open_regular,
    read_regular,
)
from popserv.interfaces import IAccountSettings, IMailbox, Listing, MessageStream
from popserv.maildir.columns import PackedStrings
from popserv.maildir.commonnames import Match, common_columns, split_common
from popserv.maildir.directory import MaildirPath, SymlinkRefused
from popserv.maildir.index import Entry, load_index, save_index, storable
from popserv.maildir.listcache import (
    Cached,
    encode_listing,
    load_listing,
    save_listing,
    settled,
    stat_key,
)
from popserv.maildir.lock import MaildropLock
from popserv.maildir.names import parse_name, seen, with_flag
from popserv.maildir.uidlist import UIDLIST_FILE, Uidlist, parse_uidlist
from popserv.maildir.uidls import DOVECOT, UidlScheme, assign_uidls, parse_uidl_format

log = Logger()

T = TypeVar("T")

#: Indexes into ``_SUBDIRS``; one byte per message says where it lives.
NEW, CUR = 0, 1
_SUBDIRS = ("new", "cur")

#: Read size when a message's wire size has to be counted.
READ_CHUNK = 64 * 1024

#: Stands for an empty unique name (a file named ``:2,S``) in ``_Scan.uniques``,
#: where "" means "the same as the UIDL".  No file name can contain ``/``.
_EMPTY_UNIQUE = "/"

#: Up to this many retrieved messages, a commit with no deletions checks on the
#: reactor thread whether it has anything to do (a quick, pure check).
_INLINE_COMMIT_CHECK = 1000

#: How often to chase a message that keeps moving before calling it gone.
_LOOKUP_TRIES = 3


#: The Maildir's ``new/`` and ``cur/`` as directory descriptors, by NEW and CUR.
_Places = Sequence[int]


def _open_stream(name: str, directory: int) -> MessageStream:
    """The message file ``name`` in ``directory``, open for reading (see :func:`open_regular`)."""
    fd, _ = open_regular(name, dir_fd=directory)
    return open(fd, "rb", buffering=0)


def _find(places: _Places, unique: str) -> tuple[int, str] | None:
    """Where the message with this unique part is now, as (NEW or CUR, file name)."""
    for where, directory in enumerate(places):
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if (
                    name.startswith(unique)
                    and parse_name(name).unique == unique
                    and entry.is_file(follow_symlinks=False)
                ):
                    return where, name
    return None


def _chasing(
    places: _Places, where: int, name: str, action: Callable[[int, str], T]
) -> tuple[int, str, T]:
    """
    Run ``action(where, name)``; if the file is gone, find where the message
    moved and run it there.  Raise ``FileNotFoundError`` if it is really gone.
    """
    unique = None
    for _ in range(_LOOKUP_TRIES):
        try:
            return where, name, action(where, name)
        except FileNotFoundError:
            if unique is None:
                unique = parse_name(name).unique
            found = _find(places, unique)
            if found is None:
                raise
            where, name = found
    return where, name, action(where, name)


def _measure(
    places: _Places, size_needed: bool, where: int, name: str
) -> tuple[int | None, float]:
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
class _Scan:
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


#: What a scan keeps of each file while it works: NEW or CUR, the file name,
#: and the wire size and delivery time the name gives, if it does.
_Found = tuple[int, str, "int | None", "int | None"]


def _list_names(places: _Places) -> tuple[list[str], list[str]]:
    """The names of the message files in ``new/`` and ``cur/``."""
    listed = []
    # new/ before cur/: a message moving between them during the scan is then
    # seen at least once.
    for directory in places:
        with os.scandir(directory) as entries:
            listed.append(
                [
                    entry.name
                    for entry in entries
                    if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")
                ]
            )
    return listed[NEW], listed[CUR]


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


def _measure_batch(places: _Places, batch: list[_Found]) -> list[_Measurement | None]:
    """Measure each file (None: deleted by someone else meanwhile)."""
    out: list[_Measurement | None] = []
    for where, name, size, _ in batch:
        try:
            measure = partial(_measure, places, size is None)
            out.append(_chasing(places, where, name, measure))
        except FileNotFoundError:
            out.append(None)
    return out


def _measure_files(places: _Places, files: list[_Found]) -> list[_Measurement | None]:
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


def _measure_all(
    places: _Places, found: dict[str, _Found], known: dict[str, Entry]
) -> _Measured:
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


def _scan(maildir: int, places: _Places, scheme: UidlScheme, use_index: bool) -> _Scan:
    """
    Index the messages of the Maildir ``maildir`` (a directory descriptor;
    ``places``: its ``new/`` and ``cur/``): those ``dovecot-uidlist`` lists
    in Dovecot's order (see :mod:`popserv.maildir.uidls`), then the others
    by delivery time and unique name.
    """
    names = _list_names(places)
    if sum(map(len, names)) < _GC_PAUSE_FILES:
        return _scan_names(maildir, places, scheme, use_index, names)
    with _collector_paused:
        return _scan_names(maildir, places, scheme, use_index, names)


def _scan_names(
    maildir: int,
    places: _Places,
    scheme: UidlScheme,
    use_index: bool,
    names: tuple[list[str], list[str]],
) -> _Scan:
    """:func:`_scan` once the directories are listed."""
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
            return _Scan(
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
            "" if uid == unique else (unique or _EMPTY_UNIQUE)
            for uid, unique in zip(uids, uniques, strict=True)
        )
    )
    return _Scan(
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


def _listing_keys(maildir: int, places: _Places, scheme: UidlScheme) -> list[Any]:
    """The listing cache's key (see :mod:`popserv.maildir.listcache`)."""
    keys: list[Any] = [stat_key(os.fstat(places[NEW])), stat_key(os.fstat(places[CUR]))]
    uidlist = None
    if scheme.reads_uidlist:
        with contextlib.suppress(FileNotFoundError):
            uidlist = stat_key(os.stat(UIDLIST_FILE, dir_fd=maildir, follow_symlinks=False))
    keys.append(uidlist)
    return keys


def _open_locked(
    location: MaildirPath, scheme: UidlScheme, use_index: bool
) -> tuple[MaildropLock, _Scan]:
    """In a thread: create the Maildir if needed, lock it, index it."""
    started = time.time_ns()
    with contextlib.ExitStack() as stack:
        try:
            # Only a new user's first login creates anything: no mkdir at every login.
            opened = location.opened(*_SUBDIRS, create=True)
            maildir, *places = stack.enter_context(opened)
        except OSError as e:
            raise storage_failure("cannot open the maildir", e) from None
        lock = MaildropLock.acquire(maildir)
        try:
            # Under the lock: a session that committed (deleted) meanwhile
            # changed the directories, and its listing must not be taken.
            keys = _listing_keys(maildir, places, scheme) if use_index else None
            cached = load_listing(maildir, keys, scheme.text) if keys else None
            if cached is not None:
                return lock, _cached_scan(cached)
            scan = _scan(maildir, places, scheme, use_index)
            if use_index and keys and settled(keys, started):
                # Written by the mailbox after the login is answered (see
                # _save_caches): encoding and writing 100,000 entries (8 MB)
                # took 20-30 ms of a cold login.
                scan = evolve(scan, cache_as=(keys, scheme.text))
            return lock, scan
        except OSError as e:
            lock.release()
            raise storage_failure("cannot scan the maildir", e) from None
        except BaseException:
            lock.release()
            raise


def _cached_scan(cached: Cached) -> _Scan:
    """A scan's result as the listing cache kept it."""
    return _Scan(
        cached.listing,
        cached.uniques,
        cached.infos,
        cached.places,
        counted=0,
        indexed=0,
        uidlist_listed=cached.uidlist_listed,
        uidlist_skipped=0,
        index_update=None,
    )


#: A maildrop whose ``new/`` and ``cur/`` directories are at most this large
#: (their ``st_size``: on ext4 a 4 KiB block holds about 50 Maildir names)
#: is opened in the reactor thread when its listing cache is current.
INLINE_DIRECTORY_BYTES = 16 * 1024


def _open_cached(
    location: MaildirPath, scheme: UidlScheme
) -> tuple[MaildropLock, _Scan] | None:
    """
    Lock a small maildrop and take its listing from the cache, or None when
    it is not that simple (then :func:`_open_locked` runs in a thread).

    A few ``open`` and ``fstat`` calls, a non-blocking ``flock`` and one
    small read: the thread-pool round trip they replace cost a quarter of a
    short session (bench B1: 720 -> 960 sessions/s).  Anything that could
    take long (a big directory, a scan, reading messages) stays in the
    thread pool.
    """
    with contextlib.ExitStack() as stack:
        try:
            maildir, *places = stack.enter_context(location.opened(*_SUBDIRS))
        except SymlinkRefused as e:
            raise storage_failure("cannot open the maildir", e) from None
        except OSError:
            return None  # The thread pool's open reports it properly.
        try:
            if any(os.fstat(fd).st_size > INLINE_DIRECTORY_BYTES for fd in places):
                return None
        except OSError:
            return None
        lock = MaildropLock.acquire(maildir)
        try:
            # Under the lock, as in _open_locked.
            keys = _listing_keys(maildir, places, scheme)
            cached = load_listing(maildir, keys, scheme.text)
        except OSError:
            cached = None  # The thread pool's open reports it properly.
        except BaseException:
            lock.release()
            raise
        if cached is None:
            lock.release()
            return None
        return lock, _cached_scan(cached)


def _save_caches(
    location: MaildirPath,
    index_update: dict[str, Entry] | None,
    listing: tuple[Any, ...] | None,
) -> bool:
    """
    In a thread, after the login was answered: write the index (if it
    changed) and the listing cache (if the scan is to be kept).  The result
    is :func:`~popserv.maildir.index.save_index`'s, or False if not called.

    Neither needs the maildrop lock: each file is replaced atomically, and a
    listing is only ever read under the key of the directories it was made
    from, which a later change (this session's commit included) moves on.
    """
    with location.opened() as (maildir,):
        try:
            return save_index(maildir, index_update) if index_update is not None else False
        finally:
            # Also when the index could not be written (save_listing never raises).
            if listing is not None:
                keys, scheme, columns, uniques, infos, places, uidlist_listed = listing
                data = encode_listing(
                    keys,
                    scheme,
                    listing=columns,
                    uniques=uniques,
                    infos=infos,
                    places=places,
                    uidlist_listed=uidlist_listed,
                )
                save_listing(maildir, data)


@define
class _Outcome:
    """What a commit did, counted (never which files: those name users' mail)."""

    deleted: int = 0
    missing: int = 0
    failed: int = 0
    marked: int = 0
    unmarked: int = 0
    unsynced: int = 0


def _apply(
    location: MaildirPath,
    deletions: Sequence[tuple[int, str]],
    marks: Sequence[tuple[int, str]],
) -> _Outcome:
    """In a thread: delete and mark seen, then make it durable."""
    try:
        with location.opened(*_SUBDIRS) as (_, *places):
            return _apply_in(places, deletions, marks)
    except OSError:
        # The Maildir could not be reached (and is logged if refused).
        return _Outcome(failed=len(deletions), unmarked=len(marks))


def _apply_in(
    places: _Places, deletions: Sequence[tuple[int, str]], marks: Sequence[tuple[int, str]]
) -> _Outcome:
    """:func:`_apply` in the Maildir's ``new/`` and ``cur/``."""
    outcome = _Outcome()
    touched: set[int] = set()
    deleted_in: set[int] = set()

    def unlink(where: int, name: str) -> None:
        os.unlink(name, dir_fd=places[where])
        touched.add(where)
        deleted_in.add(where)

    def mark_seen(where: int, name: str) -> None:
        target = with_flag(name, "S")
        if where == CUR and target == name:
            return
        os.rename(name, target, src_dir_fd=places[where], dst_dir_fd=places[CUR])
        touched.update((where, CUR))

    for where, name in deletions:
        try:
            _chasing(places, where, name, unlink)
            outcome.deleted += 1
        except FileNotFoundError:
            outcome.missing += 1
        except OSError:
            outcome.failed += 1
    for where, name in marks:
        try:
            _chasing(places, where, name, mark_seen)
            outcome.marked += 1
        except OSError:
            outcome.unmarked += 1
    for where in sorted(touched):
        try:
            fsync_directory(places[where])
        except OSError:
            if where in deleted_in:
                outcome.unsynced += 1
    return outcome


@implementer(IMailbox, IAccountSettings)
class MaildirMailbox:
    """
    A Maildir opened and locked for one POP3 session.

    Build it with :meth:`open`; the constructor only assembles the parts.
    """

    def __init__(
        self,
        location: MaildirPath,
        lock: MaildropLock,
        scan: _Scan,
        *,
        reactor: IReactorThreads,
        login_delay: int = 0,
        expire_days: int | None = None,
    ) -> None:
        self.location = location
        self.path = location.path
        self.login_delay = login_delay
        self.expire_days = expire_days
        self._lock = lock
        self._listing = scan.listing
        # Where each message's file is: NEW or CUR, and its name, which is its
        # unique name (mostly the UIDL, so not stored twice) and its info.
        self._places = scan.places
        self._uniques = scan.uniques
        self._infos = scan.infos
        self._reactor = reactor
        # Thread jobs (a commit) the lock must outlive.
        self._jobs = 0
        self._close_requested = False
        # The index write does not hold the lock: a client that logs out and
        # straight back in must not find its maildrop in use.  Concurrent
        # writers are harmless, as every entry any of them writes is true
        # (see popserv.maildir.index), and each replaces the file atomically.
        self._index_saved: Deferred[bool] = Deferred()
        if scan.index_update is None and scan.cache_as is None:
            self._index_saved.callback(False)
        else:
            # The listing's columns as the scan left them: the session may
            # change its own copies (a message found moved) meanwhile.
            listing = (
                None
                if scan.cache_as is None
                else (
                    *scan.cache_as,
                    scan.listing,
                    scan.uniques,
                    list(scan.infos),
                    bytes(scan.places),
                    scan.uidlist_listed,
                )
            )
            self._in_thread(_save_caches, location, scan.index_update, listing).addCallbacks(
                self._index_saved.callback, self._index_not_saved
            )

    @classmethod
    def open(
        cls,
        path: MaildirPath | Path | str,
        *,
        reactor: IReactorThreads | None = None,
        login_delay: int = 0,
        expire_days: int | None = None,
        uidl_format: UidlScheme | str = DOVECOT,
        index: bool = True,
    ) -> Deferred[MaildirMailbox]:
        """
        Create (if missing), lock and index the Maildir at ``path``, in a
        thread (or at once for a small one whose listing is cached).

        ``path`` is reached without following symbolic links (see
        :mod:`popserv.maildir.directory`): a plain path's last component and
        everything inside the Maildir must not be one.

        ``uidl_format`` is a ``--uidl-format`` value (see
        :mod:`popserv.maildir.uidls`); ``index`` says whether to keep sizes
        counted by reading in ``popserv.index`` (see :mod:`popserv.maildir.index`).

        Fails with :class:`~popserv.errors.MailboxInUse` when another session
        has it, :class:`~popserv.errors.TemporaryFailure` on I/O errors, or
        :class:`~popserv.errors.PermanentFailure` on those only an
        administrator can cure (permissions, a file where a directory should
        be, a symbolic link refused).
        Cancelling the result releases the lock once the scan is over.
        """
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor  # type: ignore[assignment]
        assert reactor is not None
        location = MaildirPath.of(path)
        scheme = parse_uidl_format(uidl_format) if isinstance(uidl_format, str) else uidl_format
        cancelled = False

        def cancel(_: Deferred[MaildirMailbox]) -> None:
            nonlocal cancelled
            cancelled = True

        result: Deferred[MaildirMailbox] = Deferred(cancel)

        def opened(parts: tuple[MaildropLock, _Scan]) -> None:
            lock, scan = parts
            if cancelled:
                lock.release()
                return
            # twistd writes debug events too: only the scans that read files.
            if scan.counted:
                log.debug(
                    "Opened a maildrop of {count} messages: {counted} sized by reading,"
                    " {indexed} from the index, {listed} UIDLs from dovecot-uidlist",
                    count=len(scan.listing),
                    counted=scan.counted,
                    indexed=scan.indexed,
                    listed=scan.uidlist_listed,
                )
            if scan.uidlist_skipped:
                # info, not warn: popserv never rewrites the file, so this
                # would repeat at every login of the user.
                log.info(
                    "Skipped {skipped} damaged lines of a dovecot-uidlist",
                    skipped=scan.uidlist_skipped,
                )
            mailbox = cls(
                location,
                lock,
                scan,
                reactor=reactor,
                login_delay=login_delay,
                expire_days=expire_days,
            )
            result.callback(mailbox)

        def failed(failure: Failure) -> None:
            if not cancelled:
                result.errback(failure)

        try:
            parts = _open_cached(location, scheme) if index else None
        except Exception:
            failed(Failure())
            return result
        if parts is not None:
            opened(parts)
            return result
        work = deferToThreadPool(
            reactor, reactor.getThreadPool(), _open_locked, location, scheme, index
        )
        work.addCallbacks(opened, failed)
        return result

    def listing(self) -> Listing:
        return self._listing

    def index_saved(self) -> Deferred[bool]:
        """
        Fires when the index and listing-cache writes this session started
        (if any) are over:
        True if an index was written or removed, False if none was needed
        or this user may not write it.  For tests and tools; sessions need
        not wait.
        """
        saved: Deferred[bool] = Deferred()

        def passed(result: bool) -> bool:
            saved.callback(result)
            return result

        self._index_saved.addCallback(passed)
        return saved

    def _index_not_saved(self, failure: Failure) -> None:
        # A cache that cannot be written costs time, not correctness.
        log.info(
            "Could not write the maildrop index: {error}", error=failure.getErrorMessage()
        )
        self._index_saved.callback(False)

    def _name_of(self, index: int, infos: Sequence[str] | None = None) -> str:
        """The file name of message ``index`` (``infos``: a copy of the column, in a thread)."""
        unique = self._uniques[index] if self._uniques is not None else ""
        if not unique:
            unique = self._listing.uids[index]
        elif unique == _EMPTY_UNIQUE:
            unique = ""
        return unique + (self._infos if infos is None else infos)[index]

    def open_message(self, index: int) -> MessageStream | Deferred[MessageStream]:  # type: ignore[override]
        """
        Open message ``index`` for reading.

        Directly when the file is where the scan saw it; otherwise the lookup
        runs in a thread and the result is a ``Deferred``.
        """
        listed = self._name_of(index)
        try:
            fd = self.location.open_file(_SUBDIRS[self._places[index]], listed, READ_FLAGS)
            return open(checked_regular(fd)[0], "rb", buffering=0)
        except SymlinkRefused as e:
            raise storage_failure("cannot open a message", e) from None
        except OSError as e:
            # Gone, moved, or a link in the message's place: look it up again.
            if e.errno not in (errno.ENOENT, errno.ELOOP):
                raise storage_failure("cannot open a message", e) from None

        def chase() -> tuple[int, str, MessageStream]:
            try:
                with self.location.opened(*_SUBDIRS) as (_, *places):

                    def reopen(where: int, name: str) -> MessageStream:
                        return _open_stream(name, places[where])

                    return _chasing(places, self._places[index], listed, reopen)
            except FileNotFoundError:
                raise MessageGone("message file vanished") from None
            except OSError as e:
                raise storage_failure("cannot open a message", e) from None

        def moved(found: tuple[int, str, MessageStream]) -> MessageStream:
            where, name, stream = found
            self._places[index] = where
            # Same unique name, other info: keep the info part only.
            self._infos[index] = name[len(parse_name(name).unique) :]
            return stream

        return self._in_thread(chase).addCallback(moved)

    def commit(self, deleted: Sequence[int], retrieved: Sequence[int]) -> Deferred[None]:  # type: ignore[override]
        """
        Delete ``deleted`` and mark ``retrieved`` seen (moving them to ``cur/``).

        Failing to mark a message is only logged; failing to delete one
        fails the commit with :class:`~popserv.errors.CommitFailed`, after
        all the other changes were made.
        """
        if not deleted and len(retrieved) <= _INLINE_COMMIT_CHECK:
            # The steady state of a client that leaves mail on the server:
            # everything it retrieved is already seen in cur/.  Then there is
            # nothing to do, and a thread-pool round trip would cost more than
            # this check.
            places, infos = self._places, self._infos
            if all(
                places[i] == CUR and seen(infos[i]) for i in retrieved
            ):
                return succeed(None)
        # Naming 100,000 files is per-message work: done in the thread too,
        # on copies of the two columns a moved message changes.
        places, infos = bytes(self._places), list(self._infos)

        def plan_and_apply() -> _Outcome:
            gone = set(deleted)
            deletions = [(places[i], self._name_of(i, infos)) for i in sorted(gone)]
            unseen = {info: not seen(info) for info in set(infos)}
            marks = [
                (places[i], self._name_of(i, infos))
                for i in sorted(set(retrieved) - gone)
                if places[i] == NEW or unseen[infos[i]]
            ]
            return _apply(self.location, deletions, marks)

        return self._job(plan_and_apply).addCallback(self._committed)

    def _job(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        """Run ``f`` in a thread, keeping the lock until it is over."""
        self._jobs += 1
        return self._in_thread(f, *args).addBoth(self._job_over)

    def _job_over(self, result: T) -> T:
        self._jobs -= 1
        if self._close_requested and not self._jobs:
            self._lock.release()
        return result

    def _committed(self, outcome: _Outcome) -> None:
        log.info(
            "Commit: {deleted} deleted, {missing} already gone, {failed} failed;"
            " {marked} marked seen, {unmarked} not marked",
            deleted=outcome.deleted,
            missing=outcome.missing,
            failed=outcome.failed,
            marked=outcome.marked,
            unmarked=outcome.unmarked,
        )
        if outcome.failed or outcome.unsynced:
            raise CommitFailed(
                f"{outcome.failed} deletions failed, {outcome.unsynced} directories not synced"
            )

    def close(self) -> None:
        """Release the lock (after a running commit, if any); later calls do nothing."""
        self._close_requested = True
        if not self._jobs:
            self._lock.release()

    def _in_thread(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)
