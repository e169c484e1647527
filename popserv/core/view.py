"""
A session's view of a maildrop: numbering, deletion marks, totals (pure).

RFC 1939 semantics kept in one place: messages are numbered from 1 in
listing order for the whole session; a message marked deleted vanishes from
STAT, LIST and UIDL and cannot be read or deleted again; RSET unmarks all;
only the UPDATE state (after QUIT) turns marks into deletions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from popserv.core.errors import MessageDeleted, NoSuchMessage

if TYPE_CHECKING:
    # Only a type: the core never imports the stores at run time.
    from popserv.interfaces import Listing

SECONDS_PER_DAY = 86400


class MaildropView:
    """Deletion and retrieval marks over a :class:`Listing`, with O(1) STAT."""

    __slots__ = ("_count", "_deleted", "_octets", "_retrieved", "listing")

    def __init__(self, listing: Listing) -> None:
        self.listing = listing
        # One byte per message rather than a set: 100,000 messages cost 100 KB.
        self._deleted = bytearray(len(listing))
        self._retrieved = bytearray(len(listing))
        self._count = len(listing)
        self._octets = sum(listing.sizes)

    def stat(self) -> tuple[int, int]:
        """Number and total size of the messages not marked deleted."""
        return self._count, self._octets

    def index(self, number: int) -> int:
        """The 0-based index of message ``number``, if it exists and is not deleted."""
        if not 1 <= number <= len(self.listing):
            raise NoSuchMessage("message number out of range")
        index = number - 1
        if self._deleted[index]:
            raise MessageDeleted("message already deleted")
        return index

    def size(self, number: int) -> int:
        return self.listing.sizes[self.index(number)]

    def uid(self, number: int) -> str:
        return self.listing.uids[self.index(number)]

    def live_runs(self, most: int = 1024) -> Iterator[range]:
        """
        The indexes (from 0) of the messages not marked deleted, as runs of
        consecutive ones, each at most ``most`` long: a listing of 100,000
        messages is formatted a run at a time, without a step per message.
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
        index = self.index(number)
        self._deleted[index] = 1
        self._count -= 1
        self._octets -= self.listing.sizes[index]

    def retrieved(self, number: int) -> None:
        """Remember that message ``number`` was sent whole with RETR."""
        self._retrieved[self.index(number)] = 1

    def reset(self) -> None:
        """Unmark every deletion (RSET)."""
        self._deleted = bytearray(len(self.listing))
        self._count = len(self.listing)
        self._octets = sum(self.listing.sizes)

    def deleted_indexes(self) -> list[int]:
        return [i for i, mark in enumerate(self._deleted) if mark]

    def retrieved_indexes(self) -> list[int]:
        return [i for i, mark in enumerate(self._retrieved) if mark]

    def expired_indexes(self, expire_days: int | None, now: float) -> list[int]:
        """
        Messages the EXPIRE policy removes at UPDATE (RFC 2449 section 6.7).

        ``EXPIRE 0`` is an implicit DELE of each message retrieved with RETR
        in this session, as the RFC puts it; a message another program
        marked seen is not touched.  With ``n`` days, a message expires once
        it has been retrieved (in this session, or marked seen by an earlier
        one) and was delivered at least ``n`` days ago.  Stores that cannot
        tell delivery times expire only with 0.
        """
        if expire_days is None:
            return []
        if expire_days == 0:
            return [i for i in self.retrieved_indexes() if not self._deleted[i]]
        listing = self.listing
        seen = listing.seen
        received = listing.received
        if received is None:
            return []
        cutoff = now - expire_days * SECONDS_PER_DAY
        expired = []
        for i in range(len(listing)):
            if self._deleted[i] or received[i] > cutoff:
                continue
            if self._retrieved[i] or (seen is not None and seen[i]):
                expired.append(i)
        return expired
