"""OAUTHBEARER (RFC 7628) and XOAUTH2: parsing, token validators, the exchange, and curl."""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.core import errors, wire
from popserv.logins.oauth import CallableValidator, JWTValidator, TokenChecker
from popserv.logins.sasl.mechanism import SASLContext, SASLMalformed, Success
from popserv.logins.sasl.oauth import OAUTHBEARER_ERROR, XOAUTH2_ERROR, OAuthBearer, XOAuth2
from tests.support import Session
from tests.support.peers import missing
from tests.support.servers import CurlTestCase

SECRET = b"a shared secret of enough length for HS256"

#: RFC 7628 section 4.1's initial response (host, port, a bearer token).
RFC7628_EXAMPLE = (b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
                   b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01")


def token(sub="alice", key=SECRET, algorithm="HS256", lifetime=600, **claims) -> str:
    payload = {"sub": sub, "exp": int(time.time()) + lifetime, **claims}
    return jwt.encode(payload, key, algorithm=algorithm)


class ParseTests(SynchronousTestCase):
    def test_oauthbearer_rfc_example(self):
        step = OAuthBearer(SASLContext()).step(RFC7628_EXAMPLE)
        self.assertIsInstance(step, Success)
        self.assertEqual(step.credentials.username, "user@example.com")
        self.assertEqual(step.credentials.token, "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==")
        self.assertEqual(step.failure, OAUTHBEARER_ERROR)

    def test_oauthbearer_without_authzid(self):
        step = OAuthBearer(SASLContext()).step(b"n,,\x01auth=Bearer abc\x01\x01")
        self.assertIsNone(step.credentials.username)

    def test_xoauth2(self):
        step = XOAuth2(SASLContext()).step(b"user=alice\x01auth=Bearer abc\x01\x01")
        self.assertEqual((step.credentials.username, step.credentials.token), ("alice", "abc"))
        self.assertEqual(step.failure, XOAUTH2_ERROR)

    def test_malformed(self):
        for message in (b"", b"\x01", b"n,,auth=Bearer x\x01\x01", b"n,,\x01auth=Basic x\x01\x01",
                        b"n,,\x01host=h\x01\x01", b"x,,\x01auth=Bearer x\x01\x01",
                        b"n,,\x01auth=Bearer \x01\x01", b"n,b=c,\x01auth=Bearer x\x01\x01",
                        b"n,,\x01auth=Bearer " + b"x" * 9000 + b"\x01\x01", b"\xff"):
            self.assertRaises(SASLMalformed, OAuthBearer(SASLContext()).step, message)
        for message in (b"auth=Bearer x\x01\x01", b"user=alice\x01\x01", b"user=a\x01auth\x01\x01"):
            self.assertRaises(SASLMalformed, XOAuth2(SASLContext()).step, message)


class ValidatorTests(TestCase):
    def test_hs256(self):
        validator = JWTValidator(SECRET, issuer="https://idp.test", audience="pop")
        good = token(iss="https://idp.test", aud="pop")
        self.assertEqual(validator.validate(good, None), "alice")
        for bad in (token(iss="https://idp.test", aud="pop", lifetime=-120),
                    token(iss="https://idp.test", aud="pop", key=SECRET + b"!"),
                    token(iss="https://evil.test", aud="pop"),
                    token(iss="https://idp.test", aud="smtp"),
                    jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),  # no exp
                    "not a token"):
            self.assertRaises(UnauthorizedLogin, validator.validate, bad, None)

    def test_rs256_key_file_and_claim(self):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        path = Path(self.mktemp())
        path.write_bytes(public)
        validator = JWTValidator.from_file(path, claim="email")
        signed = token(key=key, algorithm="RS256", email="alice@example.org")
        self.assertEqual(validator.validate(signed, None), "alice@example.org")
        # With a public key only RS256/ES256 count: an HS256 token is refused.
        self.assertRaises(UnauthorizedLogin, validator.validate, token(sub="x"), None)
        self.assertRaises(UnauthorizedLogin, validator.validate, token(key=key, algorithm="RS256"),
                          None)  # no email claim

    async def test_checker(self):
        from popserv.logins.credentials import OAuthTokenCredentials

        checker = TokenChecker(JWTValidator(SECRET))
        self.assertEqual(await checker.requestAvatarId(OAuthTokenCredentials("alice", token())),
                         "alice")
        self.assertEqual(await checker.requestAvatarId(OAuthTokenCredentials(None, token())),
                         "alice")
        for credentials in (OAuthTokenCredentials("bob", token()),
                            OAuthTokenCredentials(None, token(sub="../etc")),
                            OAuthTokenCredentials(None, "junk")):
            with self.assertRaises(UnauthorizedLogin):
                await checker.requestAvatarId(credentials)

    async def test_callable(self):
        async def introspect(value, user):
            return "alice" if value == "good" else None

        for function in (introspect, lambda value, user: succeed("alice" if value == "good" else
                                                                 None)):
            validator = CallableValidator(function)
            self.assertEqual(await validator.validate("good", None), "alice")
            with self.assertRaises(UnauthorizedLogin):
                await validator.validate("bad", None)


