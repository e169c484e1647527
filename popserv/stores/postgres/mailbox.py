"""
The PostgreSQL mail store's Twisted side: :class:`PostgresMailbox`, one
user's maildrop leased and listed for a POP3 session, and
:class:`MessageChunks`, a message read a few chunks at a time.

Every query runs in the database's threads (:class:`~popserv.logins.database.Database`),
so the reactor never waits on PostgreSQL.  The lease is renewed every
third of its length while the session lasts and released when it ends; a
process that dies leaves it to expire (see :mod:`popserv.stores.postgres.queries`).
"""

from __future__ import annotations

import os
import socket
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.core.errors import MessageGone
from popserv.interfaces import IAccountSettings, IChunkSource, IMailbox, Listing
from popserv.logins.database import Database
from popserv.stores.postgres import queries
from popserv.stores.postgres.schema import CHUNK_SIZE

log = Logger()

T = TypeVar("T")

#: Seconds a session's lease on its maildrop lasts unless renewed: how
#: long the users of a process that died stay locked out.
LEASE_SECONDS = 30.0
#: A session whose lease was not renewed for this part of its length ends
#: (it is renewed every third): the rest is the margin before another
#: session may take the maildrop.
SAFE_PART = 2 / 3


def node_name() -> str:
    """Who holds a lease, as operators read it: this host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@implementer(IChunkSource)
class MessageChunks:
    """One stored message, read a few chunks per query (``queries.CHUNKS_PER_READ``)."""

    def __init__(
        self,
        database: Database,
        message: int,
        first: Callable[[], Deferred[list[bytes]]] | None = None,
    ) -> None:
        self._database = database
        self._message = message
        #: How the first chunks come when not by a query of their own
        #: (:class:`ReadAhead`): all of a small message's, a list of one.
        self._first = first
        self._next = 0
        self._ended = False
        self._buffer: deque[bytes] = deque()

    def read(self, size: int) -> Deferred[bytes]:
        if self._buffer:
            return succeed(self._take(size))
        if self._ended:
            return succeed(b"")
        if self._first is not None and self._next == 0:
            return self._first().addCallback(self._fetched, size)
        return self._query().addCallback(self._fetched, size)

    def _query(self) -> Deferred[list[bytes]]:
        first, count = self._next, queries.CHUNKS_PER_READ
        return self._database.run(
            lambda connection: queries.read_chunks(connection, self._message, first, count)
        )

    def _fetched(self, chunks: list[bytes], size: int) -> bytes:
        if not chunks and self._next == 0:
            raise MessageGone("the message is no longer in the database")
        self._next += len(chunks)
        self._ended = len(chunks) < queries.CHUNKS_PER_READ
        self._buffer.extend(chunk for chunk in chunks if chunk)
        return self._take(size) if self._buffer else b""

    def _take(self, size: int) -> bytes:
        chunk = self._buffer.popleft()
        if len(chunk) > size:
            self._buffer.appendleft(chunk[size:])
            return chunk[:size]
        return chunk

    def close(self) -> None:
        self._buffer.clear()
        self._ended = True


#: Octets of small messages one RETR reads ahead, after the one asked for
#: (those that follow it, each of one chunk), and how many messages at
#: most.  Clients retrieve in order: B1's ten RETRs of 4 KB took ten
#: queries, a thread hop and a round trip each; now one.  A big message's
#: RETR holds four chunks (1 MiB) in the same way.
READ_AHEAD_OCTETS = 256 * 1024
READ_AHEAD_MESSAGES = 64


class ReadAhead:
    """Small messages read in runs by one query, kept until their RETR (or the session's end)."""

    def __init__(self, database: Database, ids: Sequence[int], sizes: Sequence[int]) -> None:
        self._database = database
        self._ids = ids
        self._sizes = sizes
        self._kept: dict[int, bytes] = {}

    def first(self, index: int) -> Callable[[], Deferred[list[bytes]]] | None:
        """How message ``index`` is read whole, if it is one chunk; None otherwise."""
        if self._sizes[index] >= CHUNK_SIZE:
            # Wire sizes are never below stored ones: this one may be longer
            # than a chunk, and is read as big messages are.
            return None
        return lambda: self._read(index)

    def take(self, index: int) -> bytes | None:
        """Message ``index`` if it was read ahead (once: it is forgotten)."""
        return self._kept.pop(index, None)

    def _read(self, index: int) -> Deferred[list[bytes]]:
        kept = self._kept.pop(index, None)
        if kept is not None:
            return succeed([kept])
        run = [index]
        octets = self._sizes[index]
        for later in range(index + 1, min(len(self._ids), index + READ_AHEAD_MESSAGES)):
            size = self._sizes[later]
            if size >= CHUNK_SIZE or octets + size > READ_AHEAD_OCTETS:
                break
            run.append(later)
            octets += size
        wanted = [self._ids[i] for i in run]

        def fetched(found: dict[int, bytes]) -> list[bytes]:
            # Only the latest run is kept: a client that skips about (RETR 1,
            # 65, 129 ...) must not pile up runs it never reads.
            self._kept.clear()
            for i in run[1:]:
                data = found.get(self._ids[i])
                if data is not None:
                    self._kept[i] = data
            data = found.get(self._ids[index])
            return [] if data is None else [data]

        return self._database.run(
            lambda connection: queries.read_messages(connection, wanted)
        ).addCallback(fetched)

    def clear(self) -> None:
        self._kept.clear()


@implementer(IMailbox, IAccountSettings)
class PostgresMailbox:
    """A maildrop in PostgreSQL, leased to one POP3 session.  Build it with :meth:`open`."""

    def __init__(
        self,
        database: Database,
        opened: queries.Opened,
        owner: str,
        *,
        lease: float = LEASE_SECONDS,
        login_delay: int = 0,
        expire_days: int | None = None,
        max_listed: int = 0,
        on_lost: Callable[[str], None] | None = None,
        shared: bool = False,
    ) -> None:
        self.database = database
        #: Held alongside other sessions, each with a lease of its own.
        self.shared = shared
        self.maildrop = opened.maildrop
        self.owner = owner
        self.login_delay = login_delay
        self.expire_days = expire_days
        #: Sessions show only the newest this many messages (0: all).
        self.max_listed = max_listed
        #: False once a renewal found the lease taken: the commit will refuse.
        self.leased = True
        #: Fires once the lease is given back, or could not be (it expires).
        self.released: Deferred[None] = Deferred()
        self._ids = opened.ids
        self._listing = opened.listing
        self._lease = lease
        self._jobs = 0
        self._closed = False
        self._on_lost = on_lost
        clock = database.reactor
        self._clock = clock
        self._read_ahead = ReadAhead(database, opened.ids, opened.listing.sizes)
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = clock
        self._renewal.start(lease / 3, now=False)
        # The lease was taken (by the database's clock) after this moment.
        self._deadline = clock.callLater(lease * SAFE_PART, self._running_out)

    @classmethod
    def open(
        cls,
        database: Database,
        name: str,
        *,
        client: str = "",
        lease: float = LEASE_SECONDS,
        login_delay: int = 0,
        expire_days: int | None = None,
        max_listed: int = 0,
        on_lost: Callable[[str], None] | None = None,
        shared: bool = False,
    ) -> Deferred[PostgresMailbox]:
        """
        Lease ``name``'s maildrop (created if missing) and list it;
        ``shared``: alongside other shared sessions, each listing a snapshot.

        Fails with :class:`~popserv.core.errors.MailboxInUse` while another
        session's lease holds it (an exclusive one, when ``shared``),
        :class:`~popserv.core.errors.LoginDelayed`, or
        :class:`~popserv.logins.database.DatabaseUnavailable`.  Cancelling
        the result gives the lease back once it is taken.  ``on_lost(why)``
        is called if the session must end because its lease could not be
        renewed (see :meth:`_lose`).
        """
        owner = str(uuid.uuid4())
        cancelled = False

        def cancel(_: Deferred[PostgresMailbox]) -> None:
            nonlocal cancelled
            cancelled = True

        result: Deferred[PostgresMailbox] = Deferred(cancel)

        def work(connection: Any) -> queries.Opened:
            return queries.open_maildrop(
                connection,
                name,
                owner=owner,
                node=node_name(),
                client=client,
                lease=lease,
                login_delay=login_delay,
                shared=shared,
            )

        def opened(found: queries.Opened) -> None:
            if cancelled:
                database.run(lambda c: queries.release(c, found.maildrop, owner, shared=shared))
                return
            mailbox = cls(
                database,
                found,
                owner,
                lease=lease,
                login_delay=login_delay,
                expire_days=expire_days,
                max_listed=max_listed,
                on_lost=on_lost,
                shared=shared,
            )
            result.callback(mailbox)

        def failed(failure: Failure) -> None:
            if not cancelled:
                result.errback(failure)

        database.run(work).addCallbacks(opened, failed)
        return result

    def listing(self) -> Listing:
        return self._listing

    def open_message(self, index: int) -> MessageChunks | BytesIO:
        """
        A message read ahead is there already: a stream the reactor reads
        at once, as a Maildir file is read (the chunk machinery of
        :class:`MessageChunks`, its Deferreds and the coroutine waiting on
        them, cost B1 about a tenth of popserv's CPU).
        """
        kept = self._read_ahead.take(index)
        if kept is not None:
            return BytesIO(kept)
        return MessageChunks(self.database, self._ids[index], self._read_ahead.first(index))

    def commit(self, deleted: Sequence[int], retrieved: Sequence[int]) -> Deferred[None]:
        """
        Delete ``deleted`` and mark ``retrieved`` seen, and give the lease
        back, in one statement; :class:`~popserv.core.errors.CommitFailed`
        (nothing deleted) if the lease was lost.

        The lease goes with the commit (QUIT's UPDATE state ends the
        session) so that QUIT is answered once the maildrop is free: a
        client that logs in again at once finds it free, where a release
        sent after the answer raced its next login (``[IN-USE]``, a few
        sessions a second in the bench's B1).
        """
        ids = self._ids
        gone = set(deleted)
        doomed = array("q", (ids[i] for i in sorted(gone)))
        seen = self._listing.seen
        marks = array("q", (ids[i] for i in retrieved if i not in gone and not (seen and seen[i])))

        def done(count: int) -> None:
            self._given_back()
            if doomed or marks:
                log.info(
                    "Commit: {deleted} deleted, {marked} marked seen",
                    deleted=count,
                    marked=len(marks),
                )

        return self._job(
            lambda connection: queries.finish(
                connection, self.maildrop, self.owner, doomed, marks, shared=self.shared
            )
        ).addCallback(done)

    def _job(self, work: Callable[[Any], T]) -> Deferred[T]:
        """Run ``work`` on a connection, keeping the lease until it is over."""
        self._jobs += 1
        return self.database.run(work).addBoth(self._job_over)

    def _job_over(self, result: T) -> T:
        self._jobs -= 1
        if self._closed and not self._jobs:
            self._release()
        return result

    def _renew(self) -> Deferred[None]:
        asked = self._clock.seconds()

        def renewed(held: bool) -> None:
            if not held:
                self._lose("its lease on the maildrop was taken")
            elif self._deadline.active():
                self._deadline.reset(asked + self._lease * SAFE_PART - self._clock.seconds())

        def failed(failure: Failure) -> None:
            log.warn(
                "Cannot renew the lease on maildrop {id}: {error}",
                id=self.maildrop,
                error=failure.getErrorMessage(),
            )

        return self.database.run(
            lambda connection: queries.renew(
                connection, self.maildrop, self.owner, self._lease, shared=self.shared
            )
        ).addCallbacks(renewed, failed)

    def _running_out(self) -> None:
        part = self._lease * SAFE_PART
        self._lose(f"its lease on the maildrop could not be renewed for {part:.0f}s")

    def _lose(self, why: str) -> None:
        """
        Stop serving: before the lease can expire and another session (on any
        node) take the maildrop, so that two sessions never overlap.
        """
        if not self.leased or self._closed:
            return
        self.leased = False
        log.warn("Maildrop {id}: {why}", id=self.maildrop, why=why)
        if self._on_lost is not None:
            self._on_lost(why)

    def close(self) -> None:
        """Give the lease back (after a running commit); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._read_ahead.clear()
        if self._renewal.running:
            self._renewal.stop()
        if self._deadline.active():
            self._deadline.cancel()
        if not self._jobs:
            self._release()

    def _given_back(self) -> None:
        if self._renewal.running:
            self._renewal.stop()
        if self._deadline.active():
            self._deadline.cancel()
        if not self.released.called:
            self.released.callback(None)

    def _release(self) -> None:
        if self.released.called:
            return

        def failed(failure: Failure) -> None:
            # It expires by itself within the lease's length.
            log.info(
                "Cannot release maildrop {id}: {error}",
                id=self.maildrop,
                error=failure.getErrorMessage(),
            )

        self.database.run(
            lambda connection: queries.release(
                connection, self.maildrop, self.owner, shared=self.shared
            )
        ).addErrback(failed).addBoth(lambda _: self._given_back())
