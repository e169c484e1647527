"""
Which POP3 UIDL each Maildir message gets (pure, no I/O).

popserv's own UIDL is the message's unique name (see
:func:`~popserv.stores.maildir.names.uidl_for`).  A Maildir that Dovecot served
before has a ``dovecot-uidlist``, and its POP3 clients remember the UIDLs
Dovecot derived from it with its ``pop3_uidl_format``; were they to change,
every client that leaves mail on the server would download everything
again.  So by default (``dovecot``) popserv serves those same UIDLs for the
messages that file lists, and its own for mail that arrived later.

``--uidl-format`` takes:

``dovecot``
    Dovecot's default, ``%08Xu%08Xv``, when a ``dovecot-uidlist`` exists.
``maildir``
    Always popserv's own; ``dovecot-uidlist`` is not read.
a Dovecot ``pop3_uidl_format``
    ``%u`` (IMAP UID), ``%v`` (UIDVALIDITY), ``%g`` (the message GUID: the
    uidlist's ``G`` record, else the base file name), ``%f`` (the base file
    name), ``%%``; each with Dovecot's modifiers ``X`` (the number in
    lower-case hex: Dovecot 2.3 prints ``%08Xu%08Xv`` as
    ``000000016b05664e``), ``M`` (MD5, hex), ``L``/``U`` (case), a width
    (``%08Xu`` pads with zeros; ``%3g`` keeps the first 3 characters) or
    ``OFFSET.WIDTH``.  Common ones: ``%08Xu%08Xv`` (Dovecot 1.0 and later),
    ``%08Xv%08Xu`` (UW ipop3d), ``%u`` and ``%v.%u`` (Cyrus), ``%v-%u``
    (Courier), ``%Mf`` (tpop3d), ``%g``.  ``%m`` (a header MD5) is refused:
    Dovecot only computes it for mbox, so no Maildir ever had such UIDLs.

As in Dovecot, a ``P`` record in ``dovecot-uidlist`` (the UIDL Dovecot
saved with ``pop3_save_uidl``, or a migration tool wrote) wins over the
format.  Formats that use ``%u`` or ``%v`` only apply to messages the file
lists; formats of ``%g`` and ``%f`` alone apply to every message, as they
did in Dovecot.

popserv's own UIDLs never repeat one the uidlist gives out (in this session
or, for a message since deleted, in an earlier one, where a client would
take the new message for the old): an own UIDL that the format could
produce (a 16-digit hex name under ``%08Xu%08Xv``; real Maildir names have
dots), or that a ``P`` record holds, is replaced by the digest form
:func:`~popserv.stores.maildir.names.digest_uidl`.  That depends only on the name,
the format and the ``P`` records, not on which other messages exist, so it
is as stable as the UIDL itself.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from attrs import frozen

from popserv.stores.maildir.names import digest_uidl, is_valid_uidl, uidl_for
from popserv.stores.maildir.uidlist import Uidlist, UidlistRecord

#: The ``--uidl-format`` values that are not templates.
DOVECOT = "dovecot"
MAILDIR = "maildir"

#: Dovecot's ``pop3_uidl_format`` default since 1.0 (checked against 2.3.19).
DOVECOT_DEFAULT_FORMAT = "%08Xu%08Xv"

#: ``%<offset.><width><modifiers><variable>``, the order Dovecot's
#: ``var_expand`` accepts (``%U3g`` is refused, ``%3Ug`` works).
_DIRECTIVE = re.compile(r"%(?:(-?\d+)\.)?(\d*)([A-Z]*)([a-z%])")

_VARIABLES = "uvgf"
_NUMERIC = "uv"

#: What a variable can look like after the modifiers, for the collision check.
_DIGITS, _HEX, _HEX_UPPER, _ANY = r"[0-9]", r"[0-9a-f]", r"[0-9A-F]", r"."


@frozen
class _Directive:
    """One ``%`` directive of a format."""

    variable: str
    modifiers: str = ""
    offset: int | None = None
    width: int | None = None
    zero_pad: bool = False


@frozen
class UidlScheme:
    """A parsed ``--uidl-format``: how :func:`assign_uidls` names messages."""

    #: The option as given.
    text: str
    #: Literal strings and directives; empty for ``maildir``.
    pieces: tuple[str | _Directive, ...] = ()
    #: Matches every string the template can produce (a superset).
    shape: re.Pattern[str] | None = None

    @property
    def reads_uidlist(self) -> bool:
        """Whether ``dovecot-uidlist`` matters (it is not read for ``maildir``)."""
        return bool(self.pieces)

    @property
    def needs_record(self) -> bool:
        """Whether only messages the uidlist lists can be named by the template."""
        return any(isinstance(p, _Directive) and p.variable in _NUMERIC for p in self.pieces)

    @property
    def names_are_uidls(self) -> bool:
        """
        Whether, without ``dovecot-uidlist`` records, every message whose
        unique name is a valid UIDL with a ``.`` in it (as Maildir names
        are) is served that name: the template needs a record to name a
        message, and nothing it makes can have a ``.``, so no name can be
        mistaken for one of its UIDLs (see :func:`assign_uidls`).
        """
        if not self.reads_uidlist:
            return True
        return self.needs_record and all(
            "." not in p if isinstance(p, str) else _kind(p) != _ANY for p in self.pieces
        )


def _directive(match: re.Match[str]) -> _Directive:
    offset_text, width_text, modifiers, variable = match.groups()
    if variable == "m":
        raise ValueError("%m (a header MD5) is mbox-only in Dovecot; no Maildir had such UIDLs")
    if variable not in _VARIABLES:
        raise ValueError(f"unknown variable %{variable}; known: %u %v %g %f")
    for i, modifier in enumerate(modifiers):
        if modifier not in "XMLU":
            raise ValueError(f"unsupported modifier {modifier}; supported: X M L U")
        if modifier == "X" and (variable not in _NUMERIC or "M" in modifiers[:i]):
            raise ValueError("X (hex) applies only to the numbers %u and %v, before M")
    width = int(width_text) if width_text else None
    offset = int(offset_text) if offset_text is not None else None
    zero_pad = offset is None and width_text.startswith("0")
    return _Directive(variable, modifiers, offset, width or None, zero_pad)


def _kind(piece: _Directive) -> str:
    """The character class of what ``piece`` can expand to."""
    kind = _DIGITS if piece.variable in _NUMERIC else _ANY
    for modifier in piece.modifiers:
        if modifier in "XM":
            kind = _HEX
        elif modifier == "U" and kind == _HEX:
            kind = _HEX_UPPER
        elif modifier == "L" and kind == _HEX_UPPER:
            kind = _HEX
    return kind


def parse_uidl_format(text: str) -> UidlScheme:
    """Parse a ``--uidl-format`` value; ``ValueError`` says what is wrong with it."""
    if text == MAILDIR:
        return UidlScheme(text)
    template = DOVECOT_DEFAULT_FORMAT if text == DOVECOT else text
    pieces: list[str | _Directive] = []
    at = 0
    while at < len(template):
        percent = template.find("%", at)
        if percent < 0:
            pieces.append(template[at:])
            break
        if percent > at:
            pieces.append(template[at:percent])
        match = _DIRECTIVE.match(template, percent)
        if match is None:
            raise ValueError(f"incomplete %-directive at {template[percent:]!r}")
        if match.group(4) == "%":
            if match.group(0) != "%%":
                raise ValueError("%% takes no width or modifiers")
            pieces.append("%")
        else:
            pieces.append(_directive(match))
        at = match.end()
    if not any(isinstance(p, _Directive) for p in pieces):
        raise ValueError("the format must use at least one of %u %v %g %f")
    shape = "".join(_kind(p) + "*" if isinstance(p, _Directive) else re.escape(p) for p in pieces)
    return UidlScheme(text, tuple(pieces), re.compile(shape, re.DOTALL))


def _expand(piece: _Directive, value: int | str) -> str:
    """One directive's text for ``value`` (a number for %u and %v)."""
    if piece.modifiers == "X":
        text = format(value, "x")  # The common case, %08Xu, without a detour.
    else:
        text = str(value)
        for modifier in piece.modifiers:
            if modifier == "X":
                text = format(int(text), "x")
            elif modifier == "M":
                raw = text.encode("utf-8", "surrogateescape")
                text = hashlib.md5(raw, usedforsecurity=False).hexdigest()
            elif modifier == "L":
                text = text.lower()
            else:
                text = text.upper()
    if piece.offset is not None:
        start = piece.offset if piece.offset >= 0 else max(len(text) + piece.offset, 0)
        end = None if piece.width is None else start + piece.width
        return text[start:end]
    if piece.width is not None:
        return text.rjust(piece.width, "0") if piece.zero_pad else text[: piece.width]
    return text


