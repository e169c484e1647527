"""
Faults: ``twistd popserv`` killed with SIGKILL while SMTP deliveries and
POP3 deletions run, then restarted.  What was acknowledged must hold: a
message answered 250 is there (unless a DELE of it was committed by a QUIT
answered +OK), a deletion answered +OK stays done, nothing is half-written,
doubled, or left in tmp/, and the maildrop lock does not outlive the process.
"""

from __future__ import annotations

import errno
import io
import os
import poplib
import random
import re
import time
from pathlib import Path

import attrs
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from popserv.core.files import checked_regular
from popserv.server.factory import POP3Factory
from popserv.server.policy import Policy
from popserv.stores.layout import Layout, ensure_maildir
from popserv.stores.maildir import MaildirMailbox, deliver, parse_name
from popserv.stores.maildir import commit as maildir_commit
from popserv.stores.maildir import mailbox as maildir_mailbox
from tests.support import LOCAL_PEER, Connection
from tests.support.crashtraffic import MESSAGE_ID, Ledger, Traffic
from tests.support.maildirs import _MaildirRealm, maildir_contents
from tests.support.processes import LoggedProcess, free_port, twistd_script

#: Kill-and-restart rounds; each is about a second of traffic and a restart.
ROUNDS = 6
SEED = 7
PASSWORD = "pw"
#: Body sizes: a few bytes up to ~300 KB, so kills land in the middle of writes.
SIZES = (10, 1000, 20_000, 300_000)


class ServerProcess(LoggedProcess):
    """``twistd popserv`` on the Maildirs of ``data``, on fresh ports at each start."""

    def __init__(self, base: Path, data: Path) -> None:
        super().__init__(base)
        self.data = data

    def start(self) -> None:
        self.pop3, self.smtp = free_port(), free_port()
        self.spawn([
            twistd_script(), "-n", "--pidfile", "", "popserv",
            "--data", str(self.data),
            "--pop3", f"tcp:{self.pop3}:interface=127.0.0.1",
            "--smtp", f"tcp:{self.smtp}:interface=127.0.0.1",
            "--domain", "example.org", "--hostname", "pop.test",
        ])  # fmt: skip
        self.wait_for_ports(self.pop3, self.smtp)


class CrashTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        self.layout = Layout.create(base / "data")
        self.layout.data_dir.mkdir(parents=True, exist_ok=True)
        self.layout.passwd_path.write_text(f"alice:{{PLAIN}}{PASSWORD}\n")
        self.maildir = ensure_maildir(self.layout.maildir_for("alice"))
        self.server = ServerProcess(base, self.layout.data_dir)
        self.addCleanup(self.server.stop)

    # The checks

    def stored(self) -> dict[str, list[tuple[str, bytes]]]:
        """The visible messages by Message-ID: (directory/name, contents) of each copy."""
        found: dict[str, list[tuple[str, bytes]]] = {}
        for sub in ("new", "cur"):
            for name in os.listdir(self.maildir / sub):
                data = (self.maildir / sub / name).read_bytes()
                match = MESSAGE_ID.search(data)
                self.assertIsNotNone(match, f"a message without our Message-ID: {sub}/{name}")
                found.setdefault(match.group(1).decode(), []).append((f"{sub}/{name}", data))
        return found

    def check(self, ledger: Ledger, round_: int) -> None:
        where = f"after kill {round_ + 1}"
        stored = self.stored()
        for message_id, copies in stored.items():
            self.assertEqual(len(copies), 1, f"{message_id} stored twice {where}: {copies}")
            path, data = copies[0]
            body = ledger.bodies[message_id].replace(b"\r\n", b"\n")
            # Whole: the body as sent, to the last byte, and the size its name says.
            self.assertTrue(data.endswith(b"\n\n" + body), f"{path} is not whole {where}")
            stored_size = parse_name(path.split("/", 1)[1]).stored_size
            self.assertIn(stored_size, (None, len(data)), f"{path}: wrong size {where}")
        with ledger.lock:
            lost = ledger.accepted - ledger.deleted - ledger.maybe_deleted - set(stored)
            undeleted = ledger.deleted & set(stored)
        self.assertEqual(lost, set(), f"acknowledged messages lost {where}")
        self.assertEqual(undeleted, set(), f"acknowledged deletions undone {where}")
        # Half-written deliveries of the killed process are removed at start.
        deadline = time.monotonic() + 10
        while os.listdir(self.maildir / "tmp") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(os.listdir(self.maildir / "tmp"), [], f"tmp/ not cleaned {where}")
        # The lock died with the process: alice logs in at once.
        client = poplib.POP3("127.0.0.1", self.server.pop3, timeout=10)
        try:
            client.user("alice")
            self.assertTrue(client.pass_(PASSWORD).startswith(b"+OK"))
            self.assertEqual(client.stat()[0], sum(len(c) for c in stored.values()))
            client.quit()
        finally:
            client.close()

    def test_kill_during_deliveries_and_deletions(self) -> None:
        rng = random.Random(SEED)
        ledger = Ledger()
        traffic = Traffic(self.server, "alice", PASSWORD, SIZES, between_sessions=0.1)
        self.server.start()
        acknowledged = 0
        for round_ in range(ROUNDS):
            traffic.round(ledger, rng, f"r{round_}", (0.3, 1.5), self.server.kill)
            self.server.start()
            self.check(ledger, round_)
            acknowledged = len(ledger.accepted)
        # The traffic was real: deliveries acknowledged and deletions committed.
        self.assertGreater(acknowledged, ROUNDS)
        self.assertTrue(ledger.deleted, "no deletion was ever committed")


