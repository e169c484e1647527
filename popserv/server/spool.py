"""
The message of one SMTP or LMTP transaction, spooled to disk as it arrives.

DATA used to be collected in memory until its end, so twenty unfinished
24 MB transfers held half a gigabyte.  Now the receiver writes the body into
an unlinked temporary file as it reads it, holding at most
:data:`SPOOL_BUFFER` octets in memory, and delivery reads the file back
from its start, in the thread pool, once per Maildir.

The file is made with ``O_TMPFILE`` where the OS has it (Linux), so it
never has a name, not even after a crash; elsewhere it is unlinked as soon
as it is made.  Mode 0600 either way.  Its directory should be on a disk,
not a tmpfs: the point is to keep messages out of memory.

Writes happen on the reactor thread, as RETR's reads do: one ``write`` of
about 64 KiB into the page cache at a time, never an fsync.  The spool
needs no durability (it dies with the session); delivery fsyncs the
Maildir copy, in a thread.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

#: Body octets held in memory before they are written out: one write per
#: 64 KiB, the size TCP reads and RETR's chunks come in, so a slow client's
#: small pieces do not cost a system call each.
SPOOL_BUFFER = 64 * 1024


class Spool:
    """
    One transaction's message: an unlinked temporary file written through a
    small buffer.  A write error (a full disk) is kept in :attr:`error` and
    raised by :meth:`finish`; the file goes at once and what follows is
    dropped, so the receiver can read the message to its end and then answer.
    """

    __slots__ = ("_buffer", "_file", "error", "size")

    def __init__(self, file: BinaryIO) -> None:
        self._file: BinaryIO | None = file
        self._buffer = bytearray()
        self.error: OSError | None = None
        #: Octets given to :meth:`write`, written or buffered.
        self.size = 0

    @classmethod
    def open(cls, directory: Path | None = None) -> Spool:
        """
        A new, empty spool in ``directory``, which is made (mode 0700) if
        missing; None means the system's temporary directory.
        """
        try:
            return cls(_unnamed_file(directory))
        except FileNotFoundError:
            if directory is None:
                raise
        directory.mkdir(mode=0o700, exist_ok=True)
        return cls(_unnamed_file(directory))

    def write(self, data: bytes) -> None:
        """Add ``data`` to the message; it reaches the file once 64 KiB are waiting."""
        if self._file is None:
            return
        self.size += len(data)
        if len(data) >= SPOOL_BUFFER:
            self._flush()
            self._write(data)
            return
        self._buffer += data
        if len(self._buffer) >= SPOOL_BUFFER:
            self._flush()

    def finish(self) -> BinaryIO:
        """Write out what is buffered; return the file, to be read from its start."""
        self._flush()
        if self.error is not None:
            raise self.error
        if self._file is None:
            raise ValueError("the spool is closed")
        return self._file

    def close(self) -> None:
        """Drop the message: the file goes, and its disk space with it.  Idempotent."""
        file, self._file = self._file, None
        self._buffer = bytearray()
        if file is not None:
            file.close()

    def _flush(self) -> None:
        if self._buffer:
            buffer, self._buffer = self._buffer, bytearray()
            self._write(buffer)

    def _write(self, data: bytes | bytearray) -> None:
        if self._file is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._file.fileno(), view) :]
        except OSError as e:
            self.error = e
            self.close()  # nothing more will be written: free the disk now


def _unnamed_file(directory: Path | None) -> BinaryIO:
    """An unbuffered read-write file with no name in ``directory``, mode 0600."""
    # The Spool owns it and closes it on every path: no context manager.
    return tempfile.TemporaryFile(dir=directory, buffering=0)
