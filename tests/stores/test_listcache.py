"""
Tests for popserv.stores.maildir.listcache: a warm login answers from the cached
listing, and any change to the Maildir makes it rescan.

Directory times are set an hour back (``age``) and the settling time is
turned off where a test needs the cache to be written at once; a change then
moves the mtime to now, whatever the clock's granularity, so no test
depends on timing.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from twisted.internet.defer import Deferred

from popserv.core.errors import MailboxInUse
from popserv.stores.maildir import MaildirMailbox, listcache, opening
from popserv.stores.maildir import mailbox as maildir_mailbox
from popserv.stores.maildir.listcache import LISTING_FILE, decode_listing
from popserv.stores.maildir.lock import MaildropLock
from popserv.stores.maildir.places import CUR
from tests.support.maildirs import MaildirTestCase


def age(maildir: Path) -> None:
    """Set the times of new/ and cur/ an hour back (their ctime stays now)."""
    past = time.time() - 3600
    for sub in ("new", "cur"):
        os.utime(maildir / sub, (past, past))


class ListingCacheTests(MaildirTestCase):
    def setUp(self) -> None:
        self.maildir_path = self.maildir()
        for i in range(3):
            self.put(self.maildir_path, "cur", f"{1000 + i}.P{i}.host,W={i + 2}:2,S", b"x" * i)
        self.put(self.maildir_path, "new", "1500.P9.host", b"new\n")

    def trust_at_once(self) -> None:
        self.patch(listcache, "SETTLE_NS", -(10**15))

    def forbid_scan(self) -> None:
        def refuse(*args: object) -> None:
            raise AssertionError("scanned although the listing was cached")

        self.patch(opening, "scan", refuse)

    @contextlib.contextmanager
    def patch_scan_refused(self) -> Iterator[None]:
        real = opening.scan
        self.forbid_scan()
        try:
            yield
        finally:
            opening.scan = real

    async def uids_and_sizes(self) -> tuple[list[str], list[int]]:
        mailbox = await self.open(self.maildir_path)
        listing = mailbox.listing()
        result = list(listing.uids), list(listing.sizes)
        # The listing is written after the login is answered.
        await mailbox.index_saved()
        mailbox.close()
        return result

    async def test_warm_login_uses_cache(self) -> None:
        """An unchanged Maildir is listed from the cache, identically, without a scan."""
        self.trust_at_once()
        age(self.maildir_path)
        cold = await self.uids_and_sizes()
        self.assertTrue((self.maildir_path / LISTING_FILE).exists())
        self.forbid_scan()
        mailbox = await self.open(self.maildir_path)
        self.assertEqual((list(mailbox.listing().uids), list(mailbox.listing().sizes)), cold)
        self.assertEqual(list(mailbox.listing().seen), [True, True, True, False])
        # Messages open where the cache says they are.
        self.assertEqual(await self.read(mailbox, 2), b"xx")
        self.assertEqual(await self.read(mailbox, 3), b"new\n")

    async def test_one_and_no_message(self) -> None:
        """A cached listing of one message, or of none, is read back (one crashed every login)."""
        self.trust_at_once()
        for keep in (1, 0):
            files = [path for sub in ("new", "cur") for path in (self.maildir_path / sub).iterdir()]
            for path in files[keep:]:
                path.unlink()
            age(self.maildir_path)
            cold = await self.uids_and_sizes()
            self.assertEqual(len(cold[0]), keep)
            self.assertTrue((self.maildir_path / LISTING_FILE).exists())
            with self.patch_scan_refused():
                self.assertEqual(await self.uids_and_sizes(), cold)

    async def test_decoding_bug_costs_no_login(self) -> None:
        """A cache that makes the decoder fail is logged and ignored: the Maildir is scanned."""
        self.trust_at_once()
        age(self.maildir_path)
        cold = await self.uids_and_sizes()

        def broken(*args: object) -> None:
            raise ValueError("a decoding bug")

        self.patch(listcache, "decode_listing", broken)
        self.assertEqual(await self.uids_and_sizes(), cold)
        self.assertTrue(self.flushLoggedErrors(ValueError))

    async def test_new_delivery_invalidates(self) -> None:
        self.trust_at_once()
        age(self.maildir_path)
        uids, _ = await self.uids_and_sizes()
        self.put(self.maildir_path, "new", "1600.P8.host", b"later\n")
        self.assertEqual(len((await self.uids_and_sizes())[0]), len(uids) + 1)

    async def test_flag_rename_invalidates(self) -> None:
        """A message moved to cur/ with a flag is found under its new name."""
        self.trust_at_once()
        age(self.maildir_path)
        await self.uids_and_sizes()
        os.rename(self.maildir_path / "new" / "1500.P9.host",
                  self.maildir_path / "cur" / "1500.P9.host:2,S")
        age(self.maildir_path)  # Even with the times put back: the ctime moved.
        mailbox = await self.open(self.maildir_path)
        self.assertEqual(list(mailbox.listing().seen), [True, True, True, True])
        self.assertEqual(mailbox._places[3], CUR)

    async def test_deletion_invalidates(self) -> None:
        self.trust_at_once()
        age(self.maildir_path)
        uids, _ = await self.uids_and_sizes()
        os.unlink(self.maildir_path / "cur" / "1001.P1.host,W=3:2,S")
        self.assertEqual((await self.uids_and_sizes())[0], [uids[0], uids[2], uids[3]])

    async def test_commit_invalidates(self) -> None:
        """A session's own deletions and marks are seen by the next login."""
        self.trust_at_once()
        age(self.maildir_path)
        mailbox = await self.open(self.maildir_path)
        await mailbox.commit([0], [3])
        mailbox.close()
        mailbox = await self.open(self.maildir_path)
        self.assertEqual(len(mailbox.listing()), 3)
        self.assertEqual(list(mailbox.listing().seen), [True, True, True])

    async def test_same_second_change_not_missed(self) -> None:
        """
        With the real settling time, a Maildir changed just now is not cached,
        so a delivery within the same clock tick is seen at the next login.
        """
        first, _ = await self.uids_and_sizes()
        self.assertFalse((self.maildir_path / LISTING_FILE).exists())
        self.put(self.maildir_path, "new", "1600.P8.host", b"later\n")
        self.assertEqual(len((await self.uids_and_sizes())[0]), len(first) + 1)

    async def test_uidlist_change_invalidates(self) -> None:
        """UIDLs follow dovecot-uidlist: a new or changed one means a rescan."""
        self.trust_at_once()
        age(self.maildir_path)
        before, _ = await self.uids_and_sizes()
        (self.maildir_path / "dovecot-uidlist").write_text(
            "3 V1234 N2\n1 :1000.P0.host,W=2\n"
        )
        after, _ = await self.uids_and_sizes()
        self.assertEqual(after[0], "000000010000" + "04d2")
        self.assertEqual(after[1:], before[1:])

    async def test_damaged_or_hostile_cache_ignored(self) -> None:
        """A cache that fails its checks is rescanned, never trusted."""
        self.trust_at_once()
        age(self.maildir_path)
        expected = await self.uids_and_sizes()
        path = self.maildir_path / LISTING_FILE
        good = path.read_bytes()
        bad = [
            good[:-1] + bytes([good[-1] ^ 1]),  # a flipped bit: CRC
            good[: len(good) // 2],  # torn
            good.replace(b"1001.P1.host", b"../../P1.host"),  # a path, CRC aside
            b"garbage",
        ]
        for data in bad:
            path.write_bytes(data)
            self.assertEqual(await self.uids_and_sizes(), expected)

    def test_decode_refuses_paths_and_bad_uidls(self) -> None:
        """Even with a good checksum: no '/' in names, every UIDL valid."""
        from popserv.interfaces import Listing
        from popserv.stores.maildir.columns import PackedStrings

        keys = [[1, 2, 3], [4, 5, 6], None]

        def encoded(uids, infos, uniques=None):
            listing = Listing(uids=PackedStrings(uids), sizes=[1] * len(uids),
                              received=[0.0] * len(uids), seen=[False] * len(uids))
            return listcache.encode_listing(
                keys, "dovecot", listing=listing,
                uniques=None if uniques is None else PackedStrings(uniques),
                infos=infos, places=bytes(len(uids)), uidlist_listed=0)

        self.assertIsNotNone(decode_listing(encoded(["a", "b"], [":2,S", ""]), keys, "dovecot"))
        self.assertIsNone(decode_listing(encoded(["a", "b"], [":2,S", ""]), keys, "maildir"))
        self.assertIsNone(decode_listing(encoded(["a", "b"], ["/../x", ""]), keys, "dovecot"))
        self.assertIsNone(decode_listing(encoded(["a", "b c"], ["", ""]), keys, "dovecot"))
        self.assertIsNone(decode_listing(encoded(["a", ""], ["", ""]), keys, "dovecot"))
        self.assertIsNone(decode_listing(encoded(["a", "x" * 71], ["", ""]), keys, "dovecot"))
        self.assertIsNone(
            decode_listing(encoded(["a", "b"], ["", ""], ["", "../x"]), keys, "dovecot"))
        self.assertIsNotNone(
            decode_listing(encoded(["a", "b"], ["", ""], ["", "/"]), keys, "dovecot"))


class BackgroundWriteTests(MaildirTestCase):
    async def test_login_answered_before_listing_written(self) -> None:
        """The scan's listing is stored in a later thread job, not before the login."""
        self.patch(listcache, "SETTLE_NS", -(10**15))
        maildir = self.maildir()
        self.put(maildir, "cur", "1000.P1.host,W=2:2,S", b"ab")
        jobs = []
        real = MaildirMailbox._in_thread

        def held(mailbox: MaildirMailbox, f: object, *args: object) -> object:
            jobs.append((real, mailbox, f, args))
            return Deferred()

        self.patch(MaildirMailbox, "_in_thread", held)
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().uids), ["1000.P1.host,W=2"])
        self.assertFalse((maildir / LISTING_FILE).exists())
        self.assertEqual(len(jobs), 1)
        _, _, f, args = jobs[0]
        f(*args)  # type: ignore[operator]
        self.assertTrue((maildir / LISTING_FILE).exists())


