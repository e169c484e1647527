"""
The limits that protect the server from its clients: connections in all and
per client, the login deadline, sessions per user, the failed-login penalty
and the queue of pipelined commands.  On StringTransports and a fake clock.
"""

from __future__ import annotations

import base64
from hashlib import md5

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides

from popserv.core import errors, wire
from popserv.interfaces import IMailbox
from popserv.server.admission import LocalAdmission
from popserv.server.policy import Policy
from popserv.server.protocol import POP3Protocol
from popserv.stores.memory import MemoryMailbox, MemoryMaildrop
from tests.support import LOCAL_PEER, MESSAGES, REMOTE_PEER, Session

REFUSED = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"


def v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 1234)


def v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 1234)


def policy(**limits) -> Policy:
    return Policy(hostname="pop.example.org", **limits)


class ConnectionLimitTests(SynchronousTestCase):
    def test_refusal_text(self):
        self.assertEqual(wire.err(errors.TooManyConnections()), REFUSED)

    def test_total_limit(self):
        """Over max_connections: one fixed -ERR [SYS/TEMP] and a close, no session."""
        s = Session(policy=policy(max_connections=3))
        s.connect(v4("192.0.2.1"))
        s.connect(v4("192.0.2.2"))
        refused = s.connect(v4("192.0.2.3"))
        self.assertEqual(refused.greeting, REFUSED)
        self.assertTrue(refused.transport.disconnecting)
        self.assertNotIsInstance(refused.protocol, POP3Protocol)
        self.assertEqual(len(s.factory.sessions), 3)
        # Whatever the refused client sends is not read as commands.
        self.assertEqual(refused.send(b"USER alice\r\nPASS secret\r\n"), b"")

    def test_room_again_after_a_close(self):
        s = Session(policy=policy(max_connections=2))
        second = s.connect(v4("192.0.2.2"))
        self.assertEqual(s.connect(v4("192.0.2.3")).greeting, REFUSED)
        second.close()
        self.assertTrue(s.connect(v4("192.0.2.3")).greeting.startswith(b"+OK"))

    def test_per_ip_limit(self):
        s = Session(policy=policy(max_connections_per_ip=2), peer=v4("192.0.2.1"))
        self.assertTrue(s.connect(v4("192.0.2.1")).greeting.startswith(b"+OK"))
        self.assertEqual(s.connect(v4("192.0.2.1")).greeting, REFUSED)
        self.assertTrue(s.connect(v4("192.0.2.2")).greeting.startswith(b"+OK"))
        clients = s.factory.admission.clients("pop3")
        self.assertEqual(clients, {"192.0.2.1": 2, "192.0.2.2": 1})

    def test_ipv6_counted_per_64(self):
        """Addresses in one /64 are one client; the next /64 is another."""
        s = Session(policy=policy(max_connections_per_ip=2), peer=v6("2001:db8:1:2::1"))
        self.assertTrue(s.connect(v6("2001:db8:1:2:ffff:ffff:ffff:9")).greeting.startswith(b"+OK"))
        self.assertEqual(s.connect(v6("2001:db8:1:2::3")).greeting, REFUSED)
        self.assertTrue(s.connect(v6("2001:db8:1:3::1")).greeting.startswith(b"+OK"))
        self.assertIn("2001:db8:1:2::/64", s.factory.admission.clients("pop3"))

    def test_ipv6_prefix_is_a_setting(self):
        s = Session(policy=policy(max_connections_per_ip=1, ipv6_prefix=48),
                    peer=v6("2001:db8:1:2::1"))
        self.assertEqual(s.connect(v6("2001:db8:1:3::1")).greeting, REFUSED)
        self.assertTrue(s.connect(v6("2001:db8:2::1")).greeting.startswith(b"+OK"))

    def test_ipv4_mapped_is_the_ipv4_client(self):
        """A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: the same client."""
        s = Session(policy=policy(max_connections_per_ip=1), peer=v4("192.0.2.1"))
        self.assertEqual(s.connect(v6("::ffff:192.0.2.1")).greeting, REFUSED)

    def test_trusted_networks_have_no_per_ip_limit(self):
        """A webmail on a trusted network may open many; the total limit still holds."""
        s = Session(policy=policy(max_connections_per_ip=1, max_connections=5,
                                  trusted_networks=["192.0.2.0/24"]), peer=v4("192.0.2.7"))
        for _ in range(4):
            self.assertTrue(s.connect(v4("192.0.2.7")).greeting.startswith(b"+OK"))
        self.assertEqual(s.connect(v4("192.0.2.7")).greeting, REFUSED)
        self.assertEqual(dict(s.factory.admission.clients("pop3")), {})

    def test_loopback_is_not_trusted_by_default(self):
        s = Session(policy=policy(max_connections_per_ip=1))
        self.assertEqual(s.connect(LOCAL_PEER).greeting, REFUSED)

    def test_unix_sockets_only_count_in_the_total(self):
        s = Session(policy=policy(max_connections_per_ip=1, max_connections=3),
                    peer=UNIXAddress(None))
        self.assertTrue(s.connect(UNIXAddress(None)).greeting.startswith(b"+OK"))
        self.assertTrue(s.connect(UNIXAddress(None)).greeting.startswith(b"+OK"))
        self.assertEqual(s.connect(UNIXAddress(None)).greeting, REFUSED)

    def test_counts_go_back_to_zero(self):
        """Every way out of a session gives its place back: QUIT, drop, timeout."""
        s = Session(policy=policy(max_connections_per_ip=3), peer=v4("192.0.2.1"))
        quitting, dropping = s.connect(v4("192.0.2.1")), s.connect(v4("192.0.2.1"))
        quitting.send(b"QUIT\r\n")
        quitting.close()
        dropping.close()
        s.clock.advance(61)  # the login deadline
        self.assertTrue(s.transport.disconnected)
        s.protocol.connectionLost(None)
        self.assertEqual(s.factory.sessions, set())
        self.assertEqual(dict(s.factory.admission.clients("pop3")), {})

    def test_implicit_tls_refused_before_the_handshake(self):
        """On a TLS transport a refusal says nothing (it would need a handshake): it aborts."""
        s = Session(policy=policy(max_connections=1))
        transport = StringTransport(peerAddress=REMOTE_PEER)
        directlyProvides(transport, ISSLTransport)
        refusal = s.factory.buildProtocol(REMOTE_PEER)
        refusal.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected)

    def test_refusals_logged_at_most_once_a_minute(self):
        s = Session(policy=policy(max_connections=1))
        with capturedLogs() as events:
            for _ in range(50):
                s.connect(REMOTE_PEER)
            s.clock.advance(60)
            s.connect(REMOTE_PEER)
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        self.assertIn("Refused 1 POP3 connection(s)", warnings[0])
        self.assertIn("Refused 50 POP3 connection(s)", warnings[1])
        self.assertIn("1 connections in all", warnings[1])
        self.assertIn("192.0.2.1:4321", warnings[1])


