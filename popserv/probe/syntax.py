"""
The grammar ``popserv probe`` holds a server to, as pure functions: status
lines and response codes (RFC 1939, 2449, 3206), the APOP timestamp
(RFC 1939 section 7: an RFC 822 ``msg-id``), CAPA lines, UIDLs, and a
multi-line answer's data with its byte-stuffing undone.

Each ``*_problem`` function returns None for a good value, or one short
phrase saying what is wrong with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attrs import frozen

#: RFC 2449 section 4: a response's first line, CRLF included, is at most
#: 512 octets (the same limit as a command line).
MAX_STATUS_LINE = 512

#: RFC 1939 section 7: a unique-id is 1 to 70 characters from 0x21 to 0x7E.
MAX_UIDL = 70

# RFC 822 section 3.3 and 6.1: the atoms, quoted strings and domain literals
# of a msg-id ("<" addr-spec ">"), without the comments and folding white
# space RFC 822 would allow between its tokens: no POP3 server sends those.
_ATOM = r"[^\x00-\x20\x7f()<>@,;:\\\".\[\]]+"
_QUOTED = r'"(?:[^"\\\r\n]|\\[\x00-\x7f])*"'
_WORD = rf"(?:{_ATOM}|{_QUOTED})"
_DOMAIN_LITERAL = r"\[(?:[^\[\]\\\r\n]|\\[\x00-\x7f])*\]"
_SUB_DOMAIN = rf"(?:{_ATOM}|{_DOMAIN_LITERAL})"
MSG_ID = re.compile(rf"<{_WORD}(?:\.{_WORD})*@{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*>")

#: RFC 2449 section 8: resp-code = "[" resp-level *("/" resp-level) "]",
#: resp-level = 1*rchar, rchar = %x21-2E / %x30-5C / %x5E-7F.
RESP_CODE = re.compile(r"\[([\x21-\x2e\x30-\x5c\x5e-\x7f]+(?:/[\x21-\x2e\x30-\x5c\x5e-\x7f]+)*)\]")

#: RFC 2449 section 5: capa-tag = 1*cchar, cchar = %x21-2D / %x2F-7F;
#: param = 1*pchar, pchar = %x21-7F; separated by single spaces.
CAPA_LINE = re.compile(r"[\x21-\x2d\x2f-\x7f]+(?: [\x21-\x7f]+)*")


@frozen
class Reply:
    """A status line: ``+OK`` or ``-ERR``, its text, and its response code if any."""

    ok: bool
    text: str
    code: str | None
    raw: bytes

    def __str__(self) -> str:
        return self.raw.rstrip(b"\r\n").decode("utf-8", "replace")


def parse_reply(raw: bytes) -> Reply | None:
    """The :class:`Reply` of a status line as received (with its line end); None if none."""
    line = raw.rstrip(b"\r\n")
    for indicator, ok in ((b"+OK", True), (b"-ERR", False)):
        if line == indicator or line.startswith(indicator + b" "):
            text = line[len(indicator) + 1 :].decode("utf-8", "replace")
            code = RESP_CODE.match(text)
            return Reply(ok, text, code.group(1) if code else None, raw)
    return None


def status_line_problem(raw: bytes) -> str | None:
    """What is wrong with a status line as received, line end included."""
    if not raw.endswith(b"\r\n"):
        return "does not end with CRLF"
    if len(raw) > MAX_STATUS_LINE:
        return f"is {len(raw)} octets long, over {MAX_STATUS_LINE} with CRLF (RFC 2449)"
    if parse_reply(raw) is None:
        return "starts with neither +OK nor -ERR"
    if b"\r" in raw[:-2] or b"\n" in raw[:-2] or b"\0" in raw:
        return "holds a CR, LF or NUL"
    return None


def code_problem(reply: Reply) -> str | None:
    """With RESP-CODES: text that opens a bracket must be a response code (RFC 2449 8)."""
    if reply.text.startswith("[") and reply.code is None:
        return f"{reply.text.split(' ')[0]!r} is not a response code"
    return None


def apop_timestamp(greeting: Reply) -> str | None:
    """The greeting's APOP timestamp, ``<...>``, or None when it has none."""
    start = greeting.text.find("<")
    end = greeting.text.find(">", start)
    if start < 0 or end < 0:
        return None
    return greeting.text[start : end + 1]


def timestamp_problem(timestamp: str) -> str | None:
    """RFC 1939 section 7: the timestamp has the syntax of an RFC 822 msg-id."""
    if MSG_ID.fullmatch(timestamp) is None:
        if "@" not in timestamp:
            return f"{timestamp} has no @: not a msg-id <local-part@domain> (RFC 1939 7)"
        return f"{timestamp} is not a msg-id <local-part@domain> (RFC 1939 7, RFC 822 6.1)"
    return None


