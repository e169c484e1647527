"""
The Maildir's own cache files (``popserv.index``, ``popserv.listing``,
and reading ``dovecot-uidlist``): bounded reads and atomic replacement.

Caches are never fsynced: one lost in a crash is rebuilt, and a torn one
fails its checksum.  Each file is named relative to the Maildir's directory
descriptor (see :mod:`popserv.maildir.directory`).  Blocking: call these in
a thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat

_tmp_counter = itertools.count()


def read_regular(name: str, limit: int, *, dir_fd: int) -> bytes | None:
    """
    The whole of the regular file ``name`` in the directory ``dir_fd``; None if it is something else
    (a directory, a FIFO) or holds more than ``limit`` octets.  A symlink is
    not followed; ``OSError`` (``FileNotFoundError`` if there is none) when
    it cannot be opened or read.
    """
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size > limit:
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


def replace_file(name: str, data: bytes, *, dir_fd: int) -> None:
    """
    Replace the file ``name`` in the directory ``dir_fd`` with ``data``
    atomically, through a temporary file beside it (``NAME.PID.N.tmp``,
    mode 0600); ``OSError`` if that fails, with no temporary file left behind.
    """
    tmp = f"{name}.{os.getpid()}.{next(_tmp_counter)}.tmp"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
