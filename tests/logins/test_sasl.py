"""SASL AUTH (RFC 5034): the pure mechanisms, the exchange in the protocol, and curl."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import poplib
import shutil
import socket
from pathlib import Path

import scramp
from attrs import evolve
from OpenSSL import SSL
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.core import errors, wire
from popserv.core.state import State
from popserv.logins.credentials import CramMD5Credentials, IActAsPasswordCredentials
from popserv.logins.passwords import (
    PasswdFile,
    PasswdFileChecker,
    hash_password,
    hash_secrets,
    verify_password,
)
from popserv.logins.passwords.schemes import cram_md5_context
from popserv.logins.passwords.scram import ScramKeys
from popserv.logins.sasl import MECHANISMS
from popserv.logins.sasl.crammd5 import CramMD5
from popserv.logins.sasl.external import RULES, External
from popserv.logins.sasl.external import mechanism as external_factory
from popserv.logins.sasl.mechanism import (
    AuthzidRefused,
    Challenge,
    SASLAborted,
    SASLContext,
    SASLMalformed,
    SASLUnavailable,
    SASLUnknownMechanism,
    Success,
)
from popserv.logins.sasl.plain import Login, Plain
from popserv.logins.sasl.scram import NeedKeys, Scram, ScramFailed
from popserv.stores.maildir import deliver
from tests.support import REMOTE_PEER, Session
from tests.support.certs import CA
from tests.support.peers import missing
from tests.support.servers import CurlTestCase, command
from tests.support.tls import TLSTestCase


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

    def test_other_authzid(self):
        """Another authzid gives credentials only a master-aware checker handles."""
        credentials = Plain(SASLContext()).step(b"bob\0alice\0secret").credentials
        self.assertFalse(IUsernamePassword.providedBy(credentials))
        self.assertTrue(IActAsPasswordCredentials.providedBy(credentials))
        self.assertEqual((credentials.username, credentials.authzid), (b"alice", "bob"))

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


#: RFC 2195 section 2's example.
RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_ANSWER = b"tim b913a602c7eda7a495b4e6e7334d3890"

#: Written by Dovecot 2.3's ``doveadm pw -s CRAM-MD5 -p PASSWORD``.
DOVEADM_CRAM_MD5 = {
    "tanstaaftanstaaf": "{CRAM-MD5}d06d4e1b26fccaa4b0b61801132340a3"
    "54b21152711fb604ca3e035e7015116b",
    "x": "{CRAM-MD5}4638c77f1a70c6fda4ddfa6fbe34e6ee090a0f0088f15da8fed5e0a5ff2b4152",
    "p\u00e4ssw\u00f6rd": "{CRAM-MD5}4a60bd37924fc5d45b4c92ce695bac86"
    "cb234bc3028aab2a71a225cb0dedfbb9",
    "a" * 70: "{CRAM-MD5}fdeeaf10e3e4185caed349495958df36351bef50c329275229e06e028803e01c",
}


class CramMD5Tests(SynchronousTestCase):
    def test_rfc2195_example(self):
        credentials = CramMD5Credentials(b"tim", RFC2195_CHALLENGE, RFC2195_ANSWER.split()[1])
        self.assertTrue(credentials.checkPassword("tanstaaftanstaaf"))
        self.assertFalse(credentials.checkPassword("tanstaaftanstaaF"))
        context = cram_md5_context(DOVEADM_CRAM_MD5["tanstaaftanstaaf"])
        self.assertTrue(credentials.checkContext(context))

    def test_doveadm_vectors(self):
        """Dovecot's stored contexts verify, and popserv writes the same ones."""
        for password, stored in DOVEADM_CRAM_MD5.items():
            self.assertTrue(verify_password(stored, password))
            self.assertFalse(verify_password(stored, password + "x"))
            self.assertEqual(hash_password(password, "CRAM-MD5"), stored)

    def test_exchange(self):
        mechanism = CramMD5(SASLContext(hostname="pop.example.org"))
        challenge = mechanism.step(None).data
        self.assertRegex(challenge, rb"^<[0-9a-f]{16}\.\d+@pop\.example\.org>$")
        self.assertNotEqual(challenge, CramMD5(SASLContext()).step(None).data)
        digest = hmac.new(b"secret", challenge, "md5").hexdigest().encode()
        credentials = mechanism.step(b"alice smith " + digest).credentials
        self.assertEqual(credentials.username, b"alice smith")
        self.assertTrue(credentials.checkPassword(b"secret"))

    def test_malformed(self):
        self.assertRaises(SASLMalformed, CramMD5(SASLContext()).step, b"initial")
        for answer in (b"", b"alice", b"alice 1234", b"alice " + b"g" * 32, b" " + b"0" * 32):
            mechanism = CramMD5(SASLContext())
            mechanism.step(None)
            self.assertRaises(SASLMalformed, mechanism.step, answer)

    def test_through_the_protocol(self):
        s = Session()
        challenge = base64.b64decode(s.send(b"AUTH CRAM-MD5\r\n")[2:])
        digest = hmac.new(b"secret", challenge, "md5").hexdigest().encode()
        self.assertTrue(s.send(b64(b"alice " + digest) + b"\r\n").startswith(b"+OK Logged in"))

    def test_wrong_digest(self):
        s = Session()
        s.send(b"AUTH CRAM-MD5\r\n")
        s.send(b64(b"alice " + b"0" * 32) + b"\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take(), wire.err(errors.AuthFailed()))


class ExchangeTests(SynchronousTestCase):
    """AUTH driven through the protocol on an in-memory transport."""

    def test_capa_and_listing(self):
        s = Session()
        # The in-memory checker keeps plaintext passwords: CRAM-MD5 works for all;
        # it cannot do SCRAM (it has no keys to give), so SCRAM is not offered.
        self.assertIn(b"SASL CRAM-MD5 PLAIN LOGIN", s.lines(b"CAPA\r\n"))
        self.assertEqual(s.lines(b"AUTH\r\n"), [b"+OK Supported mechanisms follow",
                                                b"CRAM-MD5", b"PLAIN", b"LOGIN", b"."])
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
        """Same penalty, same [AUTH], same counting as USER/PASS: the third closes."""
        s = Session()
        for attempt, delay in enumerate([2, 4, 8]):
            self.assertEqual(s.send(b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n"), b"")
            s.advance(delay - 0.25)
            self.assertEqual(s.take(), b"")
            s.advance(0.25)
            out = s.take()
            self.assertIn(b"-ERR [AUTH] ", out)
            self.assertEqual(s.transport.disconnecting, attempt == 2)

    def test_authzid_refused(self):
        s = Session()
        s.send(b"AUTH PLAIN " + b64(b"bob\0alice\0secret") + b"\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take(), wire.err(errors.AuthFailed()))
        self.assertEqual(s.protocol.session.failures, 1)

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


class PasswdCramMD5Tests(CurlTestCase):
    """CRAM-MD5 against the password file: PLAIN, {CRAM-MD5}, and an account that cannot."""

    def setUp(self):
        super().setUp()
        PasswdFile(self.layout.passwd_path).add("carol", DOVEADM_CRAM_MD5["x"])
        for user in ("bob", "carol"):
            deliver(self.layout.maildir_for(user), b"Subject: hi\n\nhello\n")

    def test_offered_only_when_every_account_can(self):
        """alice has only an argon2id hash: auto leaves CRAM-MD5 out, so curl never picks it."""
        self.assertNotIn("CRAM-MD5", [m.name for m in self.factory.enabled_mechanisms()])
        PasswdFile(self.layout.passwd_path).remove("alice")
        self.assertIn("CRAM-MD5", [m.name for m in self.factory.enabled_mechanisms()])

    async def test_curl(self):
        self.factory.policy = evolve(self.factory.policy, sasl=("CRAM-MD5", "PLAIN"))
        cram = ("--login-options", "AUTH=CRAM-MD5")
        hello = b"Subject: hi\r\n\r\nhello\r\n"
        self.assertEqual(await self.curl("1", *cram, user="bob:bob pw"), hello)  # PLAIN stored
        self.assertEqual(await self.curl("1", *cram, user="carol:x"), hello)  # doveadm's context
        with capturedLogs() as events:
            _, err, code = await self.run_curl("", *cram)  # alice: argon2id only
        self.assertEqual(code, 67, err)
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("alice cannot log in with CramMD5: it needs a PLAIN password", text)


#: RFC 5802 section 5 and RFC 7677 section 3: user "user", password "pencil".
RFC5802 = dict(
    hash="SHA-1", salt="QSXCR+Q6sek8bf92",
    client_first_bare="n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    server_first="r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    without_proof="c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j",
    proof="v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=", signature="rmF9pqV8S7suAoZWja4dJRkFsKQ=",
)
RFC7677 = dict(
    hash="SHA-256", salt="W22ZaJ0SNY7soEsUEjb6gQ==",
    client_first_bare="n=user,r=rOprNGfwEbeRWgbNEkqO",
    server_first="r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                 "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    without_proof="c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    proof="dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    signature="6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
)

#: Written by Dovecot 2.3's ``doveadm pw -s SCRAM-SHA-... -p pencil``.
DOVEADM_SCRAM = {
    "SCRAM-SHA-256": "{SCRAM-SHA-256}4096,Sol9RaXHHbVcliA89f8C9w==,BWFgkZrpHeyQRbBC44mxkZoKQ5JJ"
                     "7ahPPUf8Wk+o9rU=,g004cFYbZTxP+VVSZqmwyZ5QlAndGYV12WB9uVlUujg=",
    "SCRAM-SHA-1": "{SCRAM-SHA-1}4096,7OA2pJlENBffDioiepOxNg==,WUn+ZWOdItYFnmCo1eKwkOGFedw=,"
                   "UHdGtAw0RnzZZVVSrGEo95+4wgY=",
}


class ScramKeyTests(SynchronousTestCase):
    def test_rfc_examples(self):
        """The RFC 5802 and RFC 7677 exchanges verify, and give their server signatures."""
        for example in (RFC5802, RFC7677):
            keys = ScramKeys.derive(example["hash"], "pencil", base64.b64decode(example["salt"]))
            message = ",".join((example["client_first_bare"], example["server_first"],
                                example["without_proof"])).encode()
            self.assertTrue(keys.verify(message, base64.b64decode(example["proof"])))
            self.assertFalse(keys.verify(message + b"x", base64.b64decode(example["proof"])))
            self.assertEqual(base64.b64encode(keys.server_signature(message)).decode(),
                             example["signature"])

    def test_doveadm_entries(self):
        for scheme, stored in DOVEADM_SCRAM.items():
            self.assertTrue(verify_password(stored, "pencil"))
            self.assertFalse(verify_password(stored, "pencil2"))
            written = hash_password("pencil", scheme)
            self.assertTrue(written.startswith("{" + scheme + "}4096,"))
            self.assertTrue(verify_password(written, "pencil"))


class ScramExchangeTests(SynchronousTestCase):
    """The pure SCRAM state machine, driven by scramp's client (an independent implementation)."""

    def exchange(self, client, mechanism, keys):
        first = mechanism.step(client.get_client_first().encode())
        self.assertIsInstance(first, NeedKeys)
        server_first = mechanism.provide(keys)
        client.set_server_first(server_first.data.decode())
        return mechanism.step(client.get_client_final().encode())

    def test_with_scramp_client(self):
        for hash_name in ("SHA-1", "SHA-256"):
            keys = ScramKeys.derive(hash_name, "pencil")
            client = scramp.ScramClient([f"SCRAM-{hash_name}"], "alice", "pencil")
            success = self.exchange(client, Scram(SASLContext(), hash_name, False), keys)
            self.assertTrue(success.credentials.verify(keys))
            self.assertEqual(success.credentials.username, "alice")
            client.set_server_final(success.final.decode())  # checks the server signature

    def test_wrong_password(self):
        keys = ScramKeys.derive("SHA-256", "pencil")
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "crayon")
        success = self.exchange(client, Scram(SASLContext(), "SHA-256", False), keys)
        self.assertFalse(success.credentials.verify(keys))

    def test_channel_binding(self):
        """-PLUS checks the client's c= against this connection's binding data."""
        context = SASLContext(channel_bindings={"tls-server-end-point": b"\x01" * 32},
                              channel_binding_offered=True)
        keys = ScramKeys.derive("SHA-256", "pencil")
        good = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], "alice", "pencil",
                                  channel_binding=("tls-server-end-point", b"\x01" * 32))
        success = self.exchange(good, Scram(context, "SHA-256", True), keys)
        self.assertTrue(success.credentials.verify(keys))
        bad = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], "alice", "pencil",
                                 channel_binding=("tls-server-end-point", b"\x02" * 32))
        self.assertRaises(ScramFailed, self.exchange, bad, Scram(context, "SHA-256", True), keys)

    def test_binding_flags(self):
        """n with -PLUS, p without TLS data, y while -PLUS is offered: all refused."""
        offered = SASLContext(channel_bindings={"tls-exporter": b"x" * 32},
                              channel_binding_offered=True)
        cases = [
            (SASLContext(), True, "n,,n=alice,r=abc"),
            (SASLContext(), True, "p=tls-exporter,,n=alice,r=abc"),
            (offered, False, "p=tls-exporter,,n=alice,r=abc"),
            (offered, True, "p=tls-unique,,n=alice,r=abc"),
            (offered, False, "y,,n=alice,r=abc"),
            (SASLContext(), False, "q,,n=alice,r=abc"),
        ]
        for context, plus, message in cases:
            self.assertRaises(ScramFailed, Scram(context, "SHA-256", plus).step, message.encode())
        # y without -PLUS on offer is fine: the client was right.
        self.assertIsInstance(Scram(SASLContext(), "SHA-256", False).step(b"y,,n=alice,r=abc"),
                              NeedKeys)

    def test_names_and_authzid(self):
        step = Scram(SASLContext(), "SHA-256", False).step(b"n,a=a=3Db=2Cc,n=a=3Db=2Cc,r=x")
        self.assertEqual(step.username, "a=b,c")
        mechanism = Scram(SASLContext(), "SHA-256", False)
        self.assertEqual(mechanism.step(b"n,a=bob,n=alice,r=abc").username, "alice")
        self.assertEqual(mechanism._authzid, "bob")  # judged by the checker
        for message in (b"n,,n=al=2Xice,r=abc", b"n,,n=,r=abc", b"n,,r=abc,n=alice",
                        b"n,,m=ext,n=alice,r=abc", b"n,,n=alice,r=a,b", b"n,,n=alice\x07,r=abc",
                        b"n,,n=alice", b"\xff", b"garbage"):
            self.assertRaises(ScramFailed, Scram(SASLContext(), "SHA-256", False).step, message)

    def test_client_final_checks(self):
        keys = ScramKeys.derive("SHA-256", "pencil")
        for tamper in (lambda m: m.replace("c=biws", "c=eSws"),
                       lambda m: m.replace(",r=", ",r=X"),
                       lambda m: m.split(",p=")[0],
                       lambda m: m + "=="):
            client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pencil")
            mechanism = Scram(SASLContext(), "SHA-256", False)
            mechanism.step(client.get_client_first().encode())
            client.set_server_first(mechanism.provide(keys).data.decode())
            final = tamper(client.get_client_final()).encode()
            self.assertRaises(ScramFailed, mechanism.step, final)

    def test_unknown_user_looks_like_any_other(self):
        """No keys: a stable, random-looking salt, 4096 iterations, and a failing proof."""
        def server_first():
            mechanism = Scram(SASLContext(), "SHA-256", False)
            mechanism.step(b"n,,n=nobody,r=abc")
            return mechanism.provide(None).data.split(b",", 1)[1]

        self.assertEqual(server_first(), server_first())
        self.assertTrue(server_first().endswith(b",i=4096"))