class LoginDeadlineTests(SynchronousTestCase):
    def test_slow_drip_is_cut_at_the_deadline(self):
        """A byte every 5 s keeps the idle timer young, but not the login deadline."""
        s = Session()
        for _ in range(11):
            s.send(b"x")
            s.clock.advance(5)
        self.assertFalse(s.transport.disconnecting)
        s.send(b"x")
        s.clock.advance(5)
        self.assertTrue(s.transport.disconnected)
        self.assertEqual(s.take(), b"")  # RFC 1939 autologout: no response

    def test_deadline_counts_from_the_connection(self):
        s = Session()
        s.clock.advance(59)
        s.send(b"CAPA\r\n")
        s.clock.advance(0.5)
        self.assertFalse(s.transport.disconnecting)
        s.clock.advance(0.5)
        self.assertTrue(s.transport.disconnected)

    def test_logged_in_sessions_are_not_cut(self):
        s = Session()
        s.clock.advance(30)
        s.login()
        s.clock.advance(500)
        self.assertFalse(s.transport.disconnecting)
        s.clock.advance(101)  # the autologout, 600 s after the last command
        self.assertTrue(s.transport.disconnected)

    def test_own_deadline(self):
        s = Session(policy=policy(login_timeout=5))
        s.clock.advance(5)
        self.assertTrue(s.transport.disconnected)

    def test_cut_during_a_login_releases_everything(self):
        """The deadline passes while a failed login's answer waits: no answer, no leak."""
        s = Session()
        s.clock.advance(59)
        s.send(b"USER alice\r\nPASS wrong\r\n")
        s.clock.advance(1)
        self.assertTrue(s.transport.disconnected)
        s.protocol.connectionLost(None)
        s.clock.advance(10)
        self.assertEqual(s.take(), b"")
        self.assertFalse(s.maildrop.locked)


