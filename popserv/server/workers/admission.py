"""
Admission across worker processes: the parent answers, the workers ask.

With ``--workers N`` the limits must hold as in one process: a client
cannot multiply its connection allowance, its failed-login penalty or a
user's session count by N.  So one :class:`~popserv.server.admission.LocalAdmission`
in the parent answers for all of them; each worker is connected to it by
a stream socket (a ``socket.socketpair()`` made before the worker starts),
and asks in the short lines of :mod:`popserv.server.workers.channel`.

The parent's end, :class:`AdmissionServer`, remembers what each worker
holds (its connections' and users' leases, its login turns, and the
questions still open) and gives all of it back when the worker's
connection ends, however it ends: the worker exited, crashed or was killed
with SIGKILL, its socket is closed by the kernel and the parent reads EOF.

The worker's end, :class:`RemoteAdmission`, provides ``IAdmission``; its
leases and turns are proxies holding an id.  Once the connection to the
parent is lost it fails closed: every new question fails with
:class:`AdmissionUnavailable` (a refused
connection, a ``-ERR [SYS/TEMP]`` login), since a worker on its own could
only admit without limits.

Time: the penalty's waits happen in the parent, on its clock (the turn is
answered when it begins).  A turn's ``started``, which the protocol
subtracts from its own clock's now to serve the rest of a failed login's
delay (see ``popserv.server.signin``), is the worker's clock when it
asked: the same instant as the parent's start give or take the message's
transit, and on the clock the worker computes with.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IReactorSocket, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.core.errors import TemporaryFailure, TooManySessions
from popserv.server.admission import IAdmission, ILease, ILoginTurn, OverLimit
from popserv.server.workers.channel import Channel, Fields, RemoteError

log = Logger()

# The worker's questions (answered) and verdicts (not), by op: the id of a
# question names the lease or turn it grants.
CONNECT = b"C"  # service, client: IAdmission.connection
USER_SESSION = b"U"  # user: IAdmission.user_session
LOGIN_TURN = b"T"  # client: IAdmission.login_turn, answered when the turn begins
FAILED = b"F"  # user: ILoginTurn.failed of turn ID, answered with the seconds it is due
SUCCEEDED = b"S"  # user: ILoginTurn.succeeded of turn ID
RELEASE = b"R"  # give back lease or turn ID, or give up the question ID still open
# The parent's questions to a worker: QUERY, a kind and its argument (JSON),
# answered with JSON (what :meth:`RemoteAdmission.answer` registered).
QUERY = b"Q"

#: Seconds the parent waits for a worker's answer to who, kick or metrics.
ASK_TIMEOUT = 10.0

# Error codes.  Any other failure in the parent is logged there and
# answered as FAILED.
OVER_LIMIT = "OVER"
TOO_MANY_SESSIONS = "SESSIONS"
UNAVAILABLE = "FAILED"
CANCELLED = "CANCELLED"


class AdmissionUnavailable(TemporaryFailure, OverLimit):
    """
    The parent's admission cannot be asked (the connection to it is gone) or
    failed to answer.  Refused, never admitted without limits: as an
    :class:`OverLimit` a listener refuses the connection (and its refusal
    log counts it, once a minute, rather than a traceback each); as a
    ``TemporaryFailure`` a login answers ``-ERR [SYS/TEMP]``.
    """


class Given(Exception):
    """The worker gave the question up (a release before the answer): no answer is wanted."""


# The parent's side.


class AdmissionServer(Channel):
    """
    The parent's end of one worker's connection: answers its questions from
    ``admission`` (shared by every worker), gives back all the worker holds
    when the connection is lost, and asks the worker (:meth:`ask`).
    """

    answered = frozenset({CONNECT, USER_SESSION, LOGIN_TURN, FAILED})

    def __init__(self, admission: IAdmission, name: str = "worker") -> None:
        super().__init__()
        self.admission = admission
        #: Which worker, for the log.
        self.name = name
        #: What the worker holds, by the id it gave: leases and turns.
        self.held: dict[int, ILease | ILoginTurn] = {}
        #: Questions not answered yet, by id (a turn waiting for its penalty).
        self.open: dict[int, Deferred[Any]] = {}
        #: Open questions the worker gave up: what they grant is given straight back.
        self._given_up: set[int] = set()
        self._lost_waiters: list[Deferred[None]] = []
        self.handlers.update({
            CONNECT: self._connection,
            USER_SESSION: self._user_session,
            LOGIN_TURN: self._login_turn,
            FAILED: self._failed,
            SUCCEEDED: self._succeeded,
            RELEASE: self._release,
        })

    def when_lost(self) -> Deferred[None]:
        """Fires once the worker's connection is lost and all it held is given back."""
        d: Deferred[None] = Deferred()
        if self.lost:
            d.callback(None)
        else:
            self._lost_waiters.append(d)
        return d

    def ask(self, kind: str, argument: Any = None, timeout: float = ASK_TIMEOUT) -> Deferred[Any]:
        """
        Ask the worker what it answers ``kind`` with (see
        :meth:`RemoteAdmission.answer`); a worker stuck for ``timeout``
        seconds fails it with ``TimeoutError``.
        """
        from twisted.internet import reactor

        answer = self.call(QUERY, self.next_id(), kind, json.dumps(argument))
        answer.addTimeout(timeout, cast(IReactorTime, reactor))
        return answer.addCallback(lambda fields: json.loads(fields[0] or "null"))

    def peer_name(self) -> str:
        return self.name

    # Questions

    def _connection(self, id: int, service: str, client: str | None) -> Deferred[Fields]:
        return self._grant(id, lambda: self.admission.connection(service, client))

    def _user_session(self, id: int, user: str) -> Deferred[Fields]:
        return self._grant(id, lambda: self.admission.user_session(user))

    def _login_turn(self, id: int, client: str | None) -> Deferred[Fields]:
        return self._grant(id, lambda: self.admission.login_turn(client))

    def _grant(self, id: int, ask: Callable[[], Deferred[Any]]) -> Deferred[Fields]:
        """Ask the shared admission; hold what it grants under ``id``."""
        if id in self.held or id in self.open:
            log.error("{worker} reused admission id {id}", worker=self.name, id=id)
            return fail(AdmissionUnavailable(f"id {id} in use"))
        try:
            question = ask()
        except Exception:
            return self._unexpected(Failure())
        self.open[id] = question
        # A LocalAdmission answers most questions at once: then this runs
        # now, and the id is held before the answer is even sent.
        return question.addCallbacks(
            self._granted, self._refused, callbackArgs=(id,), errbackArgs=(id,)
        )

    def _granted(self, granted: ILease | ILoginTurn, id: int) -> Fields:
        del self.open[id]
        if self.lost or id in self._given_up:
            self._given_up.discard(id)
            granted.release()
            raise Given()
        self.held[id] = granted
        return ()

    def _refused(self, failure: Failure, id: int) -> Failure | Deferred[Fields]:
        self.open.pop(id, None)
        given_up = id in self._given_up
        self._given_up.discard(id)
        if failure.check(OverLimit, TooManySessions):
            return failure
        if failure.check(CancelledError) and (self.lost or given_up):
            return Failure(Given())
        return self._unexpected(failure)

    def _unexpected(self, failure: Failure) -> Deferred[Fields]:
        log.failure("Admission failed to answer {worker}", failure, worker=self.name)
        return fail(AdmissionUnavailable("admission failed in the parent"))

    def error_code(self, failure: Failure) -> str | None:
        # The specific first: an AdmissionUnavailable is an OverLimit too.
        if failure.check(AdmissionUnavailable):
            return UNAVAILABLE
        if failure.check(Given):
            return CANCELLED
        if failure.check(OverLimit):
            return OVER_LIMIT
        if failure.check(TooManySessions):
            return TOO_MANY_SESSIONS
        return None

    # Verdicts

    def _failed(self, id: int, user: str) -> Deferred[Fields]:
        turn = self.held.pop(id, None)
        if not ILoginTurn.providedBy(turn):
            if turn is not None:
                self.held[id] = turn
            return fail(AdmissionUnavailable(f"no login turn {id}"))
        return turn.failed(user).addCallback(lambda due: (repr(float(due)),))

    def _succeeded(self, id: int, user: str) -> None:
        turn = self.held.get(id)
        if ILoginTurn.providedBy(turn):
            del self.held[id]
            turn.succeeded(user)

    def _release(self, id: int) -> None:
        held = self.held.pop(id, None)
        if held is not None:
            held.release()
        elif id in self.open:
            # Given up before the answer: a turn gives up its place (the
            # Deferred's canceller); a lease is given back when it comes.
            self._given_up.add(id)
            self.open[id].cancel()

    # The connection

    def connectionLost(self, reason: Failure = Failure(ConnectionClosed())) -> None:  # noqa: B008
        self.lost = True
        leases = turns = 0
        for held in self.held.values():
            if ILoginTurn.providedBy(held):
                turns += 1
            else:
                leases += 1
        waiting = len(self.open)
        everything, self.held = self.held, {}
        for thing in everything.values():
            try:
                thing.release()
            except Exception:
                log.failure("Giving back what {worker} held failed", worker=self.name)
        for question in list(self.open.values()):
            question.cancel()
        log.info(
            "{worker}'s admission connection ended ({reason}): gave back {leases} lease(s),"
            " {turns} login turn(s), gave up {waiting} waiting",
            worker=self.name,
            reason=reason.getErrorMessage(),
            leases=leases,
            turns=turns,
            waiting=waiting,
        )
        super().connectionLost(reason)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)


