"""The POP3 protocol on an in-memory transport and store: every command, every bad input."""

from __future__ import annotations

import io
import re
from hashlib import md5

from twisted.cred.credentials import IUsernameHashedPassword
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from popserv.core import errors, wire
from popserv.core.body import wire_size
from popserv.core.state import State
from popserv.interfaces import IMailbox, ISecretInventory, ISessionInfo
from popserv.logins.accounts import AccountSettings
from popserv.server.policy import Policy
from popserv.server.protocol import SessionInfo
from popserv.stores.memory import MemoryMailbox
from tests.support import MESSAGES, Session


class GreetingTests(SynchronousTestCase):
    def test_greeting_has_apop_timestamp(self):
        """The greeting ends in a fresh <random@host> timestamp of safe characters."""
        first, second = Session(), Session()
        match = re.fullmatch(rb"\+OK .* (<[0-9a-f]{32}@pop\.example\.org>)\r\n", first.greeting)
        self.assertIsNotNone(match)
        self.assertNotEqual(first.greeting, second.greeting)

    def test_nagle_off(self):
        """
        TCP_NODELAY is set on the connection, also under a TLS wrapper: the
        last small write of a long answer must not wait for the client's ACK.
        """

        class NoDelayTransport(StringTransport):
            no_delay = False

            def setTcpNoDelay(self, enabled):
                self.no_delay = enabled

        class Wrapper(StringTransport):
            def __init__(self, inner):
                super().__init__(peerAddress=inner.getPeer())
                self.transport = inner

        s = Session()
        for transport in (NoDelayTransport(), Wrapper(NoDelayTransport())):
            protocol = s.factory.buildProtocol(transport.getPeer())
            protocol.makeConnection(transport)
            tcp = getattr(transport, "transport", transport)
            self.assertTrue(tcp.no_delay)

    def test_no_timestamp_when_apop_is_off(self):
        """With APOP off the greeting has no timestamp and APOP is refused at once."""
        s = Session(policy=Policy(hostname="pop.example.org", apop=False))
        self.assertEqual(s.greeting, b"+OK POP3 server ready\r\n")
        self.assertEqual(s.send(b"APOP alice " + b"0" * 32 + b"\r\n"),
                         wire.err(errors.APOPUnavailable()))
        self.assertEqual(s.protocol.session.failures, 0)

    def test_auto_follows_the_portal(self):
        """
        Auto: offered only when the portal takes APOP credentials and the
        accounts (an ISecretInventory, the checker as a rule) have one it can check.
        """
        s = Session()
        self.assertTrue(s.factory.apop_offered())  # it cannot tell: offered
        s.factory.accounts = _Inventory(False)
        self.assertFalse(s.factory.apop_offered())
        s.factory.accounts = _Inventory(True)
        self.assertTrue(s.factory.apop_offered())
        del s.factory.portal.checkers[IUsernameHashedPassword]
        self.assertFalse(s.factory.apop_offered())


@implementer(ISecretInventory)
class _Inventory:
    def __init__(self, possible):
        self.possible = possible

    def coverage(self, kind):
        return "some" if self.possible else "none"


