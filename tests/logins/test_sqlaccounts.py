"""
Accounts in PostgreSQL: rows as the password file's entries (pure), then
lookups against a real PostgreSQL holding Postfixadmin's ``mailbox`` table.
"""

from __future__ import annotations

import base64
import io
import poplib
import sys
import time
from pathlib import Path

from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.core.usernames import UsernameRules
from popserv.logins.database import Database, DatabaseUnavailable, check_url
from popserv.logins.passwords import hash_password
from popserv.logins.passwords.checker import PasswdFileChecker
from popserv.logins.passwords.schemes import verify_password
from popserv.logins.sqlaccounts import CACHE_SECONDS, SQLAccounts, entry_of
from popserv.server.cli import main
from popserv.server.factory import POP3Factory
from popserv.server.policy import Policy
from popserv.stores.layout import Layout, ensure_maildir
from popserv.stores.maildir import deliver
from popserv.stores.realm import MaildirRealm
from tests.support.certs import CA
from tests.support.postgres import POSTFIXADMIN_MAILBOX, postgresql
from tests.support.processes import free_port, subprocess_env

#: md5crypt of "secret" (salt "salt"), as older Postfixadmin installs store it.
MD5_CRYPT = "$1$salt$ez2vlPGdaLYkJam5pWs/Y1"


