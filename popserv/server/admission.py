"""
Admission: who may connect, who may try a password when, and how many
sessions a user may hold; one interface for POP3, SMTP and LMTP.

Every question returns a ``Deferred``, so an implementation may ask another
process (the parent of worker processes) or a database (a cluster's nodes);
:class:`LocalAdmission` answers from tables in this process, at once except
for the waits it imposes on login attempts.  What it grants is a lease,
given back with ``release()`` on every path out of a session.

The failed-login penalty is a property of the client (an IPv4 address or an
IPv6 network, see :meth:`popserv.server.policy.Policy.client_key`), not of one
attempt: while a client is penalised, its login attempts take turns, one
credential check at a time, and each waits out the penalty before its
check.  Twenty connections in parallel then guess no faster than one.
Trusted clients (``Policy.trusted_networks``) and UNIX sockets, whose key
is None, are neither counted nor penalised beyond the fixed delay.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import define
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from popserv.core.errors import TooManySessions
from popserv.server.penalty import PenaltyTable
from popserv.server.policy import Policy
from popserv.server.transports import IStreamTransport

if TYPE_CHECKING:
    from popserv.server.metrics import Metrics

log = Logger()

T = TypeVar("T")


class OverLimit(Exception):
    """A connection refused: too many in all, or from this client (the text says which)."""


class ILease(Interface):
    """Something admission granted and counts until it is given back."""

    def release() -> None:
        """Give it back; later calls do nothing."""


class ILoginTurn(Interface):
    """One login attempt's turn to have its credentials checked."""

    started = Attribute("When the attempt began (the clock's seconds), before any wait.")

    def failed(user: str) -> Deferred[float]:
        """
        The check refused ``user``: count it, end the turn, and fire with how
        many seconds after :attr:`started` the ``-ERR`` is due.
        """

    def succeeded(user: str) -> None:
        """The check passed for ``user``: forgive its failures from this client, end the turn."""

    def release() -> None:
        """End the turn without a verdict (the client went away); later calls do nothing."""


class IAdmission(Interface):
    """The limits of :class:`popserv.server.policy.Policy`, enforced for every listener."""

    def connection(service: str, client: str | None) -> Deferred[ILease]:
        """
        A connection of ``service`` (``"pop3"``, ``"smtp"``, ``"lmtp"``) from
        ``client`` (None: trusted, not counted per client); fails with
        :class:`OverLimit` over ``max_connections`` or ``max_connections_per_ip``.
        """

    def user_session(user: str) -> Deferred[ILease]:
        """A session logged in as ``user``; fails with ``TooManySessions`` at the limit."""

    def login_turn(client: str | None) -> Deferred[ILoginTurn]:
        """
        Fires when a login attempt from ``client`` may have its credentials
        checked: after the client's earlier attempts' checks (while it is
        penalised) and its penalty.  Cancelling it gives up the place.
        """


@implementer(ILease)
class _Lease:
    """A count taken from a Counter, given back once."""

    __slots__ = ("_counter", "_key")

    def __init__(self, counter: Counter[Any] | None, key: object) -> None:
        self._counter = counter
        self._key = key

    def release(self) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            counter[self._key] -= 1
            if counter[self._key] <= 0:
                del counter[self._key]


@implementer(ILease)
class _Leases:
    """Several leases given back together."""

    __slots__ = ("_leases",)

    def __init__(self, *leases: _Lease) -> None:
        self._leases = leases

    def release(self) -> None:
        leases, self._leases = self._leases, ()
        for lease in leases:
            lease.release()


@implementer(ILoginTurn)
class _Turn:
    def __init__(
        self,
        admission: LocalAdmission,
        client: str | None,
        started: float,
        lock: DeferredLock | None,
    ) -> None:
        self._admission = admission
        self._client = client
        self.started = started
        self._lock = lock

    def failed(self, user: str) -> Deferred[float]:
        admission = self._admission
        if self._client is None:
            self.release()
            return succeed(admission.policy.auth_failure_delay)
        # The turn passes on once the failure is counted, so the client's
        # next attempt sees it.
        counted = admission.count_failure(self._client, user)
        return counted.addBoth(self._passed_on)

    def _passed_on(self, result: T) -> T:
        self.release()
        return result

    def succeeded(self, user: str) -> None:
        if self._client is not None:
            self._admission.forgive(self._client, user)
        self.release()

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            self._admission._turn_over(self._client, lock)


