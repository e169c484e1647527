"""
A session's view of a maildrop: numbering, deletion marks, totals (pure).

RFC 1939 semantics kept in one place: messages are numbered from 1 in
listing order for the whole session; a message marked deleted vanishes from
STAT, LIST and UIDL and cannot be read or deleted again; RSET unmarks all;
only the UPDATE state (after QUIT) turns marks into deletions.

A view may show only the newest messages (``--max-listed``): the last
``newest`` of the listing, numbered from 1.  The indexes it gives the store
(:meth:`MaildropView.index`, the commit's lists) stay indexes into the whole
listing, so every store serves a capped session unchanged, and the messages
not shown are never deleted, marked or expired.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import compress
from typing import TYPE_CHECKING, TypeVar

from popserv.core.errors import MessageDeleted, NoSuchMessage

if TYPE_CHECKING:
    # Only a type: the core never imports the stores at run time.
    from popserv.interfaces import Listing

SECONDS_PER_DAY = 86400

_T = TypeVar("_T")


def _tail(column: Sequence[_T], first: int) -> Sequence[_T]:
    """``column`` from ``first`` on, not copied when that is all of it."""
    return column if first == 0 else column[first:]


class MaildropView:
    """
    Deletion and retrieval marks over a :class:`Listing`, with O(1) STAT.

    ``newest`` (0: all) shows only the last ``newest`` messages of the
    listing, the ones delivered last, as messages 1 to ``newest``.
    """

    __slots__ = (
        "_count",
        "_deleted",
        "_octets",
        "_retrieved",
        "first",
        "listing",
        "sizes",
        "uids",
    )

    def __init__(self, listing: Listing, newest: int = 0) -> None:
        self.listing = listing
        #: The listing index of message 1: what the cap leaves out before it.
        self.first = len(listing) - newest if 0 < newest < len(listing) else 0
        #: The sizes and UIDLs of the messages shown, message 1 first.
        self.sizes: Sequence[int] = _tail(listing.sizes, self.first)
        self.uids: Sequence[str] = _tail(listing.uids, self.first)
        shown = len(self.sizes)
        # One byte per message shown rather than a set: 100,000 messages
        # cost 100 KB; capped at 250, 250 bytes.
        self._deleted = bytearray(shown)
        self._retrieved = bytearray(shown)
        self._count = shown
        self._octets = sum(self.sizes)

    @property
    def capped(self) -> bool:
        """Some messages of the maildrop are not shown (``--max-listed``)."""
        return self.first > 0

    def stat(self) -> tuple[int, int]:
        """Number and total size of the messages not marked deleted."""
        return self._count, self._octets

    def _position(self, number: int) -> int:
        """Message ``number``'s place among those shown (from 0), if it is live."""
        if not 1 <= number <= len(self._deleted):
            raise NoSuchMessage("message number out of range")
        position = number - 1
        if self._deleted[position]:
            raise MessageDeleted("message already deleted")
        return position

    def index(self, number: int) -> int:
        """
        The store's index of message ``number`` (its 0-based place in the
        whole listing), if it is shown and not deleted.
        """
        return self.first + self._position(number)

    def size(self, number: int) -> int:
        return self.sizes[self._position(number)]

    def uid(self, number: int) -> str:
        return self.uids[self._position(number)]

    def live_runs(self, most: int = 1024) -> Iterator[range]:
        """
        The places (from 0, in :attr:`sizes` and :attr:`uids`) of the
        messages shown and not marked deleted, as runs of consecutive ones,
        each at most ``most`` long: a listing of 100,000 messages is
        formatted a run at a time, without a step per message.
        """
        deleted = self._deleted
        count = len(deleted)
        at = 0
        while at < count:
            start = deleted.find(0, at)
            if start < 0:
                return
            limit = min(start + most, count)
            stop = deleted.find(1, start, limit)
            at = stop if stop >= 0 else limit
            yield range(start, at)

    def delete(self, number: int) -> None:
        position = self._position(number)
        self._deleted[position] = 1
        self._count -= 1
        self._octets -= self.sizes[position]

    def retrieved(self, number: int) -> None:
        """Remember that message ``number`` was sent whole with RETR."""
        self._retrieved[self._position(number)] = 1

    def reset(self) -> None:
        """Unmark every deletion (RSET)."""
        self._deleted = bytearray(len(self.sizes))
        self._count = len(self.sizes)
        self._octets = sum(self.sizes)

    def deleted_indexes(self) -> list[int]:
        """The store's indexes of the messages marked deleted."""
        return list(compress(range(self.first, self.first + len(self._deleted)), self._deleted))

    def retrieved_indexes(self) -> list[int]:
        """The store's indexes of the messages sent whole with RETR."""
        # C-level: QUIT of a 100,000-message session took 2 x 3-5 ms in Python loops.
        return list(
            compress(range(self.first, self.first + len(self._retrieved)), self._retrieved)
        )

    def expired_indexes(self, expire_days: int | None, now: float) -> list[int]:
        """
        Messages the EXPIRE policy removes at UPDATE (RFC 2449 section 6.7).

        ``EXPIRE 0`` is an implicit DELE of each message retrieved with RETR
        in this session, as the RFC puts it; a message another program
        marked seen is not touched.  With ``n`` days, a message expires once
        it has been retrieved (in this session, or marked seen by an earlier
        one) and was delivered at least ``n`` days ago.  Stores that cannot
        tell delivery times expire only with 0.  Only messages the session
        shows expire: the ones a cap leaves out are not the client's to
        judge (RFC 2449 section 6.7 lets a server keep mail longer).
        """
        if expire_days is None:
            return []
        first = self.first
        deleted, retrieved = self._deleted, self._retrieved
        if expire_days == 0:
            return [first + i for i, mark in enumerate(retrieved) if mark and not deleted[i]]
        listing = self.listing
        seen = listing.seen
        received = listing.received
        if received is None:
            return []
        cutoff = now - expire_days * SECONDS_PER_DAY
        expired = []
        for i in range(len(deleted)):
            index = first + i
            if deleted[i] or received[index] > cutoff:
                continue
            if retrieved[i] or (seen is not None and seen[index]):
                expired.append(index)
        return expired
