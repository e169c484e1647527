"""
Delivery into a Maildir: the one routine every way mail arrives goes through.

The Maildir protocol makes delivery atomic without locks: write the message
under ``tmp/``, make it durable, then link it into ``new/`` under its final
name, where readers see it whole or not at all.

Messages are stored with LF line ends, as other Maildir software expects,
and their final names carry ``,S=`` (stored octets) and ``,W=`` (POP3 wire
octets) so a later scan knows the sizes without reading the files.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from attrs import define

from popserv.core.body import WireSizeCounter
from popserv.core.files import fsync_directory
from popserv.stores.maildir import maildirsize
from popserv.stores.maildir.directory import MaildirPath, open_subdirectory
from popserv.stores.maildir.names import host_part, make_unique

#: Read and write in pieces this big, so large messages stream through.
CHUNK_SIZE = 64 * 1024

#: The Maildir spec's age for abandoned files in ``tmp/``.
STALE_TMP_SECONDS = 36 * 3600

#: ``link`` failures that mean "this file system cannot hard-link".
_NO_LINKS = frozenset(
    e
    for e in (
        getattr(errno, "EPERM", None),
        getattr(errno, "EOPNOTSUPP", None),
        getattr(errno, "ENOTSUP", None),
        getattr(errno, "ENOSYS", None),
    )
    if e is not None
)


#: What a message can be handed over as: all of it, a binary stream read in
#: chunks, or an iterable of chunks (what an SMTP receiver collects).
Source = bytes | BinaryIO | Iterable[bytes]


def chunks_of(source: Source) -> Iterator[bytes]:
    """``source`` in chunks of up to :data:`CHUNK_SIZE` octets (a stream from where it is)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for start in range(0, len(view), CHUNK_SIZE):
            yield bytes(view[start : start + CHUNK_SIZE])
        return
    read = getattr(source, "read", None)
    if read is not None:
        while chunk := read(CHUNK_SIZE):
            yield chunk
        return
    for chunk in source:
        if chunk:
            yield chunk


#: A CRLF line end whose CR is not itself preceded by a CR.  ``x\r\r\n`` is
#: the line ``x\r`` (ending in a lone CR); stored as ``x\r\n`` it would read
#: back as ``x``, so such line ends are stored unchanged.
_PLAIN_CRLF = re.compile(rb"(?<!\r)\r\n")


def lf_chunks(source: Source) -> Iterator[bytes]:
    """
    ``source`` in chunks with CRLF line ends turned into LF, as a message
    is stored.  Reading it back gives exactly the lines of ``source``,
    lone CRs included.
    """
    carry = b""
    for chunk in chunks_of(source):
        data = carry + chunk if carry else chunk
        # Trailing CRs may begin a CRLF split across chunks; two are kept
        # back so the one before the LF can see whether a CR precedes it.
        kept = len(data) - len(data.rstrip(b"\r"))
        kept = min(kept, 2)
        if kept:
            data, carry = data[:-kept], data[-kept:]
        else:
            carry = b""
        data = _PLAIN_CRLF.sub(b"\n", data)
        if data:
            yield data
    if carry:
        yield carry


def _write_lf(fd: int, source: Source) -> tuple[int, int]:
    """Write :func:`lf_chunks` of ``source`` to ``fd``; return the (stored, wire) sizes."""
    counter = WireSizeCounter()
    stored = 0
    with open(fd, "wb", closefd=False) as out:
        for data in lf_chunks(source):
            out.write(data)
            counter.feed(data)
            stored += len(data)
    return stored, counter.result()


