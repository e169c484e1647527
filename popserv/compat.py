"""
Serve an existing ``twisted.mail.pop3.IMailbox`` through popserv, unchanged.

Wrap the application's realm in :class:`TwistedMailRealm`; each
``twisted.mail`` mailbox it returns is adapted to popserv's IMailbox by
:class:`TwistedMailbox`.  Sizes and UIDLs are taken as that mailbox reports
them; a UIDL that breaks RFC 1939's rules is replaced by a stable hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from twisted.mail import pop3 as twisted_pop3
from zope.interface import implementer

from popserv.interfaces import IMailbox, Listing


def _resolve(value: Any) -> Deferred[Any]:
    return value if isinstance(value, Deferred) else Deferred.fromCoroutine(_value(value))


async def _value(value: Any) -> Any:
    return value


def safe_uidl(uid: str | bytes) -> str:
    """``uid`` when RFC 1939 allows it (1-70 chars, 0x21-0x7E), else a stable hash."""
    if isinstance(uid, bytes):
        uid = uid.decode("latin-1")
    if 0 < len(uid) <= 70 and all("\x21" <= c <= "\x7e" for c in uid):
        return uid
    digest = hashlib.sha1(uid.encode("utf-8", "surrogateescape"), usedforsecurity=False)
    return "H" + digest.hexdigest()


@implementer(IMailbox)
class TwistedMailbox:
    """popserv's IMailbox over a ``twisted.mail.pop3.IMailbox``."""

    def __init__(self, mailbox: twisted_pop3.IMailbox) -> None:
        self._mailbox = mailbox

    async def _listing(self) -> Listing:
        sizes = await _resolve(self._mailbox.listMessages())
        uids = [safe_uidl(self._mailbox.getUidl(i)) for i in range(len(sizes))]
        return Listing(uids=uids, sizes=[int(s) for s in sizes])

    def listing(self) -> Deferred[Listing]:
        return Deferred.fromCoroutine(self._listing())

    def open_message(self, index: int) -> Any:
        return self._mailbox.getMessage(index)

    async def _commit(self, deleted: Sequence[int]) -> None:
        for index in deleted:
            await _resolve(self._mailbox.deleteMessage(index))
        await _resolve(self._mailbox.sync())

    def commit(self, deleted: Sequence[int], retrieved: Sequence[int]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._commit(deleted))

    def close(self) -> None:
        """The wrapped realm's own logout releases the mailbox."""


@implementer(IRealm)
class TwistedMailRealm:
    """Wraps a realm that serves ``twisted.mail.pop3.IMailbox`` avatars."""

    def __init__(self, realm: IRealm) -> None:
        self._realm = realm

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMailbox not in interfaces:
            raise NotImplementedError("TwistedMailRealm only serves IMailbox")
        result = _resolve(self._realm.requestAvatar(avatarId, mind, twisted_pop3.IMailbox))
        return result.addCallback(lambda r: (IMailbox, TwistedMailbox(r[1]), r[2]))