class _ConcurrentRealm:
    """A realm whose mailboxes allow any number of sessions at once (no lock)."""

    def __init__(self):
        self.opened = 0
        self.closed = 0

    def requestAvatar(self, avatarId, mind, *interfaces):
        self.opened += 1
        mailbox = MemoryMailbox(MemoryMaildrop(MESSAGES))

        def logout():
            self.closed += 1
            mailbox.close()

        return IMailbox, mailbox, logout


class UserSessionLimitTests(SynchronousTestCase):
    def session(self, limit=2):
        s = Session(policy=policy(max_user_sessions=limit))
        self.realm = _ConcurrentRealm()
        s.factory.portal.realm = self.realm
        return s

    def login(self, connection) -> bytes:
        connection.send(b"USER alice\r\n")
        return connection.send(b"PASS secret\r\n")

    def test_limit_is_in_use(self):
        """Over max_user_sessions: -ERR [IN-USE], and the realm is not even asked."""
        s = self.session()
        first, second, third = s.connect(), s.connect(), s.connect()
        self.assertTrue(self.login(first).startswith(b"+OK"))
        self.assertTrue(self.login(second).startswith(b"+OK"))
        self.assertEqual(self.login(third), wire.err(errors.TooManySessions()))
        self.assertEqual(wire.err(errors.TooManySessions())[:14], b"-ERR [IN-USE] ")
        self.assertEqual(self.realm.opened, 2)
        self.assertEqual(s.factory.admission.user_sessions["alice"], 2)

    def test_not_a_failed_login(self):
        """The password was right: no failure counted, no penalty, no wait."""
        s = self.session(limit=1)
        self.login(s.connect())
        other = s.connect()
        for _ in range(5):
            self.assertEqual(self.login(other), wire.err(errors.TooManySessions()))
        self.assertFalse(other.transport.disconnecting)
        self.assertEqual(len(s.factory.admission.penalties), 0)

    def test_counted_until_the_session_ends(self):
        """QUIT and a dropped connection both give the place back."""
        s = self.session(limit=1)
        first = s.connect()
        self.login(first)
        first.send(b"QUIT\r\n")
        first.close()
        second = s.connect()
        self.assertTrue(self.login(second).startswith(b"+OK"))
        second.close()
        self.assertTrue(self.login(s.connect()).startswith(b"+OK"))
        self.assertEqual(self.realm.closed, 2)

    def test_realm_refusal_gives_the_place_back(self):
        """The maildrop lock ([IN-USE] from the realm) does not leave a count behind."""
        s = Session()  # MemoryRealm: one session per maildrop
        s.login()
        for _ in range(3):
            self.assertEqual(self.login(s.connect()), wire.err(errors.MailboxInUse()))
        self.assertEqual(dict(s.factory.admission.user_sessions), {"alice": 1})
        s.send(b"QUIT\r\n")
        self.assertEqual(dict(s.factory.admission.user_sessions), {})

    def test_users_are_separate(self):
        s = self.session(limit=1)
        checker = s.factory.portal.checkers[next(iter(s.factory.portal.checkers))]
        checker.addUser(b"bob", b"pw")
        self.login(s.connect())
        bob = s.connect()
        bob.send(b"USER bob\r\n")
        self.assertTrue(bob.send(b"PASS pw\r\n").startswith(b"+OK"))


class _CountingChecker(InMemoryUsernamePasswordDatabaseDontUse):
    def __init__(self, **users):
        super().__init__(**users)
        self.checks = 0

    def requestAvatarId(self, credentials):
        self.checks += 1
        return super().requestAvatarId(credentials)