#: A template with what is the same for every message (%v) already expanded.
_Prepared = tuple["str | _Directive", ...]


def _prepare(scheme: UidlScheme, uidlist: Uidlist | None) -> _Prepared | None:
    """
    ``scheme``'s pieces with %v expanded and literals merged, once per
    uidlist rather than per message; None if %v is used and unknown.
    """
    uidvalidity = uidlist.uidvalidity if uidlist is not None else None
    out: list[str | _Directive] = []
    for piece in scheme.pieces:
        part: str | _Directive = piece
        if isinstance(piece, _Directive) and piece.variable == "v":
            if uidvalidity is None:
                return None
            part = _expand(piece, uidvalidity)
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] += part
        else:
            out.append(part)
    return tuple(out)


def _render(pieces: _Prepared | None, unique: str, record: UidlistRecord | None) -> str | None:
    if record is not None and record.pop3_uidl is not None:
        # An empty P record stands for the base file name.
        uid = record.pop3_uidl or unique
        return uid if is_valid_uidl(uid) else None
    if pieces is None:
        return None
    out = []
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
        elif piece.variable == "u":
            if record is None:
                return None
            out.append(_expand(piece, record.uid))
        elif piece.variable == "g":
            guid = record.guid if record is not None else None
            out.append(_expand(piece, guid or unique))
        else:
            out.append(_expand(piece, unique))
    uid = "".join(out)
    return uid if is_valid_uidl(uid) else None