def capa_problem(line: bytes) -> str | None:
    """What is wrong with one line of a CAPA answer (after its byte-stuffing is undone)."""
    if len(line) + 2 > MAX_STATUS_LINE:
        return f"a line of {len(line) + 2} octets, over {MAX_STATUS_LINE}"
    if CAPA_LINE.fullmatch(line.decode("latin-1")) is None:
        return f"{line.decode('utf-8', 'replace')!r} is not a capability (RFC 2449 5)"
    return None


#: RFC 2449 6.5 and 6.7: the capabilities whose argument is a policy: a
#: number of seconds or days (EXPIRE: or NEVER), then USER before login when
#: it varies per user.
_POLICIES = {"LOGIN-DELAY": re.compile(r"\d+"), "EXPIRE": re.compile(r"\d+|NEVER")}


def capa_problems(lines: Sequence[bytes]) -> list[str]:
    """What is wrong with a CAPA answer: its lines, and the arguments of LOGIN-DELAY and EXPIRE."""
    problems = [p for p in map(capa_problem, lines) if p is not None]
    for tag, params in capabilities(lines).items():
        value = _POLICIES.get(tag)
        if value is None:
            continue
        if (
            not params
            or value.fullmatch(params[0].upper()) is None
            or params[1:]
            not in (
                [],
                ["USER"],
            )
        ):
            problems.append(f"{tag} {' '.join(params)}: not {tag} {value.pattern} [USER]")
    return problems


def per_user_after_login(lines: Sequence[bytes]) -> list[str]:
    """The LOGIN-DELAY and EXPIRE lines that still say USER after login (RFC 2449 6.5, 6.7)."""
    return [
        f"{tag} {' '.join(params)}"
        for tag, params in capabilities(lines).items()
        if tag in _POLICIES and params[1:] == ["USER"]
    ]


def capabilities(lines: Sequence[bytes]) -> dict[str, list[str]]:
    """A CAPA answer's lines as tag (upper case) to its parameters."""
    found: dict[str, list[str]] = {}
    for line in lines:
        words = line.decode("utf-8", "replace").split()
        if words:
            found[words[0].upper()] = words[1:]
    return found


def uidl_problem(uid: bytes) -> str | None:
    """RFC 1939 section 7: 1 to 70 characters in the range 0x21 to 0x7E."""
    if not 1 <= len(uid) <= MAX_UIDL:
        return f"is {len(uid)} characters long (RFC 1939: 1 to {MAX_UIDL})"
    if any(not 0x21 <= octet <= 0x7E for octet in uid):
        return "has a character outside 0x21-0x7E (RFC 1939 7)"
    return None


def unstuffed(lines: Sequence[bytes]) -> bytes:
    """
    A multi-line answer's data (its lines, without the terminating ``.``)
    as the client stores it: each line's stuffed dot removed, every line
    ended with CRLF.  Its length is what LIST must say (RFC 1939 11).
    """
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def unstuffed_dots(lines: Sequence[bytes]) -> tuple[int, int]:
    """
    How many data lines began with a stuffed dot (``..``), and how many
    with a single dot that was not stuffed (which a client would misread).
    """
    stuffed = sum(1 for line in lines if line.startswith(b".."))
    bare = sum(1 for line in lines if line.startswith(b".") and not line.startswith(b".."))
    return stuffed, bare


def scan_listing(line: bytes) -> tuple[int, int] | None:
    """``n size`` from a LIST line or a single-line ``+OK n size``; None if malformed."""
    match = re.fullmatch(rb"(\d{1,10}) (\d{1,15})(?: .*)?", line)
    return (int(match.group(1)), int(match.group(2))) if match else None


def unique_id_listing(line: bytes) -> tuple[int, bytes] | None:
    """``n uid`` from a UIDL line or a single-line ``+OK n uid``; None if malformed."""
    match = re.fullmatch(rb"(\d{1,10}) (\S+)", line)
    return (int(match.group(1)), match.group(2)) if match else None


__all__ = [
    "CAPA_LINE",
    "MAX_STATUS_LINE",
    "MAX_UIDL",
    "MSG_ID",
    "RESP_CODE",
    "Reply",
    "apop_timestamp",
    "capa_problem",
    "capa_problems",
    "capabilities",
    "per_user_after_login",
    "code_problem",
    "parse_reply",
    "scan_listing",
    "status_line_problem",
    "timestamp_problem",
    "uidl_problem",
    "unique_id_listing",
    "unstuffed",
    "unstuffed_dots",
]