class PenaltyTests(SynchronousTestCase):
    def failed_login(self, connection, at: float, s: Session) -> None:
        """A wrong password whose -ERR comes ``at`` seconds later, not sooner."""
        connection.send(b"USER alice\r\n")
        self.assertEqual(connection.send(b"PASS wrong\r\n"), b"")
        s.advance(at - 0.25)
        self.assertEqual(connection.take(), b"")
        s.advance(0.25)
        self.assertIn(b"-ERR [AUTH] ", connection.take())

    def test_delay_doubles_across_sessions(self):
        """2, 4, 8, then 15 s: a new connection does not start the count again."""
        s = Session()
        for delay in (2, 4, 8):
            self.failed_login(s, delay, s)
        self.assertTrue(s.transport.disconnecting)  # three in one session
        again = s.connect()
        self.failed_login(again, 15, s)
        self.failed_login(again, 15, s)

    def test_the_wait_comes_before_the_check(self):
        """A penalised client's next attempt is not even checked until its wait is over."""
        s = Session()
        checker = _CountingChecker(alice=b"secret")
        s.factory.portal.registerChecker(checker)
        self.failed_login(s, 2, s)
        self.assertEqual(checker.checks, 1)
        s.send(b"USER alice\r\nPASS secret\r\n")
        s.advance(1.75)
        self.assertEqual((checker.checks, s.take()), (1, b""))
        s.advance(0.25)
        self.assertEqual(checker.checks, 2)
        self.assertTrue(s.take().startswith(b"+OK Logged in"))

    def test_success_forgives(self):
        s = Session()
        self.failed_login(s, 2, s)
        self.failed_login(s, 4, s)
        s.send(b"USER alice\r\nPASS secret\r\n")
        s.advance(4)
        self.assertTrue(s.take().startswith(b"+OK"))
        self.assertEqual(len(s.factory.admission.penalties), 0)
        self.failed_login(s.connect(), 2, s)

    def test_hanging_up_gains_nothing(self):
        """A client that hangs up instead of waiting for the -ERR is still counted."""
        s = Session()
        for _ in range(3):
            c = s.connect()
            c.send(b"USER alice\r\nPASS wrong\r\n")
            s.advance(s.factory.admission.penalties.delay("127.0.0.1"))
            c.close()
        self.assertEqual(s.factory.admission.penalties.failures("127.0.0.1"), 3)
        self.assertEqual(s.factory.admission.penalties.delay("127.0.0.1"), 8)

    def test_other_clients_are_not_delayed(self):
        """One client's penalty never holds up another's login (no blocking waits)."""
        s = Session(policy=policy(allow_cleartext_auth=True))
        self.failed_login(s, 2, s)
        s.send(b"USER alice\r\nPASS wrong\r\n")
        remote = s.connect(REMOTE_PEER)
        remote.send(b"USER alice\r\n")
        self.assertTrue(remote.send(b"PASS secret\r\n").startswith(b"+OK Logged in"))
        self.assertEqual(s.take(), b"")

    def test_trusted_clients_get_the_fixed_delay(self):
        s = Session(policy=policy(trusted_networks=["127.0.0.0/8"]))
        for _ in range(3):
            self.failed_login(s, 2, s)
        self.failed_login(s.connect(), 2, s)
        self.assertEqual(len(s.factory.admission.penalties), 0)

    def test_every_login_path_counts(self):
        """USER/PASS, APOP and SASL failures all feed one count, and all wait."""
        s = Session()
        self.failed_login(s, 2, s)
        digest = b"0" * 32
        s.send(b"APOP alice " + digest + b"\r\n")
        s.advance(3.75)
        self.assertEqual(s.take(), b"")
        s.advance(0.25)
        self.assertEqual(s.take(), wire.err(errors.APOPFailed()))
        sasl = s.connect()
        sasl.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n")
        s.advance(7.75)
        self.assertEqual(sasl.take(), b"")
        s.advance(0.25)
        self.assertEqual(sasl.take(), wire.err(errors.AuthFailed()))
        self.assertEqual(s.factory.admission.penalties.failures("127.0.0.1"), 3)

    def test_apop_success_waits_the_penalty(self):
        s = Session()
        self.failed_login(s, 2, s)
        timestamp = s.greeting.split()[-1]
        digest = md5(timestamp + b"secret").hexdigest().encode()
        self.assertEqual(s.send(b"APOP alice " + digest + b"\r\n"), b"")
        s.advance(2)
        self.assertTrue(s.take().startswith(b"+OK Logged in"))


