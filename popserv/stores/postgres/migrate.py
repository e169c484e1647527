"""
``popserv migrate``: one user's Maildir copied into the PostgreSQL store,
or the store's maildrop back into a Maildir (blocking; one connection of
its own, see :func:`popserv.logins.database.connect`).

What a POP3 client remembers must not change, or every client that leaves
mail on the server downloads it all again: each message keeps its UIDL
(the one the Maildir store serves with the same ``--uidl-format``, so
Dovecot's carry over), its place in the listing, its delivery time (for
EXPIRE) and whether it was retrieved (``seen``).

Copies, never moves: the source is left exactly as it was.  A message the
target already serves (by UIDL) is not copied again, so a run that was
interrupted anywhere is resumed by running it again, and running it twice
copies nothing twice.  While a user is copied no session may change either
side: the maildrop's lease in the database is taken as a session takes it
(without counting as a login) and the Maildir's lock as a session takes it;
:class:`~popserv.core.errors.MailboxInUse` if a session holds either.

A message that cannot be read is reported (``note``), counted as failed
and skipped; the others go on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from attrs import define, frozen

from popserv.core.files import fsync_directory, open_regular, read_regular
from popserv.stores.maildir import maildirsize
from popserv.stores.maildir.deliver import CHUNK_SIZE, lf_chunks, write_named
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.lock import lock_out_sessions
from popserv.stores.maildir.locktable import LockTable
from popserv.stores.maildir.names import make_unique, parse_name
from popserv.stores.maildir.places import CUR, NEW, SUBDIRS, Places, chasing, list_messages
from popserv.stores.maildir.scan import scan
from popserv.stores.maildir.uidlist import UIDLIST_FILE, Uidlist, parse_uidlist
from popserv.stores.maildir.uidls import UidlScheme, assign_uidls
from popserv.stores.postgres import queries
from popserv.stores.postgres.mailbox import LEASE_SECONDS, node_name

#: What a lease taken by a migration shows as its client (``popserv db status``).
CLIENT = "popserv migrate"

#: Dovecot's lock on ``dovecot-uidlist``: a file created with O_EXCL, written
#: with the new list and renamed over it (as Dovecot's ``maildir-uidlist.c``
#: does), so Dovecot and a migration never write the list at once.
UIDLIST_LOCK = UIDLIST_FILE + ".lock"

#: The largest ``dovecot-uidlist`` read: about a million messages' lines.
MAX_UIDLIST_BYTES = 64 * 1024 * 1024

#: A Dovecot UID is 32 bits (RFC 3501 section 2.3.1.1).
_MAX_UID = 2**32 - 1


@frozen
class Batch:
    """
    How much is copied per transaction (into PostgreSQL) or per directory
    sync (into a Maildir).  An interrupted run redoes at most one batch.

    Into PostgreSQL a batch holds the maildrop's row until it commits (that
    is what keeps sessions out while it runs, see :func:`to_postgresql`), and
    a delivery to the user waits for it, within the server's 10 s statement
    timeout: 32 MiB should take a second or two even over a network.  Each
    commit waits for a WAL flush (with the default ``synchronous_commit``),
    about a disk's sync time; 500 small messages share one rather than
    each paying its own.  (Not measured here: the test database runs
    without fsync.)
    """

    messages: int = 500
    octets: int = 32 * 1024 * 1024


@define
class Tally:
    """What happened to one user's messages."""

    copied: int = 0
    already: int = 0
    failed: int = 0

    def add(self, other: Tally) -> None:
        self.copied += other.copied
        self.already += other.already
        self.failed += other.failed


#: Where what went wrong with one message is said (the command prints it).
Note = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class LeaseLost(Exception):
    """A session took the maildrop while the migration held it (its lease ran out)."""


class _Lease:
    """The migration's lease on one maildrop, renewed as it goes."""

    def __init__(self, connection: Any, name: str) -> None:
        self.connection = connection
        self.owner = str(uuid.uuid4())
        self.maildrop = queries.take(
            connection,
            name,
            owner=self.owner,
            node=node_name(),
            client=CLIENT,
            lease=LEASE_SECONDS,
            login_delay=0,
            login=False,
        )
        self._renewed = time.monotonic()

    def renew(self) -> None:
        if not queries.renew(self.connection, self.maildrop, self.owner, LEASE_SECONDS):
            raise LeaseLost("a session took the maildrop meanwhile (the lease ran out)")
        self._renewed = time.monotonic()

    def renew_if_due(self) -> None:
        """Renew every third of the lease, as a session does."""
        if time.monotonic() - self._renewed > LEASE_SECONDS / 3:
            self.renew()

    def release(self) -> None:
        # A broken connection cannot release it: it then expires by itself.
        with contextlib.suppress(Exception):
            queries.release(self.connection, self.maildrop, self.owner)


