"""SASL AUTH (RFC 5034): the pure mechanisms, the exchange in the protocol, and curl."""

from __future__ import annotations

import base64

from twisted.cred.credentials import IUsernamePassword
from twisted.trial.unittest import SynchronousTestCase

from popserv import errors, wire
from popserv.protocol import State
from popserv.sasl.mechanism import (
    AuthzidRefused,
    Challenge,
    SASLAborted,
    SASLContext,
    SASLMalformed,
    SASLUnavailable,
    SASLUnknownMechanism,
    Success,
)
from popserv.sasl.plain import Login, Plain

from .support import REMOTE_PEER, Session
from .test_end_to_end import CurlTestCase


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class PlainTests(SynchronousTestCase):
    def run_plain(self, message: bytes) -> Success:
        step = Plain(SASLContext()).step(message)
        self.assertIsInstance(step, Success)
        return step

    def test_credentials(self):
        for message in (b"\0alice\0secret", b"alice\0alice\0secret"):
            credentials = self.run_plain(message).credentials
            self.assertTrue(IUsernamePassword.providedBy(credentials))
            self.assertEqual((credentials.username, credentials.password), (b"alice", b"secret"))

    def test_no_initial_response(self):
        plain = Plain(SASLContext())
        self.assertEqual(plain.step(None), Challenge(b""))
        self.assertIsInstance(plain.step(b"\0alice\0secret"), Success)

    def test_other_authzid_refused(self):
        self.assertRaises(AuthzidRefused, Plain(SASLContext()).step, b"bob\0alice\0secret")

    def test_malformed(self):
        for message in (b"", b"alice\0secret", b"a\0b\0c\0d", b"\0\0secret", b"\0alice\0",
                        b"\0" + b"a" * 2000 + b"\0pw"):
            self.assertRaises(SASLMalformed, Plain(SASLContext()).step, message)


class LoginTests(SynchronousTestCase):
    def test_two_challenges(self):
        login = Login(SASLContext())
        self.assertEqual(login.step(None), Challenge(b"Username:"))
        self.assertEqual(login.step(b"alice"), Challenge(b"Password:"))
        credentials = login.step(b"secret").credentials
        self.assertEqual((credentials.username, credentials.password), (b"alice", b"secret"))

    def test_initial_response_is_the_user(self):
        login = Login(SASLContext())
        self.assertEqual(login.step(b"alice"), Challenge(b"Password:"))
        self.assertIsInstance(login.step(b"secret"), Success)


