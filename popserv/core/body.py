"""
Encoding a stored message as a POP3 multi-line response body (pure, no I/O).

The one rule, shared by the encoder and the size counter so that LIST never
disagrees with RETR: the stored bytes are split into lines at LF; a CR
right before that LF belongs to the line end; every line goes out followed
by CRLF, including a last line that had no line end at all.  Lone CRs
inside a line pass through unchanged.  Lines starting with ``.`` get one
more ``.`` in front (byte-stuffing, RFC 1939 section 3).

Sizes (STAT, LIST) are counted before byte-stuffing, as RFC 1939 asks.
The encoder counts the same octets in what it produces
(:attr:`BodyEncoder.octets`), so RETR can check, as it sends, that the
stored message still has the size LIST announced.

Both work incrementally on chunks of any size, with C-speed ``bytes``
operations on whole chunks rather than a Python loop per line.
"""

from __future__ import annotations

import re
from collections.abc import Callable

CRLF = b"\r\n"
TERMINATOR = b".\r\n"


#: A line that starts with ``.`` (after the first line of a chunk).  The
#: regular expression engine finds ``\n.`` about 3x faster than
#: ``bytes.replace`` does: CPython's two-byte search skips by the last byte
#: and a filter that ``n`` (frequent in text) collides with, so it crawls.
_DOT_LINE = re.compile(rb"\n\.")


