"""
Local delivery: from an envelope recipient to a user's Maildir.

The SMTP and LMTP receivers and ``popserv deliver`` all come through here:
:class:`Directory` turns an address into a :class:`Recipient` (or refuses
it), and :func:`deliver_message` stores one message for several recipients
with the quota checked, through :func:`popserv.stores.maildir.deliver.prepare`.

Each refusal is a :class:`DeliveryError` with the SMTP reply code, the
enhanced status code (RFC 3463) and the ``sysexits.h`` exit status an MDA
reports, so every way in says the same thing.
"""

from __future__ import annotations

import email.utils
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, BinaryIO, Protocol, TypeVar, cast

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from popserv.core.errors import InvalidUsername, TemporaryFailure
from popserv.core.headers import header_field
from popserv.logins.passwords import PasswdFile
from popserv.logins.passwords.passwdfile import UserEntry
from popserv.logins.sqlaccounts import PostfixadminTable, SQLAccounts
from popserv.stores.layout import Layout
from popserv.stores.maildir import maildirsize
from popserv.stores.maildir.deliver import PendingDelivery, prepare
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.quota import OverQuota, Quota, Usage, current_usage

log = Logger()

T = TypeVar("T")

#: sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class DeliveryError(Exception):
    """A recipient or message refused; fixed texts only, never a path or a byte of mail."""

    reply = 451
    status = "4.3.0"
    text = "Temporary local problem, try again later"
    exit_status = EX_TEMPFAIL


class UnknownUser(DeliveryError):
    reply, status, text, exit_status = 550, "5.1.1", "User unknown", EX_NOUSER


class RelayDenied(DeliveryError):
    reply, status, text, exit_status = 550, "5.7.1", "Relaying denied", EX_NOPERM


class BadAddress(DeliveryError):
    reply, status, text, exit_status = 501, "5.1.3", "Bad recipient address syntax", EX_USAGE


class BadSender(DeliveryError):
    reply, status, text, exit_status = 501, "5.1.7", "Bad sender address syntax", EX_DATAERR


class MailboxFull(DeliveryError):
    reply, status, text, exit_status = 552, "5.2.2", "Mailbox full", EX_CANTCREAT


class MessageTooBig(DeliveryError):
    reply, status = 552, "5.3.4"
    text, exit_status = "Message too big", EX_CANTCREAT


class StorageFailed(DeliveryError):
    """A full disk, an I/O error: nothing was stored, the sender should retry."""

    reply, status = 452, "4.3.1"
    text, exit_status = "Insufficient system storage, try again later", EX_TEMPFAIL


class LookupFailed(DeliveryError):
    """The user database could not be read: retry."""

    reply, status = 451, "4.3.0"


#: RFC 5321 section 4.1.2: an address is printable ASCII and spaces, quoted
#: strings and quoted pairs included (qtextSMTP, quoted-pairSMTP).  A control
#: character in one is never mail, and a CR or LF would become a header
#: field of its own once the address is written into Return-Path.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control(address: str) -> bool:
    """True if ``address`` holds a control character (C0 or DEL): refuse it."""
    return _CONTROL.search(address) is not None


@frozen
class Recipient:
    """
    An accepted envelope recipient: the address as given, whose mail it is,
    its Maildir (None when the store keeps maildrops by user name) and quota.
    """

    address: str
    user: str
    maildir: MaildirPath | None
    quota: Quota


class MailStore(Protocol):
    """Where :class:`Directory`'s recipients' mail is stored: Maildirs, or a database."""

    def place(self, entry: UserEntry) -> MaildirPath | None:
        """The account's Maildir, or None for a store that finds maildrops by name."""

    def check_room(self, recipient: Recipient, incoming: int = 0) -> Deferred[None]:
        """Fail with :class:`MailboxFull` unless ``incoming`` octets fit (RCPT, SIZE)."""

    def deliver(
        self, copies: Sequence[tuple[Recipient, bytes]], message: bytes | BinaryIO, *, atomic: bool
    ) -> Deferred[list[DeliveryError | None]]:
        """:func:`deliver_message`'s work and results, without blocking the reactor."""


class MaildirStore:
    """Delivery into each account's Maildir (the default), in the reactor's threads."""

    def __init__(self, layout: Layout, reactor: Any = None) -> None:
        self.layout = layout
        self._reactor = reactor

    def place(self, entry: UserEntry) -> MaildirPath:
        return self.layout.maildir_location(entry.name, entry.extra.get("maildir"))

    def _in_thread(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)

    def check_room(self, recipient: Recipient, incoming: int = 0) -> Deferred[None]:
        return self._in_thread(check_room, recipient, incoming)

    def deliver(
        self, copies: Sequence[tuple[Recipient, bytes]], message: bytes | BinaryIO, *, atomic: bool
    ) -> Deferred[list[DeliveryError | None]]:
        return self._in_thread(deliver_message, copies, message, atomic=atomic)


