"""
Faults on the PostgreSQL store, with real ``twistd popserv --store
postgresql`` processes: killed with SIGKILL while SMTP deliveries and POP3
sessions run, then started again; and the database stopped under open
sessions and deliveries, then started again.

What was acknowledged must hold: a message answered 250 is stored exactly
once and whole (every chunk, the maildrop's counters in step), a DELE is
applied only by a QUIT, and a deletion answered +OK stays done.  Nothing
hangs, nothing is acknowledged that was not stored, and the server serves
again without a restart once the database is back.
"""

from __future__ import annotations

import poplib
import random
import smtplib
import socket
import threading
import time
from pathlib import Path

import psycopg
from twisted.trial.unittest import SynchronousTestCase

from popserv.stores.maildir.deliver import lf_chunks
from popserv.stores.postgres import queries
from tests.support.crashtraffic import Ledger, Traffic, crash_message
from tests.support.postgres import postgresql, store_database, stored_whole
from tests.support.processes import LoggedProcess, free_port, twistd_script

PASSWORD = "pw"
#: Short, so that the users of a killed process are served again soon
#: (the default is 30 s); sessions renew it every third of it.
LEASE = 2.0
#: How long a test waits for something that must happen within the lease.
PATIENCE = LEASE * 3 + 10
SEED = 11
#: Kill-and-restart rounds of random traffic; each is about three seconds.
ROUNDS = 2


#: Body sizes: a few bytes up to ~1 MB (several chunks), so kills land mid-store.
SIZES = (10, 20_000, 300_000, 1_000_000)


class ServerProcess(LoggedProcess):
    """``twistd popserv --store postgresql`` on fresh ports, started and killed at will."""

    patience = 15.0

    def __init__(self, case: SynchronousTestCase, url: str, base: Path) -> None:
        super().__init__(base)
        self.url = url
        case.addCleanup(self.stop)

    def start(self) -> None:
        self.pop3, self.smtp = free_port(), free_port()
        self.spawn([
            twistd_script(), "-n", "--pidfile", "", "popserv",
            "--data", str(self.base / "data"),
            "--database", self.url, "--store", "postgresql", "--maildrop-lease", str(LEASE),
            "--pop3", f"tcp:{self.pop3}:interface=127.0.0.1",
            "--smtp", f"tcp:{self.smtp}:interface=127.0.0.1",
            "--domain", "example.org", "--hostname", "pop.test",
        ])  # fmt: skip
        self.wait_for_ports(self.pop3, self.smtp)


class FaultTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.url = store_database()
        with self.connect() as connection:
            for user in ("alice@example.org", "bob@example.org"):
                connection.execute(
                    "INSERT INTO mailbox (username, password) VALUES (%s, %s)",
                    (user, "{PLAIN}" + PASSWORD),
                )
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        self.server = ServerProcess(self, self.url, base)

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True)

    def put(self, *messages: bytes, user: str = "alice@example.org") -> None:
        """Store ``messages`` as a delivery does."""
        with self.connect() as connection:
            for message in messages:
                with connection.transaction():
                    queries.store(connection, user, lf_chunks(message), uidl=f"u{time.time_ns()}")

    def stored(self, user: str = "alice@example.org") -> dict[str, list[bytes]]:
        """``user``'s messages by Message-ID, each checked whole (see stored_whole)."""
        return stored_whole(self.url, user)

    def log_in(self, user: str = "alice@example.org") -> poplib.POP3:
        """A session for ``user``, once any lease a dead session left has expired."""
        deadline = time.monotonic() + PATIENCE
        while True:
            client = poplib.POP3("127.0.0.1", self.server.pop3, timeout=10)
            client.user(user)
            try:
                client.pass_(PASSWORD)
                return client
            except poplib.error_proto as e:
                client.close()
                answer = e.args[0]
                self.assertTrue(answer.startswith((b"-ERR [IN-USE]", b"-ERR [SYS/TEMP]")), answer)
                self.assertLess(time.monotonic(), deadline, f"still refused: {answer!r}")
                time.sleep(0.2)

    def count(self, user: str = "alice@example.org") -> int:
        client = self.log_in(user)
        try:
            count = client.stat()[0]
            client.quit()
            return count
        finally:
            client.close()