def serve_admission(
    sock: socket.socket, admission: IAdmission, reactor: IReactorSocket, name: str = "worker"
) -> AdmissionServer:
    """
    The parent's end of a worker's admission socket (a connected UNIX
    stream socket, one end of ``socket.socketpair()``): answer from
    ``admission`` on ``reactor``.  The reactor takes a duplicate of the
    socket and ``sock`` is closed.

    The other end must not stay open in the parent once the worker has it
    (close it after spawning the worker), or the worker's death is never
    seen: the kernel signals EOF only when every copy is closed.
    """
    server = AdmissionServer(admission, name)
    _adopt(reactor, sock.fileno(), server)
    sock.close()
    return server


# The worker's side.


@implementer(ILease)
class _RemoteLease:
    """A lease the parent holds for this worker under :attr:`id`."""

    __slots__ = ("_admission", "id")

    def __init__(self, admission: RemoteAdmission, id: int) -> None:
        self._admission: RemoteAdmission | None = admission
        self.id = id

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.protocol.send(RELEASE, self.id)


@implementer(ILoginTurn)
class _RemoteTurn:
    """A login turn the parent holds for this worker under :attr:`id`."""

    def __init__(self, admission: RemoteAdmission, id: int, started: float) -> None:
        self._admission: RemoteAdmission | None = admission
        self.id = id
        #: The worker's clock when it asked (see the module's docstring).
        self.started = started

    def failed(self, user: str) -> Deferred[float]:
        admission, self._admission = self._admission, None
        if admission is None:
            return fail(AdmissionUnavailable(f"login turn {self.id} already over"))
        answer = admission._call(FAILED, self.id, user)
        return answer.addCallback(lambda fields: float(fields[0]))

    def succeeded(self, user: str) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.protocol.send(SUCCEEDED, self.id, user)

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.protocol.send(RELEASE, self.id)