def _batches(indexes: Sequence[int], sizes: Sequence[int], batch: Batch) -> Iterator[list[int]]:
    group: list[int] = []
    octets = 0
    for index in indexes:
        group.append(index)
        octets += sizes[index]
        if len(group) >= batch.messages or octets >= batch.octets:
            yield group
            group, octets = [], 0
    if group:
        yield group


class _MessageFile:
    """
    A message file read in chunks, so a message is never held whole; closed
    by :meth:`close` whether or not it was read (a generator's ``finally``
    would not run if the store failed before reading).
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def __iter__(self) -> Iterator[bytes]:
        while self._fd is not None and (chunk := os.read(self._fd, CHUNK_SIZE)):
            yield chunk

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _open_message(places: Places, where: int, name: str) -> tuple[str, int]:
    """Open a listed message, wherever another program moved it; (its path, fd)."""

    def opening(at: int, found: str) -> int:
        return open_regular(found, dir_fd=places[at])[0]

    where, name, fd = chasing(places, where, name, opening)
    return f"{SUBDIRS[where]}/{name}", fd


def _why(error: OSError) -> str:
    return error.strerror or str(error)


def to_postgresql(
    connection: Any,
    name: str,
    location: MaildirPath,
    scheme: UidlScheme,
    *,
    note: Note = _quiet,
    batch: Batch = Batch(),
    tally: Tally | None = None,
    locks: LockTable | None = None,
) -> Tally:
    """
    Copy the Maildir at ``location`` into ``name``'s maildrop, listed as a
    login with ``scheme`` lists it (same UIDLs, same order), each message
    not already there (by UIDL) stored with its UIDL, delivery time and
    seen flag.  Each :class:`Batch` is one transaction, so what was copied
    stays copied whatever stops the run.  No quota applies: the mail is
    already the user's.  A missing Maildir has nothing to copy.
    """
    tally = Tally() if tally is None else tally
    with contextlib.ExitStack() as stack:
        try:
            top, *places = stack.enter_context(location.opened(*SUBDIRS))
        except FileNotFoundError:
            note(f"no Maildir at {location}: nothing to copy")
            return tally
        lease = _Lease(connection, name)
        stack.callback(lease.release)
        stack.callback(lock_out_sessions(top, locks).release)
        listing = scan(top, places, scheme, use_index=True)
        _, there = queries.list_messages(connection, lease.maildrop)
        present = set(there.uids)
        uids = listing.listing.uids
        received = listing.listing.received
        seen = listing.listing.seen
        assert received is not None and seen is not None  # a scan has both
        pending = []
        for index, uid in enumerate(uids):
            if uid in present:
                tally.already += 1
            else:
                pending.append(index)
        for group in _batches(pending, listing.listing.sizes, batch):
            copied = 0
            with connection.transaction():
                # The maildrop's row stays locked until the commit: a login
                # (queries.take locks it) waits for the batch, and then finds
                # the lease held.
                lease.renew()
                for index in group:
                    where, listed = listing.file_of(index)
                    try:
                        path, fd = _open_message(places, where, listed)
                    except OSError as e:
                        tally.failed += 1
                        note(f"{SUBDIRS[where]}/{listed}: cannot open: {_why(e)}")
                        continue
                    try:
                        # A savepoint: a file that fails halfway undoes only itself.
                        with connection.transaction(), contextlib.closing(_MessageFile(fd)) as file:
                            queries.store(
                                connection,
                                name,
                                lf_chunks(file),
                                uidl=uids[index],
                                delivered=received[index],
                                seen=bool(seen[index]),
                            )
                    except OSError as e:
                        tally.failed += 1
                        note(f"{path}: cannot read: {_why(e)}")
                        continue
                    copied += 1
            tally.copied += copied
    return tally


def _read_uidlist(top: int) -> tuple[bytes | None, Uidlist | None]:
    """The Maildir's ``dovecot-uidlist``, raw and parsed; (None, None) if there is none."""
    try:
        data = read_regular(UIDLIST_FILE, MAX_UIDLIST_BYTES, dir_fd=top)
    except FileNotFoundError:
        return None, None
    if data is None:
        raise UidlistUnusable(f"{UIDLIST_FILE} is not a regular file, or too big")
    return data, parse_uidlist(data)