def scram_login(client: poplib.POP3, scram_client, mechanism: str) -> bytes:
    """Run a SCRAM exchange with a scramp client over poplib; the final answer, +OK or -ERR."""
    first = base64.b64encode(scram_client.get_client_first().encode()).decode()
    answer = command(client, f"AUTH {mechanism} {first}")
    if not answer.startswith(b"+ "):
        return answer
    scram_client.set_server_first(base64.b64decode(answer[2:]).decode())
    final = base64.b64encode(scram_client.get_client_final().encode()).decode()
    answer = command(client, final)
    if not answer.startswith(b"+ "):
        return answer
    scram_client.set_server_final(base64.b64decode(answer[2:]).decode())  # checks v=
    return command(client, "")


class _SaslUsersTestCase(TLSTestCase):
    """The TLS server with carol (SCRAM-SHA-256 keys only), a message each for bob and carol,
    and every mechanism enabled."""

    def setUp(self):
        super().setUp()
        passwd = PasswdFile(self.layout.passwd_path)
        passwd.add("carol", DOVEADM_SCRAM["SCRAM-SHA-256"])  # password "pencil", keys only
        for user in ("bob", "carol"):
            deliver(self.layout.maildir_for(user), b"Subject: hi\n\nhello\n")
        names = tuple(m.name for m in MECHANISMS)
        self.factory.policy = evolve(self.factory.policy, sasl=names)


