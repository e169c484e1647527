"""
Moving from Dovecot: a Maildir with a ``dovecot-uidlist`` keeps its UIDLs.

First the store on Maildirs with hand-written uidlists (damaged ones too),
then the real thing: a private Dovecot serves a Maildir over POP3, which
makes it write its uidlist, and popserv, serving the same Maildir with the
same password file, must answer UIDL and LIST exactly as Dovecot did.
"""

from __future__ import annotations

import os
import poplib
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from popserv.server.service import make_factory
from popserv.stores.maildir import MaildirMailbox
from popserv.stores.maildir.names import digest_uidl
from popserv.stores.maildir.uidlist import UIDLIST_FILE
from tests.support.dovecot import PrivateDovecot, give_to_mail_user, mail_ids, require_dovecot
from tests.support.maildirs import MaildirTestCase

UIDVALIDITY = 1795516063  # 0x6b05669f


def uidlist(*lines: str, header: str = f"3 V{UIDVALIDITY} N9 G0123") -> bytes:
    return "\n".join([header, *lines, ""]).encode()


class MigratedMaildirTests(MaildirTestCase):
    """The store on a Maildir that has a dovecot-uidlist."""

    def migrated(self) -> Path:
        """Three messages Dovecot knew (as it leaves them: in cur/) and one it did not."""
        maildir = self.maildir()
        self.put(maildir, "cur", "1700000300.M1P1.host:2,", b"first uid, latest time\n")
        self.put(maildir, "cur", "1700000100.M2P1.host,S=7,W=8:2,S", b"second\n")
        self.put(maildir, "cur", "plainname:2,", b"no time in the name\n")
        self.put(maildir, "new", "1700000200.M3P1.host", b"delivered after the switch\n")
        (maildir / UIDLIST_FILE).write_bytes(
            uidlist(
                "1 W24 :1700000300.M1P1.host",
                "2 :1700000100.M2P1.host,S=7,W=8",
                "5 W21 :plainname",
            )
        )
        return maildir

    async def test_dovecot_uidls_and_order(self) -> None:
        """Listed messages in UID order with Dovecot's UIDLs; later mail after, with its own."""
        mailbox = await self.open(self.migrated())
        self.assertEqual(
            list(mailbox.listing().uids),
            ["000000016b05669f", "000000026b05669f", "000000056b05669f", "1700000200.M3P1.host"],
        )
        self.assertEqual(list(mailbox.listing().sizes), [24, 8, 21, 28])
        self.assertEqual(list(mailbox.listing().seen), [False, True, False, False])

    async def test_formats(self) -> None:
        """--uidl-format picks another Dovecot format, or popserv's own names."""
        maildir = self.migrated()
        for text, expected in {
            "%v.%u": [f"{UIDVALIDITY}.{uid}" for uid in (1, 2, 5)],
            "%g": ["1700000300.M1P1.host", "1700000100.M2P1.host,S=7,W=8", "plainname"],
        }.items():
            mailbox = await MaildirMailbox.open(maildir, uidl_format=text)
            self.assertEqual(list(mailbox.listing().uids)[:3], expected, text)
            mailbox.close()
        mailbox = await self.open(maildir, uidl_format="maildir")
        self.assertEqual(
            list(mailbox.listing().uids),
            ["1700000100.M2P1.host,S=7,W=8", "1700000200.M3P1.host", "1700000300.M1P1.host",
             "plainname"],
        )

    async def test_pop3_order_records(self) -> None:
        """O records come first, lowest first; then the other listed messages by UID."""
        maildir = self.maildir()
        for i in range(1, 4):
            self.put(maildir, "cur", f"{i}.x.host:2,", b"%d\n" % i)
        (maildir / UIDLIST_FILE).write_bytes(
            uidlist("1 :1.x.host", "2 O2 :2.x.host", "3 O1 P3rd :3.x.host")
        )
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().uids), ["3rd", "000000026b05669f",
                                                        "000000016b05669f"])

    async def test_read_delete_and_mark(self) -> None:
        """With Dovecot UIDLs, RETR, DELE and marking seen still find the right files."""
        maildir = self.migrated()
        mailbox = await self.open(maildir)
        self.assertEqual(await self.read(mailbox, 0), b"first uid, latest time\n")
        self.assertEqual(await self.read(mailbox, 3), b"delivered after the switch\n")
        # Another program re-flags one meanwhile: found by its unique name.
        os.rename(maildir / "cur" / "plainname:2,", maildir / "cur" / "plainname:2,F")
        self.assertEqual(await self.read(mailbox, 2), b"no time in the name\n")
        await mailbox.commit([1], [0, 2, 3])
        self.assertEqual(self.files(maildir, "new"), [])
        self.assertEqual(
            self.files(maildir, "cur"),
            ["1700000200.M3P1.host:2,S", "1700000300.M1P1.host:2,S", "plainname:2,FS"],
        )
        mailbox.close()
        # The UIDLs stay as they were after the renames.
        mailbox = await self.open(maildir)
        self.assertEqual(
            list(mailbox.listing().uids),
            ["000000016b05669f", "000000056b05669f", "1700000200.M3P1.host"],
        )

    async def test_damaged_uidlist(self) -> None:
        """A garbage or cut-off uidlist never stops a login; what it misses gets own UIDLs."""
        maildir = self.migrated()
        path = maildir / UIDLIST_FILE
        path.write_bytes(b"\x00\xff garbage\n1 :1700000300.M1P1.host\n")
        mailbox = await MaildirMailbox.open(maildir)
        self.assertEqual(len(set(mailbox.listing().uids)), 4)
        self.assertIn("1700000300.M1P1.host", mailbox.listing().uids)
        mailbox.close()
        path.write_bytes(uidlist("1 :1700000300.M1P1.host", "2 :1700000100.M2P1.ho"))
        mailbox = await self.open(maildir)
        self.assertEqual(
            list(mailbox.listing().uids),
            ["000000016b05669f", "1700000100.M2P1.host,S=7,W=8", "1700000200.M3P1.host",
             "plainname"],
        )

    async def test_unusual_uidlist_files(self) -> None:
        """A symlink or a FIFO in place of the uidlist is not read (and does not hang)."""
        maildir = self.migrated()
        path = maildir / UIDLIST_FILE
        path.rename(maildir / "elsewhere")
        path.symlink_to(maildir / "elsewhere")
        mailbox = await MaildirMailbox.open(maildir)
        self.assertIn("plainname", mailbox.listing().uids)
        mailbox.close()
        path.unlink()
        os.mkfifo(path)
        mailbox = await self.open(maildir)
        self.assertIn("plainname", mailbox.listing().uids)

    async def test_no_collision_with_dovecot_uidls(self) -> None:
        """A later message named like a Dovecot UIDL gets a digest, not a repeat."""
        maildir = self.migrated()
        self.put(maildir, "new", "000000016b05669f", b"sneaky\n")
        mailbox = await self.open(maildir)
        uids = list(mailbox.listing().uids)
        self.assertEqual(uids.count("000000016b05669f"), 1)
        self.assertIn(digest_uidl("000000016b05669f"), uids)

    async def test_empty_unique_name(self) -> None:
        """A file named only ``:2,S`` (no unique part) is still served."""
        maildir = self.migrated()
        self.put(maildir, "cur", ":2,S", b"odd\n")
        os.utime(maildir / "cur" / ":2,S", (1, 1))
        mailbox = await self.open(maildir)
        # Not listed by Dovecot, and with the oldest time: first after the listed ones.
        self.assertEqual(mailbox.listing().uids[3], digest_uidl(""))
        self.assertEqual(await self.read(mailbox, 3), b"odd\n")
        await mailbox.commit([3], [])
        self.assertNotIn(":2,S", self.files(maildir, "cur"))


