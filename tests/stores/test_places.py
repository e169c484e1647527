"""
Listing a Maildir's ``new/`` and ``cur/``
(:func:`popserv.stores.maildir.places.list_messages`), with and without the
read-ahead of a big directory that is not in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from popserv.stores.maildir import places
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.places import SUBDIRS, list_messages


def _maildir(root: Path, count: int) -> tuple[Path, set[str]]:
    """A Maildir of ``count`` messages in ``cur/``, one in ``new/``, and non-messages."""
    maildir = root / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    names = {f"17156800{n:02d}.M{n}P1Q{n}.host,S=5,W=6:2,S" for n in range(count)}
    for name in names:
        (maildir / "cur" / name).write_bytes(b"hello")
    (maildir / "new" / "1715680000.new.host").write_bytes(b"x")
    (maildir / "cur" / ".hidden").write_bytes(b"x")
    (maildir / "cur" / "1715680000.adirectory.host").mkdir()
    os.symlink("/etc/passwd", maildir / "cur" / "1715680000.alink.host:2,S")
    return maildir, names


class ListMessagesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.maildir, self.names = _maildir(Path(self.mktemp()), 300)
        self.read_ahead: list[tuple[int, int]] = []
        real = places._read_ahead

        def spy(directory: int, start: int, entries: int) -> None:
            self.read_ahead.append((start, entries))
            real(directory, start, entries)

        self.patch(places, "_read_ahead", spy)

    def listed(self) -> tuple[list[str], list[str]]:
        with MaildirPath.of(self.maildir).opened(*SUBDIRS) as (_, *fds):
            return list_messages(fds)

    def test_small_or_in_memory(self) -> None:
        """A directory that is small, or read fast, is listed without read-ahead."""
        new, cur = self.listed()
        self.assertEqual(new, ["1715680000.new.host"])
        self.assertEqual(set(cur), self.names)
        self.assertEqual(len(cur), len(self.names))
        self.assertEqual(self.read_ahead, [])

    def test_read_ahead(self) -> None:
        """
        A directory taken for big and cold is read ahead from three later
        positions, and listed exactly as without: regular files only, dot
        files, directories and symbolic links left out, each name once.
        """
        self.patch(places, "_COLD_READ_NS", -1)
        self.patch(places, "_READ_AHEAD_BYTES", 0)
        new, cur = self.listed()
        self.assertEqual(new, ["1715680000.new.host"])
        self.assertEqual(set(cur), self.names)
        self.assertEqual(len(cur), len(self.names))
        starts = sorted(start for start, _ in self.read_ahead)
        self.assertEqual(starts, sorted([1 << 61, 2 << 61, 3 << 61] * 2))

    def test_read_ahead_anywhere(self) -> None:
        """Reading ahead from any position, past the end included, fails silently."""
        fd = os.open(self.maildir / "cur", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for start in (0, 1, 1 << 40, (1 << 63) - 1):
                places._read_ahead(fd, start, 10)
            places._read_ahead(-1, 0, 10)
        finally:
            os.close(fd)
