"""
Tests for popserv.stores.maildir: names, the lock, the store and delivery, on real
Maildirs on disk.
"""

from __future__ import annotations

import errno
import gc
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from popserv.core.body import BodyEncoder, wire_size
from popserv.core.errors import (
    CommitFailed,
    MailboxInUse,
    MessageGone,
    PermanentFailure,
    TemporaryFailure,
)
from popserv.interfaces import IAccountSettings, IMailbox
from popserv.server.maybe import resolve
from popserv.stores.layout import ensure_maildir
from popserv.stores.maildir import (
    LOCK_FILE,
    MaildirMailbox,
    MaildirName,
    clean_tmp,
    deliver,
    make_unique,
    parse_name,
    uidl_for,
    with_flag,
)
from popserv.stores.maildir import index as maildir_index
from popserv.stores.maildir import scan as maildir_scan
from popserv.stores.maildir.commonnames import common_columns, split_common
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.places import CUR
from popserv.stores.maildir.scan import Scan
from popserv.stores.maildir.uidls import parse_uidl_format
from tests.support.maildirs import MaildirTestCase, acquire, retr_size, scan
from tests.support.processes import REPO


def valid_uidl(uid: str) -> bool:
    return 1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)


class ParseNameTests(TestCase):
    def test_plain(self) -> None:
        """A name without info: all of it is the unique part."""
        self.assertEqual(
            parse_name("1700000000.M5P6Q7R8.host"),
            MaildirName("1700000000.M5P6Q7R8.host", "", None, None, 1700000000),
        )

    def test_info_and_sizes(self) -> None:
        """Flags from ``:2,``; Dovecot's ``,S=`` and ``,W=`` from the unique part."""
        name = parse_name("1700000000.M5.mail.example.org,S=123,W=130:2,FRS")
        self.assertEqual(name.unique, "1700000000.M5.mail.example.org,S=123,W=130")
        self.assertEqual(name.flags, "FRS")
        self.assertEqual((name.stored_size, name.wire_size), (123, 130))
        self.assertEqual(name.timestamp, 1700000000)

    def test_other_separators(self) -> None:
        """``!`` and ``;`` separate the info when ``2,`` follows."""
        self.assertEqual(parse_name("12.a.b!2,S").unique, "12.a.b")
        self.assertEqual(parse_name("12.a.b!2,S").flags, "S")
        self.assertEqual(parse_name("12.a.b;2,RS").flags, "RS")
        self.assertEqual(parse_name("12.a!b;c").unique, "12.a!b;c")
        self.assertEqual(parse_name("12.a!b;c").flags, "")

    def test_weird_names(self) -> None:
        """Odd names parse without error into what can be known."""
        cases = {
            "": MaildirName("", "", None, None, None),
            ":2,S": MaildirName("", "S", None, None, None),
            "abc": MaildirName("abc", "", None, None, None),
            "12345": MaildirName("12345", "", None, None, None),
            "12x.host": MaildirName("12x.host", "", None, None, None),
            "\u0661\u0662.host": MaildirName("\u0661\u0662.host", "", None, None, None),
            "9" * 30 + ".h": MaildirName("9" * 30 + ".h", "", None, None, None),
            "1.h,S=abc,W=": MaildirName("1.h,S=abc,W=", "", None, None, 1),
            "1.h,W=-5": MaildirName("1.h,W=-5", "", None, None, 1),
            "1.h:2,": MaildirName("1.h", "", None, None, 1),
            "1.h:1,xyz": MaildirName("1.h", "", None, None, 1),
            "1.h:2,S:junk": MaildirName("1.h", "S:junk", None, None, 1),
            "1.h\udcff,W=7": MaildirName("1.h\udcff,W=7", "", None, 7, 1),
        }
        for filename, expected in cases.items():
            self.assertEqual(parse_name(filename), expected, filename)

    def test_with_flag(self) -> None:
        """Adding a flag keeps flags sorted in ASCII order and keeps the separator."""
        self.assertEqual(with_flag("u", "S"), "u:2,S")
        self.assertEqual(with_flag("u:2,RT", "S"), "u:2,RST")
        self.assertEqual(with_flag("u:2,FS", "S"), "u:2,FS")
        self.assertEqual(with_flag("u:2,a", "S"), "u:2,Sa")
        self.assertEqual(with_flag("u!2,T", "S"), "u!2,ST")
        self.assertEqual(with_flag("u:1,x", "S"), "u:2,S")


class UidlTests(TestCase):
    def test_name_itself(self) -> None:
        """A unique part RFC 1939 accepts is its own UIDL."""
        for unique in ("a", "1700000000.M1P2.host,S=1,W=2", "~" * 70):
            self.assertEqual(uidl_for(unique), unique)

    def test_fallback(self) -> None:
        """Anything else gets a stable digest that is a valid UIDL."""
        for unique in ("", "x" * 71, "with space", "caf\u00e9", "bad\udcff", "lone\ud800"):
            uid = uidl_for(unique)
            self.assertNotEqual(uid, unique)
            self.assertTrue(valid_uidl(uid), uid)
            self.assertEqual(uidl_for(unique), uid)
        self.assertNotEqual(uidl_for("x" * 71), uidl_for("x" * 72))


