"""
Tests for the Maildir index (popserv.index) and the compact columns a
session keeps, on real Maildirs on disk.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import zlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from popserv.stores.maildir import MaildirMailbox, index
from popserv.stores.maildir.columns import PackedStrings
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.index import INDEX_FILE, Entry, decode_index, encode_index, storable
from popserv.stores.maildir.uidls import parse_uidl_format
from tests.support.maildirs import MaildirTestCase, retr_size, scan


def load_index(maildir: Path, messages: int) -> dict[str, Entry] | None:
    with MaildirPath.of(maildir).opened() as (top,):
        return index.load_index(top, messages)


def save_index(maildir: Path, entries: dict[str, Entry]) -> bool:
    with MaildirPath.of(maildir).opened() as (top,):
        return index.save_index(top, entries)

BODY = b"Subject: indexed\n\nline one\nline two\n"


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

    def test_unstorable_names_left_out(self) -> None:
        """Names with a line end, or empty, cannot be stored; they are left out."""
        data = encode_index({"bad\nname": (1, 1.0), "": (3, 3.0), "good": (2, 2.0)})
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

    @settings(max_examples=300)
    @given(
        st.one_of(
            st.binary(max_size=120),
            st.lists(
                st.tuples(
                    st.sampled_from([b"0", b"27", b"-1", b"x", b"1_0", b""]),
                    st.sampled_from([b"1.5", b"nan", b"-inf", b"1e3", b""]),
                    st.binary(max_size=12),
                ).map(b" ".join),
                max_size=4,
            ).map(lambda lines: b"".join(line + b"\n" for line in lines)),
        ),
        st.integers(0, 5),
    )
    def test_any_bytes(self, data: bytes, count: int) -> None:
        """
        Any bytes, under no header, an empty index's, or one whose checksum
        matches: None, or sound entries that encode back to themselves.
        """
        sealed = b"popserv-index 1 %d %08x\n" % (count, zlib.crc32(data)) + data
        empty = encode_index({}).split(b"\n")[0] + b"\n"
        for candidate in (data, empty + data, sealed):
            entries = decode_index(candidate)
            if entries is None:
                continue
            for unique, (size, received) in entries.items():
                self.assertTrue(storable(unique), unique)
                self.assertIsInstance(size, int)
                self.assertGreaterEqual(size, 0)
                self.assertTrue(math.isfinite(received))
            self.assertEqual(decode_index(encode_index(entries)), entries)
        # A well-formed body under a matching header decodes.
        if data == b"":
            self.assertEqual(decode_index(b"popserv-index 1 0 %08x\n" % zlib.crc32(b"")), {})


class PackedStringsTests(SynchronousTestCase):
    def test_sequence(self) -> None:
        """Indexing, negative indexes, slices, iteration, equality with lists."""
        items = ["ab", "", "c", "d\u00e9f", "x" * 300]
        packed = PackedStrings(items)
        self.assertEqual(len(packed), 5)
        self.assertEqual([packed[i] for i in range(5)], items)
        self.assertEqual(packed[-1], "x" * 300)
        self.assertEqual(packed[1:4], items[1:4])
        self.assertEqual(list(packed), items)
        self.assertEqual(packed, items)
        self.assertEqual(packed, PackedStrings(iter(items)))
        self.assertNotEqual(packed, items[:-1])
        self.assertIn("c", packed)
        self.assertRaises(IndexError, packed.__getitem__, 5)
        self.assertRaises(IndexError, packed.__getitem__, -6)
        self.assertEqual(list(PackedStrings()), [])

    def test_no_nul(self) -> None:
        """NUL joins the strings, so none may hold one."""
        self.assertRaises(ValueError, PackedStrings, ["a", "b\0c"])
        self.assertRaises(ValueError, PackedStrings, ["\0"])
        self.assertEqual(list(PackedStrings([""])), [""])
        self.assertEqual(list(PackedStrings(["", ""])), ["", ""])

    @given(st.lists(st.text(st.characters(blacklist_characters="\0"), max_size=5), max_size=12),
           st.integers(-14, 14), st.integers(-14, 14),
           st.sampled_from([None, 1, 2, -1]))
    def test_slices(self, items: list[str], start: int, stop: int, step: int | None) -> None:
        """Every slice is the list's slice (contiguous ones are cut out in one pass)."""
        self.assertEqual(PackedStrings(items)[start:stop:step], items[start:stop:step])


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

    def test_stale_temporary_files_removed(self) -> None:
        """Temporary files of a writer that died are removed by a later save; fresh ones stay."""
        maildir = self.maildir()
        stale = maildir / f"{INDEX_FILE}.999999.0.tmp"
        fresh = maildir / f"{INDEX_FILE}.999999.1.tmp"
        other = maildir / "other.tmp"
        for path in (stale, fresh, other):
            path.write_bytes(b"x")
        os.utime(stale, (1000.0, 1000.0))
        os.utime(other, (1000.0, 1000.0))
        save_index(maildir, {"a": (1, 1.0)})
        self.assertFalse(stale.exists())
        self.assertTrue(fresh.exists())
        self.assertTrue(other.exists())

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


