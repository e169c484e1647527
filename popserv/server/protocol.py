"""
The POP3 protocol for Twisted: the pure :class:`~popserv.core.session.Session`
over a connection.

One :class:`POP3Protocol` per connection turns bytes into command lines
(pipelined ones queue, and reading pauses while the queue is long), hands
each to the session in the order received, one at a time, and performs the
effects the session asks for: it writes answers, streams bodies with
backpressure, logs in through the factory's portal, waits out penalties,
starts TLS, applies deletions.  It keeps the timers (autologout, the login
deadline) and always releases the maildrop, however the connection ends.
What the protocol says, and when, is the session's business.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

from OpenSSL import SSL
from twisted.internet import interfaces
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.core import effects as pop3
from popserv.core import errors, wire
from popserv.core.effects import Steps
from popserv.core.lang import Language
from popserv.core.session import Session
from popserv.core.state import State
from popserv.interfaces import IAccountSettings, IMailbox, ISessionInfo
from popserv.logins.accounts import AccountSettings
from popserv.server.admission import ILease, ILoginTurn, wait_for_admission
from popserv.server.coalesce import Coalescer
from popserv.server.drain import SHUTTING_DOWN
from popserv.server.maildropeffects import MaildropEffects
from popserv.server.maybe import fired
from popserv.server.output import Output, OutputGate, no_delay
from popserv.server.proxied import client_is_local
from popserv.server.signin import LoginEffects
from popserv.server.summary import log_summary, session_summary
from popserv.server.tls import TLSInfo
from popserv.server.transports import IStreamTransport

if TYPE_CHECKING:
    from popserv.server.factory import POP3Factory

log = Logger()
T = TypeVar("T")


@implementer(ISessionInfo)
class SessionInfo:
    """What a realm or checker may know about the connection (the login ``mind``)."""

    def __init__(self, peer: interfaces.IAddress | None, secure: bool, local: bool = False) -> None:
        self.peer = peer
        self.secure = secure
        self.local = local
        #: Set when a TLS handshake completes.
        self.tls: TLSInfo | None = None
        #: The avatar id a login gave (the user as the password file names
        #: it), set by the factory once the realm has opened the maildrop.
        self.user: str | None = None
        #: Ends the session at once, given why (see ISessionInfo.end).
        self.end: Callable[[str], None] | None = None

    @property
    def where(self) -> str:
        """The peer for a log line: ``host:port``, ``[v6]:port``, or the address itself."""
        host, port = getattr(self.peer, "host", None), getattr(self.peer, "port", None)
        if host is None or port is None:
            return str(self.peer)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IHandshakeListener)
class POP3Protocol(Output, LoginEffects, MaildropEffects, Protocol, TimeoutMixin):
    """One POP3 connection.  Built by :class:`~popserv.server.factory.POP3Factory`."""

    factory: POP3Factory
    #: Set by makeConnection before any method below runs (see popserv.server.transports).
    transport: IStreamTransport
    #: What the protocol says; made when the connection is admitted.
    session: Session

    # Slots for what __init__ sets: an instance dict over 30 keys stops
    # sharing its keys with the other sessions' and costs 1.6 KiB a session
    # (bench B4).  Twisted's own attributes, and those with class defaults in
    # the mixins, stay in the dict.
    __slots__ = (
        "_busy", "_closing", "_draining", "_input_ended", "_line_waiter", "_login_timer",
        "_logout", "_lost", "_mailbox", "_output", "_queue", "_reading_paused", "_run_again",
        "_running", "_sleeping", "_splitter", "_stream", "_stream_done", "_turn", "admitting",
        "ended", "info", "lease", "listener", "logged_in_as", "output_paused", "session",
        "started",
    )  # fmt: skip

    def __init__(self) -> None:
        self.output_paused = False
        #: Answers produced by one batch of work go out in one send().
        self._output = Coalescer()
        self._splitter = wire.LineSplitter()
        self._queue: deque[wire.Line] = deque()
        self._busy = False
        self._reading_paused = False
        self._lost = False
        #: Set once the session has given its last answer: nothing more is run.
        self._closing = False
        #: The client half-closed: answer what it sent, then close.
        self._input_ended = False
        #: Why the connection ended, when the protocol ended it (a timeout);
        #: when it started (on the factory's clock).
        self.ended: str | None = None
        self.started = 0.0
        #: The user name logged in with, once in TRANSACTION.
        self.logged_in_as: bytes | str | None = None
        self._running = False
        self._run_again = False
        #: A command waiting for the client's next line (a SASL answer).
        self._line_waiter: Deferred[wire.Line] | None = None
        #: The logged-in user's maildrop, from the realm; None before login and after release.
        self._mailbox: IMailbox | None = None
        self._logout: Callable[[], object] | None = None
        self._stream: Iterator[bytes | Deferred[bytes]] | None = None
        self._stream_done: Deferred[None] | None = None
        self._sleeping: Deferred[Any] | None = None
        #: The login attempt under way: its turn to be checked (see popserv.server.admission).
        self._turn: ILoginTurn | None = None
        #: What admission granted this connection, given back when it ends;
        #: or, until it answers, the question.
        self.lease: ILease | None = None
        self.admitting: Deferred[ILease] | None = None
        #: The deadline for logging in (Policy.login_timeout), until logged in.
        self._login_timer: Any = None
        self.info = SessionInfo(None, secure=False)
        #: The listener it came in on: pop3, or pop3s (TLS from the first byte).
        self.listener = "pop3"
        #: The server is stopping: closed once it waits for a command before login.
        self._draining = False

    # The session's state, for capability sources and applications

    @property
    def state(self) -> State:
        return self.session.state

    @property
    def account(self) -> IAccountSettings:
        """The logged-in user's settings (the server's defaults before login)."""
        account = self.session.account
        return AccountSettings() if account is None else cast(IAccountSettings, account)

    @property
    def language(self) -> Language:
        return self.session.language

    @language.setter
    def language(self, language: Language) -> None:
        self.session.language = language

    @property
    def utf8(self) -> bool:
        return self.session.utf8

    @property
    def timestamp(self) -> bytes:
        return self.session.timestamp

    def cleartext_login_allowed(self) -> bool:
        return self.session.cleartext_login_allowed()

    def apop_allowed(self) -> bool:
        return self.session.apop_allowed()

    def stls_offered(self) -> bool:
        return self.session.stls_offered()

    # Connection

    def connectionMade(self) -> None:
        admitting, self.admitting = self.admitting, None
        if admitting is None:
            self._start()
            return
        wait_for_admission(
            self.transport,
            admitting,
            self._admitted,
            wire.err(errors.TooManyConnections()),
            lambda: self._lost,
        )

    def _admitted(self, lease: ILease) -> None:
        self.lease = lease
        self._start()

    def _start(self) -> None:
        """The connection is admitted: set the timers and greet."""
        factory = self.factory
        policy = factory.policy
        self._splitter.max_length = policy.max_line_length
        self._splitter.auth_max_length = policy.max_auth_line_length
        self._idle_timeout(policy.idle_timeout)
        self._login_timer = self.callLater(policy.login_timeout, self._login_timed_out)
        no_delay(self.transport)
        self.transport.registerProducer(OutputGate(self), True)
        peer = self.transport.getPeer()
        secure = interfaces.ISSLTransport.providedBy(self.transport)
        local = client_is_local(policy, peer, self.transport)
        self.info = SessionInfo(peer, secure=secure, local=local)
        self.info.end = self.end_by_store
        self.session = Session(
            factory,
            secure=secure,
            local=self.info.local,
            apop_offered=factory.apop_offered(),
            now=factory.clock.seconds,
        )
        self.started = factory.clock.seconds()
        factory.session_opened(self)
        if factory.draining is not None:
            # Admitted after the server began to stop: refused as a greeting.
            self._shut_down()
            return
        self.send(self.session.greeting())

    def _idle_timeout(self, seconds: float | None) -> None:
        """Set (or, with None, stop) the autologout timer."""
        self.setTimeout(seconds)  # type: ignore[no-untyped-call]  # Twisted's TimeoutMixin

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timers, on the factory's clock."""
        return self.factory.clock.callLater(period, func)

    def handshakeCompleted(self) -> None:
        """The TLS handshake is over (implicit TLS or after STLS): learn its facts."""
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.handshake(self.listener, True)
        try:
            # Under TLS the handle is pyOpenSSL's connection (TLSMemoryBIOProtocol).
            self.info.tls = TLSInfo.of(cast(SSL.Connection, self.transport.getHandle()))
        except Exception:
            log.failure("Reading the TLS connection's details failed")
            return
        log.debug(
            "TLS from {peer}: {version} {cipher}",
            peer=self.info.where,
            version=self.info.tls.version,
            cipher=self.info.tls.cipher,
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is not None and reason.check(SSL.Error):
            log.info(
                "TLS with {peer} failed: {error}",
                peer=self.info.where,
                error=reason.getErrorMessage(),
            )
            self.ended = self.ended or "TLS failed"
            metrics = self.factory.metrics
            if metrics is not None and self.info.tls is None:
                # A failure after the handshake is not a failed handshake.
                metrics.handshake(self.listener, False)
        self._lost = self._closing = True
        log_summary(log, session_summary(self, self.factory.clock.seconds()))
        self.factory.session_closed(self)
        self._idle_timeout(None)
        self._cancel_login_timer()
        self._queue.clear()
        try:
            if self._line_waiter is not None:
                self._line_waiter.cancel()
            if self._sleeping is not None:
                self._sleeping.cancel()
            if self._stream is not None:
                self._end_stream()
        finally:
            # In UPDATE the commit is still running; it logs out when done.
            session = getattr(self, "session", None)
            if session is None or session.state is not State.UPDATE:
                self._release()

    def readConnectionLost(self) -> None:
        """
        The client sent EOF after its commands (``printf ... | nc -N``): they
        are all answered, in order, and then the connection closes.  Without
        a QUIT among them that is a drop: nothing is deleted.
        """
        self._input_ended = True
        self._take_lines()
        if self._line_waiter is not None and not self._queue:
            # A SASL exchange waits for an answer that can no longer come.
            self._line_waiter.cancel()
        self._run_queue()

    def writeConnectionLost(self) -> None:
        """Nothing more can reach the client: there is no point going on."""
        self.ended = "client stopped reading"
        self._closing = True
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        """
        Autologout (RFC 1939 section 3): close at once, without a response.

        Not even an -ERR: it could land inside a RETR the client stopped
        reading.  Aborting, rather than waiting for the send buffer to drain,
        also frees the maildrop lock from a client that never reads again.
        """
        log.info("Autologout of an idle session from {peer}", peer=self.info.where)
        self.ended = "autologout"
        self._abort()

    def _login_timed_out(self) -> None:
        """
        No login within :attr:`Policy.login_timeout` of connecting: close at
        once, without a response, like an autologout.  Activity does not
        extend it, so a client dripping a byte at a time, or one that never
        finishes its TLS handshake, cannot hold the connection.
        """
        self._login_timer = None
        log.info("No login from {peer} in time, closing", peer=self.info.where)
        self.ended = "no login in time"
        self._abort()

    def kick(self, by: str) -> None:
        """
        End the session at once because ``by`` asked (``popserv kick``): like
        an autologout, a drop, so deletions it marked are not applied.
        """
        self.ended = f"kicked by {by}"
        self._abort()

    def end_by_store(self, why: str) -> None:
        """
        The store can no longer serve this session (its lease on the
        maildrop lost): end it at once, deletions not applied, as a kick.
        """
        if not self._lost:
            log.warn("Ending the session of {peer}: {why}", peer=self.info.where, why=why)
            self.ended = why
            self._abort()

    def _abort(self) -> None:
        self._closing = True
        self._queue.clear()
        self.transport.abortConnection()

    # Stopping the server (see popserv.server.drain)

    def drain_start(self) -> bool:
        """
        The server stops.  A session not logged in that waits for the client
        is closed at once with ``-ERR [SYS/TEMP]``: it holds no maildrop and
        no deletion, and its client logs in again once the server is back;
        one checking a login finishes it first.  A logged-in session goes
        on: its client may still RETR and QUIT within the grace.
        """
        self._draining = True
        return self._drained_before_login()

    def _drained_before_login(self) -> bool:
        if self._closing or not self._waiting_for_client():
            return False
        if self.session.state not in (State.AUTHORIZATION, State.USER_GIVEN):
            return False
        self._shut_down()
        return True

    def drain_cut(self) -> bool:
        """
        The grace is over.  Waiting for a command: ``-ERR [SYS/TEMP]`` and
        close.  Mid-command (a RETR streaming, a login being checked): cut
        without a word, which would land inside the response.  Either way
        deletions not committed by a QUIT are not applied (RFC 1939 section
        6).  A QUIT committing its deletions is never cut: it answers and
        closes when its commit is over.
        """
        if self._closing or self._committing():
            return False
        if self._waiting_for_client():
            self._shut_down()
        else:
            self.ended = SHUTTING_DOWN
            self._abort()
        return True

    def drain_abort(self) -> None:
        """Told to close but still connected (the client does not read): abort."""
        if not self._lost and not self._committing():
            self.ended = self.ended or SHUTTING_DOWN
            self.transport.abortConnection()

    def _waiting_for_client(self) -> bool:
        """Between commands, or in a SASL exchange waiting for the client's answer."""
        idle = not self._busy or self._line_waiter is not None
        return idle and self._stream is None

    def _committing(self) -> bool:
        """QUIT's deletions are being applied (the commit logs out when done)."""
        return self.session.state is State.UPDATE and self._logout is not None

    def _shut_down(self) -> None:
        """Say the server is stopping and close; at once if the client is not reading."""
        self.ended = SHUTTING_DOWN
        self.refuse(errors.ShuttingDown())
        if self.output_paused:
            self._abort()
        else:
            self.close()

    def _cancel_login_timer(self) -> None:
        timer, self._login_timer = self._login_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def refuse(self, error: errors.PopError) -> None:
        self.send(self.session.error_line(error))

    def close(self) -> None:
        """
        End the session after its last answer: commands the client pipelined
        behind it are dropped, and the connection closes once the send buffer
        is flushed (the producer would hold it open).
        """
        if not self._closing:
            self._output.flush(self.transport)
            self._closing = True
            self._queue.clear()
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _release(self) -> None:
        """Release the maildrop: the cred logout, exactly once."""
        logout, self._logout, self._mailbox = self._logout, None, None
        if logout is not None:
            try:
                logout()
            except Exception:
                log.failure("Releasing a maildrop failed")

    # Reading commands

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self._take_lines(data)
        self._run_queue()

    def _take_lines(self, data: bytes = b"") -> None:
        """
        Move lines from the splitter into the queue, up to
        :attr:`Policy.max_queued_commands`; the rest stay in the splitter as
        received bytes, and reading pauses until the queue runs low.
        """
        limit = self.factory.policy.max_queued_commands
        room = max(limit - len(self._queue), 0)
        if data or room:
            self._queue.extend(self._splitter.feed(data, max_lines=room))
        if len(self._queue) >= limit:
            self._pause_reading(True)

    def _pause_reading(self, pause: bool) -> None:
        if pause != self._reading_paused and not self._lost and not self._closing:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _run_queue(self) -> None:
        """
        Run queued commands one at a time, until one has to wait.  A command
        waiting for the client's next line (a SASL exchange) gets it.

        Re-entrant calls (a command finishing inside the loop, as pipelined
        SASL exchanges do) only ask the running loop to go round again, so
        the stack stays flat however much the client pipelines.
        """
        if self._running:
            self._run_again = True
            return
        self._running = True
        self._output.hold()
        try:
            self._run_again = True
            while self._run_again:
                self._run_again = False
                self._run_queue_once()
        finally:
            self._running = False
            self._output.release(self.transport)

    def _run_queue_once(self) -> None:
        while not self.output_paused and not self._closing:
            if not self._queue:
                self._take_lines()
                if not self._queue:
                    break
            if self._line_waiter is not None:
                waiter, self._line_waiter = self._line_waiter, None
                waiter.callback(self._queue.popleft())
                continue
            if self._busy:
                break
            done = self._dispatch(self._queue.popleft())
            if done is None:
                self._end_turn()
                continue
            # A login attempt's turn ends with its command, however it ends
            # (a check still running when the client hangs up is counted
            # when it ends: the turn is not given up at the hang-up).
            done.addBoth(self._attempt_over)
            done.addErrback(self._command_failed)
            # A command that finished at once continues this loop rather than
            # recursing, so thousands of pipelined commands cannot overflow the stack.
            if not done.called:
                self._busy = True
                done.addBoth(self._command_done)
        if not self._closing:
            self._take_lines()
        # The queue is short only when the splitter holds no whole line.
        low = max(self.factory.policy.max_queued_commands // 2, 1)
        if self._reading_paused and len(self._queue) < low:
            self._pause_reading(False)
        if self._input_ended and not (self._queue or self._busy or self._stream is not None):
            self.close()
        elif self._draining and not self._queue:
            self._drained_before_login()

    def _attempt_over(self, result: T) -> T:
        self._end_turn()
        return result

    def _command_done(self, _: object) -> None:
        self._busy = False
        self._run_queue()

    def _command_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or self._lost:
            return
        error = failure.value
        if not isinstance(error, errors.PopError):
            log.failure("Unexpected error in a POP3 command", failure)
            error = errors.InternalError()
        self.refuse(error)

    # Performing the session's effects

    def _dispatch(self, line: wire.Line) -> Deferred[Any] | None:
        """
        Give one command line to the session and perform its effects; a
        Deferred when one of them has to wait, None when the command is over.
        """
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.command(line)
        steps = self.session.receive(line)
        try:
            if isinstance(steps, tuple):
                waiting = self._perform_all(steps)
            else:
                waiting = self._advance(steps, None, None)
                if waiting is not None:
                    waiting = Deferred.fromCoroutine(self._finish(steps, waiting))
        except Exception:
            self._command_failed(Failure())
            return None
        return waiting

    def _perform_all(self, effects: tuple[Any, ...]) -> Deferred[Any] | None:
        """Perform ``effects`` in order; a Deferred if one has to wait."""
        for at, effect in enumerate(effects):
            outcome = _PERFORM[type(effect)](self, effect)
            if outcome is not None and isinstance(outcome, Deferred):
                if not outcome.called:
                    rest = effects[at + 1 :]
                    return outcome.addCallback(self._perform_rest, rest) if rest else outcome
                _, failure = fired(outcome)
                if failure is not None:
                    raise failure
        return None

    def _perform_rest(self, _: object, rest: tuple[Any, ...]) -> Deferred[Any] | None:
        return self._perform_all(rest)

    async def _finish(self, steps: Steps, waiting: Deferred[Any] | None) -> None:
        while waiting is not None:
            try:
                result = await waiting
            except Exception as e:
                waiting = self._advance(steps, None, e)
            else:
                waiting = self._advance(steps, result, None)

    def _advance(
        self, steps: Steps, result: Any, failure: BaseException | None
    ) -> Deferred[Any] | None:
        """
        Feed ``result`` (or throw ``failure``) into the command's steps and
        perform the effects that follow, until the command ends (None) or an
        effect has to wait (its Deferred).  A failure the command does not
        handle is raised.
        """
        while True:
            try:
                effect = steps.send(result) if failure is None else steps.throw(failure)
            except StopIteration:
                return None
            try:
                outcome = _PERFORM[type(effect)](self, effect)
            except Exception as e:
                result, failure = None, e
                continue
            if outcome is not None and isinstance(outcome, Deferred):
                if not outcome.called:
                    return outcome
                result, failure = fired(outcome)
            else:
                result, failure = outcome, None

    def _do_send(self, effect: pop3.Send) -> None:
        self.send(effect.data)

    def _do_stream(self, effect: pop3.Stream) -> Deferred[None] | None:
        return self.stream(effect.chunks)

    def _do_close(self, effect: pop3.Close) -> None:
        self.close()

    def _do_log(self, effect: pop3.Log) -> None:
        log.info(effect.template, peer=self.info.where, **effect.fields)

    def _do_start_tls(self, effect: pop3.StartTLS) -> None:
        """
        Start TLS on this connection (STLS, RFC 2595).  Anything the client
        sent after the STLS line, before the handshake, is thrown away: run
        inside TLS, it would let a man in the middle inject commands into
        the protected session.
        """
        tls = self.factory.tls
        assert tls is not None  # The session offers STLS only with a certificate.
        self._queue.clear()
        self._splitter.discard()
        # The answer goes in clear, before the handshake starts.
        self._output.flush(self.transport)
        self.transport.startTLS(tls)
        self.info.secure = True

    def _do_capabilities(self, effect: pop3.Capabilities) -> list[str]:
        return [line for source in self.factory.capabilities for line in source(self)]


#: What performs each kind of effect the session asks for.
_PERFORM: dict[type, Callable[[POP3Protocol, Any], Any]] = {
    pop3.Send: POP3Protocol._do_send,
    pop3.Stream: POP3Protocol._do_stream,
    pop3.Close: POP3Protocol._do_close,
    pop3.Log: POP3Protocol._do_log,
    pop3.StartTLS: POP3Protocol._do_start_tls,
    pop3.Capabilities: POP3Protocol._do_capabilities,
    pop3.Mechanisms: POP3Protocol._do_mechanisms,
    pop3.ChooseMechanism: POP3Protocol._do_choose_mechanism,
    pop3.BeginAttempt: POP3Protocol._do_begin_attempt,
    pop3.Authenticate: POP3Protocol._do_authenticate,
    pop3.LogIn: POP3Protocol._do_log_in,
    pop3.Penalise: POP3Protocol._do_penalise,
    pop3.OpenMaildrop: POP3Protocol._do_open_maildrop,
    pop3.LoggedIn: POP3Protocol._do_logged_in,
    pop3.SendMessage: POP3Protocol._do_send_message,
    pop3.Commit: POP3Protocol._do_commit,
}


__all__ = ["POP3Protocol", "SessionInfo"]
