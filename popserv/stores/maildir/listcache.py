"""
The listing cache: a scan's whole result, kept for logins that find the
Maildir unchanged.

A warm login to a 100,000-message Maildir otherwise lists, parses and sorts
every name again.  ``MAILDIR/popserv.listing`` holds the last scan's columns
(UIDLs, sizes, delivery times, where each file is and its ``:2,`` info),
keyed by the status of ``new/``, ``cur/`` and (when UIDLs come from it)
``dovecot-uidlist``: inode, ``st_mtime_ns`` and ``st_ctime_ns``.  Any file
created, renamed or removed in a directory changes both its times, and the
ctime cannot be set back by anyone, so a directory whose key is unchanged
holds the same names.  A login then costs three ``stat`` calls and one read.

The catch is time granularity: a change in the same clock tick as the scan
that preceded it could leave the times as they were.  As Dovecot and mutt
do, a listing is only stored when every key time is more than
:data:`SETTLE_NS` older than the moment the scan began; a Maildir that just
changed is rescanned until it has been quiet that long.  Messages are never
rewritten in place (the Maildir convention :mod:`popserv.stores.maildir.index`
also relies on), so unchanged names mean unchanged messages.

The file sits in the user's Maildir, so its contents are treated like the
file names themselves (which a user can also choose): sizes and UIDLs are
taken as given, but a listing is refused whole unless every UIDL is a valid
RFC 1939 unique-id, and no file name in it holds a ``/`` or a NUL, so it
can never point a session at a file outside ``new/`` and ``cur/``.

Format: ``popserv-listing 2 <JSON header>\\n`` then the sections the header
sizes, in its order; a CRC-32 of the sections guards against torn writes.
The UIDLs (and unique names, when they differ) are one section each,
joined by NUL as :class:`~popserv.stores.maildir.columns.PackedStrings`
keeps them in memory: reading them back is one ``split``, which also gives
their lengths to check (version 1 stored an offset array beside them).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import zlib
from array import array
from typing import Any

from twisted.logger import Logger

from popserv.core.files import read_regular, replace_file
from popserv.interfaces import Listing
from popserv.stores.maildir.columns import SEPARATOR, PackedStrings, stops_of
from popserv.stores.maildir.names import MAX_UIDL_LENGTH, seen

LISTING_FILE = "popserv.listing"

_MAGIC = b"popserv-listing"
_VERSION = "2"

#: How long key times must lie before a scan's start for its result to be kept:
#: filesystem times come from a coarse clock (a jiffy to a second behind).
SETTLE_NS = 2_000_000_000

#: A listing file beyond this is not read (10 million messages of 100 bytes).
_MAX_BYTES = 1 << 30

log = Logger()

#: What the UIDL section may hold: printable ASCII and separators (the
#: lengths are checked apart).  Deleted with ``bytes.translate``, which
#: must leave nothing: 2 ms for 100,000 UIDLs, a regular expression 8.
_UIDL_BYTES = bytes(range(0x21, 0x7F)) + SEPARATOR.encode()


def stat_key(status: os.stat_result) -> list[int]:
    """The cache key of one file or directory: [inode, mtime ns, ctime ns]."""
    return [status.st_ino, status.st_mtime_ns, status.st_ctime_ns]


def settled(keys: list[Any], started_ns: int) -> bool:
    """True if every present key's times lie :data:`SETTLE_NS` before ``started_ns``."""
    limit = started_ns - SETTLE_NS
    return all(key is None or max(key[1], key[2]) < limit for key in keys)


class Cached:
    """A listing read back: the columns a scan makes."""

    __slots__ = ("infos", "listing", "places", "uidlist_listed", "uniques")

    def __init__(
        self,
        listing: Listing,
        uniques: PackedStrings | None,
        infos: list[str],
        places: bytearray,
        uidlist_listed: int,
    ) -> None:
        self.listing = listing
        self.uniques = uniques
        self.infos = infos
        self.places = places
        self.uidlist_listed = uidlist_listed


def _packed_bytes(strings: PackedStrings) -> bytes:
    return strings.parts()[0].encode("utf-8", "surrogateescape")