class UidlistUnusable(Exception):
    """``dovecot-uidlist`` cannot take the records the migration needs."""


def _keeps_own_name(
    message: queries.Stored, scheme: UidlScheme, uidlist: Uidlist | None, taken: set[str]
) -> bool:
    """
    Whether a Maildir file named by the message's UIDL would be served
    that UIDL (as its own, without a ``dovecot-uidlist`` record): a name no
    other file has, whose parts (``:2,``, ``,S=``, ``,W=``, a leading dot)
    say nothing untrue, and that ``scheme`` serves as it is.
    """
    uidl = message.uidl
    if uidl in taken or uidl.startswith(".") or "/" in uidl:
        return False
    parsed = parse_name(uidl)
    if parsed.unique != uidl or parsed.stored_size not in (None, message.octets):
        return False
    if parsed.wire_size not in (None, message.wire_size):
        return False
    return assign_uidls([uidl], scheme, uidlist) == [uidl]


def _with_next_uid(header: str, next_uid: int) -> str:
    fields = [field for field in header.split(" ") if not field.startswith("N")]
    return " ".join([*fields, f"N{next_uid}"])


def _uidlist_adding(
    data: bytes | None, uidlist: Uidlist | None, added: Sequence[tuple[str, str]]
) -> bytes:
    """
    ``dovecot-uidlist`` (version 3) with a record ``<uid> P<uidl> :<name>``
    for each of ``added`` (name, UIDL), after the records it has, so those
    messages are listed after the ones it lists, in this order.
    """
    if data is None:
        header, lines, next_uid = f"3 V{int(time.time())}", [], 1
    else:
        if uidlist is None or uidlist.version != 3:
            raise UidlistUnusable(f"{UIDLIST_FILE} is damaged or older than version 3")
        # A cut-off last line is left out, as a reader skips it.
        header, *lines = data.decode("utf-8", "surrogateescape").split("\n")[:-1]
        last = max((record.uid for record in uidlist.records.values()), default=0)
        next_uid = max(uidlist.next_uid or 1, last + 1)
    if next_uid + len(added) > _MAX_UID:
        raise UidlistUnusable(f"{UIDLIST_FILE} has no UIDs left")
    for uid, (name, uidl) in enumerate(added, start=next_uid):
        lines.append(f"{uid} P{uidl} :{name}")
    text = "\n".join([_with_next_uid(header, next_uid + len(added)), *lines]) + "\n"
    return text.encode("utf-8", "surrogateescape")


def _write_uidlist(top: int, data: bytes) -> None:
    """Replace ``dovecot-uidlist`` under Dovecot's own lock (see :data:`UIDLIST_LOCK`)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(UIDLIST_LOCK, flags, 0o600, dir_fd=top)
    except FileExistsError:
        raise UidlistUnusable(
            f"{UIDLIST_LOCK} exists: Dovecot is writing {UIDLIST_FILE}"
            " (remove the lock if no Dovecot uses this Maildir)"
        ) from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(UIDLIST_LOCK, UIDLIST_FILE, src_dir_fd=top, dst_dir_fd=top)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(UIDLIST_LOCK, dir_fd=top)
        raise
    fsync_directory(top)


def _stored_chunks(connection: Any, message: int) -> Iterator[bytes]:
    """A stored message's chunks, a few per query."""
    first = 0
    while True:
        chunks = queries.read_chunks(connection, message, first, queries.CHUNKS_PER_READ)
        yield from chunks
        if len(chunks) < queries.CHUNKS_PER_READ:
            return
        first += len(chunks)