class NothingToCommitTests(MaildirTestCase):
    async def test_no_thread_when_nothing_to_do(self) -> None:
        """Retrieved messages already seen in cur/, none deleted: no thread job."""
        maildir = self.maildir()
        self.put(maildir, "cur", "1000.P1.host,W=2:2,S")
        self.put(maildir, "new", "1001.P1.host,W=2")
        mailbox = await self.open(maildir)

        def no_thread(*args: object) -> None:
            raise AssertionError("a thread job for a commit with nothing to do")

        real = mailbox._in_thread
        self.patch(mailbox, "_in_thread", no_thread)
        self.assertIsNone(await mailbox.commit([], [0]))
        # A message still in new/ has to be marked: that goes to the thread.
        self.patch(mailbox, "_in_thread", real)
        await mailbox.commit([], [0, 1])
        self.assertEqual(self.files(maildir, "new"), [])


class InlineOpenTests(MaildirTestCase):
    """Small maildrops with a current listing open without a thread-pool job."""

    def setUp(self) -> None:
        self.patch(listcache, "SETTLE_NS", -(10**15))
        self.maildir_path = self.maildir()
        for i in range(3):
            self.put(self.maildir_path, "cur", f"{1000 + i}.P{i}.host,W={i + 2}:2,S", b"x" * i)
        age(self.maildir_path)

    async def cache_listing(self) -> list[str]:
        mailbox = await self.open(self.maildir_path)
        uids = list(mailbox.listing().uids)
        await mailbox.index_saved()
        mailbox.close()
        return uids

    def count_thread_jobs(self) -> list[object]:
        jobs: list[object] = []
        real = maildir_mailbox.deferToThreadPool

        def counting(reactor: object, pool: object, f: object, *args: object) -> object:
            jobs.append(f)
            return real(reactor, pool, f, *args)  # type: ignore[arg-type]

        self.patch(maildir_mailbox, "deferToThreadPool", counting)
        return jobs

    async def test_cached_small_maildrop_inline(self) -> None:
        """The same listing, at once, no thread; the lock is really held."""
        uids = await self.cache_listing()
        jobs = self.count_thread_jobs()
        opened = MaildirMailbox.open(self.maildir_path)
        self.assertTrue(opened.called)
        mailbox = await opened
        self.addCleanup(mailbox.close)
        self.assertEqual(list(mailbox.listing().uids), uids)
        self.assertEqual(jobs, [])
        with self.assertRaises(MailboxInUse):
            await MaildirMailbox.open(self.maildir_path)

    async def test_first_login_in_thread(self) -> None:
        """No listing cached yet: the scan runs in the thread pool."""
        jobs = self.count_thread_jobs()
        await self.cache_listing()
        self.assertEqual(jobs, [opening.open_locked, opening.save_caches])

    async def test_big_directory_in_thread(self) -> None:
        """Directories over the size limit go to the thread pool even when cached."""
        await self.cache_listing()
        self.patch(opening, "INLINE_DIRECTORY_BYTES", 0)
        jobs = self.count_thread_jobs()
        await self.cache_listing()
        self.assertEqual(jobs, [opening.open_locked])

    async def test_changed_maildrop_in_thread(self) -> None:
        """A delivery since the listing was cached: a scan in a thread, which sees it."""
        await self.cache_listing()
        self.put(self.maildir_path, "new", "2000.P7.host", b"new\n")
        jobs = self.count_thread_jobs()
        self.assertEqual(len(await self.cache_listing()), 4)
        self.assertIn(opening.open_locked, jobs)

    async def test_commit_just_before_the_lock(self) -> None:
        """
        A session that deleted a message and let go of the lock just before
        this open: its cached listing is not taken, inline or in the thread pool.
        """
        real = MaildropLock.acquire
        for inline_limit in (opening.INLINE_DIRECTORY_BYTES, 0):
            self.patch(opening, "INLINE_DIRECTORY_BYTES", inline_limit)
            uids = await self.cache_listing()
            victim = next((self.maildir_path / "cur").iterdir())

            def acquire(
                maildir: Path, *, shared: bool = False, victim: Path = victim
            ) -> MaildropLock:
                if victim.exists():
                    victim.unlink()
                return real(maildir, shared=shared)

            self.patch(MaildropLock, "acquire", staticmethod(acquire))
            mailbox = await self.open(self.maildir_path)
            self.assertEqual(len(mailbox.listing()), len(uids) - 1)
            await mailbox.index_saved()
            mailbox.close()
            self.patch(MaildropLock, "acquire", real)
            age(self.maildir_path)
