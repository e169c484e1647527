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

Shared (``--maildrop-lock shared``): each session has its own lease, a row
of ``shared_sessions``, and the maildrop's own lease stays free unless an
exclusive holder (``popserv migrate``) has it; a commit deletes what is
still there and counts only that, fenced by the session's own row.
"""

from __future__ import annotations

import itertools
import sys
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
    shared: bool = False,
) -> int:
    """
    Lease ``name``'s maildrop (created if missing) to ``owner``; return its id.
    MailboxInUse if another live lease holds it (an exclusive one, when
    ``shared``), LoginDelayed if its last login was less than
    ``login_delay`` seconds ago (nothing changed then).
    ``login`` false (``popserv migrate``): no login, so the last login's
    time is neither checked nor changed (a user would otherwise meet a
    LOGIN-DELAY the migration started).
    """
    with connection.transaction(), connection.cursor() as cursor:
        _maildrop_row(cursor, name)
        cursor.execute(
            "SELECT id, lock_owner IS NOT NULL AND lock_expires > now(),"
            " date_part('epoch', now() - last_login), EXISTS (SELECT FROM"
            " popserv.shared_sessions s WHERE s.maildrop = m.id AND s.expires > now())"
            " FROM popserv.maildrops m WHERE name = %s FOR NO KEY UPDATE",
            (name,),
        )
        maildrop, held, since, joined = cursor.fetchone()
        if held or (joined and not shared):
            raise MailboxInUse("the maildrop is leased to another session")
        if login and login_delay > 0 and since is not None and since < login_delay:
            raise LoginDelayed(f"{since:.0f}s since the last login")
        if shared:
            cursor.execute(_LAST_LOGIN, (maildrop,))
            cursor.execute(_JOIN, (owner, maildrop, node, client, lease))
            return int(maildrop)
        cursor.execute(
            "UPDATE popserv.maildrops SET lock_owner = %s, lock_node = %s, lock_client = %s,"
            " lock_since = now(), lock_expires = now() + make_interval(secs => %s),"
            " last_login = CASE WHEN %s THEN now() ELSE last_login END WHERE id = %s",
            (owner, node, client, lease, login, maildrop),
        )
        return int(maildrop)


_LAST_LOGIN = "UPDATE popserv.maildrops SET last_login = now() WHERE id = %s"
_JOIN = (
    "INSERT INTO popserv.shared_sessions (owner, maildrop, node, client, expires)"
    " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))"
)


#: The listing's columns, oldest message first (the order of the index),
#: each as one value: the numbers packed as big-endian int8 and float8
#: (``int8send``, ``float8send``), the UIDLs joined by newlines (never in
#: a UIDL: 0x21-0x7E only).  Python then unpacks 100,000 messages with a
#: few C calls (``array``, ``str.split``) where a row each cost 72 ms of
#: the server's CPU; a login on 100,000 messages: 160-200 -> 100-120 ms,
#: 72 -> 12 ms of popserv's CPU, 30-40 -> 40-50 ms of the database's
#: (bench/README.rst, "PostgreSQL store").  The aggregates read the rows
#: in the order of the sorted subquery, as PostgreSQL's documentation of
#: aggregates says they do (an ``ORDER BY`` inside each aggregate sorts
#: each column again: 150 ms).  All columns come from the same rows in the
#: same order whatever happens, so they always agree with each other.
_LISTING = (
    "SELECT {first}string_agg(int8send(id), ''), string_agg(uidl, E'\\n'),"
    " string_agg(int8send(wire_size), ''),"
    " string_agg(float8send(date_part('epoch', delivered)), ''), array_agg(seen)"
    " FROM (SELECT id, uidl, wire_size, delivered, seen FROM popserv.messages"
    " WHERE maildrop = {maildrop} ORDER BY id) listed"
)


def _unpacked(typecode: str, packed: bytes) -> array[Any]:
    numbers = array(typecode, packed)
    if sys.byteorder == "little":
        numbers.byteswap()
    return numbers


def _unpacked_listing(row: Sequence[Any]) -> tuple[array[int], Listing]:
    """The ids and the listing from :data:`_LISTING`'s one row (NULLs: no messages)."""
    if row[0] is None:
        return array("q"), Listing(uids=[], sizes=array("q"), received=array("d"), seen=[])
    packed_ids, uids, sizes, received, seen = row
    return _unpacked("q", packed_ids), Listing(
        uids=uids.split("\n"),
        sizes=_unpacked("q", sizes),
        received=_unpacked("d", received),
        seen=seen,
    )


