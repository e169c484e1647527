"""
Delivery into the PostgreSQL store: every way in (SMTP, LMTP, ``popserv
deliver``) stores through :func:`deliver_into`, and a message is
acknowledged only once its transaction has committed.

The quota is the database's to enforce: the statement that counts a
message into its maildrop checks that it fits, with the row locked, so two
deliveries at once cannot both squeeze past it (see
:func:`popserv.stores.postgres.queries.store`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from popserv.logins.database import Database, DatabaseUnavailable
from popserv.logins.passwords.passwdfile import UserEntry
from popserv.stores.delivery import DeliveryError, MailboxFull, Recipient, refuse_if_full
from popserv.stores.maildir.deliver import chunks_of, lf_chunks
from popserv.stores.maildir.names import make_unique, uidl_for
from popserv.stores.postgres import queries

log = Logger()


def new_uidl() -> str:
    """
    A new message's UIDL: a Maildir unique name (time, process, counter,
    random part, host), so a message moved to a Maildir keeps it as its
    file name, and its UIDL with it.
    """
    return uidl_for(make_unique(None, None))


def deliver_into(
    connection: Any,
    copies: Sequence[tuple[Recipient, bytes]],
    message: bytes | BinaryIO,
    *,
    atomic: bool,
) -> list[DeliveryError | None]:
    """
    Store ``message`` once per distinct user in ``copies`` (each a recipient
    and its trace header); per copy, None when stored or the refusal.

    ``atomic`` (SMTP): one transaction for all, every copy stored or none.
    Otherwise (LMTP, the CLI) one transaction per user.  Blocking.
    """
    import psycopg

    first_of: dict[str, int] = {}
    for i, (recipient, _) in enumerate(copies):
        first_of.setdefault(recipient.user, i)
    results: dict[str, DeliveryError | None] = {}

    def write(i: int) -> queries.Written:
        recipient, header = copies[i]
        if not isinstance(message, bytes):
            message.seek(0)  # each copy reads the spool from its start
        chunks = lf_chunks(itertools.chain((header,), chunks_of(message)))
        return queries.write(connection, recipient.user, chunks, uidl=new_uidl())

    def refusal(error: Exception, user: str) -> DeliveryError:
        if isinstance(error, queries.QuotaExceeded):
            return MailboxFull(user)
        log.error(
            "Delivery to {user} failed: {error}", user=user, error=" ".join(str(error).split())
        )
        return DeliveryError()

    targets = sorted(first_of.items())  # one order of row locks, whoever delivers
    if atomic:
        # Every copy written first, then counted in: the maildrops' rows
        # are locked only for the last moment of the transaction.
        current = targets[0][1]
        try:
            with connection.transaction():
                written = []
                for _, current in targets:
                    written.append((write(current), current))
                for done, current in written:
                    queries.count_in(connection, done, copies[current][0].quota)
        except (queries.QuotaExceeded, psycopg.Error) as e:
            failed = refusal(e, copies[current][0].user)
            return [failed] * len(copies)
        return [None] * len(copies)
    for user, i in targets:
        try:
            with connection.transaction():
                queries.count_in(connection, write(i), copies[i][0].quota)
            results[user] = None
        except (queries.QuotaExceeded, psycopg.Error) as e:
            results[user] = refusal(e, user)
    return [results[recipient.user] for recipient, _ in copies]


class PostgresStore:
    """Where the receiver stores mail when the store is PostgreSQL."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def place(self, entry: UserEntry) -> None:
        """Maildrops are known by the account's name: no path to find."""

    def check_room(self, recipient: Recipient, incoming: int = 0) -> Deferred[None]:
        """Fail with MailboxFull if ``incoming`` octets would not fit now (RCPT, SIZE)."""

        def check(connection: Any) -> None:
            refuse_if_full(recipient, queries.usage(connection, recipient.user), incoming)

        return self.database.run(check)

    def deliver(
        self, copies: Sequence[tuple[Recipient, bytes]], message: bytes | BinaryIO, *, atomic: bool
    ) -> Deferred[list[DeliveryError | None]]:
        def work(connection: Any) -> list[DeliveryError | None]:
            return deliver_into(connection, copies, message, atomic=atomic)

        def unavailable(failure: Any) -> list[DeliveryError | None]:
            failure.trap(DatabaseUnavailable)
            return [DeliveryError()] * len(copies)

        return self.database.run(work).addErrback(unavailable)


__all__ = ["PostgresStore", "deliver_into", "new_uidl"]
