"""
The SMTP and LMTP wire grammar the receiver speaks, pure: the verbs, command
lines, MAIL and RCPT arguments, envelope addresses, reply lines, and the
counts that end a session which only errs or stalls.

No Twisted and no I/O here, so every rule can be tested on plain bytes.  The
Twisted adapter (:mod:`popserv.server.receiving.protocol`) splits the input
into lines, hands each to :func:`split_command`, and answers with what these
functions return or the :class:`Reply` a :class:`Refused` carries.

The address grammar is the one ``twisted.mail.smtp`` (``SMTP.mail_re``,
``SMTP.rcpt_re`` and ``Address``) applied before it moved here, kept
token for token so that the same paths are taken and refused; a test
compares the two on generated input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from attrs import define, frozen

#: RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets; a
#: little slack for the ESMTP parameters clients add.
MAX_COMMAND_LINE = 2048

#: The verbs an SMTP session answers.  The adapter maps each to its handler
#: through a table, so that client input never names a method.
SMTP_VERBS: tuple[bytes, ...] = (
    b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET",
    b"NOOP", b"VRFY", b"EXPN", b"HELP", b"QUIT", b"STARTTLS",
)  # fmt: skip

#: RFC 2033 section 4.1: LMTP greets with LHLO.  HELO and EHLO stay in the
#: table only to be refused with a hint.
LMTP_VERBS: tuple[bytes, ...] = (*SMTP_VERBS, b"LHLO")

#: Commands that move no mail.  Past :attr:`CommandCounters.max_junk` of
#: them (unknown commands count too) without a message taken, the session
#: is closed.  Postfix counts NOOP, VRFY, ETRN and RSET; a client can stall
#: as well with HELP or by greeting again and again.
JUNK_COMMANDS = frozenset((b"NOOP", b"RSET", b"VRFY", b"EXPN", b"HELP", b"HELO", b"EHLO", b"LHLO"))

#: The refusal of a connection over the limits.
TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"

#: The server is stopping (RFC 5321 section 3.8: a 421 before closing; RFC
#: 3463 4.3.2: not accepting messages): the client keeps its mail and retries.
SHUTTING_DOWN = b"421 4.3.2 Service shutting down\r\n"

#: RFC 6531 section 3.7.4.1: without SMTPUTF8, UTF-8 addresses are refused so.
NON_ASCII = "5.6.7 Non-ASCII addresses are not supported"


@frozen
class Reply:
    """One fixed reply: its code and its text (enhanced status code first)."""

    code: int
    text: str

    def line(self) -> bytes:
        """The reply on the wire."""
        return reply_line(self.code, self.text)


#: RFC 1869 section 6: ESMTP parameters only after EHLO.
PARAMETERS_NEED_EHLO = Reply(555, "5.5.4 Parameters need EHLO")
#: RFC 5321 section 4.1.1.11: a parameter this server did not offer.
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4 Unsupported parameter")
#: RFC 1870 section 6.1: the declared SIZE is over the fixed maximum.
SIZE_EXCEEDED = Reply(552, "5.3.4 Message size exceeds fixed maximum message size")


class Refused(Exception):
    """A command's arguments were refused; :attr:`reply` is the answer to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.code)
        self.reply = reply


def reply_line(code: int, text: str) -> bytes:
    """One reply line: ``code text`` and CRLF, in UTF-8 (nothing unencodable fails)."""
    return f"{code} {text}\r\n".encode("utf-8", "replace")


def reply_lines(code: int, message: bytes) -> list[bytes]:
    """
    The lines of a reply, without line ends (RFC 5321 section 4.2.1): each
    line of ``message`` after the code and ``-``, the last after the code
    and a space.  An empty message is the code alone.
    """
    lines = message.splitlines() or [b""]
    prefix = b"%03d" % code
    return [prefix + b"-" + line for line in lines[:-1]] + [prefix + b" " + lines[-1]]