def _names(
    messages: Sequence[queries.Stored],
    scheme: UidlScheme,
    *,
    data: bytes | None,
    uidlist: Uidlist | None,
    taken: set[str],
    note: Note,
) -> tuple[list[str | None], bytes | None]:
    """
    The base file name each message gets (None: its UIDL cannot be kept,
    said through ``note``), and the ``dovecot-uidlist`` to write first, if
    one is needed.

    A message whose UIDL makes a good file name is named by it, and needs
    nothing else.  Any other (Dovecot's ``000000016b05664e``) gets a new
    name with its sizes and delivery time in it and a ``P`` record that
    says its UIDL; then every message copied gets one, so the listing
    keeps the maildrop's order (records first, in UID order).  A record
    an interrupted run wrote, whose file never came, is used again.
    """
    own = [_keeps_own_name(m, scheme, uidlist, taken) for m in messages]
    if all(own):
        return [m.uidl for m in messages], None
    if not scheme.reads_uidlist:
        names: list[str | None] = []
        for message, keeps in zip(messages, own, strict=True):
            if not keeps:
                note(
                    f"{message.uidl}: this UIDL can only be kept by a {UIDLIST_FILE} record,"
                    " which --uidl-format maildir does not read"
                )
            names.append(message.uidl if keeps else None)
        return names, None
    records = uidlist.records if uidlist is not None else {}
    unused = {
        record.pop3_uidl: base
        for base, record in records.items()
        if record.pop3_uidl and base not in taken
    }
    names = []
    added = []
    for message, keeps in zip(messages, own, strict=True):
        base = unused.get(message.uidl)
        if base is None:
            base = (
                message.uidl
                if keeps
                else make_unique(message.octets, message.wire_size, now=message.delivered)
            )
            added.append((base, message.uidl))
        names.append(base)
    return names, _uidlist_adding(data, uidlist, added) if added else None


def to_maildir(
    connection: Any,
    name: str,
    location: MaildirPath,
    scheme: UidlScheme,
    *,
    note: Note = _quiet,
    batch: Batch = Batch(),
    tally: Tally | None = None,
    locks: LockTable | None = None,
) -> Tally:
    """
    Copy ``name``'s maildrop into the Maildir at ``location`` (created if
    missing), each message the Maildir does not already serve (by UIDL,
    listed with ``scheme``) as a file that the Maildir store serves with
    the same UIDL: in ``cur/`` with ``:2,S`` if seen, else in ``new/``, its
    mtime the delivery time.  A user without a maildrop has nothing to copy.
    Counted into ``tally`` as :func:`to_postgresql` does.
    """
    tally = Tally() if tally is None else tally
    if queries.maildrop_of(connection, name) is None:
        note("no maildrop in the database: nothing to copy")
        return tally
    with contextlib.ExitStack() as stack:
        lease = _Lease(connection, name)
        stack.callback(lease.release)
        opened = location.opened("tmp", *SUBDIRS, create=True)
        top, tmp, *places = stack.enter_context(opened)
        stack.callback(lock_out_sessions(top, locks).release)
        served = set(scan(top, places, scheme, use_index=True).listing.uids)
        taken = {parse_name(n).unique for listed in list_messages(places) for n in listed}
        stored = queries.stored_messages(connection, lease.maildrop)
        messages = [m for m in stored if m.uidl not in served]
        tally.already = len(stored) - len(messages)
        if not messages:
            return tally
        data, uidlist = _read_uidlist(top)
        names, records = _names(
            messages, scheme, data=data, uidlist=uidlist, taken=taken, note=note
        )
        if records is not None:
            _write_uidlist(top, records)
        sizes = [m.wire_size for m in messages]
        for group in _batches(range(len(messages)), sizes, batch):
            copied = octets = 0
            for index in group:
                message, base = messages[index], names[index]
                if base is None:
                    tally.failed += 1
                    continue
                lease.renew_if_due()
                where, file_name = (CUR, f"{base}:2,S") if message.seen else (NEW, base)
                try:
                    octets += write_named(
                        tmp,
                        places[where],
                        base,
                        file_name,
                        _stored_chunks(connection, message.id),
                        mtime=message.delivered,
                    )
                except OSError as e:
                    tally.failed += 1
                    note(f"{message.uidl}: cannot write {SUBDIRS[where]}/{file_name}: {_why(e)}")
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise  # every other message would fail the same way
                    continue
                copied += 1
            for directory in places:
                fsync_directory(directory)
            if copied:
                # Counted where the quota is kept, if it is (as a delivery does).
                maildirsize.append(top, octets, copied)
            tally.copied += copied
    return tally


__all__ = ["Batch", "LeaseLost", "Tally", "UidlistUnusable", "to_maildir", "to_postgresql"]
