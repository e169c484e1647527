"""popserv.core.files: safe opening, bounded reads and atomic replacement, on real files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from popserv.core.files import NotRegular, fsync_directory, open_regular, read_regular, replace_file


class ReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.secret = self.dir / "secret"
        self.secret.write_bytes(b"only the server")

    def test_regular(self) -> None:
        """A regular file opens, with its status, by path or relative to a descriptor."""
        fd, status = open_regular(self.secret)
        os.close(fd)
        self.assertEqual(status.st_size, 15)
        top = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, top)
        self.assertEqual(read_regular("secret", 100, dir_fd=top), b"only the server")

    def test_not_regular(self) -> None:
        """A symlink, a FIFO (without hanging) or a directory counts as absent."""
        (self.dir / "link").symlink_to(self.secret)
        os.mkfifo(self.dir / "fifo")
        for name in ("link", "fifo", "."):
            with self.assertRaises(FileNotFoundError) as caught:
                open_regular(self.dir / name)
            self.assertIsInstance(caught.exception, NotRegular)
            self.assertIsNone(read_regular(self.dir / name, 100))

    def test_missing(self) -> None:
        self.assertRaises(FileNotFoundError, read_regular, self.dir / "none", 100)

    def test_bounded(self) -> None:
        """A file over the limit is not read; one exactly at it is."""
        self.assertIsNone(read_regular(self.secret, 14))
        self.assertEqual(read_regular(self.secret, 15), b"only the server")


class ReplaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "file"

    def test_replaced(self) -> None:
        """New contents, mode 0600, no temporary file left; durable by path."""
        self.path.write_bytes(b"old")
        replace_file(self.path, b"new", durable=True)
        self.assertEqual(self.path.read_bytes(), b"new")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(os.listdir(self.dir), ["file"])

    def test_relative_to_descriptor(self) -> None:
        top = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, top)
        replace_file("file", b"data", dir_fd=top, durable=True)
        self.assertEqual(self.path.read_bytes(), b"data")

    def test_symlink_replaced_not_followed(self) -> None:
        target = self.dir / "target"
        target.write_bytes(b"keep")
        self.path.symlink_to(target)
        replace_file(self.path, b"data")
        self.assertEqual(target.read_bytes(), b"keep")
        self.assertFalse(self.path.is_symlink())

    def test_failure_leaves_no_tmp(self) -> None:
        """A rename that fails (onto a directory) leaves the temporary file nowhere."""
        self.path.mkdir()
        for locked in (False, True):
            self.assertRaises(OSError, replace_file, self.path, b"x", locked=locked)
            self.assertEqual(os.listdir(self.dir), ["file"])

    def test_locked_reuses_leftover(self) -> None:
        """Under the caller's lock the temporary file is NAME.tmp: a crash's leftover is reused."""
        leftover = self.dir / "file.tmp"
        leftover.write_bytes(b"a much longer half-written file")
        leftover.chmod(0o644)
        replace_file(self.path, b"new", locked=True)
        self.assertEqual(self.path.read_bytes(), b"new")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertFalse(leftover.exists())

    def test_like(self) -> None:
        """The new file takes the old one's mode."""
        self.path.write_bytes(b"old")
        self.path.chmod(0o640)
        replace_file(self.path, b"new", like=self.path.stat())
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o640)


class FsyncDirectoryTests(SynchronousTestCase):
    def test_path_and_descriptor(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        fsync_directory(directory)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        fsync_directory(fd)
