"""
What reaches the logs: never a password, a SASL response, a token or a
message body, and client-supplied names only escaped, so a client cannot
forge log lines (CR/LF) or play tricks on a terminal (escape sequences);
in the text format and in ``--log-format json`` alike.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import time
from hashlib import md5
from pathlib import Path

import jwt
import scramp
from attrs import evolve
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import fail
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from popserv.logins.passwords import PasswdFile, hash_password
from popserv.logins.sasl import MECHANISMS
from popserv.server.logformat import event_as_json
from popserv.stores.maildir import deliver
from tests.support import Session
from tests.support.servers import RawClient, ServerTestCase

PASSWORD = "Xyzzy-Plugh-9931"
WRONG = "Wr0ng-Passw0rd-5521"
BODY = b"FROBOZZ-MAGIC-ZORKMID confidential body text"
SECRET = b"a shared secret of enough length for HS256"
BOGUS_TOKEN = "QQQBOGUS.QQQTOKEN.QQQSIG"
#: Names with CR/LF, ESC and BEL, as a client may send them.
EVIL_NAMES = [b"evil\x1b[2J\x07name", b"evil\r\nFAKE: dave logged in"]


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


class LogPrivacyTests(ServerTestCase):
    def setUp(self):
        key = Path(self.mktemp())
        key.write_bytes(SECRET)
        self.options = {"oauth-key": str(key), "auth-failure-max-delay": 0.2}
        super().setUp()
        PasswdFile(self.layout.passwd_path).add("dave", hash_password(PASSWORD, "PLAIN"))
        deliver(self.layout.maildir_for("dave"), b"Subject: private\n\n" + BODY + b"\n")
        self.factory.policy = evolve(self.factory.policy, sasl=tuple(m.name for m in MECHANISMS))
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def sessions(self) -> list[bytes]:
        """Every login path, right and wrong; returns what must never be logged."""
        secrets = [PASSWORD.encode(), WRONG.encode(), BODY, BOGUS_TOKEN.encode()]

        def connect():
            return RawClient(self.portno)

        def finish(c):
            c.send(b"QUIT\r\n")
            c.line()
            c.close()

        # USER/PASS, then RETR of the private message.
        c = connect()
        c.send(b"USER dave\r\nPASS " + PASSWORD.encode() + b"\r\nRETR 1\r\n")
        c.line(), c.line(), c.line()
        self.assertIn(BODY, c.multi())
        finish(c)
        c = connect()
        c.send(b"USER dave\r\nPASS " + WRONG.encode() + b"\r\n")
        c.line(), c.line()
        finish(c)
        # SASL PLAIN, right and wrong; LOGIN.
        for password in (PASSWORD, WRONG):
            response = b64(f"\0dave\0{password}")
            secrets.append(response)
            c = connect()
            c.send(b"AUTH PLAIN " + response + b"\r\n")
            c.line()
            finish(c)
        c = connect()
        c.send(b"AUTH LOGIN\r\n")
        c.line()
        c.send(b64("dave") + b"\r\n")
        c.line()
        secrets.append(b64(PASSWORD))
        c.send(b64(PASSWORD) + b"\r\n")
        self.assertTrue(c.line().startswith(b"+OK"))
        finish(c)
        # SCRAM-SHA-256, right and wrong: every client message, and the proofs.
        for password in (PASSWORD, WRONG):
            client = scramp.ScramClient(["SCRAM-SHA-256"], "dave", password)
            first = client.get_client_first()
            c = connect()
            c.send(b"AUTH SCRAM-SHA-256 " + b64(first) + b"\r\n")
            client.set_server_first(base64.b64decode(c.line()[2:]).decode())
            final = client.get_client_final()
            secrets += [b64(first), b64(final), final.rsplit("p=", 1)[1].encode()]
            c.send(b64(final) + b"\r\n")
            answer = c.line()
            if answer.startswith(b"+ "):
                c.send(b"\r\n")
                self.assertTrue(c.line().startswith(b"+OK"))
            finish(c)
        # CRAM-MD5 and APOP: the digests.
        c = connect()
        c.send(b"AUTH CRAM-MD5\r\n")
        challenge = base64.b64decode(c.line()[2:])
        digest = hmac.new(PASSWORD.encode(), challenge, md5).hexdigest()
        response = b64(f"dave {digest}")
        secrets += [digest.encode(), response]
        c.send(response + b"\r\n")
        self.assertTrue(c.line().startswith(b"+OK"))
        finish(c)
        c = connect()
        timestamp = re.search(rb"<[^>]+>", c.greeting).group(0)
        digest = md5(timestamp + PASSWORD.encode()).hexdigest()
        secrets.append(digest.encode())
        c.send(b"APOP dave " + digest.encode() + b"\r\n")
        self.assertTrue(c.line().startswith(b"+OK"))
        finish(c)
        # OAuth: a good token, and a bogus one for a name with CR/LF.
        good = jwt.encode({"sub": "dave", "exp": int(time.time()) + 600}, SECRET, "HS256")
        for user, token in (("dave", good), (EVIL_NAMES[1].decode(), BOGUS_TOKEN)):
            response = b64(f"user={user}\x01auth=Bearer {token}\x01\x01")
            secrets += [token.encode(), response]
            c = connect()
            c.send(b"AUTH XOAUTH2 " + response + b"\r\n")
            if c.line().startswith(b"+ "):  # the error challenge: answer it
                c.send(b"\r\n")
                c.line()
            finish(c)
        # Names with control characters, by USER and by SASL PLAIN.
        for name in EVIL_NAMES:
            c = connect()
            c.send(b"USER " + name.replace(b"\r\n", b"\r") + b"\r\nPASS " + WRONG.encode()
                   + b"\r\nAUTH PLAIN " + b64(b"\0" + name + b"\0" + WRONG.encode()) + b"\r\n")
            c.line(), c.line(), c.line()
            finish(c)
        return secrets

    async def test_nothing_secret_is_logged(self):
        secrets = await self.run_in_thread(self.sessions)
        await self.wait_idle()
        ours = [e for e in self.events if str(e.get("log_namespace", "")).startswith("popserv")]
        self.assertTrue(any("dave logged in" in formatEvent(e) for e in ours))
        for event in self.events:
            line = event_as_json(event)
            everything = formatEvent(event) + repr(event) + line + repr(json.loads(line))
            for secret in secrets:
                self.assertNotIn(secret.decode(), everything, event)

    async def test_client_names_are_escaped(self):
        await self.run_in_thread(self.sessions)
        await self.wait_idle()
        texts = [formatEvent(e) for e in self.events
                 if str(e.get("log_namespace", "")).startswith("popserv")]
        for text in texts:
            self.assertIsNone(re.search(r"[\x00-\x1f\x7f]", text), text)
        logged = "\n".join(texts)
        self.assertIn(r"evil\x1b[2J\x07name", logged)
        self.assertIn(r"evil\r\nFAKE: dave logged in", logged)
        # JSON: one line per event, no raw control character, and the
        # fields hold the escaped names, as the text lines show them.
        lines = [event_as_json(e) for e in self.events
                 if str(e.get("log_namespace", "")).startswith("popserv")]
        for line in lines:
            self.assertIsNone(re.search(r"[\x00-\x1f\x7f-\uffff]", line), line)
        users = {json.loads(line).get("user") for line in lines}
        self.assertIn(r"evil\x1b[2J\x07name", users)
        self.assertIn(r"evil\r\nFAKE: dave logged in", users)


@implementer(ICredentialsChecker)
class QuotingChecker:
    """A checker whose refusal quotes the client, as a token library's errors may."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        return fail(UnauthorizedLogin(f"no such user {credentials.username!s}\x1b[2J\r\nFAKE"))


class ReasonTests(SynchronousTestCase):
    def test_checker_reasons_are_escaped(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        s = Session()
        s.factory.portal = Portal(s.realm, [QuotingChecker()])
        s.send(b"USER alice\r\nPASS secret\r\n")
        s.advance(5)
        [text] = [formatEvent(e) for e in events if "Failed login" in e.get("log_format", "")]
        self.assertIn(r"\x1b[2J\r\nFAKE", text)
        self.assertIsNone(re.search(r"[\x00-\x1f\x7f]", text), text)