class MakeUniqueTests(TestCase):
    def test_format(self) -> None:
        """Time, microseconds, pid, counter, random part, host and sizes."""
        name = make_unique(10, 12, now=1700000000.25, hostname="mail.example.org")
        pattern = r"1700000000\.M250000P(\d+)Q\d+R[0-9a-f]{8}\.mail\.example\.org,S=10,W=12"
        match = re.fullmatch(pattern, name)
        self.assertIsNotNone(match, name)
        assert match is not None
        self.assertEqual(int(match.group(1)), os.getpid())
        parsed = parse_name(name)
        self.assertEqual(
            (parsed.timestamp, parsed.stored_size, parsed.wire_size, parsed.flags),
            (1700000000, 10, 12, ""),
        )
        self.assertEqual(uidl_for(parsed.unique), name)

    def test_without_sizes(self) -> None:
        """Sizes left out are not in the name."""
        self.assertNotIn(",", make_unique(None, None, hostname="h"))

    def test_unique_in_one_second(self) -> None:
        """Many names made at the same instant all differ."""
        names = {make_unique(1, 1, now=5.0, hostname="h") for _ in range(5000)}
        self.assertEqual(len(names), 5000)

    def test_unique_across_processes(self) -> None:
        """Another process making a name at the same instant makes another name."""
        code = (
            "from popserv.stores.maildir.names import make_unique;"
            "print(make_unique(1, 1, now=5.0, hostname='h'))"
        )
        other = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            check=True,
            text=True,
            cwd=REPO,
        ).stdout.strip()
        self.assertNotEqual(other, make_unique(1, 1, now=5.0, hostname="h"))
        self.assertNotIn(f"P{os.getpid()}Q", other)

    def test_host_escaped(self) -> None:
        """``/`` and ``:`` (Maildir spec) and ``,`` (size fields) are escaped."""
        name = make_unique(1, 2, now=1.0, hostname="a/b:c,d")
        self.assertTrue(name.endswith(r".a\057b\072c\054d,S=1,W=2"), name)
        self.assertEqual(parse_name(name).unique, name)
        self.assertEqual(parse_name(name).wire_size, 2)


class LockTests(MaildirTestCase):
    def test_exclusive(self) -> None:
        """A second lock in the same process fails until the first is released."""
        maildir = self.maildir()
        lock = acquire(maildir)
        self.assertRaises(MailboxInUse, acquire, maildir)
        lock.release()
        lock.release()
        acquire(maildir).release()

    def test_file(self) -> None:
        """The lock file is private and names the holder's pid."""
        maildir = self.maildir()
        lock = acquire(maildir)
        self.addCleanup(lock.release)
        path = maildir / LOCK_FILE
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(path.read_text(), f"{os.getpid()}\n")

    def test_symlink_refused(self) -> None:
        """A symlink in place of the lock file is not followed; it needs an admin (SYS/PERM)."""
        maildir = self.maildir()
        target = maildir / "target"
        target.write_text("keep")
        (maildir / LOCK_FILE).symlink_to(target)
        self.assertRaises(PermanentFailure, acquire, maildir)
        self.assertEqual(target.read_text(), "keep")

    async def test_killed_holder(self) -> None:
        """A lock held by a process killed with SIGKILL does not block."""
        maildir = self.maildir()
        code = (
            "import fcntl, os, sys, time;"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600);"
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB);"
            "print('locked', flush=True);"
            "time.sleep(60)"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(maildir / LOCK_FILE)], stdout=subprocess.PIPE
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.stdout.close)
        self.assertEqual(child.stdout.readline(), b"locked\n")
        with self.assertRaises(MailboxInUse):
            await MaildirMailbox.open(maildir)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        mailbox = await self.open(maildir)
        self.assertEqual(len(mailbox.listing()), 0)