class ScramEndToEndTests(_SaslUsersTestCase):
    """SCRAM against the password file over TCP and TLS: scramp, OpenSSL and mpop as clients."""

    async def test_scramp_client(self):
        """Stored keys (carol) and keys derived from PLAIN (bob), SHA-256 and SHA-1."""
        def login(user, password, mechanism):
            c = self.pop()
            scram_client = scramp.ScramClient([mechanism], user, password)
            answer = scram_login(c, scram_client, mechanism)
            stat = c.stat() if answer.startswith(b"+OK") else None
            c.quit()
            return answer, stat

        for user, password, mechanism in (("carol", "pencil", "SCRAM-SHA-256"),
                                          ("bob", "bob pw", "SCRAM-SHA-256"),
                                          ("bob", "bob pw", "SCRAM-SHA-1")):
            answer, stat = await self.run_in_thread(login, user, password, mechanism)
            self.assertTrue(answer.startswith(b"+OK Logged in"), (user, mechanism, answer))
            self.assertEqual(stat[0], 1)

    async def test_refused(self):
        """Wrong password, an argon2id-only account (logged why), no such user: all [AUTH]."""
        def login(user, password, mechanism="SCRAM-SHA-256"):
            c = self.pop()
            try:
                return scram_login(c, scramp.ScramClient([mechanism], user, password), mechanism)
            finally:
                c.close()

        with capturedLogs() as events:
            for user, password in (("carol", "crayon"), ("alice", "secret"), ("nobody", "x")):
                answer = await self.run_in_thread(login, user, password)
                self.assertEqual(answer, wire.err(errors.AuthFailed()).rstrip(), user)
            # carol has SHA-256 keys only: SHA-1 cannot work for her.
            answer = await self.run_in_thread(login, "carol", "pencil", "SCRAM-SHA-1")
            self.assertTrue(answer.startswith(b"-ERR [AUTH] "))
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("alice cannot log in with SCRAM-SHA-256: it needs a PLAIN or", text)

    async def test_plus_with_tls_server_end_point(self):
        def login(binding_socket=None):
            c = self.pop3s()
            binding = ("tls-server-end-point", binding_socket or c.sock)
            scram_client = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], "carol", "pencil",
                                              channel_binding=binding)
            answer = scram_login(c, scram_client, "SCRAM-SHA-256-PLUS")
            c.close()
            return answer

        self.assertTrue((await self.run_in_thread(login)).startswith(b"+OK Logged in"))

    async def test_plus_with_tls_exporter(self):
        """TLS 1.3: the client's own exporter value (from its OpenSSL connection) must match."""
        def login(corrupt: bool):
            context = SSL.Context(SSL.TLS_CLIENT_METHOD)
            context.load_verify_locations(str(self.cafile))
            context.set_verify(SSL.VERIFY_PEER)
            raw = socket.create_connection(("127.0.0.1", self.tls_portno), timeout=10)
            raw.settimeout(None)  # pyOpenSSL wants a blocking socket
            connection = SSL.Connection(context, raw)
            try:
                return exchange(connection, corrupt)
            finally:
                raw.close()

        def exchange(connection, corrupt):
            connection.set_tlsext_host_name(b"pop.test")
            connection.set_connect_state()
            connection.do_handshake()
            exporter = connection.export_keying_material(b"EXPORTER-Channel-Binding", 32, None)
            if corrupt:
                exporter = bytes(32)
            lines = _OpenSSLLines(connection)
            lines.read()  # greeting
            gs2 = b"p=tls-exporter,,"
            bare = b"n=carol,r=clientnonce123"
            lines.send(b"AUTH SCRAM-SHA-256-PLUS " + base64.b64encode(gs2 + bare))
            server_first = base64.b64decode(lines.read()[2:])
            fields = dict(item.split(b"=", 1) for item in server_first.split(b","))
            salted = hashlib.pbkdf2_hmac("sha256", b"pencil", base64.b64decode(fields[b"s"]),
                                         int(fields[b"i"]))
            client_key = hmac.new(salted, b"Client Key", "sha256").digest()
            without_proof = b"c=" + base64.b64encode(gs2 + exporter) + b",r=" + fields[b"r"]
            message = bare + b"," + server_first + b"," + without_proof
            signature = hmac.new(hashlib.sha256(client_key).digest(), message, "sha256").digest()
            proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
            lines.send(base64.b64encode(without_proof + b",p=" + base64.b64encode(proof)))
            answer = lines.read()
            if answer.startswith(b"+ "):
                lines.send(b"")
                answer = lines.read()
            lines.send(b"QUIT")
            lines.read()
            return answer

        self.assertTrue((await self.run_in_thread(login, False)).startswith(b"+OK Logged in"))
        self.assertEqual(await self.run_in_thread(login, True), wire.err(ScramFailed()).rstrip())

    async def test_mpop(self):
        """mpop's GNU SASL SCRAM, with stored keys and with keys from a PLAIN password."""
        mpop = shutil.which("mpop")
        if mpop is None:
            raise missing("mpop is not installed")
        home = Path(self.mktemp())
        home.mkdir()
        for user, password, auth in (("carol", "pencil", "scram-sha-256"),
                                     ("bob", "bob pw", "scram-sha-1")):
            mbox = home / f"{user}.mbox"
            out, err, code = await getProcessOutputAndValue(mpop, [
                "--host=127.0.0.1", f"--port={self.portno}", "--tls=off", f"--auth={auth}",
                f"--user={user}", f"--passwordeval=echo '{password}'", "--keep=on",
                "--only-new=off", f"--delivery=mbox,{mbox}", f"--uidls-file={home / user}",
                "--timeout=10", "--received-header=off"], env={"HOME": str(home),
                                                               "PATH": os.environ["PATH"]})
            self.assertEqual(code, 0, out + err)
            self.assertIn(b"\n\nhello\n", mbox.read_bytes())


