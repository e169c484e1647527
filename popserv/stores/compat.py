"""
Serve an existing ``twisted.mail.pop3.IMailbox`` through popserv, unchanged.

Wrap the application's realm in :class:`TwistedMailRealm`; each
``twisted.mail`` mailbox it returns is adapted to popserv's IMailbox by
:class:`TwistedMailbox`.  UIDLs are taken as that mailbox reports them; a
UIDL that breaks RFC 1939's rules is replaced by a stable hash.

``twisted.mail`` mailboxes usually report the stored size of a message,
which for LF-stored mail is less than the octets RETR sends, and a client
that trusts LIST then reads a message of the wrong length.  So the adapter
counts the real sizes, reading every message once at login; for mailboxes
too big for that, ``exact_sizes=False`` takes the sizes as reported, as
Twisted's own server does (and RETR then sends a message as it is, not
checked against its listed size).  Message files opened in text mode (as
``twisted.mail.maildir`` does) are read as bytes, so 8-bit mail passes
through unchanged.

A mailbox's ``loginDelay`` and ``messageExpiration`` attributes, when it
has them, become its user's LOGIN-DELAY and EXPIRE (and EXPIRE is then
applied: ``messageExpiration = 0`` deletes what the client retrieved).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, cast

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.mail import pop3 as twisted_pop3
from twisted.python.failure import Failure
from zope.interface import Interface, alsoProvides, implementer

from popserv.core.body import WireSizeCounter
from popserv.interfaces import IAccountSettings, IMailbox, Listing, MessageStream

log = Logger()

#: Read size when counting a message's wire size.
CHUNK_SIZE = 64 * 1024

_T = TypeVar("_T")

#: What ``IRealm.requestAvatar`` gives: the interface, the avatar, its logout.
_Avatar = tuple[type[Interface], object, Callable[[], None]]


class _TwistedMailboxCalls(Protocol):
    """
    The calls the adapter makes on a ``twisted.mail.pop3.IMailbox``, typed
    (Twisted leaves most of them unannotated) as the adapter takes their
    answers: any of them may be a Deferred, a UIDL may be ``str``, and a
    message file may be opened in text mode.
    """

    def listMessages(self) -> list[int] | Deferred[list[int]]: ...

    def getUidl(self, i: int, /) -> str | bytes: ...

    def getMessage(
        self, i: int, /
    ) -> MessageStream | io.TextIOBase | Deferred[MessageStream | io.TextIOBase]: ...

    def deleteMessage(self, i: int, /) -> Deferred[None] | None: ...

    def sync(self) -> Deferred[None] | None: ...


def _resolve(value: _T | Deferred[_T]) -> Deferred[_T]:
    return value if isinstance(value, Deferred) else Deferred.fromCoroutine(_value(value))


async def _value(value: _T) -> _T:
    return value


def safe_uidl(uid: str | bytes) -> str:
    """``uid`` when RFC 1939 allows it (1-70 chars, 0x21-0x7E), else a stable hash."""
    if isinstance(uid, bytes):
        uid = uid.decode("latin-1")
    if 0 < len(uid) <= 70 and all("\x21" <= c <= "\x7e" for c in uid):
        return uid
    digest = hashlib.sha1(uid.encode("utf-8", "surrogateescape"), usedforsecurity=False)
    return "H" + digest.hexdigest()


class _Utf8Reader:
    """A binary view of a stream whose ``read`` returns ``str``."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self._stream = stream

    def read(self, size: int = -1, /) -> bytes:
        return self._stream.read(size).encode("utf-8", "surrogateescape")

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


def binary(stream: MessageStream | io.TextIOBase) -> MessageStream:
    """
    ``stream`` as a binary stream: a text-mode file's underlying buffer
    (detached, so the wrapper cannot close it), a wrapper for other ``str``
    streams, or ``stream`` itself.
    """
    if isinstance(stream, io.TextIOWrapper):
        # typeshed's buffer type allows any readable buffer; an opened file's is bytes.
        return cast(MessageStream, stream.detach())
    if isinstance(stream, io.TextIOBase):
        return _Utf8Reader(stream)
    return stream


def _wire_size(stream: MessageStream) -> int:
    counter = WireSizeCounter()
    try:
        while chunk := stream.read(CHUNK_SIZE):
            counter.feed(chunk)
    finally:
        stream.close()
    return counter.result()


@implementer(IMailbox)
class TwistedMailbox:
    """popserv's IMailbox over a ``twisted.mail.pop3.IMailbox``."""

    def __init__(self, mailbox: twisted_pop3.IMailbox, *, exact_sizes: bool = True) -> None:
        # The interface's methods are unannotated: call them as typed above.
        self._mailbox = cast(_TwistedMailboxCalls, mailbox)
        self._exact_sizes = exact_sizes
        if hasattr(mailbox, "loginDelay") or hasattr(mailbox, "messageExpiration"):
            alsoProvides(self, IAccountSettings)
            self.login_delay = int(getattr(mailbox, "loginDelay", 0) or 0)
            self.expire_days = getattr(mailbox, "messageExpiration", None)

    async def _listing(self) -> Listing:
        sizes = [int(size) for size in await _resolve(self._mailbox.listMessages())]
        uids = [safe_uidl(self._mailbox.getUidl(i)) for i in range(len(sizes))]
        if self._exact_sizes:
            sizes = [_wire_size(await self._open(i)) for i in range(len(sizes))]
        return Listing(uids=uids, sizes=sizes, exact_sizes=self._exact_sizes)

    def listing(self) -> Deferred[Listing]:
        return Deferred.fromCoroutine(self._listing())

    async def _open(self, index: int) -> MessageStream:
        return binary(await _resolve(self._mailbox.getMessage(index)))

    def open_message(self, index: int) -> Deferred[MessageStream]:
        return Deferred.fromCoroutine(self._open(index))

    async def _commit(self, deleted: Sequence[int]) -> None:
        """Try every deletion and the sync even when one fails; then report the first failure."""
        failures = []
        for index in deleted:
            try:
                await _resolve(self._mailbox.deleteMessage(index))
            except Exception:
                failures.append(Failure())
        try:
            await _resolve(self._mailbox.sync())
        except Exception:
            failures.append(Failure())
        for failure in failures[1:]:
            log.failure("A twisted.mail mailbox failed to apply a deletion", failure)
        if failures:
            failures[0].raiseException()

    def commit(self, deleted: Sequence[int], retrieved: Sequence[int]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._commit(deleted))

    def close(self) -> None:
        """The wrapped realm's own logout releases the mailbox."""


@implementer(IRealm)
class TwistedMailRealm:
    """Wraps a realm that serves ``twisted.mail.pop3.IMailbox`` avatars."""

    def __init__(self, realm: IRealm, *, exact_sizes: bool = True) -> None:
        self._realm = realm
        self._exact_sizes = exact_sizes

    def requestAvatar(
        self, avatarId: bytes | str | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> Deferred[_Avatar]:
        if IMailbox not in interfaces:
            raise NotImplementedError("TwistedMailRealm only serves IMailbox")
        # IRealm types the id as bytes | (); popserv's checkers give str, passed on as is.
        result = _resolve(
            self._realm.requestAvatar(avatarId, mind, twisted_pop3.IMailbox)  # type: ignore[arg-type]
        )

        def adapt(avatar: _Avatar) -> _Avatar:
            # Asked for twisted.mail's IMailbox, the realm gives a provider of it.
            mailbox = cast(twisted_pop3.IMailbox, avatar[1])
            return IMailbox, TwistedMailbox(mailbox, exact_sizes=self._exact_sizes), avatar[2]

        return result.addCallback(adapt)
