"""
The POP3 wire rules the load client checks servers against (pure, no I/O).

Written independently of ``popserv.core.body`` on purpose: the benchmark must not
trust the code it measures.  The rules are RFC 1939's: a multi-line response
is CRLF-terminated lines, a line starting with ``.`` gets one more ``.``
(byte-stuffing), and a line holding only ``.`` ends it.  Sizes in STAT and
LIST count the message's octets on the wire before stuffing, with CRLF line
ends and without the terminating line.
"""

from __future__ import annotations

from attrs import frozen

CRLF = b"\r\n"
TERMINATOR = b"\r\n.\r\n"
#: A line starting with a dot: the client removes that dot (RFC 1939 section 3),
#: so a server that forgot to stuff one sends one octet fewer than it listed.
_STUFFED = b"\r\n."
#: Bytes kept between chunks so no pattern (at most 5 bytes) is split unseen.
_CARRY = 4
#: Octets of each body checked for lines ending in a bare LF.
BARE_LF_CHECKED = 1024 * 1024


class DesyncError(Exception):
    """A server sent something that breaks the POP3 framing or its own LIST."""


def wire_size(stored: bytes) -> int:
    """
    The octets ``stored`` takes in a RETR response, before byte-stuffing:
    every line ends in CRLF (a CR right before an LF belongs to the line
    end), and a last line without a line end gets one.
    """
    if not stored:
        return 0
    size = len(stored) + stored.count(b"\n") - stored.count(CRLF)
    if not stored.endswith(b"\n"):
        size += 2
    return size


def encode_body(stored: bytes) -> bytes:
    """The multi-line response body for ``stored``, terminator included."""
    if not stored:
        return b".\r\n"
    lines = stored.replace(CRLF, b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = [b"." + line if line.startswith(b".") else line for line in lines]
    return CRLF.join(out) + CRLF + b".\r\n"


@frozen
class Body:
    """What a multi-line response held, as the client counted it."""

    #: Octets before stuffing, with CRLF line ends, without the terminator.
    octets: int
    #: Lines, the terminating ``.`` not included; -1 when not counted.
    lines: int
    #: The unstuffed body, when the reader was asked to keep it.
    data: bytes | None = None


class BodyReader:
    """
    Reads one multi-line response body from chunks of any size.

    :meth:`feed` returns None until the terminating line arrived, then the
    bytes after it (the start of the next response).  The client must be
    faster than the servers it loads, so the work is done on whole chunks by
    ``bytes.find`` and ``bytes.count`` (C speed), about one pass per
    pattern: lines starting with ``.`` are found one by one (they are few,
    and the terminator is one of them), and line ends are counted when asked
    (``lines``, for LIST and UIDL) or while checking them.

    A chunk is processed up to a cut a few bytes before its end, never
    between a CR and its LF; the bytes after the cut are carried into the
    next chunk, so no pattern is missed or counted twice across chunks.

    Lines ending in a bare LF are looked for in the first
    :data:`BARE_LF_CHECKED` octets of each body (counting CRLFs as well
    halves the client's speed on 10 MB messages); the octet count, which
    any wrong line end would also upset, is always exact.
    """

    __slots__ = ("_carry", "_checked", "_checked_lf", "_crlf", "_keep", "_kept", "_lf")
    __slots__ += ("_lines", "_octets", "_stuffed")

    def __init__(self, keep: bool = False, lines: bool = True) -> None:
        # A virtual CRLF in front makes a first line that starts with "." and
        # an empty body (".\r\n" at once) follow the same rules as later lines.
        self._carry = CRLF
        self._octets = -2
        self._lf = -1
        self._checked = 0
        self._checked_lf = 0
        self._crlf = 0
        self._stuffed = 0
        self._keep = keep
        self._kept: list[bytes] = []
        #: Count every line (LIST, UIDL), not only those checked for bare LFs.
        self._lines = lines

    def feed(self, chunk: bytes) -> bytes | None:
        data = self._carry + chunk if self._carry else chunk
        # Whatever starts before ``limit`` fits in ``data`` whole.
        limit = cut = len(data) - _CARRY
        if cut > 0 and data[cut - 1] == 13:  # keep a CR with the LF that may follow
            cut -= 1
        find = data.find
        at = find(_STUFFED)
        while 0 <= at < limit:
            if data.startswith(CRLF, at + 3):
                # The terminator; the last line's CRLF is part of the body.
                self._region(data, at + 2)
                self._carry = b""
                return data[at + len(TERMINATOR) :]
            if at >= cut:
                break  # counted with the next chunk, where it is carried
            self._stuffed += 1
            at = find(_STUFFED, at + 3)
        if cut <= 0:
            self._carry = data
            return None
        self._region(data, cut)
        self._carry = data[cut:]
        return None

    def _region(self, data: bytes, cut: int) -> None:
        """Count ``data[:cut]``, whose dot lines were counted already."""
        self._octets += cut
        checking = self._checked < BARE_LF_CHECKED
        if checking or self._lines:
            lf = data.count(b"\n", 0, cut)
            self._lf += lf
            if checking:
                self._checked += cut
                self._checked_lf += lf
                self._crlf += data.count(CRLF, 0, cut)
        if self._keep:
            self._kept.append(data[:cut])

    def result(self) -> Body:
        """The counted body; raise :class:`DesyncError` if a line ended in a bare LF."""
        if self._carry:
            raise DesyncError("body not terminated")
        bare = self._checked_lf - self._crlf
        if bare:
            raise DesyncError(f"{bare} lines end in a bare LF")
        data = None
        if self._keep:
            data = b"".join(self._kept).replace(_STUFFED, CRLF)[2:]
        lines = self._lf if self._lines or self._checked < BARE_LF_CHECKED else -1
        return Body(self._octets - self._stuffed, lines, data)


def read_body(response: bytes, keep: bool = False) -> tuple[Body, bytes]:
    """A whole multi-line body at the start of ``response``, and what follows it."""
    reader = BodyReader(keep)
    rest = reader.feed(response)
    if rest is None:
        raise DesyncError("body not terminated")
    return reader.result(), rest


def check_retr(number: int, listed: int, body: Body) -> None:
    """Raise :class:`DesyncError` unless RETR ``number`` sent the octets LIST promised."""
    if body.octets != listed:
        raise DesyncError(f"RETR {number}: {body.octets} octets received, LIST said {listed}")


def parse_listing(data: bytes) -> dict[int, bytes]:
    """A LIST or UIDL body (unstuffed, CRLF lines) as ``{number: second field}``."""
    out: dict[int, bytes] = {}
    for line in data.split(CRLF):
        if not line:
            continue
        number, _, value = line.partition(b" ")
        out[int(number)] = value
    return out


def parse_sizes(data: bytes) -> dict[int, int]:
    """A LIST body as ``{number: octets}``."""
    return {n: int(v) for n, v in parse_listing(data).items()}


def status_ok(line: bytes) -> bool:
    """True for a ``+OK`` status line."""
    return line.startswith(b"+OK")