class OpenTests(MaildirTestCase):
    async def test_provides(self) -> None:
        """The mailbox provides IMailbox and IAccountSettings with the given settings."""
        mailbox = await self.open(self.maildir(), login_delay=300, expire_days=7)
        self.assertTrue(IMailbox.providedBy(mailbox))
        self.assertTrue(IAccountSettings.providedBy(mailbox))
        self.assertEqual((mailbox.login_delay, mailbox.expire_days), (300, 7))

    async def test_creates_maildir(self) -> None:
        """A missing Maildir is created, empty."""
        path = Path(self.mktemp()) / "user"
        mailbox = await self.open(path)
        self.assertEqual(len(mailbox.listing()), 0)
        self.assertEqual(self.files(path, "tmp"), [])

    async def test_second_session(self) -> None:
        """A second open fails while the first session is open, works after close."""
        maildir = self.maildir()
        first = await MaildirMailbox.open(maildir)
        with self.assertRaises(MailboxInUse):
            await MaildirMailbox.open(maildir)
        first.close()
        first.close()
        await self.open(maildir)

    async def test_scan_failure_releases(self) -> None:
        """A scan that fails gives an -ERR [SYS/*] and leaves the Maildir unlocked."""
        maildir = self.maildir()

        def unreadable(places: object) -> object:
            raise PermissionError(errno.EACCES, "injected")

        self.patch(maildir_scan, "list_messages", unreadable)
        with self.assertRaises(PermanentFailure) as caught:
            await MaildirMailbox.open(maildir)
        self.assertIn("scan", caught.exception.detail)
        acquire(maildir).release()

    async def test_long_paths(self) -> None:
        """Files are reached from the Maildir's descriptor, so PATH_MAX bounds no message."""
        maildir = Path(self.mktemp())
        # trial's own clean-up cannot remove paths this long; rmtree works by fd.
        self.addCleanup(shutil.rmtree, maildir)
        while len(str(maildir)) < 3800:
            maildir = maildir / ("d" * 200)
        maildir = maildir / ("e" * (3999 - len(str(maildir))))
        ensure_maildir(maildir)
        name = "1." + "n" * 240
        with MaildirPath.of(maildir).opened("new") as (_, new):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=new)
            os.write(fd, b"x\n")
            os.close(fd)
        mailbox = await MaildirMailbox.open(maildir)
        self.addCleanup(mailbox.close)
        await mailbox.index_saved()
        self.assertEqual(list(mailbox.listing().sizes), [3])
        stream = await resolve(mailbox.open_message(0))
        with stream:
            self.assertEqual(stream.read(), b"x\n")

    async def test_file_instead_of_maildir(self) -> None:
        """A file where the Maildir should be is for an administrator: SYS/PERM."""
        path = Path(self.mktemp())
        path.write_bytes(b"not a maildir")
        with self.assertRaises(PermanentFailure) as caught:
            await MaildirMailbox.open(path)
        self.assertEqual(caught.exception.code, "SYS/PERM")
        self.assertEqual(path.read_bytes(), b"not a maildir")

    async def test_transient_error_is_temporary(self) -> None:
        """Errors a retry may cure (here: out of file descriptors) are SYS/TEMP."""
        maildir = self.maildir()

        def no_fds(*args, **kwargs):
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(os, "scandir", no_fds)
        with self.assertRaises(TemporaryFailure) as caught:
            await MaildirMailbox.open(maildir)
        self.assertEqual(caught.exception.code, "SYS/TEMP")
        acquire(maildir).release()

    async def test_cancel_releases(self) -> None:
        """Cancelling an open releases the lock once the scan is over."""
        maildir = self.maildir()
        opening = MaildirMailbox.open(maildir)
        opening.cancel()
        with self.assertRaises(CancelledError):
            await opening
        for _ in range(100):
            try:
                acquire(maildir).release()
                return
            except MailboxInUse:
                await deferLater(reactor, 0.01, lambda: None)
        self.fail("the lock was never released")