class _FailingRead(io.RawIOBase):
    """A message file whose reads fail after ``good`` octets, as a bad disk block does."""

    def __init__(self, error: int, good: bytes = b"") -> None:
        self.error = error
        self.good = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.good:
            raise OSError(self.error, os.strerror(self.error))
        size = min(len(buffer), len(self.good))
        buffer[:size], self.good = self.good[:size], self.good[size:]
        return size


class StoreFaultTests(SynchronousTestCase):
    """
    I/O errors from the Maildir under a POP3 session: each becomes its
    defined answer, the session or the server goes on, the lock is released.
    """

    MESSAGES = [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n"]

    def setUp(self) -> None:
        self.maildir = ensure_maildir(Path(self.mktemp()).absolute())
        for message in self.MESSAGES:
            deliver(self.maildir, message)
        self.factory = POP3Factory(
            Portal(
                _MaildirRealm(self.maildir),
                [InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")],
            ),
            Policy(hostname="pop.example.org"),
            clock=Clock(),
        )

    def logged_in(self) -> Connection:
        client = Connection(self.factory, LOCAL_PEER)
        client.send(b"USER alice\r\n")
        self.assertTrue(client.send(b"PASS secret\r\n").startswith(b"+OK Logged in, 2"))
        return client

    def next_client_works(self) -> None:
        """Another session logs in (the lock was released) and reads every message."""
        client = self.logged_in()
        bodies = {client.send(b"RETR %d\r\n" % n).split(b"\r\n\r\n")[1] for n in (1, 2)}
        self.assertEqual(bodies, {b"first\r\n.\r\n", b"second\r\n.\r\n"})
        self.assertEqual(client.send(b"QUIT\r\n"), b"+OK Bye, 0 deleted, 2 left\r\n")
        client.close()

    def test_unlink_failures_at_quit(self) -> None:
        """EIO or ENOSPC deleting at UPDATE: -ERR [SYS/TEMP], the messages stay."""
        for code in (errno.EIO, errno.ENOSPC):

            def unlink(*args, code=code, **kwargs):
                raise OSError(code, os.strerror(code))

            client = self.logged_in()
            self.assertEqual(client.send(b"DELE 1\r\n"), b"+OK Message 1 deleted\r\n")
            self.patch(maildir_commit.os, "unlink", unlink)
            answer = client.send(b"QUIT\r\n")
            self.patch(maildir_commit.os, "unlink", os.unlink)
            self.assertEqual(answer, b"-ERR [SYS/TEMP] Some deleted messages were not removed\r\n")
            self.assertTrue(client.transport.disconnecting)
            client.close()
            self.assertEqual(sorted(maildir_contents(self.maildir)), sorted(self.MESSAGES))
            self.next_client_works()

    def test_open_failure_at_retr(self) -> None:
        """EIO or ENOSPC opening a message: -ERR [SYS/TEMP], and the session goes on."""
        for code in (errno.EIO, errno.ENOSPC):

            def failing_open(fd, code=code):
                os.close(fd)
                raise OSError(code, os.strerror(code))

            client = self.logged_in()
            self.patch(maildir_mailbox, "checked_regular", failing_open)
            answer = client.send(b"RETR 1\r\nTOP 2 0\r\n")
            self.patch(maildir_mailbox, "checked_regular", checked_regular)
            failed = b"-ERR [SYS/TEMP] Temporary server failure, try again later\r\n"
            self.assertEqual(answer, failed * 2)
            self.assertEqual(client.send(b"NOOP\r\n"), b"+OK\r\n")
            self.assertIn(b"\r\nSubject: ", b"\r\n" + client.send(b"RETR 1\r\n"))
            client.send(b"QUIT\r\n")
            client.close()
            self.next_client_works()

    def test_read_failure_at_retr(self) -> None:
        """
        EIO reading the start of a message, before its +OK is out:
        -ERR [SYS/TEMP], the error logged, and the session goes on.
        """
        client = self.logged_in()
        self.patch(MaildirMailbox, "open_message", lambda self, index: _FailingRead(errno.EIO))
        answer = client.send(b"RETR 1\r\n")
        self.patch(MaildirMailbox, "open_message", _open_message)
        self.assertEqual(answer, b"-ERR [SYS/TEMP] Temporary server failure, try again later\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertIn(b"\r\nSubject: ", b"\r\n" + client.send(b"RETR 1\r\n"))
        client.send(b"QUIT\r\n")
        client.close()
        self.next_client_works()

    def test_read_failure_during_retr(self) -> None:
        """
        EIO reading a message once its +OK is out: no -ERR can follow (it would
        be read as message text), so the connection is cut, the error logged,
        the lock released, and the next client served.
        """
        # The first chunk (read before the +OK) is good, the next read fails.
        self.factory.policy = attrs.evolve(self.factory.policy, chunk_size=4)
        client = self.logged_in()
        failing = _FailingRead(errno.EIO, good=self.MESSAGES[0][:4])
        self.patch(MaildirMailbox, "open_message", lambda self, index: failing)
        answer = client.send(b"RETR 1\r\n")
        self.patch(MaildirMailbox, "open_message", _open_message)
        # Which message is 1 depends on the order of same-second deliveries.
        self.assertTrue(re.fullmatch(rb"\+OK \d+ octets\r\nSubj", answer), answer)
        self.assertTrue(client.transport.disconnecting or client.transport.disconnected)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        client.close()
        self.next_client_works()


_open_message = MaildirMailbox.open_message
