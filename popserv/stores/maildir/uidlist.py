"""
Dovecot's ``dovecot-uidlist``: which IMAP UID each Maildir file has (pure, no I/O).

popserv only reads the file, to keep serving the POP3 UIDLs Dovecot served
from it.  The format (Dovecot's ``maildir-uidlist.c`` describes it):

Version 3, Dovecot 1.1 and later::

    3 V<uidvalidity> N<next uid> G<mailbox guid>
    <uid> [<key><value> ...] :<base file name>

where each key is one letter A-Z and values hold no spaces.  The record
keys popserv uses are ``P`` (the POP3 UIDL to serve instead of the format;
empty means the base file name), ``G`` (the message GUID, by default the
base file name) and ``O`` (POP3 order: lower first, messages without one
after those with one).  ``S`` and ``W`` hold sizes.

Version 1, Dovecot 1.0 (and Courier's ``courierimapuiddb``)::

    1 <uidvalidity> <next uid>
    <uid> <base file name>

The base file name is the name up to the ``:`` before the flags, so it
stays the same when a message moves from ``new/`` to ``cur/`` or its flags
change.  A damaged file must never keep anyone from logging in: lines that
do not parse, whose UID is not larger than the one before (Dovecot writes
them ascending) or whose file name appeared before are skipped, and so is a
last line with no line end (a truncated file may have cut its name short,
and a shorter name could be another message's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from attrs import frozen

#: The file's name in the Maildir's root.
UIDLIST_FILE = "dovecot-uidlist"

#: UIDs and UIDVALIDITY are 32-bit, non-zero (RFC 3501 section 2.3.1.1).
_MAX_UID = 2**32 - 1

#: Record keys holding sizes, which popserv does not use.
_SIZE_KEYS = ("S", "W")

#: Longer numbers cannot be valid and would only cost time in ``int()``.
_MAX_DIGITS = 10


class UidlistRecord(NamedTuple):
    """What ``dovecot-uidlist`` says about one message (a tuple: there may be 100,000)."""

    uid: int
    pop3_uidl: str | None = None
    guid: str | None = None
    pop3_order: int | None = None


@frozen
class Uidlist:
    """A parsed ``dovecot-uidlist``: the header and the records by base file name."""

    version: int
    uidvalidity: int | None
    next_uid: int | None
    records: Mapping[str, UidlistRecord]
    #: Lines skipped as damaged (for a log line; never which ones).
    skipped: int = 0


def _number(text: str) -> int | None:
    """A 32-bit unsigned decimal, or None."""
    if 0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit():
        value = int(text)
        if value <= _MAX_UID:
            return value
    return None


def _header(line: str) -> tuple[int, int | None, int | None] | None:
    """(version, uidvalidity, next uid) from the first line, or None if unusable."""
    fields = line.split(" ")
    if fields[0] == "1":
        if len(fields) != 3:
            return None
        return 1, _number(fields[1]), _number(fields[2])
    if fields[0] == "3":
        found: dict[str, str] = {}
        for field in fields[1:]:
            if field:
                found.setdefault(field[0], field[1:])
        return 3, _number(found.get("V", "")), _number(found.get("N", ""))
    return None


def _record_v3(line: str) -> tuple[str, UidlistRecord] | None:
    head, colon, name = line.partition(" :")
    if not colon or not name:
        return None
    fields = head.split(" ")
    uid = _number(fields[0])
    if uid is None:
        return None
    if len(fields) == 1 or (len(fields) == 2 and fields[1][:1] in _SIZE_KEYS):
        return name, UidlistRecord(uid)  # The common case: at most a size.
    pop3_uidl = guid = None
    order = None
    for field in fields[1:]:
        if not field:
            continue
        key, value = field[0], field[1:]
        if not ("A" <= key <= "Z"):
            return None
        if key == "P":
            pop3_uidl = value
        elif key == "G":
            guid = value or None
        elif key == "O":
            order = _number(value)
    return name, UidlistRecord(uid, pop3_uidl, guid, order)


def _record_v1(line: str) -> tuple[str, UidlistRecord] | None:
    uid_text, space, name = line.partition(" ")
    uid = _number(uid_text)
    if not space or not name or uid is None:
        return None
    return name, UidlistRecord(uid)


def parse_uidlist(data: bytes) -> Uidlist | None:
    """
    Parse the bytes of a ``dovecot-uidlist``; None if the header is not one.

    File names are decoded as ``os.fsdecode`` does on Linux (UTF-8, other
    bytes as surrogates), so they compare equal to the names ``os.scandir``
    returns.
    """
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    # The last piece is "" after a final line end, else a truncated line.
    complete = lines[:-1]
    if not complete:
        return None
    header = _header(complete[0])
    if header is None:
        return None
    version, uidvalidity, next_uid = header
    parse = _record_v3 if version == 3 else _record_v1
    records: dict[str, UidlistRecord] = {}
    skipped = 1 if lines[-1] else 0
    last_uid = 0
    for line in complete[1:]:
        parsed = parse(line)
        if parsed is None or parsed[1].uid <= last_uid or parsed[0] in records:
            skipped += 1
            continue
        name, record = parsed
        records[name] = record
        last_uid = record.uid
    return Uidlist(version, uidvalidity, next_uid, records, skipped)
