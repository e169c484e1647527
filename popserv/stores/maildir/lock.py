"""
The maildrop lock: one POP3 session per Maildir at a time (RFC 1939 section 8),
or, shared, any number of sessions but no exclusive holder meanwhile
(``--maildrop-lock shared``: each session works on its own snapshot, and
``popserv migrate`` still waits for all of them to end).

``flock`` on ``MAILDIR/popserv.lock``: it belongs to the open file
description, so two sessions in one process exclude each other, and the
kernel drops it when the holder dies, so a killed server never leaves a
stale lock that keeps the user out.  The file is never removed: unlinking a
lock file lets a late opener lock the old inode while a third locks a new one.

A server locks in its data directory's table instead (no descriptor per
session, see :mod:`popserv.stores.maildir.locktable`) when it can open it;
:func:`lock_maildrop` takes whichever a session uses.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Protocol

from popserv.core.errors import MailboxInUse, TemporaryFailure, storage_failure
from popserv.stores.maildir.directory import refuse_shared
from popserv.stores.maildir.locktable import LockTable

LOCK_FILE = "popserv.lock"

_CONTENDED = frozenset({errno.EWOULDBLOCK, errno.EAGAIN})


class HeldLock(Protocol):
    """A maildrop lock held, either kind (:class:`MaildropLock`, a table's)."""

    @property
    def held(self) -> bool: ...

    def release(self) -> None: ...


def lock_maildrop(
    maildir: int, *, shared: bool = False, table: LockTable | None = None
) -> HeldLock:
    """
    Lock the Maildir ``maildir`` (a directory descriptor) for a session: in
    ``table`` (see :mod:`popserv.stores.maildir.locktable`), without a
    descriptor of its own, when there is one, else with ``popserv.lock``.
    """
    if table is not None:
        return table.acquire(maildir, shared=shared)
    return MaildropLock.acquire(maildir, shared=shared)


class _Both:
    """Two locks held and released together."""

    __slots__ = ("_locks",)

    def __init__(self, *locks: HeldLock) -> None:
        self._locks = locks

    @property
    def held(self) -> bool:
        return any(lock.held for lock in self._locks)

    def release(self) -> None:
        for lock in self._locks:
            lock.release()


def lock_out_sessions(maildir: int, table: LockTable | None) -> HeldLock:
    """
    Lock the Maildir ``maildir`` exclusively against every session, of
    either kind: ``popserv migrate``'s lock.  A server that could not open
    the table locks ``popserv.lock``, so both are taken.
    """
    file_lock = MaildropLock.acquire(maildir)
    if table is None:
        return file_lock
    try:
        return _Both(table.acquire(maildir), file_lock)
    except BaseException:
        file_lock.release()
        raise


class MaildropLock:
    """A lock on one Maildir (exclusive unless shared), held until :meth:`release`."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, maildir: int, *, shared: bool = False) -> MaildropLock:
        """
        Lock the Maildir whose directory descriptor is ``maildir``, without
        waiting (a quick, blocking call); ``shared``: alongside other shared
        holders.

        Raise :class:`MailboxInUse` if another session holds it, or
        :class:`TemporaryFailure` (or ``PermanentFailure``, see
        :func:`~popserv.core.errors.storage_failure`) if the lock file cannot be opened.
        """
        try:
            # O_NOFOLLOW: a symlink planted here must not make us write elsewhere.
            fd = os.open(
                LOCK_FILE,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=maildir,
            )
            refuse_shared(fd, LOCK_FILE)
        except OSError as e:
            raise storage_failure("cannot open the lock file", e) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in _CONTENDED:
                raise MailboxInUse("maildrop locked by another session") from None
            raise TemporaryFailure(f"cannot lock: {e.strerror}") from None
        if shared:
            return cls(fd)  # Many holders: no one pid to write.
        holder = f"{os.getpid()}\n".encode("ascii")
        try:
            # Rewriting the same pid at every login costs a journal commit.
            if os.pread(fd, 32, 0) != holder:
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder, 0)
        except OSError:
            pass  # The pid is only a hint for humans; the lock is what counts.
        return cls(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock; calling it again does nothing."""
        fd, self._fd = self._fd, None
        if fd is not None:
            # Unlock explicitly: a child forked meanwhile (before its exec) shares
            # the open file description, and closing only our copy would keep
            # the lock until that child exits.
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