class Directory:
    """
    Which addresses are local users, and where their mail goes.

    An address is local when its domain is one of ``domains`` (any case,
    a trailing dot ignored) and its local part names a user in the password
    file: as the file matches names (normalised: NFKC, and case folded
    unless ``--username-case keep``), else in lower case, else without a
    ``+tag`` (``delimiter``).  A user named by the whole address
    (``alice@example.org``, Dovecot's virtual users) is found first.  The
    recipient's user is the name as the file stores it.
    """

    def __init__(
        self,
        layout: Layout,
        passwd: PasswdFile | SQLAccounts | PostfixadminTable,
        domains: Iterable[str],
        *,
        quota: Quota | None = None,
        delimiter: str = "+",
        store: MailStore | None = None,
    ) -> None:
        self.layout = layout
        self.store: MailStore = store or MaildirStore(layout)
        self.passwd = passwd
        self.domains = frozenset(_domain(d) for d in domains)
        self.quota = quota or Quota()
        self.delimiter = delimiter

    def resolve(self, address: str, *, bare: bool = False, any_domain: bool = False) -> Recipient:
        """
        The recipient ``address`` names, or raise a :class:`DeliveryError`.

        ``bare`` allows a local part with no domain; ``any_domain`` takes
        the local part whatever the domain (a trusted MTA has routed it).
        """
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        if not local or len(address) > 256 or has_control(address):
            raise BadAddress(address)
        if domain:
            if not any_domain and _domain(domain) not in self.domains:
                raise RelayDenied(domain)
        elif not (bare or any_domain):
            raise RelayDenied("no domain")
        candidates = [address, address.lower()] if domain else []
        candidates += [local, local.lower()]
        if self.delimiter and self.delimiter in local:
            base = local.split(self.delimiter, 1)[0]
            if domain:
                candidates += [f"{base}@{domain}", f"{base}@{domain}".lower()]
            candidates += [base, base.lower()]
        for name in dict.fromkeys(candidates):
            entry = self._lookup(name)
            if entry is not None:
                return self._recipient(address, entry)
        raise UnknownUser(local)

    @property
    def blocking(self) -> bool:
        """Whether lookups wait on a database: then :meth:`resolve_in_thread`."""
        return isinstance(self.passwd, SQLAccounts)

    def resolve_in_thread(self, address: str, **options: bool) -> Deferred[Recipient]:
        """:meth:`resolve` in one of the accounts database's threads."""
        assert isinstance(self.passwd, SQLAccounts)
        return self.passwd.in_thread(self.resolve, address, **options)

    def _lookup(self, name: str) -> UserEntry | None:
        try:
            if isinstance(self.passwd, SQLAccounts):
                return self.passwd.lookup_here(name)
            return self.passwd.lookup(name)
        except OSError as e:
            log.error("Cannot read the password file: {error}", error=e.strerror or str(e))
            raise LookupFailed("passwd") from None
        except TemporaryFailure as e:
            log.error("Cannot look the recipient up: {error}", error=str(e))
            raise LookupFailed("database") from None

    def recipient(self, user: str, address: str | None = None) -> Recipient:
        """The recipient for a user named directly (``popserv deliver --user``)."""
        if address is not None and has_control(address):
            raise BadAddress(address)
        entry = self._lookup(user)
        if entry is None:
            raise UnknownUser(user)
        return self._recipient(address or user, entry)

    def _quota_of(self, entry: UserEntry) -> Quota:
        """The account's quota: its own fields over the server's."""
        try:
            return self.quota.override(entry.extra)
        except ValueError:
            log.warn("Ignoring bad quota fields for {user}", user=entry.name)
            return self.quota

    def _recipient(self, address: str, entry: UserEntry) -> Recipient:
        """The account's Maildir (its own ``maildir`` field for ``{maildir}``) and quota."""
        try:
            maildir = self.store.place(entry)
        except InvalidUsername:
            raise UnknownUser(entry.name) from None
        return Recipient(address, entry.name, maildir, self._quota_of(entry))


def _domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


# Delivery (blocking: these run in a thread)


def check_room(recipient: Recipient, incoming: int = 0) -> None:
    """Raise :class:`MailboxFull` if the recipient's mailbox is full (blocking)."""
    if recipient.quota.unlimited:
        return
    assert recipient.maildir is not None, "a Maildir store's recipient"
    try:
        usage = current_usage(recipient.maildir, recipient.quota)
    except OSError as e:
        raise StorageFailed(str(e)) from None
    refuse_if_full(recipient, usage, incoming)


