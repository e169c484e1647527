"""
Tests for the Maildir index (popserv.index) and the compact columns a
session keeps, on real Maildirs on disk.
"""

from __future__ import annotations

import os
import stat

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from popserv.maildir.index import (
    INDEX_FILE,
    decode_index,
    encode_index,
    load_index,
    save_index,
)
from tests.test_maildir import MaildirTestCase


class EncodingTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """Entries come back as they went in, odd names included."""
        entries = {
            "1700000000.a.host": (27, 1700000000.0),
            "no-time": (0, 1234.5678901234567),
            "with space": (5, 1.0),
            "caf\u00e9": (7, 2.0),
            "raw\udcff": (9, 3.0),
        }
        self.assertEqual(decode_index(encode_index(entries)), entries)

    def test_line_ends_left_out(self) -> None:
        """A name with a line end cannot be stored; it is left out (and measured each time)."""
        data = encode_index({"bad\nname": (1, 1.0), "good": (2, 2.0)})
        self.assertEqual(decode_index(data), {"good": (2, 2.0)})

    def test_damage_detected(self) -> None:
        """A changed byte, a cut-off file, a wrong count or another file: not an index."""
        data = encode_index({"a": (1, 1.0), "b": (22, 2.0)})
        flipped = data.replace(b"22 ", b"23 ")
        head, _, body = data.partition(b"\n")
        recount = head.replace(b" 2 ", b" 3 ") + b"\n" + body
        for bad in (flipped, data[:-3], recount, b"", b"popserv-index 1\n", b"hello\nworld\n"):
            self.assertIsNone(decode_index(bad), bad)

    def test_bad_values(self) -> None:
        """Even with a right checksum, negative sizes or non-finite times are refused."""
        import zlib

        for body in (b"-1 1.0 a\n", b"1 nan a\n", b"1 inf a\n", b"x 1.0 a\n", b"1 1.0\n"):
            data = b"popserv-index 1 1 %08x\n" % zlib.crc32(body) + body
            self.assertIsNone(decode_index(data), body)

    @settings(max_examples=200)
    @given(st.binary(max_size=120))
    def test_any_bytes(self, data: bytes) -> None:
        """Any bytes decode to entries or None, never an exception."""
        decode_index(data)
        decode_index(encode_index({}).split(b"\n")[0] + b"\n" + data)


class FileTests(MaildirTestCase):
    def test_absent(self) -> None:
        """No index: no entries (and nothing to rewrite)."""
        self.assertEqual(load_index(self.maildir(), 10), {})

    def test_save_and_load(self) -> None:
        """Saved atomically, private, and read back; no temporary file is left."""
        maildir = self.maildir()
        entries = {"1.a.host": (10, 1.0), "2.b.host": (20, 2.0)}
        self.assertTrue(save_index(maildir, entries))
        self.assertEqual(load_index(maildir, 2), entries)
        self.assertEqual(stat.S_IMODE((maildir / INDEX_FILE).stat().st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(maildir)), sorted(["cur", INDEX_FILE, "new", "tmp"]))

    def test_empty_removes(self) -> None:
        """Saving no entries removes the index."""
        maildir = self.maildir()
        save_index(maildir, {"a": (1, 1.0)})
        self.assertTrue(save_index(maildir, {}))
        self.assertFalse((maildir / INDEX_FILE).exists())
        self.assertTrue(save_index(maildir, {}))

    def test_unusable(self) -> None:
        """A corrupt index, a symlink, a FIFO (no hang) or an oversized file: None."""
        maildir = self.maildir()
        path = maildir / INDEX_FILE
        path.write_bytes(b"garbage\n")
        self.assertIsNone(load_index(maildir, 10))
        path.unlink()
        target = maildir / "elsewhere"
        save_index(maildir, {"a": (1, 1.0)})
        path.rename(target)
        path.symlink_to(target)
        self.assertIsNone(load_index(maildir, 10))
        path.unlink()
        os.mkfifo(path)
        self.assertIsNone(load_index(maildir, 10))
        path.unlink()
        save_index(maildir, {f"{i}.name.host": (i, 1.0) for i in range(100)})
        self.assertIsNone(load_index(maildir, 0))
        self.assertEqual(len(load_index(maildir, 100) or {}), 100)

    def test_save_replaces_symlink(self) -> None:
        """A symlink planted at the index is replaced, its target untouched."""
        maildir = self.maildir()
        target = maildir / "target"
        target.write_text("keep")
        (maildir / INDEX_FILE).symlink_to(target)
        save_index(maildir, {"a": (1, 1.0)})
        self.assertEqual(target.read_text(), "keep")
        self.assertFalse((maildir / INDEX_FILE).is_symlink())