#: Floods of bad lines are the cheapest; these tests are about the queue,
#: and the bad-command limit (which would end them early) has its own.
FLOOD = policy(max_bad_commands=10**6)


class PipelineBoundTests(SynchronousTestCase):
    def test_pipelined_flood_is_held_as_bytes(self):
        """
        64 KB of tiny commands from a client that reads nothing: at most
        max_queued_commands lines are split out; the rest stay 64 KB of bytes
        rather than 20,000 objects (about a megabyte).
        """
        s = Session(policy=FLOOD)
        s.protocol.output_paused = True
        s.send(b"AB\n" * 21845)
        self.assertLessEqual(len(s.protocol._queue), s.factory.policy.max_queued_commands)
        self.assertLessEqual(s.protocol._splitter.buffered, 65536)
        self.assertEqual(s.transport.producerState, "paused")
        s.protocol.output_paused = False
        s.protocol.output_resumed()
        self.assertEqual(s.take().count(b"-ERR Unknown command\r\n"), 21845)
        self.assertEqual(s.transport.producerState, "producing")

    def test_a_queue_of_one_still_resumes(self):
        """max_queued_commands=1: reading pauses behind a waiting login, and resumes after."""
        s = Session(policy=policy(max_queued_commands=1))
        s.send(b"USER alice\r\nPASS bad\r\nNOOP\r\n")
        self.assertEqual(s.transport.producerState, "paused")
        s.advance(2)
        self.assertEqual(s.transport.producerState, "producing")
        self.assertTrue(s.take().endswith(wire.err(errors.BadState())))

    def test_half_close_answers_lines_still_in_the_splitter(self):
        s = Session(policy=FLOOD)
        s.protocol.output_paused = True
        s.send(b"NOOP\r\n" * 100 + b"QUIT\r\n")
        s.protocol.readConnectionLost()
        s.protocol.output_paused = False
        s.protocol.output_resumed()
        out = s.take()
        self.assertEqual(out.count(b"-ERR"), 100)
        self.assertTrue(out.endswith(b"+OK Bye\r\n"))
        self.assertTrue(s.transport.disconnecting)