def refuse_if_full(recipient: Recipient, usage: Usage, incoming: int = 0) -> None:
    """
    Raise :class:`MailboxFull` if the mailbox holding ``usage`` is full, or
    ``incoming`` more octets would not fit its quota (every store's check).
    """
    if recipient.quota.full(usage):
        raise MailboxFull(recipient.user)
    if incoming:
        try:
            recipient.quota.check(usage, incoming)
        except OverQuota as e:
            raise MailboxFull(str(e)) from None


def trace_header(sender: str, recipient: str, received: str | None = None) -> bytes:
    """
    ``Return-Path``, ``Delivered-To`` and an optional ``Received`` field (from
    :func:`received_field`), CRLF ended; ValueError if a value holds a CR, LF
    or other control character (:func:`popserv.core.headers.header_field`).
    """
    fields = [header_field("Return-Path", f"<{sender}>"), header_field("Delivered-To", recipient)]
    if received:
        fields.append(received)
    return "".join(fields).encode("utf-8", "surrogateescape")


def received_field(
    *, helo: str, peer: str, host: str, protocol: str, queue_id: str, recipient: str | None
) -> str:
    """A ``Received`` trace field (RFC 5321 section 4.4), folded over lines, CRLF ended."""
    lines = [f"from {helo} ({peer})", f"by {host} (popserv) with {protocol} id {queue_id}"]
    if recipient:
        lines.append(f"for <{recipient}>")
    lines[-1] += ";"
    lines.append(email.utils.formatdate(localtime=True))
    return header_field("Received", *lines)


def _size_of(message: bytes | BinaryIO) -> int:
    if isinstance(message, bytes):
        return len(message)
    return message.seek(0, os.SEEK_END)


def deliver_message(
    copies: Sequence[tuple[Recipient, bytes]],
    message: bytes | BinaryIO,
    *,
    atomic: bool,
) -> list[DeliveryError | None]:
    """
    Store ``message`` once per distinct Maildir in ``copies`` (each a
    recipient and the trace header for it); return, per copy, None when
    stored or the :class:`DeliveryError` that refused it.  A file (the
    receiver's spool) is read from its start for each copy, in chunks.

    ``atomic`` (SMTP, one reply for all): every copy is stored or none is.
    Otherwise (LMTP, the CLI) each copy succeeds or fails on its own.
    Nothing half-written is ever visible.  Blocking: run it in a thread.
    """
    results: list[DeliveryError | None] = [None] * len(copies)
    first_of: dict[MaildirPath, int] = {}
    for i, (recipient, _) in enumerate(copies):
        assert recipient.maildir is not None, "a Maildir store's recipient"
        first_of.setdefault(recipient.maildir, i)
    # One order for taking the locks, whoever delivers.
    targets = sorted(first_of.items(), key=lambda target: str(target[0]))
    # One lock per Maildir, so two deliveries cannot both pass the quota check.
    locks = [maildirsize.lock_for(maildir) for maildir, _ in targets]
    size = _size_of(message)
    pending: list[tuple[int, PendingDelivery]] = []
    for lock in locks:
        lock.acquire()
    try:
        for maildir, i in targets:
            recipient, header = copies[i]
            try:
                check_room(recipient, size + len(header))
                if not isinstance(message, bytes):
                    message.seek(0)
                stored = prepare(maildir, message, header=header)
                pending.append((i, stored))
            except DeliveryError as e:
                results[i] = e
            except OSError as e:
                log.error(
                    "Delivery to {user} failed: {error}", user=recipient.user, error=e.strerror or e
                )
                results[i] = StorageFailed()
            if atomic and results[i] is not None:
                break
        failed = next((r for r in results if r is not None), None)
        if atomic and failed is not None:
            for _, delivery in pending:
                delivery.discard()
            return [failed] * len(copies)
        published: list[PendingDelivery] = []
        for i, delivery in pending:
            try:
                delivery.publish()
                published.append(delivery)
            except OSError as e:
                log.error(
                    "Delivery to {user} failed: {error}",
                    user=copies[i][0].user,
                    error=e.strerror or e,
                )
                results[i] = StorageFailed()
                if atomic:
                    # One answer for all: take back the copies already out,
                    # or the sender's retry would deliver them twice.
                    for done in published:
                        done.withdraw()
                    return [StorageFailed()] * len(copies)
    finally:
        for _, delivery in pending:
            delivery.discard()  # a no-op once published
        for lock in locks:
            lock.release()
    by_maildir = {maildir: results[i] for maildir, i in first_of.items()}
    return [by_maildir[cast(MaildirPath, recipient.maildir)] for recipient, _ in copies]