#: How the worker raises the parent's error codes.
_ERRORS: dict[str, Callable[[str], Exception]] = {
    OVER_LIMIT: OverLimit,
    TOO_MANY_SESSIONS: TooManySessions,
    CANCELLED: lambda _: Given(),
}


class _ParentConnection(Channel):
    """The worker's end: asks, answers the parent's queries, tells its admission when lost."""

    answered = frozenset({QUERY})

    def __init__(self, lost: Callable[[Failure], None]) -> None:
        super().__init__()
        self._on_lost = lost
        #: What a QUERY of each kind is answered with.
        self.queries: dict[str, Callable[[Any], Any]] = {}
        self.handlers[QUERY] = self._query

    def _query(self, id: int, kind: str, argument: str) -> Deferred[Fields]:
        answer = self.queries.get(kind)
        if answer is None:
            return fail(LookupError(f"nothing answers {kind!r} here"))
        return Deferred.fromCoroutine(_answered(answer, json.loads(argument)))

    def peer_name(self) -> str:
        return "the parent"

    def connectionLost(self, reason: Failure = Failure(ConnectionClosed())) -> None:  # noqa: B008
        # The open questions fail first (with the reason), then we refuse new ones.
        super().connectionLost(reason)
        self._on_lost(reason)


async def _answered(answer: Callable[[Any], Any], argument: Any) -> Fields:
    result = answer(argument)
    if isinstance(result, Deferred):
        result = await result
    return (json.dumps(result),)


