"""
An existing ``twisted.mail.pop3.IMailbox`` served unchanged through
:class:`popserv.TwistedMailRealm`: Twisted's own Maildir mailbox, over TCP.
"""

from __future__ import annotations

import io
import os
import poplib
from pathlib import Path

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.mail import maildir as twisted_maildir
from twisted.mail import pop3 as twisted_pop3
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from popserv import Policy, POP3Factory, TwistedMailRealm
from popserv.core.body import wire_size
from popserv.stores.compat import binary, safe_uidl
from popserv.stores.maildir import deliver

MESSAGES = [
    b"Subject: eight bit\n\nbody \xe4\xf6\xfc (latin-1, not UTF-8)\n.dot line\n",
    b"Subject: second\r\n\r\nCRLF body\r\n",
]


class FixedMaildirMailbox(twisted_maildir.MaildirMailbox):
    """
    Twisted's MaildirMailbox with its Python 3 bug in deleteMessage fixed
    (it joins its bytes path with ``".Trash"``, a str, and raises TypeError).
    """

    def deleteMessage(self, i):
        trash = os.path.join(self.path, b".Trash", b"cur", os.path.basename(self.list[i]))
        os.rename(self.list[i], trash)
        self.deleted[self.list[i]] = trash
        self.list[i] = 0


@implementer(IRealm)
class TwistedMaildirRealm:
    """A realm as a twisted.mail application has one, serving a Twisted MaildirMailbox."""

    def __init__(self, path: Path, mailbox_class=FixedMaildirMailbox) -> None:
        self.path = path
        self.mailbox_class = mailbox_class
        self.logouts = 0

    def requestAvatar(self, avatarId, mind, *interfaces):
        assert twisted_pop3.IMailbox in interfaces

        def logout():
            self.logouts += 1

        return twisted_pop3.IMailbox, self.mailbox_class(os.fsencode(self.path)), logout


