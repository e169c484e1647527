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

import base64
import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from OpenSSL import SSL
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import interfaces
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.core import errors, wire
from popserv.core import session as pop3
from popserv.core.lang import Language
from popserv.core.retrieval import MessageBody
from popserv.core.session import Rejected, Session, Steps
from popserv.core.state import State
from popserv.core.usernames import loggable_username
from popserv.logins.accounts import AccountSettings
from popserv.logins.credentials import APOPCredentials
from popserv.logins.sasl import exchange as sasl_exchange
from popserv.logins.sasl.mechanism import (
    MechanismInfo,
    Need,
    SASLContext,
    SASLMalformed,
    SASLUnavailable,
    SASLUnknownMechanism,
)
from popserv.server import capabilities
from popserv.server.admission import ILease, ILoginTurn, wait_for_admission
from popserv.server.coalesce import Coalescer
from popserv.server.tls import TLSInfo
from popserv.server.transports import IStreamTransport
from popserv.stores.interfaces import IAccountSettings, IMailbox, ISessionInfo

if TYPE_CHECKING:
    from popserv.server.factory import POP3Factory

log = Logger()
T = TypeVar("T")


async def resolve(value: T | Deferred[T]) -> T:
    """Await a value that may or may not be a Deferred (IMailbox methods may be either)."""
    if isinstance(value, Deferred):
        return await value
    return value


def penalty_name(user: object) -> str:
    """The user name a login attempt's penalty is counted under."""
    if isinstance(user, bytes):
        return user.decode("utf-8", "replace")
    return user if isinstance(user, str) else repr(user)