def render(
    scheme: UidlScheme, unique: str, record: UidlistRecord | None, uidlist: Uidlist | None
) -> str | None:
    """
    The UIDL Dovecot served for the message named ``unique`` (its base file
    name), or None when it cannot be known or is no valid RFC 1939 unique-id.
    """
    return _render(_prepare(scheme, uidlist), unique, record)


def assign_uidls(uniques: Sequence[str], scheme: UidlScheme, uidlist: Uidlist | None) -> list[str]:
    """
    The UIDL of each message, given by its unique name (the base file name),
    in the same order; every one a valid RFC 1939 unique-id, and no two equal.
    """
    if not scheme.reads_uidlist:
        return [uidl_for(unique) for unique in uniques]
    records = uidlist.records if uidlist is not None else {}
    saved = {r.pop3_uidl for r in records.values() if r.pop3_uidl}
    shape = scheme.shape
    assert shape is not None
    needs_record = scheme.needs_record
    pieces = _prepare(scheme, uidlist)
    uids: list[str] = []
    taken: set[str] = set()
    for unique in uniques:
        record = records.get(unique)
        uid = None
        if record is not None or not needs_record:
            uid = _render(pieces, unique, record)
        if uid is None:
            uid = uidl_for(unique)
            if uid in saved or shape.fullmatch(uid) is not None:
                uid = digest_uidl(unique)
        if uid in taken:
            # Only a damaged uidlist or an odd format (%3g) gets here; Dovecot
            # would serve the duplicate, RFC 1939 forbids it.
            uid = digest_uidl(unique)
            if uid in taken:
                uid = digest_uidl(f"{unique}\0{len(uids)}")
        taken.add(uid)
        uids.append(uid)
    return uids