class ExchangeTests(SynchronousTestCase):
    """AUTH driven through the protocol on an in-memory transport."""

    def test_capa_and_listing(self):
        s = Session()
        self.assertIn(b"SASL PLAIN LOGIN", s.lines(b"CAPA\r\n"))
        self.assertEqual(s.lines(b"AUTH\r\n"), [b"+OK Supported mechanisms follow", b"PLAIN",
                                                b"LOGIN", b"."])
        s.login()
        self.assertFalse([line for line in s.lines(b"CAPA\r\n") if line.startswith(b"SASL")])
        self.assertEqual(s.send(b"AUTH PLAIN\r\n"), wire.err(errors.BadState()))

    def test_plain_initial_response(self):
        s = Session()
        out = s.send(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
        self.assertTrue(out.startswith(b"+OK Logged in"), out)
        self.assertIs(s.protocol.state, State.TRANSACTION)
        self.assertTrue(s.send(b"STAT\r\n").startswith(b"+OK 3 "))

    def test_plain_after_empty_challenge(self):
        s = Session()
        self.assertEqual(s.send(b"auth plain\r\n"), b"+ \r\n")
        self.assertTrue(s.send(b64(b"\0alice\0secret") + b"\r\n").startswith(b"+OK Logged in"))

    def test_login(self):
        s = Session()
        self.assertEqual(s.send(b"AUTH LOGIN\r\n"), b"+ " + b64(b"Username:") + b"\r\n")
        self.assertEqual(s.send(b64(b"alice") + b"\r\n"), b"+ " + b64(b"Password:") + b"\r\n")
        self.assertTrue(s.send(b64(b"secret") + b"\r\n").startswith(b"+OK Logged in"))

    def test_empty_initial_response(self):
        """``=`` is an empty initial response: for PLAIN, a malformed one."""
        s = Session()
        self.assertEqual(s.send(b"AUTH PLAIN =\r\n"), wire.err(SASLMalformed()))
        self.assertIs(s.protocol.state, State.AUTHORIZATION)

    def test_cancel(self):
        s = Session()
        s.send(b"AUTH LOGIN\r\n")
        self.assertEqual(s.send(b"*\r\n"), wire.err(SASLAborted()))
        # The session goes on, in AUTHORIZATION, with commands parsed again.
        self.assertTrue(s.login().startswith(b"+OK"))

    def test_bad_base64(self):
        s = Session()
        for line in (b"AUTH PLAIN !!!\r\n", b"AUTH PLAIN AGFsaWNl=x\r\n"):
            self.assertEqual(s.send(line), wire.err(SASLMalformed()))
        s.send(b"AUTH PLAIN\r\n")
        self.assertEqual(s.send(b"not base64!\r\n"), wire.err(SASLMalformed()))
        self.assertEqual(s.send(b"NOOP\r\n"), wire.err(errors.BadState()))

    def test_wrong_password_is_a_failed_login(self):
        """Same delay, same [AUTH], same counting as USER/PASS: the third closes."""
        s = Session()
        for attempt in range(3):
            self.assertEqual(s.send(b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n"), b"")
            s.clock.advance(s.factory.policy.auth_failure_delay)
            out = s.take()
            self.assertIn(b"-ERR [AUTH] ", out)
            self.assertEqual(s.transport.disconnecting, attempt == 2)

    def test_authzid_refused(self):
        s = Session()
        s.send(b"AUTH PLAIN " + b64(b"bob\0alice\0secret") + b"\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take(), wire.err(errors.AuthFailed()))
        self.assertEqual(s.protocol._failures, 1)

    def test_unknown_mechanism(self):
        s = Session()
        self.assertEqual(s.send(b"AUTH GSSAPI\r\n"), wire.err(SASLUnknownMechanism()))
        self.assertEqual(s.send(b"AUTH X-\xff\r\n"), wire.err(SASLUnknownMechanism()))

    def test_remote_cleartext_not_offered(self):
        """Without TLS from afar, PLAIN and LOGIN are neither listed nor usable."""
        s = Session(peer=REMOTE_PEER)
        self.assertFalse([line for line in s.lines(b"CAPA\r\n") if line.startswith(b"SASL")])
        self.assertEqual(s.lines(b"AUTH\r\n"), [b"+OK Supported mechanisms follow", b"."])
        out = s.send(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
        self.assertEqual(out, wire.err(SASLUnavailable()))
        self.assertTrue(out.startswith(b"-ERR [AUTH] "))

    def test_long_lines(self):
        """AUTH lines may be a few KB (tokens); beyond the bound, -ERR and the session goes on."""
        s = Session(alice="p" * 1000)
        out = s.send(b"AUTH PLAIN " + b64(b"\0alice\0" + b"p" * 1000) + b"\r\n")
        self.assertTrue(out.startswith(b"+OK Logged in"), out)
        s = Session()
        s.send(b"AUTH PLAIN\r\n")
        self.assertEqual(s.send(b"A" * 9000 + b"\r\n"), wire.err(errors.LineTooLong()))
        self.assertTrue(s.login().startswith(b"+OK"))
        # Other commands keep the 255-octet limit.
        self.assertEqual(s.send(b"NOOP " + b"x" * 300 + b"\r\n"), wire.err(errors.LineTooLong()))

    def test_drop_mid_exchange(self):
        s = Session()
        s.send(b"AUTH LOGIN\r\n")
        s.protocol.connectionLost(None)
        self.assertFalse(s.maildrop.locked)

    def test_pipelined_after_success(self):
        s = Session()
        out = s.send(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\nSTAT\r\nQUIT\r\n")
        lines = out.split(b"\r\n")
        self.assertTrue(lines[0].startswith(b"+OK Logged in"))
        self.assertTrue(lines[1].startswith(b"+OK 3 "))
        self.assertTrue(lines[2].startswith(b"+OK Bye"))


class CurlSASLTests(CurlTestCase):
    """curl's own PLAIN and LOGIN, with and without an initial response."""

    async def test_mechanisms(self):
        for options in (["--login-options", "AUTH=PLAIN"], ["--login-options", "AUTH=LOGIN"],
                        ["--login-options", "AUTH=PLAIN", "--sasl-ir"],
                        ["--login-options", "AUTH=LOGIN", "--sasl-ir"]):
            listing = await self.curl("", *options)
            self.assertEqual(len(listing.splitlines()), 4, options)

    async def test_wrong_password(self):
        _, err, code = await self.run_curl("", "--login-options", "AUTH=PLAIN",
                                           user="alice:wrong")
        self.assertEqual(code, 67, err)
