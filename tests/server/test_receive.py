"""
The SMTP and LMTP receiver end to end: real clients (smtplib, swaks, raw
sockets) over loopback, real Maildirs, then the same messages fetched back
over POP3 byte for byte.
"""

from __future__ import annotations

import errno
import importlib
import os
import poplib
import shutil
import smtplib
import ssl
import subprocess
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from popserv.logins.passwords import PasswdFile, hash_password
from popserv.server.receiving.connection import peer_text
from popserv.stores import delivery
from popserv.stores.delivery import BadAddress, RelayDenied, UnknownUser
from tests.support.certs import CA
from tests.support.peers import missing
from tests.support.receiver import START_DATA, ReceiverTestCase, SMTPClient

#: The module, which ``popserv.stores.maildir.deliver`` (the function) hides.
deliver_module = importlib.import_module("popserv.stores.maildir.deliver")

#: Dots at line starts, a CRLF/LF mix, 8-bit text, a lone CR, no final newline.
MESSAGE = (
    b"From: sender@remote.test\r\nSubject: round trip\r\n\r\n"
    b".one dot\r\n..two dots\r\n.\r\n"
    b"8-bit: \xe4\xf6\xfc\r\nlone CR \r here\r\nlast line"
)

NO_SPACE = b"Insufficient system storage, try again later"


def crlf(data: bytes) -> bytes:
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\r\n") else out + b"\r\n"


