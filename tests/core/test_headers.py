"""
Header fields popserv writes, and envelope addresses that would forge some:
the one function that makes every field, and the receiver refusing control
characters in MAIL FROM and RCPT TO over real connections.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from popserv.core.headers import header_field
from popserv.server.firstrun import welcome_message
from popserv.stores.delivery import has_control, received_field, trace_header
from tests.support.receiver import START_DATA, ReceiverTestCase, SMTPClient

#: The report's two attacks, as sent.
FORGED_SENDER = b'MAIL FROM:<"a\rX-Injected: yes"@b.c>\r\n'
FORGED_RECIPIENT = b'RCPT TO:<carol+a"\rX-Spam-Status: No, score=-100"@example.org>\r\n'

BAD_SENDER = b"501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = b"501 5.1.3 Bad recipient address syntax"


class HeaderFieldTests(SynchronousTestCase):
    def test_field_and_folding(self):
        self.assertEqual(header_field("Delivered-To", "a@b"), "Delivered-To: a@b\r\n")
        self.assertEqual(header_field("X", "one", "two", eol="\n"), "X: one\n\ttwo\n")
        self.assertEqual(header_field("Subject", "tab\there, \xe4"), "Subject: tab\there, \xe4\r\n")

    def test_refuses_line_breaks_and_nul(self):
        """CR, LF and NUL, and every other control but TAB, in any line of a value."""
        for bad in ("\r", "\n", "\r\n", "\x00", "\x0b", "\x0c", "\x1b", "\x7f"):
            with self.assertRaises(ValueError, msg=repr(bad)):
                header_field("Return-Path", f"<a{bad}X-Injected: yes@b.c>")
            with self.assertRaises(ValueError, msg=repr(bad)):
                header_field("Received", "from x", f"by y{bad}")

    def test_error_never_quotes_the_value(self):
        with self.assertRaises(ValueError) as raised:
            header_field("Return-Path", "<secret\rX: y>")
        self.assertNotIn("secret", str(raised.exception))

    def test_refuses_bad_names_and_no_value(self):
        for name in ("", "Bad Name", "X:Y", "X\r\nY", "Ä"):
            with self.assertRaises(ValueError, msg=repr(name)):
                header_field(name, "v")
        with self.assertRaises(ValueError):
            header_field("Subject")

    def test_trace_header(self):
        received = received_field(
            helo="client.test", peer="[192.0.2.1]", host="mx.example.org", protocol="ESMTP",
            queue_id="ABC", recipient="alice@example.org",
        )  # fmt: skip
        header = trace_header("a@remote.test", "alice@example.org", received)
        lines = header.split(b"\r\n")
        self.assertEqual(
            lines[:2], [b"Return-Path: <a@remote.test>", b"Delivered-To: alice@example.org"]
        )
        self.assertEqual(lines[2], b"Received: from client.test ([192.0.2.1])")
        self.assertEqual(lines[3], b"\tby mx.example.org (popserv) with ESMTP id ABC")
        self.assertEqual(lines[4], b"\tfor <alice@example.org>;")
        self.assertTrue(lines[5].startswith(b"\t"))
        self.assertEqual(lines[6:], [b""])
        without = received_field(
            helo="h", peer="local", host="mx", protocol="LMTP", queue_id="Q", recipient=None
        )
        self.assertIn("with LMTP id Q;\r\n\t", without)

    def test_trace_header_refuses_what_the_report_injected(self):
        with self.assertRaises(ValueError):
            trace_header('"a\rX-Injected: yes"@b.c', "alice@example.org")
        with self.assertRaises(ValueError):
            trace_header("a@b.c", 'carol+a"\rX-Spam-Status: No, score=-100"@example.org')
        with self.assertRaises(ValueError):
            received_field(
                helo="h", peer="p", host="mx", protocol="ESMTP", queue_id="Q",
                recipient='carol+a"\rX-Spam-Status: No"@example.org',
            )  # fmt: skip

    def test_welcome_message(self):
        message = welcome_message("alice", "mx.example.org")
        self.assertTrue(message.startswith(b"From: popserv <postmaster@mx.example.org>\n"))
        self.assertIn(b"\nSubject: Welcome to popserv\n", message)
        with self.assertRaises(ValueError):
            welcome_message("alice", "mx.example.org\rBcc: everyone@example.org")

    def test_has_control(self):
        self.assertFalse(has_control('"a b"@example.org'))
        for bad in ("\r", "\n", "\x00", "\t", "\x1f", "\x7f"):
            self.assertTrue(has_control(f'"a{bad}b"@example.org'), repr(bad))


class EnvelopeInjectionTests(ReceiverTestCase):
    """Control characters in MAIL FROM or RCPT TO are refused before anything else."""

    async def exchange(self, port: str, hello: bytes, commands: bytes, count: int) -> list[bytes]:
        client = await self.in_thread(SMTPClient, self.ports[port])
        self.addCleanup(client.close)
        client.send(hello + commands)
        await self.in_thread(client.reply)
        return await self.in_thread(client.codes, count)

    async def test_the_reported_attack_over_smtp(self):
        """Both lines of the report get 501; the message then sent to alice
        carries neither field, and carol gets nothing."""
        replies = await self.exchange(
            "smtp",
            b"EHLO c\r\n",
            FORGED_SENDER
            + b"MAIL FROM:<a@remote.test>\r\n"
            + FORGED_RECIPIENT
            + b"RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n",
            7,
        )
        self.assertEqual(
            replies,
            [
                BAD_SENDER,
                b"250 2.1.0 Sender OK",
                BAD_RECIPIENT,
                b"250 2.1.5 Recipient OK",
                START_DATA,
                b"250 2.0.0 Message accepted for delivery",
                b"221 2.0.0 Bye",
            ],
        )
        [stored] = self.stored("alice")
        self.assertNotIn(b"X-Injected", stored)
        self.assertNotIn(b"X-Spam-Status", stored)
        self.assertNotIn(b"\r", stored)
        self.assertEqual(self.stored("carol"), [])

    async def test_nothing_stored_for_a_forged_sender_alone(self):
        """With the sender refused there is no transaction: RCPT and DATA are out of sequence."""
        replies = await self.exchange(
            "smtp",
            b"EHLO c\r\n",
            FORGED_SENDER + b"RCPT TO:<alice@example.org>\r\nDATA\r\n",
            3,
        )
        self.assertEqual(
            replies,
            [BAD_SENDER, b"503 5.5.1 Need MAIL before RCPT", b"503 5.5.1 Need MAIL before DATA"],
        )
        self.assertEqual(self.stored("alice"), [])

    async def test_every_control_character_over_lmtp(self):
        """NUL, TAB, ESC, DEL, a bare LF, in quoted strings and quoted pairs, over LMTP too."""
        senders = [
            b'MAIL FROM:<"a\x00b"@remote.test>\r\n',
            b'MAIL FROM:<"a\tb"@remote.test>\r\n',
            b"MAIL FROM:<a\\\x1bb@remote.test>\r\n",
            b'MAIL FROM:<"a\x7f"@remote.test>\r\n',
            b'MAIL FROM:<"a\nX-Injected: yes"@remote.test>\r\n',
        ]
        recipients = [
            b'RCPT TO:<"alice\x00"@example.org>\r\n',
            b"RCPT TO:<alice\\\rX-Injected:\\ yes@example.org>\r\n",
            b'RCPT TO:<"bob\nX-Injected: yes"@example.org>\r\n',
        ]
        replies = await self.exchange(
            "lmtp",
            b"LHLO mta\r\n",
            b"".join(senders)
            + b"MAIL FROM:<a@remote.test>\r\n"
            + b"".join(recipients)
            + b"DATA\r\n",
            len(senders) + 1 + len(recipients) + 1,
        )
        self.assertEqual(
            replies,
            [BAD_SENDER] * len(senders)
            + [b"250 2.1.0 Sender OK"]
            + [BAD_RECIPIENT] * len(recipients)
            + [b"554 5.5.1 No valid recipients"],
        )
        self.assertEqual(self.stored("alice") + self.stored("bob"), [])
