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
from pathlib import Path

_tmp_counter = itertools.count()

#: Read size for cache files.
_READ_CHUNK = 1 << 20


def read_capped(fd: int, limit: int) -> bytes | None:
    """All of ``fd`` from where it is, or None if it holds more than ``limit`` octets."""
    data = bytearray()
    while chunk := os.read(fd, _READ_CHUNK):
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


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
