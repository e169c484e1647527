"""
The failed-login penalty shared by nodes through a real PostgreSQL: two
admissions on one database stand for two nodes behind a load balancer.
"""

from __future__ import annotations

import psycopg
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from popserv.logins.database import Database
from popserv.server import sharedadmission
from popserv.server.policy import Policy
from popserv.server.sharedadmission import SharedAdmission
from tests.support.postgres import postgresql, store_database

CLIENT = "198.51.100.7"


class SharedPenaltyTests(TestCase):
    def setUp(self) -> None:
        # Every turn reads the database, unless a test says otherwise.
        self.patch(sharedadmission, "READ_AGAIN_AFTER", 0.0)
        self.url = store_database()
        self.policy = Policy(hostname="pop.test", auth_failure_delay=0.01,
                             auth_failure_max_delay=0.08)
        self.nodes = []
        for _ in range(2):
            database = Database(self.url, reactor)
            self.addCleanup(database.stop)
            self.nodes.append(SharedAdmission(self.policy, reactor, database))

    async def fail(self, node: SharedAdmission, user: str) -> float:
        turn = await node.login_turn(CLIENT)
        return await turn.failed(user)

    async def test_failures_on_one_node_count_on_the_other(self) -> None:
        a, b = self.nodes
        dues = [await self.fail(a, "alice"), await self.fail(a, "bob"), await self.fail(a, "bob")]
        self.assertEqual(dues, [0.01, 0.02, 0.04])
        turn = await b.login_turn(CLIENT)  # waits b's penalty for 3 failures first
        self.assertEqual(b.penalties.failures(CLIENT), 3)
        self.assertEqual(await turn.failed("carol"), 0.08)  # the fourth, counted once
        turn = await a.login_turn(CLIENT)
        self.assertEqual(a.penalties.failures(CLIENT), 4)
        # bob logs in on a: his two failures are forgiven everywhere, not the others'.
        turn.succeeded("bob")
        await a.database.run(lambda c: None)
        turn = await b.login_turn(CLIENT)
        self.assertEqual(b.penalties.failures(CLIENT), 2)
        turn.succeeded("alice")
        with psycopg.connect(self.url) as connection:
            rows = connection.execute(
                "SELECT username, failures FROM popserv.login_failures").fetchall()
        self.assertEqual(rows, [("carol", 1)])

    async def test_read_at_most_once_a_second(self) -> None:
        """A client's count is read again only after a second: other nodes' failures then."""
        self.patch(sharedadmission, "READ_AGAIN_AFTER", 1.0)
        a, b = self.nodes
        (await b.login_turn(CLIENT)).succeeded("alice")  # read: none
        await self.fail(a, "bob")
        turn = await b.login_turn(CLIENT)
        self.assertEqual(b.penalties.failures(CLIENT), 0)  # within the second
        turn.succeeded("carol")
        await deferLater(reactor, 1.05, lambda: None)
        turn = await b.login_turn(CLIENT)
        self.assertEqual(b.penalties.failures(CLIENT), 1)
        turn.succeeded("carol")

    async def test_other_clients_untouched(self) -> None:
        a, b = self.nodes
        await self.fail(a, "alice")
        turn = await b.login_turn("203.0.113.9")
        self.assertEqual(b.penalties.failures("203.0.113.9"), 0)
        turn.succeeded("alice")

    async def test_database_away_counts_locally(self) -> None:
        """No database: logins go on, each node counting its own failures."""
        a, _ = self.nodes
        await self.fail(a, "alice")
        server = postgresql()
        server.pause()
        try:
            turn = await a.login_turn(CLIENT)
            self.assertEqual(await turn.failed("alice"), 0.02)
        finally:
            server.resume()