@implementer(IAdmission)
class LocalAdmission:
    """:class:`IAdmission` for one process: counters, the penalty table, a lock per client."""

    def __init__(self, policy: Policy, clock: IReactorTime) -> None:
        self.policy = policy
        self.clock = clock
        #: Open connections by service, in all and by client.
        self.connections: Counter[str] = Counter()
        self.connections_per_client: Counter[tuple[str, str]] = Counter()
        #: Logged-in sessions by user.
        self.user_sessions: Counter[str] = Counter()
        #: Failed logins by client, and by user within it.
        self.penalties = PenaltyTable(
            clock,
            initial=policy.auth_failure_delay,
            maximum=policy.auth_failure_max_delay,
            expiry=policy.auth_penalty_expiry,
            capacity=policy.auth_penalty_clients,
        )
        #: Penalised clients' turns; a lock exists while someone holds or waits for it.
        self._turns: dict[str, DeferredLock] = {}

    def clients(self, service: str) -> dict[str, int]:
        """Open connections of ``service`` by client (trusted ones are not counted)."""
        return {
            client: count
            for (name, client), count in self.connections_per_client.items()
            if name == service
        }

    def connection(self, service: str, client: str | None) -> Deferred[ILease]:
        policy = self.policy
        if self.connections[service] >= policy.max_connections:
            return fail(OverLimit(f"{policy.max_connections} connections in all"))
        total = _Lease(self.connections, service)
        if client is None:
            self.connections[service] += 1
            return succeed(total)
        key = (service, client)
        if self.connections_per_client[key] >= policy.max_connections_per_ip:
            return fail(OverLimit(f"{policy.max_connections_per_ip} connections from {client}"))
        self.connections[service] += 1
        self.connections_per_client[key] += 1
        return succeed(_Leases(total, _Lease(self.connections_per_client, key)))

    def count_failure(self, client: str, user: str) -> Deferred[float]:
        """Count a failed login; fire with how long after its start its ``-ERR`` is due."""
        return succeed(self.penalties.failed(client, user))

    def forgive(self, client: str, user: str) -> None:
        """``user`` logged in from ``client``: forget that user's failures from it."""
        self.penalties.succeeded(client, user)

    def user_session(self, user: str) -> Deferred[ILease]:
        limit = self.policy.max_user_sessions
        if self.user_sessions[user] >= limit:
            return fail(TooManySessions(f"{limit} sessions already"))
        self.user_sessions[user] += 1
        return succeed(_Lease(self.user_sessions, user))

    def login_turn(self, client: str | None) -> Deferred[ILoginTurn]:
        started = self.clock.seconds()
        if client is None:
            return succeed(_Turn(self, None, started, None))
        if not self.penalties.failures(client) and client not in self._turns:
            return succeed(_Turn(self, client, started, None))
        return Deferred.fromCoroutine(self._penalised_turn(client, started))

    async def _penalised_turn(self, client: str, started: float) -> ILoginTurn:
        lock = self._turns.get(client)
        if lock is None:
            lock = self._turns[client] = DeferredLock()
        # Exception, not BaseException: a suspended coroutine that is garbage
        # collected gets GeneratorExit, and must not then pass turns on.
        try:
            await lock.acquire()
        except Exception:
            self._forget_lock(client, lock)
            raise
        turn = _Turn(self, client, started, lock)
        try:
            delay = self.penalties.delay(client)
            if delay > 0:
                await deferLater(self.clock, delay)
        except Exception:
            turn.release()
            raise
        return turn

    def _turn_over(self, client: str | None, lock: DeferredLock) -> None:
        lock.release()
        if client is not None:
            self._forget_lock(client, lock)

    def _forget_lock(self, client: str, lock: DeferredLock) -> None:
        if not lock.locked and not lock.waiting and self._turns.get(client) is lock:
            del self._turns[client]


# The listeners' side: asking at accept time, refusing cheaply, waiting.


def answered(result: Deferred[T]) -> T | Failure | None:
    """What ``result`` has fired with (taking it), or None while it has not fired."""
    if not result.called:
        return None
    box: list[T | Failure] = []
    result.addBoth(box.append)
    return box[0] if box else None