class TwistedMaildirTests(TestCase):
    def start(self, mailbox_class=FixedMaildirMailbox, **realm_options) -> int:
        self.path = Path(self.mktemp())
        twisted_maildir.initializeMaildir(str(self.path))
        for message in MESSAGES:
            deliver(self.path, message)
        self.realm = TwistedMaildirRealm(self.path, mailbox_class)
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        portal = Portal(TwistedMailRealm(self.realm, **realm_options), [checker])
        port = reactor.listenTCP(0, POP3Factory(portal, Policy(hostname="h")),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def session(self, port: int):
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        try:
            client.user("alice")
            client.pass_("secret")
            sizes = [int(line.split()[1]) for line in client.list()[1]]
            uids = [line.split()[1] for line in client.uidl()[1]]
            raw = []
            for n in (1, 2):
                # By hand, since poplib's retr() undoes the byte-stuffing.
                client._putcmd(f"RETR {n}")
                client._getresp()
                body = b""
                while (line := client.file.readline()) != b".\r\n":
                    body += line
                raw.append(body)
            client.dele(1)
            client.quit()
        finally:
            client.close()
        return sizes, uids, raw

    async def test_serves_twisted_maildir(self):
        """8-bit mail is sent byte for byte, UIDLs are Twisted's, DELE+QUIT deletes."""
        sizes, uids, raw = await deferToThread(self.session, self.start())
        self.assertEqual(raw[0], b"Subject: eight bit\r\n\r\nbody \xe4\xf6\xfc (latin-1, not UTF-8)"
                                 b"\r\n..dot line\r\n")
        self.assertEqual(raw[1], b"Subject: second\r\n\r\nCRLF body\r\n")
        mailbox = twisted_maildir.MaildirMailbox(os.fsencode(self.path))
        self.assertEqual(len(mailbox.listMessages()), 1)
        self.assertEqual(uids[1].decode(), mailbox.getUidl(0))
        # LIST says the octets RETR sends before stuffing, not the stored size.
        self.assertEqual(sizes, [len(raw[0]) - 1, len(raw[1])])
        self.assertEqual(self.realm.logouts, 1)

    async def test_store_failing_at_quit(self):
        """
        Twisted's stock MaildirMailbox fails to delete on Python 3: QUIT answers
        -ERR [SYS/TEMP], the message stays, and the realm's logout still runs.
        """
        port = self.start(mailbox_class=twisted_maildir.MaildirMailbox)

        def session():
            client = poplib.POP3("127.0.0.1", port, timeout=10)
            try:
                client.user("alice")
                client.pass_("secret")
                client.dele(1)
                with self.assertRaises(poplib.error_proto) as raised:
                    client.quit()
                return raised.exception.args[0]
            finally:
                client.close()

        answer = await deferToThread(session)
        self.assertEqual(answer, b"-ERR [SYS/TEMP] Some deleted messages were not removed")
        mailbox = twisted_maildir.MaildirMailbox(os.fsencode(self.path))
        self.assertEqual(len(mailbox.listMessages()), 2)
        self.assertEqual(self.realm.logouts, 1)
        # The operator's log has the traceback the client never sees.
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    async def test_sizes_as_reported(self):
        """exact_sizes=False takes the mailbox's own (stored) sizes, as Twisted's server does."""
        sizes, _, _ = await deferToThread(self.session, self.start(exact_sizes=False))
        self.assertEqual(sizes, [len(m.replace(b"\r\n", b"\n")) for m in MESSAGES])
        self.assertNotEqual(sizes, [wire_size(m) for m in MESSAGES])


@implementer(twisted_pop3.IMailbox)
class PolicyMailbox(twisted_pop3.Mailbox):
    """An in-memory twisted.mail mailbox with per-user policy and a failing deletion."""

    loginDelay = 900
    messageExpiration = 0

    def __init__(self, messages, undeletable=()):
        self.messages = list(messages)
        self.undeletable = set(undeletable)
        self.deleted = []
        self.synced = False

    def listMessages(self, i=None):
        sizes = [len(m) for m in self.messages]
        return sizes if i is None else sizes[i]

    def getMessage(self, i):
        return io.BytesIO(self.messages[i])

    def getUidl(self, i):
        return f"uid{i}"

    def deleteMessage(self, i):
        if i in self.undeletable:
            raise OSError("cannot delete")
        self.deleted.append(i)

    def sync(self):
        self.synced = True


@implementer(IRealm)
class OneMailboxRealm:
    def __init__(self, mailbox):
        self.mailbox = mailbox

    def requestAvatar(self, avatarId, mind, *interfaces):
        return twisted_pop3.IMailbox, self.mailbox, lambda: None


class MailboxPolicyTests(TestCase):
    def session(self, mailbox, *commands: str):
        """Log in, read CAPA, run ``commands``, QUIT; return (CAPA, QUIT answer)."""
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        portal = Portal(TwistedMailRealm(OneMailboxRealm(mailbox)), [checker])
        port = reactor.listenTCP(0, POP3Factory(portal, Policy(hostname="h")),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def talk():
            client = poplib.POP3("127.0.0.1", port.getHost().port, timeout=10)
            try:
                client.user("alice")
                client.pass_("secret")
                capa = client.capa()
                for command in commands:
                    multiline = command.startswith("RETR")
                    (client._longcmd if multiline else client._shortcmd)(command)
                try:
                    client.quit()
                except poplib.error_proto as e:
                    return capa, e.args[0]
                return capa, b"+OK"
            finally:
                client.close()

        return deferToThread(talk)

    async def test_capa_and_expire_zero(self):
        """The mailbox's loginDelay and messageExpiration are its CAPA; EXPIRE 0 applies."""
        mailbox = PolicyMailbox([b"Subject: a\n\none\n", b"Subject: b\n\ntwo\n"])
        capa, quit = await self.session(mailbox, "RETR 1")
        self.assertEqual((capa["LOGIN-DELAY"], capa["EXPIRE"]), (["900"], ["0"]))
        self.assertEqual(quit, b"+OK")
        self.assertEqual(mailbox.deleted, [0])
        self.assertTrue(mailbox.synced)

    async def test_failed_deletion_does_not_stop_the_others(self):
        mailbox = PolicyMailbox([b"a\n", b"b\n", b"c\n"], undeletable={0})
        mailbox.messageExpiration = None
        capa, quit = await self.session(mailbox, "DELE 1", "DELE 2", "DELE 3")
        self.assertEqual(capa["EXPIRE"], ["NEVER"])
        self.assertEqual(quit, b"-ERR [SYS/TEMP] Some deleted messages were not removed")
        self.assertEqual(mailbox.deleted, [1, 2])
        self.assertTrue(mailbox.synced)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class BinaryTests(SynchronousTestCase):
    def test_text_file_read_as_bytes(self):
        path = Path(self.mktemp())
        path.write_bytes(b"caf\xe9\n")
        stream = binary(open(path))
        self.assertEqual(stream.read(), b"caf\xe9\n")
        stream.close()

    def test_string_stream(self):
        stream = binary(io.StringIO("caf\u00e9\n"))
        self.assertEqual(stream.read(), "caf\u00e9\n".encode())
        stream.close()

    def test_bytes_stream_unchanged(self):
        stream = io.BytesIO(b"x")
        self.assertIs(binary(stream), stream)

    def test_safe_uidl(self):
        self.assertEqual(safe_uidl(b"abc"), "abc")
        self.assertEqual(safe_uidl("x" * 70), "x" * 70)
        for bad in ("x" * 71, "has space", "", "caf\u00e9"):
            uid = safe_uidl(bad)
            self.assertEqual(uid, safe_uidl(bad))
            self.assertTrue(0 < len(uid) <= 70 and all("!" <= c <= "~" for c in uid), bad)
