"""One summary line per SMTP or LMTP session, like POP3's "Logged out" line."""

from __future__ import annotations

import re

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from tests.support.receiver import ReceiverTestCase, SMTPClient


class ReceiverSummaryTests(ReceiverTestCase):
    def setUp(self):
        super().setUp()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def closed(self, *factories) -> None:
        """Wait until the server side of every session has seen its connection go."""
        for _ in range(200):
            if all(f.sessions == 0 for f in factories or (self.smtp, self.lmtp)):
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("sessions still open")

    def summaries(self) -> list[dict]:
        return [e for e in self.events if " session from " in e.get("summary", "")]

    async def test_smtp_session(self):
        """Messages and recipients taken and refused, octets, the HELO name, QUIT."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        message = b"Subject: s\r\n\r\nbody\r\n"
        client.send(
            b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        )
        await self.in_thread(client.reply)
        await self.in_thread(client.codes, 5)
        client.send(message + b".\r\nQUIT\r\n")
        await self.in_thread(client.codes, 2)
        await self.closed(self.smtp)
        [event] = self.summaries()
        self.assertEqual(
            {k: event[k] for k in ("service", "peer", "tls", "helo", "ended")},
            {"service": "SMTP", "peer": "[127.0.0.1]", "tls": "no TLS",
             "helo": "client.test", "ended": "QUIT"},
        )
        self.assertEqual(
            (event["accepted"], event["octets"], event["refused"]), (1, len(message), 0)
        )
        self.assertEqual((event["recipients"], event["recipients_refused"]), (2, 1))
        text = formatEvent(event)
        self.assertIn("SMTP session from [127.0.0.1] ended (no TLS, helo client.test)", text)
        self.assertIn(f"messages=1/{len(message)}, refused=0, rcpt=2, rcpt_refused=1", text)
        self.assertTrue(text.endswith(" s, QUIT"), text)

    async def test_refused_message_and_drop(self):
        """A message over the size limit counts as refused; a hang-up says so."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        await self.in_thread(client.reply)
        await self.in_thread(client.codes, 3)
        client.send(b"x" * 200_000 + b"\r\n.\r\n")
        [reply] = await self.in_thread(client.codes, 1)
        self.assertTrue(reply.startswith(b"552"), reply)
        client.close()
        await self.closed(self.smtp)
        [event] = self.summaries()
        self.assertEqual((event["accepted"], event["refused"]), (0, 1))
        self.assertEqual(event["ended"], "disconnected")

    async def test_lmtp_and_errors(self):
        """LMTP is named; a session closed for its errors says so."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(b"BOGUS\r\n" * 25)
        await self.in_thread(client.codes, 21)
        other = await self.in_thread(SMTPClient, self.ports["lmtp"])
        other.send(b"LHLO mta\r\nQUIT\r\n")
        await self.in_thread(other.reply)
        await self.in_thread(other.codes, 1)
        other.close()
        await self.closed()
        smtp, lmtp = sorted(self.summaries(), key=lambda e: e["service"], reverse=True)
        self.assertEqual((smtp["service"], smtp["ended"]), ("SMTP", "too many errors"))
        self.assertEqual((lmtp["service"], lmtp["helo"], lmtp["ended"]), ("LMTP", "mta", "QUIT"))

    async def test_client_text_is_escaped(self):
        """A HELO name with ESC and CR cannot forge a line or drive a terminal."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        client.send(b"EHLO evil\x1b[2J\rFAKE\r\nQUIT\r\n")
        await self.in_thread(client.reply)
        await self.in_thread(client.codes, 1)
        client.close()
        await self.closed(self.smtp)
        [event] = self.summaries()
        text = formatEvent(event)
        self.assertIsNone(re.search(r"[\x00-\x1f\x7f]", text), text)
        self.assertIn(r"helo evil\x1b[2J\rFAKE", text)

    async def test_envelope_addresses_are_escaped(self):
        """MAIL FROM and RCPT TO with ESC or a quoted CR: refused or logged escaped, never raw."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        client.send(
            b"EHLO c\r\nMAIL FROM:<a\x1b[2J@remote.test>\r\nMAIL FROM:<a@remote.test>\r\n"
            b'RCPT TO:<"x\rFAKE"@example.org>\r\nRCPT TO:<nobody\x1b[2J@example.org>\r\n'
            b"RCPT TO:<nobody@example.org>\r\nQUIT\r\n"
        )
        await self.in_thread(client.reply)
        await self.in_thread(client.codes, 6)
        client.close()
        await self.closed(self.smtp)
        texts = [formatEvent(e) for e in self.events
                 if str(e.get("log_namespace", "")).startswith("popserv")]
        self.assertTrue(any("nobody@example.org" in t for t in texts), texts)
        for text in texts:
            self.assertIsNone(re.search(r"[\x00-\x1f\x7f]", text), text)
