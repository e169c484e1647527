"""
The Maildir's own cache files (``popserv.index``, ``popserv.listing``,
and reading ``dovecot-uidlist``): bounded reads and atomic replacement.

Caches are never fsynced: one lost in a crash is rebuilt, and a torn one
fails its checksum.  Blocking: call these in a thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
from pathlib import Path

_tmp_counter = itertools.count()


def read_regular(path: Path, limit: int) -> bytes | None:
    """
    The whole of the regular file at ``path``; None if it is something else
    (a directory, a FIFO) or holds more than ``limit`` octets.  A symlink is
    not followed; ``OSError`` (``FileNotFoundError`` if there is none) when
    it cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
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


def replace_file(target: Path, data: bytes) -> None:
    """
    Replace ``target`` with ``data`` atomically, through a temporary file
    beside it (``NAME.PID.N.tmp``, mode 0600); ``OSError`` if that fails,
    with no temporary file left behind.
    """
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{next(_tmp_counter)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
