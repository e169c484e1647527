"""
An in-memory maildrop store, for tests and for applications that keep mail
elsewhere and want the smallest possible IMailbox.

Each user's maildrop is a :class:`MemoryMaildrop`; :class:`MemoryRealm`
serves them through ``twisted.cred`` with the same one-session-at-a-time
lock the Maildir store has.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from twisted.cred.portal import IRealm
from zope.interface import Interface, implementer

from popserv.core.body import wire_size
from popserv.core.errors import MailboxInUse
from popserv.interfaces import IMailbox, Listing


class MemoryMaildrop:
    """One user's messages, each with a UIDL that never changes."""

    def __init__(self, messages: Iterable[bytes] = ()) -> None:
        self._ids = itertools.count(1)
        self.messages: list[tuple[str, bytes]] = []
        self.locked = False
        for message in messages:
            self.add(message)

    def add(self, message: bytes) -> str:
        """Deliver ``message``; return its UIDL."""
        uid = f"m{next(self._ids)}"
        self.messages.append((uid, message))
        return uid

    def contents(self) -> list[bytes]:
        return [message for _, message in self.messages]


@implementer(IMailbox)
class MemoryMailbox:
    """A session's locked view of a :class:`MemoryMaildrop`."""

    def __init__(self, maildrop: MemoryMaildrop) -> None:
        if maildrop.locked:
            raise MailboxInUse("memory maildrop locked")
        maildrop.locked = True
        self._maildrop = maildrop
        self._snapshot = list(maildrop.messages)
        self._closed = False

    def listing(self) -> Listing:
        return Listing(
            uids=tuple(uid for uid, _ in self._snapshot),
            sizes=tuple(wire_size(message) for _, message in self._snapshot),
        )

    def open_message(self, index: int) -> io.BytesIO:
        return io.BytesIO(self._snapshot[index][1])

    def commit(self, deleted: Sequence[int], retrieved: Sequence[int]) -> None:
        gone = {self._snapshot[i][0] for i in deleted}
        self._maildrop.messages = [m for m in self._maildrop.messages if m[0] not in gone]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._maildrop.locked = False


@implementer(IRealm)
class MemoryRealm:
    """Serves :class:`MemoryMaildrop` objects by user name."""

    def __init__(self, maildrops: dict[str, MemoryMaildrop] | None = None) -> None:
        self.maildrops = maildrops if maildrops is not None else {}

    def requestAvatar(
        self, avatarId: bytes | str | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[IMailbox], MemoryMailbox, Callable[[], None]]:
        if IMailbox not in interfaces:
            raise NotImplementedError("MemoryRealm only serves IMailbox")
        # popserv's checkers give a user name (str, or bytes from Twisted's
        # own); the anonymous () is no user and no checker here gives it.
        name = cast(str, avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId)
        maildrop = self.maildrops.setdefault(name, MemoryMaildrop())
        mailbox = MemoryMailbox(maildrop)
        return IMailbox, mailbox, mailbox.close
