"""
``twistd popserv --database``: accounts in a real PostgreSQL (Postfixadmin's
table), mail in Maildirs on disk; a message delivered over SMTP to a user
the database knows, then read back with poplib, in one process and with
``--workers 2``.
"""

from __future__ import annotations

import poplib
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from popserv.logins.passwords import hash_password
from tests.support.postgres import POSTFIXADMIN_MAILBOX, postgresql
from tests.support.processes import (
    _Twistd,
    free_port,
    stop_at_cleanup,
    subprocess_env,
    twistd_script,
)


class DatabaseTwistdTests(TestCase):
    workers: tuple[str, ...] = ()

    def setUp(self) -> None:
        import psycopg

        self.twistd = twistd_script()
        self.url = postgresql().database()
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(POSTFIXADMIN_MAILBOX)
            connection.execute(
                "INSERT INTO mailbox (username, password) VALUES (%s, %s)",
                ("alice@example.org", hash_password("alice pw", "SHA512-CRYPT")))
        self.workdir = Path(tempfile.mkdtemp(prefix="popserv-pg-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    def command(self, *argv: str) -> list[str]:
        self.port, self.smtp_port = free_port(), free_port()
        return [self.twistd, "-n", "--pidfile", "", "popserv",
                "--pop3", f"tcp:{self.port}:interface=127.0.0.1", "--hostname", "pop.test",
                "--data", str(self.workdir / "data"),
                "--maildir", str(self.workdir / "vmail" / "{domain}" / "{local}"),
                "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1", "--domain", "example.org",
                "--database", self.url, *self.workers, *argv]

    async def serving(self, command: list[str]) -> _Twistd:
        """``command`` started, once every process serving it has its factory."""
        process = _Twistd()
        transport = reactor.spawnProcess(
            process, self.twistd, command, subprocess_env(), str(self.workdir))
        stop_at_cleanup(self, process, transport)
        serving = 2 if self.workers else 1
        await process.until(lambda: process.output.count(b"Starting factory") >= serving)
        return process

    async def test_deliver_then_retrieve(self) -> None:
        process = await self.serving(self.command())
        self.assertNotIn(b"password:", process.output)  # no first account is made

        def deliver_and_read() -> tuple[list[bytes], bytes, bytes]:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as smtp:
                smtp.sendmail("bob@remote.test", ["alice@example.org"],
                              "Subject: hello\r\n\r\nfrom SMTP\r\n")
                smtp.mail("bob@remote.test")
                unknown = smtp.rcpt("nobody@example.org")
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            client.user("alice@example.org")
            client.pass_("alice pw")
            lines = client.retr(1)[1]
            client.quit()
            wrong = poplib.POP3("127.0.0.1", self.port, timeout=10)
            wrong.user("alice@example.org")
            try:
                refused = wrong.pass_("nope")
            except poplib.error_proto as e:
                refused = e.args[0]
            wrong.quit()
            return lines, refused, str(unknown).encode()

        lines, refused, unknown = await deferToThread(deliver_and_read)
        self.assertIn(b"from SMTP", lines)
        # Postfixadmin's layout: /var/vmail/DOMAIN/LOCAL.
        stored = list((self.workdir / "vmail" / "example.org" / "alice" / "new").iterdir())
        stored += list((self.workdir / "vmail" / "example.org" / "alice" / "cur").iterdir())
        self.assertEqual(len(stored), 1)
        self.assertTrue(refused.startswith(b"-ERR [AUTH]"), refused)
        self.assertIn(b"550", unknown)  # unknown to the database: refused at RCPT
        self.assertNotIn(b"Traceback", process.output)

    async def test_maildir_column(self) -> None:
        """--maildir '.../{maildir}': the path is the account's own column (Postfixadmin's)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(
                "INSERT INTO mailbox (username, password, maildir) VALUES (%s, %s, %s)",
                ("erin@example.org", hash_password("erin pw", "PLAIN"), "boxes/erin-1/"))
        command = self.command()
        command[command.index("--maildir") + 1] = str(self.workdir / "vmail" / "{maildir}")
        process = await self.serving(command)

        def deliver_and_count() -> int:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as smtp:
                smtp.sendmail("bob@remote.test", ["erin@example.org"], "Subject: x\r\n\r\nx\r\n")
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            client.user("erin@example.org")
            client.pass_("erin pw")
            count = client.stat()[0]
            client.quit()
            return count

        self.assertEqual(await deferToThread(deliver_and_count), 1)
        box = self.workdir / "vmail" / "boxes" / "erin-1"
        self.assertEqual(len([*(box / "new").iterdir(), *(box / "cur").iterdir()]), 1)
        self.assertNotIn(b"Traceback", process.output)

    def test_bad_options_one_line(self) -> None:
        for argv, said in (
            (("--database", "postgresql://popserv:pw@db/mail"), b"PGPASSWORD"),
            (("--database-query", "SELECT password FROM mailbox"), b"%(user)s"),
            (("--passwd", "/etc/passwd"), b"--database and --passwd"),
        ):
            done = subprocess.run(self.command(*argv), capture_output=True, timeout=60,
                                  env=subprocess_env(), check=False)
            self.assertEqual(done.returncode, 78, done.stderr)
            self.assertIn(said, done.stderr)
            self.assertNotIn(b"Traceback", done.stderr)

    async def test_no_database_is_temporary(self) -> None:
        """The database unreachable: PASS gets [SYS/TEMP], RCPT a 451, and nothing crashes."""
        self.url = f"postgresql://popserv@127.0.0.1:{free_port()}/mail"
        process = await self.serving(self.command())

        def log_in() -> bytes:
            client = poplib.POP3("127.0.0.1", self.port, timeout=20)
            client.user("alice@example.org")
            try:
                return client.pass_("alice pw")
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                client.quit()

        def rcpt() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=20) as smtp:
                hello = smtp.ehlo()
                assert hello[0] == 250, hello
                said = smtp.mail("bob@remote.test")
                assert said[0] == 250, said
                return smtp.rcpt("alice@example.org")

        answer, (code, _) = await gatherResults([deferToThread(log_in), deferToThread(rcpt)])
        self.assertTrue(answer.startswith(b"-ERR [SYS/TEMP]"), answer)
        self.assertEqual(code, 451)
        self.assertNotIn(b"Traceback", process.output)


class DatabaseWorkersTests(DatabaseTwistdTests):
    workers = ("--workers", "2")