def list_messages(connection: Any, maildrop: int) -> tuple[array[int], Listing]:
    """Every message of the maildrop, oldest first: one query on the listing index."""
    with connection.cursor(binary=True) as cursor:
        cursor.execute(_LISTING.format(first="", maildrop="%s"), (maildrop,))
        return _unpacked_listing(cursor.fetchone())


#: Take the lease when it is free (and the login not delayed) and list the
#: maildrop, in one statement: one round trip where :func:`take` then
#: :func:`list_messages` waited for six answers one after the other.  The
#: first column is the maildrop's id, NULL when the lease was not taken
#: (or the maildrop is missing): :func:`open_maildrop` sorts those out.
_TAKEN = "(SELECT id FROM taken)"
_TAKE_AND_LIST = (  # noqa: S608 (constants only: the values are parameters)
    "WITH taken AS (UPDATE popserv.maildrops SET lock_owner = %(owner)s,"
    " lock_node = %(node)s, lock_client = %(client)s, lock_since = now(),"
    " lock_expires = now() + make_interval(secs => %(lease)s), last_login = now()"
    " WHERE name = %(name)s"
    " AND NOT coalesce(lock_owner IS NOT NULL AND lock_expires > now(), false)"
    " AND NOT EXISTS (SELECT FROM popserv.shared_sessions s"
    " WHERE s.maildrop = maildrops.id AND s.expires > now())"
    " AND (%(delay)s <= 0 OR last_login IS NULL"
    " OR date_part('epoch', now() - last_login) >= %(delay)s)"
    " RETURNING id) {listing}"
).format(listing=_LISTING.format(first=_TAKEN + ", ", maildrop=_TAKEN))

#: The same for a shared session: the maildrop's last login recorded
#: unless it is held exclusively (or the login delayed), the session's own
#: lease added, the expired ones of sessions that died swept, and the
#: listing, in one statement.
_JOIN_AND_LIST = (  # noqa: S608 (constants only: the values are parameters)
    "WITH taken AS (UPDATE popserv.maildrops SET last_login = now()"
    " WHERE name = %(name)s"
    " AND NOT coalesce(lock_owner IS NOT NULL AND lock_expires > now(), false)"
    " AND (%(delay)s <= 0 OR last_login IS NULL"
    " OR date_part('epoch', now() - last_login) >= %(delay)s)"
    " RETURNING id),"
    " joined AS (INSERT INTO popserv.shared_sessions (owner, maildrop, node, client, expires)"
    " SELECT %(owner)s, id, %(node)s, %(client)s, now() + make_interval(secs => %(lease)s)"
    " FROM taken),"
    " swept AS (DELETE FROM popserv.shared_sessions"
    " WHERE maildrop = (SELECT id FROM taken) AND expires < now()) {listing}"
).format(listing=_LISTING.format(first=_TAKEN + ", ", maildrop=_TAKEN))


def open_maildrop(
    connection: Any,
    name: str,
    *,
    owner: str,
    node: str,
    client: str,
    lease: float,
    login_delay: int,
    shared: bool = False,
) -> Opened:
    """
    :func:`take` and :func:`list_messages`, with the same outcomes and
    errors, in one statement when the maildrop exists and is free (a
    login's usual case).
    """
    parameters = {
        "owner": owner,
        "node": node,
        "client": client,
        "lease": lease,
        "name": name,
        "delay": login_delay,
    }
    with connection.cursor(binary=True) as cursor:
        cursor.execute(_JOIN_AND_LIST if shared else _TAKE_AND_LIST, parameters)
        row = cursor.fetchone()
    if row[0] is not None:
        return Opened(int(row[0]), *_unpacked_listing(row[1:]))
    maildrop = take(
        connection, name, owner=owner, node=node, client=client, lease=lease,
        login_delay=login_delay, shared=shared,
    )  # fmt: skip
    try:
        ids, listing = list_messages(connection, maildrop)
    except BaseException:
        release(connection, maildrop, owner, shared=shared)
        raise
    return Opened(maildrop, ids, listing)


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


def renew(
    connection: Any, maildrop: int, owner: str, lease: float, *, shared: bool = False
) -> bool:
    """Extend ``owner``'s lease; False if it no longer holds one."""
    with connection.cursor() as cursor:
        if shared:
            cursor.execute(
                "UPDATE popserv.shared_sessions SET expires = now() + make_interval(secs => %s)"
                " WHERE owner = %s",
                (lease, owner),
            )
            return bool(cursor.rowcount)
        cursor.execute(
            "UPDATE popserv.maildrops SET lock_expires = now() + make_interval(secs => %s)"
            " WHERE id = %s AND lock_owner = %s",
            (lease, maildrop, owner),
        )
        return bool(cursor.rowcount)