def extension_lines(extensions: Mapping[bytes, Sequence[bytes] | None]) -> list[bytes]:
    """
    The EHLO keywords (RFC 5321 section 4.1.1.1), each with its parameters.
    None is a keyword without parameters; an empty list leaves it out.
    """
    return [
        keyword if parameters is None else keyword + b" " + b" ".join(parameters)
        for keyword, parameters in extensions.items()
        if parameters is None or parameters
    ]


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """
    The verb of a command line, in capitals, and its argument, both without
    surrounding white space.  An empty verb is a syntax error for the caller.
    """
    verb, _, rest = line.strip().partition(b" ")
    return verb.upper(), rest.strip()


# The address grammar, as twisted.mail.smtp has it (see the module docstring).

#: RFC 5321 section 4.1.2 atext.
_ATOM = rb"[-A-Za-z0-9!\#$%&'*+/=?^_`{|}~]"

#: A run of quoted strings, backslash-escaped characters, atom characters
#: and ``@.,:``: an address, or a source route and an address.
_QSTRING = rb'("[^"]*"|\\.|' + _ATOM + rb"|[@.,:])+"

_MAIL = re.compile(
    rb"""\s*FROM:\s*(?P<path><> # the null path
                      |<""" + _QSTRING + rb"""> # <address>
                      |""" + _QSTRING + rb""" # address
                      )\s*(\s(?P<opts>.*))? # ESMTP parameters
                      $""",
    re.I | re.X,
)  # fmt: skip

_RCPT = re.compile(
    rb"""\s*TO:\s*(?P<path><""" + _QSTRING + rb"""> # <address>
                      |""" + _QSTRING + rb""" # address
                      )\s*(\s(?P<opts>.*))? # ESMTP parameters
                      $""",
    re.I | re.X,
)  # fmt: skip

#: An address's tokens: runs of quoted strings, escaped characters and atom
#: characters, or any one other character.
_TOKEN = re.compile(
    rb"""( # a run of
           (?:"[^"]*" # quoted strings
           |\\. # backslash-escaped characters
           |""" + _ATOM + rb""" # atom characters
           )+|.) # or any one character""",
    re.X,
)  # fmt: skip

_ATOM_CHARACTER = re.compile(_ATOM)


def _arguments(pattern: re.Pattern[bytes], rest: bytes) -> tuple[bytes, bytes] | None:
    match = pattern.match(rest)
    if match is None:
        return None
    return match["path"], match["opts"] or b""


def parse_mail(rest: bytes) -> tuple[bytes, bytes] | None:
    """
    ``FROM:<path> parameters`` (RFC 5321 section 4.1.1.2) split into the
    path and the parameters (``b""`` if none); None if it is not that.
    """
    return _arguments(_MAIL, rest)


def parse_rcpt(rest: bytes) -> tuple[bytes, bytes] | None:
    """
    ``TO:<path> parameters`` (RFC 5321 section 4.1.1.3) split into the path
    and the parameters (``b""`` if none); None if it is not that.  The null
    path ``<>`` is no recipient.
    """
    return _arguments(_RCPT, rest)


def parse_path(path: bytes) -> str | None:
    """
    The address in a MAIL or RCPT path: ``local@domain``, the bare local
    part if there is no domain, ``""`` for the null path ``<>``; None if it
    is malformed or not ASCII.  A source route (``<@a,@b:user@c>``) is
    dropped, as RFC 5321 section 4.1.1.3 lets a server do.  Quotes and
    backslashes are kept as sent.
    """
    if not path.isascii():
        return None
    tokens = [t for t in _TOKEN.split(path) if t]
    local: list[bytes] = []
    domain: list[bytes] = []
    while tokens:
        token = tokens[0]
        if token == b"<":
            if tokens[-1] != b">":
                return None
            tokens = tokens[1:-1]
        elif token == b"@":
            tokens = tokens[1:]
            if not local:
                # A source route: everything up to its colon goes.
                while tokens and tokens[0] != b":":
                    tokens = tokens[1:]
                if not tokens:
                    return None
                tokens = tokens[1:]
            elif domain:
                return None
            else:
                domain = [b""]
        elif len(token) == 1 and not _ATOM_CHARACTER.match(token) and token != b".":
            return None
        else:
            (domain if domain else local).append(token)
            tokens = tokens[1:]
    address = b"".join(local).decode("ascii")
    host = b"".join(domain).decode("ascii")
    return f"{address}@{host}" if host else address