@implementer(ISessionInfo)
class SessionInfo:
    """What a realm or checker may know about the connection (the login ``mind``)."""

    def __init__(self, peer: interfaces.IAddress | None, secure: bool, local: bool = False) -> None:
        self.peer = peer
        self.secure = secure
        self.local = local
        #: Set when a TLS handshake completes.
        self.tls: TLSInfo | None = None

    @property
    def where(self) -> str:
        """The peer for a log line: ``host:port``, ``[v6]:port``, or the address itself."""
        host, port = getattr(self.peer, "host", None), getattr(self.peer, "port", None)
        if host is None or port is None:
            return str(self.peer)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on the TCP connection under ``transport``
    (a TLS wrapper's too).  An answer is written whole, so there is nothing
    to coalesce; with it on, the small last write of a long response (the
    final ``.`` of a RETR) waits for the client's ACK of what went before,
    up to the client's delayed-ACK timer (40 ms on Linux).
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        set_no_delay = getattr(candidate, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # OSError: not TCP after all (a UNIX socket), or already closing.
            with contextlib.suppress(OSError):
                set_no_delay(True)
            return


@implementer(interfaces.IPushProducer)
class _OutputGate:
    """Tells the session when the transport's send buffer is full or drained."""

    def __init__(self, protocol: POP3Protocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol.output_paused = True

    def resumeProducing(self) -> None:
        self._protocol.output_paused = False
        self._protocol.output_resumed()

    def stopProducing(self) -> None:
        pass


def _fired(waiting: Deferred[Any]) -> tuple[Any, BaseException | None]:
    """The result of a Deferred that has already fired, taken out of it."""
    box: list[Any] = []
    waiting.addBoth(box.append)
    outcome = box[0]
    if isinstance(outcome, Failure):
        return None, outcome.value
    return outcome, None


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IHandshakeListener)
class POP3Protocol(Protocol, TimeoutMixin):
    """One POP3 connection.  Built by :class:`~popserv.server.factory.POP3Factory`."""

    factory: POP3Factory
    #: Set by makeConnection before any method below runs (see popserv.server.transports).
    transport: IStreamTransport
    #: What the protocol says; made when the connection is admitted.
    session: Session

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
        self._running = False
        self._run_again = False
        #: A command waiting for the client's next line (a SASL answer).
        self._line_waiter: Deferred[wire.Line] | None = None
        #: The logged-in user's maildrop, from the realm; None before login and after release.
        self._mailbox: IMailbox | None = None
        self._logout: Callable[[], object] | None = None
        self._stream: Iterator[bytes] | None = None
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
        self.setTimeout(policy.idle_timeout)
        self._login_timer = self.callLater(policy.login_timeout, self._login_timed_out)
        _no_delay(self.transport)
        self.transport.registerProducer(_OutputGate(self), True)
        peer = self.transport.getPeer()
        secure = interfaces.ISSLTransport.providedBy(self.transport)
        self.info = SessionInfo(peer, secure=secure, local=policy.is_local(peer))
        self.session = Session(
            factory,
            secure=secure,
            local=self.info.local,
            apop_offered=factory.apop_offered(),
            now=factory.clock.seconds,
        )
        factory.session_opened(self)
        self.send(self.session.greeting())

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timers, on the factory's clock."""
        return self.factory.clock.callLater(period, func)

    def handshakeCompleted(self) -> None:
        """The TLS handshake is over (implicit TLS or after STLS): learn its facts."""
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
        self._lost = self._closing = True
        self.factory.session_closed(self)
        self.setTimeout(None)
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
        self._abort()

    def _abort(self) -> None:
        self._closing = True
        self._queue.clear()
        self.transport.abortConnection()

    def _cancel_login_timer(self) -> None:
        timer, self._login_timer = self._login_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def send(self, data: bytes) -> None:
        if not self._closing:
            self._output.write(self.transport, data)

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

    def _dispatch(self, line: wire.Line) -> Deferred[None] | None:
        """
        Give one command line to the session and perform its effects; a
        Deferred when one of them has to wait, None when the command is over.
        """
        steps = self.session.receive(line)
        try:
            waiting = self._advance(steps, None, None)
        except Exception:
            if self._turn is not None:
                self._end_turn()
            self._command_failed(Failure())
            return None
        if waiting is None:
            if self._turn is not None:
                self._end_turn()
            return None
        return Deferred.fromCoroutine(self._finish(steps, waiting))

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
            if isinstance(outcome, Deferred):
                if not outcome.called:
                    return outcome
                result, failure = _fired(outcome)
            else:
                result, failure = outcome, None

    def _do_send(self, effect: pop3.Send) -> None:
        self.send(effect.data)

    def _do_stream(self, effect: pop3.Stream) -> Deferred[None]:
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
        if tls is None:
            raise errors.TLSUnavailable()
        self._queue.clear()
        self._splitter.discard()
        # The answer goes in clear, before the handshake starts.
        self._output.flush(self.transport)
        self.transport.startTLS(tls)
        self.info.secure = True

    def _do_capabilities(self, effect: pop3.Capabilities) -> list[str]:
        return [line for source in self.factory.capabilities for line in source(self)]

    def _do_mechanisms(self, effect: pop3.Mechanisms) -> list[str]:
        return [m.name for m in self.offered_mechanisms()]

    def _do_choose_mechanism(
        self, effect: pop3.ChooseMechanism
    ) -> tuple[MechanismInfo, list[MechanismInfo]]:
        offered = self.offered_mechanisms()
        mechanism = next((m for m in offered if m.name == effect.name), None)
        if mechanism is None:
            known = any(m.name == effect.name for m in self.factory.enabled_mechanisms())
            raise SASLUnavailable() if known else SASLUnknownMechanism()
        return mechanism, offered

    def _do_begin_attempt(self, effect: pop3.BeginAttempt) -> Deferred[None]:
        return Deferred.fromCoroutine(self._begin_attempt())

    async def _begin_attempt(self) -> None:
        """
        A login attempt begins: first wait for its turn (see
        :mod:`popserv.server.admission`): behind the client's other attempts
        while it is penalised, then out the penalty, before anything is
        checked, so that parallel attempts, or hanging up rather than
        waiting for the -ERR, gain nothing.
        """
        self._end_turn()
        factory = self.factory
        waiting = factory.admission.login_turn(factory.client_key(self.info.peer))
        # Cancelled, giving up the place, if the connection is lost meanwhile.
        self._sleeping = waiting
        self._turn = await waiting

    def _end_turn(self) -> None:
        """The attempt under way ends without a verdict: its turn passes on."""
        turn, self._turn = self._turn, None
        if turn is not None:
            turn.release()

    def _do_authenticate(self, effect: pop3.Authenticate) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._authenticate(effect))

    async def _authenticate(self, effect: pop3.Authenticate) -> Any:
        mechanism, offered = cast(tuple[MechanismInfo, list[MechanismInfo]], effect.mechanism)
        exchange = mechanism.factory(self.sasl_context(offered))
        initial = effect.initial
        response = None if initial is None else sasl_exchange.decode(initial, initial=True)
        try:
            return await sasl_exchange.run(exchange, response, self._challenge, self._answer)
        except errors.AuthFailed as e:
            raise Rejected(f"({mechanism.name})", e.detail or e.text) from None

    def offered_mechanisms(self) -> list[MechanismInfo]:
        """The SASL mechanisms this connection may use (see :mod:`popserv.server.capabilities`)."""
        return capabilities.offered_mechanisms(self)

    def sasl_context(self, offered: Sequence[MechanismInfo]) -> SASLContext:
        tls = self.info.tls
        return SASLContext(
            hostname=self.factory.policy.hostname,
            secure=self.info.secure,
            channel_bindings=tls.channel_bindings if tls is not None else {},
            client_certificate=tls.client_certificate if tls is not None else None,
            channel_binding_offered=any(m.name.endswith("-PLUS") for m in offered),
        )

    async def _answer(self, need: Need) -> object:
        """A mechanism's question to the login layer (see :mod:`popserv.logins.sasl.exchange`)."""
        return await resolve(sasl_exchange.answer(need, self.factory.accounts))

    async def _challenge(self, data: bytes) -> bytes:
        """
        Send a SASL challenge and return the client's answer, decoded (``*``
        cancels).  Answers may be AUTH-long lines (tokens, SCRAM with
        channel binding).
        """
        if self._lost:
            raise CancelledError()
        self._splitter.in_exchange = True
        self.send(b"+ " + base64.b64encode(data) + b"\r\n")
        waiter = Deferred[wire.Line]()
        self._line_waiter = waiter
        try:
            line = await waiter
        finally:
            self._splitter.in_exchange = False
        if isinstance(line, wire.TooLong):
            raise errors.LineTooLong()
        return sasl_exchange.decode(line)

    def _do_log_in(self, effect: pop3.LogIn) -> Deferred[object]:
        return Deferred.fromCoroutine(self._log_in(effect.login))

    async def _log_in(self, login: object) -> object:
        """
        Log in through the portal and hold the maildrop; answer the user name.

        ``final`` is SASL data the server sends once the credentials passed
        (SCRAM's server signature), as a challenge the client answers with
        an empty line before the ``+OK``; ``failure`` is SASL data sent the
        same way when they did not (OAUTHBEARER's error), whose answer is
        read before the ``-ERR``.
        """
        final = failure = None
        credentials: Any
        if isinstance(login, pop3.PasswordLogin):
            # Bytes, as twisted.cred's own checkers expect; ours decode UTF-8.
            credentials = UsernamePassword(login.username, login.password)
        elif isinstance(login, pop3.APOPLogin):
            credentials = APOPCredentials(login.username, login.timestamp, login.digest)
        else:  # A SASL exchange's success
            success: Any = login
            credentials, final, failure = success.credentials, success.final, success.failure
        user = credentials.username
        try:
            _, mailbox, logout = await self.factory.login(credentials, self.info)
        except (UnauthorizedLogin, UnhandledCredentials, errors.InvalidUsername) as e:
            if failure is not None:
                # The client's dummy answer; a cancel or junk ends it the same way.
                with contextlib.suppress(errors.PopError):
                    await self._challenge(failure)
            raise Rejected(user, str(e) or type(e).__name__) from None
        except errors.PopError as e:
            self._end_turn()
            log.info(
                "Login of {user} refused: {reason}",
                user=loggable_username(user),
                reason=e.detail or e.text,
            )
            raise
        turn, self._turn = self._turn, None
        if turn is not None:
            turn.succeeded(penalty_name(user))
        if self._lost:
            logout()
            raise CancelledError()
        self._mailbox, self._logout = mailbox, logout
        if final is not None:
            try:
                if await self._challenge(final) != b"":
                    raise SASLMalformed("non-empty answer to the final SASL data")
            except BaseException:
                self._release()
                raise
        return user

    def _do_penalise(self, effect: pop3.Penalise) -> Deferred[None]:
        return Deferred.fromCoroutine(self._penalise(effect.user, effect.reason))

    async def _penalise(self, user: object, reason: str) -> None:
        """
        Count a failed login against the client and the user, and wait out
        the penalty, counted from the start of the attempt: 2, 4, 8, up to 15 s.
        """
        log.info(
            "Failed login for {user} from {peer}: {reason}",
            user=loggable_username(user if isinstance(user, (bytes, str)) else repr(user)),
            peer=self.info.where,
            reason=reason,
        )
        turn, self._turn = self._turn, None
        now = self.factory.clock.seconds()
        if turn is None:
            due, elapsed = self.factory.policy.auth_failure_delay, 0.0
        else:
            due, elapsed = await turn.failed(penalty_name(user)), now - turn.started
        if due > elapsed and not self._lost:
            self._sleeping = deferLater(self.factory.clock, due - elapsed, lambda: None)
            await self._sleeping

    def _do_open_maildrop(self, effect: pop3.OpenMaildrop) -> Any:
        try:
            listing = self.mailbox.listing()
        except BaseException:
            self._release()
            raise
        if isinstance(listing, Deferred):
            return listing.addCallbacks(self._opened, self._not_opened)
        return self._opened(listing)

    def _opened(self, listing: Any) -> tuple[Any, IAccountSettings]:
        if self._lost:
            self._release()
            raise CancelledError()
        return listing, IAccountSettings(self.mailbox, self.factory.policy.account)

    def _not_opened(self, failure: Failure) -> Failure:
        self._release()
        return failure

    def _do_logged_in(self, effect: pop3.LoggedIn) -> None:
        self._cancel_login_timer()
        log.info(
            "{user} logged in from {peer}",
            user=loggable_username(effect.user if isinstance(effect.user, (bytes, str)) else None),
            peer=self.info.where,
        )

    @property
    def mailbox(self) -> IMailbox:
        """The maildrop, in TRANSACTION (and UPDATE until it is released)."""
        assert self._mailbox is not None
        return self._mailbox

    def _do_send_message(self, effect: pop3.SendMessage) -> Deferred[None]:
        return Deferred.fromCoroutine(self._send_message(effect))

    async def _send_message(self, effect: pop3.SendMessage) -> None:
        """
        Send a message's +OK and body, exactly as large as the listing said
        (see popserv.core.retrieval): a mismatch found before the +OK is an
        -ERR, one found after it cuts the connection.
        """
        index = effect.index
        message = await resolve(self.mailbox.open_message(index))
        try:
            body = MessageBody(
                message, effect.encoder, effect.listed, self.factory.policy.chunk_size
            )
            try:
                chunks = body.start()
            except errors.MessageChanged as e:
                self._message_changed(index, e, "refused")
                raise
            except OSError as e:
                log.failure("Reading a message failed")
                raise errors.storage_failure("cannot read a message", e) from None
            self.send(wire.ok(effect.text))
            try:
                await self.stream(chunks)
            except errors.MessageChanged as e:
                self._message_changed(index, e, "connection cut")
                raise
            except OSError:
                log.failure("Reading a message failed while sending it, connection cut")
                raise CancelledError() from None
        finally:
            # Also when the connection dropped before the stream started.
            try:
                message.close()
            except Exception:
                log.failure("Closing a message stream failed")

    def _message_changed(self, index: int, error: errors.MessageChanged, outcome: str) -> None:
        """Log a message not sent because its size is not the listed one."""
        log.warn(
            "Message {uid} for {peer} is not the size listed ({detail}): {outcome}",
            uid=wire.loggable(self.session.maildrop.listing.uids[index]),
            peer=self.info.where,
            detail=error.detail,
            outcome=outcome,
        )

    def _do_commit(self, effect: pop3.Commit) -> Deferred[None]:
        return Deferred.fromCoroutine(self._commit(effect))

    async def _commit(self, effect: pop3.Commit) -> None:
        """UPDATE: apply the deletions and release the maildrop, whatever happens."""
        try:
            await resolve(self.mailbox.commit(effect.deleted, effect.retrieved))
        except Exception:
            failure = Failure()
            if not failure.check(errors.PopError):
                log.failure("Applying deletions failed", failure)
            raise errors.CommitFailed() from None
        finally:
            self._release()

    # Output

    def output_resumed(self) -> None:
        self._output.hold()
        try:
            if self._stream is not None:
                self._pump_stream()
            if self._stream is None:
                self._run_queue()
        finally:
            self._output.release(self.transport)

    def stream(self, chunks: Iterator[bytes]) -> Deferred[None]:
        """
        Send ``chunks`` as fast as the client reads them; fires when all are
        sent, or at once if the connection is gone.
        """
        if self._lost:
            return succeed(None)
        self._stream = chunks
        self._stream_done = done = Deferred[None]()
        self._pump_stream()
        return done

    def _pump_stream(self) -> None:
        stream = self._stream
        assert stream is not None
        while not self.output_paused and not self._lost:
            try:
                chunk = next(stream)
            except StopIteration:
                self._end_stream()
                return
            except Exception:
                # Half a response is out: an -ERR now would be read as message
                # data, so the only honest answer is to close the connection.
                # The command that streamed gets the failure, to log it.
                failure = Failure()
                self._closing = True
                self._queue.clear()
                self._end_stream(failure)
                self.transport.abortConnection()
                return
            self.send(chunk)
            self.resetTimeout()

    def _end_stream(self, failure: Failure | None = None) -> None:
        stream, self._stream = self._stream, None
        done, self._stream_done = self._stream_done, None
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # A generator: its owner closes what it reads from.
        if done is not None:
            if failure is None:
                done.callback(None)
            else:
                done.errback(failure)


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


__all__ = ["POP3Protocol", "SessionInfo", "penalty_name", "resolve"]
