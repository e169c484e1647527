"""
Stopping without dropping sessions.  On SIGTERM (twistd's "before
shutdown", which waits for the Deferred :meth:`DrainingService.stopService`
returns) a server stops accepting at once, lets its open sessions finish
for a bounded grace period (``--shutdown-grace``), then closes what is left.

What each session does at each step is its own business (POP3:
:meth:`popserv.server.protocol.POP3Protocol.drain_start`; SMTP/LMTP:
:meth:`popserv.server.receiving.connection.ReceiverConnection.drain_start`);
this module keeps the time and the count:

1. the listeners stop; each session is told (:meth:`Drainable.drain_start`):
   one that holds nothing a client would lose (not logged in, no mail
   transaction) closes at once, with a line saying why;
2. the others go on until they end, or until the grace is over
   (:meth:`Drainable.drain_cut`): then a session waiting for the client
   is told and closed, one mid-command is cut; a QUIT committing its
   deletions, or a delivery under way, is never cut, and is waited for;
3. a session told to close that has not gone :data:`CLOSE_TIMEOUT` later
   (a client not reading) is aborted (:meth:`Drainable.drain_abort`).
"""

from __future__ import annotations

import signal
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: Seconds a stopping server's sessions have to finish (``--shutdown-grace``).
#: A POP3 client that has listed a maildrop needs a few seconds to RETR the
#: rest and QUIT (and commit its DELEs); systemd's TimeoutStopSec= (90 s)
#: is far above it, and connections are refused meanwhile, so a restart
#: should not wait much longer.
SHUTDOWN_GRACE = 10.0

#: Seconds, after the grace, for sessions told to close to go before they
#: are aborted: enough for the last line to reach a client that reads, and
#: no longer for one that does not.
CLOSE_TIMEOUT = 1.0

#: How a session's summary line says the server ended it.
SHUTTING_DOWN = "server shutting down"


class Drainable(Protocol):
    """A session that can be drained: POP3's, or the receiver's."""

    def drain_start(self) -> bool:
        """The server stops: close now if nothing is lost (True), else go on."""

    def drain_cut(self) -> bool:
        """The grace is over: close (True), or finish a commit or delivery first (False)."""

    def drain_abort(self) -> None:
        """Told to close, still there: abort, unless a commit or delivery runs."""


class SessionHolder(Protocol):
    """A factory whose sessions drain: it tells :attr:`draining` as each ends."""

    draining: Drain | None

    def drainable(self) -> Collection[Drainable]:
        """The sessions open now."""


class Drain:
    """
    Drain ``holders``' sessions for at most ``grace`` seconds on ``clock``:
    :meth:`start` returns a Deferred that fires once none is left.
    """

    def __init__(
        self, holders: Sequence[SessionHolder], grace: float, clock: IReactorTime
    ) -> None:
        self.holders = list(holders)
        self.grace = grace
        self.clock = clock
        self.done: Deferred[None] = Deferred()
        #: Sessions open when the drain started, those closed at once, those cut.
        self.open = 0
        self.closed_at_once = 0
        self.cut = 0
        self._timer: IDelayedCall | None = None

    def sessions(self) -> list[Drainable]:
        return [session for holder in self.holders for session in holder.drainable()]

    @property
    def finished(self) -> int:
        """Sessions that ended by themselves (QUIT, the client hanging up)."""
        # Sessions admitted after the start (the greeting closes them) are not counted.
        return max(0, self.open - self.closed_at_once - self.cut)

    def start(self) -> Deferred[None]:
        for holder in self.holders:
            holder.draining = self
        sessions = self.sessions()
        self.open = len(sessions)
        self.closed_at_once = sum(session.drain_start() for session in sessions)
        # The parent of workers drains nothing itself: no lines about sessions.
        if self.holders:
            log.info(
                "Shutting down: no new connections; {open} sessions open, {closed} closed"
                " at once (not logged in, or no mail under way), {grace:g} s for the rest",
                open=self.open,
                closed=self.closed_at_once,
                grace=self.grace,
            )
        # The last session may have ended inside drain_start: then it is over.
        if not self.done.called:
            self._timer = self.clock.callLater(self.grace, self._grace_over)
            self.ended()
        return self.done

    def ended(self, session: object = None) -> None:
        """A session has ended (called by its holder): the drain is over with the last."""
        if self.done.called or self.sessions():
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.holders:
            log.info(
                "Shut down: {finished} sessions finished, {cut} cut at the end of the grace",
                finished=self.finished,
                cut=self.cut,
            )
        self.done.callback(None)

    def _grace_over(self) -> None:
        self.cut = sum(session.drain_cut() for session in self.sessions())
        self._timer = self.clock.callLater(CLOSE_TIMEOUT, self._abort_rest)

    def _abort_rest(self) -> None:
        self._timer = None
        left = self.sessions()
        for session in left:
            session.drain_abort()
        log.info(
            "Waiting for {count} sessions to end (a QUIT's commit or a delivery under way)",
            count=len(left),
        )


class DrainingService(MultiService):
    """
    A MultiService that stops in order: the children in :attr:`accepting`
    first (no connection is accepted any more), then the sessions of
    :attr:`drained` drain for at most :attr:`grace` seconds, then the other
    children (the last logins are saved after the last login ends).
    """

    def __init__(self, grace: float = SHUTDOWN_GRACE, clock: IReactorTime | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service
        self.grace = grace
        self._clock = clock
        #: Children that accept connections: listeners.
        self.accepting: list[IService] = []
        #: Factories whose sessions drain.
        self.drained: list[SessionHolder] = []
        #: The drain under way, once stopping.
        self.drain: Drain | None = None

    def serve(self, listener: IService) -> None:
        """Add ``listener`` as a child that accepts connections."""
        listener.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service
        self.accepting.append(listener)

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)  # type: ignore[no-untyped-call]  # Twisted's Service
        children = list(self)
        children.reverse()
        first = [c for c in children if c in self.accepting]
        rest = [c for c in children if c not in self.accepting]
        listening = DeferredList([maybeDeferred(c.stopService) for c in first])
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.drain = drain = Drain(self.drained, self.grace, clock)

        async def stop() -> Any:
            await drain.start()
            await listening
            return await DeferredList([maybeDeferred(c.stopService) for c in rest])

        return Deferred.fromCoroutine(stop())


def log_repeated_stops(drain: Drain) -> None:
    """
    A second SIGTERM or SIGINT while ``drain`` runs (systemd signals every
    process of the unit, and the parent of workers passes its own on) is
    logged: the reactor's handler would call ``reactor.stop()`` again,
    which logs a traceback.  Only for a process run by twistd or the worker
    main: a library does not take signals over.
    """
    from twisted.internet import reactor

    def say(signum: int) -> None:
        log.info(
            "{signal} again: already stopping ({count} sessions open)",
            signal=signal.Signals(signum).name,
            count=len(drain.sessions()),
        )

    def repeated(signum: int, frame: object) -> None:
        # A signal handler only queues: the work is done in the reactor's turn.
        reactor.callFromThread(say, signum)  # type: ignore[attr-defined]  # the installed reactor

    for signum in (signal.SIGTERM, signal.SIGINT):
        if callable(signal.getsignal(signum)):
            signal.signal(signum, repeated)


__all__ = [
    "CLOSE_TIMEOUT",
    "SHUTDOWN_GRACE",
    "SHUTTING_DOWN",
    "Drain",
    "Drainable",
    "DrainingService",
    "SessionHolder",
    "log_repeated_stops",
]
