"""
Admission for several nodes on one PostgreSQL: the failed-login penalty
is counted in the database, so a client that spreads its password guesses
over the nodes behind a load balancer waits as long as on one node.

A login attempt reads the client's failures (one indexed query, at most
once a second per client) before its turn, and each failure is counted
there before the turn passes on.
Connection counts stay per node: counting them in the database would make
every accepted connection, a flood's included, a write to it (see
docs/cluster).  Sessions per user are bounded cluster-wide by the
maildrop's lease.  When the database cannot be reached the penalty falls
back to this node's own count, rather than refuse logins for it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.logins.database import Database
from popserv.server.admission import ILoginTurn, LocalAdmission
from popserv.server.policy import Policy
from popserv.stores.postgres import penalties

log = Logger()

#: Failures this node counts between two deletions of those too old to count.
CLEANUP_EVERY = 100
#: Seconds a client's count read from the database is used again without a
#: query: a client logging in again and again (a phone, a NAT) costs one
#: query a second, and a guesser's failures on another node reach this one
#: within a second, a fraction of the penalty's first delay (2 s).
READ_AGAIN_AFTER = 1.0
#: Clients whose last read is remembered.
READS_KEPT = 4096


class SharedAdmission(LocalAdmission):
    """:class:`LocalAdmission` with the failed-login penalty kept in ``database``."""

    def __init__(self, policy: Policy, clock: IReactorTime, database: Database) -> None:
        super().__init__(policy, clock)
        self.database = database
        self._warned_at: float | None = None
        self._counted = 0
        #: When each client's count was last read, least recent first.
        self._read: OrderedDict[str, float] = OrderedDict()

    @property
    def _expiry(self) -> float:
        return self.policy.auth_penalty_expiry

    def login_turn(self, client: str | None) -> Deferred[ILoginTurn]:
        if client is None:
            return super().login_turn(None)
        read = self._read.get(client)
        if read is not None and self.clock.seconds() - read < READ_AGAIN_AFTER:
            return super().login_turn(client)
        expiry = self._expiry
        asked = self.database.run(lambda c: penalties.failures_of(c, client, expiry))

        def known(failures: int) -> Deferred[ILoginTurn]:
            self._settle(client, failures)
            return LocalAdmission.login_turn(self, client)

        def unknown(failure: Failure) -> Deferred[ILoginTurn] | Failure:
            if failure.check(CancelledError):
                return failure
            self._unreachable(failure)
            return LocalAdmission.login_turn(self, client)

        return asked.addCallbacks(known, unknown)

    def count_failure(self, client: str, user: str) -> Deferred[float]:
        local = self.penalties.failed(client, user)
        expiry = self._expiry
        self._counted += 1
        cleanup = self._counted % CLEANUP_EVERY == 0

        def work(connection: Any) -> int:
            if cleanup:
                penalties.forget_expired(connection, expiry)
            return penalties.record_failure(connection, client, user, expiry)

        def counted(failures: int) -> float:
            self._settle(client, failures)
            return self.penalties.penalty(failures)

        def uncounted(failure: Failure) -> float:
            self._unreachable(failure)
            return local

        return self.database.run(work).addCallbacks(counted, uncounted)

    def _settle(self, client: str, failures: int) -> None:
        """The database's count for ``client``, as of now."""
        self.penalties.settle(client, failures)
        self._read.pop(client, None)
        self._read[client] = self.clock.seconds()
        while len(self._read) > READS_KEPT:
            self._read.popitem(last=False)

    def forgive(self, client: str, user: str) -> None:
        # A client without failures (as read within the last second) has
        # nothing to forgive: no statement for the usual login.
        if not self.penalties.failures(client):
            return
        super().forgive(client, user)
        self.database.run(lambda c: penalties.forgive(c, client, user)).addErrback(
            self._unreachable
        )

    def _unreachable(self, failure: Failure) -> None:
        # Once a minute during an outage, not once per login.
        now = self.clock.seconds()
        if self._warned_at is None or now - self._warned_at >= 60:
            self._warned_at = now
            log.warn(
                "Failed logins are counted on this node only while the database is"
                " unavailable: {error}",
                error=failure.getErrorMessage(),
            )