def encode_listing(
    keys: list[Any],
    scheme: str,
    *,
    listing: Listing,
    uniques: PackedStrings | None,
    infos: list[str],
    places: bytes | bytearray,
    uidlist_listed: int,
) -> bytes:
    """The bytes of a listing file."""
    uids = listing.uids if isinstance(listing.uids, PackedStrings) else PackedStrings(listing.uids)
    table = list(dict.fromkeys(infos))
    position = {info: i for i, info in enumerate(table)}
    sections = [_packed_bytes(uids)]
    if uniques is not None:
        sections.append(_packed_bytes(uniques))
    sections += [
        array("I", map(position.__getitem__, infos)).tobytes(),
        bytes(places),
        array("q", listing.sizes).tobytes(),
        array("d", listing.received if listing.received is not None else []).tobytes(),
    ]
    body = b"".join(sections)
    header = {
        "keys": keys,
        "scheme": scheme,
        "count": len(uids),
        "byteorder": sys.byteorder,
        "infos": table,
        "uidlist_listed": uidlist_listed,
        "sections": [len(s) for s in sections],
        "crc": zlib.crc32(body),
    }
    head = json.dumps(header, separators=(",", ":")).encode("ascii")
    return _MAGIC + b" " + _VERSION.encode() + b" " + head + b"\n" + body


def _strings(blob: bytes, count: int) -> tuple[PackedStrings, list[str]] | None:
    """The ``count`` strings of a section, and each; None if it holds another number."""
    text = blob.decode("utf-8", "surrogateescape")
    if not count:
        return (PackedStrings(), []) if not text else None
    pieces = text.split(SEPARATOR)
    if len(pieces) != count:
        return None
    return PackedStrings.from_parts(text, stops_of(pieces)), pieces


def decode_listing(data: bytes, keys: list[Any], scheme: str) -> Cached | None:
    """The listing in ``data`` if it is sound and made for ``keys`` and ``scheme``."""
    first, newline, body = data.partition(b"\n")
    parts = first.split(b" ", 2)
    if not newline or len(parts) != 3 or parts[:2] != [_MAGIC, _VERSION.encode()]:
        return None
    try:
        header = json.loads(parts[2])
        if header["keys"] != keys or header["scheme"] != scheme:
            return None
        if header["byteorder"] != sys.byteorder or zlib.crc32(body) != header["crc"]:
            return None
        count: int = header["count"]
        sizes_of: list[int] = header["sections"]
        table: list[str] = header["infos"]
        listed = int(header["uidlist_listed"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(count, int) or sum(sizes_of) != len(body) or len(sizes_of) not in (5, 6):
        return None
    if not all(isinstance(info, str) and "/" not in info and "\0" not in info for info in table):
        return None
    sections = []
    at = 0
    for size in sizes_of:
        sections.append(body[at : at + size])
        at += size
    # Every UIDL valid (RFC 1939): printable ASCII, 1 to 70 characters.
    if sections[0].translate(None, _UIDL_BYTES):
        return None
    strings = _strings(sections[0], count)
    if strings is None:
        return None
    uids, pieces = strings
    if count and (min(map(len, pieces)) < 1 or max(map(len, pieces)) > MAX_UIDL_LENGTH):
        return None
    del pieces
    rest = sections[1:]
    uniques = None
    if len(sizes_of) == 6:
        strings = _strings(rest[0], count)
        if strings is None:
            return None
        uniques, pieces = strings
        # "/" alone stands for an empty unique name; no other may hold one.
        if any("/" in u and u != "/" for u in pieces):
            return None
        rest = rest[1:]
    index_bytes, place_bytes, size_bytes, received_bytes = rest
    positions = array("I")
    sizes = array("q")
    received = array("d")
    try:
        positions.frombytes(index_bytes)
        sizes.frombytes(size_bytes)
        received.frombytes(received_bytes)
    except ValueError:
        return None
    places = bytearray(place_bytes)
    if not len(positions) == len(places) == len(sizes) == len(received) == count:
        return None
    if count and (max(positions) >= len(table) or max(places) > 1 or min(sizes) < 0):
        return None
    infos = list(map(table.__getitem__, positions))
    seen_of = [seen(info) for info in table]
    listing = Listing(
        uids=uids,
        sizes=sizes,
        received=received,
        seen=tuple(map(seen_of.__getitem__, positions)),
    )
    return Cached(listing, uniques, infos, places, listed)


def load_listing(maildir: int, keys: list[Any], scheme: str) -> Cached | None:
    """
    The cached listing of the Maildir ``maildir`` (a directory descriptor)
    if it matches ``keys``; None otherwise.  Blocking.
    """
    try:
        data = read_regular(LISTING_FILE, _MAX_BYTES, dir_fd=maildir)
    except OSError:
        return None
    if data is None:
        return None
    try:
        return decode_listing(data, keys, scheme)
    except Exception:
        # A cache must never cost a login: a decoding bug (one refused every
        # one-message listing once) is logged, and the Maildir is scanned.
        log.failure("Ignored a listing cache that could not be decoded")
        return None


def save_listing(maildir: int, data: bytes) -> None:
    """Replace the Maildir's listing file atomically; failures only cost speed."""
    with contextlib.suppress(OSError):
        replace_file(LISTING_FILE, data, dir_fd=maildir)