class ScanTests(MaildirTestCase):
    async def test_sizes_counted(self) -> None:
        """Without ``,W=`` the size is counted from the file: the octets RETR sends."""
        bodies = [
            b"Subject: lf\n\nline\n.dot\n",
            b"Subject: crlf\r\n\r\nline\r\n.dot\r\n",
            b"Subject: mixed\r\n\nline\r\nother\n",
            b"Subject: no final newline\n\nlast",
            b"Subject: lone cr\n\na\rb\r",
            b"",
            b"\n",
            b"x" * 200_000 + b"\r\n" + b"y\n" * 70_000,
        ]
        maildir = self.maildir()
        for i, body in enumerate(bodies):
            self.put(maildir, "new", f"{1000 + i}.P1.host", body)
        mailbox = await self.open(maildir)
        listing = mailbox.listing()
        self.assertEqual(list(listing.sizes), [retr_size(body) for body in bodies])
        # The same numbers by hand, for the small ones.
        self.assertEqual(list(listing.sizes[:7]), [27, 29, 31, 35, 26, 0, 2])

    async def test_wire_size_from_name(self) -> None:
        """A ``,W=`` in the name is used as is: the file is not read."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.P1.host,S=3,W=999", b"abc")
        self.put(maildir, "cur", "2.P1.host,W=5:2,S", b"a much longer body than five\n")
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().sizes), [999, 5])

    async def test_order(self) -> None:
        """Messages are ordered by delivery time, then unique part."""
        maildir = self.maildir()
        self.put(maildir, "new", "300.b.host")
        self.put(maildir, "cur", "100.z.host:2,S")
        self.put(maildir, "new", "300.a.host")
        undated = self.put(maildir, "new", "no-time")
        os.utime(undated, (200.5, 200.5))
        self.put(maildir, "cur", "50.x.host:2,")
        mailbox = await self.open(maildir)
        listing = mailbox.listing()
        self.assertEqual(
            list(listing.uids), ["50.x.host", "100.z.host", "no-time", "300.a.host", "300.b.host"]
        )
        self.assertEqual(list(listing.received), [50, 100, 200.5, 300, 300])

    async def test_seen(self) -> None:
        """``seen`` is the S flag; files in new/ are unseen."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host")
        self.put(maildir, "cur", "2.a.host:2,S")
        self.put(maildir, "cur", "3.a.host:2,F")
        self.put(maildir, "cur", "4.a.host:2,")
        self.put(maildir, "cur", "5.a.host!2,RS")
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().seen), [False, True, False, False, True])

    async def test_skipped(self) -> None:
        """Dot files, directories, symlinks and tmp/ files are not messages."""
        maildir = self.maildir()
        self.put(maildir, "new", ".hidden")
        self.put(maildir, "tmp", "1.tmp.host")
        (maildir / "cur" / "2.dir.host").mkdir()
        secret = maildir / "secret"
        secret.write_bytes(b"not mail\n")
        (maildir / "new" / "3.link.host").symlink_to(secret)
        self.put(maildir, "new", "4.real.host")
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().uids), ["4.real.host"])

    async def test_same_unique_twice(self) -> None:
        """A message caught in both new/ and cur/ is listed once, from cur/."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host", b"old\n")
        self.put(maildir, "cur", "1.a.host:2,S", b"new\n")
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().uids), ["1.a.host"])
        self.assertEqual(list(mailbox.listing().seen), [True])
        self.assertEqual(await self.read(mailbox, 0), b"new\n")

    async def test_uidl_stable(self) -> None:
        """The UIDL stays the same when a message moves to cur/ and gets flags."""
        maildir = self.maildir()
        long_name = "1." + "x" * 80 + ".host"
        self.put(maildir, "new", "1.a.host")
        self.put(maildir, "new", long_name)
        mailbox = await MaildirMailbox.open(maildir)
        before = list(mailbox.listing().uids)
        mailbox.close()
        os.rename(maildir / "new" / "1.a.host", maildir / "cur" / "1.a.host:2,S")
        os.rename(maildir / "new" / long_name, maildir / "cur" / (long_name + ":2,FS"))
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().uids), before)
        self.assertTrue(all(valid_uidl(uid) for uid in before))

    async def test_delivered_later(self) -> None:
        """Mail delivered during a session belongs to the next one."""
        maildir = self.maildir()
        deliver(maildir, b"first\n")
        mailbox = await MaildirMailbox.open(maildir)
        deliver(maildir, b"second\n")
        self.assertEqual(len(mailbox.listing()), 1)
        await mailbox.commit([], [])
        mailbox.close()
        mailbox = await self.open(maildir)
        self.assertEqual(len(mailbox.listing()), 2)
        self.assertEqual(await self.read(mailbox, 1), b"second\n")


class OpenMessageTests(MaildirTestCase):
    async def test_read(self) -> None:
        """The stream gives the stored bytes."""
        maildir = self.maildir()
        self.put(maildir, "cur", "1.a.host:2,S", b"Subject: hi\r\n\r\nbody\r\n")
        mailbox = await self.open(maildir)
        self.assertEqual(await self.read(mailbox, 0), b"Subject: hi\r\n\r\nbody\r\n")

    async def test_moved(self) -> None:
        """A message moved to cur/ (or re-flagged) after the scan is still found."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host", b"one\n")
        self.put(maildir, "cur", "2.b.host:2,", b"two\n")
        mailbox = await self.open(maildir)
        os.rename(maildir / "new" / "1.a.host", maildir / "cur" / "1.a.host:2,S")
        os.rename(maildir / "cur" / "2.b.host:2,", maildir / "cur" / "2.b.host:2,F")
        self.assertEqual(await self.read(mailbox, 0), b"one\n")
        self.assertEqual(await self.read(mailbox, 1), b"two\n")
        # Found again without another lookup.
        stream = mailbox.open_message(0)
        self.assertEqual(stream.read(), b"one\n")
        stream.close()

    async def test_gone(self) -> None:
        """A message deleted by someone else fails with MessageGone."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host")
        mailbox = await self.open(maildir)
        os.unlink(maildir / "new" / "1.a.host")
        with self.assertRaises(MessageGone):
            await resolve(mailbox.open_message(0))


class CommitTests(MaildirTestCase):
    async def test_delete_and_mark(self) -> None:
        """Exactly the deleted files go; retrieved ones are marked seen."""
        maildir = self.maildir()
        for name in ("1.a.host", "2.b.host", "3.c.host"):
            self.put(maildir, "new", name)
        self.put(maildir, "cur", "4.d.host:2,RT")
        self.put(maildir, "cur", "5.e.host:2,S")
        self.put(maildir, "cur", "6.f.host:2,")
        mailbox = await self.open(maildir)
        await mailbox.commit([0, 5], [0, 1, 3, 4])
        self.assertEqual(self.files(maildir, "new"), ["3.c.host"])
        self.assertEqual(
            self.files(maildir, "cur"), ["2.b.host:2,S", "4.d.host:2,RST", "5.e.host:2,S"]
        )

    async def test_nothing(self) -> None:
        """A session that changed nothing leaves the Maildir as it was."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host")
        mailbox = await self.open(maildir)
        await mailbox.commit([], [])
        self.assertEqual(self.files(maildir, "new"), ["1.a.host"])

    async def test_moved_meanwhile(self) -> None:
        """Files moved or re-flagged by another program are found and handled."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host")
        self.put(maildir, "new", "2.b.host")
        self.put(maildir, "cur", "3.c.host:2,")
        mailbox = await self.open(maildir)
        os.rename(maildir / "new" / "1.a.host", maildir / "cur" / "1.a.host:2,S")
        os.rename(maildir / "new" / "2.b.host", maildir / "cur" / "2.b.host:2,F")
        os.rename(maildir / "cur" / "3.c.host:2,", maildir / "cur" / "3.c.host:2,R")
        await mailbox.commit([0], [1, 2])
        self.assertEqual(self.files(maildir, "new"), [])
        self.assertEqual(self.files(maildir, "cur"), ["2.b.host:2,FS", "3.c.host:2,RS"])

    async def test_already_gone(self) -> None:
        """Deleting a message someone else deleted already is not a failure."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host")
        self.put(maildir, "new", "2.b.host")
        mailbox = await self.open(maildir)
        os.unlink(maildir / "new" / "1.a.host")
        os.unlink(maildir / "new" / "2.b.host")
        await mailbox.commit([0], [1])
        self.assertEqual(self.files(maildir, "cur"), [])

    async def test_failed_deletion(self) -> None:
        """A deletion that fails fails the commit, after all else was done."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host")
        self.put(maildir, "new", "2.b.host")
        self.put(maildir, "new", "3.c.host")
        mailbox = await self.open(maildir)
        # unlink() of a directory fails with EISDIR, even as root.
        os.unlink(maildir / "new" / "2.b.host")
        (maildir / "new" / "2.b.host").mkdir()
        with self.assertRaises(CommitFailed):
            await mailbox.commit([0, 1, 2], [])
        self.assertEqual(self.files(maildir, "new"), ["2.b.host"])

    async def test_close_during_commit(self) -> None:
        """Closing while a commit runs releases the lock when the commit is over."""
        maildir = self.maildir()
        self.put(maildir, "new", "1.a.host")
        mailbox = await MaildirMailbox.open(maildir)
        committing = mailbox.commit([0], [])
        mailbox.close()
        await committing
        mailbox.close()
        self.assertEqual(len((await self.open(maildir)).listing()), 0)


class ChunkedReader:
    """A binary stream that returns the given pieces, one per read()."""

    def __init__(self, *pieces: bytes, fail_after: int | None = None) -> None:
        self.pieces = list(pieces)
        self.fail_after = fail_after
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise OSError("connection lost")
        self.reads += 1
        return self.pieces.pop(0) if self.pieces else b""


class DeliverTests(MaildirTestCase):
    async def test_round_trip(self) -> None:
        """Stored with LF ends, named with its sizes, listed and read back."""
        maildir = self.maildir()
        message = b"Subject: hi\r\n\r\nline\r\n.dot\r\nlast"
        stored = b"Subject: hi\n\nline\n.dot\nlast"
        name = deliver(maildir, message, hostname="mx.example.org")
        self.assertEqual(self.files(maildir, "new"), [name])
        self.assertEqual(self.files(maildir, "tmp"), [])
        self.assertEqual((maildir / "new" / name).read_bytes(), stored)
        self.assertEqual(stat.S_IMODE((maildir / "new" / name).stat().st_mode), 0o600)
        parsed = parse_name(name)
        self.assertEqual(parsed.stored_size, len(stored))
        self.assertEqual(parsed.wire_size, retr_size(message))
        self.assertTrue(parsed.unique.startswith(str(parsed.timestamp) + ".M"))
        mailbox = await self.open(maildir)
        self.assertEqual(list(mailbox.listing().sizes), [retr_size(message)])
        self.assertEqual(list(mailbox.listing().uids), [uidl_for(parsed.unique)])
        self.assertEqual(await self.read(mailbox, 0), stored)

    def test_chunk_boundaries(self) -> None:
        """A CRLF split between reads still becomes LF; lone CRs stay, also before a CRLF."""
        maildir = self.maildir()
        source = ChunkedReader(b"a\r", b"\nb\r", b"\r\n", b"c\rd\r\r", b"\ne\r")
        name = deliver(maildir, source)
        self.assertEqual((maildir / "new" / name).read_bytes(), b"a\nb\r\r\nc\rd\r\r\ne\r")

    @settings(max_examples=300)
    @given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\xe4"]), max_size=60)
           .map(b"".join), st.integers(1, 7))
    def test_stored_form_reads_back_exactly(self, message: bytes, step: int) -> None:
        """For any bytes and chunking, RETR of the stored file sends what RETR of the original
        would, and the name's W= is that size."""
        maildir = self.maildir()
        chunks = [message[i:i + step] for i in range(0, len(message), step)]
        name = deliver(maildir, ChunkedReader(*chunks))
        stored = (maildir / "new" / name).read_bytes()
        self.assertEqual(_encode(stored), _encode(message))
        self.assertEqual(parse_name(name).wire_size, wire_size(message))
        self.assertEqual(parse_name(name).stored_size, len(stored))

    def test_stream(self) -> None:
        """A large message from a stream arrives whole with the right sizes."""
        maildir = self.maildir()
        message = b"Subject: big\r\n\r\n" + b"0123456789" * 7 + b"\r\n"
        message *= 40_000
        name = deliver(maildir, io.BytesIO(message))
        stored = message.replace(b"\r\n", b"\n")
        self.assertEqual((maildir / "new" / name).read_bytes(), stored)
        parsed = parse_name(name)
        self.assertEqual((parsed.stored_size, parsed.wire_size), (len(stored), len(message)))

    def test_failure_is_atomic(self) -> None:
        """A source failing halfway leaves nothing in new/ or tmp/."""
        maildir = self.maildir()
        source = ChunkedReader(b"Subject: x\r\n", b"more\r\n", fail_after=1)
        self.assertRaises(OSError, deliver, maildir, source)
        self.assertEqual(self.files(maildir, "new"), [])
        self.assertEqual(self.files(maildir, "tmp"), [])

    def test_creates_maildir(self) -> None:
        """Delivering to a missing Maildir creates it."""
        maildir = Path(self.mktemp()) / "user"
        name = deliver(maildir, b"hi\n")
        self.assertEqual(self.files(maildir, "new"), [name])
        self.assertEqual(self.files(maildir, "cur"), [])

    def test_unique_names(self) -> None:
        """Many deliveries in a row get distinct names."""
        maildir = self.maildir()
        names = {deliver(maildir, b"m\n", hostname="h") for _ in range(50)}
        self.assertEqual(len(names), 50)
        self.assertEqual(len(self.files(maildir, "new")), 50)

    def test_clean_tmp(self) -> None:
        """Old tmp/ files are removed, recent ones kept."""
        maildir = self.maildir()
        old = self.put(maildir, "tmp", "1.old.host")
        os.utime(old, (1000.0, 1000.0))
        self.put(maildir, "tmp", "2.fresh.host")
        (maildir / "tmp" / "3.dir").mkdir()
        os.utime(maildir / "tmp" / "3.dir", (1000.0, 1000.0))
        self.assertEqual(clean_tmp(maildir), 1)
        self.assertEqual(self.files(maildir, "tmp"), ["2.fresh.host", "3.dir"])
        self.assertEqual(clean_tmp(Path(self.mktemp())), 0)


