"""
Where a Maildir's messages are: its ``new/`` and ``cur/``, listed, and
searched for a message another program moved.

Other programs (an IMAP server, a mail client on the same Maildir) may move
a message from ``new/`` to ``cur/`` or change its flags while a session is
open.  That renames the file but keeps its unique part, so each access that
finds the file gone looks it up again by that unique part
(:func:`chasing`) before deciding the message is really gone.

Both directories are reached through descriptors (see
:mod:`popserv.stores.maildir.directory`).  Blocking: call these in a thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import chain, islice
from typing import TypeVar

from popserv.stores.maildir.names import parse_name

T = TypeVar("T")

#: Indexes into :data:`SUBDIRS`; one byte per message says where it lives.
NEW, CUR = 0, 1
SUBDIRS = ("new", "cur")

#: The Maildir's ``new/`` and ``cur/`` as directory descriptors, by NEW and CUR.
Places = Sequence[int]

#: How often to chase a message that keeps moving before calling it gone.
_LOOKUP_TRIES = 3


#: A directory whose first read took this long is not in the page cache ...
_COLD_READ_NS = 2_000_000
#: ... and if it is at least this large (``st_size``; ext4: about 45
#: Maildir names a 4 KiB block), its blocks are read ahead in parallel.
_READ_AHEAD_BYTES = 1 << 20
#: Threads reading ahead, each from its own part of the directory.
_READ_AHEAD_THREADS = 4
#: Bytes of directory per entry, to tell each thread how far to read: an
#: ext4 entry is 8 bytes and the name rounded up to 4, and the blocks of an
#: indexed directory are about three quarters full.
_DIRECTORY_BYTES_PER_ENTRY = 96


def _read_ahead(directory: int, start: int, entries: int) -> None:
    """
    Read about ``entries`` entries of ``directory`` from the position
    ``start``, and drop them: only for the kernel to load their blocks.
    """
    try:
        # A description of its own, so that its position is its own.
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=directory)
    except OSError:
        return
    try:
        os.lseek(fd, start, os.SEEK_SET)
        with os.scandir(fd) as listed:
            deque(islice(listed, entries), maxlen=0)
    except OSError:
        pass  # Only speed is lost.
    finally:
        os.close(fd)


def _read_ahead_threads(directory: int) -> list[threading.Thread]:
    """
    Threads that read parts of a big directory whose blocks are not in
    memory, so that the listing finds them there.

    ext4 lists an indexed directory in hash order and reads its blocks
    one at a time as it goes, each read waiting for the disk: 100,000
    Maildir names (11 MB of directory) took 0.22 s of a 0.30 s cold listing
    here.  ext4's positions in such a directory are hashes (below 2**63,
    about uniform), so threads that seek to 1/4, 2/4 and 3/4 of that range
    keep several reads in flight while the listing goes through the first
    part.  On other file systems such a position may mean nothing or the
    end: the threads then read little or nothing, and the listing, which
    never depends on them, is the same.
    """
    try:
        size = os.fstat(directory).st_size
    except OSError:
        return []
    if size < _READ_AHEAD_BYTES:
        return []
    entries = size // _DIRECTORY_BYTES_PER_ENTRY // _READ_AHEAD_THREADS
    threads = [
        threading.Thread(
            target=_read_ahead,
            args=(directory, (part << 63) // _READ_AHEAD_THREADS, entries),
            name="popserv-read-ahead",
            daemon=True,
        )
        for part in range(1, _READ_AHEAD_THREADS)
    ]
    for thread in threads:
        thread.start()
    return threads


def _names(directory: int) -> list[str]:
    """The names of the regular files in ``directory``, dot files left out."""
    threads: list[threading.Thread] = []
    with os.scandir(directory) as listed:
        began = time.monotonic_ns()
        first = next(listed, None)
        if first is None:
            return []
        if time.monotonic_ns() - began > _COLD_READ_NS:
            threads = _read_ahead_threads(directory)
        entries: Iterator[os.DirEntry[str]] = chain((first,), listed)
        names = [
            entry.name
            for entry in entries
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")
        ]
    for thread in threads:
        thread.join()
    return names


def list_messages(places: Places) -> tuple[list[str], list[str]]:
    """
    The names of the message files in ``new/`` and ``cur/``: regular files
    (a symbolic link or a directory is no message), dot files left out.
    """
    listed = []
    # new/ before cur/: a message moving between them during the scan is then
    # seen at least once.
    for directory in places:
        listed.append(_names(directory))
    return listed[NEW], listed[CUR]


def _find(places: Places, unique: str) -> tuple[int, str] | None:
    """Where the message with this unique part is now, as (NEW or CUR, file name)."""
    for where, directory in enumerate(places):
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if (
                    name.startswith(unique)
                    and parse_name(name).unique == unique
                    and entry.is_file(follow_symlinks=False)
                ):
                    return where, name
    return None


def chasing(
    places: Places, where: int, name: str, action: Callable[[int, str], T]
) -> tuple[int, str, T]:
    """
    Run ``action(where, name)``; if the file is gone, find where the message
    moved and run it there.  Return where it ran, the name there, and what
    ``action`` returned; raise ``FileNotFoundError`` if it is really gone.
    """
    unique = None
    for _ in range(_LOOKUP_TRIES):
        try:
            return where, name, action(where, name)
        except FileNotFoundError:
            if unique is None:
                unique = parse_name(name).unique
            found = _find(places, unique)
            if found is None:
                raise
            where, name = found
    return where, name, action(where, name)