class ParallelPenaltyTests(SynchronousTestCase):
    """The penalty belongs to the client, not to one attempt or one connection."""

    SECONDS = 45

    def attack(self, connections: int) -> int:
        """
        ``connections`` connections from one address guessing alice's
        password for :attr:`SECONDS` seconds, each trying again as soon as
        it is answered (and reconnecting when closed); return the checks made.
        """
        s = Session()
        checker = _CountingChecker(alice=b"secret")
        s.factory.portal.checkers = {}
        s.factory.portal.registerChecker(checker)
        clients = [s.connect() for _ in range(connections)]
        for client in clients:
            client.send(b"USER alice\r\nPASS wrong\r\n")
        for _ in range(self.SECONDS * 4):
            s.advance(0.25)
            for n, client in enumerate(clients):
                if client.transport.disconnecting:
                    client.close()
                    clients[n] = s.connect()
                    clients[n].send(b"USER alice\r\nPASS wrong\r\n")
                elif b"-ERR" in client.take():
                    client.send(b"USER alice\r\nPASS wrong\r\n")
        return checker.checks

    def test_parallel_connections_guess_no_faster(self):
        """
        One client guesses 2, 4, 8, 15 s apart.  Twenty in parallel take
        turns, one check at a time, and guess no faster (57 checks in 45 s
        before the fix).
        """
        sequential = self.attack(1)
        self.assertEqual(sequential, 5)
        # This checker answers at once, so the first failure is counted before
        # the other nineteen are checked; a checker in a thread would let the
        # first round (at most max_connections_per_ip) through together.
        self.assertLessEqual(self.attack(20), sequential + 1)

    def test_turns_are_one_check_at_a_time(self):
        """Once penalised, a client's attempts wait their turn: one check per penalty."""
        s = Session()
        checker = _CountingChecker(alice=b"secret")
        s.factory.portal.checkers = {}
        s.factory.portal.registerChecker(checker)
        s.send(b"USER alice\r\nPASS wrong\r\n")
        self.assertEqual(checker.checks, 1)
        clients = [s.connect() for _ in range(5)]
        for client in clients:
            client.send(b"USER alice\r\nPASS wrong\r\n")
        # The first waits 2 s, then each next one waits its own, longer penalty.
        for elapsed, expected in ((1.75, 1), (0.25, 2), (3.75, 2), (0.25, 3), (7.75, 3), (0.25, 4)):
            s.advance(elapsed)
            self.assertEqual(checker.checks, expected, elapsed)

    def test_a_login_of_ones_own_forgives_only_its_own_failures(self):
        """Alternating guesses at alice with logins as bob keeps alice's penalty growing."""
        s = Session(bob="bobs")
        s.realm.maildrops["bob"] = MemoryMaildrop([])
        delays = []
        for _ in range(3):
            guess = s.connect()
            guess.send(b"USER alice\r\nPASS wrong\r\n")
            waited = 0.0
            while b"-ERR" not in guess.take():
                s.advance(0.25)
                waited += 0.25
            delays.append(waited)
            own = s.connect()
            own.send(b"USER bob\r\nPASS bobs\r\n")
            s.advance(16)
            self.assertIn(b"+OK Logged in", own.take())
            own.send(b"QUIT\r\n")
        self.assertEqual(delays, [2, 4, 8])
        self.assertEqual(s.factory.admission.penalties.failures("127.0.0.1"), 3)

    def test_hanging_up_in_the_queue_gives_up_the_place(self):
        """A client that leaves while waiting its turn does not hold up the next."""
        s = Session()
        s.send(b"USER alice\r\nPASS wrong\r\n")
        s.advance(2)
        waiting = s.connect()
        waiting.send(b"USER alice\r\nPASS wrong\r\n")
        waiting.close()
        after = s.connect()
        after.send(b"USER alice\r\nPASS secret\r\n")
        s.advance(2)
        self.assertIn(b"+OK Logged in", after.take())
        self.assertEqual(s.factory.admission._turns, {})


class _LaterAdmission(LocalAdmission):
    """Answers connection questions only when told, as one asking another process would."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[Deferred, Deferred]] = []

    def connection(self, service, client):
        later: Deferred = Deferred()
        self.asked.append((later, super().connection(service, client)))
        return later

    def answer(self):
        asked, self.asked = self.asked, []
        for later, answer in asked:
            answer.chainDeferred(later)


class PendingAdmissionTests(SynchronousTestCase):
    """An admission that answers later: the session waits, reading and saying nothing."""

    def setUp(self):
        self.s = Session()
        self.admission = _LaterAdmission(policy(max_connections_per_ip=1), self.s.clock)
        self.s.factory.admission = self.admission

    def test_greeting_waits_for_the_answer(self):
        waiting = self.s.connect(v4("192.0.2.9"))
        self.assertEqual(waiting.greeting, b"")
        self.assertEqual(waiting.transport.producerState, "paused")
        self.admission.answer()
        self.assertTrue(waiting.take().startswith(b"+OK POP3 server ready"))
        self.assertEqual(waiting.transport.producerState, "producing")
        self.assertTrue(waiting.send(b"CAPA\r\n").startswith(b"+OK Capability list follows"))
        waiting.close()
        self.assertEqual(self.admission.clients("pop3"), {})

    def test_refused_later(self):
        first, second = self.s.connect(v4("192.0.2.9")), self.s.connect(v4("192.0.2.9"))
        self.admission.answer()
        self.assertTrue(first.take().startswith(b"+OK"))
        self.assertEqual(second.take(), REFUSED)
        self.assertTrue(second.transport.disconnecting)
        second.close()
        self.assertEqual(self.admission.clients("pop3"), {"192.0.2.9": 1})

    def test_gone_before_the_answer(self):
        """A client that leaves before admission answers leaves no count behind."""
        waiting = self.s.connect(v4("192.0.2.9"))
        waiting.close()
        self.admission.answer()
        self.assertEqual(self.admission.clients("pop3"), {})
        self.assertEqual(waiting.take(), b"")


class _OwnPortal:
    """An application's own login service: not a twisted.cred Portal, no checkers."""

    def __init__(self):
        self.closed = 0

    def listCredentialsInterfaces(self):
        return [IUsernamePassword]

    def login(self, credentials, mind, *interfaces):
        if credentials.username != b"alice" or not credentials.checkPassword(b"secret"):
            return fail(UnauthorizedLogin())
        mailbox = MemoryMailbox(MemoryMaildrop(MESSAGES))

        def logout():
            self.closed += 1
            mailbox.close()

        return succeed((IMailbox, mailbox, logout))