def _encode(message: bytes) -> bytes:
    """What RETR sends for ``message``."""
    encoder = BodyEncoder()
    return encoder.feed(message) + encoder.finish()


#: Names of every shape a scan may meet: the common one (``,W=`` and a time),
#: other separators, flags, no ``,W=``, doubled or damaged fields, odd names.
_VARIED_NAMES = [
    "1700000000.M1P2Q3.host,S=10,W=12:2,S",
    "1700000001.M1P2Q3.host,S=10,W=12:2,",
    "1700000002.M1P2Q3.host,W=12,S=10:2,FRS",
    "1700000003.M1P2Q3.host,W=12",
    "1700000004.M1P2Q3.host,W=12!2,S",
    "1700000005.M1P2Q3.host,W=12;2,S",
    "1700000006.M1P2Q3.ho!st,W=12",
    "1700000007.M1P2Q3.host,W=12,W=13:2,S",
    "1700000008.M1P2Q3.host,W=x1:2,S",
    "1700000009.M1P2Q3.host,W=:2,S",
    "1700000010.M1P2Q3.host,W=123456789012345678901:2,S",
    "1700000011.M1P2Q3.host:2,S",
    "1700000012.M1P2Q3.host",
    "1700000013,W=5.M1:2,S",
    "x1700000014.M1P2Q3.host,W=12:2,S",
    ".1700000015.host,W=12:2,S",
    "\u0661700000016.M1.host,W=12:2,S",
    "1700000017.M1.host,W=\u0661:2,S",
    "1700000018.M1.host,W=12:2,S:extra",
    "1700000019.M1.host,X=1,W=12,Y=2:3,odd",
    ":2,S",
    "plainname",
    "1700000020..host,W=0:2,T",
    "01700000021.M1.host,W=007:2,S",
]


