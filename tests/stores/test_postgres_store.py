"""
The PostgreSQL mail store against a real PostgreSQL: the schema, delivery
with quotas enforced by the database, a session's lease, listing, reading in
chunks and the QUIT commit.
"""

from __future__ import annotations

import poplib
import threading
import time

import psycopg
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from popserv.core.body import wire_size
from popserv.core.errors import CommitFailed, LoginDelayed, MailboxInUse, MessageGone
from popserv.core.usernames import UsernameRules
from popserv.logins.database import Database, DatabaseUnavailable
from popserv.logins.passwords.checker import PasswdFileChecker
from popserv.logins.sqlaccounts import SQLAccounts
from popserv.server.factory import POP3Factory
from popserv.server.policy import Policy
from popserv.stores.delivery import MailboxFull, Recipient
from popserv.stores.postgres import queries
from popserv.stores.postgres.delivery import PostgresStore, deliver_into
from popserv.stores.postgres.mailbox import PostgresMailbox
from popserv.stores.postgres.realm import PostgresRealm
from popserv.stores.postgres.schema import VERSION, SchemaError, check, upgrade, version
from popserv.stores.quota import Quota
from tests.support.mailstores import read_all
from tests.support.postgres import postgresql, store_database


def recipient(user: str = "alice", quota: Quota | None = None) -> Recipient:
    return Recipient(f"{user}@example.org", user, None, quota or Quota())


class SchemaTests(TestCase):
    def test_init_upgrade_check(self) -> None:
        url = postgresql().database()
        with psycopg.connect(url, autocommit=True) as connection:
            self.assertIsNone(version(connection))
            self.assertRaises(SchemaError, check, connection)
            self.assertRaises(SchemaError, upgrade, connection, create=False)
            self.assertEqual(upgrade(connection), (None, VERSION))
            self.assertEqual(upgrade(connection), (VERSION, VERSION))
            check(connection)
            connection.execute("UPDATE popserv.version SET version = version + 1")
            with self.assertRaises(SchemaError) as caught:
                check(connection)
            self.assertIn("newer", str(caught.exception))


