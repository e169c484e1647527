"""
The PostgreSQL mail store's tables, and how each version of popserv
creates or upgrades them (``popserv db init``, ``popserv db upgrade``).

Everything lives in a schema of its own, ``popserv``, so it can share a
database with Postfixadmin's tables.  Each step of :data:`MIGRATIONS` is
one transaction; ``popserv.version`` says how many have run.  A server
refuses to start on a schema it does not know (missing, or newer than it),
rather than guess.

- ``maildrops``: one row per user's maildrop, by the account's name, with
  what it holds (for quotas, kept in step by every delivery and commit),
  the lease a session holds on it and the time of its last login.
- ``messages``: one row per message: its UIDL, its stored and wire sizes,
  when it was delivered and whether it was retrieved.  The index on
  ``(maildrop, id)`` carries the listing's columns, so a login lists
  100,000 messages from the index alone.
- ``message_chunks``: each message's bytes (LF line ends, as in a
  Maildir file) in chunks of :data:`CHUNK_SIZE`, stored uncompressed
  (mail is mostly compressed already, and RETR should cost no CPU to
  unpack), so RETR reads a message a few chunks at a time.

Cluster state (version 2):

- ``login_failures``: failed logins by client and user name tried, so
  the failed-login penalty holds whichever node a client tries.
- ``sessions``: a view of the live leases, by node, user, client and
  start time: who is logged in where.

Shared maildrops (version 3):

- ``shared_sessions``: one row per session holding a maildrop shared
  (``--maildrop-lock shared``), with its own lease; the maildrop's
  exclusive lease columns stay free, and ``sessions`` lists both kinds.
"""

from __future__ import annotations

from typing import Any

#: Octets of a message per ``message_chunks`` row.
CHUNK_SIZE = 256 * 1024

#: Each step's statements, run in one transaction; step N takes the schema
#: to version N.  Never edit a step that was released: add one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE SCHEMA IF NOT EXISTS popserv",
        "CREATE TABLE popserv.version (version integer NOT NULL)",
        "INSERT INTO popserv.version VALUES (0)",
        """
        CREATE TABLE popserv.maildrops (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name text NOT NULL UNIQUE,
            octets bigint NOT NULL DEFAULT 0,
            messages bigint NOT NULL DEFAULT 0,
            lock_owner uuid,
            lock_node text,
            lock_client text,
            lock_since timestamptz,
            lock_expires timestamptz,
            last_login timestamptz
        )
        """,
        """
        CREATE TABLE popserv.messages (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            maildrop bigint NOT NULL REFERENCES popserv.maildrops ON DELETE CASCADE,
            uidl text NOT NULL,
            octets bigint NOT NULL,
            wire_size bigint NOT NULL,
            delivered timestamptz NOT NULL DEFAULT now(),
            seen boolean NOT NULL DEFAULT false,
            UNIQUE (maildrop, uidl)
        )
        """,
        "CREATE INDEX messages_listing ON popserv.messages (maildrop, id)"
        " INCLUDE (uidl, wire_size, delivered, seen)",
        """
        CREATE TABLE popserv.message_chunks (
            message bigint NOT NULL REFERENCES popserv.messages ON DELETE CASCADE,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (message, seq)
        )
        """,
        "ALTER TABLE popserv.message_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
    ),
    (
        """
        CREATE TABLE popserv.login_failures (
            client text NOT NULL,
            username text NOT NULL,
            failures integer NOT NULL,
            last timestamptz NOT NULL,
            PRIMARY KEY (client, username)
        )
        """,
        "CREATE INDEX login_failures_last ON popserv.login_failures (last)",
        """
        CREATE VIEW popserv.sessions AS
            SELECT lock_node AS node, name AS "user", lock_client AS client,
                   lock_since AS since, lock_expires AS expires
              FROM popserv.maildrops
             WHERE lock_owner IS NOT NULL AND lock_expires > now()
        """,
    ),
    (
        """
        CREATE TABLE popserv.shared_sessions (
            owner uuid PRIMARY KEY,
            maildrop bigint NOT NULL REFERENCES popserv.maildrops (id) ON DELETE CASCADE,
            node text NOT NULL,
            client text NOT NULL,
            since timestamptz NOT NULL DEFAULT now(),
            expires timestamptz NOT NULL
        )
        """,
        "CREATE INDEX shared_sessions_maildrop ON popserv.shared_sessions (maildrop, expires)",
        """
        CREATE OR REPLACE VIEW popserv.sessions AS
            SELECT lock_node AS node, name AS "user", lock_client AS client,
                   lock_since AS since, lock_expires AS expires
              FROM popserv.maildrops
             WHERE lock_owner IS NOT NULL AND lock_expires > now()
            UNION ALL
            SELECT s.node, m.name, s.client, s.since, s.expires
              FROM popserv.shared_sessions s JOIN popserv.maildrops m ON m.id = s.maildrop
             WHERE s.expires > now()
        """,
    ),
)

#: The version this popserv reads and writes.
VERSION = len(MIGRATIONS)


class SchemaError(Exception):
    """The database's schema is missing, too old or too new for this popserv."""


def version(connection: Any) -> int | None:
    """The schema version the database holds; None if popserv's tables are not there."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('popserv.version') IS NOT NULL")
        (exists,) = cursor.fetchone()
        if not exists:
            return None
        cursor.execute("SELECT version FROM popserv.version")
        row = cursor.fetchone()
        return None if row is None else int(row[0])


def upgrade(connection: Any, *, create: bool = True) -> tuple[int | None, int]:
    """
    Bring the schema to :data:`VERSION`, one transaction per step; return
    the versions before and after.  With ``create`` false (``db upgrade``)
    a database without popserv's tables is an error, not a new store.
    """
    before = version(connection)
    if before is None and not create:
        raise SchemaError("the database has no popserv tables: run `popserv db init` first")
    current = before or 0
    if current > VERSION:
        raise SchemaError(too_new(current))
    for step in range(current, VERSION):
        with connection.transaction(), connection.cursor() as cursor:
            # Two upgrades at once: the second waits here, then finds
            # the step done.
            if step:
                cursor.execute("LOCK TABLE popserv.version")
                cursor.execute("SELECT version FROM popserv.version")
                if cursor.fetchone()[0] != step:
                    continue
            for statement in MIGRATIONS[step]:
                cursor.execute(statement)
            cursor.execute("UPDATE popserv.version SET version = %s", (step + 1,))
    return before, VERSION


def too_new(found: int) -> str:
    return (
        f"the database's popserv schema is version {found}, newer than this popserv"
        f" knows ({VERSION}): upgrade popserv"
    )


def check(connection: Any) -> None:
    """Raise :class:`SchemaError` unless the schema is exactly :data:`VERSION`."""
    found = version(connection)
    if found is None:
        raise SchemaError("the database has no popserv tables: run `popserv db init`")
    if found < VERSION:
        raise SchemaError(
            f"the database's popserv schema is version {found}, this popserv needs {VERSION}:"
            " run `popserv db upgrade`"
        )
    if found > VERSION:
        raise SchemaError(too_new(found))
