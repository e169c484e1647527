"""
The header fields popserv writes into messages: one function makes them all.

A value holding a CR or LF would end its field and start another:
``MAIL FROM:<"a\\rX-Injected: yes"@b.c>`` was stored as a ``Return-Path``
that mail parsers read as an ``X-Injected`` field too.  The receiver now
refuses such addresses, but :func:`header_field` is what makes every field
safe by construction (trace fields, the ``popserv deliver`` ones, the first
start's welcome message): a value with a CR, LF or NUL is a ValueError,
whatever checks came before it.  Pure: no I/O.
"""

from __future__ import annotations

import re

#: RFC 5322 section 3.6.8: a field name is printable ASCII but the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")

#: What no value may hold: CR and LF (they end the field), NUL (where C
#: readers end the string), and the other controls but TAB (RFC 5322
#: section 3.2.5: unstructured text is visible characters and white space).
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def header_field(name: str, *lines: str, eol: str = "\r\n") -> str:
    """
    One header field, ``name: `` and the first of ``lines``, each further
    line folded onto a line of its own that starts with a TAB; ended by
    ``eol``.  Raises ValueError for a bad name or a value with a CR, LF,
    NUL or other control character; the message never quotes the value.
    """
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError("not a header field name")
    if not lines:
        raise ValueError(f"no value for the {name} field")
    for line in lines:
        if _UNSAFE.search(line):
            raise ValueError(f"a control character in a value of the {name} field")
    return f"{name}: " + (eol + "\t").join(lines) + eol