class OwnPortalTests(SynchronousTestCase):
    """The factory calls the portal it was given; it never reaches into a Portal's checkers."""

    def setUp(self):
        self.s = Session(policy=policy(max_user_sessions=1))
        self.portal = _OwnPortal()
        self.s.factory.portal = self.portal

    def login(self, connection, password=b"secret"):
        connection.send(b"USER alice\r\n")
        return connection.send(b"PASS " + password + b"\r\n")

    def test_login_through_it(self):
        self.assertTrue(self.login(self.s.connect()).startswith(b"+OK Logged in, 3 messages"))

    def test_refusal_is_a_failed_login(self):
        connection = self.s.connect()
        self.assertEqual(self.login(connection, b"wrong"), b"")
        self.s.advance(2)
        self.assertEqual(connection.take(), wire.err(errors.AuthFailed()))
        self.assertEqual(self.s.factory.admission.penalties.failures("127.0.0.1"), 1)

    def test_offers_only_what_it_takes(self):
        """No IUsernameHashedPassword among its credentials: no APOP, no CRAM-MD5."""
        self.assertFalse(self.s.factory.apop_offered())
        names = [m.name for m in self.s.factory.enabled_mechanisms()]
        self.assertNotIn("CRAM-MD5", names)
        self.assertIn("PLAIN", names)

    def test_sessions_counted_by_login_name(self):
        first, second = self.s.connect(), self.s.connect()
        self.assertTrue(self.login(first).startswith(b"+OK"))
        self.assertEqual(self.login(second), wire.err(errors.TooManySessions()))
        self.assertEqual(self.portal.closed, 1)  # the refused session's mailbox
        first.send(b"QUIT\r\n")
        self.assertEqual(self.s.factory.admission.user_sessions, {})


class _LaterChecker:
    """A checker that answers only when told, as one in a thread pool does."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self):
        self.pending: list[Deferred] = []

    def requestAvatarId(self, credentials):
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


class SlowCheckTests(SynchronousTestCase):
    def test_hanging_up_during_the_check_is_still_counted(self):
        """
        The turn is the attempt's until its check ends, hang-up or not: the
        failure is counted, and the client's next attempt waits for it.
        """
        s = Session()
        checker = _LaterChecker()
        s.factory.portal.checkers = {}
        s.factory.portal.registerChecker(checker)
        first = s.connect()
        first.send(b"USER alice\r\nPASS wrong\r\n")
        checker.pending.pop().errback(UnauthorizedLogin())
        for n in range(3):
            hanging = s.connect()
            hanging.send(b"USER alice\r\nPASS wrong\r\n")
            s.advance(16)  # the penalty waited out: its check is running
            self.assertEqual(len(checker.pending), 1, n)
            hanging.close()
            waiting = s.connect()
            waiting.send(b"USER alice\r\nPASS wrong\r\n")
            s.advance(16)
            self.assertEqual(len(checker.pending), 1, n)  # still the first's turn
            checker.pending.pop().errback(UnauthorizedLogin())
            s.advance(16)
            self.assertEqual(len(checker.pending), 1, n)  # now the next one's
            checker.pending.pop().errback(UnauthorizedLogin())
            waiting.close()
        self.assertEqual(s.factory.admission.penalties.failures("127.0.0.1"), 7)
