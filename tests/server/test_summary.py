"""One summary line per session: who, from where, what they did, how it ended."""

from __future__ import annotations

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from popserv.core.body import wire_size
from popserv.logins.accounts import AccountSettings
from popserv.server.policy import Policy
from tests.support import MESSAGES, Session

SIZES = [wire_size(m) for m in MESSAGES]


class SummaryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def summaries(self) -> list[dict]:
        return [
            e
            for e in self.events
            if e.get("summary", "").startswith(("Logged out", "Disconnected"))
        ]

    def test_logged_in_session(self) -> None:
        s = Session()
        s.login()
        retr = s.send(b"RETR 1\r\n")
        s.send(b"TOP 2 0\r\nDELE 3\r\nQUIT\r\n")
        s.protocol.connectionLost(None)
        [event] = self.summaries()
        sizes = [wire_size(m) for m in MESSAGES]
        body = len(retr) - len(retr.split(b"\r\n", 1)[0]) - 2
        self.assertEqual(
            (event["user"], event["mechanism"], event["ended"], event["tls"]),
            ("alice", "USER", "QUIT", "no TLS"),
        )
        self.assertEqual((event["retr"], event["retr_octets"]), (1, body))
        self.assertEqual(event["top"], 1)
        self.assertEqual((event["deleted"], event["deleted_octets"]), (1, sizes[2]))
        left = len(MESSAGES) - 1
        self.assertEqual((event["left"], event["left_octets"]), (left, sum(sizes) - sizes[2]))
        self.assertGreater(event["sent"], body)
        text = formatEvent(event)
        self.assertIn("Logged out alice from 127.0.0.1", text)
        self.assertIn(f"retr=1/{body}", text)
        self.assertIn(f"del=1/{sizes[2]}", text)

    def test_capped_listing(self) -> None:
        """
        A session that saw only the newest messages says how many; ``left`` is
        still the whole maildrop.  (The memory store has no settings of its
        own: the server's cap applies.)
        """
        s = Session(policy=Policy(hostname="h", account=AccountSettings(max_listed=2)))
        s.login()
        self.assertEqual(s.send(b"STAT\r\n"), b"+OK 2 %d\r\n" % sum(SIZES[1:]))
        s.send(b"DELE 1\r\nQUIT\r\n")
        s.protocol.connectionLost(None)
        [event] = self.summaries()
        self.assertEqual((event["listed"], event["left"]), (2, 2))
        self.assertEqual(event["left_octets"], SIZES[0] + SIZES[2])
        self.assertIn(f"left=2/{SIZES[0] + SIZES[2]}, listed=2, sent=", formatEvent(event))
        self.assertEqual(s.maildrop.contents(), [MESSAGES[0], MESSAGES[2]])

    def test_dropped_session_deletes_nothing(self) -> None:
        s = Session()
        s.login()
        s.send(b"DELE 1\r\n")
        s.protocol.connectionLost(None)
        [event] = self.summaries()
        self.assertEqual((event["deleted"], event["ended"]), (0, "disconnected"))
        self.assertEqual(event["left"], len(MESSAGES))

    def test_before_login(self) -> None:
        s = Session()
        s.send(b"USER alice\r\nPASS wrong\r\n")
        s.advance(5)
        s.send(b"QUIT\r\n")
        s.protocol.connectionLost(None)
        [event] = self.summaries()
        self.assertEqual((event["failures"], event["ended"]), (1, "QUIT"))
        self.assertIn("before login", formatEvent(event))

    def test_how_it_ended(self) -> None:
        """Autologout, the login deadline and too many bad commands say so."""
        idle = Session()
        idle.login()
        idle.clock.advance(601)
        late = Session()
        late.clock.advance(61)
        noisy = Session()
        noisy.send(b"XYZZY\r\n" * 10)
        for s in (idle, late, noisy):
            # A StringTransport does not call back when the protocol closes it.
            self.assertTrue(s.transport.disconnecting or s.transport.disconnected)
            s.protocol.connectionLost(None)
        ended = [event["ended"] for event in self.summaries()]
        self.assertEqual(ended, ["autologout", "no login in time", "too many bad commands"])
