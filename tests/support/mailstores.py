"""
What a POP3 session of each store would see: the listing (UIDLs, sizes,
delivery times, seen flags, in order) and every message as RETR sends it,
for tests that compare two stores (``popserv migrate``).
"""

from __future__ import annotations

from pathlib import Path

from attrs import frozen
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater

from popserv.core.body import BodyEncoder
from popserv.interfaces import MessageStream
from popserv.logins.database import Database
from popserv.stores.maildir import MaildirMailbox
from popserv.stores.postgres.mailbox import PostgresMailbox
from tests.support.maildirs import SYNC


def on_the_wire(stored: bytes) -> bytes:
    """What RETR sends for a message stored as ``stored`` (CRLF, byte-stuffed, ``.``)."""
    encoder = BodyEncoder()
    return encoder.feed(stored) + encoder.finish()


@frozen
class Seen:
    """A maildrop as a session lists and reads it."""

    uids: list[str]
    sizes: list[int]
    received: list[float]
    seen: list[bool]
    contents: list[bytes]


def maildir_seen(path: Path, uidl_format: str = "dovecot") -> Seen:
    """The Maildir at ``path`` as the Maildir store serves it (synchronously)."""
    mailboxes: list[MaildirMailbox] = []
    failures: list[object] = []
    MaildirMailbox.open(path, reactor=SYNC, uidl_format=uidl_format).addCallbacks(
        mailboxes.append, failures.append
    )
    if failures:
        failures[0].raiseException()  # type: ignore[attr-defined]
    (mailbox,) = mailboxes
    try:
        listing = mailbox.listing()
        contents = []
        for index in range(len(listing)):
            opened: list[MessageStream] = []
            maybeDeferred(mailbox.open_message, index).addCallback(opened.append)
            with opened[0] as stream:
                contents.append(on_the_wire(stream.read()))
        return Seen(
            list(listing.uids),
            list(listing.sizes),
            list(listing.received or ()),
            list(listing.seen or ()),
            contents,
        )
    finally:
        mailbox.close()


async def read_all(mailbox: PostgresMailbox, index: int, size: int = 65536) -> bytes:
    """A message whole, read as the server does: a chunk source, or a stream read at once."""
    source = mailbox.open_message(index)
    parts = []
    while True:
        chunk = source.read(size)
        if isinstance(chunk, Deferred):
            chunk = await chunk
        if not chunk:
            break
        parts.append(chunk)
    source.close()
    return b"".join(parts)


async def postgres_seen(database: Database, user: str) -> Seen:
    """``user``'s maildrop as the PostgreSQL store serves it; the lease given back."""
    mailbox = await PostgresMailbox.open(database, user)
    try:
        listing = mailbox.listing()
        contents = [on_the_wire(await read_all(mailbox, i)) for i in range(len(listing))]
    finally:
        mailbox.close()
        await released(database)
    return Seen(
        list(listing.uids),
        list(listing.sizes),
        list(listing.received or ()),
        list(listing.seen or ()),
        contents,
    )


async def released(database: Database, timeout: float = 10.0) -> None:
    """Wait until no lease holds any maildrop (a closed session's release runs later)."""

    def held(connection: object) -> int:
        row = connection.execute(  # type: ignore[attr-defined]
            "SELECT count(*) FROM popserv.maildrops WHERE lock_owner IS NOT NULL"
        ).fetchone()
        return int(row[0])

    for _ in range(int(timeout / 0.02)):
        if not await database.run(held):
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("a maildrop lease was not released")