class _OpenSSLLines:
    """Lines over a pyOpenSSL client connection."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.buffer = b""

    def read(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self.buffer += self.connection.recv(4096)
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def send(self, line: bytes) -> None:
        self.connection.sendall(line + b"\r\n")


class ExternalTests(SynchronousTestCase):
    def test_rules(self):
        ca = CA()
        issued = ca.issue("Alice Smith", client=True, emails=("alice@example.org",)).certificate
        for rule, expected in (("cn", "Alice Smith"), ("email", "alice@example.org"),
                               ("email-local", "alice")):
            self.assertEqual(RULES[rule](issued), expected)
        bare = ca.issue("bob", client=True).certificate
        self.assertIsNone(RULES["email"](bare))

    def test_exchange(self):
        certificate = CA().issue("alice", client=True).certificate
        context = SASLContext(secure=True, client_certificate=certificate)
        external = External(context)
        self.assertEqual(external.step(None), Challenge(b""))
        self.assertEqual(external.step(b"").credentials.username, "alice")
        self.assertEqual(External(context).step(b"alice").credentials.username, "alice")
        self.assertRaises(AuthzidRefused, External(context).step, b"bob")
        self.assertRaises(AuthzidRefused, External(SASLContext()).step, b"")
        self.assertRaises(ValueError, external_factory, "uid")


class ExternalEndToEndTests(TLSTestCase):
    """EXTERNAL over TLS with a client certificate: Python's ssl and curl."""

    def setUp(self):
        self.client_ca = CA("client CA")
        path = Path(self.mktemp())
        self.extra_options = {"tls-client-ca": str(self.client_ca.write(path / "clients.pem"))}
        super().setUp()

    def login(self, issued=None, authzid=b""):
        context = self.context()
        if issued is not None:
            context.load_cert_chain(*issued.write(Path(self.mktemp()), "client"))
        c = self.pop3s(context)
        try:
            capa = c.capa()
            initial = base64.b64encode(authzid).decode() or "="
            return capa.get("SASL", []), command(c, f"AUTH EXTERNAL {initial}")
        finally:
            c.close()

    async def test_certificate_logs_in(self):
        alice = self.client_ca.issue("alice", client=True)
        mechanisms, answer = await self.run_in_thread(self.login, alice)
        self.assertEqual(mechanisms[0], "EXTERNAL")
        self.assertTrue(answer.startswith(b"+OK Logged in"), answer)
        _, answer = await self.run_in_thread(self.login, alice, b"alice")
        self.assertTrue(answer.startswith(b"+OK Logged in"), answer)

    async def test_refused(self):
        """No certificate: not offered; a certificate for nobody, or another authzid: [AUTH]."""
        mechanisms, answer = await self.run_in_thread(self.login)
        self.assertNotIn("EXTERNAL", mechanisms)
        self.assertEqual(answer, wire.err(SASLUnavailable()).rstrip())
        nobody = self.client_ca.issue("nobody", client=True)
        _, answer = await self.run_in_thread(self.login, nobody)
        self.assertTrue(answer.startswith(b"-ERR [AUTH] "), answer)
        alice = self.client_ca.issue("alice", client=True)
        _, answer = await self.run_in_thread(self.login, alice, b"bob")
        self.assertTrue(answer.startswith(b"-ERR [AUTH] "), answer)

    async def test_curl(self):
        if shutil.which("curl") is None:
            raise missing("curl is not installed")
        cert, key = self.client_ca.issue("alice", client=True).write(Path(self.mktemp()), "c")
        out, err, code = await getProcessOutputAndValue(shutil.which("curl"), [
            "-sS", "--max-time", "20", f"pop3s://127.0.0.1:{self.tls_portno}/",
            "--cacert", str(self.cafile), "--cert", str(cert), "--key", str(key),
            "--login-options", "AUTH=EXTERNAL", "-u", "alice:"], env=os.environ)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out.splitlines()), 4)


