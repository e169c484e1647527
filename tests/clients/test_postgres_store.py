"""
``twistd popserv --store postgresql``: accounts and mail in a real
PostgreSQL.  Mail arrives over SMTP, LMTP and ``popserv deliver``, and is
read, deleted and kept with poplib, byte for byte; ``popserv db`` makes and
shows the tables, and a server refuses to start on a database without them.
"""

from __future__ import annotations

import io
import poplib
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from popserv.logins.passwords import hash_password
from popserv.server.cli import main
from popserv.stores.postgres import queries
from tests.support.postgres import POSTFIXADMIN_MAILBOX, postgresql, store_database
from tests.support.processes import (
    _Twistd,
    free_port,
    stop_at_cleanup,
    subprocess_env,
    twistd_script,
)

MESSAGE = b"Subject: hello\r\n\r\nfirst line\r\n.starts with a dot\r\nlast line\r\n"


def run_cli(test: TestCase, *argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    test.patch(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    test.patch(sys, "stdout", out)
    test.patch(sys, "stderr", err)
    code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class DatabaseCommandTests(TestCase):
    def test_init_status_upgrade(self) -> None:
        url = postgresql().database()
        code, out, _ = run_cli(self, "db", "status", "--database", url)
        self.assertEqual((code, out), (1, "No popserv schema: run `popserv db init`.\n"))
        code, _, err = run_cli(self, "db", "upgrade", "--database", url)
        self.assertEqual(code, 1)
        self.assertIn("popserv db init", err)
        code, out, _ = run_cli(self, "db", "init", "--database", url)
        self.assertEqual(code, 0)
        self.assertIn("Created the popserv schema", out)
        code, out, _ = run_cli(self, "db", "init", "--database", url)
        self.assertIn("nothing to do", out)
        code, out, _ = run_cli(self, "db", "status", "--database", url)
        self.assertEqual(code, 0)
        self.assertIn("0 maildrops, 0 messages, 0 octets, 0 in use.", out)

    def test_user_add_and_purge(self) -> None:
        """With --store postgresql no Maildir is made, and --purge deletes the maildrop."""
        url = store_database()
        data = self.mktemp()
        options = ("--data", data, "--database", url, "--store", "postgresql")
        code, out, err = run_cli(self, "user", "add", "dave@example.org", *options,
                                 stdin=b"dave pw\n")
        self.assertEqual(code, 0, err)
        self.assertIn("mail in the database", out)
        self.assertFalse(Path(data).exists())
        with psycopg.connect(url, autocommit=True) as connection, connection.transaction():
            for uidl in ("a", "b"):
                queries.store(connection, "dave@example.org", iter([b"x\n"]), uidl=uidl)
        code, out, _ = run_cli(self, "user", "del", "dave@example.org", "--purge", *options)
        self.assertEqual(code, 0)
        self.assertIn("deleted 2 messages", out)
        with psycopg.connect(url) as connection:
            left = connection.execute("SELECT count(*) FROM popserv.message_chunks").fetchone()
        self.assertEqual(left[0], 0)

    def test_unreachable(self) -> None:
        code, _, err = run_cli(self, "db", "init", "--database",
                               f"postgresql://popserv@127.0.0.1:{free_port()}/mail")
        self.assertEqual(code, 1)
        self.assertIn("cannot reach the database", err)
        self.assertNotIn("Traceback", err)


class StoreTwistdTests(TestCase):
    workers: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.twistd = twistd_script()
        self.url = store_database()
        with psycopg.connect(self.url, autocommit=True) as connection:
            for name in ("alice", "bob"):
                connection.execute(
                    "INSERT INTO mailbox (username, password) VALUES (%s, %s)",
                    (f"{name}@example.org", hash_password(f"{name} pw", "SHA512-CRYPT")))
        self.workdir = Path(tempfile.mkdtemp(prefix="popserv-pgstore-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    def command(self, url: str | None = None, *argv: str) -> list[str]:
        self.port, self.smtp_port, self.lmtp_port = free_port(), free_port(), free_port()
        return [self.twistd, "-n", "--pidfile", "", "popserv",
                "--pop3", f"tcp:{self.port}:interface=127.0.0.1", "--hostname", "pop.test",
                "--data", str(self.workdir / "data"),
                "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1", "--domain", "example.org",
                "--lmtp", f"tcp:{self.lmtp_port}:interface=127.0.0.1",
                "--database", url or self.url, "--store", "postgresql", *self.workers, *argv]

    async def serving(self, *argv: str) -> _Twistd:
        process = _Twistd()
        transport = reactor.spawnProcess(
            process, self.twistd, self.command(None, *argv), subprocess_env(), str(self.workdir))
        stop_at_cleanup(self, process, transport)
        serving = 2 if self.workers else 1
        await process.until(lambda: process.output.count(b"Starting factory") >= serving)
        return process

    def pop(self, user: str = "alice") -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.port, timeout=10)
        client.user(f"{user}@example.org")
        client.pass_(f"{user} pw")
        return client

    async def test_every_way_in_then_pop3(self) -> None:
        process = await self.serving()
        deliver = subprocess.run(
            [sys.executable, "-m", "popserv.server.cli", "deliver", "--database", self.url,
             "--store", "postgresql", "--data", str(self.workdir / "data"),
             "--recipient", "alice@example.org", "--from", "carol@remote.test"],
            input=b"Subject: by the MDA\n\nvia popserv deliver\n", capture_output=True,
            env=subprocess_env(), timeout=60, check=False)
        self.assertEqual(deliver.returncode, 0, deliver.stderr)

        def session() -> dict:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as smtp:
                smtp.sendmail("bob@remote.test", ["alice@example.org", "bob@example.org"],
                              MESSAGE)
            with smtplib.LMTP("127.0.0.1", self.lmtp_port, timeout=10) as lmtp:
                lmtp.sendmail("bob@remote.test", ["alice@example.org"],
                              b"Subject: lmtp\r\n\r\nx\r\n")
            client = self.pop()
            found = {"stat": client.stat(), "uidl": client.uidl()[1],
                     "list": client.list()[1]}
            found["retr"] = [client.retr(i)[1] for i in (1, 2, 3)]
            second = poplib.POP3("127.0.0.1", self.port, timeout=10)
            second.user("alice@example.org")
            # Shared (the default): a second device's session alongside.
            found["second"] = second.pass_("alice pw")
            found["who"] = run_who()
            second.quit()
            client.dele(2)
            client.quit()
            again = self.pop()
            found["after"] = again.uidl()[1]
            again.quit()
            return found

        def run_who() -> str:
            done = subprocess.run(
                [sys.executable, "-m", "popserv.server.cli", "who", "--database", self.url,
                 "--store", "postgresql"], capture_output=True, env=subprocess_env(),
                timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            return done.stdout.decode()

        found = await deferToThread(session)
        self.assertEqual(found["stat"][0], 3)
        self.assertIn(b"via popserv deliver", found["retr"][0])
        smtp_lines = found["retr"][1]
        self.assertEqual(smtp_lines[-3:], [b"first line", b".starts with a dot", b"last line"])
        self.assertIn(b"Delivered-To: alice@example.org", smtp_lines)
        # LIST's sizes are the octets RETR sends (CRLF, before dot-stuffing,
        # which poplib has undone).
        sizes = [int(line.split()[1]) for line in found["list"]]
        for size, lines in zip(sizes, found["retr"], strict=True):
            self.assertEqual(size, sum(len(line) + 2 for line in lines))
        self.assertTrue(found["second"].startswith(b"+OK"), found["second"])
        # popserv who: both sessions, from their leases, with the node that serves them.
        header, *rows = found["who"].splitlines()
        self.assertEqual(header.split(), ["USER", "CLIENT", "SINCE", "NODE"])
        self.assertEqual(len(rows), 2, found["who"])
        for row in rows:
            self.assertEqual(row.split()[:2], ["alice@example.org", "127.0.0.1"])
        uidls = [line.split()[1] for line in found["uidl"]]
        self.assertEqual([line.split()[1] for line in found["after"]], [uidls[0], uidls[2]])
        with psycopg.connect(self.url) as connection:
            bob = connection.execute(
                "SELECT count(*) FROM popserv.messages m JOIN popserv.maildrops d"
                " ON d.id = m.maildrop WHERE d.name = 'bob@example.org'").fetchone()[0]
        self.assertEqual(bob, 1)
        self.assertNotIn(b"Traceback", process.output)

    async def test_expire(self) -> None:
        """EXPIRE 1: a message retrieved before and delivered two days ago goes at QUIT."""
        with psycopg.connect(self.url, autocommit=True) as connection, connection.transaction():
            old = time.time() - 2 * 86400
            for uidl, delivered, seen in (("old-seen", old, True), ("old-unseen", old, False),
                                          ("new-seen", None, True)):
                queries.store(connection, "alice@example.org", iter([b"Subject: s\n\nx\n"]),
                              uidl=uidl, delivered=delivered, seen=seen)
        process = await self.serving("--expire", "1")

        def session() -> list[bytes]:
            client = self.pop()
            capabilities = client.capa()
            assert capabilities["EXPIRE"] == ["1"], capabilities
            client.quit()
            again = self.pop()
            left = [line.split()[1] for line in again.uidl()[1]]
            again.quit()
            return left

        self.assertEqual(await deferToThread(session), [b"old-unseen", b"new-seen"])
        self.assertNotIn(b"Traceback", process.output)

    def test_refuses_a_database_without_tables(self) -> None:
        url = postgresql().database()
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(POSTFIXADMIN_MAILBOX)
        done = subprocess.run(self.command(url), capture_output=True, timeout=60,
                              env=subprocess_env(), check=False)
        self.assertEqual(done.returncode, 78, done.stderr)
        self.assertIn(b"popserv db init", done.stderr)
        self.assertNotIn(b"Traceback", done.stderr)


class StoreWorkersTests(StoreTwistdTests):
    """The same with two worker processes, each with its own connection pool."""

    workers = ("--workers", "2")
