"""
Maildir file names: parsing them and making new ones (pure, no I/O).

A name is ``UNIQUE`` or ``UNIQUE:2,FLAGS``.  Writers on platforms where
``:`` cannot appear in a file name use ``!`` or ``;`` instead, so those are
accepted as the info separator too.  The unique part is conventionally
``TIME.ID.HOST``; Dovecot appends ``,S=<stored size>`` and
``,W=<wire size>`` to it, and so does :func:`make_unique`, which lets a scan
learn a message's POP3 size from its name alone.

See https://cr.yp.to/proto/maildir.html and Dovecot's "Maildir" page.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import secrets
import socket
import time

from attrs import frozen

#: RFC 1939 section 7: a unique-id is 1 to 70 characters in 0x21-0x7E.
MAX_UIDL_LENGTH = 70

_VALID_UIDL = re.compile(rf"[\x21-\x7e]{{1,{MAX_UIDL_LENGTH}}}")

#: More digits than any plausible time or size; also keeps ``int()`` cheap.
_MAX_DIGITS = 20

#: Host name characters that would break the name's structure: ``/`` and
#: ``:`` per the Maildir spec, ``,`` because it starts the size fields.
_HOST_ESCAPES = {ord("/"): "\\057", ord(":"): "\\072", ord(","): "\\054"}

_counter = itertools.count()


@frozen
class MaildirName:
    """What a Maildir file name says about its message."""

    unique: str
    flags: str = ""
    stored_size: int | None = None
    wire_size: int | None = None
    timestamp: int | None = None


def _split_info(filename: str) -> tuple[str, str | None]:
    """Split ``filename`` into its unique part and its info (``None`` if absent)."""
    # ``:`` is the standard separator and can never occur in a unique part;
    # ``!`` and ``;`` can, so they only count when ``2,`` follows.
    unique, colon, info = filename.partition(":")
    if colon:
        return unique, info
    for separator in "!;":
        at = filename.rfind(separator + "2,")
        if at >= 0:
            return filename[:at], filename[at + 1 :]
    return filename, None


def _number(text: str) -> int | None:
    if text and len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def parse_name(filename: str) -> MaildirName:
    """Parse a Maildir file name; never fails, missing parts become ``None``/``""``."""
    unique, info = _split_info(filename)
    flags = info[2:] if info is not None and info.startswith("2,") else ""
    stored = wire = None
    fields = unique.split(",")
    for extra in fields[1:]:
        if extra.startswith("S="):
            stored = _number(extra[2:])
        elif extra.startswith("W="):
            wire = _number(extra[2:])
    head, dot, _ = fields[0].partition(".")
    timestamp = _number(head) if dot else None
    return MaildirName(unique, flags, stored, wire, timestamp)


def seen(filename: str) -> bool:
    """Whether a file name (or just its info part, ``:2,FS``) carries the Seen flag."""
    return "S" in parse_name(filename).flags


def with_flag(filename: str, flag: str) -> str:
    """
    ``filename`` with ``flag`` added to its info, flags kept sorted in ASCII
    order (as the Maildir spec asks) and the writer's separator preserved.
    """
    unique, info = _split_info(filename)
    if info is None or not info.startswith("2,"):
        return f"{unique}:2,{flag}"
    flags = info[2:]
    if flag in flags:
        return filename
    separator = filename[len(unique)]
    return f"{unique}{separator}2,{''.join(sorted(flags + flag))}"


def is_valid_uidl(uid: str) -> bool:
    """True if RFC 1939 allows ``uid`` as a unique-id: 1 to 70 characters in 0x21-0x7E."""
    return _VALID_UIDL.fullmatch(uid) is not None


def uidl_for(unique: str) -> str:
    """
    The POP3 unique-id of the message whose unique name is ``unique``.

    The name itself when RFC 1939 allows it, so UIDLs match what other
    Maildir servers report; otherwise a digest of it, which is just as stable.
    """
    if _VALID_UIDL.fullmatch(unique) is not None:
        return unique
    return digest_uidl(unique)


def digest_uidl(unique: str) -> str:
    """``X`` and the SHA-1 of ``unique``: a valid, stable UIDL for any name."""
    try:
        raw = unique.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = unique.encode("utf-8", "surrogatepass")
    return "X" + hashlib.sha1(raw, usedforsecurity=False).hexdigest()


def host_part(hostname: str | None) -> str:
    """The host as it appears in names made here (``/``, ``:``, ``,`` escaped)."""
    host = socket.gethostname() if hostname is None else hostname
    return host.translate(_HOST_ESCAPES) or "localhost"


def make_unique(
    stored_size: int | None,
    wire_size: int | None,
    *,
    now: float | None = None,
    hostname: str | None = None,
) -> str:
    """
    A new unique name ``SECONDS.M<usec>P<pid>Q<n>R<random>.HOST[,S=..][,W=..]``.

    Time, process id and a per-process counter make it unique for any
    number of deliveries per second from one host; the random part covers
    pid reuse and hosts (or containers) that share a host name.  The
    microseconds have six digits, so that two names of one second sort as
    their deliveries did (messages of one second are listed by name).
    """
    if now is None:
        now = time.time()
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    name = (
        f"{seconds}.M{micro:06d}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}"
        f".{host_part(hostname)}"
    )
    if stored_size is not None:
        name += f",S={stored_size}"
    if wire_size is not None:
        name += f",W={wire_size}"
    return name