class MasterUserTests(_SaslUsersTestCase):
    """--master-user: bob may log in as carol with his own password; carol may not as bob."""

    extra_options = {"master-user": ["bob"]}

    def auth_plain(self, authzid: str, user: str, password: str) -> tuple[bytes, bytes | None]:
        c = self.pop()
        try:
            message = base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()
            answer = command(c, f"AUTH PLAIN {message}")
            top = c.top(1, 0)[1] if answer.startswith(b"+OK") else None
            return answer, top
        finally:
            c.close()

    async def test_plain(self):
        answer, top = await self.run_in_thread(self.auth_plain, "carol", "bob", "bob pw")
        self.assertTrue(answer.startswith(b"+OK Logged in, 1 messages"), answer)
        self.assertIn(b"Subject: hi", top)
        answer, _ = await self.run_in_thread(self.auth_plain, "bob", "carol", "pencil")
        self.assertEqual(answer, wire.err(errors.AuthFailed()).rstrip())
        answer, _ = await self.run_in_thread(self.auth_plain, "nobody", "bob", "bob pw")
        self.assertEqual(answer, wire.err(errors.AuthFailed()).rstrip())

    async def test_scram_authzid(self):
        def login(authzid, user, password):
            c = self.pop()
            try:
                scram_client = _ScramClientWithAuthzid(authzid, user, password)
                return scram_login(c, scram_client, "SCRAM-SHA-256")
            finally:
                c.close()

        answer = await self.run_in_thread(login, "carol", "bob", "bob pw")
        self.assertTrue(answer.startswith(b"+OK Logged in"), answer)
        answer = await self.run_in_thread(login, "bob", "carol", "pencil")
        self.assertEqual(answer, wire.err(errors.AuthFailed()).rstrip())


