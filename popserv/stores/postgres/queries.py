"""
The PostgreSQL mail store's queries (blocking: each function takes a
psycopg connection and runs in one of the database's threads).

Leases: a session holds its maildrop by writing a random owner id and an
expiry time into the maildrop's row, and renews it while it runs.  Another
session may take the maildrop only once the lease is released or expired,
so a process that dies releases its users within the lease's length.  A
commit deletes only while the row still names its owner, in the same
transaction (the row locked), so a session that lost its lease can never
delete from a maildrop another session holds.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from attrs import frozen

from popserv.core.body import WireSizeCounter
from popserv.core.errors import CommitFailed, LoginDelayed, MailboxInUse
from popserv.interfaces import Listing
from popserv.stores.postgres.schema import CHUNK_SIZE
from popserv.stores.quota import Quota, Usage

#: Chunks one RETR read fetches at once (about a MiB).
CHUNKS_PER_READ = 4


@frozen
class Opened:
    """A maildrop leased to a session, and its messages' ids in listing order."""

    maildrop: int
    ids: Sequence[int]
    listing: Listing


def _maildrop_row(cursor: Any, name: str) -> None:
    cursor.execute(
        "INSERT INTO popserv.maildrops (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (name,)
    )


def take(
    connection: Any,
    name: str,
    *,
    owner: str,
    node: str,
    client: str,
    lease: float,
    login_delay: int,
    login: bool = True,
) -> int:
    """
    Lease ``name``'s maildrop (created if missing) to ``owner``; return its id.
    MailboxInUse if another live lease holds it, LoginDelayed if its last
    login was less than ``login_delay`` seconds ago (nothing changed then).
    ``login`` false (``popserv migrate``): no login, so the last login's
    time is neither checked nor changed (a user would otherwise meet a
    LOGIN-DELAY the migration started).
    """
    with connection.transaction(), connection.cursor() as cursor:
        _maildrop_row(cursor, name)
        cursor.execute(
            "SELECT id, lock_owner IS NOT NULL AND lock_expires > now(),"
            " date_part('epoch', now() - last_login)"
            " FROM popserv.maildrops WHERE name = %s FOR NO KEY UPDATE",
            (name,),
        )
        maildrop, held, since = cursor.fetchone()
        if held:
            raise MailboxInUse("the maildrop is leased to another session")
        if login and login_delay > 0 and since is not None and since < login_delay:
            raise LoginDelayed(f"{since:.0f}s since the last login")
        cursor.execute(
            "UPDATE popserv.maildrops SET lock_owner = %s, lock_node = %s, lock_client = %s,"
            " lock_since = now(), lock_expires = now() + make_interval(secs => %s),"
            " last_login = CASE WHEN %s THEN now() ELSE last_login END WHERE id = %s",
            (owner, node, client, lease, login, maildrop),
        )
        return int(maildrop)


def list_messages(connection: Any, maildrop: int) -> tuple[array[int], Listing]:
    """Every message of the maildrop, oldest first: one query on the listing index."""
    ids: array[int] = array("q")
    uids: list[str] = []
    sizes: array[int] = array("q")
    received: array[float] = array("d")
    seen: list[bool] = []
    with connection.cursor(binary=True) as cursor:
        cursor.execute(
            "SELECT id, uidl, wire_size, date_part('epoch', delivered), seen"
            " FROM popserv.messages WHERE maildrop = %s ORDER BY id",
            (maildrop,),
        )
        for row in cursor:
            ids.append(row[0])
            uids.append(row[1])
            sizes.append(row[2])
            received.append(row[3])
            seen.append(row[4])
    return ids, Listing(uids=uids, sizes=sizes, received=received, seen=seen)


class Stored(NamedTuple):
    """One stored message as :func:`stored_messages` lists it."""

    id: int
    uidl: str
    octets: int
    wire_size: int
    delivered: float
    seen: bool