def mail_size(parameters: bytes, *, extended: bool, max_size: int) -> int:
    """
    The SIZE declared in MAIL's ``parameters`` (0 if none), checked against
    ``max_size``.  Only SIZE (RFC 1870) and BODY=7BIT or 8BITMIME (RFC
    6152) are offered, and only after EHLO (``extended``); anything else is
    :class:`Refused`.  The last SIZE given counts.
    """
    declared = 0
    for parameter in parameters.split():
        key, _, value = parameter.partition(b"=")
        key = key.upper()
        if not extended:
            raise Refused(PARAMETERS_NEED_EHLO)
        # 20 digits: a number Python reads at once, and more than any disk.
        if key == b"SIZE" and value.isdigit() and len(value) <= 20:
            declared = int(value)
        elif key == b"BODY" and value.upper() in (b"7BIT", b"8BITMIME"):
            pass
        else:
            raise Refused(UNSUPPORTED_PARAMETER)
    if declared > max_size:
        raise Refused(SIZE_EXCEEDED)
    return declared


def ehlo_extensions(max_size: int, *, starttls: bool) -> dict[bytes, list[bytes] | None]:
    """The EHLO (and LHLO) keywords this receiver offers, with their parameters."""
    extensions: dict[bytes, list[bytes] | None] = {
        b"PIPELINING": None,
        b"SIZE": [str(max_size).encode()],
        b"8BITMIME": None,
        b"ENHANCEDSTATUSCODES": None,
    }
    if starttls:
        extensions[b"STARTTLS"] = None
    return extensions


def address_literal(host: str | None) -> str:
    """
    A client as Received fields and greetings show it (RFC 5321 section
    4.1.3 address literals); ``local`` for a client with no IP address.
    """
    if not host:
        return "local"
    return f"[IPv6:{host}]" if ":" in host else f"[{host}]"


def trace_helo(helo: bytes | None) -> str:
    """
    The name a client greeted with, fit for a Received field: visible ASCII
    only, at most 100 characters, ``unknown`` if nothing is left.
    """
    name = (helo or b"").decode("ascii", "replace")
    return "".join(c for c in name if "!" <= c <= "~")[:100] or "unknown"


@define
class CommandCounters:
    """
    The counts that end a session which only errs or only stalls: refusals
    (``5xx`` replies) against :attr:`max_errors`, and commands that move no
    mail (:data:`JUNK_COMMANDS` and unknown ones) against :attr:`max_junk`,
    counted afresh once a message is taken.  A ``trusted`` client (the MTA
    over LMTP) errs without it counting.
    """

    max_errors: int
    max_junk: int
    trusted: bool = False
    errors: int = 0
    junk: int = 0

    def replied(self, code: int) -> None:
        """
        Count one reply sent.  Temporary refusals, like 452 for too many
        recipients, are not errors (they count as commands without mail).
        """
        if code >= 500 and not self.trusted:
            self.errors += 1

    def too_many_errors(self) -> bool:
        """True once the session has erred :attr:`max_errors` times."""
        return self.errors >= self.max_errors

    def junk_command(self) -> bool:
        """Count one command that moves no mail; True past the limit."""
        self.junk += 1
        return self.junk > self.max_junk

    def message_taken(self) -> None:
        """A message was taken: the client is doing real work."""
        self.junk = 0