class AuthorizationTests(SynchronousTestCase):
    def test_user_pass(self):
        s = Session()
        self.assertTrue(s.send(b"USER alice\r\n").startswith(b"+OK"))
        self.assertEqual(s.send(b"PASS secret\r\n"), b"+OK Logged in, 3 messages (%d octets)\r\n"
                         % sum(wire_size(m) for m in MESSAGES))
        self.assertIs(s.protocol.state, State.TRANSACTION)

    def test_keywords_case_insensitive(self):
        s = Session()
        s.send(b"user alice\r\n")
        self.assertTrue(s.send(b"pAsS secret\r\n").startswith(b"+OK"))
        self.assertTrue(s.send(b"stat\r\n").startswith(b"+OK 3 "))

    def test_wrong_password_delayed_auth_error(self):
        """A failed login answers -ERR [AUTH] only after the delay."""
        s = Session()
        s.send(b"USER alice\r\n")
        self.assertEqual(s.send(b"PASS wrong\r\n"), b"")
        s.clock.advance(s.factory.policy.auth_failure_delay)
        self.assertEqual(s.take(), b"-ERR [AUTH] Authentication failed\r\n")
        self.assertIs(s.protocol.state, State.AUTHORIZATION)

    def test_unknown_user_same_answer(self):
        s = Session()
        s.send(b"USER nobody\r\n")
        s.send(b"PASS secret\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take(), b"-ERR [AUTH] Authentication failed\r\n")

    def test_third_failure_closes(self):
        s = Session()
        for _ in range(2):
            s.send(b"USER alice\r\nPASS bad\r\n")
            s.clock.advance(10)
            self.assertTrue(s.take().endswith(b"-ERR [AUTH] Authentication failed\r\n"))
            self.assertFalse(s.transport.disconnecting)
        s.send(b"USER alice\r\nPASS bad\r\n")
        s.clock.advance(10)
        self.assertIn(b"-ERR [AUTH]", s.take())
        self.assertTrue(s.transport.disconnecting)

    def test_pass_without_user(self):
        s = Session()
        self.assertEqual(s.send(b"PASS secret\r\n"), b"-ERR Command not valid in this state\r\n")

    def test_pass_keeps_spaces(self):
        """Everything after PASS and one space is the password."""
        s = Session(alice=" two words ")
        s.send(b"USER alice\r\n")
        self.assertTrue(s.send(b"PASS  two words \r\n").startswith(b"+OK"))

    def test_non_utf8_password(self):
        s = Session()
        s.send(b"USER alice\r\n")
        s.send(b"PASS \xff\xfe\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take(), b"-ERR [AUTH] Authentication failed\r\n")

    def test_apop(self):
        s = Session()
        timestamp = s.greeting.split()[-1]
        digest = md5(timestamp + b"secret").hexdigest().encode()
        self.assertTrue(s.send(b"APOP alice " + digest + b"\r\n").startswith(b"+OK Logged in"))

    def test_apop_wrong_digest(self):
        s = Session()
        s.send(b"APOP alice " + b"0" * 32 + b"\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take(), wire.err(errors.APOPFailed()))
        self.assertIn(b"[AUTH]", wire.err(errors.APOPFailed()))

    def test_apop_malformed(self):
        s = Session()
        for line in (b"APOP\r\n", b"APOP alice\r\n", b"APOP alice  abc\r\n", b"APOP a b c\r\n"):
            self.assertEqual(s.send(line), b"-ERR Invalid arguments\r\n", line)
        s.send(b"APOP alice nothex\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take(), wire.err(errors.APOPFailed()))

    def test_in_use(self):
        """A second session on a locked maildrop gets [IN-USE] and stays usable."""
        s = Session()
        s.login()
        other = Session()
        other.realm.maildrops["alice"] = s.maildrop
        other.send(b"USER alice\r\n")
        self.assertEqual(other.send(b"PASS secret\r\n"), wire.err(errors.MailboxInUse()))
        self.assertIn(b"-ERR [IN-USE] ", wire.err(errors.MailboxInUse()))
        s.send(b"QUIT\r\n")
        other.send(b"USER alice\r\n")
        self.assertTrue(other.send(b"PASS secret\r\n").startswith(b"+OK"))

    def test_transaction_commands_refused_before_login(self):
        s = Session()
        for verb in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL"):
            self.assertEqual(s.send(verb + b"\r\n"), b"-ERR Command not valid in this state\r\n")

    def test_stls_without_certificate(self):
        """STLS with no certificate: a truthful -ERR, and the session goes on in clear."""
        s = Session()
        self.assertEqual(s.send(b"STLS\r\n"), b"-ERR TLS is not available on this server\r\n")
        self.assertTrue(s.login().startswith(b"+OK"))
        self.assertEqual(s.send(b"STLS\r\n"), wire.err(errors.BadState()))

    def test_nothing_runs_after_quit(self):
        """Commands pipelined behind QUIT are dropped: no login after +OK Bye."""
        s = Session()
        self.assertEqual(s.send(b"QUIT\r\nUSER alice\r\nPASS secret\r\nNOOP\r\n"), b"+OK Bye\r\n")
        self.assertFalse(s.maildrop.locked)
        self.assertEqual(s.send(b"USER alice\r\n"), b"")

    def test_nothing_runs_after_quit_in_transaction(self):
        s = Session()
        s.login()
        out = s.send(b"DELE 1\r\nQUIT\r\nSTAT\r\nRETR 2\r\n")
        self.assertEqual(out, b"+OK Message 1 deleted\r\n+OK Bye, 1 deleted, 2 left\r\n")

    def test_nothing_runs_after_too_many_failures(self):
        """Logins queued behind the closing failure are never checked."""
        s = Session()
        s.send(b"USER alice\r\nPASS a\r\nUSER alice\r\nPASS b\r\nUSER alice\r\nPASS c\r\n"
               b"USER alice\r\nPASS secret\r\n")
        for _ in range(4):
            s.clock.advance(10)
        out = s.take()
        self.assertEqual(out.count(b"-ERR"), 3)
        self.assertNotIn(b"Logged in", out)
        self.assertFalse(s.maildrop.locked)

    def test_not_valid_in_this_state(self):
        """A known command in the wrong state is refused as such, in every state."""
        s = Session()
        self.assertEqual(s.send(b"STAT\r\n"), wire.err(errors.BadState()))
        s.login()
        self.assertEqual(s.send(b"AUTH\r\n"), wire.err(errors.BadState()))
        self.assertEqual(s.send(b"XTST\r\n"), wire.err(errors.UnknownCommand()))

    def test_half_close_answers_then_closes(self):
        """Commands followed by EOF are all answered, then the connection closes."""
        s = Session()
        s.protocol.dataReceived(b"USER alice\r\nPASS secret\r\nDELE 1\r\nSTAT\r\n")
        self.assertFalse(s.transport.disconnecting)
        s.protocol.readConnectionLost()
        self.assertEqual(len(s.take().split(b"\r\n")), 5)
        self.assertTrue(s.transport.disconnecting)
        s.protocol.connectionLost(None)
        # No QUIT: a drop, nothing deleted.
        self.assertEqual(s.maildrop.contents(), MESSAGES)
        self.assertFalse(s.maildrop.locked)

    def test_half_close_waits_for_a_login(self):
        s = Session()
        s.protocol.dataReceived(b"USER alice\r\nPASS wrong\r\n")
        s.protocol.readConnectionLost()
        self.assertFalse(s.transport.disconnecting)
        s.clock.advance(10)
        self.assertTrue(s.take().endswith(wire.err(errors.AuthFailed())))
        self.assertTrue(s.transport.disconnecting)

    def test_quit_before_login(self):
        s = Session()
        self.assertEqual(s.send(b"QUIT\r\n"), b"+OK Bye\r\n")
        self.assertTrue(s.transport.disconnecting)


class CapaTests(SynchronousTestCase):
    def capa(self, s):
        lines = s.lines(b"CAPA\r\n")
        self.assertEqual(lines[0], b"+OK Capability list follows")
        self.assertEqual(lines[-1], b".")
        return lines[1:-1]

    def test_capa_before_login(self):
        caps = self.capa(Session())
        for cap in (b"TOP", b"USER", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING",
                    b"LOGIN-DELAY 0", b"EXPIRE NEVER"):
            self.assertIn(cap, caps)
        self.assertTrue(any(c.startswith(b"IMPLEMENTATION popserv-") for c in caps))

    def test_capa_after_login_uses_account_settings(self):
        s = Session(policy=Policy(hostname="h", account=AccountSettings(900, 30)))
        s.login()
        caps = self.capa(s)
        self.assertIn(b"LOGIN-DELAY 900", caps)
        self.assertIn(b"EXPIRE 30", caps)

    def test_capa_sources_added_by_the_application(self):
        """factory.capabilities: a source an application adds is asked at each CAPA."""
        s = Session()
        s.factory.capabilities.append(lambda session: [f"X-STATE {session.state.value}"])
        self.assertEqual(self.capa(s)[-1], b"X-STATE AUTHORIZATION")
        s.login()
        self.assertEqual(self.capa(s)[-1], b"X-STATE TRANSACTION")


class TransactionTests(SynchronousTestCase):
    def setUp(self):
        self.s = Session()
        self.s.login()

    def test_stat(self):
        total = sum(wire_size(m) for m in MESSAGES)
        self.assertEqual(self.s.send(b"STAT\r\n"), b"+OK 3 %d\r\n" % total)

    def test_list(self):
        lines = self.s.lines(b"LIST\r\n")
        self.assertEqual(lines[1:], [b"%d %d" % (i + 1, wire_size(m)) for i, m in
                                     enumerate(MESSAGES)] + [b"."])
        self.assertEqual(self.s.send(b"LIST 2\r\n"), b"+OK 2 %d\r\n" % wire_size(MESSAGES[1]))

    def test_retr_exact_bytes(self):
        """RETR sends CRLF lines, stuffed dots, a CRLF after a last line without one."""
        data = self.s.send(b"RETR 1\r\n")
        self.assertEqual(
            data,
            b"+OK %d octets\r\nFrom: a@example.org\r\nSubject: one\r\n\r\nHello\r\n"
            b"..dotted line\r\n.\r\n" % wire_size(MESSAGES[0]),
        )
        self.assertTrue(self.s.send(b"RETR 3\r\n").endswith(b"\r\n\r\nno final newline\r\n.\r\n"))

    def test_size_matches_retr(self):
        for n, message in enumerate(MESSAGES, 1):
            body = self.s.send(b"RETR %d\r\n" % n).split(b"\r\n", 1)[1][: -len(b".\r\n")]
            unstuffed = body.replace(b"\r\n..", b"\r\n.")
            self.assertEqual(len(unstuffed), wire_size(message))

    def test_top(self):
        self.assertEqual(
            self.s.send(b"TOP 2 0\r\n"),
            b"+OK Top of message follows\r\nFrom: b@example.org\r\nSubject: two\r\n\r\n.\r\n",
        )
        self.assertTrue(self.s.send(b"TOP 2 2\r\n").endswith(b"\r\n\r\nline 1\r\nline 2\r\n.\r\n"))
        whole = self.s.send(b"TOP 2 99999999\r\n")
        self.assertTrue(whole.endswith(b"line 3\r\n.\r\n"))

    def test_top_message_without_body(self):
        s = Session(messages=[b"Subject: only headers\n"])
        s.login()
        self.assertEqual(
            s.send(b"TOP 1 5\r\n"), b"+OK Top of message follows\r\nSubject: only headers\r\n.\r\n"
        )

    def test_uidl(self):
        lines = self.s.lines(b"UIDL\r\n")
        self.assertEqual(lines[1:], [b"1 m1", b"2 m2", b"3 m3", b"."])
        self.assertEqual(self.s.send(b"UIDL 3\r\n"), b"+OK 3 m3\r\n")

    def test_dele_hides_message(self):
        s = self.s
        self.assertEqual(s.send(b"DELE 2\r\n"), b"+OK Message 2 deleted\r\n")
        self.assertTrue(s.send(b"STAT\r\n").startswith(b"+OK 2 "))
        self.assertEqual(s.lines(b"LIST\r\n")[1:-1], [
            b"1 %d" % wire_size(MESSAGES[0]), b"3 %d" % wire_size(MESSAGES[2])])
        self.assertEqual(s.lines(b"UIDL\r\n")[1:-1], [b"1 m1", b"3 m3"])
        for line in (b"RETR 2", b"TOP 2 0", b"DELE 2", b"LIST 2", b"UIDL 2"):
            self.assertEqual(s.send(line + b"\r\n"), b"-ERR Message is deleted\r\n")

    def test_rset_restores_numbering(self):
        s = self.s
        s.send(b"DELE 1\r\nDELE 3\r\n")
        self.assertTrue(s.send(b"RSET\r\n").startswith(b"+OK 3 messages"))
        self.assertEqual(s.lines(b"UIDL\r\n")[1:-1], [b"1 m1", b"2 m2", b"3 m3"])

    def test_quit_applies_deletions(self):
        s = self.s
        s.send(b"DELE 1\r\nDELE 3\r\n")
        self.assertTrue(s.send(b"QUIT\r\n").startswith(b"+OK"))
        self.assertEqual(s.maildrop.contents(), [MESSAGES[1]])
        self.assertFalse(s.maildrop.locked)

    def test_drop_deletes_nothing(self):
        s = self.s
        s.send(b"DELE 1\r\n")
        s.protocol.connectionLost(None)
        self.assertEqual(s.maildrop.contents(), MESSAGES)
        self.assertFalse(s.maildrop.locked)

    def test_bad_arguments(self):
        """Each malformed argument gets a defined -ERR and the session goes on."""
        # More bad lines in a row than the limit allows: lift it for this test.
        s = Session(policy=Policy(hostname="h", max_bad_commands=10**6))
        s.login()
        cases = {
            b"RETR": b"-ERR Invalid arguments",
            b"RETR ": b"-ERR Invalid arguments",
            b"RETR 0": b"-ERR No such message",
            b"RETR 4": b"-ERR No such message",
            b"RETR -1": b"-ERR Invalid arguments",
            b"RETR +1": b"-ERR Invalid arguments",
            b"RETR 1x": b"-ERR Invalid arguments",
            b"RETR 1 2": b"-ERR Invalid arguments",
            b"RETR  1": b"-ERR Invalid arguments",
            b"RETR 99999999999999999999999": b"-ERR Invalid arguments",
            b"RETR 999999999999": b"-ERR No such message",
            b"RETR \xd9\xa1": b"-ERR Invalid arguments",
            b"DELE": b"-ERR Invalid arguments",
            b"DELE 0": b"-ERR No such message",
            b"LIST 0": b"-ERR No such message",
            b"LIST a": b"-ERR Invalid arguments",
            b"LIST 1 1": b"-ERR Invalid arguments",
            b"UIDL 9": b"-ERR No such message",
            b"TOP 1": b"-ERR Invalid arguments",
            b"TOP 1 -1": b"-ERR Invalid arguments",
            b"TOP 0 1": b"-ERR No such message",
            b"TOP 1 1 1": b"-ERR Invalid arguments",
            b"STAT 1": b"-ERR Invalid arguments",
            b"NOOP x": b"-ERR Invalid arguments",
            b"RSET x": b"-ERR Invalid arguments",
            b"QUIT now": b"-ERR Invalid arguments",
            b"LAST": b"-ERR Unknown command",
            b"XTND XMIT": b"-ERR Unknown command",
            b"": b"-ERR Unknown command",
            b" STAT": b"-ERR Unknown command",
            b"ST\x00T": b"-ERR Unknown command",
            b"USER alice": b"-ERR Command not valid in this state",
            b"\xff\xfe": b"-ERR Unknown command",
        }
        for line, expected in cases.items():
            self.assertEqual(s.send(line + b"\r\n"), expected + b"\r\n", line)
        self.assertEqual(s.send(b"NOOP\r\n"), b"+OK\r\n")
        self.assertTrue(s.send(b"STAT\r\n").startswith(b"+OK 3 "))

    def test_client_bytes_never_echoed(self):
        out = self.s.send(b"XYZZY <script>secret\r\nRETR evil-token\r\n")
        self.assertNotIn(b"script", out)
        self.assertNotIn(b"evil", out)


class LineTests(SynchronousTestCase):
    def test_bare_lf(self):
        s = Session()
        s.send(b"USER alice\n")
        self.assertTrue(s.send(b"PASS secret\n").startswith(b"+OK"))

    def test_byte_at_a_time(self):
        s = Session()
        out = b"".join(s.send(bytes([c])) for c in b"USER alice\r\nPASS secret\r\nSTAT\r\n")
        self.assertEqual(out.count(b"+OK"), 3)

    def test_long_line_refused_and_session_continues(self):
        s = Session()
        s.login()
        out = s.send(b"NOOP " + b"x" * 300 + b"\r\nSTAT\r\n")
        self.assertEqual(out.split(b"\r\n")[0], b"-ERR Line too long")
        self.assertTrue(out.split(b"\r\n")[1].startswith(b"+OK 3 "))

    def test_long_line_in_pieces(self):
        """A long line sent in many writes gets one -ERR, at its end's turn."""
        s = Session()
        s.login()
        out = b"".join(s.send(b"y" * 100) for _ in range(20))
        self.assertEqual(out, b"-ERR Line too long\r\n")
        self.assertEqual(s.send(b"zzz\r\nNOOP\r\n"), b"+OK\r\n")

    def test_line_of_255_octets_accepted(self):
        s = Session(alice="p" * 248)
        s.send(b"USER alice\r\n")
        line = b"PASS " + b"p" * 248 + b"\r\n"
        self.assertEqual(len(line), 255)
        self.assertTrue(s.send(line).startswith(b"+OK"))

    def test_pipelining_in_order(self):
        s = Session()
        out = s.lines(b"USER alice\r\nPASS secret\r\nSTAT\r\nUIDL 1\r\nDELE 1\r\nSTAT\r\nQUIT\r\n")
        self.assertEqual(out[2][:6], b"+OK 3 ")
        self.assertEqual(out[3], b"+OK 1 m1")
        self.assertEqual(out[4], b"+OK Message 1 deleted")
        self.assertEqual(out[5][:6], b"+OK 2 ")
        self.assertTrue(out[6].startswith(b"+OK Bye"))
        self.assertEqual(s.maildrop.contents(), MESSAGES[1:])

    def test_pipelined_failed_login_holds_later_commands(self):
        """Commands after a failing PASS wait for its delayed answer."""
        s = Session()
        self.assertEqual(s.send(b"USER alice\r\nPASS bad\r\nNOOP\r\n"), b"+OK Send PASS\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take(), b"-ERR [AUTH] Authentication failed\r\n"
                         b"-ERR Command not valid in this state\r\n")

    def test_many_pipelined_commands(self):
        """Thousands of commands in one read neither recurse deeply nor get lost."""
        s = Session()
        s.login()
        out = s.send(b"NOOP\r\n" * 5000)
        self.assertEqual(out.count(b"+OK\r\n"), 5000)

    def test_reading_pauses_while_queue_long(self):
        # NOOP before login is a bad command: no limit to end the test early.
        s = Session(policy=Policy(hostname="h", max_bad_commands=10**6))
        s.send(b"USER alice\r\nPASS bad\r\n" + b"NOOP\r\n" * 100)
        self.assertEqual(s.transport.producerState, "paused")
        s.clock.advance(10)
        self.assertEqual(s.transport.producerState, "producing")


UNKNOWN = wire.err(errors.UnknownCommand())
TOO_MANY_BAD = wire.err(errors.TooManyBadCommands())


class BadCommandLimitTests(SynchronousTestCase):
    """Policy.max_bad_commands bad lines in a row: -ERR, and the session closes."""

    def test_closes_at_the_limit(self):
        """Nine unknown commands are refused; the tenth gets the last -ERR and the close."""
        s = Session()
        self.assertEqual(Policy(hostname="h").max_bad_commands, 10)
        for _ in range(9):
            self.assertEqual(s.send(b"XYZZY\r\n"), UNKNOWN)
        self.assertFalse(s.transport.disconnecting)
        self.assertEqual(s.send(b"XYZZY\r\n"), TOO_MANY_BAD)
        self.assertEqual(TOO_MANY_BAD, b"-ERR Too many bad commands, closing connection\r\n")
        self.assertTrue(s.transport.disconnecting)
        self.assertEqual(s.send(b"USER alice\r\n"), b"")

    def test_every_kind_of_bad_line_counts(self):
        """Unknown, malformed arguments, not valid in this state, too long: one count."""
        s = Session(policy=Policy(hostname="h", max_bad_commands=4))
        out = s.send(b"XYZZY\r\nRETR x\r\nSTAT\r\n" + b"x" * 300 + b"\r\n")
        self.assertEqual(out, UNKNOWN + wire.err(errors.BadArguments())
                         + wire.err(errors.BadState()) + TOO_MANY_BAD)
        self.assertTrue(s.transport.disconnecting)

    def test_a_good_command_resets_the_count(self):
        """Nine bad, one good, nine bad: still open; the tenth in a row closes."""
        s = Session()
        self.assertEqual(s.send(b"XYZZY\r\n" * 9 + b"USER alice\r\n" + b"XYZZY\r\n" * 9),
                         UNKNOWN * 9 + b"+OK Send PASS\r\n" + UNKNOWN * 9)
        self.assertFalse(s.transport.disconnecting)
        self.assertEqual(s.send(b"XYZZY\r\n"), TOO_MANY_BAD)

    def test_a_command_that_fails_resets_the_count(self):
        """A well-formed command that fails (no such message) is not a bad command."""
        s = Session()
        s.login()
        out = s.send(b"XYZZY\r\n" * 9 + b"RETR 99\r\n" + b"XYZZY\r\n" * 9)
        self.assertEqual(out, UNKNOWN * 9 + wire.err(errors.NoSuchMessage()) + UNKNOWN * 9)
        self.assertFalse(s.transport.disconnecting)

    def test_pipelined_lines_after_the_limit_never_run(self):
        """A login pipelined behind the tenth bad line is not read, not checked."""
        s = Session()
        out = s.send(b"XYZZY\r\n" * 10 + b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(out, UNKNOWN * 9 + TOO_MANY_BAD)
        self.assertFalse(s.maildrop.locked)

    def test_closing_in_transaction_deletes_nothing(self):
        """Closed for bad commands after a DELE: no QUIT, so nothing is deleted."""
        s = Session()
        s.login()
        s.send(b"DELE 1\r\n")
        self.assertTrue(s.send(b"LAST\r\n" * 10).endswith(TOO_MANY_BAD))
        self.assertTrue(s.transport.disconnecting)
        s.protocol.connectionLost(None)
        self.assertEqual(s.maildrop.contents(), MESSAGES)
        self.assertFalse(s.maildrop.locked)

    def test_logged(self):
        """The close is logged with the client's address."""
        s = Session(policy=Policy(hostname="h", max_bad_commands=1))
        with capturedLogs() as events:
            s.send(b"GET / HTTP/1.1\r\n")
        texts = [formatEvent(e) for e in events]
        self.assertIn("1 bad commands in a row from 127.0.0.1:4321, closing", texts)


class _Stream(io.BytesIO):
    """A message stream that records its closing, and can fail to close."""

    def __init__(self, data, fail_close=False):
        super().__init__(data)
        self.fail_close = fail_close
        self.closes = 0

    def close(self):
        self.closes += 1
        super().close()
        if self.fail_close:
            raise OSError("close failed")


class _SlowMailbox(MemoryMailbox):
    """open_message answers later, through a Deferred the test fires."""

    def __init__(self, maildrop, fail_close=False):
        super().__init__(maildrop)
        self.pending: list[Deferred] = []
        self.streams: list[_Stream] = []
        self.fail_close = fail_close

    def open_message(self, index):
        stream = _Stream(super().open_message(index).getvalue(), self.fail_close)
        self.streams.append(stream)
        d = Deferred()
        self.pending.append((d, stream))
        return d


class StreamCleanupTests(SynchronousTestCase):
    def session(self, fail_close=False):
        s = Session()
        mailboxes = []

        def requestAvatar(avatarId, mind, *interfaces):
            mailbox = _SlowMailbox(s.maildrop, fail_close)
            mailboxes.append(mailbox)
            return IMailbox, mailbox, mailbox.close

        self.patch(s.realm, "requestAvatar", requestAvatar)
        s.login()
        return s, mailboxes[0]

    def test_drop_while_message_opens(self):
        """The connection drops before open_message answers: the file is closed, lock freed."""
        s, mailbox = self.session()
        s.send(b"RETR 1\r\n")
        s.protocol.connectionLost(None)
        d, stream = mailbox.pending.pop()
        d.callback(stream)
        self.assertEqual(stream.closes, 1)
        self.assertFalse(s.maildrop.locked)
        self.assertEqual(s.take(), b"")

    def test_close_failing_at_end_of_retr(self):
        """A stream whose close() raises: the RETR answer is whole, the session goes on."""
        s, mailbox = self.session(fail_close=True)
        s.send(b"RETR 1\r\nNOOP\r\n")
        d, stream = mailbox.pending.pop()
        d.callback(stream)
        out = s.take()
        self.assertTrue(out.endswith(b"\r\n.\r\n+OK\r\n"), out)
        self.assertFalse(s.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_close_failing_on_drop_still_releases(self):
        """Dropped mid-RETR with a stream whose close() raises: the lock is still released."""
        s, mailbox = self.session(fail_close=True)
        s.send(b"RETR 1\r\n")
        s.protocol.output_paused = True  # the client stops reading
        d, stream = mailbox.pending.pop()
        d.callback(stream)
        self.assertEqual(s.take(), b"+OK %d octets\r\n" % wire_size(MESSAGES[0]))
        s.protocol.connectionLost(None)
        self.assertEqual(stream.closes, 1)
        self.assertFalse(s.maildrop.locked)
        self.flushLoggedErrors(OSError)


class LocalPeerTests(SynchronousTestCase):
    def test_is_local(self):
        """Loopback (v4, v6, v4-mapped) and UNIX sockets are local; others are not."""
        policy = Policy(hostname="h")
        local = [IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.9.9.9", 1),
                 IPv6Address("TCP", "::1", 1), IPv6Address("TCP", "::ffff:127.0.0.1", 1),
                 UNIXAddress(b"/run/popserv.sock"), UNIXAddress(None)]
        remote = [IPv4Address("TCP", "192.0.2.1", 1), IPv6Address("TCP", "2001:db8::1", 1),
                  IPv6Address("TCP", "::ffff:192.0.2.1", 1), IPv6Address("TCP", "fe80::1%eth0", 1),
                  None]
        for peer in local:
            self.assertTrue(policy.is_local(peer), peer)
        for peer in remote:
            self.assertFalse(policy.is_local(peer), peer)

    def test_own_networks(self):
        policy = Policy(hostname="h", local_networks=["127.0.0.1/32", "10.0.0.0/8"])
        self.assertTrue(policy.is_local(IPv4Address("TCP", "10.1.2.3", 1)))
        self.assertFalse(policy.is_local(IPv4Address("TCP", "127.0.0.2", 1)))


class LogTests(SynchronousTestCase):
    def test_login_logged_with_peer(self):
        """Logins are logged with the user and host:port, never the password."""
        with capturedLogs() as events:
            s = Session()
            s.login()
        text = [formatEvent(e) for e in events]
        self.assertIn("alice logged in from 127.0.0.1:4321", text)
        self.assertFalse(any("secret" in line for line in text))

    def test_session_info_provides_interface(self):
        s = Session()
        verifyObject(ISessionInfo, s.protocol.info)
        self.assertEqual((s.protocol.info.local, s.protocol.info.tls), (True, None))

    def test_ipv6_peer(self):
        info = SessionInfo(IPv6Address("TCP", "::1", 110), secure=False)
        self.assertEqual(info.where, "[::1]:110")
        self.assertEqual(SessionInfo(None, secure=False).where, "None")


class TimeoutTests(SynchronousTestCase):
    def test_autologout(self):
        s = Session()
        s.login()
        s.send(b"DELE 1\r\n")
        s.clock.advance(599)
        self.assertFalse(s.transport.disconnecting)
        s.clock.advance(2)
        # RFC 1939 section 3: closed without any response, aborted at once.
        self.assertEqual(s.take(), b"")
        self.assertTrue(s.transport.disconnected)
        self.assertEqual(s.send(b"QUIT\r\n"), b"")
        s.protocol.connectionLost(None)
        self.assertEqual(s.maildrop.contents(), MESSAGES)
        self.assertFalse(s.maildrop.locked)

    def test_autologout_mid_retr_sends_nothing(self):
        """A client that stops reading a RETR is cut off, with no -ERR inside the body."""
        s = Session(messages=[b"Subject: big\n\n" + b"x" * 100 + b"\n"] * 2)
        s.login()
        s.protocol.output_paused = True  # the client's receive window is full
        s.send(b"RETR 1\r\n")
        s.take()
        s.clock.advance(601)
        self.assertEqual(s.take(), b"")
        self.assertTrue(s.transport.disconnected)
        s.protocol.connectionLost(None)
        self.assertFalse(s.maildrop.locked)

    def test_activity_resets_timer(self):
        s = Session()
        s.login()
        s.clock.advance(500)
        s.send(b"CAPA\r\n")
        s.clock.advance(500)
        self.assertFalse(s.transport.disconnecting)


class ExpireTests(SynchronousTestCase):
    def test_expire_zero_deletes_retrieved(self):
        s = Session(policy=Policy(hostname="h", account=AccountSettings(expire_days=0)))
        s.login()
        s.send(b"RETR 2\r\nTOP 3 0\r\n")
        s.send(b"QUIT\r\n")
        self.assertEqual(s.maildrop.contents(), [MESSAGES[0], MESSAGES[2]])
