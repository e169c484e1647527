"""
A stored message read for RETR or TOP, checked against the size LIST gave.

RFC 1939 has no way to fail in the middle of a multi-line answer: once the
``+OK`` is out, the body and its final ``.`` line are all the client
expects.  A message file changed after the listing (a non-atomic writer
rewriting it in place, a ``,W=`` in its name that is wrong) would go out at
a length the client was not told: ``+OK 32 octets``, then 1,332 sent.  A
client that trusts LIST then cuts the message or desyncs, and one that
counts keeps a message other than the one it listed.  Dovecot likewise
refuses a message whose size disagrees with its cache, and marks the
cached size broken.

So the body is checked, with the one rule of :mod:`popserv.body`:

- Before the ``+OK``: the stored file's size (one ``fstat`` of the opened
  stream) must be one a message of the listed size can have
  (:func:`~popserv.body.possible_wire_size`), and the first chunk is read
  and encoded.  A message that ends within it (most mail; B1's are 4 KB)
  is then known exactly.  A mismatch found here is a plain
  ``-ERR [SYS/TEMP]`` and the session goes on.
- While it streams: :class:`~popserv.body.BodyEncoder` counts the octets it
  produces.  A chunk that would take the body past the listed size is
  not sent, nor is the end of a body that comes up short.  The protocol
  then cuts the connection: the client sees a RETR that failed (no final
  ``.``), never a complete answer of the wrong size, and as no QUIT came,
  nothing is deleted.

The cost is a length and a count per chunk the encoder already makes, and
one ``fstat`` per message.

TOP sends part of a message, and no size was announced for that part: it
may not be longer than the whole message's listed size, and when it runs
to the end of the message (more lines asked for than there are), it is the
whole message and must have exactly that size.
"""

from __future__ import annotations

import io
import os
import stat

from popserv.body import BodyEncoder, possible_wire_size
from popserv.errors import MessageChanged
from popserv.interfaces import MessageStream


def stored_size(message: MessageStream) -> int | None:
    """
    The octets left to read in ``message`` when it is a regular file read
    through to its end (one ``fstat``); None for any other stream, whose
    read() may give something else than the file's bytes.
    """
    if not isinstance(message, (io.FileIO, io.BufferedReader)):
        return None
    try:
        status = os.fstat(message.fileno())
        position = message.tell()
    except (OSError, ValueError):
        return None
    return status.st_size - position if stat.S_ISREG(status.st_mode) else None


class MessageBody:
    """
    The chunks of one RETR or TOP response body, its final ``.`` line
    included: ``message`` read ``chunk_size`` octets at a time, encoded by
    ``encoder``, and checked against ``listed``, the message's size in the
    listing (None when the store's sizes are not exact: nothing is checked).

    Call :meth:`start` before sending the ``+OK``, then iterate.  Both raise
    :class:`~popserv.errors.MessageChanged` on a mismatch, before giving
    out any octet that would not fit what was announced.
    """

    __slots__ = ("_chunk_size", "_encoder", "_ended", "_first", "_listed", "_message", "_read")

    def __init__(
        self, message: MessageStream, encoder: BodyEncoder, listed: int | None, chunk_size: int
    ) -> None:
        self._message = message
        self._encoder = encoder
        self._listed = listed
        self._chunk_size = chunk_size
        self._first: bytes | None = None
        self._ended = False
        #: Stored octets read so far.
        self._read = 0

    def start(self) -> None:
        """
        Before the ``+OK``: refuse a file whose size the listed one cannot
        come from, and read and encode the first chunk (a short message
        whole, and then check its size exactly).
        """
        listed = self._listed
        if listed is not None:
            stored = stored_size(self._message)
            if stored is not None and not possible_wire_size(stored, listed):
                raise MessageChanged(f"{stored} octets stored cannot be {listed} listed")
        pieces = [self._step()]
        # A short read is not the end of every stream: read on to the end
        # or a whole chunk (the end of a small file costs one more read()).
        while not self._ended and self._read < self._chunk_size:
            pieces.append(self._step())
        self._first = b"".join(pieces) if len(pieces) > 1 else pieces[0]

    def __iter__(self) -> MessageBody:
        return self

    def __next__(self) -> bytes:
        first, self._first = self._first, None
        if first:
            return first
        while not self._ended:
            out = self._step()
            if out:
                return out
        raise StopIteration

    def _step(self) -> bytes:
        """Read and encode one chunk; at the end of the message, the end of the body."""
        encoder = self._encoder
        data = self._message.read(self._chunk_size)
        if data:
            self._read += len(data)
            out = encoder.feed(data)
            if encoder.done:
                # TOP has all its lines; the rest is never read.
                out += encoder.finish()
                self._ended = True
            self._check(encoder.octets, at_end=False)
            return out
        out = encoder.finish()
        self._ended = True
        self._check(encoder.octets, at_end=True)
        return out

    def _check(self, octets: int, at_end: bool) -> None:
        """Raise unless ``octets`` fit the listed size (equal it at the message's end)."""
        listed = self._listed
        if listed is None:
            return
        if octets > listed:
            raise MessageChanged(f"over {listed} listed octets after {self._read} stored")
        if at_end and octets != listed:
            raise MessageChanged(f"{octets} octets, not the {listed} listed")
