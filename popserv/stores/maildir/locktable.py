"""
Maildrop locks without a descriptor per session: one lock file for the
whole data directory, ``DATA/popserv.locks``, in which each Maildir is one
byte, locked with an open file description lock (Linux's ``F_OFD_SETLK``).

A per-Maildir ``flock`` (:mod:`popserv.stores.maildir.lock`) holds a
descriptor for as long as the session lasts, so a process serving 10,000
sessions needs 20,000 descriptors with their sockets: the default hard
limit (bench B4 was refused logins at 10,000).  Here a process holds the
table open once.  Within the process, :class:`LockTable` counts who holds
what; between processes (workers, ``popserv migrate``) the kernel does, as
for ``flock``: a read lock is shared, a write lock exclusive, and a
process that dies lets go of all of them.  Locks of one open file
description never conflict with each other, which is why the counting in
the process is needed and enough.

A Maildir's byte is at an offset made from its device and inode numbers
(the directory itself, whatever path reached it), hashed into 62 bits:
two Maildirs meet by chance with odds of about n^2 / 2^63.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import threading
import weakref
from pathlib import Path

from twisted.logger import Logger

from popserv.core.errors import MailboxInUse, TemporaryFailure

log = Logger()

#: The table's name in the data directory.
TABLE_FILE = "popserv.locks"

#: ``struct flock`` (``l_type``, ``l_whence``, ``l_start``, ``l_len``,
#: ``l_pid``) with the native layout: 32 octets on 64-bit Linux.
_FLOCK = "hhqqi4x"

_CONTENDED = frozenset({errno.EAGAIN, errno.EACCES})


def offset_of(maildir: int) -> int:
    """The byte standing for the Maildir whose directory descriptor is ``maildir``."""
    status = os.fstat(maildir)
    digest = hashlib.blake2b(b"%d:%d" % (status.st_dev, status.st_ino), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


class LockTable:
    """One process's hold on ``DATA/popserv.locks``: :meth:`acquire` a Maildir's byte."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # Closed when the table is dropped: a test suite makes hundreds.
        self._close = weakref.finalize(self, os.close, fd)
        self._guard = threading.Lock()
        #: Byte: (shared, holders in this process).
        self._held: dict[int, tuple[bool, int]] = {}

    @classmethod
    def open(cls, data_dir: Path) -> LockTable:
        """
        Open (creating it) the table of ``data_dir``; OSError if it cannot be.
        Made by root, it is given to the data directory's owner, whom the
        server runs as.
        """
        fd = os.open(
            data_dir / TABLE_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            status = os.fstat(fd)
            if os.geteuid() == 0 and status.st_uid == 0:
                owner = os.stat(data_dir)
                if owner.st_uid != 0:
                    os.fchown(fd, owner.st_uid, owner.st_gid)
        except OSError:
            os.close(fd)
            raise
        return cls(fd)

    def acquire(self, maildir: int, *, shared: bool = False) -> TableLock:
        """
        Lock the Maildir whose directory descriptor is ``maildir``, without
        waiting: alongside other shared holders if ``shared``.  Raise
        :class:`MailboxInUse` when another holder excludes it,
        :class:`TemporaryFailure` when the lock cannot be taken.
        """
        try:
            byte = offset_of(maildir)
        except OSError as e:
            raise TemporaryFailure(f"cannot lock: {e.strerror}") from None
        with self._guard:
            held = self._held.get(byte)
            if held is not None:
                if not (shared and held[0]):
                    raise MailboxInUse("maildrop locked by another session")
                self._held[byte] = (True, held[1] + 1)
            else:
                self._set(byte, fcntl.F_RDLCK if shared else fcntl.F_WRLCK)
                self._held[byte] = (shared, 1)
        return TableLock(self, byte)

    def _set(self, byte: int, kind: int) -> None:
        try:
            request = struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0)
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, request)
        except OSError as e:
            if e.errno in _CONTENDED:
                raise MailboxInUse("maildrop locked by another process") from None
            raise TemporaryFailure(f"cannot lock: {e.strerror}") from None

    def release(self, byte: int) -> None:
        with self._guard:
            shared, holders = self._held[byte]
            if holders > 1:
                self._held[byte] = (shared, holders - 1)
                return
            del self._held[byte]
            # Unlocking cannot fail on a descriptor that holds the lock.
            self._set(byte, fcntl.F_UNLCK)

    def holders(self) -> int:
        """Maildirs this process holds (for tests and tools)."""
        with self._guard:
            return len(self._held)

    def close(self) -> None:
        """Let go of every lock at once (the process's end does it too)."""
        with self._guard:
            self._held.clear()
            self._close()


def table_in(data_dir: Path) -> LockTable | None:
    """
    The lock table of ``data_dir``, or None when it cannot be opened (the
    directory missing or not this user's): then each Maildir's
    ``popserv.lock`` is locked, a descriptor a session.
    """
    try:
        return LockTable.open(data_dir)
    except OSError as e:
        log.info(
            "Locking each Maildir's popserv.lock (a descriptor per session): cannot open"
            " {path}: {error}",
            path=str(data_dir / TABLE_FILE),
            error=e.strerror,
        )
        return None


class TableLock:
    """One holder's share of a Maildir's byte in a :class:`LockTable`."""

    __slots__ = ("_byte", "_table")

    def __init__(self, table: LockTable, byte: int) -> None:
        self._table: LockTable | None = table
        self._byte = byte

    @property
    def held(self) -> bool:
        return self._table is not None

    def release(self) -> None:
        """Release the lock; calling it again does nothing."""
        table, self._table = self._table, None
        if table is not None:
            table.release(self._byte)
