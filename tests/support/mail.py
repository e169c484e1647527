"""Shared test fixtures: mail."""

from __future__ import annotations

import re

_MBOX_SEPARATOR = re.compile(rb"(?:\A|\n)From [^\n]*\n")
_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)


def unix(message: bytes) -> bytes:
    """``message`` as a client stores it: LF line ends, ending in a newline."""
    message = message.replace(b"\r\n", b"\n")
    return message if message.endswith(b"\n") else message + b"\n"


def mbox_messages(data: bytes) -> list[bytes]:
    """
    Split an mbox(rd) file: every message starts with a ``From`` line and is
    followed by one blank line; body ``From`` lines are quoted with ``>``.
    """
    assert data.startswith(b"From "), data[:100]
    assert data.endswith(b"\n\n"), data[-100:]
    chunks = _MBOX_SEPARATOR.split(data[:-1])
    assert chunks[0] == b"", chunks[0]
    return [_QUOTED_FROM.sub(rb"\1", chunk) for chunk in chunks[1:]]