class _ScramClientWithAuthzid:
    """A minimal SCRAM-SHA-256 client that sends a=authzid (scramp's client cannot)."""

    def __init__(self, authzid: str, user: str, password: str) -> None:
        self.gs2 = f"n,a={authzid},"
        self.bare = f"n={user},r=clientnonce42"
        self.password = password.encode()

    def get_client_first(self) -> str:
        return self.gs2 + self.bare

    def set_server_first(self, message: str) -> None:
        self.server_first = message

    def get_client_final(self) -> str:
        fields = dict(item.split("=", 1) for item in self.server_first.split(","))
        salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(fields["s"]),
                                     int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        without_proof = f"c={base64.b64encode(self.gs2.encode()).decode()},r={fields['r']}"
        message = f"{self.bare},{self.server_first},{without_proof}".encode()
        signature = hmac.new(hashlib.sha256(client_key).digest(), message, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}"

    def set_server_final(self, message: str) -> None:
        self.server_final = message


class ReviewRegressionTests(SynchronousTestCase):
    """Found in review of the SASL code; each failed before its fix."""

    def test_pipelined_exchanges_stay_in_step(self):
        """Hundreds of pipelined AUTH + bad answer pairs: no recursion error, no desync."""
        s = Session()
        out = s.send(b"AUTH PLAIN\r\n!\r\n" * 400)
        self.assertEqual(out, (b"+ \r\n" + wire.err(SASLMalformed())) * 400)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_long_second_answer(self):
        """Every answer of an exchange may be AUTH-long, not only the first."""
        s = Session(alice="p" * 300)
        s.send(b"AUTH LOGIN\r\n")
        s.send(b64(b"alice") + b"\r\n")
        self.assertTrue(s.send(b64(b"p" * 300) + b"\r\n").startswith(b"+OK Logged in"))

    def test_no_plus_without_binding_data(self):
        """-PLUS is offered only when the TLS session has channel-binding data."""
        from popserv.server.tls import TLSInfo

        s = Session()
        s.factory.policy = evolve(s.factory.policy, sasl=tuple(m.name for m in MECHANISMS))
        s.protocol.info.secure = True
        s.protocol.info.tls = TLSInfo("TLSv1.2", "x", None, None, None, {})
        names = [m.name for m in s.protocol.offered_mechanisms()]
        self.assertNotIn("SCRAM-SHA-256-PLUS", names)
        self.assertIn("SCRAM-SHA-256", names)
        self.assertFalse(s.protocol.sasl_context(s.protocol.offered_mechanisms())
                         .channel_binding_offered)
        s.protocol.info.tls = TLSInfo("TLSv1.3", "x", None, None, None, {"tls-exporter": b"x"})
        self.assertIn("SCRAM-SHA-256-PLUS", [m.name for m in s.protocol.offered_mechanisms()])

    def test_drop_during_key_lookup(self):
        """The connection drops while SCRAM keys are looked up: nothing waits on afterwards."""
        from twisted.internet.defer import Deferred

        s = Session()
        s.factory.policy = evolve(s.factory.policy, sasl=("SCRAM-SHA-256",))
        pending = Deferred()
        self.patch(s.protocol, "_answer", lambda need: pending)
        s.send(b"AUTH SCRAM-SHA-256 " + b64(b"n,,n=alice,r=abc") + b"\r\n")
        s.protocol.connectionLost(None)
        pending.callback(None)
        self.assertIsNone(s.protocol._line_waiter)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_eof_during_an_exchange(self):
        """A client that half-closes while an exchange waits for it is not waited on."""
        s = Session()
        s.send(b"AUTH LOGIN\r\n")
        s.protocol.readConnectionLost()
        self.assertTrue(s.transport.disconnecting)