def _publish(tmp: int, new: int, tmp_name: str, final_name: str) -> bool:
    """Put the tmp file at ``new/final_name``; True if it is still in ``tmp/`` (linked)."""
    try:
        os.link(tmp_name, final_name, src_dir_fd=tmp, dst_dir_fd=new, follow_symlinks=False)
        return True
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
    # No hard links here: rename, which would silently replace an existing
    # file, so check first (names are unique, this only guards against bugs).
    try:
        os.stat(final_name, dir_fd=new, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(tmp_name, final_name, src_dir_fd=tmp, dst_dir_fd=new)
        return False
    raise FileExistsError(errno.EEXIST, "delivery target exists")


def _unlink_quietly(name: str, directory: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=directory)


@define
class PendingDelivery:
    """
    A message written and synced under ``tmp/``, not yet visible.

    :meth:`publish` makes it appear in ``new/``; :meth:`discard` removes it.
    Several recipients' copies can be prepared first and published only
    when all were written, so a disk error delivers to none of them.  The
    Maildir and its ``tmp/`` stay open (as descriptors) from the write until
    then, so the message can always be taken back, whatever the Maildir's
    path meanwhile became; either call closes them.
    """

    maildir: MaildirPath
    tmp_name: str
    stored_size: int
    wire_size: int
    _top: int | None = None
    _tmp: int | None = None
    _done: bool = False

    @property
    def final_name(self) -> str:
        return f"{self.tmp_name},S={self.stored_size},W={self.wire_size}"

    def publish(self) -> str:
        """Link the message into ``new/`` and sync it; return its name there."""
        if self._done:
            raise RuntimeError("delivery already published or discarded")
        self._done = True
        try:
            assert self._top is not None and self._tmp is not None
            new = open_subdirectory(self._top, "new", within=self.maildir)
            try:
                name = self._publish_in(self._tmp, new)
            finally:
                os.close(new)
            # Counted where the quota is kept, if it is (best effort).
            maildirsize.append(self._top, self.stored_size, 1)
            return name
        except BaseException:
            self._remove_tmp()
            raise
        finally:
            self._close()

    def _publish_in(self, tmp: int, new: int) -> str:
        final_name = self.final_name
        linked = _publish(tmp, new, self.tmp_name, final_name)
        try:
            # Until new/ is synced the message could vanish in a crash; fail
            # loudly (so the sender retries) rather than acknowledge it.
            fsync_directory(new)
        except BaseException:
            _unlink_quietly(final_name, new)
            raise
        if linked:
            # Delivered whatever happens here; clean_tmp removes a leftover later.
            _unlink_quietly(self.tmp_name, tmp)
        return final_name

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            _unlink_quietly(self.tmp_name, self._tmp)

    def _close(self) -> None:
        for fd in (self._top, self._tmp):
            if fd is not None:
                os.close(fd)
        self._top = self._tmp = None

    def withdraw(self) -> None:
        """
        Take a just-published message back out of ``new/`` (best effort),
        when the other copies of an all-or-nothing delivery failed.
        """
        with contextlib.suppress(OSError), self.maildir.opened("new") as (top, new):
            _unlink_quietly(self.final_name, new)
            fsync_directory(new)
            maildirsize.append(top, -self.stored_size, -1)

    def discard(self) -> None:
        """Remove the unpublished message; later calls do nothing."""
        if not self._done:
            self._done = True
            self._remove_tmp()
        self._close()


def prepare(
    maildir: MaildirPath | Path,
    source: Source,
    *,
    header: bytes = b"",
    hostname: str | None = None,
) -> PendingDelivery:
    """
    Write ``header`` then ``source`` under ``maildir/tmp`` (the Maildir is
    created if missing) and fsync it.  Blocking: call it in a thread.

    On any failure the ``tmp/`` file is removed and the error is raised.
    """
    maildir = MaildirPath.of(maildir)
    tmp_name = make_unique(None, None, hostname=hostname)
    top = maildir.open(create=True)
    try:
        tmp = open_subdirectory(top, "tmp", within=maildir)
    except BaseException:
        os.close(top)
        raise
    try:
        fd = os.open(
            tmp_name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=tmp,
        )
        try:
            try:
                stored, wire = _write_lf(fd, itertools.chain((header,), chunks_of(source)))
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(tmp_name, tmp)
            raise
    except BaseException:
        os.close(tmp)
        os.close(top)
        raise
    return PendingDelivery(maildir, tmp_name, stored, wire, top, tmp)


def deliver(
    maildir: MaildirPath | Path,
    source: Source,
    *,
    header: bytes = b"",
    hostname: str | None = None,
) -> str:
    """
    Store one message in ``maildir`` (created if missing); return its file name in ``new/``.

    Blocking: call it in a thread.  ``header`` (trace fields) is stored
    before the message.  On any failure nothing appears in ``new/``, the
    ``tmp/`` file is removed and the error is raised.
    """
    return prepare(maildir, source, header=header, hostname=hostname).publish()


def write_named(
    tmp: int,
    target: int,
    unique: str,
    name: str,
    chunks: Iterable[bytes],
    *,
    mtime: float | None = None,
) -> int:
    """
    Store ``chunks`` as they are (already with LF line ends) as the file
    ``name`` in the directory ``target`` (``new/`` or ``cur/``), written
    and synced as ``tmp/unique`` first, its mtime set to ``mtime``; return
    its octets.  For a message that keeps a name it already had elsewhere
    (``popserv migrate``), where :func:`deliver` makes a new one.

    ``FileExistsError`` if ``name`` is there; a ``tmp/`` file of that name
    (left by an interrupted run) is replaced.  The caller syncs ``target``
    once for many files, and keeps ``maildirsize``.  Blocking.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(unique, flags, 0o600, dir_fd=tmp)
    except FileExistsError:
        os.unlink(unique, dir_fd=tmp)
        fd = os.open(unique, flags, 0o600, dir_fd=tmp)
    try:
        try:
            octets = 0
            with open(fd, "wb", closefd=False) as out:
                for chunk in chunks:
                    out.write(chunk)
                    octets += len(chunk)
            os.fsync(fd)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        if _publish(tmp, target, unique, name):
            _unlink_quietly(unique, tmp)
    except BaseException:
        _unlink_quietly(unique, tmp)
        raise
    return octets


#: The ``tmp/`` names :func:`make_unique` gives: the writer's pid and host.
_OUR_TMP_NAME = re.compile(r"\d+\.M\d+P(?P<pid>\d{1,10})Q\d+R[0-9a-f]+\.(?P<host>.+)")


def _writer_is_dead(name: str, hostname: str) -> bool:
    """True if ``name`` was made by a process of this host that no longer runs."""
    match = _OUR_TMP_NAME.fullmatch(name)
    if match is None or match["host"] != hostname:
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, and someone else's
    return False


def clean_tmp(maildir: MaildirPath | Path, older_than: float = STALE_TMP_SECONDS) -> int:
    """
    Remove the deliveries that died halfway from ``maildir/tmp``: files
    untouched for ``older_than`` seconds, and at once those a popserv process
    of this host wrote and then died without finishing (a crash, kill -9).

    Return how many were removed.
    """
    limit = time.time() - older_than
    try:
        with MaildirPath.of(maildir).opened("tmp") as (_, tmp):
            return _remove_unfinished(tmp, limit, host_part(None))
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _remove_unfinished(tmp: int, limit: float, hostname: str) -> int:
    """:func:`clean_tmp` in the directory ``tmp``."""
    removed = 0
    with os.scandir(tmp) as entries:
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                if max(st.st_mtime, st.st_atime) < limit or _writer_is_dead(entry.name, hostname):
                    os.unlink(entry.name, dir_fd=tmp)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
