"""
Files opened, read and replaced safely: one copy of each rule for the whole
server.

Reading never follows a symbolic link (a user who can write in their
Maildir could point one at a file only the server may read) and never
hangs on a FIFO a user planted (``O_NONBLOCK``).  Replacing writes a
temporary file beside the target and renames it over it, so a reader sees
the old file or the new one, never a torn one.

The Maildir store (messages, ``dovecot-uidlist`` and its own caches),
delivery and the password file use these, which is why this module is not
inside :mod:`popserv.stores.maildir`.  A name is a path, or relative to a directory
descriptor (``dir_fd``), as everything inside a Maildir is reached (see
:mod:`popserv.stores.maildir.directory`).  Blocking: call these in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from pathlib import Path

#: Open for reading: not through a symbolic link, and without waiting for a
#: writer should the file be a FIFO.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_tmp_counter = itertools.count()

#: A file name: a path, or a name relative to ``dir_fd``.
Name = str | os.PathLike[str]


class NotRegular(FileNotFoundError):
    """A symbolic link, FIFO, device or directory where a regular file should be."""

    def __init__(self) -> None:
        super().__init__(errno.ENOENT, "not a regular file")


def open_regular(name: Name, *, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """
    A descriptor of the regular file ``name``, open for reading, and its
    status (one ``fstat`` for both); the caller closes it.

    Anything but a regular file counts as absent: :class:`NotRegular`, a
    ``FileNotFoundError``, as when there is no file at all.
    """
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegular() from None
        raise
    return checked_regular(fd)


def checked_regular(fd: int) -> tuple[int, os.stat_result]:
    """
    ``fd`` (opened with :data:`READ_FLAGS` by other means) and its status if
    it is a regular file; else it is closed and :class:`NotRegular` raised.
    """
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise NotRegular()
    except BaseException:
        os.close(fd)
        raise
    return fd, status


def read_regular(name: Name, limit: int, *, dir_fd: int | None = None) -> bytes | None:
    """
    The whole of the regular file ``name``; None if it is anything else (see
    :func:`open_regular`) or holds more than ``limit`` octets.
    ``FileNotFoundError`` if there is none, ``OSError`` if it cannot be read.
    """
    try:
        fd, status = open_regular(name, dir_fd=dir_fd)
    except NotRegular:
        return None
    try:
        if status.st_size > limit:
            return None
        # One octet more than fstat said: one read usually meets the end.
        chunks = []
        total = 0
        while chunk := os.read(fd, max(status.st_size - total, 0) + 1):
            total += len(chunk)
            if total > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def replace_file(
    name: Name,
    data: bytes,
    *,
    dir_fd: int | None = None,
    durable: bool = False,
    like: os.stat_result | None = None,
    locked: bool = False,
) -> None:
    """
    Replace the file ``name`` with ``data`` atomically, through a temporary
    file beside it (mode 0600, never through a symbolic link); ``OSError``
    if that fails, with no temporary file left behind.

    ``durable``: the data and the rename are on disk before this returns
    (the file, then its directory, fsynced).  Caches skip it: one lost in a
    crash is rebuilt, and a torn one fails its checksum.

    ``like``: the new file gets that file's owner (where allowed) and mode,
    so a file an administrator set up (``root:popserv 0640``) stays readable.

    The temporary file is ``NAME.PID.N.tmp``, a name no concurrent writer
    shares.  With ``locked`` (the caller holds a lock that keeps every other
    writer out) it is ``NAME.tmp``, and one a crash left is reused.
    """
    if locked:
        tmp = f"{os.fspath(name)}.tmp"
        flags = os.O_TRUNC
    else:
        tmp = f"{os.fspath(name)}.{os.getpid()}.{next(_tmp_counter)}.tmp"
        flags = os.O_EXCL
    flags |= os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        try:
            if locked:
                # One a crash left keeps its old mode through O_TRUNC.
                os.fchmod(fd, 0o600)
            if like is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, like.st_uid, like.st_gid)
                os.fchmod(fd, stat.S_IMODE(like.st_mode))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if durable:
        fsync_directory(dir_fd if dir_fd is not None else Path(name).parent)


def fsync_directory(directory: int | Name) -> None:
    """
    Make a directory's entries (files created, renamed or removed in it)
    durable; ``directory`` is an open descriptor or a path.
    """
    if isinstance(directory, int):
        os.fsync(directory)
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
