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

import errno
import os
import stat
from array import array
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

from attrs import define, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.body import WireSizeCounter
from popserv.errors import CommitFailed, MessageGone, storage_failure
from popserv.interfaces import IAccountSettings, IMailbox, Listing, MessageStream
from popserv.layout import ensure_maildir
from popserv.maildir.deliver import fsync_directory
from popserv.maildir.lock import MaildropLock
from popserv.maildir.names import MaildirName, parse_name, uidl_for, with_flag

log = Logger()

T = TypeVar("T")

#: Indexes into ``_SUBDIRS``; one byte per message says where it lives.
NEW, CUR = 0, 1
_SUBDIRS = ("new", "cur")

#: Read size when a message's wire size has to be counted.
READ_CHUNK = 64 * 1024

#: How often to chase a message that keeps moving before calling it gone.
_LOOKUP_TRIES = 3


def _open_regular(path: Path) -> int:
    """
    Open a message file for reading; anything but a regular file counts as absent.

    No symlinks (a user could point one at a file only the server may read)
    and no FIFOs or devices (O_NONBLOCK so opening one cannot hang).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileNotFoundError(errno.ENOENT, "not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _find(maildir: Path, unique: str) -> tuple[int, str] | None:
    """Where the message with this unique part is now, as (NEW or CUR, file name)."""
    for where, sub in enumerate(_SUBDIRS):
        try:
            entries = os.scandir(maildir / sub)
        except FileNotFoundError:
            continue
        with entries:
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
    maildir: Path, where: int, name: str, action: Callable[[int, str], T]
) -> tuple[int, str, T]:
    """
    Run ``action(where, name)``; if the file is gone, find where the message
    moved and run it there.  Raise ``FileNotFoundError`` if it is really gone.
    """
    unique = parse_name(name).unique
    for _ in range(_LOOKUP_TRIES):
        try:
            return where, name, action(where, name)
        except FileNotFoundError:
            found = _find(maildir, unique)
            if found is None:
                raise
            where, name = found
    return where, name, action(where, name)


def _measure(maildir: Path, size_needed: bool, where: int, name: str) -> tuple[int | None, float]:
    """The wire size (if needed; reads the whole file) and mtime of a message."""
    fd = _open_regular(maildir / _SUBDIRS[where] / name)
    try:
        mtime = os.fstat(fd).st_mtime
        if not size_needed:
            return None, mtime
        counter = WireSizeCounter()
        while chunk := os.read(fd, READ_CHUNK):
            counter.feed(chunk)
        return counter.result(), mtime
    finally:
        os.close(fd)


@frozen
class _Index:
    """A scan's result: the listing plus where each message's file is."""

    listing: Listing
    names: list[str]
    places: bytearray
    counted: int


def _scan(maildir: Path) -> _Index:
    """Index the messages of ``maildir``, ordered by delivery time then unique part."""
    found: dict[str, tuple[int, str, MaildirName]] = {}
    # new/ before cur/: a message moving between them during the scan is then
    # seen at least once.  Seen twice, the cur/ entry (read last) wins.
    for where, sub in enumerate(_SUBDIRS):
        with os.scandir(maildir / sub) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                parsed = parse_name(name)
                found[parsed.unique] = (where, name, parsed)

    rows = []
    counted = 0
    for unique, (listed_where, listed_name, parsed) in found.items():
        where, name = listed_where, listed_name
        size = parsed.wire_size
        received: float | None = parsed.timestamp
        flags = parsed.flags
        if size is None or received is None:
            measure = partial(_measure, maildir, size is None)
            try:
                where, name, (counted_size, mtime) = _chasing(maildir, where, name, measure)
            except FileNotFoundError:
                continue  # Deleted by someone else meanwhile.
            if size is None:
                assert counted_size is not None
                size = counted_size
                counted += 1
            if received is None:
                received = mtime
            flags = parse_name(name).flags
        assert size is not None and received is not None
        rows.append((received, unique, where, name, size, "S" in flags))
    rows.sort(key=lambda row: (row[0], row[1]))

    listing = Listing(
        uids=tuple(uidl_for(row[1]) for row in rows),
        sizes=array("q", [row[4] for row in rows]),
        received=array("d", [row[0] for row in rows]),
        seen=tuple(row[5] for row in rows),
    )
    names = [row[3] for row in rows]
    places = bytearray(row[2] for row in rows)
    return _Index(listing, names, places, counted)


def _open_locked(maildir: Path) -> tuple[MaildropLock, _Index]:
    """In a thread: create the Maildir if needed, lock it, index it."""
    try:
        ensure_maildir(maildir)
    except OSError as e:
        raise storage_failure("cannot create the maildir", e) from None
    lock = MaildropLock.acquire(maildir)
    try:
        return lock, _scan(maildir)
    except OSError as e:
        lock.release()
        raise storage_failure("cannot scan the maildir", e) from None
    except BaseException:
        lock.release()
        raise


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
    maildir: Path, deletions: Sequence[tuple[int, str]], marks: Sequence[tuple[int, str]]
) -> _Outcome:
    """In a thread: delete and mark seen, then make it durable."""
    outcome = _Outcome()
    touched: set[int] = set()
    deleted_in: set[int] = set()

    def unlink(where: int, name: str) -> None:
        os.unlink(maildir / _SUBDIRS[where] / name)
        touched.add(where)
        deleted_in.add(where)

    def mark_seen(where: int, name: str) -> None:
        target = with_flag(name, "S")
        if where == CUR and target == name:
            return
        os.rename(maildir / _SUBDIRS[where] / name, maildir / "cur" / target)
        touched.update((where, CUR))

    for where, name in deletions:
        try:
            _chasing(maildir, where, name, unlink)
            outcome.deleted += 1
        except FileNotFoundError:
            outcome.missing += 1
        except OSError:
            outcome.failed += 1
    for where, name in marks:
        try:
            _chasing(maildir, where, name, mark_seen)
            outcome.marked += 1
        except OSError:
            outcome.unmarked += 1
    for where in sorted(touched):
        try:
            fsync_directory(maildir / _SUBDIRS[where])
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
        path: Path,
        lock: MaildropLock,
        listing: Listing,
        names: list[str],
        places: bytearray,
        *,
        reactor: IReactorThreads,
        login_delay: int = 0,
        expire_days: int | None = None,
    ) -> None:
        self.path = path
        self.login_delay = login_delay
        self.expire_days = expire_days
        self._lock = lock
        self._listing = listing
        # Where each message's file is: its current name, and NEW or CUR.
        self._names = names
        self._places = places
        self._reactor = reactor
        self._committing = False
        self._close_requested = False

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        reactor: IReactorThreads | None = None,
        login_delay: int = 0,
        expire_days: int | None = None,
    ) -> Deferred[MaildirMailbox]:
        """
        Create (if missing), lock and index the Maildir at ``path``, in a thread.

        Fails with :class:`~popserv.errors.MailboxInUse` when another session
        has it, :class:`~popserv.errors.TemporaryFailure` on I/O errors, or
        :class:`~popserv.errors.PermanentFailure` on those only an
        administrator can cure (permissions, a file where a directory should be).
        Cancelling the result releases the lock once the scan is over.
        """
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor  # type: ignore[assignment]
        assert reactor is not None
        path = Path(path)
        cancelled = False

        def cancel(_: Deferred[MaildirMailbox]) -> None:
            nonlocal cancelled
            cancelled = True

        result: Deferred[MaildirMailbox] = Deferred(cancel)

        def opened(parts: tuple[MaildropLock, _Index]) -> None:
            lock, index = parts
            if cancelled:
                lock.release()
                return
            log.debug(
                "Opened a maildrop of {count} messages, {counted} sized by reading",
                count=len(index.listing),
                counted=index.counted,
            )
            mailbox = cls(
                path,
                lock,
                index.listing,
                index.names,
                index.places,
                reactor=reactor,
                login_delay=login_delay,
                expire_days=expire_days,
            )
            result.callback(mailbox)

        def failed(failure: Failure) -> None:
            if not cancelled:
                result.errback(failure)

        work = deferToThreadPool(reactor, reactor.getThreadPool(), _open_locked, path)
        work.addCallbacks(opened, failed)
        return result

    def listing(self) -> Listing:
        return self._listing

    def _path_of(self, index: int) -> Path:
        return self.path / _SUBDIRS[self._places[index]] / self._names[index]

    def open_message(self, index: int) -> MessageStream | Deferred[MessageStream]:  # type: ignore[override]
        """
        Open message ``index`` for reading.

        Directly when the file is where the scan saw it; otherwise the lookup
        runs in a thread and the result is a ``Deferred``.
        """
        try:
            return open(_open_regular(self._path_of(index)), "rb", buffering=0)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise storage_failure("cannot open a message", e) from None

        def reopen(where: int, name: str) -> MessageStream:
            fd = _open_regular(self.path / _SUBDIRS[where] / name)
            return open(fd, "rb", buffering=0)

        def chase() -> tuple[int, str, MessageStream]:
            try:
                return _chasing(self.path, self._places[index], self._names[index], reopen)
            except FileNotFoundError:
                raise MessageGone("message file vanished") from None
            except OSError as e:
                raise storage_failure("cannot open a message", e) from None

        def moved(found: tuple[int, str, MessageStream]) -> MessageStream:
            where, name, stream = found
            self._places[index] = where
            self._names[index] = name
            return stream

        return self._in_thread(chase).addCallback(moved)

    def commit(self, deleted: Sequence[int], retrieved: Sequence[int]) -> Deferred[None]:  # type: ignore[override]
        """
        Delete ``deleted`` and mark ``retrieved`` seen (moving them to ``cur/``).

        Failing to mark a message is only logged; failing to delete one
        fails the commit with :class:`~popserv.errors.CommitFailed`, after
        all the other changes were made.
        """
        gone = set(deleted)
        deletions = [(self._places[i], self._names[i]) for i in sorted(gone)]
        marks = [
            (self._places[i], self._names[i])
            for i in sorted(set(retrieved) - gone)
            if self._places[i] == NEW or "S" not in parse_name(self._names[i]).flags
        ]
        self._committing = True
        work = self._in_thread(_apply, self.path, deletions, marks)
        work.addBoth(self._commit_over)
        return work.addCallback(self._committed)

    def _commit_over(self, result: T) -> T:
        self._committing = False
        if self._close_requested:
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
        if not self._committing:
            self._lock.release()

    def _in_thread(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)