def release(connection: Any, maildrop: int, owner: str, *, shared: bool = False) -> None:
    """Give ``owner``'s lease back (nothing if it no longer holds it)."""
    with connection.cursor() as cursor:
        if shared:
            cursor.execute("DELETE FROM popserv.shared_sessions WHERE owner = %s", (owner,))
            return
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


def read_messages(connection: Any, messages: Sequence[int]) -> dict[int, bytes]:
    """The first chunk of each of ``messages`` (all of a small one), by id; the missing left out."""
    with connection.cursor(binary=True) as cursor:
        cursor.execute(
            "SELECT message, data FROM popserv.message_chunks"
            " WHERE message = ANY(%s) AND seq = 0",
            (list(messages),),
        )
        return {row[0]: bytes(row[1]) for row in cursor}


def drop_maildrop(connection: Any, name: str) -> int:
    """Delete ``name``'s maildrop and every message in it; return how many there were."""
    with connection.transaction(), connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM popserv.maildrops WHERE name = %s RETURNING messages", (name,)
        )
        row = cursor.fetchone()
    return 0 if row is None else int(row[0])


#: A session's end in one statement (one round trip where it took six):
#: the lease checked first (the row locked); the deletions, the marks,
#: the counts' update and the lease given back only if it matched.  The
#: counts go down by what was deleted: a shared session's messages may
#: have been deleted by another since it listed them.
_FINISH = (
    "WITH lease AS ({lease}),"
    " gone AS (DELETE FROM popserv.messages WHERE maildrop = (SELECT id FROM lease)"
    " AND id = ANY(%(deleted)s) RETURNING octets),"
    " marked AS (UPDATE popserv.messages SET seen = true"
    " WHERE maildrop = (SELECT id FROM lease) AND id = ANY(%(seen)s) AND NOT seen)"
    " UPDATE popserv.maildrops SET"
    " octets = octets - (SELECT coalesce(sum(octets), 0) FROM gone),"
    " messages = messages - (SELECT count(*) FROM gone){release}"
    " WHERE id = (SELECT id FROM lease) RETURNING (SELECT count(*) FROM gone)"
)
#: The maildrop's own lease, given back with the counts.
_FINISH_EXCLUSIVE = _FINISH.format(
    lease="SELECT id FROM popserv.maildrops"
    " WHERE id = %(maildrop)s AND lock_owner = %(owner)s FOR NO KEY UPDATE",
    release=", lock_owner = NULL, lock_node = NULL, lock_client = NULL, lock_since = NULL,"
    " lock_expires = NULL",
)
#: A shared session's own lease, given back first.
_FINISH_SHARED = _FINISH.format(
    lease="DELETE FROM popserv.shared_sessions"
    " WHERE owner = %(owner)s AND maildrop = %(maildrop)s RETURNING maildrop AS id",
    release="",
)

#: Times a shared commit is tried when PostgreSQL ends it to break a
#: deadlock (two sessions deleting the same messages in another order).
_DEADLOCK_TRIES = 3


def finish(
    connection: Any,
    maildrop: int,
    owner: str,
    deleted: Sequence[int],
    seen: Sequence[int],
    *,
    shared: bool = False,
) -> int:
    """
    QUIT's commit: delete ``deleted`` and mark ``seen`` (message ids), only
    while ``owner`` holds the lease (CommitFailed, and nothing changed, if
    not), and give the lease back, all at once; how many were deleted.
    With nothing to change, only the release.
    """
    from psycopg.errors import DeadlockDetected

    parameters = {
        "maildrop": maildrop, "owner": owner, "deleted": list(deleted), "seen": list(seen)
    }  # fmt: skip
    with connection.cursor() as cursor:
        if not deleted and not seen:
            release(connection, maildrop, owner, shared=shared)
            return 0
        for tried in range(1, _DEADLOCK_TRIES + 1):
            try:
                cursor.execute(_FINISH_SHARED if shared else _FINISH_EXCLUSIVE, parameters)
                break
            except DeadlockDetected:
                if tried == _DEADLOCK_TRIES:
                    raise
        row = cursor.fetchone()
    if row is None:
        raise CommitFailed("the session's lease on the maildrop was lost")
    return int(row[0])


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
