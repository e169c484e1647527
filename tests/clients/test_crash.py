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
import signal
import smtplib
import socket
import subprocess
import threading
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
from tests.support.maildirs import _MaildirRealm, maildir_contents
from tests.support.processes import free_port, subprocess_env, twistd_script

#: Kill-and-restart rounds; each is about a second of traffic and a restart.
ROUNDS = 6
SEED = 7
PASSWORD = "pw"
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>$", re.MULTILINE | re.IGNORECASE)


class _Ledger:
    """What the clients were told, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Every message sent or being sent: Message-ID -> body (CRLF form).
        self.bodies: dict[str, bytes] = {}
        #: Message-IDs the server answered 250 to.
        self.accepted: set[str] = set()
        #: Message-IDs whose DELE a QUIT answered +OK committed.
        self.deleted: set[str] = set()
        #: Message-IDs whose DELE was followed by a QUIT with no answer.
        self.maybe_deleted: set[str] = set()


def _body(rng: random.Random) -> bytes:
    """A body of a few bytes up to ~300 KB, so kills land in the middle of writes."""
    size = rng.choice([10, 1000, 20_000, 300_000])
    line = b"".join(rng.choice([b"a", b"b", b".", b" ", b"x"]) for _ in range(70))
    count = max(size // 72, 1)
    return b"".join(b"%d %s\r\n" % (i, line) for i in range(count))


class CrashTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.twistd = twistd_script()
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.layout = Layout.create(self.base / "data")
        self.layout.data_dir.mkdir(parents=True, exist_ok=True)
        self.layout.passwd_path.write_text(f"alice:{{PLAIN}}{PASSWORD}\n")
        self.maildir = ensure_maildir(self.layout.maildir_for("alice"))
        self.process: subprocess.Popen | None = None
        self.addCleanup(self.stop)

    # The server

    def start(self) -> None:
        self.pop3, self.smtp = free_port(), free_port()
        argv = [
            self.twistd, "-n", "--pidfile", "", "popserv",
            "--data", str(self.layout.data_dir),
            "--pop3", f"tcp:{self.pop3}:interface=127.0.0.1",
            "--smtp", f"tcp:{self.smtp}:interface=127.0.0.1",
            "--domain", "example.org", "--hostname", "pop.test",
        ]  # fmt: skip
        log = open(self.base / "twistd.log", "ab")
        self.process = subprocess.Popen(
            argv, env=subprocess_env(), cwd=self.base, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 30
        for port in (self.pop3, self.smtp):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.fail(f"twistd did not start: {self.output()}")
                    time.sleep(0.05)

    def output(self) -> str:
        return (self.base / "twistd.log").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    # The clients

    def sender(self, ledger: _Ledger, name: str, rng: random.Random, stop: threading.Event):
        """Send messages one after the other until the server dies (or ``stop``)."""
        count = 0
        try:
            with smtplib.SMTP("127.0.0.1", self.smtp, timeout=10) as client:
                while not stop.is_set():
                    count += 1
                    message_id = f"{name}.{count}@crash.test"
                    body = _body(rng)
                    with ledger.lock:
                        ledger.bodies[message_id] = body
                    message = (
                        b"From: sender@example.net\r\nTo: alice@example.org\r\n"
                        b"Message-ID: <%s>\r\nSubject: %d\r\n\r\n%s"
                        % (message_id.encode(), count, body)
                    )
                    client.sendmail("sender@example.net", ["alice@example.org"], message)
                    with ledger.lock:
                        ledger.accepted.add(message_id)
        except (OSError, smtplib.SMTPException):
            pass  # Killed under us.

    def deleter(self, ledger: _Ledger, rng: random.Random, stop: threading.Event):
        """POP3 sessions that DELE some messages and QUIT, until the server dies."""
        while not stop.is_set():
            chosen: set[str] = set()
            quitting = False
            try:
                client = poplib.POP3("127.0.0.1", self.pop3, timeout=10)
                try:
                    client.user("alice")
                    client.pass_(PASSWORD)
                    _, listing, _ = client.list()
                    for entry in listing:
                        number = int(entry.split()[0])
                        if rng.random() < 0.5:
                            continue
                        _, header, _ = client.top(number, 0)
                        found = MESSAGE_ID.search(b"\n".join(header))
                        if found is None:
                            continue
                        client.dele(number)
                        chosen.add(found.group(1).decode())
                    quitting = True
                    client.quit()
                finally:
                    client.close()
            except (OSError, poplib.error_proto, EOFError):
                if quitting:
                    with ledger.lock:
                        ledger.maybe_deleted |= chosen
                return
            with ledger.lock:
                ledger.deleted |= chosen
            time.sleep(rng.uniform(0, 0.1))

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

    def check(self, ledger: _Ledger, round_: int) -> None:
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
        client = poplib.POP3("127.0.0.1", self.pop3, timeout=10)
        try:
            client.user("alice")
            self.assertTrue(client.pass_(PASSWORD).startswith(b"+OK"))
            self.assertEqual(client.stat()[0], sum(len(c) for c in stored.values()))
            client.quit()
        finally:
            client.close()

    def test_kill_during_deliveries_and_deletions(self) -> None:
        rng = random.Random(SEED)
        ledger = _Ledger()
        self.start()
        acknowledged = 0
        for round_ in range(ROUNDS):
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=self.sender,
                    args=(ledger, f"r{round_}s{i}", random.Random(rng.random()), stop),
                )
                for i in range(2)
            ]
            threads.append(
                threading.Thread(
                    target=self.deleter, args=(ledger, random.Random(rng.random()), stop)
                )
            )
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.3, 1.5))
            self.kill()
            stop.set()
            for thread in threads:
                thread.join(30)
                self.assertFalse(thread.is_alive(), "a client thread hung")
            self.start()
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
