"""
Failed logins per client, and how long that client's next answers wait.

Like Dovecot's auth_penalty: a client's first failed login is answered
after ``initial`` seconds, and each further failure doubles that, up to
``maximum`` (2, 4, 8, 15 s); a successful login from the client, or
``expiry`` seconds without a failure, forgets it.  While a client has a
penalty, each of its login attempts waits before the credentials are even
checked, so running many attempts in parallel, or hanging up instead of
waiting for the ``-ERR``, gains an attacker nothing.

Pure apart from the clock it reads: no timers, no I/O.  The table is
bounded: it holds at most ``capacity`` clients, forgetting the one that
failed least recently first, and drops expired entries as it goes.
"""

from __future__ import annotations

from collections import OrderedDict

from attrs import define
from twisted.internet.interfaces import IReactorTime


@define
class _Entry:
    failures: int
    last: float


class PenaltyTable:
    """Failed-login counts by client key (see :meth:`popserv.policy.Policy.client_key`)."""

    def __init__(
        self,
        clock: IReactorTime,
        initial: float = 2.0,
        maximum: float = 15.0,
        expiry: float = 900.0,
        capacity: int = 10_000,
    ) -> None:
        self._clock = clock
        self.initial = initial
        self.maximum = maximum
        self.expiry = expiry
        self.capacity = capacity
        #: Least recently failing first.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def penalty(self, failures: int) -> float:
        """The delay that ``failures`` failed logins earn: 0, then initial doubling to maximum."""
        if failures <= 0:
            return 0.0
        # Capped before it is computed: 2.0 ** 10_000 overflows.
        doublings = min(failures - 1, 64)
        return min(self.initial * 2.0**doublings, self.maximum)

    def failures(self, key: str) -> int:
        """The failed logins remembered for ``key``."""
        self._expire()
        entry = self._entries.get(key)
        return 0 if entry is None else entry.failures

    def delay(self, key: str) -> float:
        """How long a new login attempt from ``key`` waits before it is checked."""
        return self.penalty(self.failures(key))

    def failed(self, key: str) -> float:
        """
        Count a failed login from ``key``; return how long after the attempt
        began its ``-ERR`` is due.
        """
        self._expire()
        now = self._clock.seconds()
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = _Entry(0, now)
        entry.failures += 1
        entry.last = now
        self._entries[key] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return self.penalty(entry.failures)

    def succeeded(self, key: str) -> None:
        """A login from ``key`` succeeded: forget its failures."""
        self._entries.pop(key, None)

    def _expire(self) -> None:
        """Drop the entries whose last failure is older than :attr:`expiry`."""
        cutoff = self._clock.seconds() - self.expiry
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.last > cutoff:
                break
            del entries[key]


__all__ = ["PenaltyTable"]
