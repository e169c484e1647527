"""
RETR and TOP bodies checked against the listed size (popserv.core.retrieval):
on bytes in memory, on real files, and for any message and chunking.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from popserv.core.body import BodyEncoder, wire_size
from popserv.core.errors import MessageChanged
from popserv.core.retrieval import MessageBody, stored_size

MESSAGE = b"Subject: hello\n\n.dot line\nbody\n"
#: Longer than a chunk of the tests below (16 octets), LF line ends.
BIG = b"Subject: big\n\n" + b"".join(b"line %03d\n" % n for n in range(40))


def encoded(data: bytes, lines: int | None = None) -> bytes:
    encoder = BodyEncoder(lines)
    return encoder.feed(data) + encoder.finish()


def unstuffed_size(body: bytes) -> int:
    """The octets of a (possibly cut) stuffed body, as LIST counts them."""
    return len(body) - body.count(b"\r\n..") - body.startswith(b"..")


class Sent:
    """What a MessageBody gave out before it ended or failed."""

    def __init__(
        self, data: bytes | io.RawIOBase, listed: int | None, lines: int | None = None,
        chunk_size: int = 16,
    ) -> None:
        stream = io.BytesIO(data) if isinstance(data, bytes) else data
        self.body = MessageBody(stream, BodyEncoder(lines), listed, chunk_size)
        self.before: MessageChanged | None = None
        self.during: MessageChanged | None = None
        self.out = b""
        try:
            chunks = self.body.start()
        except MessageChanged as e:
            self.before = e
            return
        try:
            for chunk in chunks:
                self.out += chunk
        except MessageChanged as e:
            self.during = e


class MessageBodyTests(SynchronousTestCase):
    def test_exact_message_sent_whole(self):
        """A message of the listed size is the encoder's body, small or chunked."""
        for data in (MESSAGE, BIG, b""):
            for chunk_size in (1, 7, 16, 1 << 16):
                sent = Sent(data, wire_size(data), chunk_size=chunk_size)
                self.assertEqual((sent.before, sent.during), (None, None))
                self.assertEqual(sent.out, encoded(data))

    def test_small_message_checked_before_ok(self):
        """A message that ends within the first chunk is checked before anything is sent."""
        listed = wire_size(MESSAGE)
        for data in (MESSAGE + b"more\n", MESSAGE[:-6], b""):
            sent = Sent(data, listed, chunk_size=1 << 16)
            self.assertIsNotNone(sent.before, data)
            self.assertEqual(sent.out, b"")
        # Stored with CRLF, or without the last line end: the same size on the wire.
        for same in (MESSAGE.replace(b"\n", b"\r\n"), MESSAGE[:-1]):
            self.assertEqual(Sent(same, listed, chunk_size=1 << 16).out, encoded(same))

    def test_longer_message_cut_before_the_excess(self):
        """Found longer after the first chunk: what went out fits, and no final '.' follows."""
        listed = wire_size(BIG)
        for extra in (b"x", b"one more line\n", b"\n" * 500):
            sent = Sent(BIG + extra, listed)
            self.assertIsNone(sent.before)
            self.assertIsNotNone(sent.during)
            self.assertLessEqual(unstuffed_size(sent.out), listed)
            self.assertFalse(sent.out.endswith(b"\r\n.\r\n"))
            self.assertTrue(encoded(BIG).startswith(sent.out))

    def test_shorter_message_never_ends(self):
        """Found shorter at its end: all of it but the end goes out, no final '.'."""
        sent = Sent(BIG[:-2], wire_size(BIG))
        self.assertIsNotNone(sent.during)
        # Without the last line's CRLF and the final '.' line.
        self.assertEqual(sent.out, encoded(BIG[:-2])[: -len(b"\r\n.\r\n")])

    def test_top(self):
        """TOP: checked against the whole message's size, exactly when it reaches the end."""
        listed = wire_size(BIG)
        self.assertEqual(Sent(BIG, listed, lines=2).out, encoded(BIG, 2))
        self.assertEqual(Sent(BIG, listed, lines=999).out, encoded(BIG))
        # Changed past the lines TOP sends: nothing to see.
        self.assertEqual(Sent(BIG + b"x", listed, lines=2).out, encoded(BIG, 2))
        # Running to the end: a changed size shows.
        self.assertIsNotNone(Sent(BIG + b"x", listed, lines=999).during)
        self.assertIsNotNone(Sent(BIG[:-2], listed, lines=999).during)
        small = Sent(MESSAGE, wire_size(MESSAGE) - 1, lines=999, chunk_size=1 << 16)
        self.assertIsNotNone(small.before)
        # More header than the whole message had: cut before the excess.
        sent = Sent(b"X: " + b"y" * 1000 + b"\n\n" + BIG, listed, lines=0)
        self.assertIsNotNone(sent.during)
        self.assertEqual(sent.out, b"")

    def test_inexact_listing_not_checked(self):
        """listed=None (a store that only reports stored sizes): sent as it is."""
        self.assertEqual(Sent(BIG + b"x", None).out, encoded(BIG + b"x"))
        self.assertEqual(Sent(b"", None).out, b".\r\n")

    def test_file_size_refused_before_ok(self):
        """
        A regular file too big or too small for the listed size, longer than
        the first chunk, or read by a TOP that stops early: refused from its
        size before the +OK.
        """
        path = Path(self.mktemp())
        path.write_bytes(BIG)
        for listed, lines in ((len(BIG) - 1, None), (2 * len(BIG) + 2, None), (len(BIG) - 1, 0)):
            with open(path, "rb", buffering=0) as stream:
                sent = Sent(stream, listed, lines, chunk_size=1 << 16 if lines == 0 else 16)
                self.assertIn("stored", sent.before.detail)
        with open(path, "rb") as stream:
            self.assertEqual(Sent(stream, wire_size(BIG)).out, encoded(BIG))

    def test_stored_size(self):
        """What is left to read of a regular file; None for other streams."""
        path = Path(self.mktemp())
        path.write_bytes(BIG)
        with open(path, "rb", buffering=0) as raw:
            self.assertEqual(stored_size(raw), len(BIG))
            raw.read(10)
            self.assertEqual(stored_size(raw), len(BIG) - 10)
        with open(path, "rb") as buffered:
            buffered.read(1)
            self.assertEqual(stored_size(buffered), len(BIG) - 1)
        self.assertIsNone(stored_size(io.BytesIO(BIG)))
        read, write = os.pipe()
        with open(read, "rb", buffering=0) as pipe:
            os.close(write)
            self.assertIsNone(stored_size(pipe))

    @given(st.binary(max_size=300), st.binary(max_size=300), st.integers(1, 40))
    @settings(max_examples=300, deadline=None)
    def test_never_a_complete_body_of_another_size(self, listed_as, data, chunk_size):
        """
        Whatever the message is now and whatever was listed: the whole body
        when they agree; otherwise a refusal, or a cut before any octet past
        the listed size and before the final '.'.
        """
        listed = wire_size(listed_as)
        sent = Sent(data, listed, chunk_size=chunk_size)
        if wire_size(data) == listed:
            self.assertEqual((sent.before, sent.during, sent.out), (None, None, encoded(data)))
            return
        self.assertTrue(sent.before or sent.during)
        self.assertLessEqual(unstuffed_size(sent.out), listed)
        self.assertFalse(sent.out == b".\r\n" or sent.out.endswith(b"\r\n.\r\n"))