class LockedAccountTests(TestCase):
    """A locked account ('!' or '*' field) logs in by no means, extra secrets or not."""

    def setUp(self):
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        self.passwd = PasswdFile(path)
        _, extras = hash_secrets("pencil", ["ARGON2ID", "SCRAM-SHA-256", "PLAIN"])
        self.passwd.add("dave", "!" + hash_password("pencil", "SHA256"), extras)
        self.checker = PasswdFileChecker(self.passwd)

    async def test_refused_everywhere(self):
        # Decoys, as for an unknown user: no password matches them.
        self.assertFalse((await self.checker.scram_keys("dave", "SHA-256")).matches("pencil"))
        challenge = b"<1.2@x>"
        digest = hmac.new(b"pencil", challenge, "md5").hexdigest().encode()
        for credentials in (CramMD5Credentials(b"dave", challenge, digest),
                            UsernamePassword(b"dave", b"pencil")):
            with self.assertRaises(UnauthorizedLogin):
                await self.checker.requestAvatarId(credentials)
        self.assertEqual(self.checker.coverage("apop"), "none")


class SASLprepPasswordTests(TestCase):
    async def test_prohibited_password_is_a_failed_login(self):
        """Stored passwords SASLprep refuses make SCRAM fail quietly, USER/PASS too, no crash."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        passwd = PasswdFile(path)
        passwd.add("emo", "{PLAIN-B64}" + base64.b64encode(b"pw\x07").decode())
        passwd.add("carol", DOVEADM_SCRAM["SCRAM-SHA-256"])
        checker = PasswdFileChecker(passwd)
        self.assertFalse((await checker.scram_keys("emo", "SHA-256")).matches("pw\x07"))
        self.assertFalse(verify_password(DOVEADM_SCRAM["SCRAM-SHA-256"], "pencil\x07"))
        with self.assertRaises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"carol", b"pencil\x07"))


class ExchangeLoopTests(SynchronousTestCase):
    """popserv.logins.sasl.exchange: the loop, driven without a protocol or a reactor."""

    def drive(self, exchange, initial, answers, replies=None):
        import asyncio

        from popserv.logins.sasl import exchange as loop

        sent = []

        async def challenge(data):
            sent.append(data)
            return answers.pop(0)

        async def ask(need):
            return (replies or {}).get(type(need))

        return asyncio.run(loop.run(exchange, initial, challenge, ask)), sent

    def test_plain_in_one_step(self):
        from popserv.logins.sasl.plain import Plain

        step, sent = self.drive(Plain(SASLContext()), b"\0alice\0pw", [])
        self.assertEqual((step.credentials.username, sent), (b"alice", []))

    def test_too_many_rounds(self):
        from popserv.logins.sasl.mechanism import SASLTooManyRounds

        class Forever:
            def step(self, response):
                from popserv.logins.sasl.mechanism import Challenge

                return Challenge(b"again")

        with self.assertRaises(SASLTooManyRounds):
            self.drive(Forever(), None, [b""] * 20)
