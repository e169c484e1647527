"""
Shared maildrops in the PostgreSQL store (``--maildrop-lock shared``)
against a real PostgreSQL: several sessions at once, each with a lease of
its own, commits that delete and count only what is still there, and the
exclusive holders (an exclusive session, ``popserv migrate``) kept apart.
"""

from __future__ import annotations

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from popserv.core.errors import CommitFailed, LoginDelayed, MailboxInUse
from popserv.logins.database import Database
from popserv.stores.delivery import Recipient
from popserv.stores.postgres import queries
from popserv.stores.postgres.delivery import deliver_into
from popserv.stores.postgres.mailbox import PostgresMailbox
from popserv.stores.quota import Quota
from tests.support.postgres import store_database

MESSAGES = [b"Subject: %d\n\nbody %d\n" % (i, i) for i in range(6)]


class SharedStoreTests(TestCase):
    def setUp(self) -> None:
        self.url = store_database()
        self.database = Database(self.url, reactor)
        self.addCleanup(self.database.stop)
        for message in MESSAGES:
            self.deliver(message)

    def deliver(self, message: bytes) -> None:
        copies = [(Recipient("alice@example.org", "alice", None, Quota()), b"")]
        with psycopg.connect(self.url, autocommit=True) as connection:
            self.assertEqual(deliver_into(connection, copies, message, atomic=True), [None])

    def open(self, shared: bool = True, **options):
        return PostgresMailbox.open(self.database, "alice", shared=shared, **options)

    def query(self, sql: str) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as connection:
            return connection.execute(sql).fetchall()

    def counters(self) -> tuple[int, int]:
        """The maildrop's counters, and the same summed from its messages."""
        [(kept_messages, kept_octets)] = self.query(
            "SELECT messages, octets FROM popserv.maildrops WHERE name = 'alice'"
        )
        [(messages, octets)] = self.query(
            "SELECT count(*), coalesce(sum(octets), 0) FROM popserv.messages"
        )
        self.assertEqual((kept_messages, kept_octets), (messages, octets))
        return messages, octets

    async def test_sessions_at_once_each_with_its_lease(self) -> None:
        first, second = await self.open(client="192.0.2.1"), await self.open(client="192.0.2.2")
        self.assertEqual(list(first.listing().uids), list(second.listing().uids))
        rows = self.query('SELECT "user", client FROM popserv.sessions ORDER BY client')
        self.assertEqual(rows, [("alice", "192.0.2.1"), ("alice", "192.0.2.2")])
        # The maildrop's own, exclusive lease stays free.
        self.assertEqual(
            self.query("SELECT lock_owner FROM popserv.maildrops WHERE name = 'alice'"), [(None,)]
        )
        await gatherResults([first.commit([], []), second.commit([], [])])
        first.close()
        second.close()
        self.assertEqual(self.query("SELECT count(*) FROM popserv.sessions"), [(0,)])

    async def test_overlapping_deletions_counted_once(self) -> None:
        """Both delete 0-3 (and one also 4), at once: five gone, counted once each."""
        first, second = await self.open(), await self.open()
        self.deliver(b"Subject: after both listed\n\nkept\n")
        await gatherResults(
            [first.commit([0, 1, 2, 3], [5]), second.commit([3, 2, 1, 0, 4], [])]
        )
        first.close()
        second.close()
        self.assertEqual(self.counters()[0], 2)
        bodies = self.query("SELECT seen FROM popserv.messages ORDER BY id")
        self.assertEqual(bodies, [(True,), (False,)])

    async def test_many_sessions_deleting_the_same_messages(self) -> None:
        """Eight sessions, each deleting every message in another order: all gone, counters 0."""
        sessions = [await self.open() for _ in range(8)]
        orders = [list(range(6)) if i % 2 else list(reversed(range(6))) for i in range(8)]
        await gatherResults(
            [session.commit(order, []) for session, order in zip(sessions, orders, strict=True)]
        )
        for session in sessions:
            session.close()
        self.assertEqual(self.counters(), (0, 0))

    async def test_exclusive_holders_kept_apart(self) -> None:
        shared = await self.open()
        with self.assertRaises(MailboxInUse):
            await self.open(shared=False)
        with psycopg.connect(self.url, autocommit=True) as connection:
            self.assertRaises(
                MailboxInUse,
                queries.take, connection, "alice", owner="00000000-0000-0000-0000-000000000001",
                node="migrate", client="", lease=30, login_delay=0, login=False,
            )  # fmt: skip
        shared.close()
        await shared.released
        exclusive = await self.open(shared=False)
        with self.assertRaises(MailboxInUse):
            await self.open()
        exclusive.close()
        await exclusive.released
        (await self.open()).close()

    async def test_a_dead_sessions_lease_is_swept(self) -> None:
        """A lease left by a process that died lasts its length, then the next login drops it."""
        dead = await self.open(lease=30)
        dead._renewal.stop()
        dead._deadline.cancel()
        self.query_update(
            "UPDATE popserv.shared_sessions SET expires = now() - interval '1 second'"
        )
        self.assertEqual(self.query("SELECT count(*) FROM popserv.sessions"), [(0,)])
        alive = await self.open()
        self.assertEqual(self.query("SELECT count(*) FROM popserv.shared_sessions"), [(1,)])
        # The dead one's commit is fenced: its lease is gone.
        with self.assertRaises(CommitFailed):
            await dead.commit([0], [])
        alive.close()
        self.assertEqual(self.counters()[0], 6)

    def query_update(self, sql: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(sql)

    async def test_lost_lease_ends_the_session(self) -> None:
        ended: list[str] = []
        mailbox = await self.open(lease=0.6, on_lost=ended.append)
        self.query_update("DELETE FROM popserv.shared_sessions")
        while not ended:
            await self.wait(0.05)
        self.assertEqual(ended, ["its lease on the maildrop was taken"])
        mailbox.close()

    def wait(self, seconds: float):
        from twisted.internet.task import deferLater

        return deferLater(reactor, seconds, lambda: None)

    async def test_login_delay_holds_for_shared_sessions(self) -> None:
        first = await self.open(login_delay=60)
        with self.assertRaises(LoginDelayed):
            await self.open(login_delay=60)
        first.close()
