"""
A stored message read for RETR or TOP, checked against the size LIST gave.

RFC 1939 has no way to fail in the middle of a multi-line answer: once the
``+OK`` is out, the body and its final ``.`` line are all the client
expects.  A message file changed after the listing (a non-atomic writer
rewriting it in place, a ``,W=`` in its name that is wrong) would go out at
a length the client was not told: ``+OK 32 octets``, then 1,332 sent.  A
client that trusts LIST then cuts the message or desyncs, and one that
counts keeps a message other than the one it listed.  (Dovecot, which
serves sizes from its index, likewise fails a message whose size turns
out otherwise, and marks the cached size broken.)

So the body is checked, with the one rule of :mod:`popserv.core.body`:

- Before the ``+OK``: the first chunk is read and encoded.  A message
  that ends within it (most mail; B1's are 4 KB) is then known exactly.
  For a longer one, or a TOP that stops before the end, the stored file's
  size (one ``fstat`` of the opened stream) must be one a message of the
  listed size can have (:func:`~popserv.core.body.possible_wire_size`).  A
  mismatch found here is a plain ``-ERR [SYS/TEMP]`` and the session goes
  on.
- While it streams: :class:`~popserv.core.body.BodyEncoder` counts the octets it
  produces.  A chunk that would take the body past the listed size is
  not sent, nor is the end of a body that comes up short.  The protocol
  then cuts the connection: the client sees a RETR that failed (no final
  ``.``), never a complete answer of the wrong size, and as no QUIT came,
  nothing is deleted.

The cost is a length and a count per chunk the encoder already makes, and
one ``fstat`` per message longer than a chunk.

TOP sends part of a message, and no size was announced for that part: it
may not be longer than the whole message's listed size, and when it runs
to the end of the message (more lines asked for than there are), it is the
whole message and must have exactly that size.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING

from popserv.core.body import BodyEncoder, possible_wire_size
from popserv.core.errors import MessageChanged

if TYPE_CHECKING:
    # Only a type: the core never imports the stores at run time.
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
    One RETR or TOP response body, its final ``.`` line included:
    ``message`` read ``chunk_size`` octets at a time, encoded by ``encoder``,
    and checked against ``listed``, the message's size in the listing (None
    when the store's sizes are not exact: nothing is checked).

    :meth:`start` runs before the ``+OK`` and returns the chunks to send
    after it.  Both raise :class:`~popserv.core.errors.MessageChanged` on a
    mismatch, before giving out any octet that would not fit what was
    announced.
    """

    __slots__ = ("_at_end", "_chunk_size", "_encoder", "_ended", "_listed", "_message", "_read")

    #: Octets read from the message at a time.
    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    def __init__(
        self,
        message: MessageStream | None,
        encoder: BodyEncoder,
        listed: int | None,
        chunk_size: int,
    ) -> None:
        self._message = message
        self._encoder = encoder
        self._listed = listed
        self._chunk_size = chunk_size
        #: The body is complete (the end of the message, or TOP's last line).
        self._ended = False
        #: The end of the message was read: its size is known.
        self._at_end = False
        #: Stored octets read so far.
        self._read = 0

    def start(self) -> Iterator[bytes]:
        """
        Before the ``+OK``: read and encode the first chunk (a short message
        whole, and then check its size exactly); for a longer one (or a TOP
        that stops short of its end), refuse a file whose size the listed
        one cannot come from.  Return the body.
        """
        first = [self._step()]
        # A short read is not the end of every stream: read on to the end
        # or a whole chunk (the end of a small file costs one more read()).
        while not self._ended and self._read < self._chunk_size:
            first.append(self._step())
        listed = self._listed
        if not self._at_end and listed is not None:
            # Not read to its end: its file's size says whether it can be the listed one.
            left = None if self._message is None else stored_size(self._message)
            if left is not None and not possible_wire_size(self._read + left, listed):
                raise MessageChanged(f"{self._read + left} octets stored, {listed} listed")
        return self._chunks(first)

    def _chunks(self, first: list[bytes]) -> Iterator[bytes]:
        for out in first:
            if out:
                yield out
        while not self._ended:
            out = self._step()
            if out:
                yield out

    @property
    def ended(self) -> bool:
        """The body is complete: nothing more is to be read."""
        return self._ended

    @property
    def read_octets(self) -> int:
        """Stored octets read so far."""
        return self._read

    def _step(self) -> bytes:
        """Read and encode one chunk; at the end of the message, the end of the body."""
        assert self._message is not None, "a body without a stream is fed by its caller"
        return self.feed(self._message.read(self._chunk_size))

    def feed(self, data: bytes) -> bytes:
        """
        Encode ``data``, the next chunk read from the message (``b""``: its
        end), for a caller that reads it itself (a store whose reads do not
        block, see ``popserv.interfaces.IChunkSource``); the body's octets
        to send.  Raises :class:`MessageChanged` as :meth:`start` does.
        """
        encoder = self._encoder
        listed = self._listed
        if data:
            self._read += len(data)
            out = encoder.feed(data)
            if encoder.done:
                # TOP has all its lines; the rest is never read.
                out += encoder.finish()
                self._ended = True
            if listed is not None and encoder.octets > listed:
                raise MessageChanged(f"over the {listed} listed octets at {self._read} stored")
            return out
        out = encoder.finish()
        self._ended = self._at_end = True
        if listed is not None and encoder.octets != listed:
            raise MessageChanged(f"{encoder.octets} octets, {listed} listed")
        return out