class ExchangeTests(SynchronousTestCase):
    def session(self) -> Session:
        s = Session()
        s.factory.portal.registerChecker(TokenChecker(JWTValidator(SECRET)))
        return s

    def test_offered_only_with_a_token_checker(self):
        self.assertNotIn(b"OAUTHBEARER", b"".join(Session().lines(b"CAPA\r\n")))
        sasl = [line for line in self.session().lines(b"CAPA\r\n") if line.startswith(b"SASL")]
        self.assertTrue(sasl[0].endswith(b" OAUTHBEARER XOAUTH2"))

    def test_oauthbearer(self):
        s = self.session()
        message = f"n,a=alice,\x01auth=Bearer {token()}\x01\x01".encode()
        out = s.send(b"AUTH OAUTHBEARER " + base64.b64encode(message) + b"\r\n")
        self.assertTrue(out.startswith(b"+OK Logged in"), out)

    def test_refused_token_gets_the_error_then_err(self):
        """RFC 7628 3.2.3: the error JSON as a challenge, the client's ^A, then -ERR [AUTH]."""
        s = self.session()
        message = f"n,a=alice,\x01auth=Bearer {token(lifetime=-300)}\x01\x01".encode()
        out = s.send(b"AUTH OAUTHBEARER " + base64.b64encode(message) + b"\r\n")
        self.assertEqual(out, b"+ " + base64.b64encode(OAUTHBEARER_ERROR) + b"\r\n")
        self.assertEqual(s.send(b"AQ==\r\n"), b"")
        s.clock.advance(10)
        self.assertEqual(s.take(), wire.err(errors.AuthFailed()))
        self.assertEqual(s.protocol.session.failures, 1)

    def test_xoauth2(self):
        s = self.session()
        good = base64.b64encode(f"user=alice\x01auth=Bearer {token()}\x01\x01".encode())
        self.assertTrue(s.send(b"AUTH XOAUTH2 " + good + b"\r\n").startswith(b"+OK Logged in"))
        s = self.session()
        bad = base64.b64encode(f"user=bob\x01auth=Bearer {token()}\x01\x01".encode())
        self.assertEqual(s.send(b"AUTH XOAUTH2 " + bad + b"\r\n"),
                         b"+ " + base64.b64encode(XOAUTH2_ERROR) + b"\r\n")
        s.send(b"\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take(), wire.err(errors.AuthFailed()))


class CurlOAuthTests(CurlTestCase):
    """curl --oauth2-bearer, with the key given as the twistd option --oauth-key."""

    apop_user = False

    def setUp(self):
        key = Path(self.mktemp())
        key.write_bytes(SECRET)
        self.options = {"oauth-key": str(key), "oauth-issuer": "https://idp.test"}
        return super().setUp()

    async def test_mechanisms(self):
        if shutil.which("curl") is None:
            raise missing("curl is not installed")
        good = token(iss="https://idp.test")
        for mechanism in ("OAUTHBEARER", "XOAUTH2"):
            listing = await self.curl("", "--oauth2-bearer", good,
                                      "--login-options", f"AUTH={mechanism}", user="alice:")
            self.assertEqual(len(listing.splitlines()), 4, mechanism)
            _, err, code = await self.run_curl(
                "", "--oauth2-bearer", token(iss="https://evil.test"),
                "--login-options", f"AUTH={mechanism}", user="alice:")
            self.assertEqual(code, 67, err)


class ReviewRegressionTests(TestCase):
    """Found in review of the OAuth code; each failed before its fix."""

    def test_oauthbearer_without_authzid_logs_in(self):
        s = Session()
        s.factory.portal.registerChecker(TokenChecker(JWTValidator(SECRET)))
        message = f"n,,\x01auth=Bearer {token()}\x01\x01".encode()
        out = s.send(b"AUTH OAUTHBEARER " + base64.b64encode(message) + b"\r\n")
        self.assertTrue(out.startswith(b"+OK Logged in"), out)

    def test_key_files(self):
        """Public keys in any usual form are public keys; never an HMAC secret by mistake."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key()
        forms = {
            "spki.pem": public.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo),
            "pkcs1.pem": public.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.PKCS1),
            "spki.der": public.public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo),
        }
        signed = token(key=key, algorithm="RS256")
        for name, data in forms.items():
            path = Path(self.mktemp())
            path.write_bytes(data)
            validator = JWTValidator.from_file(path)
            self.assertEqual(validator.validate(signed, None), "alice", name)
            # Someone holding the public key cannot sign an HS256 token with it.
            forged = jwt.encode({"sub": "victim", "exp": int(time.time()) + 60},
                                b"x" * 32, algorithm="HS256")
            self.assertRaises(UnauthorizedLogin, validator.validate, forged, None)
        for data in (b'{"keys": []}', b"-----BEGIN PUBLIC KEY-----\nbroken\n", b"short"):
            path = Path(self.mktemp())
            path.write_bytes(data)
            self.assertRaises(ValueError, JWTValidator.from_file, path)

    async def test_callable_must_name_a_user(self):
        with self.assertRaises(UnauthorizedLogin):
            await CallableValidator(lambda value, user: True).validate("x", None)
