"""
Two sessions of one user at once (``--maildrop-lock``), over loopback with
poplib, on Maildirs and on the PostgreSQL store.

Shared (the default): each session sees its maildrop as it was at its
login; at QUIT its deletions remove the messages still there, one another
session removed already is no error, and nothing is ever removed that no
QUIT asked for.  Exclusive: the second session gets ``-ERR [IN-USE]``.
"""

from __future__ import annotations

import os
import poplib

from popserv.core import errors, wire
from popserv.logins.passwords import hash_password
from tests.support.servers import PostgresServer, ServerTestCase, command, login

NEW = b"Subject: delivered between\r\n\r\nwhile two sessions were open\r\n"


def uidls(client: poplib.POP3) -> list[str]:
    return [line.split()[1].decode() for line in client.uidl()[1]]


def sizes(client: poplib.POP3) -> list[int]:
    return [int(line.split()[1]) for line in client.list()[1]]


class SharedTests(ServerTestCase):
    """The default, ``--maildrop-lock shared``."""

    def session(self) -> poplib.POP3:
        client = self.pop()
        answer = login(client, "alice", "secret")
        assert answer.startswith(b"+OK"), answer
        return client

    async def test_both_log_in_and_see_the_same_snapshot(self):
        def sessions():
            first, second = self.session(), self.session()
            seen = (uidls(first), sizes(first), uidls(second), sizes(second))
            first.quit()
            second.quit()
            return seen

        first_uids, first_sizes, second_uids, second_sizes = await self.run_in_thread(sessions)
        self.assertEqual(len(first_uids), 4)
        self.assertEqual((first_uids, first_sizes), (second_uids, second_sizes))
        self.assertEqual(sorted(first_uids), self.stored_uids())

    async def test_interleaved_deletions_and_a_delivery(self):
        """
        A deletes 1 and quits; a message is delivered; B, listed before both,
        still sees its own four, cannot read the one A deleted, deletes 1 and
        2 and quits: 1 (gone already) is no error, 2 goes, and the new
        message, which no session listed, stays.
        """
        before = self.stored_uids()

        def sessions():
            first, second = self.session(), self.session()
            listed = uidls(first)
            first.dele(1)
            bye_first = first.quit()
            self.add_message("alice", NEW)
            stat = second.stat()
            still = uidls(second)
            retr = command(second, "RETR 1")
            marked = [command(second, "DELE 1"), command(second, "DELE 2")]
            bye_second = second.quit()
            third = self.session()
            after = uidls(third)
            third.quit()
            return listed, bye_first, stat, still, retr, marked, bye_second, after

        listed, bye_first, stat, still, retr, marked, bye_second, after = await self.run_in_thread(
            sessions
        )
        self.assertTrue(bye_first.startswith(b"+OK"), bye_first)
        self.assertEqual(stat[0], 4)
        self.assertEqual(still, listed)
        self.assertEqual(retr, wire.err(errors.MessageGone()).rstrip())
        self.assertEqual([m[:3] for m in marked], [b"+OK", b"+OK"])
        self.assertTrue(bye_second.startswith(b"+OK"), bye_second)
        self.assertEqual(after[:2], listed[2:])
        self.assertEqual(len(after), 3)
        self.assertEqual(sorted(after[:2]), sorted(set(before) - {listed[0], listed[1]}))
        self.assertEqual(self.stored_uids(), sorted(after))

    async def test_a_session_without_quit_deletes_nothing(self):
        """A's DELE with its connection dropped; B quits without deleting: all four stay."""
        before = self.stored_uids()

        def sessions():
            first, second = self.session(), self.session()
            first.dele(1)
            first.dele(2)
            first.sock.close()
            second.retr(1)
            second.quit()

        await self.run_in_thread(sessions)
        await self.wait_idle()
        self.assertEqual(self.stored_uids(), before)

    async def test_both_delete_everything(self):
        """Both delete all four and quit, one after the other: four gone, no error, none twice."""

        def sessions():
            first, second = self.session(), self.session()
            for client in (first, second):
                for number in range(1, 5):
                    client.dele(number)
            return first.quit(), second.quit()

        byes = await self.run_in_thread(sessions)
        self.assertEqual([bye[:3] for bye in byes], [b"+OK", b"+OK"])
        self.assertEqual(self.stored_uids(), [])


class ExclusiveTests(ServerTestCase):
    """``--maildrop-lock exclusive``: RFC 1939's one session at a time."""

    options = {"maildrop-lock": "exclusive"}

    async def test_in_use(self):
        def session():
            first = self.pop()
            first.user("alice")
            first.pass_("secret")
            second = self.pop()
            refused = login(second, "alice", "secret")
            first.quit()
            second.user("alice")
            second.pass_("secret")
            second.quit()
            return refused

        refused = await self.run_in_thread(session)
        self.assertEqual(refused, wire.err(errors.MailboxInUse()).rstrip())
        self.assertIn(b"Another session of this user is open", refused)


class DescriptorTests(ServerTestCase):
    """A logged-in session costs the server its socket and nothing more."""

    options = {"maildrop-lock": "exclusive", "max-connections-per-ip": 100}

    async def test_no_descriptor_per_session_lock(self):
        users = [f"user{i}" for i in range(40)]
        for user in users:
            self.add_user(user, hash_password("pw", "PLAIN"))

        def sessions():
            before = len(os.listdir("/proc/self/fd"))
            clients = []
            for user in users:
                client = self.pop()
                login(client, user, "pw")
                clients.append(client)
            during = len(os.listdir("/proc/self/fd"))
            late = self.pop()
            refused = login(late, users[0], "pw")
            for client in [late, *clients]:
                client.quit()
            return during - before, refused

        grown, refused = await self.run_in_thread(sessions)
        # Each session: the client's socket and the server's (both in this
        # process), where a lock file each would make it three.
        self.assertLessEqual(grown, 2 * len(users) + 4)
        self.assertTrue(refused.startswith(b"-ERR [IN-USE]"), refused)


class SharedPostgresTests(PostgresServer, SharedTests):
    pass


class ExclusivePostgresTests(PostgresServer, ExclusiveTests):
    pass