class EntryTests(SynchronousTestCase):
    def test_postfixadmin_row(self) -> None:
        entry = entry_of({"user": "alice@example.org", "password": "{PLAIN}pw",
                          "maildir": "example.org/alice/", "quota": 1024, "active": True},
                         "alice@example.org")
        self.assertEqual(entry.name, "alice@example.org")
        self.assertFalse(entry.locked)
        self.assertEqual(dict(entry.extra),
                         {"maildir": "example.org/alice/", "quota_bytes": "1024"})

    def test_inactive_is_locked(self) -> None:
        for active in (False, 0, "0", "f", "N"):
            entry = entry_of({"password": "{PLAIN}pw", "active": active}, "bob")
            self.assertTrue(entry.locked, active)
            self.assertFalse(verify_password(entry.password, "pw") and not entry.locked)

    def test_quota_zero_is_none(self) -> None:
        entry = entry_of({"password": "x", "quota": 0, "maildir": ""}, "carol")
        self.assertEqual(dict(entry.extra), {})
        self.assertEqual(entry.name, "carol")

    def test_password_in_url_refused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            check_url("postgresql://popserv:hunter2@db/mail")
        self.assertIn("PGPASSWORD", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            check_url("postgresql://popserv@db/mail?password=hunter2")
        with self.assertRaises(ValueError) as caught:
            check_url("host=db password=hunter2")
        self.assertNotIn("hunter2", str(caught.exception))  # never repeated in an error
        with self.assertRaises(ValueError):
            check_url("mysql://db/mail")
        self.assertEqual(check_url("postgresql://popserv@db/mail"), "postgresql://popserv@db/mail")


class PostfixadminTests(TestCase):
    """SQLAccounts on a real PostgreSQL with Postfixadmin's table."""

    def setUp(self) -> None:
        import psycopg

        self.url = postgresql().database()
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(POSTFIXADMIN_MAILBOX)
            rows = [
                ("alice@example.org", hash_password("alice pw", "SHA512-CRYPT"),
                 "example.org/alice/", 0, True),
                ("bob@example.org", MD5_CRYPT, "example.org/bob/", 10_000_000, True),
                ("carol@example.org", hash_password("carol pw", "ARGON2ID"),
                 "example.org/carol/", 0, False),
            ]
            with connection.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO mailbox (username, password, maildir, quota, active)"
                    " VALUES (%s, %s, %s, %s, %s)", rows)
        self.database = Database(self.url, reactor)
        self.addCleanup(self.database.stop)
        self.accounts = SQLAccounts(self.database, UsernameRules())

    async def test_lookup(self) -> None:
        alice = await self.accounts.lookup("alice@example.org")
        self.assertEqual(alice.name, "alice@example.org")
        self.assertTrue(alice.password.startswith("{SHA512-CRYPT}$6$"))
        self.assertTrue(verify_password(alice.password, "alice pw"))
        self.assertEqual(alice.extra["maildir"], "example.org/alice/")
        bob = await self.accounts.lookup("bob@example.org")
        self.assertTrue(verify_password(bob.password, "secret"))
        self.assertEqual(bob.extra["quota_bytes"], "10000000")

    async def test_inactive_and_unknown(self) -> None:
        carol = await self.accounts.lookup("carol@example.org")
        self.assertTrue(carol.locked)
        self.assertIsNone(await self.accounts.lookup("dave@example.org"))

    async def test_name_is_a_parameter(self) -> None:
        """A name with SQL in it is only ever a value."""
        for name in ("x' OR '1'='1", "alice@example.org'; DROP TABLE mailbox; --", "%(user)s"):
            self.assertIsNone(await self.accounts.lookup(name))
        self.assertIsNotNone(await self.accounts.lookup("alice@example.org"))

    async def test_recent_lookups_reused(self) -> None:
        """Within a second the same account is answered again without a query; then re-read."""
        import psycopg

        clock = Clock()
        accounts = SQLAccounts(self.database, UsernameRules(), clock=clock)
        first = await accounts.lookup("alice@example.org")
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute("UPDATE mailbox SET active = false WHERE username = %s",
                               ("alice@example.org",))
        clock.advance(0.5)
        self.assertEqual(await accounts.lookup("alice@example.org"), first)
        clock.advance(0.6)
        self.assertTrue((await accounts.lookup("alice@example.org")).locked)

    async def test_tls_when_the_url_asks(self) -> None:
        """sslmode=verify-full: the pool's connections are TLS, to a certificate checked."""
        server = postgresql()
        url = f"{self.url}?sslmode=verify-full&sslrootcert={server.ca}"
        database = Database(url, reactor)
        self.addCleanup(database.stop)
        row = await database.fetch_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", {})
        self.assertEqual(row["ssl"], True)
        self.assertTrue(row["version"].startswith("TLSv1."), row)
        untrusted = CA("someone else").write(Path(self.mktemp()))
        wrong = Database(f"{self.url}?sslmode=verify-full&sslrootcert={untrusted}", reactor,
                         wait=1)
        self.addCleanup(wrong.stop)
        with self.assertRaises(DatabaseUnavailable):
            await wrong.fetch_one("SELECT 1", {})

    async def test_query_the_database_refuses(self) -> None:
        """A query that does not fit the schema: a temporary failure, said in the log."""
        accounts = SQLAccounts(self.database, UsernameRules(),
                               "SELECT pw AS password FROM nosuchtable WHERE login = %(user)s")
        with capturedLogs() as events:
            with self.assertRaises(DatabaseUnavailable):
                await accounts.lookup("alice@example.org")
        self.assertTrue(any("refused a query" in formatEvent(e) for e in events))

    async def test_own_query(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(
                "CREATE TABLE users (login text PRIMARY KEY, pw text, enabled int,"
                " delay int)")
            connection.execute(
                "INSERT INTO users VALUES ('erin', %s, 1, 300)", (hash_password("e", "PLAIN"),))
        accounts = SQLAccounts(
            self.database, UsernameRules(),
            "SELECT login AS user, pw AS password, enabled AS active, delay AS login_delay"
            " FROM users WHERE login = %(user)s")
        erin = await accounts.lookup("erin")
        self.assertFalse(erin.locked)
        self.assertEqual(erin.extra["login_delay"], "300")
        self.assertTrue(verify_password(erin.password, "e"))


class UnavailableTests(TestCase):
    async def test_nothing_listening(self) -> None:
        """No database: a temporary failure, soon, never a hang."""
        database = Database(
            f"postgresql://popserv@127.0.0.1:{free_port()}/mail", reactor, wait=0.5)
        self.addCleanup(database.stop)
        accounts = SQLAccounts(database, UsernameRules())
        began = time.monotonic()
        with self.assertRaises(DatabaseUnavailable):
            await accounts.lookup("alice")
        self.assertLess(time.monotonic() - began, 5)


class SQLServerCase(TestCase):
    """
    POP3 over loopback with accounts in PostgreSQL (Postfixadmin's table)
    and mail in Maildirs on disk: the checker and realm popserv serves with.
    """

    def setUp(self) -> None:
        import psycopg

        self.url = postgresql().database()
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(POSTFIXADMIN_MAILBOX)
            with connection.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO mailbox (username, password, active) VALUES (%s, %s, %s)",
                    [
                        ("alice@example.org", hash_password("alice pw", "SHA512-CRYPT"), True),
                        ("bob@example.org", hash_password("bob pw", "PLAIN"), True),
                        ("carol@example.org", hash_password("carol pw", "PLAIN"), False),
                    ],
                )
        self.layout = Layout.create(self.mktemp())
        for user, count in (("alice@example.org", 3), ("bob@example.org", 1)):
            maildir = ensure_maildir(self.layout.maildir_for(user))
            for i in range(count):
                deliver(maildir, b"Subject: %d\n\nbody\n" % i)
        self.port = self.serve(Database(self.url, reactor))

    def serve(self, database: Database) -> int:
        self.addCleanup(database.stop)
        accounts = SQLAccounts(database, UsernameRules())
        checker = PasswdFileChecker(accounts, reactor=reactor)
        realm = MaildirRealm(self.layout, accounts, reactor=reactor)
        factory = POP3Factory(
            Portal(realm, [checker]),
            Policy(hostname="pop.test", auth_failure_delay=0.05, trusted_networks=("127.0.0.0/8",)),
            accounts=checker,
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def session(self, port: int, log_in) -> tuple[bytes, int | None]:
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        try:
            try:
                answer = log_in(client)
            except poplib.error_proto as e:
                return e.args[0], None
            count = client.stat()[0]
            client.quit()
            return answer, count
        finally:
            client.close()



class LoginTests(SQLServerCase):
    async def test_user_pass(self) -> None:
        def user_pass(client):
            client.user("alice@example.org")
            return client.pass_("alice pw")

        answer, count = await deferToThread(self.session, self.port, user_pass)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertEqual(count, 3)

    async def test_apop_with_a_plain_password(self) -> None:
        answer, count = await deferToThread(
            self.session, self.port, lambda c: c.apop("bob@example.org", "bob pw"))
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertEqual(count, 1)

    async def test_sasl_plain(self) -> None:
        def auth_plain(client):
            token = base64.b64encode(b"\0alice@example.org\0alice pw").decode()
            return client._shortcmd(f"AUTH PLAIN {token}")

        answer, count = await deferToThread(self.session, self.port, auth_plain)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertEqual(count, 3)

    async def test_refused(self) -> None:
        """A wrong password, an inactive account, an unknown one: -ERR [AUTH] alike."""
        for user, password in (("alice@example.org", "wrong"), ("carol@example.org", "carol pw"),
                               ("dave@example.org", "x")):
            def user_pass(client, user=user, password=password):
                client.user(user)
                return client.pass_(password)

            answer, _ = await deferToThread(self.session, self.port, user_pass)
            self.assertTrue(answer.startswith(b"-ERR [AUTH]"), (user, answer))

    async def test_database_down_is_temporary(self) -> None:
        """No database: -ERR [SYS/TEMP], not a wrong password, and the session goes on."""
        port = self.serve(Database(
            f"postgresql://popserv@127.0.0.1:{free_port()}/mail", reactor, wait=0.5))

        def user_pass(client):
            client.user("alice@example.org")
            return client.pass_("alice pw")

        answer, _ = await deferToThread(self.session, port, user_pass)
        self.assertTrue(answer.startswith(b"-ERR [SYS/TEMP]"), answer)

    async def test_scram_keys_from_a_plain_password(self) -> None:
        database = Database(self.url, reactor)
        self.addCleanup(database.stop)
        checker = PasswdFileChecker(SQLAccounts(database, UsernameRules()), reactor=reactor)
        keys = await checker.scram_keys("bob@example.org", "SHA-256")
        self.assertTrue(keys.matches("bob pw"))
        self.assertFalse(keys.matches("wrong"))
        decoy = await checker.scram_keys("nobody@example.org", "SHA-256")
        self.assertFalse(decoy.matches("bob pw"))


class DatabaseGoneTests(SQLServerCase):
    """The database stops in the middle of sessions, and comes back."""

    def setUp(self) -> None:
        super().setUp()
        self.port = self.serve(Database(self.url, reactor, wait=0.5))

    async def test_gone_and_back(self) -> None:
        def open_session() -> poplib.POP3:
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            client.user("alice@example.org")
            client.pass_("alice pw")
            return client

        def log_in() -> bytes:
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            try:
                client.user("alice@example.org")
                return client.pass_("alice pw")
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                client.quit()

        def finish(client: poplib.POP3) -> tuple[int, bytes]:
            count = client.stat()[0]
            client.retr(1)
            client.dele(1)
            return count, client.quit()

        server = postgresql()
        session = await deferToThread(open_session)
        server.pause()
        try:
            # Past the accounts' cache of recent lookups: the next login asks the database.
            await deferLater(reactor, CACHE_SECONDS + 0.1, lambda: None)
            # A login now: a temporary failure, not a wrong password.
            answer = await deferToThread(log_in)
            self.assertTrue(answer.startswith(b"-ERR [SYS/TEMP]"), answer)
            # The session already open goes on: its mail is on disk.
            count, quit = await deferToThread(finish, session)
            self.assertEqual(count, 3)
            self.assertTrue(quit.startswith(b"+OK"), quit)
        finally:
            server.resume()
        # Back, without a restart: the pool connects again.
        for _ in range(50):
            answer = await deferToThread(log_in)
            if answer.startswith(b"+OK"):
                break
            await deferLater(reactor, 0.2, lambda: None)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        def count_again() -> int:
            client = open_session()
            try:
                return client.stat()[0]
            finally:
                client.quit()

        self.assertEqual(await deferToThread(count_again), 2)  # the QUIT's deletion applied


class UserCommandTests(SynchronousTestCase):
    """``popserv user ... --database``: Postfixadmin's table, written as Postfixadmin writes it."""

    def setUp(self) -> None:
        import psycopg

        self.url = postgresql().database()
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(POSTFIXADMIN_MAILBOX)
        self.data = Path(self.mktemp())
        self.vmail = Path(self.mktemp())

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main([*argv, "--data", str(self.data), "--database", self.url,
                      "--maildir", f"{self.vmail}/{{domain}}/{{local}}"])
        return code, out.getvalue(), err.getvalue()

    def row(self, name: str) -> dict | None:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.url, row_factory=dict_row) as connection:
            return connection.execute(
                "SELECT * FROM mailbox WHERE username = %s", (name,)).fetchone()

    def test_add_passwd_list_del(self) -> None:
        code, out, err = self.run_cli("user", "add", "Alice@Example.org", stdin="first\n")
        self.assertEqual(code, 0, err)
        row = self.row("alice@example.org")
        self.assertEqual((row["local_part"], row["domain"], row["maildir"], row["active"]),
                         ("alice", "example.org", "example.org/alice/", True))
        self.assertTrue(verify_password(row["password"], "first"))
        self.assertTrue((self.vmail / "example.org" / "alice" / "new").is_dir())
        code, _, err = self.run_cli("user", "add", "alice@example.org", stdin="again\n")
        self.assertEqual(code, 1)
        self.assertIn("alice@example.org", err)
        code, _, err = self.run_cli("user", "passwd", "alice@example.org", "-s", "PLAIN",
                                    stdin="second\n")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.row("alice@example.org")["password"], "{PLAIN}second")
        code, out, _ = self.run_cli("user", "list")
        self.assertEqual(out, "alice@example.org PLAIN never\n")
        code, out, _ = self.run_cli("user", "del", "alice@example.org")
        self.assertEqual(code, 0)
        self.assertIsNone(self.row("alice@example.org"))
        self.assertTrue((self.vmail / "example.org" / "alice").is_dir())  # kept without --purge

    def test_one_password_column(self) -> None:
        code, _, err = self.run_cli("user", "add", "bob@example.org", "-s", "ARGON2ID",
                                      "-s", "SCRAM-SHA-256", stdin="pw\n")
        self.assertEqual(code, 1)
        self.assertIn("one password column", err)
        self.assertIsNone(self.row("bob@example.org"))

    def test_no_database(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["user", "list", "--database",
                     f"postgresql://popserv@127.0.0.1:{free_port()}/mail"])
        self.assertEqual(code, 1)
        self.assertIn("cannot reach the database", err.getvalue())
        self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())

    def test_deliver(self) -> None:
        """popserv deliver --database: the recipient looked up in the table; unknown is 67."""
        import subprocess

        self.assertEqual(self.run_cli("user", "add", "carol@example.org", stdin="pw\n")[0], 0)

        def deliver(recipient: str) -> int:
            return subprocess.run(
                [sys.executable, "-m", "popserv.server.cli", "deliver", "--recipient", recipient,
                 "--data", str(self.data), "--database", self.url,
                 "--maildir", f"{self.vmail}/{{domain}}/{{local}}"],
                input=b"Subject: hi\n\nbody\n", capture_output=True, env=subprocess_env(),
                timeout=60, check=False,
            ).returncode

        self.assertEqual(deliver("carol@example.org"), 0)
        self.assertEqual(len(list((self.vmail / "example.org" / "carol" / "new").iterdir())), 1)
        self.assertEqual(deliver("nobody@example.org"), 67)