@implementer(IAdmission)
class RemoteAdmission:
    """
    :class:`~popserv.server.admission.IAdmission` answered by the parent
    process over a connection made with :func:`connect_admission`.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.protocol = _ParentConnection(self._lost)
        #: Why the connection to the parent ended; None while it is up.
        self.gone: str | None = None
        self._lost_waiters: list[Deferred[None]] = []

    def when_lost(self) -> Deferred[None]:
        """Fires when the connection to the parent is lost (a worker should then stop)."""
        d: Deferred[None] = Deferred()
        if self.gone is not None:
            d.callback(None)
        else:
            self._lost_waiters.append(d)
        return d

    def answer(self, kind: str, answer: Callable[[Any], Any]) -> None:
        """
        Answer the parent's ``ask(kind, argument)`` with ``answer(argument)``
        (JSON in and out; a Deferred is waited for).
        """
        self.protocol.queries[kind] = answer

    def connection(self, service: str, client: str | None) -> Deferred[ILease]:
        id = self.protocol.next_id()
        return self._call(CONNECT, id, service, client).addCallback(
            lambda _: _RemoteLease(self, id)
        )

    def user_session(self, user: str) -> Deferred[ILease]:
        id = self.protocol.next_id()
        return self._call(USER_SESSION, id, user).addCallback(lambda _: _RemoteLease(self, id))

    def login_turn(self, client: str | None) -> Deferred[ILoginTurn]:
        started = self.clock.seconds()
        id = self.protocol.next_id()

        def give_up(_: Deferred[ILoginTurn]) -> None:
            self.protocol.send(RELEASE, id)

        turn: Deferred[ILoginTurn] = Deferred(give_up)

        def began(_: object) -> None:
            if not turn.called:
                turn.callback(_RemoteTurn(self, id, started))

        def refused(failure: Failure) -> None:
            if not turn.called:
                turn.errback(failure)

        self._call(LOGIN_TURN, id, client).addCallbacks(began, refused)
        return turn

    def _call(self, op: bytes, id: int, *fields: str | None) -> Deferred[Any]:
        """Ask the parent; fail closed if it cannot be asked."""
        if self.gone is not None:
            return fail(AdmissionUnavailable(f"no admission: {self.gone}"))
        return self.protocol.call(op, id, *fields).addErrback(self._refusal)

    def _refusal(self, failure: Failure) -> Failure:
        if failure.check(ConnectionClosed):
            return Failure(AdmissionUnavailable(f"no admission: {failure.getErrorMessage()}"))
        error = failure.value
        if isinstance(error, RemoteError):
            return Failure(_ERRORS.get(error.code, AdmissionUnavailable)(error.text))
        return failure

    def _lost(self, reason: Failure) -> None:
        self.gone = reason.getErrorMessage()
        log.error(
            "Lost the connection to the parent's admission ({reason}): refusing every"
            " connection and login from now on",
            reason=self.gone,
        )
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)


def connect_admission(
    fd: int, reactor: IReactorSocket, clock: IReactorTime | None = None
) -> RemoteAdmission:
    """
    The worker's end: a :class:`RemoteAdmission` asking over the connected
    UNIX stream socket ``fd`` (inherited from the parent).  The reactor
    takes a duplicate and ``fd`` is closed.  ``clock`` (the reactor by
    default) is what login turns' ``started`` is read from: the clock the
    POP3 factory computes with.
    """
    admission = RemoteAdmission(clock or cast(IReactorTime, reactor))
    _adopt(reactor, fd, admission.protocol)
    os.close(fd)
    return admission


def _adopt(reactor: IReactorSocket, fd: int, protocol: Protocol) -> None:
    """Serve ``protocol`` on the connected UNIX stream socket ``fd``."""
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, _One(protocol))


class _One(ServerFactory):
    """A factory for the one connection adopted: its protocol is made already."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


__all__ = [
    "AdmissionServer",
    "AdmissionUnavailable",
    "RemoteAdmission",
    "connect_admission",
    "serve_admission",
]