def maildrop_of(connection: Any, name: str) -> int | None:
    """The id of ``name``'s maildrop, None if it has none (nothing is created)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM popserv.maildrops WHERE name = %s", (name,))
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def stored_messages(connection: Any, maildrop: int) -> list[Stored]:
    """
    Every message of the maildrop with its stored size too, oldest first
    (``popserv migrate``; a login lists with :func:`list_messages`).
    """
    with connection.cursor(binary=True) as cursor:
        cursor.execute(
            "SELECT id, uidl, octets, wire_size, date_part('epoch', delivered), seen"
            " FROM popserv.messages WHERE maildrop = %s ORDER BY id",
            (maildrop,),
        )
        return [Stored(*row) for row in cursor]


def renew(connection: Any, maildrop: int, owner: str, lease: float) -> bool:
    """Extend ``owner``'s lease; False if it no longer holds one."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE popserv.maildrops SET lock_expires = now() + make_interval(secs => %s)"
            " WHERE id = %s AND lock_owner = %s",
            (lease, maildrop, owner),
        )
        return bool(cursor.rowcount)


def release(connection: Any, maildrop: int, owner: str) -> None:
    with connection.cursor() as cursor:
        release_lease(cursor, maildrop, owner)


def release_lease(cursor: Any, maildrop: int, owner: str) -> None:
    cursor.execute(
        "UPDATE popserv.maildrops SET lock_owner = NULL, lock_node = NULL,"
        " lock_client = NULL, lock_since = NULL, lock_expires = NULL"
        " WHERE id = %s AND lock_owner = %s",
        (maildrop, owner),
    )


def read_chunks(connection: Any, message: int, first: int, count: int) -> list[bytes]:
    """Chunks ``first`` to ``first + count - 1`` of a message (fewer at its end)."""
    with connection.cursor(binary=True) as cursor:
        cursor.execute(
            "SELECT data FROM popserv.message_chunks WHERE message = %s AND seq >= %s"
            " ORDER BY seq LIMIT %s",
            (message, first, count),
        )
        return [bytes(row[0]) for row in cursor]


def commit(
    connection: Any,
    maildrop: int,
    owner: str,
    deleted: Sequence[int],
    seen: Sequence[int],
    *,
    release: bool = False,
) -> int:
    """
    Delete ``deleted`` and mark ``seen`` (message ids) in one transaction,
    only while ``owner`` holds the lease; return how many were deleted.
    With ``release``, give the lease back in the same transaction.
    """
    with connection.transaction(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM popserv.maildrops WHERE id = %s AND lock_owner = %s"
            " FOR NO KEY UPDATE",
            (maildrop, owner),
        )
        if cursor.fetchone() is None:
            if not deleted and not seen:
                return 0  # nothing to apply, and no lease to give back
            raise CommitFailed("the session's lease on the maildrop was lost")
        gone = 0
        if deleted:
            cursor.execute(
                "WITH gone AS (DELETE FROM popserv.messages WHERE maildrop = %s AND id = ANY(%s)"
                " RETURNING octets)"
                " UPDATE popserv.maildrops SET"
                " octets = octets - (SELECT coalesce(sum(octets), 0) FROM gone),"
                " messages = messages - (SELECT count(*) FROM gone)"
                " WHERE id = %s RETURNING (SELECT count(*) FROM gone)",
                (maildrop, list(deleted), maildrop),
            )
            gone = int(cursor.fetchone()[0])
        if seen:
            cursor.execute(
                "UPDATE popserv.messages SET seen = true"
                " WHERE maildrop = %s AND id = ANY(%s) AND NOT seen",
                (maildrop, list(seen)),
            )
        if release:
            release_lease(cursor, maildrop, owner)
        return gone


def drop_maildrop(connection: Any, name: str) -> int:
    """Delete ``name``'s maildrop and every message in it; return how many there were."""
    with connection.transaction(), connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM popserv.maildrops WHERE name = %s RETURNING messages", (name,)
        )
        row = cursor.fetchone()
    return 0 if row is None else int(row[0])


