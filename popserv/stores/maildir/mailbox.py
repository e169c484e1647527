"""
The Maildir store's Twisted side: :class:`MaildirMailbox`, one user's
Maildir opened, locked and listed for a POP3 session.

The blocking work runs in the reactor's thread pool and comes back as
Deferreds: opening (:mod:`popserv.stores.maildir.opening`, which scans with
:mod:`popserv.stores.maildir.scan`), the QUIT commit (:mod:`popserv.stores.maildir.commit`)
and finding a message another program moved
(:mod:`popserv.stores.maildir.places`).  The mailbox holds the maildrop lock until
the session closes and any commit it started is over.  It is also the
user's settings for the session (:class:`~popserv.interfaces.IAccountSettings`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.core.errors import CommitFailed, MessageGone, storage_failure
from popserv.core.files import READ_FLAGS, checked_regular, open_regular
from popserv.interfaces import IAccountSettings, IMailbox, Listing, MessageStream
from popserv.stores.maildir.commit import Outcome, apply
from popserv.stores.maildir.directory import MaildirPath, SymlinkRefused
from popserv.stores.maildir.lock import HeldLock
from popserv.stores.maildir.locktable import LockTable
from popserv.stores.maildir.names import parse_name, seen
from popserv.stores.maildir.opening import open_cached, open_locked, save_caches
from popserv.stores.maildir.places import CUR, NEW, SUBDIRS, chasing
from popserv.stores.maildir.scan import EMPTY_UNIQUE, Scan
from popserv.stores.maildir.uidls import DOVECOT, UidlScheme, parse_uidl_format

log = Logger()

T = TypeVar("T")

#: Up to this many retrieved messages, a commit with no deletions checks on the
#: reactor thread whether it has anything to do (a quick, pure check).
_INLINE_COMMIT_CHECK = 1000


def _open_stream(name: str, directory: int) -> MessageStream:
    """The message file ``name`` in ``directory``, open for reading (see :func:`open_regular`)."""
    fd, _ = open_regular(name, dir_fd=directory)
    return open(fd, "rb", buffering=0)


@implementer(IMailbox, IAccountSettings)
class MaildirMailbox:
    """
    A Maildir opened and locked for one POP3 session.

    Build it with :meth:`open`; the constructor only assembles the parts.
    """

    def __init__(
        self,
        location: MaildirPath,
        lock: HeldLock,
        scan: Scan,
        *,
        reactor: IReactorThreads,
        login_delay: int = 0,
        expire_days: int | None = None,
        max_listed: int = 0,
    ) -> None:
        self.location = location
        self.path = location.path
        self.login_delay = login_delay
        self.expire_days = expire_days
        #: Sessions show only the newest this many messages (0: all).
        self.max_listed = max_listed
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
        # (see popserv.stores.maildir.index), and each replaces the file atomically.
        self._index_saved: Deferred[bool] = Deferred()
        if scan.index_update is None and scan.cache_as is None:
            self._index_saved.callback(False)
        else:
            # The listing's columns as the scan left them: the session may
            # change its own (a message found moved) while they are written.
            kept = (
                scan
                if scan.cache_as is None
                else evolve(scan, infos=list(scan.infos), places=bytearray(scan.places))
            )
            self._in_thread(save_caches, location, kept).addCallbacks(
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
        max_listed: int = 0,
        uidl_format: UidlScheme | str = DOVECOT,
        index: bool = True,
        shared: bool = False,
        locks: LockTable | None = None,
    ) -> Deferred[MaildirMailbox]:
        """
        Create (if missing), lock and index the Maildir at ``path``, in a
        thread (or at once for a small one whose listing is cached).

        ``path`` is reached without following symbolic links (see
        :mod:`popserv.stores.maildir.directory`): a plain path's last component and
        everything inside the Maildir must not be one.

        ``uidl_format`` is a ``--uidl-format`` value (see
        :mod:`popserv.stores.maildir.uidls`); ``index`` says whether to keep sizes
        counted by reading in ``popserv.index`` (see :mod:`popserv.stores.maildir.index`).
        ``shared``: lock it alongside other sessions (``--maildrop-lock
        shared``): this one lists a snapshot, and its commit deletes what is
        still there.  ``locks``: the data directory's lock table, so the
        session holds no descriptor of its own (see
        :mod:`popserv.stores.maildir.locktable`); else ``popserv.lock``.

        Fails with :class:`~popserv.core.errors.MailboxInUse` when another session
        has it (exclusively, or at all when not ``shared``),
        :class:`~popserv.core.errors.TemporaryFailure` on I/O errors, or
        :class:`~popserv.core.errors.PermanentFailure` on those only an
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

        def opened(parts: tuple[HeldLock, Scan]) -> None:
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
                max_listed=max_listed,
            )
            result.callback(mailbox)

        def failed(failure: Failure) -> None:
            if not cancelled:
                result.errback(failure)

        try:
            parts = open_cached(location, scheme, shared, locks) if index else None
        except Exception:
            failed(Failure())
            return result
        if parts is not None:
            opened(parts)
            return result
        work = deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            open_locked,
            location,
            scheme,
            index,
            shared,
            locks,
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
        log.info("Could not write the maildrop index: {error}", error=failure.getErrorMessage())
        self._index_saved.callback(False)

    def _name_of(self, index: int, infos: Sequence[str] | None = None) -> str:
        """The file name of message ``index`` (``infos``: a copy of the column, in a thread)."""
        unique = self._uniques[index] if self._uniques is not None else ""
        if not unique:
            unique = self._listing.uids[index]
        elif unique == EMPTY_UNIQUE:
            unique = ""
        return unique + (self._infos if infos is None else infos)[index]

    def open_message(self, index: int) -> MessageStream | Deferred[MessageStream]:
        """
        Open message ``index`` for reading.

        Directly when the file is where the scan saw it; otherwise the lookup
        runs in a thread and the result is a ``Deferred``.
        """
        listed = self._name_of(index)
        try:
            fd = self.location.open_file(SUBDIRS[self._places[index]], listed, READ_FLAGS)
            return open(checked_regular(fd)[0], "rb", buffering=0)
        except SymlinkRefused as e:
            raise storage_failure("cannot open a message", e) from None
        except OSError as e:
            # Gone, moved, or a link in the message's place: look it up again.
            if e.errno not in (errno.ENOENT, errno.ELOOP):
                raise storage_failure("cannot open a message", e) from None

        def chase() -> tuple[int, str, MessageStream]:
            try:
                with self.location.opened(*SUBDIRS) as (_, *places):

                    def reopen(where: int, name: str) -> MessageStream:
                        return _open_stream(name, places[where])

                    return chasing(places, self._places[index], listed, reopen)
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

    def commit(self, deleted: Sequence[int], retrieved: Sequence[int]) -> Deferred[None]:
        """
        Delete ``deleted`` and mark ``retrieved`` seen (moving them to ``cur/``).

        Failing to mark a message is only logged; failing to delete one
        fails the commit with :class:`~popserv.core.errors.CommitFailed`, after
        all the other changes were made.
        """
        if not deleted and len(retrieved) <= _INLINE_COMMIT_CHECK:
            # The steady state of a client that leaves mail on the server:
            # everything it retrieved is already seen in cur/.  Then there is
            # nothing to do, and a thread-pool round trip would cost more than
            # this check.
            live_places, live_infos = self._places, self._infos
            if all(live_places[i] == CUR and seen(live_infos[i]) for i in retrieved):
                return succeed(None)
        # Naming 100,000 files is per-message work: done in the thread too,
        # on copies of the two columns a moved message changes.
        places, infos = bytes(self._places), list(self._infos)

        def plan_and_apply() -> Outcome:
            gone = set(deleted)
            deletions = [(places[i], self._name_of(i, infos)) for i in sorted(gone)]
            unseen = {info: not seen(info) for info in set(infos)}
            marks = [
                (places[i], self._name_of(i, infos))
                for i in sorted(set(retrieved) - gone)
                if places[i] == NEW or unseen[infos[i]]
            ]
            return apply(self.location, deletions, marks)

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

    def _committed(self, outcome: Outcome) -> None:
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
