"""
Shared Maildir sessions (``--maildrop-lock shared``) on a real Maildir:
several at once under a shared ``flock``, commits racing each other and
another program, the quota file kept exact, exclusive holders kept apart.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import gatherResults

from popserv.core.errors import MailboxInUse, MessageGone
from popserv.stores.maildir import MaildirMailbox, maildirsize
from popserv.stores.maildir.deliver import deliver
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.lock import MaildropLock
from tests.support.maildirs import MaildirTestCase, acquire


def lock(maildir: Path, shared: bool) -> MaildropLock:
    with MaildirPath.of(maildir).opened() as (top,):
        return MaildropLock.acquire(top, shared=shared)


class SharedLockTests(MaildirTestCase):
    def test_shared_with_shared_not_with_exclusive(self) -> None:
        maildir = self.maildir()
        first, second = lock(maildir, True), lock(maildir, True)
        self.assertRaises(MailboxInUse, acquire, maildir)
        first.release()
        self.assertRaises(MailboxInUse, acquire, maildir)
        second.release()
        exclusive = acquire(maildir)
        self.assertRaises(MailboxInUse, lock, maildir, True)
        exclusive.release()
        lock(maildir, True).release()


class SharedSessionTests(MaildirTestCase):
    def setUp(self) -> None:
        self.path = self.maildir()
        self.names = [deliver(self.path, b"Subject: %d\n\nbody %d\n" % (i, i)) for i in range(5)]

    async def open_shared(self) -> MaildirMailbox:
        return await self.open(self.path, shared=True)

    def stored(self) -> list[str]:
        return sorted(
            name.split(":")[0] for sub in ("new", "cur") for name in self.files(self.path, sub)
        )

    async def test_snapshot_and_a_message_gone(self) -> None:
        first, second = await self.open_shared(), await self.open_shared()
        self.assertEqual(list(first.listing().uids), list(second.listing().uids))
        deliver(self.path, b"Subject: later\n\nnot in either listing\n")
        await first.commit([0], [1])
        first.close()
        self.assertEqual(len(second.listing()), 5)
        with self.assertRaises(MessageGone):
            await self.read(second, 0)
        # Moved to cur/ and marked seen by the first: still read by its unique name.
        self.assertIn(b"body 1", await self.read(second, 1))
        await second.commit([0, 2], [])
        self.assertEqual(len(self.stored()), 4)
        self.assertNotIn(self.names[0], self.stored())
        self.assertNotIn(self.names[2], self.stored())

    async def test_racing_commits_with_a_quota_file(self) -> None:
        """Four sessions delete overlapping sets at once: the maildirsize stays exact."""
        quota = maildirsize.quota_line(10**6, 100)
        total = sum((self.path / "new" / name).stat().st_size for name in self.names)
        with MaildirPath.of(self.path).opened() as (top,):
            maildirsize.write(top, quota, total, len(self.names))
        sessions = [await self.open_shared() for _ in range(4)]
        await gatherResults(
            [
                sessions[0].commit([0, 1, 2], []),
                sessions[1].commit([2, 3], [4]),
                sessions[2].commit([0, 3], [1]),
                sessions[3].commit([4], []),
            ]
        )
        for session in sessions:
            session.close()
        self.assertEqual(self.stored(), [])
        with MaildirPath.of(self.path).opened() as (top,):
            usage = maildirsize.read_usage(top, quota)
        self.assertIsNotNone(usage)
        self.assertEqual(usage[:2], (0, 0))