def _make_unwritable(test: MaildirTestCase, path: Path) -> None:
    """Make ``path`` a directory this process cannot create files in, or skip."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        test.addCleanup(path.chmod, 0o700)
        return
    # Root ignores modes; the immutable attribute stops even root.
    chattr = shutil.which("chattr")
    if chattr is None:
        raise SkipTest("cannot make a directory unwritable for root (no chattr)")
    if subprocess.run([chattr, "+i", str(path)], capture_output=True, check=False).returncode:
        raise SkipTest("cannot make a directory unwritable for root (chattr +i refused)")
    test.addCleanup(subprocess.run, [chattr, "-i", str(path)], check=True)


class StoreIndexTests(MaildirTestCase):
    """What the store does with the index."""

    def plain(self, maildir: Path, count: int = 3) -> list[str]:
        """``count`` messages with names lacking ,W= (as Postfix names them)."""
        names = []
        for i in range(count):
            name = f"{1700000000 + i}.V801I{i}M{i}.mx.example.org"
            self.put(maildir, "new", name, BODY + b"%d\n" % i)
            names.append(name)
        return names

    def scan(self, maildir: Path):
        return scan(maildir, parse_uidl_format("dovecot"), True)

    async def test_cold_then_warm(self) -> None:
        """The first login reads every file and writes the index; the next reads none."""
        maildir = self.maildir()
        self.plain(maildir)
        cold = self.scan(maildir)
        self.assertEqual((cold.counted, cold.indexed), (3, 0))
        self.assertIsNotNone(cold.index_update)
        mailbox = await self.open(maildir)
        self.assertTrue(await mailbox.index_saved())
        sizes = list(mailbox.listing().sizes)
        self.assertEqual(sizes, [retr_size(BODY + b"%d\n" % i) for i in range(3)])
        mailbox.close()
        warm = self.scan(maildir)
        self.assertEqual((warm.counted, warm.indexed), (0, 3))
        self.assertIsNone(warm.index_update)
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().sizes), sizes)
        self.assertFalse(await mailbox.index_saved())

    async def test_warm_login_reads_no_file(self) -> None:
        """Sizes come from the index, not the files (shown by changing a file behind its back)."""
        maildir = self.maildir()
        names = self.plain(maildir)
        mailbox = await self.open(maildir)
        await mailbox.index_saved()
        before = list(mailbox.listing().sizes)
        mailbox.close()
        # Never done to a delivered Maildir message; here it proves no read.
        (maildir / "new" / names[0]).write_bytes(b"x" * 5000)
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().sizes), before)

    async def test_renamed_still_hits(self) -> None:
        """Moved to cur/ with flags, a message keeps its index entry."""
        maildir = self.maildir()
        names = self.plain(maildir)
        mailbox = await self.open(maildir)
        await mailbox.index_saved()
        mailbox.close()
        os.rename(maildir / "new" / names[0], maildir / "cur" / (names[0] + ":2,FS"))
        os.rename(maildir / "new" / names[1], maildir / "cur" / (names[1] + ":2,"))
        warm = self.scan(maildir)
        self.assertEqual((warm.counted, warm.indexed), (0, 3))
        self.assertIsNone(warm.index_update)

    async def test_new_and_gone_messages(self) -> None:
        """New files are measured and added, entries of deleted ones dropped."""
        maildir = self.maildir()
        names = self.plain(maildir)
        mailbox = await self.open(maildir)
        await mailbox.index_saved()
        mailbox.close()
        os.unlink(maildir / "new" / names[0])
        self.put(maildir, "new", "1800000000.V1I2M3.mx", b"new\n")
        scan = self.scan(maildir)
        self.assertEqual((scan.counted, scan.indexed), (1, 2))
        assert scan.index_update is not None
        self.assertEqual(
            sorted(scan.index_update), sorted([*names[1:], "1800000000.V1I2M3.mx"])
        )
        mailbox = await self.open(maildir)
        await mailbox.index_saved()
        self.assertEqual(sorted(load_index(maildir, 10) or {}), sorted(scan.index_update))

    async def test_corrupt_index_rebuilt(self) -> None:
        """A damaged index is ignored (files are read) and written anew."""
        maildir = self.maildir()
        self.plain(maildir)
        mailbox = await self.open(maildir)
        await mailbox.index_saved()
        mailbox.close()
        data = bytearray((maildir / INDEX_FILE).read_bytes())
        data[-5] ^= 1
        (maildir / INDEX_FILE).write_bytes(bytes(data))
        scan = self.scan(maildir)
        self.assertEqual((scan.counted, scan.indexed), (3, 0))
        mailbox = await self.open(maildir)
        self.assertTrue(await mailbox.index_saved())
        self.assertEqual(len(load_index(maildir, 3) or {}), 3)

    async def test_entry_for_missing_file_not_listed(self) -> None:
        """The directory listing decides which messages exist, never the index."""
        maildir = self.maildir()
        save_index(maildir, {"1.ghost.host": (10, 1.0)})
        self.put(maildir, "new", "2.real.host", b"hi\n")
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().uids), ["2.real.host"])
        self.assertEqual(list(mailbox.listing().sizes), [4])

    async def test_received_times_kept(self) -> None:
        """Names without a time get the file's mtime once; later logins need no stat."""
        maildir = self.maildir()
        path = self.put(maildir, "new", "no-time,W=4", b"hi\n")
        os.utime(path, (1000.5, 1000.5))
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().received), [1000.5])
        self.assertTrue(await mailbox.index_saved())
        mailbox.close()
        os.utime(path, (5000.0, 5000.0))
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().received), [1000.5])

    async def test_sized_names_need_no_index(self) -> None:
        """Names with ,W= and a time need nothing: no index file; a stale one is removed."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host,S=3,W=4", b"hi\n")
        mailbox = await self.open(maildir)
        self.assertFalse(await mailbox.index_saved())
        mailbox.close()
        self.assertFalse((maildir / INDEX_FILE).exists())
        save_index(maildir, {"2.gone.host": (1, 1.0)})
        mailbox = await self.open(maildir)
        self.assertTrue(await mailbox.index_saved())
        self.assertFalse((maildir / INDEX_FILE).exists())

    async def test_not_a_message(self) -> None:
        """The index and its temporary files sit in the root, never listed as mail."""
        maildir = self.maildir()
        self.plain(maildir, 2)
        (maildir / f"{INDEX_FILE}.1.0.tmp").write_bytes(b"left over")
        mailbox = await self.open(maildir)
        await mailbox.index_saved()
        mailbox.close()
        mailbox = await self.open(maildir)
        self.assertEqual(len(mailbox.listing()), 2)

    async def test_unstorable_names(self) -> None:
        """Files whose names cannot be indexed are measured each time, without rewrites."""
        maildir = self.maildir()
        self.plain(maildir, 2)
        self.put(maildir, "cur", ":2,S", b"no unique part\n")
        self.put(maildir, "new", "line\nend", b"odd name\n")
        mailbox = await self.open(maildir)
        self.assertTrue(await mailbox.index_saved())
        mailbox.close()
        scan = self.scan(maildir)
        self.assertEqual((scan.counted, scan.indexed), (2, 2))
        self.assertIsNone(scan.index_update)

    async def test_disabled(self) -> None:
        """index=False: files are read each time and no index is written."""
        maildir = self.maildir()
        self.plain(maildir)
        mailbox = await self.open(maildir, index=False)
        self.assertFalse(await mailbox.index_saved())
        self.assertFalse((maildir / INDEX_FILE).exists())

    async def test_unwritable_maildir(self) -> None:
        """Where the Maildir cannot be written, logins work and no index appears."""
        maildir = self.maildir()
        self.plain(maildir)
        # The lock file exists (as after any earlier session), so locking works.
        mailbox = await self.open(maildir, index=False)
        mailbox.close()
        _make_unwritable(self, maildir)
        mailbox = await self.open(maildir)
        self.assertEqual(len(mailbox.listing()), 3)
        self.assertFalse(await mailbox.index_saved())
        self.assertEqual(sorted(os.listdir(maildir)), ["cur", "new", "popserv.lock", "tmp"])

    async def test_close_does_not_wait(self) -> None:
        """A client logging out and straight back in is not kept out by an index write."""
        maildir = self.maildir()
        self.plain(maildir, 20)
        first = await MaildirMailbox.open(maildir)
        first.close()
        second = await self.open(maildir)
        self.assertEqual(len(second.listing()), 20)
        self.assertTrue(await first.index_saved())
        self.assertEqual(len(load_index(maildir, 20) or {}), 20)
