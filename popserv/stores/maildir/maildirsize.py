"""
A Maildir's usage kept in Maildir++'s ``maildirsize`` file, so that a
quota check reads a small file instead of listing the whole Maildir.

With a quota set, every RCPT used to list ``new/`` and ``cur/``: 0.25 s on
a 100,000-message Maildir, so five unauthenticated SMTP connections could
keep two cores busy.  ``maildirsize`` is the convention Courier, Dovecot's
``quota = maildir`` and ``maildirmake`` share:

- the first line is the quota, ``<bytes>S,<messages>C`` (either may be left out);
- every other line is ``<bytes> <messages>``, a change (negative for removals);
  the usage is their sum, and writers append one line in one ``write``.

The file is rebuilt from a listing (and replaced atomically) when it is
missing, when it states another quota, when it has grown past
:data:`REBUILD_BYTES`, or when it says the Maildir is full and is older
than :data:`STALE_SECONDS`: other programs that add or remove mail without
appending (an IMAP server, a mail client) make it drift, and those rules
bound the drift as the other servers do.  Blocking: call these in a thread.
"""

from __future__ import annotations

import contextlib
import os
import threading

from popserv.core.files import open_regular, replace_file
from popserv.stores.maildir.directory import MaildirPath, refuse_shared

#: The file, in the Maildir's root.
MAILDIRSIZE_FILE = "maildirsize"

#: Maildir++: past this size the file is rebuilt rather than read.
REBUILD_BYTES = 5120

#: Maildir++: a file saying "full" that is older than this is rebuilt.
STALE_SECONDS = 15 * 60

#: What a line of changes may hold: two integers and a space.
_MAX_LINE = 64


def quota_line(limit_bytes: int | None, limit_messages: int | None) -> str:
    """The first line for these limits (``1048576S,100C``); empty for none."""
    parts = []
    if limit_bytes is not None:
        parts.append(f"{limit_bytes}S")
    if limit_messages is not None:
        parts.append(f"{limit_messages}C")
    return ",".join(parts)


def parse(data: bytes) -> tuple[str, int, int] | None:
    """
    The quota line and the summed usage (octets, messages) of a
    ``maildirsize`` file; None if it cannot be read as one (then it is rebuilt).
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\n"):
        return None  # cut short: a writer died in the middle of a line
    first, *lines = text[:-1].split("\n")
    total = count = 0
    for line in lines:
        fields = line.split()
        if len(fields) != 2 or len(line) > _MAX_LINE:
            return None
        try:
            total += int(fields[0])
            count += int(fields[1])
        except ValueError:
            return None
    return first.strip(), total, count


def read_usage(maildir: int, quota: str) -> tuple[int, int, float] | None:
    """
    The usage ``maildirsize`` states in the Maildir ``maildir`` (a
    descriptor), octets and messages, and when it was last changed, if it
    is usable for the quota line ``quota``; None when it must be rebuilt.
    """
    try:
        fd, status = open_regular(MAILDIRSIZE_FILE, dir_fd=maildir)
    except OSError:
        return None
    try:
        if status.st_size >= REBUILD_BYTES:
            return None
        data = os.read(fd, REBUILD_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    modified = status.st_mtime
    parsed = parse(data)
    if parsed is None or parsed[0] != quota:
        return None
    _, total, count = parsed
    if total < 0 or count < 0:
        return None
    return total, count, modified


def exists(maildir: int) -> bool:
    """Whether the Maildir ``maildir`` (a descriptor) keeps a ``maildirsize``."""
    try:
        os.stat(MAILDIRSIZE_FILE, dir_fd=maildir, follow_symlinks=False)
    except OSError:
        return False
    return True


def write(maildir: int, quota: str, total: int, count: int) -> None:
    """Replace ``maildirsize`` with a fresh one; a failure only costs a later rebuild."""
    with contextlib.suppress(OSError):
        replace_file(MAILDIRSIZE_FILE, f"{quota}\n{total} {count}\n".encode(), dir_fd=maildir)


_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def lock_for(location: MaildirPath) -> threading.RLock:
    """
    The lock of one Maildir in this process, by its path: deliveries (a
    quota check, then the message stored), rebuilds of ``maildirsize`` and
    QUIT's deletions take it, so none of them lands between another's
    listing and its write.  Other processes may still drift the count,
    which the rebuild rules bound, as Maildir++ intends.
    """
    with _locks_guard:
        return _locks.setdefault(str(location.path), threading.RLock())


def append(maildir: int, octets: int, messages: int) -> None:
    """
    Append a change to the ``maildirsize`` of the Maildir ``maildir`` (a
    descriptor), if it has one (a Maildir without a quota has none, and
    gets none).  Best effort: a change that is lost is found again at the
    next rebuild.
    """
    line = f"{octets} {messages}\n".encode()
    with contextlib.suppress(OSError):
        fd = os.open(
            MAILDIRSIZE_FILE,
            os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            dir_fd=maildir,
        )
        refuse_shared(fd, MAILDIRSIZE_FILE)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


__all__ = [
    "MAILDIRSIZE_FILE",
    "REBUILD_BYTES",
    "STALE_SECONDS",
    "append",
    "exists",
    "lock_for",
    "parse",
    "quota_line",
    "read_usage",
    "write",
]
