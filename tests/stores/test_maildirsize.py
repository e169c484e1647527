"""
Quota usage kept in Maildir++'s maildirsize: a quota check reads a small
file, deliveries and deletions append to it, and it is rebuilt by a listing
only when Maildir++ says so.  On real Maildirs on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.stores.delivery import Recipient, check_room, deliver_message
from popserv.stores.layout import ensure_maildir
from popserv.stores.maildir import MaildirMailbox, maildirsize, places
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.maildirsize import MAILDIRSIZE_FILE, parse, quota_line
from popserv.stores.quota import Quota, Usage, current_usage


class FormatTests(SynchronousTestCase):
    def test_quota_line(self):
        self.assertEqual(quota_line(1048576, 100), "1048576S,100C")
        self.assertEqual(quota_line(None, 5), "5C")
        self.assertEqual(quota_line(None, None), "")

    def test_sums_the_changes(self):
        """Courier's and Dovecot's files: a quota line, then changes, negative ones too."""
        data = b"1000S,10C\n         300          3\n100 1\n-50 -1\n"
        self.assertEqual(parse(data), ("1000S,10C", 350, 3))

    def test_damaged_files_are_rebuilt(self):
        for bad in (b"1000S\n12 1", b"1000S\nx 1\n", b"1000S\n1 2 3\n", b"\xff\n"):
            self.assertIsNone(parse(bad), bad)


class UsageTests(TestCase):
    def setUp(self):
        self.maildir = ensure_maildir(Path(self.mktemp()))
        self.quota = Quota(10_000, 100)
        self.listings = 0
        real = places.list_messages

        def counting(directories):
            self.listings += 1
            return real(directories)

        self.patch(places, "list_messages", counting)
        # quota.py took the name at import.
        from popserv.stores import quota as quota_module

        self.patch(quota_module, "list_messages", counting)

    def recipient(self) -> Recipient:
        return Recipient("a@x", "alice", MaildirPath.of(self.maildir), self.quota)

    def deliver(self, body: bytes) -> None:
        results = deliver_message([(self.recipient(), b"")], body, atomic=True)
        self.assertEqual(results, [None])

    def file(self) -> bytes:
        return (self.maildir / MAILDIRSIZE_FILE).read_bytes()

    def test_one_listing_then_reads(self):
        """The first check lists and writes the file; later checks only read it."""
        (self.maildir / "cur" / "1.old.host:2,S").write_bytes(b"x" * 40)
        self.assertEqual(current_usage(self.maildir, self.quota), Usage(40, 1))
        self.assertEqual(self.listings, 1)
        self.assertEqual(self.file(), b"10000S,100C\n40 1\n")
        for _ in range(20):
            check_room(self.recipient(), 10)
        self.assertEqual(self.listings, 1)

    def test_deliveries_and_deletions_are_counted(self):
        current_usage(self.maildir, self.quota)
        self.deliver(b"Subject: one\n\nbody\n")
        self.deliver(b"Subject: two\n\nmore body\n")
        stored = [os.path.getsize(p) for p in (self.maildir / "new").iterdir()]
        self.assertEqual(current_usage(self.maildir, self.quota), Usage(sum(stored), 2))
        self.assertEqual(self.listings, 1)
        return self.delete_first(stored)

    async def delete_first(self, stored):
        mailbox = await MaildirMailbox.open(self.maildir)
        sizes = list(mailbox.listing().sizes)
        await mailbox.commit([0], [])
        mailbox.close()
        await mailbox.index_saved()
        usage = current_usage(self.maildir, self.quota)
        self.assertEqual(usage.messages, 1)
        self.assertEqual(self.listings, 1)
        # What the listing would say, had it been made again.
        left = [*(self.maildir / "new").iterdir(), *(self.maildir / "cur").iterdir()]
        self.assertEqual(usage, Usage(sum(os.path.getsize(p) for p in left), 1))
        self.assertEqual(len(sizes), 2)

    def test_rebuilt_when_long(self):
        current_usage(self.maildir, self.quota)
        with open(self.maildir / MAILDIRSIZE_FILE, "ab") as f:
            f.write(b"1 0\n" * 2000)
        self.assertEqual(current_usage(self.maildir, self.quota), Usage(0, 0))
        self.assertEqual(self.listings, 2)
        self.assertEqual(self.file(), b"10000S,100C\n0 0\n")

    def test_rebuilt_for_another_quota(self):
        current_usage(self.maildir, self.quota)
        self.assertEqual(current_usage(self.maildir, Quota(5, None)), Usage(0, 0))
        self.assertEqual(self.file(), b"5S\n0 0\n")
        self.assertEqual(self.listings, 2)

    def test_stale_full_is_rebuilt(self):
        """A file saying "full" that drifted (mail removed by another program) is checked."""
        current_usage(self.maildir, self.quota)
        with open(self.maildir / MAILDIRSIZE_FILE, "ab") as f:
            f.write(b"20000 5\n")
        self.assertEqual(current_usage(self.maildir, self.quota), Usage(20000, 5))
        later = os.stat(self.maildir / MAILDIRSIZE_FILE).st_mtime + maildirsize.STALE_SECONDS + 1
        self.assertEqual(current_usage(self.maildir, self.quota, now=later), Usage(0, 0))
        self.assertEqual(self.listings, 2)

    def test_no_file_without_a_quota(self):
        check_room(Recipient("a@x", "alice", MaildirPath.of(self.maildir), Quota()), 10)
        self.deliver_unlimited()
        self.assertFalse((self.maildir / MAILDIRSIZE_FILE).exists())

    def deliver_unlimited(self):
        recipient = Recipient("a@x", "alice", MaildirPath.of(self.maildir), Quota())
        self.assertEqual(deliver_message([(recipient, b"")], b"x\n", atomic=True), [None])

    def test_a_link_is_not_followed(self):
        target = Path(self.mktemp())
        target.write_bytes(b"keep")
        (self.maildir / MAILDIRSIZE_FILE).symlink_to(target.absolute())
        current_usage(self.maildir, self.quota)
        self.deliver(b"x\n")
        self.assertEqual(target.read_bytes(), b"keep")
