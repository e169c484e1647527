"""
The Maildir index: what a scan learnt by reading files, kept for the next one.

A message whose file name lacks ``,W=`` must be read whole to learn its
POP3 size, and one whose name has no delivery time needs a ``stat``; on a
100,000-message Maildir filled by an MTA that writes plain names (Postfix's
``local`` and ``virtual`` do) that is every message at every login.  The
index, ``MAILDIR/popserv.index``, keeps the wire size and delivery time of
those messages, so a later login costs one directory listing.

Entries are keyed by the message's unique name, the file name without its
``:2,FLAGS`` info, so a file moved from ``new/`` to ``cur/`` or given flags
still hits.  That is sound because a delivered Maildir message is never
rewritten in place (the Maildir convention; editing a message means storing
a new file), and is what Dovecot's own ``dovecot-uidlist`` relies on too.
Checking each file's size as well would need a ``stat`` per message, the
very cost the index exists to avoid.

The index is a cache and never outranks the directory listing: entries for
files that are gone are ignored (and dropped at the next write), files
without an entry are measured, and a file that fails its checksum or does
not parse is ignored whole and rebuilt.  It is written to a temporary file
and renamed into place, so readers see the old index or the new one; it
sits in the Maildir's root, where no scan looks for messages.

Format: the line ``popserv-index 1 <entries> <CRC-32 of the rest, hex>``,
then one line per message, ``<wire size> <delivery time> <unique name>``;
UTF-8, with undecodable bytes of file names kept as ``os.fsencode`` does.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
import zlib
from collections.abc import Mapping

from popserv.core.files import read_regular, replace_file

#: The index file, in the Maildir's root next to ``popserv.lock``.
INDEX_FILE = "popserv.index"

_MAGIC = "popserv-index"
#: Bump it whenever what a wire size means changes (popserv.core.body's
#: WireSizeCounter): old indexes are then ignored and rebuilt, not trusted.
_VERSION = "1"

#: Generous bytes per entry for a sane index: a 255-byte name plus numbers.
#: A file far larger than the Maildir could need is not read.
_MAX_ENTRY_BYTES = 320
_MAX_HEADER_BYTES = 64

#: A temporary index file this old was left by a writer that died.
STALE_TMP_SECONDS = 3600

#: Errors that mean "this user may not write here": then there is no index.
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

#: (wire size, delivery time) of one message.
Entry = tuple[int, float]


def storable(unique: str) -> bool:
    """Whether an entry for ``unique`` can be stored (not empty, no line end)."""
    return bool(unique) and "\n" not in unique


def encode_index(entries: Mapping[str, Entry]) -> bytes:
    """
    The bytes of an index holding ``entries``; names that are not
    :func:`storable` are left out (those files are measured each time).
    """
    lines = []
    for unique, (size, received) in entries.items():
        if not storable(unique):
            continue
        lines.append(f"{size} {received!r} {unique}\n")
    body = "".join(lines).encode("utf-8", "surrogateescape")
    header = f"{_MAGIC} {_VERSION} {len(lines)} {zlib.crc32(body):08x}\n"
    return header.encode("ascii") + body


def decode_index(data: bytes) -> dict[str, Entry] | None:
    """The entries of an index file's bytes, or None if it is not a sound one."""
    head, newline, body = data.partition(b"\n")
    fields = head.split(b" ")
    if not newline or len(fields) != 4 or fields[:2] != [_MAGIC.encode(), _VERSION.encode()]:
        return None
    try:
        count = int(fields[2])
        checksum = int(fields[3], 16)
    except ValueError:
        return None
    if zlib.crc32(body) != checksum:
        return None
    lines = body.decode("utf-8", "surrogateescape").split("\n")
    if lines.pop() != "" or len(lines) != count:
        return None
    entries: dict[str, Entry] = {}
    try:
        for line in lines:
            size_text, received_text, unique = line.split(" ", 2)
            size = int(size_text)
            received = float(received_text)
            if size < 0 or not math.isfinite(received) or not unique:
                return None
            entries[unique] = (size, received)
    except ValueError:
        return None
    return entries


def load_index(maildir: int, messages: int) -> dict[str, Entry] | None:
    """
    Read the index of the Maildir whose directory descriptor is ``maildir``:
    its entries, none if there is no index, or None if there is one but it
    is unusable (and should be rewritten).

    ``messages`` (how many the scan found) bounds the size worth reading.
    Blocking: call it in a thread.
    """
    try:
        data = read_regular(
            INDEX_FILE, _MAX_HEADER_BYTES + _MAX_ENTRY_BYTES * messages, dir_fd=maildir
        )
    except FileNotFoundError:
        return {}
    except OSError:
        return None
    return decode_index(data) if data is not None else None


def save_index(maildir: int, entries: Mapping[str, Entry]) -> bool:
    """
    Replace the index of the Maildir ``maildir`` (a directory descriptor)
    atomically; with no entries, remove it.

    Return False when this user may not write there (then there is simply
    no index); raise ``OSError`` on other failures, leaving no temporary
    file behind.  Blocking: call it in a thread.
    """
    if not entries:
        try:
            os.unlink(INDEX_FILE, dir_fd=maildir)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno in _NOT_WRITABLE:
                return False
            raise
        return True
    try:
        replace_file(INDEX_FILE, encode_index(entries), dir_fd=maildir)
    except OSError as e:
        if e.errno in _NOT_WRITABLE:
            return False
        raise
    _remove_stale_tmp(maildir)
    return True


def _remove_stale_tmp(maildir: int) -> None:
    """Remove temporary index files a crashed writer left (none is that old otherwise)."""
    limit = time.time() - STALE_TMP_SECONDS
    prefix = INDEX_FILE + "."
    with contextlib.suppress(OSError), os.scandir(maildir) as entries:
        for entry in entries:
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(".tmp")):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < limit:
                    os.unlink(name, dir_fd=maildir)