@define
class Admitted:
    """Admission's answer to a new connection, as a listener's factory sees it."""

    #: The lease granted at once, or None.
    lease: ILease | None = None
    #: The question still open (an implementation asking elsewhere), or None.
    pending: Deferred[ILease] | None = None
    #: Why the connection is refused, or None.
    refused: str | None = None


#: Why a connection is refused when admission itself failed.
ADMISSION_FAILED = "admission failed"


def ask(admission: IAdmission, service: str, client: str | None) -> Admitted:
    """Ask ``admission`` about a new connection, from a factory's ``buildProtocol``."""
    question = admission.connection(service, client)
    answer = answered(question)
    if answer is None:
        return Admitted(pending=question)
    if isinstance(answer, Failure):
        if not answer.check(OverLimit):
            log.failure("Admitting a connection failed", answer)
            return Admitted(refused=ADMISSION_FAILED)
        return Admitted(refused=answer.getErrorMessage())
    return Admitted(lease=answer)


class RefusedConnection(Protocol):
    """
    A connection over the limits: one fixed line and a close, with no session
    behind it and nothing read.

    On implicit TLS (port 995) the line would need a TLS handshake first,
    the costliest part of a connection and exactly what a flood is after;
    such connections are closed at once, before the handshake, and clients
    report a failed connection, which they retry like the refusal.
    """

    #: Set by makeConnection (see popserv.server.transports).
    transport: IStreamTransport

    def __init__(self, line: bytes) -> None:
        self.line = line

    def connectionMade(self) -> None:
        if interfaces.ISSLTransport.providedBy(self.transport):
            self.transport.abortConnection()
            return
        self.transport.write(self.line)
        self.transport.loseConnection()


def wait_for_admission(
    transport: IStreamTransport,
    pending: Deferred[ILease],
    start: Callable[[ILease], object],
    refusal: bytes,
    gone: Callable[[], bool],
) -> None:
    """
    Hold a new connection (nothing read, nothing said) until admission
    answers: then ``start`` the session with its lease, or send ``refusal``
    and close.  ``gone`` says whether the client left meanwhile; then a late
    lease is given straight back.
    """
    transport.pauseProducing()

    def admitted(lease: ILease) -> None:
        if gone():
            lease.release()
            return
        transport.resumeProducing()
        start(lease)

    def refused(failure: Failure) -> None:
        if not failure.check(OverLimit):
            log.failure("Admitting a connection failed", failure)
        if not gone():
            transport.write(refusal)
            transport.loseConnection()

    pending.addCallbacks(admitted, refused)


class RefusalLog:
    """
    Log refused connections at most once per :attr:`INTERVAL`, with a count,
    so that a flood does not become a flood of log lines as well.
    """

    INTERVAL = 60.0

    def __init__(self, clock: IReactorTime, service: str) -> None:
        self._clock = clock
        self._service = service
        self._refused = 0
        self._logged_at: float | None = None
        #: Told of every refusal, when metrics are on (see popserv.server.metrics).
        self.metrics: Metrics | None = None

    def refused(self, peer: str, why: str) -> None:
        self._refused += 1
        if self.metrics is not None:
            self.metrics.refused(self._service.lower(), why)
        now = self._clock.seconds()
        if self._logged_at is None or now - self._logged_at >= self.INTERVAL:
            log.warn(
                "Refused {count} {service} connection(s) over the limits since the last such"
                " message; the latest from {peer}: {why}",
                count=self._refused,
                service=self._service,
                peer=peer,
                why=why,
            )
            self._refused = 0
            self._logged_at = now


def refusal_reason(why: str) -> str:
    """
    The kind of a refusal, from its text (:class:`OverLimit`'s, or
    :func:`ask`'s): a bounded label for metrics, since the text itself may
    name the client.
    """
    if why.endswith(" connections in all"):
        return "max_connections"
    if " connections from " in why:
        return "max_connections_per_ip"
    if why == ADMISSION_FAILED:
        return "admission_failed"
    return "other"


def client_key(policy: Policy, peer: IAddress | None) -> str | None:
    """The key per-client limits count by; None for trusted clients and UNIX sockets."""
    return None if policy.is_trusted(peer) else policy.client_key(peer)


__all__ = [
    "Admitted",
    "IAdmission",
    "ILease",
    "ILoginTurn",
    "LocalAdmission",
    "OverLimit",
    "RefusalLog",
    "RefusedConnection",
    "answered",
    "ask",
    "client_key",
    "refusal_reason",
    "wait_for_admission",
]
