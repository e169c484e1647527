"""
``twistd popserv --max-listed 3`` over loopback with real clients: poplib and
curl see the newest 3 of 10 messages as 1 to 3, with their own UIDLs and
sizes; DELE 1 deletes exactly that message and the 7 older stay as they
were; a user's ``max_listed=`` overrides the server's.  On a Maildir and on
the PostgreSQL store.
"""

from __future__ import annotations

import poplib

from popserv.core import errors
from popserv.logins.passwords import PasswdFile
from tests.support.servers import (
    CurlTestCase,
    PostgresServer,
    ServerTestCase,
    command,
    crlf,
    login,
)

#: Delivered after the fixture's four, so the newest 3 are the last 3 here.
LATER = [b"Subject: %d\n\nmessage %d\n" % (n, n) for n in range(5, 11)]
NEWEST = LATER[-3:]


class TenMessages:
    """Six more messages for alice: ten in all."""

    options = {"max-listed": 3}

    def setUp(self):
        result = super().setUp()  # type: ignore[misc]
        for data in LATER:
            self.add_message("alice", data)  # type: ignore[attr-defined]
        return result


class PoplibMaxListedTests(TenMessages, ServerTestCase):
    def session(self) -> poplib.POP3:
        client = self.pop()
        self.assertTrue(login(client, "alice", "secret").startswith(b"+OK Logged in, 3 messages"))
        return client

    def check_newest(self) -> list[str]:
        """The newest 3, whole, as 1 to 3; their UIDLs."""
        client = self.session()
        sizes = [len(crlf(data)) for data in NEWEST]
        self.assertEqual(client.stat(), (3, sum(sizes)))
        self.assertEqual(client.list()[1], [b"%d %d" % (n, s) for n, s in enumerate(sizes, 1)])
        for n, data in enumerate(NEWEST, 1):
            self.assertEqual(b"\r\n".join(client.retr(n)[1]) + b"\r\n", crlf(data))
        refused = command(client, "RETR 4")
        self.assertEqual(refused, b"-ERR " + errors.NoSuchMessage.text.encode())
        uids = [line.split()[1].decode() for line in client.uidl()[1]]
        client.quit()
        return uids

    async def test_sees_the_newest(self):
        stored = self.stored_uids()
        uids = await self.run_in_thread(self.check_newest)
        self.assertEqual(len(set(uids)), 3)
        self.assertTrue(set(uids) <= set(stored))
        # RETR marked them seen, and only them.
        self.assertEqual(self.seen_uids(), sorted(uids))

    def delete_first(self) -> bytes:
        client = self.session()
        uid = client.uidl(1).split()[2]
        self.assertEqual(client.dele(1), b"+OK Message 1 deleted")
        self.assertEqual(client.stat()[0], 2)
        self.assertEqual(client.quit(), b"+OK Bye, 1 deleted, 9 left")
        return uid

    async def test_dele_leaves_the_rest(self):
        """DELE 1 + QUIT: exactly the 8th of 10 is gone; the 7 older are untouched."""
        stored = self.stored_uids()
        files = None if isinstance(self, PostgresServer) else self.files()
        uid = (await self.run_in_thread(self.delete_first)).decode()
        self.assertEqual(self.stored_uids(), sorted(set(stored) - {uid}))
        self.assertEqual(self.seen_uids(), [])
        if files is not None:
            self.assertEqual(self.files(), [name for name in files if not name.startswith(uid)])

    def list_count(self, user: str, password: str) -> int:
        client = self.pop()
        login(client, user, password)
        count = client.stat()[0]
        client.quit()
        return count

    def set_max_listed(self, value: str) -> None:
        PasswdFile(self.layout.passwd_path).set_extra("alice", "max_listed", value)

    async def test_per_user(self):
        """``max_listed=0`` shows alice everything; ``max_listed=5`` five; bad is ignored."""
        for value, seen in (("0", 10), ("5", 5), ("lots", 3)):
            self.set_max_listed(value)
            self.assertEqual(await self.run_in_thread(self.list_count, "alice", "secret"), seen)


class PoplibMaxListedPostgresTests(PostgresServer, PoplibMaxListedTests):
    """The accounts query may give ``max_listed`` as a column, as the file's field."""

    options = {
        **PoplibMaxListedTests.options,
        "database-query": "SELECT username AS user, password, max_listed FROM mailbox"
        " WHERE username = %(user)s",
    }

    def setUp(self):
        result = super().setUp()
        with self.connect() as connection:
            connection.execute("ALTER TABLE mailbox ADD COLUMN max_listed text")
        return result

    def set_max_listed(self, value: str) -> None:
        with self.connect() as connection:
            connection.execute("UPDATE mailbox SET max_listed = %s", (value,))
        # The accounts are cached for a second: the test does not wait it out.
        self.factory.accounts.passwd._recent.clear()


class CurlMaxListedTests(TenMessages, CurlTestCase):
    async def test_uidl(self):
        """curl ``-X UIDL`` lists 3 UIDLs, numbered 1 to 3, and curl ``/1`` is the 8th message."""
        out = await self.curl("", "-X", "UIDL")
        lines = out.decode().split("\r\n")[:-1]
        self.assertEqual([line.split()[0] for line in lines], ["1", "2", "3"])
        self.assertTrue({line.split()[1] for line in lines} <= set(self.stored_uids()))
        self.assertEqual(await self.curl("1"), crlf(NEWEST[0]))