def _stuff_and_crlf(data: bytes, at_line_start: bool = True) -> tuple[bytes, int]:
    """
    Byte-stuff ``data`` and give it CRLF line ends; return that and how
    many stuffing dots it holds (not part of the message's size).  ``data`` holds no CR
    right before its end (a CRLF split across chunks is the caller's), and
    its first byte starts a line if ``at_line_start``; a partial last line
    is fine (it has no LF, so the conversion leaves it alone).  Stuffing
    goes first, on the shorter LF text: every LF of the input is one line
    end of the output, so it stuffs the same lines.
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    # subn() returns its argument itself when nothing matches: no copy.
    data, stuffed = _DOT_LINE.subn(b"\n..", data)
    if at_line_start and data[:1] == b".":
        data = b"." + data
        stuffed += 1
    return data.replace(b"\n", b"\r\n"), stuffed


class WireSizeCounter:
    """Counts the octets a message takes on the wire (CRLF line ends, unstuffed)."""

    __slots__ = ("_empty", "_last", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._last = b""
        self._empty = True

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        lf = chunk.count(b"\n")
        crlf = chunk.count(b"\r\n")
        # A CRLF split across two chunks.
        if self._last == b"\r" and chunk[:1] == b"\n":
            crlf += 1
        self._size += len(chunk) + lf - crlf
        self._last = chunk[-1:]
        self._empty = False

    def result(self) -> int:
        """The total; a message whose last line has no line end gets one."""
        if not self._empty and self._last != b"\n":
            return self._size + 2
        return self._size


def wire_size(data: bytes) -> int:
    """The wire size of a whole message held in memory."""
    counter = WireSizeCounter()
    counter.feed(data)
    return counter.result()


def possible_wire_size(stored: int, wire: int) -> bool:
    """
    Whether a message stored in ``stored`` octets can be ``wire`` octets on
    the wire, without reading it: every stored octet is sent, a LF gains a
    CR, and a last line without a line end gains both, so a non-empty
    message takes between ``stored`` and ``2 * stored + 1`` octets (a LF
    then one more octet), and an empty one none.
    """
    if stored == 0:
        return wire == 0
    return stored <= wire <= 2 * stored + 1


class BodyEncoder:
    """
    Turns stored message bytes, fed in chunks, into the stuffed, CRLF body of
    a RETR or TOP response, and its final ``.`` line.

    With ``body_lines`` set (TOP), only the header, the blank line after it
    and that many body lines are produced; :attr:`done` turns true once they
    are, so the caller can stop reading.

    :attr:`octets` counts what it produced as LIST sizes it: CRLF line ends
    included, stuffing dots and the final ``.`` line left out.  For a whole
    message it equals :func:`wire_size` of the bytes fed.
    """

    __slots__ = ("_at_line_start", "_carry", "_in_header", "_limit", "done", "octets")

    def __init__(self, body_lines: int | None = None) -> None:
        self._carry = b""
        self._limit = body_lines
        self._in_header = True
        self._at_line_start = True
        self.done = False
        self.octets = 0

    def feed(self, chunk: bytes) -> bytes:
        """Encode what can be encoded of ``chunk``; keep a partial last line (TOP)."""
        if self.done:
            return b""
        if self._limit is None:
            return self._feed_all(chunk)
        data = self._carry + chunk if self._carry else chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            self._carry = data
            return b""
        self._carry = data[cut:]
        return self._encode_lines(data[:cut])

    def _feed_all(self, chunk: bytes) -> bytes:
        """
        RETR: encode the whole chunk, partial last line included, so that
        no byte is copied to join a carried line to the next chunk.  Only a
        CR at the very end is held back, as it may start a CRLF.
        """
        data = self._carry + chunk if self._carry else chunk
        if data[-1:] == b"\r":
            self._carry = b"\r"
            data = data[:-1]
        else:
            self._carry = b""
        if not data:
            return b""
        out, stuffed = _stuff_and_crlf(data, self._at_line_start)
        self.octets += len(out) - stuffed
        self._at_line_start = data[-1:] == b"\n"
        return out

    def finish(self) -> bytes:
        """Encode the rest (a last line without line end) and the terminator."""
        if self._limit is None and not self.done:
            # A held CR is a lone one; a partial last line gets its line end.
            out = self._carry
            if out or not self._at_line_start:
                out += CRLF
            self.octets += len(out)
            self._carry = b""
            self.done = True
            return out + TERMINATOR
        out = b""
        if not self.done and self._carry:
            # One partial line (no LF in it): a CR at its end is a lone CR.
            line = self._carry
            out = (b"." if line[:1] == b"." else b"") + line + CRLF
            self.octets += len(line) + 2
        self._carry = b""
        self.done = True
        return out + TERMINATOR

    def _encode_lines(self, lines: bytes) -> bytes:
        """Encode complete lines, which start at the start of a line."""
        if self._limit is not None:
            lines = self._limit_lines(lines)
        out, stuffed = _stuff_and_crlf(lines)
        self.octets += len(out) - stuffed
        return out

    def _limit_lines(self, lines: bytes) -> bytes:
        """Cut complete lines down to the header plus the allowed body lines."""
        start = 0
        if self._in_header:
            end = _header_end(lines)
            if end < 0:
                return lines
            self._in_header = False
            start = end
        remaining = self._limit
        assert remaining is not None
        pos = start
        while remaining > 0:
            nl = lines.find(b"\n", pos)
            if nl < 0:
                break
            pos = nl + 1
            remaining -= 1
        self._limit = remaining
        if remaining == 0:
            self.done = True
            self._carry = b""
            return lines[:pos]
        return lines


def _header_end(lines: bytes) -> int:
    """
    Offset just past the blank line that ends the header, or -1.

    ``lines`` starts at a line start and holds complete lines; a blank line is
    ``\\n`` or ``\\r\\n`` on its own.
    """
    if lines.startswith(b"\n"):
        return 1
    if lines.startswith(b"\r\n"):
        return 2
    candidates = [i for i in (lines.find(b"\n\n"), lines.find(b"\n\r\n")) if i >= 0]
    if not candidates:
        return -1
    first = min(candidates)
    return first + (2 if lines[first + 1 : first + 2] == b"\n" else 3)


#: The line that ends a multi-line body, with the line end before it.
_END_OF_BODY = b"\r\n.\r\n"


def _held_back(text: bytes) -> int:
    """How many trailing octets of ``text`` could begin :data:`_END_OF_BODY`."""
    for size in (4, 3, 2, 1):
        if text.endswith(_END_OF_BODY[:size]):
            return size
    return 0


class BodyDecoder:
    """
    Reads a dot-stuffed multi-line body (SMTP/LMTP DATA) fed in chunks of
    any size, up to the line that is a lone ``.``.

    Hands the unstuffed body, CRLF line ends as sent, to ``sink`` piece by
    piece as it arrives (the SMTP receiver's spool file), so nothing of it
    stays here; without a sink it is kept in :attr:`chunks`.  Past ``limit``
    octets it keeps reading to the end but passes on nothing more (and
    drops :attr:`chunks`) and sets :attr:`overflow`, so the answer can come
    after the whole message, as SMTP requires.  Only a CRLF ``.`` CRLF ends the body: a
    bare LF never does, so no message can be smuggled inside another.

    Work is linear in the input: at most four octets (a possible start of
    the end line) are held between chunks, however long a line is.
    """

    __slots__ = ("_lead", "_sink", "_tail", "chunks", "done", "limit", "overflow", "size")

    def __init__(
        self, limit: int | None = None, sink: Callable[[bytes], object] | None = None
    ) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self._sink = self.chunks.append if sink is None else sink
        self.size = 0
        self.overflow = False
        self.done = False
        # The body starts a line: a CRLF is put before it, and taken out of
        # the output again (_lead), so a first line "." or ".x" needs no
        # special case.
        self._tail = CRLF
        self._lead = 2

    def feed(self, data: bytes) -> bytes | None:
        """
        Take more of the body.  Return None while it goes on; at its end,
        the bytes that followed the terminating line (the next commands).
        """
        if self.done:
            raise ValueError("the body has ended")
        text = self._tail + data
        # Only the new octets (and the held ones before them) can hold the end.
        end = text.find(_END_OF_BODY)
        if end >= 0:
            self._take(text[: end + 2])
            self.done = True
            self._tail = b""
            return text[end + 5 :]
        keep = _held_back(text)
        if keep < len(text):
            self._take(text[: len(text) - keep])
            self._tail = text[len(text) - keep :]
        else:
            self._tail = text
        return None

    def _take(self, text: bytes) -> None:
        body = text.replace(b"\r\n.", CRLF) if b"\r\n." in text else text
        if self._lead:
            body, self._lead = body[self._lead :], 0
        self.size += len(body)
        if self.overflow:
            return
        if self.limit is not None and self.size > self.limit:
            self.overflow = True
            self.chunks.clear()
        elif body:
            self._sink(body)