class SMTPDeliveryTests(ReceiverTestCase):
    async def test_round_trip(self):
        """smtplib delivers; POP3 serves the same bytes, after the trace fields."""
        refused = await self.in_thread(
            self.smtplib_send, "sender@remote.test", ["alice@example.org"], MESSAGE
        )
        self.assertEqual(refused, {})
        [(size, body)] = await self.in_thread(self.fetch, "alice", "alice pw")
        head, _, rest = body.partition(b"From: sender@remote.test")
        self.assertEqual(b"From: sender@remote.test" + rest, crlf(MESSAGE))
        self.assertTrue(head.startswith(b"Return-Path: <sender@remote.test>\r\n"))
        self.assertIn(b"Delivered-To: alice@example.org\r\n", head)
        self.assertIn(b"by mx.example.org (popserv) with ESMTP id ", head)
        self.assertIn(b"for <alice@example.org>;", head)
        self.assertEqual(size, len(body))
        [stored] = self.stored("alice")
        self.assertNotIn(b"\r\n", stored.replace(b" \r here", b""))  # LF on disk
        self.assertEqual(self.tmp_files("alice"), [])

    async def test_several_recipients_plus_tag_and_case(self):
        """user+tag and any case reach the user; one copy per Maildir."""
        refused = await self.in_thread(
            self.smtplib_send,
            "<>",
            ["alice+lists@example.org", "Bob@EXAMPLE.ORG", "alice@example.org"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        self.assertEqual(refused, {})
        self.assertEqual(len(self.stored("alice")), 1)
        [bob] = self.stored("bob")
        self.assertTrue(bob.startswith(b"Return-Path: <>\nDelivered-To: Bob@EXAMPLE.ORG\n"))

    async def test_unknown_user_and_relay(self):
        """Unknown users get 550 5.1.1; other domains 550 5.7.1, whatever the trick."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\n"
            b"RCPT TO:<nobody@example.org>\r\n"
            b"RCPT TO:<someone@gmail.com>\r\n"
            b"RCPT TO:<@example.org:someone@gmail.com>\r\n"
            b"RCPT TO:<alice%gmail.com@example.org>\r\n"
            b"RCPT TO:<alice@example.org.evil.test>\r\n"
            b"DATA\r\nQUIT\r\n"
        )
        replies = await self.in_thread(client.codes, 9)
        self.assertEqual(
            replies[1:],
            [
                b"250 2.1.0 Sender OK",
                b"550 5.1.1 User unknown",
                b"550 5.7.1 Relaying denied",
                b"550 5.7.1 Relaying denied",
                b"550 5.1.1 User unknown",
                b"550 5.7.1 Relaying denied",
                b"554 5.5.1 No valid recipients",
                b"221 2.0.0 Bye",
            ],
        )

    def test_bare_local_part_only_from_local_clients(self):
        """``alice`` alone is accepted from loopback and a UNIX socket, not from afar."""
        remote = IPv4Address("TCP", "192.0.2.7", 4000)
        local = IPv4Address("TCP", "127.0.0.1", 4000)
        self.assertEqual(self.smtp.resolve("alice", local).user, "alice")
        self.assertEqual(self.smtp.resolve("alice", UNIXAddress(None)).user, "alice")
        self.assertRaises(RelayDenied, self.smtp.resolve, "alice", remote)
        self.assertEqual(self.smtp.resolve("alice@example.org", remote).user, "alice")
        self.assertRaises(RelayDenied, self.smtp.resolve, "alice@other.test", remote)
        self.assertRaises(UnknownUser, self.smtp.resolve, "Postmaster", remote)
        self.assertRaises(BadAddress, self.smtp.resolve, "", remote)
        # LMTP: the MTA routed it, any domain.
        self.assertEqual(self.lmtp.resolve("alice@other.test", remote).user, "alice")

    async def test_size(self):
        """SIZE is advertised; a bigger declared SIZE is refused at MAIL, a
        bigger message after DATA, and nothing is stored."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(b"EHLO client.test\r\n")
        ehlo = await self.in_thread(client.reply)
        self.assertIn(b"250-SIZE 100000", ehlo)
        for extension in (b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES"):
            self.assertTrue(any(line[4:] == extension for line in ehlo), extension)
        client.send(b"MAIL FROM:<a@remote.test> SIZE=100001\r\n")
        self.assertEqual(
            await self.in_thread(client.codes, 1),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
        client.send(
            b"MAIL FROM:<a@remote.test> SIZE=1000 BODY=8BITMIME\r\n"
            b"RCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        self.assertEqual(
            await self.in_thread(client.codes, 3),
            [
                b"250 2.1.0 Sender OK",
                b"250 2.1.5 Recipient OK",
                START_DATA,
            ],
        )
        client.send(big * 120 + b".\r\nNOOP\r\n")
        self.assertEqual(
            await self.in_thread(client.codes, 2),
            [b"552 5.3.4 Message too big", b"250 2.0.0 OK"],
        )
        self.assertEqual(self.stored("alice"), [])

    async def test_long_lines_in_data(self):
        """No line limit inside DATA: a 50,000-octet line arrives whole."""
        line = b"y" * 50_000
        await self.in_thread(
            self.smtplib_send, "a@remote.test", ["alice@example.org"], b"\r\n" + line + b"\r\n"
        )
        [stored] = self.stored("alice")
        self.assertTrue(stored.endswith(b"\n\n" + line + b"\n"))

    async def send_raw(self, recipients: list[bytes], body: bytes) -> list[bytes]:
        """One transaction without SIZE, so only the end of DATA can refuse it."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\n"
            + b"".join(b"RCPT TO:<%s>\r\n" % r for r in recipients)
            + b"DATA\r\n"
        )
        replies = await self.in_thread(client.codes, 3 + len(recipients))
        self.assertEqual(replies[-1], START_DATA)
        client.send(body + b".\r\nQUIT\r\n")
        return await self.in_thread(client.codes, 2)

    async def test_quota(self):
        """carol may hold one message of at most 1 KiB: a bigger one is
        refused at RCPT when SIZE says so, else after DATA; then one fits,
        then RCPT is refused at once."""
        big = b"Subject: big\r\n\r\n" + b"z" * 2000 + b"\r\n"
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as refused:
            await self.in_thread(self.smtplib_send, "a@remote.test", ["carol@example.org"], big)
        full = (552, b"5.2.2 Mailbox full")
        self.assertEqual(refused.exception.recipients["carol@example.org"], full)
        replies = await self.send_raw([b"carol@example.org"], big)
        self.assertEqual(replies, [b"552 5.2.2 Mailbox full", b"221 2.0.0 Bye"])
        self.assertEqual(self.stored("carol"), [])
        await self.in_thread(
            self.smtplib_send, "a@remote.test", ["carol@example.org"], b"Subject: s\r\n\r\nhi\r\n"
        )
        self.assertEqual(len(self.stored("carol")), 1)
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as refused:
            await self.in_thread(
                self.smtplib_send, "a@remote.test", ["carol@example.org"], b"Subject: s\r\n\r\n"
            )
        self.assertEqual(refused.exception.recipients["carol@example.org"], full)

    async def test_quota_is_all_or_nothing_over_smtp(self):
        """SMTP has one answer for all recipients: if one has no room, none gets it."""
        body = b"Subject: big\r\n\r\n" + b"z" * 2000 + b"\r\n"
        replies = await self.send_raw([b"alice@example.org", b"carol@example.org"], body)
        self.assertEqual(replies[0], b"552 5.2.2 Mailbox full")
        self.assertEqual(self.stored("alice") + self.stored("carol"), [])
        self.assertEqual(self.tmp_files("alice") + self.tmp_files("carol"), [])

    async def test_pipelined_transactions(self):
        """Two transactions pipelined (RFC 2920), with a quota lookup in a
        thread in the middle: the replies come in order, both are stored."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<carol@example.org>\r\n"
            b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        replies = await self.in_thread(client.codes, 6)
        self.assertEqual(
            replies[1:],
            [
                b"250 2.1.0 Sender OK",
                b"250 2.1.5 Recipient OK",
                b"550 5.1.1 User unknown",
                b"250 2.1.5 Recipient OK",
                START_DATA,
            ],
        )
        client.send(
            b"Subject: one\r\n\r\nfirst\r\n.\r\n"
            b"MAIL FROM:<b@remote.test>\r\nRCPT TO:<carol@example.org>\r\n"
            b"RCPT TO:<bob@example.org>\r\nDATA\r\n"
        )
        self.assertEqual(
            await self.in_thread(client.codes, 5),
            [
                b"250 2.0.0 Message accepted for delivery",
                b"250 2.1.0 Sender OK",
                b"552 5.2.2 Mailbox full",
                b"250 2.1.5 Recipient OK",
                START_DATA,
            ],
        )
        client.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        self.assertEqual(
            await self.in_thread(client.codes, 2),
            [b"250 2.0.0 Message accepted for delivery", b"221 2.0.0 Bye"],
        )
        self.assertEqual(len(self.stored("alice")), 1)
        self.assertEqual(len(self.stored("carol")), 1)
        [bob] = self.stored("bob")
        self.assertTrue(bob.endswith(b"Subject: two\n\nsecond\n"))

    async def test_bad_commands(self):
        """Each mistake gets its own reply and the session goes on."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"MAIL FROM:<a@remote.test>\r\nEHLO\r\nHELO client.test\r\n"
            b"MAIL FROM:<a@remote.test> SIZE=10\r\nRCPT TO:<alice@example.org>\r\n"
            b"MAIL FROM:<a@remote.test>\r\nMAIL FROM:<a@remote.test>\r\nMAIL FROM:<a@>>\r\n"
            b"RCPT TO:<\xc3\xa4lice@example.org>\r\nAUTH PLAIN\r\nVRFY alice\r\nEXPN list\r\n"
            b"\x00\x01\r\nNOOP\r\n"
        )
        self.assertEqual(
            await self.in_thread(client.codes, 14),
            [
                b"503 5.5.1 Send EHLO first",
                b"501 5.5.4 Say who you are",
                b"250 mx.example.org Hello [127.0.0.1]",
                b"555 5.5.4 Parameters need EHLO",
                b"503 5.5.1 Need MAIL before RCPT",
                b"250 2.1.0 Sender OK",
                b"503 5.5.1 Sender already given",
                b"503 5.5.1 Sender already given",
                b"553 5.6.7 Non-ASCII addresses are not supported",
                b"500 5.5.1 Command unrecognized",
                b"252 2.5.2 Cannot VRFY user, but will accept message",
                b"502 5.5.1 EXPN not available",
                b"500 5.5.1 Command unrecognized",
                b"250 2.0.0 OK",
            ],
        )

    async def test_too_many_errors_and_long_lines(self):
        """A client that only errs is cut off; so is an endless command line."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(b"BOGUS\r\n" * 25)
        replies = await self.in_thread(client.codes, 20)
        self.assertEqual(replies[-1], b"500 5.5.1 Command unrecognized")
        self.assertEqual(
            await self.in_thread(client.codes, 1), [b"421 4.7.0 Too many errors, closing"]
        )
        other = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(other.close)
        other.send(b"NOOP " + b"x" * 5000)
        self.assertEqual(await self.in_thread(other.codes, 1), [b"500 5.5.2 Line too long"])
        with self.assertRaises(EOFError):
            await self.in_thread(other.line)

    async def test_dropped_in_data(self):
        """A connection lost in the middle of DATA stores nothing."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        await self.in_thread(client.codes, 4)
        client.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
        client.close()
        await self.in_thread(
            self.smtplib_send, "a@remote.test", ["bob@example.org"], b"Subject: s\r\n\r\n"
        )
        self.assertEqual(self.stored("alice"), [])

    async def test_delivered_while_pop3_session_holds_the_lock(self):
        """Delivery never waits on a POP3 session; the mail shows in the next one."""
        session = await self.in_thread(poplib.POP3, "127.0.0.1", self.ports["pop3"], timeout=10)
        self.addCleanup(session.close)
        await self.in_thread(session.user, "alice")
        await self.in_thread(session.pass_, "alice pw")
        await self.in_thread(
            self.smtplib_send, "a@remote.test", ["alice@example.org"], b"Subject: s\r\n\r\nnew\r\n"
        )
        self.assertEqual((await self.in_thread(session.stat))[0], 0)
        await self.in_thread(session.quit)
        [(_, body)] = await self.in_thread(self.fetch, "alice", "alice pw")
        self.assertTrue(body.endswith(b"Subject: s\r\n\r\nnew\r\n"))


class FailureTests(ReceiverTestCase):
    def fail_writes(self, after: int = 100):
        """Make the store's writes fail with ENOSPC after ``after`` octets,
        until ``self.disk_full`` is set to False."""
        real = deliver_module._write_lf
        self.disk_full = True

        def failing(fd, source):
            if not self.disk_full:
                return real(fd, source)
            written = 0
            for chunk in source:
                os.write(fd, chunk[: max(0, after - written)])
                written += len(chunk)
                if written > after:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, b"")

        self.patch(deliver_module, "_write_lf", failing)

    async def test_disk_full_is_temporary_and_leaves_nothing(self):
        self.fail_writes()
        body = b"Subject: s\r\n\r\n" + b"w" * 5000 + b"\r\n"
        with self.assertRaises(smtplib.SMTPDataError) as raised:
            await self.in_thread(
                self.smtplib_send, "a@remote.test", ["alice@example.org", "bob@example.org"], body
            )
        self.assertEqual(raised.exception.smtp_code, 452)
        self.assertEqual(
            raised.exception.smtp_error, b"4.3.1 Insufficient system storage, try again later"
        )
        self.assertEqual(self.stored("alice") + self.stored("bob"), [])
        self.assertEqual(self.tmp_files("alice") + self.tmp_files("bob"), [])
        # The server carries on.
        self.disk_full = False
        await self.in_thread(self.smtplib_send, "a@remote.test", ["alice@example.org"], body)
        self.assertEqual(len(self.stored("alice")), 1)

    async def test_lmtp_reports_each_recipient(self):
        """Over LMTP, a write failure for one recipient is a 452 for that one only."""
        real = delivery.prepare

        def prepare(maildir, *args, **kwargs):
            if str(maildir) == str(self.maildir("bob")):
                raise OSError(errno.EIO, "I/O error")
            return real(maildir, *args, **kwargs)

        self.patch(delivery, "prepare", prepare)
        client = await self.in_thread(SMTPClient, self.ports["lmtp"])
        self.addCleanup(client.close)
        client.send(
            b"LHLO mta.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
            b"RCPT TO:<carol@example.org>\r\nDATA\r\n"
        )
        replies = await self.in_thread(client.codes, 7)
        self.assertEqual(replies[0], b"250-mx.example.org Hello [127.0.0.1]")
        self.assertEqual(replies[3], b"550 5.1.1 User unknown")
        client.send(b"Subject: lmtp\r\n\r\n" + b"q" * 1500 + b"\r\n.\r\nQUIT\r\n")
        self.assertEqual(
            await self.in_thread(client.codes, 4),
            [
                b"250 2.0.0 Message accepted for delivery",
                b"452 4.3.1 " + NO_SPACE,
                b"552 5.2.2 Mailbox full",
                b"221 2.0.0 Bye",
            ],
        )
        self.assertEqual(len(self.stored("alice")), 1)
        self.assertEqual(self.stored("bob") + self.stored("carol"), [])


class TLSReceiverTests(ReceiverTestCase):
    """STARTTLS with the POP3 certificates."""

    def setUp(self):
        certs = Path(self.mktemp())
        ca = CA()
        self.cafile = ca.write(certs / "ca.pem")
        cert, key = ca.issue("mx.example.org", "127.0.0.1").write(certs, "server")
        self.options = {"tls-cert": [str(cert)], "tls-key": [str(key)]}
        from popserv.server.configure import tls_server

        self.options["tls"] = tls_server(self.options)
        super().setUp()

    def send_tls(self, message: bytes) -> None:
        context = ssl.create_default_context(cafile=str(self.cafile))
        client = smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=10)
        try:
            client.ehlo()
            assert client.has_extn("starttls")
            client.starttls(context=context)
            client.ehlo()
            assert not client.has_extn("starttls")
            client.sendmail("a@remote.test", ["alice@example.org"], message)
        finally:
            client.quit()

    async def test_starttls(self):
        await self.in_thread(self.send_tls, b"Subject: tls\r\n\r\nsecret\r\n")
        [stored] = self.stored("alice")
        self.assertIn(b" with ESMTPS id ", stored)

    async def test_no_injection_through_starttls(self):
        """Commands sent in clear after STARTTLS are dropped, and EHLO is forgotten."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(b"EHLO c\r\n")
        await self.in_thread(client.reply)
        client.send(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\n")
        self.assertEqual(await self.in_thread(client.codes, 1), [b"220 2.0.0 Ready to start TLS"])
        context = ssl.create_default_context(cafile=str(self.cafile))
        client.sock = await self.in_thread(
            context.wrap_socket, client.sock, server_hostname="mx.example.org"
        )
        client.send(b"RCPT TO:<alice@example.org>\r\nMAIL FROM:<a@remote.test>\r\nQUIT\r\n")
        self.assertEqual(
            await self.in_thread(client.codes, 3),
            [b"503 5.5.1 Need MAIL before RCPT", b"503 5.5.1 Send EHLO first", b"221 2.0.0 Bye"],
        )

    async def test_swaks_starttls(self):
        """swaks, which needs Net::SSLeay for TLS, requires STARTTLS and checks nothing else."""
        if shutil.which("swaks") is None:
            raise missing("swaks is not installed")
        probe = subprocess.run(["perl", "-MNet::SSLeay", "-e", "1"], check=False)
        if probe.returncode:
            raise missing("swaks cannot do TLS without Net::SSLeay (libnet-ssleay-perl)")
        result = await self.in_thread(
            subprocess.run,
            ["swaks", "--server", "127.0.0.1", "--port", str(self.ports["smtp"]), "--tls",
             "--from", "a@remote.test", "--to", "alice@example.org", "--body", "over TLS"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        [stored] = self.stored("alice")
        self.assertIn(b" with ESMTPS id ", stored)
        self.assertIn(b"\n\nover TLS\n", stored)

    def test_alpn_is_smtp(self):
        """The receiver's TLS takes ALPN ``smtp`` (and so refuses ``pop3``)."""
        self.assertEqual(self.smtp.tls.alpn, b"smtp")
        self.assertEqual(self.pop3.tls.alpn, b"pop3")


class RealClientTests(ReceiverTestCase):
    """swaks, over SMTP and over LMTP on a UNIX socket."""

    def setUp(self):
        if shutil.which("swaks") is None:
            raise missing("swaks is not installed")
        super().setUp()
        self.socket_path = os.path.join(self.mktemp() + ".d", "lmtp.sock")
        os.makedirs(os.path.dirname(self.socket_path))
        port = reactor.listenUNIX(self.socket_path, self.lmtp)
        self.addCleanup(port.stopListening)

    def swaks(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["swaks", "--from", "a@remote.test", "--h-Subject", "swaks", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )

    async def test_swaks_smtp_pipelined(self):
        result = await self.in_thread(
            self.swaks,
            "--server", "127.0.0.1", "--port", str(self.ports["smtp"]),
            "--to", "alice@example.org,bob@example.org", "--pipeline",
            "--body", "via swaks\n.dot line",
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for user in ("alice", "bob"):
            [stored] = self.stored(user)
            self.assertIn(b"\nvia swaks\n.dot line\n", stored)

    async def test_swaks_lmtp_unix_socket(self):
        """LMTP on a UNIX socket: one reply per recipient after DATA."""
        result = await self.in_thread(
            self.swaks,
            "--socket", self.socket_path, "--protocol", "LMTP",
            "--to", "alice@other.test,nobody@example.org,bob+x@example.org",
        )  # fmt: skip
        self.assertIn("<** 550 5.1.1 User unknown", result.stdout)
        self.assertEqual(result.stdout.count("<-  250 2.0.0 Message accepted for delivery"), 2)
        self.assertEqual(len(self.stored("alice")), 1)
        [bob] = self.stored("bob")
        self.assertIn(b"with LMTP id", bob)
        self.assertIn(b"Delivered-To: bob+x@example.org\n", bob)


class ConnectionLimitTests(ReceiverTestCase):
    """The POP3 connection limits hold for SMTP too (counted separately)."""

    options = {"max-connections-per-ip": 2}

    async def test_per_client_limit(self):
        """A third connection from one address gets a 421; after one closes, a new one works."""
        first = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(first.close)
        second = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(second.close)
        third = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(third.close)
        self.assertEqual(third.greeting, [b"421 4.7.0 Too many connections, try again later"])
        self.assertEqual(self.smtp.sessions, 2)
        first.send(b"QUIT\r\n")
        self.assertEqual(await self.in_thread(first.codes, 1), [b"221 2.0.0 Bye"])
        with self.assertRaises(EOFError):
            await self.in_thread(first.line)
        fourth = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(fourth.close)
        self.assertTrue(fourth.greeting[0].startswith(b"220 mx.example.org ESMTP"))

    async def test_one_admission_for_every_listener(self):
        """POP3, SMTP and LMTP ask one admission, which counts each service apart."""
        self.assertIs(self.smtp.admission, self.pop3.admission)
        self.assertIs(self.lmtp.admission, self.pop3.admission)
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        self.assertEqual(self.smtp.admission.clients("smtp"), {"127.0.0.1": 1})
        self.assertEqual(self.smtp.admission.clients("lmtp"), {})


class ReviewRegressionTests(ReceiverTestCase):
    """Bugs a review found, each with the test that failed before the fix."""

    async def test_lmtp_refusals_are_not_errors(self):
        """An MTA's 25 unknown recipients do not close the LMTP session."""
        client = await self.in_thread(SMTPClient, self.ports["lmtp"])
        self.addCleanup(client.close)
        unknown = b"".join(b"RCPT TO:<nobody%d@example.org>\r\n" % n for n in range(25))
        client.send(
            b"LHLO mta\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
            + unknown
            + b"DATA\r\n"
        )
        replies = await self.in_thread(client.codes, 29)
        self.assertEqual(replies[-1], START_DATA)
        client.send(b"Subject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        self.assertEqual(
            await self.in_thread(client.codes, 2),
            [b"250 2.0.0 Message accepted for delivery", b"221 2.0.0 Bye"],
        )

    async def test_smtp_publish_failure_takes_back_the_other_copies(self):
        """SMTP all-or-nothing holds when linking into new/ fails for one recipient."""
        real = deliver_module.PendingDelivery.publish

        def publish(pending):
            if str(pending.maildir) == str(self.maildir("bob")):
                raise OSError(errno.EXDEV, "cross-device link")
            return real(pending)

        self.patch(deliver_module.PendingDelivery, "publish", publish)
        with self.assertRaises(smtplib.SMTPDataError) as raised:
            await self.in_thread(
                self.smtplib_send,
                "a@remote.test",
                ["alice@example.org", "bob@example.org"],
                b"Subject: s\r\n\r\nhi\r\n",
            )
        self.assertEqual(raised.exception.smtp_code, 452)
        self.assertEqual(self.stored("alice") + self.stored("bob"), [])

    async def test_lmtp_internal_error_answers_every_recipient(self):
        def broken(*args, **kwargs):
            raise RuntimeError("bug")

        self.patch(delivery, "deliver_message", broken)
        client = await self.in_thread(SMTPClient, self.ports["lmtp"])
        self.addCleanup(client.close)
        client.send(
            b"LHLO mta\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<bob@example.org>\r\nDATA\r\n"
        )
        await self.in_thread(client.codes, 5)
        client.send(b"Subject: s\r\n\r\nhi\r\n.\r\nNOOP\r\n")
        self.assertEqual(
            await self.in_thread(client.codes, 3),
            [b"451 4.3.0 Temporary local problem, try again later"] * 2 + [b"250 2.0.0 OK"],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_parameters_and_plus_tags_of_virtual_users(self):
        PasswdFile(self.layout.passwd_path).add("dave@example.org", hash_password("x", "PLAIN"))
        self.assertEqual(
            self.smtp.resolve("dave+news@example.org", IPv4Address("TCP", "192.0.2.7", 1)).user,
            "dave@example.org",
        )
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(b"EHLO c\r\nSTARTTLS now\r\nDATA x\r\n")
        replies = await self.in_thread(client.codes, 3)
        self.assertEqual(
            replies[1:],
            [b"501 5.5.4 STARTTLS takes no parameters", b"501 5.5.4 DATA takes no parameters"],
        )

    def test_ipv6_address_literal(self):
        self.assertEqual(peer_text(IPv4Address("TCP", "192.0.2.1", 1)), "[192.0.2.1]")
        self.assertEqual(peer_text(IPv6Address("TCP", "::1", 1)), "[IPv6:::1]")