class CrashTests(FaultTestCase):
    """SIGKILL under SMTP deliveries and POP3 sessions, then a new process."""

    def check(self, ledger: Ledger, where: str) -> None:
        stored = self.stored()
        for message_id, copies in stored.items():
            self.assertEqual(len(copies), 1, f"{message_id} stored twice {where}")
            body = ledger.bodies[message_id].replace(b"\r\n", b"\n")
            self.assertTrue(copies[0].endswith(b"\n\n" + body), f"{message_id} not whole {where}")
        with ledger.lock:
            lost = ledger.accepted - ledger.deleted - ledger.maybe_deleted - set(stored)
            undeleted = ledger.deleted & set(stored)
        self.assertEqual(lost, set(), f"acknowledged messages lost {where}")
        self.assertEqual(undeleted, set(), f"acknowledged deletions undone {where}")
        # The dead process's leases expire: alice is served, and sees them all.
        self.assertEqual(self.count(), len(stored))

    def test_kill_during_deliveries_and_sessions(self) -> None:
        rng = random.Random(SEED)
        ledger = Ledger()
        traffic = Traffic(self.server, "alice@example.org", PASSWORD, SIZES)
        self.server.start()
        for round_ in range(ROUNDS):
            traffic.round(ledger, rng, f"r{round_}", (0.5, 1.5), self.server.kill)
            self.server.start()
            self.check(ledger, f"after kill {round_ + 1}")
        self.assertTrue(ledger.accepted, "no delivery was ever acknowledged")
        self.assertNotIn("Traceback", self.server.output())

    def test_kill_with_data_in_flight_and_after_the_final_dot(self) -> None:
        """
        One delivery half through DATA, another whose final dot was just
        sent (its 250 not yet read): after the kill each message is whole or
        absent, and neither is ever acknowledged.
        """
        self.server.start()
        big = b"x" * 70 + b"\r\n"

        def until_data(client: socket.socket) -> None:
            reader = client.makefile("rb")
            reader.readline()
            for line in (b"HELO test", b"MAIL FROM:<s@example.net>",
                         b"RCPT TO:<alice@example.org>", b"DATA"):  # fmt: skip
                client.sendall(line + b"\r\n")
                reader.readline()

        half, whole = (socket.create_connection(("127.0.0.1", self.server.smtp)) for _ in "12")
        with half, whole:
            until_data(half)
            until_data(whole)
            half.sendall(crash_message("half@crash.test", big * 20_000)[:700_000])
            whole.sendall(crash_message("whole@crash.test", big * 40_000) + b".\r\n")
            self.server.kill()
        self.server.start()
        stored = self.stored()
        self.assertNotIn("half@crash.test", stored)
        if "whole@crash.test" in stored:
            self.assertTrue(stored["whole@crash.test"][0].endswith(b"\n\n" + b"x" * 70 + b"\n"))
        self.assertLessEqual(self.count(), 1)

    def test_dele_applied_only_by_quit(self) -> None:
        """Killed after DELE, before QUIT: nothing deleted; after QUIT's +OK: deleted once."""
        self.put(*(crash_message(f"m{i}@crash.test", b"body\r\n") for i in range(3)))
        self.server.start()
        client = self.log_in()
        client.dele(1)
        client.dele(2)
        self.server.kill()
        client.close()
        self.server.start()
        self.assertEqual(sorted(self.stored()), ["m0@crash.test", "m1@crash.test",
                                                 "m2@crash.test"])  # fmt: skip
        client = self.log_in()  # once the dead session's lease has expired
        client.dele(2)
        self.assertTrue(client.quit().startswith(b"+OK Bye, 1 deleted"))
        client.close()
        self.server.kill()
        self.server.start()
        self.assertEqual(sorted(self.stored()), ["m0@crash.test", "m2@crash.test"])
        self.assertEqual(self.count(), 2)


class DatabaseAwayTests(FaultTestCase):
    """The database stops under a logged-in session and a delivery, then comes back."""

    def test_away_and_back(self) -> None:
        big = crash_message("big@away.test", (b"y" * 70 + b"\r\n") * 40_000)  # ~3 MB: several reads
        self.put(big, crash_message("small@away.test", b"small\r\n"))
        self.server.start()
        session = self.log_in()
        self.assertEqual(session.stat()[0], 2)
        delivery = smtplib.SMTP("127.0.0.1", self.server.smtp, timeout=15)
        delivery.ehlo()
        delivery.mail("s@example.net")
        self.assertEqual(delivery.rcpt("alice@example.org")[0], 250)
        found: dict[str, object] = {}

        def retr_and_quit() -> None:
            try:
                session.retr(1)
                found["retr"] = b"+OK"
            except poplib.error_proto as e:
                found["retr"] = e.args[0]
            except (OSError, EOFError) as e:
                found["retr"] = e  # the connection closed: the answer could not end
                return
            # The session may also be ended meanwhile: its lease could not
            # be renewed (see PostgresMailbox._lose).
            try:
                session.dele(2)
                found["quit"] = session.quit()
            except poplib.error_proto as e:
                found["quit"] = e.args[0]
            except (OSError, EOFError) as e:
                found["quit"] = e

        def data() -> None:
            try:
                found["data"] = delivery.data(crash_message("refused@away.test", b"no\r\n"))[0]
            except smtplib.SMTPDataError as e:
                found["data"] = e.smtp_code

        def new_login() -> None:
            client = poplib.POP3("127.0.0.1", self.server.pop3, timeout=15)
            client.user("bob@example.org")
            try:
                found["login"] = client.pass_(PASSWORD)
            except poplib.error_proto as e:
                found["login"] = e.args[0]
            client.close()

        database = postgresql()
        database.pause()
        try:
            threads = [threading.Thread(target=f) for f in (retr_and_quit, data, new_login)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
                self.assertFalse(thread.is_alive(), "a client hung")
        finally:
            database.resume()
        session.close()
        delivery.close()
        retr = found["retr"]
        self.assertFalse(isinstance(retr, TimeoutError), "RETR hung")
        if isinstance(retr, bytes):
            self.assertTrue(retr.startswith(b"-ERR [SYS/TEMP]"), retr)
            # QUIT's commit refused, or the session ended: never +OK.
            quit = found["quit"]
            if isinstance(quit, bytes):
                self.assertTrue(quit.startswith(b"-ERR [SYS/TEMP]"), quit)
            elif isinstance(quit, str):
                self.assertEqual(quit, "-ERR EOF")  # poplib: the connection closed
        self.assertIn(found["data"], range(400, 500))
        self.assertTrue(found["login"].startswith(b"-ERR [SYS/TEMP]"), found["login"])

        # Back, the same process: deliveries and logins work again.
        with smtplib.SMTP("127.0.0.1", self.server.smtp, timeout=15) as smtp:
            smtp.sendmail("s@example.net", ["alice@example.org"],
                          crash_message("after@away.test", b"back\r\n"))  # fmt: skip
        self.assertEqual(self.count("bob@example.org"), 0)
        stored = self.stored()
        # Nothing deleted without a QUIT that committed, nothing refused stored.
        self.assertEqual(sorted(stored), ["after@away.test", "big@away.test", "small@away.test"])
        self.assertEqual(self.count(), 3)
        self.assertNotIn("Traceback", self.server.output())
