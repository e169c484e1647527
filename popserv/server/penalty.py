"""
Failed logins per client, and how long that client's next answers wait.

Like Dovecot's auth_penalty: a client's first failed login is answered
after ``initial`` seconds, and each further failure doubles that, up to
``maximum`` (2, 4, 8, 15 s); ``expiry`` seconds without a failure forget
it.  Failures are counted per client and, within it, per user name tried
(as Dovecot's anvil does): a successful login forgives only that user's
failures, so an attacker who can log in to an account of their own cannot
wipe out the penalty their guesses at other accounts earned.  While a
client has a penalty, each of its login attempts waits before the
credentials are even checked (see :mod:`popserv.server.admission`).

Pure apart from the clock it reads: no timers, no I/O.  The table is
bounded: it holds at most ``capacity`` clients, forgetting the one that
failed least recently first, and drops expired entries as it goes.
"""

from __future__ import annotations

from collections import OrderedDict

from attrs import define
from twisted.internet.interfaces import IReactorTime

#: User names remembered per client; further ones share one count that no
#: success forgives (a client trying thousands of names is guessing).
MAX_USERS_PER_CLIENT = 64

#: The count of the user names past :data:`MAX_USERS_PER_CLIENT`.
_OTHERS = "\0others"


@define
class _Entry:
    failures: int
    last: float
    #: Failures by user name tried; they add up to :attr:`failures`.
    by_user: dict[str, int]


class PenaltyTable:
    """Failed-login counts by client key (see :meth:`popserv.server.policy.Policy.client_key`)."""

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

    def in_force(self) -> int:
        """How many clients a penalty holds back now (their failures not yet expired)."""
        self._expire()
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

    def failed(self, key: str, user: str = "") -> float:
        """
        Count a failed login from ``key`` as ``user``; return how long after
        the attempt began its ``-ERR`` is due.
        """
        self._expire()
        now = self._clock.seconds()
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = _Entry(0, now, {})
        entry.failures += 1
        entry.last = now
        by_user = entry.by_user
        if user not in by_user and len(by_user) >= MAX_USERS_PER_CLIENT:
            user = _OTHERS
        by_user[user] = by_user.get(user, 0) + 1
        self._entries[key] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return self.penalty(entry.failures)

    def settle(self, key: str, failures: int) -> None:
        """
        ``key`` has ``failures`` in all, as counted where every node counts
        them (see :mod:`popserv.server.sharedadmission`): that count replaces
        this table's, which keeps no per-user breakdown of it.
        """
        self._expire()
        if failures <= 0:
            self._entries.pop(key, None)
            return
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(0, self._clock.seconds(), {})
        entry.failures = failures
        entry.by_user = {_OTHERS: failures}
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def succeeded(self, key: str, user: str = "") -> None:
        """``user`` logged in from ``key``: forgive that user's failures from it."""
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.failures -= entry.by_user.pop(user, 0)
        if entry.failures <= 0:
            del self._entries[key]

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