class CommonNameTests(TestCase):
    def check_agrees(self, names: list[str]) -> int:
        """split_common agrees with parse_name on every name it takes; returns how many."""
        matches, others = split_common(names)
        taken = [unique + info for unique, _, _, info in matches]
        self.assertEqual(sorted(taken + others), sorted(names))
        self.assertEqual(others, [name for name in names if name not in set(taken)])
        for unique, stamp, wire, info in matches:
            parsed = parse_name(unique + info)
            self.assertEqual(
                (unique, int(wire), int(stamp)),
                (parsed.unique, parsed.wire_size, parsed.timestamp),
                unique + info,
            )
            self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in unique), unique)
        return len(matches)

    def test_same_as_parse_name(self) -> None:
        """Where the common-shape parser answers, it says what parse_name says."""
        self.assertGreaterEqual(self.check_agrees(_VARIED_NAMES), 4)

    def test_takes_dovecot_and_own_names(self) -> None:
        """Dovecot's names and those deliveries here make are all of the common shape."""
        ours = make_unique(2, 3, hostname="mail.example.org")
        names = ["1715680000.M0P4242Q0.bench.example.org,S=2048,W=2092:2,S", ours + ":2,", ours]
        matches, others = split_common(names)
        self.assertEqual((len(matches), others), (3, []))

    @given(st.lists(st.lists(st.sampled_from("0123456789.,:!;W=SxM2"), max_size=30).map("".join)))
    @settings(max_examples=300)
    def test_same_as_parse_name_any(self, names: list[str]) -> None:
        self.check_agrees(names)

    @given(st.lists(st.text(max_size=40).filter(lambda n: "\0" not in n), max_size=5))
    @settings(max_examples=300)
    def test_same_as_parse_name_any_text(self, names: list[str]) -> None:
        self.check_agrees(["1700000000." + name for name in names] + names)


#: Common names only: ties in time, a unique name that is a prefix of
#: another, flags and none, both places.
_COMMON_NAMES = [
    ("cur", "1700000005.M1P2Q3.host,S=10,W=12:2,S"),
    ("cur", "1700000005.M1P2Q3.host,S=10,W=123:2,S"),
    ("new", "1700000005.M1P2Q3.host,S=10,W=1234"),
    ("cur", "1700000004.Z.host,W=7:2,FRS"),
    ("new", "1700000004.A.host,W=0"),
    ("cur", "1700000006.M2.host,W=3:2,"),
    ("cur", "1600000000.old,W=9:2,T"),
]


