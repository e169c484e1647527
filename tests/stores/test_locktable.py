"""
The data directory's maildrop lock table: no descriptor per session, the
kernel keeping processes (and tables) apart, the process counting its own
holders, and ``popserv migrate`` locking out sessions of either kind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from popserv.core.errors import MailboxInUse
from popserv.stores.layout import ensure_maildir
from popserv.stores.maildir import MaildirMailbox
from popserv.stores.maildir.lock import MaildropLock, lock_maildrop, lock_out_sessions
from popserv.stores.maildir.locktable import TABLE_FILE, LockTable, offset_of, table_in
from tests.support.maildirs import MaildirTestCase


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class LockTableTests(MaildirTestCase):
    def setUp(self) -> None:
        self.data = Path(self.mktemp())
        self.data.mkdir()
        self.table = LockTable.open(self.data)
        self.addCleanup(self.table.close)
        self.maildir = ensure_maildir(self.data / "mail" / "alice")
        self.top = os.open(self.maildir, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, self.top)

    def other_table(self) -> LockTable:
        """Another open of the same table: as another process sees it."""
        table = LockTable.open(self.data)
        self.addCleanup(table.close)
        return table

    def test_exclusive_in_and_across_tables(self) -> None:
        lock = self.table.acquire(self.top)
        self.assertRaises(MailboxInUse, self.table.acquire, self.top)
        self.assertRaises(MailboxInUse, self.table.acquire, self.top, shared=True)
        other = self.other_table()
        self.assertRaises(MailboxInUse, other.acquire, self.top, shared=True)
        lock.release()
        lock.release()
        other.acquire(self.top).release()
        self.assertEqual(self.table.holders(), 0)

    def test_shared_holders_counted(self) -> None:
        """The kernel's read lock stays until the process's last holder lets go."""
        first = self.table.acquire(self.top, shared=True)
        second = self.table.acquire(self.top, shared=True)
        other = self.other_table()
        other.acquire(self.top, shared=True).release()
        first.release()
        self.assertRaises(MailboxInUse, other.acquire, self.top)
        second.release()
        other.acquire(self.top).release()

    def test_a_maildir_is_its_directory_not_its_path(self) -> None:
        link = self.data / "link"
        link.symlink_to(self.maildir.absolute())
        fd = os.open(link, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        self.assertEqual(offset_of(fd), offset_of(self.top))
        bob = ensure_maildir(self.data / "mail" / "bob")
        other = os.open(bob, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, other)
        self.assertNotEqual(offset_of(other), offset_of(self.top))
        both = [self.table.acquire(self.top), self.table.acquire(other)]
        for lock in both:
            lock.release()

    def test_another_process_and_its_death(self) -> None:
        code = (
            "import os, sys, time\n"
            "from pathlib import Path\n"
            "from popserv.stores.maildir.locktable import LockTable\n"
            "table = LockTable.open(Path(sys.argv[1]))\n"
            "fd = os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECTORY)\n"
            "table.acquire(fd)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(self.data), str(self.maildir)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.stdout.close)
        self.assertEqual(child.stdout.readline(), b"locked\n")
        self.assertRaises(MailboxInUse, self.table.acquire, self.top, shared=True)
        child.kill()
        child.wait()
        self.table.acquire(self.top).release()

    def test_migrate_locks_out_sessions_of_either_kind(self) -> None:
        session = lock_maildrop(self.top, shared=True, table=self.table)
        self.assertRaises(MailboxInUse, lock_out_sessions, self.top, self.other_table())
        session.release()
        old_kind = MaildropLock.acquire(self.top, shared=True)
        self.assertRaises(MailboxInUse, lock_out_sessions, self.top, self.other_table())
        old_kind.release()
        held = lock_out_sessions(self.top, self.other_table())
        self.assertRaises(MailboxInUse, lock_maildrop, self.top, shared=True, table=self.table)
        held.release()
        self.assertFalse(held.held)
        lock_maildrop(self.top, table=self.table).release()

    def test_table_file(self) -> None:
        mode = (self.data / TABLE_FILE).stat().st_mode & 0o777
        self.assertEqual(mode, 0o600)
        self.assertIsNone(table_in(self.data / "missing"))


class NoDescriptorPerSessionTests(MaildirTestCase):
    async def test_sessions_hold_no_descriptor(self) -> None:
        """200 users' sessions open at once: the process holds no descriptor for them."""
        data = Path(self.mktemp())
        data.mkdir()
        table = LockTable.open(data)
        self.addCleanup(table.close)
        paths = [ensure_maildir(data / "mail" / f"user{i}") for i in range(200)]
        before = open_fds()
        mailboxes = [await MaildirMailbox.open(path, locks=table, shared=True) for path in paths]
        # (With a descriptor each it would be 200 more.)
        self.assertLess(open_fds() - before, 10)
        self.assertEqual(table.holders(), 200)
        with self.assertRaises(MailboxInUse):
            await MaildirMailbox.open(paths[0], locks=table, shared=False)
        for mailbox in mailboxes:
            mailbox.close()
        self.assertEqual(table.holders(), 0)
        self.assertFalse((paths[0] / "popserv.lock").exists())
        # Without a table: popserv.lock, a descriptor each.
        mailbox = await MaildirMailbox.open(paths[0])
        self.addCleanup(mailbox.close)
        self.assertTrue((paths[0] / "popserv.lock").exists())