class StoreTests(TestCase):
    def setUp(self) -> None:
        self.url = store_database()
        self.database = Database(self.url, reactor)
        self.addCleanup(self.database.stop)
        self.store = PostgresStore(self.database)

    def deliver(self, message: bytes, *users: str, atomic: bool = True,
                quota: Quota | None = None) -> list:
        copies = [(recipient(user, quota), f"Delivered-To: {user}\n".encode()) for user in users]
        with psycopg.connect(self.url, autocommit=True) as connection:
            return deliver_into(connection, copies, message, atomic=atomic)

    def open(self, user: str = "alice", **options):
        return PostgresMailbox.open(self.database, user, **options)

    async def test_deliver_list_read_commit(self) -> None:
        big = b"".join(b"line %d\r\n" % i for i in range(300_000))  # ~3.5 MB, many chunks
        messages = [b"Subject: one\r\n\r\nbody\r\n", b"Subject: two\n\n.dot\nno end", big, b""]
        for message in messages:
            self.assertEqual(self.deliver(message, "alice"), [None])
        mailbox = await self.open()
        listing = mailbox.listing()
        stored = [b"Delivered-To: alice\n" + m.replace(b"\r\n", b"\n") for m in messages]
        self.assertEqual(list(listing.sizes), [wire_size(m) for m in stored])
        self.assertEqual(len(set(listing.uids)), 4)
        self.assertEqual(list(listing.seen), [False] * 4)
        for i, message in enumerate(stored):
            self.assertEqual(await read_all(mailbox, i), message)
        self.assertEqual(await read_all(mailbox, 2, 1000), stored[2])
        await mailbox.commit([0, 3], [1])
        mailbox.close()
        again = await self.open()
        self.assertEqual(list(again.listing().uids), [listing.uids[1], listing.uids[2]])
        self.assertEqual(list(again.listing().seen), [True, False])
        usage = await self.database.run(lambda c: queries.usage(c, "alice"))
        self.assertEqual((usage.bytes, usage.messages), (len(stored[1]) + len(stored[2]), 2))
        again.close()

    async def test_second_session_in_use_until_closed(self) -> None:
        first = await self.open()
        with self.assertRaises(MailboxInUse):
            await self.open()
        first.close()
        await first.released
        (await self.open()).close()

    async def test_commit_gives_the_lease_back(self) -> None:
        """
        Before QUIT's +OK, even with nothing to apply: a client that logs in
        again at once finds the maildrop free (its session's close comes
        later, and releases nothing more).
        """
        for deleted in ([], [0]):
            self.deliver(b"x\n", "alice")
            first = await self.open()
            await first.commit(deleted, [])
            second = await self.open()
            first.close()
            await first.released
            with self.assertRaises(MailboxInUse):
                await self.open()
            second.close()
            await second.released

    async def test_read_ahead_keeps_one_run(self) -> None:
        """A client skipping about keeps at most the latest run of read-ahead messages."""
        for i in range(130):
            self.deliver(b"Subject: %d\n\nbody\n" % i, "alice")
        mailbox = await self.open()
        for index in (0, 64, 128):
            await read_all(mailbox, index)
        kept = mailbox._read_ahead._kept
        self.assertEqual(sorted(kept), [129])
        mailbox.close()

    async def test_small_messages_read_ahead(self) -> None:
        """A RETR of a small message reads those after it at once, up to a big one."""
        small = [b"Subject: %d\n\nbody %d\n" % (i, i) for i in range(4)]
        big = b"z" * (3 * 256 * 1024)
        for message in [*small[:3], big, small[3]]:
            self.deliver(message, "alice")
        mailbox = await self.open()
        stored = [b"Delivered-To: alice\n" + m for m in (*small[:3], big, small[3])]
        self.assertEqual(await read_all(mailbox, 0), stored[0])
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute("DELETE FROM popserv.message_chunks")
        self.assertEqual(await read_all(mailbox, 2), stored[2])
        self.assertEqual(await read_all(mailbox, 1), stored[1])
        for beyond in (3, 4):
            with self.assertRaises(MessageGone):
                await read_all(mailbox, beyond)
        mailbox.close()

    async def test_lost_lease_deletes_nothing(self) -> None:
        """A lease that expired and was taken: the old session's commit refuses."""
        self.deliver(b"x\n", "alice")
        first = await self.open()
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute("UPDATE popserv.maildrops SET lock_expires = now() - interval '1s'")
        second = await self.open()
        with self.assertRaises(CommitFailed):
            await first.commit([0], [])
        first.close()
        self.assertEqual(len(second.listing()), 1)
        second.close()

    async def test_lease_taken_ends_the_session(self) -> None:
        """Another owner in the row: the next renewal finds it and the session is ended."""
        ended: list[str] = []
        mailbox = await self.open(lease=0.6, on_lost=ended.append)
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute("UPDATE popserv.maildrops SET lock_owner = gen_random_uuid()")
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(ended, ["its lease on the maildrop was taken"])
        self.assertFalse(mailbox.leased)
        mailbox.close()

    async def test_lease_not_renewed_ends_the_session_in_time(self) -> None:
        """
        The database away: the session ends at two thirds of the lease, before
        the lease expires and another session could take the maildrop.
        """
        ended: list[str] = []
        mailbox = await self.open(lease=1.5, on_lost=ended.append)
        server = postgresql()
        server.pause()
        try:
            await deferLater(reactor, 0.7, lambda: None)
            self.assertEqual(ended, [])
            await deferLater(reactor, 0.6, lambda: None)  # 1.3 s > 1.0 s
            self.assertEqual(ended, ["its lease on the maildrop could not be renewed for 1s"])
        finally:
            server.resume()
        mailbox.close()

    async def test_lease_renewed_keeps_the_session(self) -> None:
        ended: list[str] = []
        mailbox = await self.open(lease=0.6, on_lost=ended.append)
        await deferLater(reactor, 1.5, lambda: None)
        self.assertEqual(ended, [])
        self.assertTrue(mailbox.leased)
        mailbox.close()

    async def test_login_delay(self) -> None:
        first = await self.open(login_delay=60)
        first.close()
        await first.released
        with self.assertRaises(LoginDelayed):
            await self.open(login_delay=60)
        (await self.open(login_delay=0)).close()

    async def test_quota_holds_between_concurrent_deliveries(self) -> None:
        """Twenty deliveries at once for room for five: exactly five stored."""
        quota = Quota(bytes=None, messages=5)
        results: list = []
        barrier = threading.Barrier(20)

        def one() -> None:
            barrier.wait()
            results.extend(self.deliver(b"Subject: race\n\nbody\n", "alice", quota=quota))

        threads = [threading.Thread(target=one) for _ in range(20)]
        await deferToThread(lambda: [t.start() for t in threads] and [t.join() for t in threads])
        self.assertEqual(results.count(None), 5)
        self.assertTrue(all(isinstance(r, MailboxFull) for r in results if r is not None))
        mailbox = await self.open()
        self.assertEqual(len(mailbox.listing()), 5)
        mailbox.close()

    async def test_atomic_delivery_all_or_none(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as connection:
            with connection.transaction():
                queries.store(connection, "bob", iter([b"x" * 100]), uidl="u1")
        quota = Quota(bytes=150, messages=None)
        results = self.deliver(b"y" * 100, "alice", "bob", quota=quota)
        self.assertTrue(all(isinstance(r, MailboxFull) for r in results))
        mailbox = await self.open("alice")
        self.assertEqual(len(mailbox.listing()), 0)  # alice's copy was taken back
        mailbox.close()
        results = self.deliver(b"y" * 100, "alice", "bob", atomic=False, quota=quota)
        self.assertIsNone(results[0])
        self.assertIsInstance(results[1], MailboxFull)

    async def test_login_does_not_wait_for_a_delivery(self) -> None:
        """A delivery's transaction under way (a big message being written) leaves logins be."""
        with psycopg.connect(self.url, autocommit=True) as connection:
            with connection.transaction():
                queries.store(connection, "alice", iter([b"first\n"]), uidl="u1")
            delivery = connection.transaction()
            delivery.__enter__()
            try:
                queries.write(connection, "alice", iter([b"x" * 100_000]), uidl="u2")
                mailbox = await self.open()
                self.assertEqual(list(mailbox.listing().uids), ["u1"])
                mailbox.close()
            finally:
                delivery.__exit__(None, None, None)
    test_login_does_not_wait_for_a_delivery.timeout = 30  # type: ignore[attr-defined]

    async def test_check_room(self) -> None:
        quota = Quota(bytes=100, messages=None)
        await self.store.check_room(recipient(quota=quota), 50)
        self.deliver(b"z" * 80, "alice")
        with self.assertRaises(MailboxFull):
            await self.store.check_room(recipient(quota=quota), 50)

    async def test_message_gone(self) -> None:
        self.deliver(b"x\n", "alice")
        mailbox = await self.open()
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute("DELETE FROM popserv.messages")
        with self.assertRaises(MessageGone):
            await read_all(mailbox, 0)
        mailbox.close()

    async def test_database_away_and_back(self) -> None:
        """
        Down: a temporary failure at once; back: sessions open again at once,
        without a restart, however long it was away.
        """
        self.deliver(b"x\n", "alice")
        database = Database(self.url, reactor, wait=1.0)
        self.addCleanup(database.stop)
        store = PostgresStore(database)
        server = postgresql()
        server.pause()
        try:
            # Long enough for retries that back off (1, 2, 4, 8 s...) to be
            # seconds apart by now: one of them must not be what is waited for.
            deadline = reactor.seconds() + 8
            while reactor.seconds() < deadline:
                with self.assertRaises(DatabaseUnavailable):
                    await PostgresMailbox.open(database, "alice")
            results = await store.deliver([(recipient(), b"")], b"y\n", atomic=True)
            self.assertEqual([type(r).__name__ for r in results], ["DeliveryError"])
            self.assertEqual(results[0].reply, 451)
        finally:
            server.resume()
        mailbox = await PostgresMailbox.open(database, "alice")  # within its one second
        self.assertEqual(len(mailbox.listing()), 1)
        mailbox.close()


class LostLeaseSessionTests(TestCase):
    """A POP3 session whose lease is taken is ended: its DELE is not applied."""

    async def test_session_ended(self) -> None:
        url = store_database()
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("INSERT INTO mailbox (username, password) VALUES (%s, %s)",
                               ("alice@example.org", "{PLAIN}pw"))
            with connection.transaction():
                queries.store(connection, "alice@example.org", iter([b"x\n"]), uidl="u1")
        database = Database(url, reactor)
        self.addCleanup(database.stop)
        accounts = SQLAccounts(database, UsernameRules())
        checker = PasswdFileChecker(accounts, reactor=reactor)
        realm = PostgresRealm(database, accounts, reactor=reactor, lease=0.6, shared=False)
        factory = POP3Factory(Portal(realm, [checker]), Policy(hostname="pop.test"),
                              accounts=checker)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def session() -> bytes:
            client = poplib.POP3("127.0.0.1", port.getHost().port, timeout=10)
            client.user("alice@example.org")
            client.pass_("pw")
            client.dele(1)
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute("UPDATE popserv.maildrops SET lock_owner = gen_random_uuid()")
            time.sleep(1)
            try:
                return client.quit()
            except (poplib.error_proto, OSError) as e:
                return repr(e).encode()

        said = await deferToThread(session)
        # Not QUIT's refused commit (-ERR [SYS/TEMP]): the connection was closed.
        self.assertTrue(b"EOF" in said or b"Connection" in said, said)
        with psycopg.connect(url) as connection:
            count = connection.execute("SELECT count(*) FROM popserv.messages").fetchone()[0]
        self.assertEqual(count, 1)