class CommonScanTests(MaildirTestCase):
    def scans(
        self, maildir: Path, uidl_format: str = "dovecot", use_index: bool = False
    ) -> tuple[Scan, Scan]:
        """The scan as it runs, and the same with the common-name path turned off."""
        scheme = parse_uidl_format(uidl_format)
        lean = scan(maildir, scheme, use_index)
        self.patch(maildir_scan, "common_columns", lambda places: None)
        try:
            general = scan(maildir, scheme, use_index)
        finally:
            self.patch(maildir_scan, "common_columns", common_columns)
        return lean, general

    def assertSameScan(self, lean: Scan, general: Scan) -> None:
        self.assertEqual(list(lean.listing.uids), list(general.listing.uids))
        self.assertEqual(list(lean.listing.sizes), list(general.listing.sizes))
        self.assertEqual(list(lean.listing.received or ()), list(general.listing.received or ()))
        self.assertEqual(list(lean.listing.seen or ()), list(general.listing.seen or ()))
        self.assertEqual(lean.infos, general.infos)
        self.assertEqual(lean.places, general.places)
        self.assertEqual(lean.uniques, general.uniques)

    def test_common_names(self) -> None:
        """A Maildir of common names: the same scan either way, for each UIDL scheme."""
        maildir = self.maildir()
        for sub, name in _COMMON_NAMES:
            self.put(maildir, sub, name)
        for uidl_format in ("dovecot", "maildir", "%08Xu%08Xv", "%u-%v"):
            lean, general = self.scans(maildir, uidl_format)
            self.assertSameScan(lean, general)
            self.assertEqual(lean.listing.uids[0], "1600000000.old,W=9")
            self.assertEqual(len(lean.listing), len(_COMMON_NAMES))

    def test_common_path_taken(self) -> None:
        """The common-name path really runs for such a Maildir (and not for others)."""
        maildir = self.maildir()
        for sub, name in _COMMON_NAMES:
            self.put(maildir, sub, name)
        calls = []

        def spy(places: object) -> object:
            calls.append(places)
            return common_columns(places)  # type: ignore[arg-type]

        self.patch(maildir_scan, "common_columns", spy)
        scan(maildir, parse_uidl_format("dovecot"), False)
        self.assertEqual(len(calls), 1)
        scan(maildir, parse_uidl_format("%Mf"), False)
        self.put(maildir, "cur", "odd-name")
        scan(maildir, parse_uidl_format("dovecot"), False)
        self.assertEqual(len(calls), 1)

    def test_varied_names(self) -> None:
        """Names of other shapes among them: the same scan (the general path for all)."""
        maildir = self.maildir()
        for i, name in enumerate(_VARIED_NAMES):
            self.put(maildir, "cur" if i % 3 else "new", name, b"x" * i)
        self.assertSameScan(*self.scans(maildir))

    def test_moved_during_listing(self) -> None:
        """The same unique name in new/ and cur/: one message, the cur/ file."""
        maildir = self.maildir()
        self.put(maildir, "new", "1700000000.A.host,W=2")
        self.put(maildir, "cur", "1700000000.A.host,W=2:2,S")
        lean, general = self.scans(maildir)
        self.assertSameScan(lean, general)
        self.assertEqual((lean.infos, lean.places), ([":2,S"], bytearray([CUR])))

    def test_long_name(self) -> None:
        """A unique name over 70 characters gets a digest UIDL, as elsewhere."""
        maildir = self.maildir()
        self.put(maildir, "cur", "1700000000." + "h" * 70 + ",W=2:2,S")
        self.put(maildir, "cur", "1700000001.B.host,W=2:2,S")
        lean, general = self.scans(maildir)
        self.assertSameScan(lean, general)
        self.assertTrue(lean.listing.uids[0].startswith("X"))

    def test_template_naming_every_message(self) -> None:
        """A format that names messages without a uidlist record (%Mf) is honoured."""
        maildir = self.maildir()
        self.put(maildir, "cur", "1700000000.A.host,W=2:2,S")
        lean, general = self.scans(maildir, "%Mf")
        self.assertSameScan(lean, general)
        self.assertNotEqual(lean.listing.uids[0], "1700000000.A.host,W=2")

    def test_stale_index_emptied(self) -> None:
        """An index kept for names without sizes is emptied once no name needs it."""
        maildir = self.maildir()
        self.put(maildir, "cur", "1700000000.A.host:2,S")
        first = scan(maildir, parse_uidl_format("dovecot"), True)
        assert first.index_update
        with MaildirPath.of(maildir).opened() as (top,):
            maildir_index.save_index(top, first.index_update)
        os.rename(
            maildir / "cur" / "1700000000.A.host:2,S",
            maildir / "cur" / "1700000000.A.host,W=3:2,S",
        )
        lean, general = self.scans(maildir, use_index=True)
        self.assertEqual((lean.index_update, general.index_update), ({}, {}))

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["new", "cur"]),
                st.integers(1_000_000_000, 9_999_999_999),
                st.text("ABZaz09.=-_", min_size=0, max_size=8),
                st.integers(0, 10**6),
                st.sampled_from(["", ":2,", ":2,S", ":2,FS", ":1,x"]),
            ),
            max_size=12,
        )
    )
    @settings(max_examples=60, deadline=None)
    def test_any_common_names(self, files: list[tuple[str, int, str, int, str]]) -> None:
        maildir = self.maildir()
        for sub, stamp, rest, wire, info in files:
            self.put(maildir, sub, f"{stamp}.{rest},W={wire}{info if sub == 'cur' else ''}")
        self.assertSameScan(*self.scans(maildir))