def usage(connection: Any, name: str) -> Usage:
    """What ``name``'s maildrop holds (nothing if it has none yet)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT octets, messages FROM popserv.maildrops WHERE name = %s", (name,))
        row = cursor.fetchone()
    return Usage(0, 0) if row is None else Usage(int(row[0]), int(row[1]))


def _rechunked(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """``chunks`` joined and cut into :data:`CHUNK_SIZE` pieces (the last shorter)."""
    buffer = bytearray()
    empty = True
    for chunk in chunks:
        empty = False
        buffer += chunk
        while len(buffer) >= CHUNK_SIZE:
            yield bytes(buffer[:CHUNK_SIZE])
            del buffer[:CHUNK_SIZE]
    if buffer or empty:
        yield bytes(buffer)  # an empty message is one empty chunk: it exists


class QuotaExceeded(Exception):
    """The message does not fit the maildrop's quota (the transaction is undone)."""


@frozen
class Written:
    """A message written within a transaction, not yet counted into its maildrop."""

    message: int
    maildrop: int
    name: str
    octets: int


def write(
    connection: Any,
    name: str,
    chunks: Iterable[bytes],
    *,
    uidl: str,
    delivered: float | None = None,
    seen: bool = False,
) -> Written:
    """
    Write one message (``chunks``, already with LF line ends) into ``name``'s
    maildrop (created if missing), within the caller's transaction, without
    locking the maildrop's row: a login meanwhile does not wait for it.
    Then :func:`count_in`.
    """
    with connection.cursor() as cursor:
        _maildrop_row(cursor, name)
        cursor.execute(
            "INSERT INTO popserv.messages (maildrop, uidl, octets, wire_size, delivered, seen)"
            " SELECT id, %s, 0, 0, coalesce(to_timestamp(%s), now()), %s"
            " FROM popserv.maildrops WHERE name = %s RETURNING id, maildrop",
            (uidl, delivered, seen, name),
        )
        message, maildrop = cursor.fetchone()
        counter = WireSizeCounter()
        octets = 0
        seqs = itertools.count()
        with cursor.copy(
            "COPY popserv.message_chunks (message, seq, data) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "int4", "bytea"])
            for data in _rechunked(chunks):
                counter.feed(data)
                octets += len(data)
                copy.write_row((message, next(seqs), data))
        cursor.execute(
            "UPDATE popserv.messages SET octets = %s, wire_size = %s WHERE id = %s",
            (octets, counter.result(), message),
        )
    return Written(int(message), int(maildrop), name, octets)


def count_in(connection: Any, written: Written, quota: Quota | None = None) -> None:
    """
    Count a written message into its maildrop, if it fits the quota: one
    statement checks and counts with the row locked (until the caller's
    transaction ends, so call it last), and two deliveries cannot both
    pass.  QuotaExceeded if it does not fit; the caller rolls back.
    """
    quota = quota or Quota()
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE popserv.maildrops SET octets = octets + %(octets)s, messages = messages + 1"
            " WHERE id = %(maildrop)s"
            " AND (%(max_octets)s::bigint IS NULL OR octets + %(octets)s <= %(max_octets)s)"
            " AND (%(max_messages)s::bigint IS NULL OR messages + 1 <= %(max_messages)s)",
            {
                "octets": written.octets,
                "maildrop": written.maildrop,
                "max_octets": quota.bytes,
                "max_messages": quota.messages,
            },
        )
        if not cursor.rowcount:
            raise QuotaExceeded(written.name)


def store(
    connection: Any,
    name: str,
    chunks: Iterable[bytes],
    *,
    uidl: str,
    quota: Quota | None = None,
    delivered: float | None = None,
    seen: bool = False,
) -> int:
    """:func:`write` then :func:`count_in` one message, within the caller's transaction."""
    written = write(connection, name, chunks, uidl=uidl, delivered=delivered, seen=seen)
    count_in(connection, written, quota)
    return written.message
