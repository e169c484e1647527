"""
Each user's last login (time, client address, mechanism), kept by the
server in DATA/lastlogin and shown by ``popserv user list``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from popserv.server.cli import main
from popserv.server.lastlogin import (
    LAST_LOGIN_FILE,
    WRITE_INTERVAL,
    LastLogin,
    LastLogins,
    LastLoginWriter,
    parse,
    read_last_logins,
    render,
)
from tests.support import Session
from tests.support.servers import ServerTestCase, login


class RecordingTests(SynchronousTestCase):
    def session(self, **kwargs) -> tuple[Session, Path]:
        path = Path(self.mktemp())
        s = Session(**kwargs)
        s.factory.last_logins = LastLogins(path)
        return s, path

    def test_login_is_recorded(self) -> None:
        """The time on the server's clock, the client's address without its port, USER."""
        s, _ = self.session()
        s.clock.advance(30)
        s.login()
        self.assertEqual(s.factory.last_logins.get("alice"), LastLogin(30, "127.0.0.1", "USER"))

    def test_sasl_mechanism_and_later_login(self) -> None:
        """A later login replaces the earlier; AUTH records the mechanism's name."""
        s, _ = self.session()
        s.login()
        s.send(b"QUIT\r\n")
        s.protocol.connectionLost(None)
        s.clock.advance(60)
        other = s.connect()
        answer = other.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")  # \0alice\0secret
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertEqual(s.factory.last_logins.get("alice"), LastLogin(60, "127.0.0.1", "PLAIN"))

    def test_failed_login_is_not_recorded(self) -> None:
        s, _ = self.session()
        s.send(b"USER alice\r\nPASS wrong\r\n")
        self.assertIsNone(s.factory.last_logins.get("alice"))
        self.assertFalse(s.factory.last_logins.changed)

    def test_without_last_logins(self) -> None:
        """An embedder's factory keeps none, and logins work as before."""
        s = Session()
        self.assertIsNone(s.factory.last_logins)
        self.assertTrue(s.login().startswith(b"+OK"))

    def test_file_round_trip(self) -> None:
        entries = {
            "bob": LastLogin(1_765_000_000, "2001:db8::1", "SCRAM-SHA-256"),
            "alice": LastLogin(1_765_000_001.7, "192.0.2.1", "USER"),
        }
        data = render(entries)
        self.assertEqual(
            data,
            b"alice\t1765000001\t192.0.2.1\tUSER\nbob\t1765000000\t2001:db8::1\tSCRAM-SHA-256\n",
        )
        self.assertEqual(parse(data + b"junk\nx\ty\tz\tw\n")["alice"].time, 1_765_000_001)
        self.assertNotIn("x", parse(data + b"x\ty\tz\tw\n"))

    def test_separators_are_never_written(self) -> None:
        """A name from another portal with a tab or newline would break the file."""
        last = LastLogins(Path(self.mktemp()))
        last.record("evil\nname", 0, "192.0.2.1", "USER")
        self.assertFalse(last.changed)

    def test_written_every_few_seconds_and_at_stop(self) -> None:
        """
        The file is written once per interval in which someone logged in, not
        per login, and at shutdown: a crash loses at most the last interval.
        """
        s, path = self.session()
        clock = Clock()
        writer = LastLoginWriter(s.factory.last_logins, clock)
        writer.startService()
        s.login()
        self.assertFalse(path.exists())
        clock.advance(WRITE_INTERVAL)
        self.assertEqual(read_last_logins(path)["alice"].address, "127.0.0.1")
        path.unlink()
        clock.advance(WRITE_INTERVAL)
        self.assertFalse(path.exists())  # nothing changed: nothing written
        s.factory.last_logins.record("bob", 5, "192.0.2.2", "APOP")
        writer.stopService()
        self.assertEqual(set(read_last_logins(path)), {"alice", "bob"})

    def test_unwritable_file_is_logged_once_and_kept(self) -> None:
        directory = Path(self.mktemp())
        last = LastLogins(directory / "missing" / LAST_LOGIN_FILE)
        clock = Clock()
        writer = LastLoginWriter(last, clock)
        writer.startService()
        last.record("alice", 1, "192.0.2.1", "USER")
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock.advance(WRITE_INTERVAL)
        clock.advance(WRITE_INTERVAL)
        warnings = [e for e in events if "last logins" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertTrue(last.changed)  # tried again later
        (directory / "missing").mkdir(parents=True)
        writer.stopService()
        self.assertIn("alice", read_last_logins(last.path))


class ListTests(ServerTestCase):
    """Real sessions against the real factory, then ``popserv user list``."""

    def user_list(self) -> str:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        code = main(["--data", str(self.layout.data_dir), "user", "list"])
        self.assertEqual(code, 0)
        return out.getvalue()

    def sessions(self) -> None:
        client = self.pop()
        login(client, "alice", "secret")
        client.quit()
        client = self.pop()
        try:
            client.user("bob")
            client.pass_("wrong")
        except Exception:
            pass
        client.quit()

    async def test_user_list_shows_last_login(self) -> None:
        self.assertEqual(self.user_list(), "alice ARGON2ID never\nbob PLAIN never\n")
        await self.run_in_thread(self.sessions)
        await self.wait_idle()
        last = self.factory.last_logins
        last.save()  # what the writer service does every few seconds
        content = (self.layout.data_dir / LAST_LOGIN_FILE).read_text()
        [line] = content.splitlines()
        user, _, address, mechanism = line.split("\t")
        self.assertEqual((user, address, mechanism), ("alice", "127.0.0.1", "USER"))
        shown = last.get("alice").shown()
        self.assertEqual(self.user_list(), f"alice ARGON2ID {shown}\nbob PLAIN never\n")
        self.assertRegex(shown, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ 127\.0\.0\.1 USER$")

    async def test_login_name_as_typed_is_recorded_as_stored(self) -> None:
        """ALICE logs in as alice (names fold): recorded under the password file's name."""
        def session() -> None:
            client = self.pop()
            login(client, "ALICE", "secret")
            client.quit()

        await self.run_in_thread(session)
        await self.wait_idle()
        self.assertIsNotNone(self.factory.last_logins.get("alice"))
        self.assertIsNone(self.factory.last_logins.get("ALICE"))