class ThreadedMeasureTests(MaildirTestCase):
    """Files without ``,W=`` are read in several threads when there are many."""

    def setUp(self) -> None:
        self.patch(maildir_scan, "_MEASURE_BATCH", 3)
        self.maildir_path = self.maildir()
        self.bodies = {
            f"{1000 + i}.P{i}.host": b"line\n" * i + (b".dot\r\n" if i % 2 else b"end")
            for i in range(20)
        }
        for i, (name, body) in enumerate(self.bodies.items()):
            sub, info = ("cur", ":2,S") if i % 3 else ("new", "")
            self.put(self.maildir_path, sub, name + info, body)

    def test_same_as_one_thread(self) -> None:
        """Sizes, times and order are those of a scan in one thread."""
        scheme = parse_uidl_format("dovecot")
        threaded = scan(self.maildir_path, scheme, False)
        self.assertEqual(list(threaded.listing.sizes), [retr_size(b) for b in self.bodies.values()])
        self.patch(maildir_scan, "_MEASURE_BATCH", 1000)
        single = scan(self.maildir_path, scheme, False)
        self.assertEqual(threaded, single)

    def test_deleted_meanwhile(self) -> None:
        """A file deleted by someone else during the scan is left out, the rest counted."""
        real = maildir_scan._measure
        gone = "1007.P7.host:2,S"

        def measure(places: list[int], size_needed: bool, where: int, name: str) -> object:
            if name == gone:
                os.unlink(name, dir_fd=places[where])
            return real(places, size_needed, where, name)

        self.patch(maildir_scan, "_measure", measure)
        scanned = scan(self.maildir_path, parse_uidl_format("dovecot"), False)
        self.assertEqual(len(scanned.listing), 19)
        self.assertNotIn("1007.P7.host", list(scanned.listing.uids))

    def test_failure_stops_the_scan(self) -> None:
        """An unreadable file fails the scan (the login gets [SYS/TEMP]); no thread lingers."""
        real = maildir_scan._measure

        def measure(places: list[int], size_needed: bool, where: int, name: str) -> object:
            if name.startswith("1011."):
                raise PermissionError(errno.EACCES, "injected")
            return real(places, size_needed, where, name)

        self.patch(maildir_scan, "_measure", measure)
        with self.assertRaises(PermissionError):
            scan(self.maildir_path, parse_uidl_format("dovecot"), False)
        self.assertEqual(
            [t.name for t in threading.enumerate() if t.name.startswith("popserv-measure")], []
        )


class CollectorPauseTests(MaildirTestCase):
    def setUp(self) -> None:
        self.patch(maildir_scan, "_GC_PAUSE_FILES", 1)
        self.maildir_path = self.maildir()
        self.put(self.maildir_path, "cur", "1700000000.A.host,W=2:2,S")

    def scan_seeing_gc(self) -> list[bool]:
        seen = []
        real = maildir_scan._scan_names

        def spy(*args: object) -> object:
            seen.append(gc.isenabled())
            return real(*args)  # type: ignore[arg-type]

        self.patch(maildir_scan, "_scan_names", spy)
        scan(self.maildir_path, parse_uidl_format("dovecot"), False)
        return seen

    def test_paused_then_resumed(self) -> None:
        """A big scan runs without the collector, which is back on afterwards."""
        self.assertTrue(gc.isenabled())
        self.assertEqual(self.scan_seeing_gc(), [False])
        self.assertTrue(gc.isenabled())

    def test_left_off_if_it_was(self) -> None:
        """An application that turned the collector off keeps it off."""
        gc.disable()
        self.addCleanup(gc.enable)
        self.scan_seeing_gc()
        self.assertFalse(gc.isenabled())

    def test_nested(self) -> None:
        """Overlapping scans: the collector resumes when the last one ends."""
        pause = maildir_scan._CollectorPause()
        with pause:
            with pause:
                self.assertFalse(gc.isenabled())
            self.assertFalse(gc.isenabled())
        self.assertTrue(gc.isenabled())


class ScanLayerTests(TestCase):
    def test_no_twisted(self) -> None:
        """
        The blocking scan imports no Twisted, directly or through the modules
        it uses (the packages' own ``__init__`` aside, which re-export the
        Twisted side too).
        """
        root = Path(maildir_scan.__file__).parent.parent.parent
        code = (
            "import sys, types\n"
            f"for name, path in (('popserv', {str(root)!r}),"
            f" ('popserv.stores', {str(root / 'stores')!r}),"
            f" ('popserv.stores.maildir', {str(root / 'stores' / 'maildir')!r})):\n"
            "    module = types.ModuleType(name)\n"
            "    module.__path__ = [path]\n"
            "    sys.modules[name] = module\n"
            "import popserv.stores.maildir.scan\n"
            "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'twisted'))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        self.assertEqual(out.stdout, "[]\n")


class UniqueNameOrderTests(TestCase):
    def test_names_of_one_second_sort_as_delivered(self):
        """M5 was listed after M123456 when both came in the same second."""
        from popserv.stores.maildir.names import make_unique

        early = make_unique(None, None, now=1700000000.000005, hostname="h")
        late = make_unique(None, None, now=1700000000.123456, hostname="h")
        self.assertLess(early, late)