def fetch(port: int, user: str, password: str) -> tuple[list[bytes], list[bytes]]:
    """UIDL and LIST over POP3, as poplib gets them; changes nothing."""
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user(user)
        client.pass_(password)
        return client.uidl()[1], client.list()[1]
    finally:
        client.quit()


class RealDovecotTests(TestCase):
    """popserv against a real Dovecot on the same Maildir."""

    def setUp(self) -> None:
        require_dovecot()
        self.root = Path(self.mktemp()).absolute()
        self.maildir = self.root / "mail" / "alice"
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(parents=True)
        # Names as different writers make them: plain (Postfix), with sizes
        # (Dovecot's LDA), already in cur/ with flags, and with no time at all.
        messages = {
            "new/1700000003.V801I1M1.mx.test": b"Subject: three\n\nbody\n.dot\n",
            "new/1700000001.M1P1Q1.mx.test,S=19,W=22": b"Subject: one\n\nbody\n",
            "cur/1700000002.M2P1.mx.test:2,S": b"Subject: two\r\n\r\ncrlf body\r\n",
            "new/plainname": b"Subject: no time\n\nlast\n",
            "cur/1699999999.M9P9.mx.test:2,FS": b"Subject: flagged\n\n" + b"line\n" * 50,
        }
        for name, data in messages.items():
            (self.maildir / name).write_bytes(data)
        self.passwd = self.root / "passwd"
        self.passwd.write_text(f"alice:{{PLAIN}}pw:{mail_ids()}::{self.maildir}\n")
        give_to_mail_user(self.root)

    def dovecot(self, settings: str = "") -> list[list[bytes]]:
        """UIDL and LIST from a Dovecot started (and stopped) for this call."""
        dovecot = PrivateDovecot(self.root / f"dovecot{time.monotonic_ns()}", self.passwd,
                                 self.maildir, settings)
        try:
            return list(fetch(dovecot.port, "alice", "pw"))
        finally:
            dovecot.stop()

    async def popserv(self, uidl_format: str = "dovecot") -> list[list[bytes]]:
        """UIDL and LIST from popserv serving the same Maildir and password file."""
        options = {
            "data": str(self.root / "popserv"),
            "passwd": str(self.passwd),
            "maildir": str(self.root / "mail" / "{user}"),
            "hostname": "pop.test",
            "uidl-format": uidl_format,
        }
        factory = make_factory(options, reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        try:
            return list(await deferToThread(fetch, port.getHost().port, "alice", "pw"))
        finally:
            for _ in range(200):
                if not factory.sessions:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            await port.stopListening()

    async def test_same_uidls_as_dovecot(self) -> None:
        """After Dovecot served the Maildir, popserv lists the same UIDLs and sizes."""
        uidl, listing = await deferToThread(self.dovecot)
        self.assertTrue((self.maildir / UIDLIST_FILE).exists())
        self.assertRegex(uidl[0].decode(), r"^1 [0-9a-f]{16}$")
        self.assertEqual(await self.popserv(), [uidl, listing])

    async def test_other_formats(self) -> None:
        """The same for the common other pop3_uidl_format values, given as --uidl-format."""
        for uidl_format in ("%u", "%v.%u", "%v-%u", "%08Xv%08Xu", "%g", "%f", "%Mf"):
            expected = await deferToThread(self.dovecot, f"pop3_uidl_format = {uidl_format}")
            self.assertEqual(await self.popserv(uidl_format), expected, uidl_format)

    async def test_saved_uidls(self) -> None:
        """UIDLs Dovecot saved in the uidlist (pop3_save_uidl) are served by default."""
        expected = await deferToThread(
            self.dovecot, "pop3_uidl_format = %v.%u\npop3_save_uidl = yes"
        )
        self.assertIn(b" P", (self.maildir / UIDLIST_FILE).read_bytes())
        self.assertEqual(await self.popserv(), expected)
