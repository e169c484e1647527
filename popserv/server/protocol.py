"""
The POP3 protocol: a thin Twisted layer over the pure wire and maildrop code.

One :class:`POP3Protocol` per connection keeps the session state
(AUTHORIZATION, TRANSACTION, UPDATE), runs one command at a time in the
order received (pipelined commands queue, and reading pauses while the queue
is long), streams message bodies with backpressure, and always releases the
maildrop, however the connection ends.

Which command is legal in which state is the table :data:`COMMANDS`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import inspect
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

from OpenSSL import SSL
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import interfaces
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.core import errors, wire
from popserv.core.body import BodyEncoder
from popserv.core.lang import ENGLISH, Language, Languages
from popserv.core.retrieval import MessageBody
from popserv.core.state import State
from popserv.core.usernames import loggable_username
from popserv.core.view import MaildropView
from popserv.logins.accounts import AccountSettings, Announcement
from popserv.logins.credentials import APOPCredentials
from popserv.logins.sasl import MECHANISMS
from popserv.logins.sasl import exchange as sasl_exchange
from popserv.logins.sasl.mechanism import (
    MechanismInfo,
    Need,
    SASLAborted,
    SASLContext,
    SASLMalformed,
    SASLUnavailable,
    SASLUnknownMechanism,
)
from popserv.server import capabilities
from popserv.server.admission import (
    IAdmission,
    ILease,
    ILoginTurn,
    LocalAdmission,
    RefusalLog,
    RefusedConnection,
    ask,
    client_key,
    wait_for_admission,
)
from popserv.server.capabilities import CapabilitySource, core_capabilities, sasl_capability
from popserv.server.coalesce import Coalescer
from popserv.server.policy import Policy
from popserv.server.tls import TLSInfo, TLSServer
from popserv.server.transports import IStreamTransport
from popserv.stores.interfaces import (
    IAccountSettings,
    IMailbox,
    ISessionInfo,
    PortalLike,
)

log = Logger()
T = TypeVar("T")


async def resolve(value: T | Deferred[T]) -> T:
    """Await a value that may or may not be a Deferred (IMailbox methods may be either)."""
    if isinstance(value, Deferred):
        return await value
    return value


def apop_timestamp(hostname: str) -> bytes:
    """A fresh ``<random@host>`` for the greeting, from the CSPRNG: no pid, no clock."""
    return wire.msg_id(secrets.token_hex(16), hostname)


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

    def __init__(self, session: POP3Protocol) -> None:
        self._session = session

    def pauseProducing(self) -> None:
        self._session.output_paused = True

    def resumeProducing(self) -> None:
        self._session.output_paused = False
        self._session.output_resumed()

    def stopProducing(self) -> None:
        pass


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IHandshakeListener)
class POP3Protocol(Protocol, TimeoutMixin):
    """One POP3 session.  Built by :class:`POP3Factory`."""

    factory: POP3Factory
    #: Set by makeConnection before any method below runs (see popserv.server.transports).
    transport: IStreamTransport

    def __init__(self) -> None:
        self.state = State.AUTHORIZATION
        self.output_paused = False
        #: Answers produced by one batch of work go out in one send().
        self._output = Coalescer()
        self.account: IAccountSettings = AccountSettings()
        self.timestamp = b""
        self._splitter = wire.LineSplitter()
        self._queue: deque[wire.Line] = deque()
        self._busy = False
        self._reading_paused = False
        self._lost = False
        #: Set once the session has given its last answer: nothing more is run.
        self._closing = False
        #: The client half-closed: answer what it sent, then close.
        self._input_ended = False
        #: The language of human-readable texts (LANG), and UTF8 mode.
        self.language: Language = ENGLISH
        self.utf8 = False
        self._running = False
        self._run_again = False
        #: A command waiting for the client's next line (a SASL answer).
        self._line_waiter: Deferred[wire.Line] | None = None
        self._user: bytes | None = None
        self._failures = 0
        #: Bad command lines since the last good one (Policy.max_bad_commands).
        self._bad_commands = 0
        #: The logged-in user's maildrop, from the realm; None before login and after release.
        self._mailbox: IMailbox | None = None
        self._logout: Callable[[], object] | None = None
        self._view: MaildropView | None = None
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
        policy = self.factory.policy
        self._splitter.max_length = policy.max_line_length
        self._splitter.auth_max_length = policy.max_auth_line_length
        self.setTimeout(policy.idle_timeout)
        self._login_timer = self.callLater(policy.login_timeout, self._login_timed_out)
        _no_delay(self.transport)
        self.transport.registerProducer(_OutputGate(self), True)
        self.language = self.factory.languages.default
        peer = self.transport.getPeer()
        self.info = SessionInfo(peer, secure=self.is_secure(), local=policy.is_local(peer))
        self.factory.session_opened(self)
        greeting = "POP3 server ready"
        if self.factory.apop_offered() and self.apop_allowed():
            self.timestamp = apop_timestamp(policy.hostname)
            greeting += " " + self.timestamp.decode("ascii")
        self.send(wire.ok(greeting))

    def is_secure(self) -> bool:
        """True when this connection runs over TLS."""
        return interfaces.ISSLTransport.providedBy(self.transport)

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

    def cleartext_login_allowed(self) -> bool:
        """
        Whether a password may be sent on this connection: under TLS, from a
        local peer, or where the admin allowed cleartext logins.
        """
        info = self.info
        return info.secure or info.local or self.factory.policy.allow_cleartext_auth

    def apop_allowed(self) -> bool:
        """APOP on this connection: where passwords may be sent, or where the admin allows it."""
        return self.cleartext_login_allowed() or self.factory.policy.allow_cleartext_apop

    def stls_offered(self) -> bool:
        return (
            self.factory.tls is not None
            and not self.info.secure
            and self.state in (State.AUTHORIZATION, State.USER_GIVEN)
        )

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        return self.factory.clock.callLater(period, func)

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
            if self.state is not State.UPDATE:
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
        self._closing = True
        self._queue.clear()
        self.transport.abortConnection()

    def _login_timed_out(self) -> None:
        """
        No login within :attr:`Policy.login_timeout` of connecting: close at
        once, without a response, like an autologout.  Activity does not
        extend it, so a client dripping a byte at a time, or one that never
        finishes its TLS handshake, cannot hold the connection.
        """
        self._login_timer = None
        log.info("No login from {peer} in time, closing", peer=self.info.where)
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

    def text(self, template: str, **fields: object) -> str:
        """A human-readable text in the session's language (LANG)."""
        return self.language.text(template, **fields)

    def say(self, template: str, **fields: object) -> None:
        """A ``+OK`` line with a human-readable text, in the session's language."""
        self.send(wire.ok(self.text(template, **fields)))

    def error_line(self, error: errors.PopError) -> bytes:
        """The ``-ERR`` line for ``error``, its text in the session's language."""
        translated = self.language.texts.get(error.text)
        return wire.err(error, translated)

    def refuse(self, error: errors.PopError) -> None:
        self.send(self.error_line(error))

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
            result = self._dispatch(self._queue.popleft())
            if result is None:
                continue
            done = result if isinstance(result, Deferred) else Deferred.fromCoroutine(result)
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
        self._report(failure)

    def _report(self, failure: Failure) -> None:
        """Answer a failed command with its fixed -ERR text; log what is unexpected."""
        error = failure.value
        if not isinstance(error, errors.PopError):
            log.failure("Unexpected error in a POP3 command", failure)
            error = errors.InternalError()
        self.refuse(error)

    def _dispatch(self, line: wire.Line) -> Any:
        """
        Run one command line; return a coroutine when it has to wait.

        The pure parser makes a :class:`wire.Command` of the line, or refuses
        it (unknown keyword, bad arguments); the state's table then runs it,
        or refuses a command not valid in this state.  Refused lines count
        towards :attr:`Policy.max_bad_commands`; a command that runs, however
        it ends, starts the count again.
        """
        try:
            if isinstance(line, wire.TooLong):
                raise errors.LineTooLong()
            command = wire.parse_command(line)
            handler = COMMANDS[self.state].get(command.verb)
            if handler is None:
                raise errors.BadState()
        except errors.PopError as e:
            self._bad_command(e)
            return None
        self._bad_commands = 0
        try:
            result = handler(self, *command.args)
        except Exception:
            self._report(Failure())
            return None
        return result if inspect.isawaitable(result) else None

    def _bad_command(self, error: errors.PopError) -> None:
        """Refuse a bad line; the last of too many in a row closes the session."""
        self._bad_commands += 1
        if self._bad_commands < self.factory.policy.max_bad_commands:
            self.refuse(error)
            return
        log.info(
            "{count} bad commands in a row from {peer}, closing",
            count=self._bad_commands,
            peer=self.info.where,
        )
        self.refuse(errors.TooManyBadCommands())
        self.close()

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

    def sleep(self, seconds: float) -> Deferred[None]:
        """Wait without blocking; cancelled if the connection is lost meanwhile."""
        self._sleeping = deferLater(self.factory.clock, seconds, lambda: None)
        return self._sleeping

    # AUTHORIZATION

    def do_capa(self) -> Awaitable[None]:
        lines = [line for source in self.factory.capabilities for line in source(self)]
        self.say("Capability list follows")
        return self.stream(wire.multiline(line.encode("ascii") for line in lines))

    def do_user(self, name: bytes) -> None:
        if not self.cleartext_login_allowed():
            # Refused before the client sends the password.
            raise errors.TLSRequired()
        self._user = name
        self.state = State.USER_GIVEN
        self.say("Send PASS")

    async def do_pass(self, password: bytes) -> None:
        # Bytes, as twisted.cred's own checkers expect; ours decode UTF-8.
        user, self._user = self._user, None
        self.state = State.AUTHORIZATION
        assert user is not None
        await self._begin_attempt()
        await self.login(UsernamePassword(user, password))

    async def do_apop(self, name: bytes, digest: bytes) -> None:
        self.state = State.AUTHORIZATION
        self._user = None
        if not self.apop_allowed():
            raise errors.TLSRequired()
        if not self.timestamp:
            raise errors.APOPUnavailable()
        await self._begin_attempt()
        if len(digest) != 32 or not all(c in b"0123456789abcdefABCDEF" for c in digest):
            await self._auth_failed(name, "malformed APOP digest", errors.APOPFailed())
            return
        credentials = APOPCredentials(name, self.timestamp, digest)
        await self.login(credentials, errors.APOPFailed())

    async def login(
        self,
        credentials: Any,
        failed: errors.PopError | None = None,
        final: bytes | None = None,
        failure: bytes | None = None,
    ) -> None:
        """
        Log in through the portal; on success, open the maildrop (TRANSACTION).

        A refused login is answered with ``failed`` (``-ERR [AUTH]``) after
        the failed-login delay.  ``final`` is SASL data the server sends once
        the credentials passed (SCRAM's server signature), as a challenge
        the client answers with an empty line before the ``+OK``; ``failure``
        is SASL data sent the same way when they did not (OAUTHBEARER's
        error), whose answer is read before the ``-ERR``.
        """
        user = credentials.username
        try:
            _, mailbox, logout = await self.factory.login(credentials, self.info)
        except (UnauthorizedLogin, UnhandledCredentials, errors.InvalidUsername) as e:
            if failure is not None:
                # The client's dummy answer; a cancel or junk ends it the same way.
                with contextlib.suppress(errors.PopError):
                    await self._challenge(failure)
            await self._auth_failed(user, str(e) or type(e).__name__, failed)
            return
        except errors.PopError as e:
            self._end_turn()
            reason = e.detail or e.text
            log.info(
                "Login of {user} refused: {reason}", user=loggable_username(user), reason=reason
            )
            self.refuse(e)
            return
        turn, self._turn = self._turn, None
        if turn is not None:
            turn.succeeded(_penalty_name(user))
        if self._lost:
            logout()
            return
        self._mailbox, self._logout = mailbox, logout
        try:
            if final is not None and await self._challenge(final) != b"":
                raise SASLMalformed("non-empty answer to the final SASL data")
            listing = await resolve(mailbox.listing())
        except BaseException:
            self._release()
            raise
        if self._lost:
            self._release()
            return
        self._view = MaildropView(listing)
        self.account = IAccountSettings(mailbox, self.factory.policy.account)
        self.state = State.TRANSACTION
        self._cancel_login_timer()
        self._failures = 0
        count, octets = self._view.stat()
        log.info("{user} logged in from {peer}", user=loggable_username(user), peer=self.info.where)
        self.say("Logged in, {count} messages ({octets} octets)", count=count, octets=octets)

    # SASL (RFC 5034)

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

    async def do_auth(self, name: bytes | None = None, initial: bytes | None = None) -> None:
        """AUTH: list the mechanisms, or run one exchange and log in with its result."""
        self.state = State.AUTHORIZATION
        self._user = None
        offered = self.offered_mechanisms()
        if name is None:
            self.say("Supported mechanisms follow")
            await self.stream(wire.multiline(m.name.encode("ascii") for m in offered))
            return
        wanted = name.decode("ascii", "replace").upper()
        mechanism = next((m for m in offered if m.name == wanted), None)
        if mechanism is None:
            known = any(m.name == wanted for m in self.factory.enabled_mechanisms())
            raise SASLUnavailable() if known else SASLUnknownMechanism()
        await self._begin_attempt()
        exchange = mechanism.factory(self.sasl_context(offered))
        response = None if initial is None else _decode_sasl(initial, initial_response=True)
        try:
            step = await sasl_exchange.run(exchange, response, self._challenge, self._answer)
        except errors.AuthFailed as e:
            await self._auth_failed(f"({mechanism.name})", e.detail or e.text)
            return
        await self.login(
            step.credentials, errors.AuthFailed(), final=step.final, failure=step.failure
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
        return _decode_sasl(line)

    async def _begin_attempt(self) -> None:
        """
        A login attempt begins: first wait for its turn (see
        :mod:`popserv.server.admission`): behind the client's other attempts while
        it is penalised, then out the penalty, before anything is checked,
        so that parallel attempts, or hanging up rather than waiting for
        the -ERR, gain nothing.
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

    async def _auth_failed(
        self, user: object, reason: str, answer: errors.PopError | None = None
    ) -> None:
        """
        Count a failed login, and answer it when the client's penalty says,
        counted from the start of the attempt: 2, 4, 8, up to 15 s.
        """
        self._failures += 1
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
            due, elapsed = await turn.failed(_penalty_name(user)), now - turn.started
        if due > elapsed and not self._lost:
            await self.sleep(due - elapsed)
        if self._failures >= self.factory.policy.max_auth_failures:
            self.refuse(errors.TooManyFailures())
            self.close()
        else:
            self.refuse(answer or errors.AuthFailed())

    def do_stls(self) -> None:
        """
        STLS (RFC 2595): answer, then start TLS on the same connection.

        Anything the client sent after the STLS line, before the handshake,
        is thrown away: run inside TLS, it would let a man in the middle
        inject commands into the protected session.
        """
        tls = self.factory.tls
        if tls is None:
            raise errors.TLSUnavailable()
        if self.info.secure:
            raise errors.TLSActive()
        if self.utf8:
            raise errors.TLSAfterUTF8()
        self._queue.clear()
        self._splitter.discard()
        # Nothing learned in clear carries into TLS, where a man in the middle
        # could have set it: a USER, the language, failed logins.
        self.state = State.AUTHORIZATION
        self._user = None
        self._failures = 0
        self.language = self.factory.languages.default
        self.say("Begin TLS negotiation")
        # In clear, before the handshake starts (Twisted sends what it holds first).
        self._output.flush(self.transport)
        self.transport.startTLS(tls)
        self.info.secure = True

    def do_utf8(self) -> None:
        """
        UTF8 (RFC 6856): the client may send UTF-8 and accepts it.  User
        names are UTF-8 (and SASLprep'd) in any case; messages are served as
        they are stored, before and after.
        """
        self.utf8 = True
        self.say("UTF8 enabled")

    def do_lang(self, language_range: str | None = None) -> Awaitable[None] | None:
        """LANG (RFC 6856): list the languages, or switch to one."""
        languages = self.factory.languages
        if language_range is None:
            self.say("Language listing follows")
            lines = (f"{language.tag} {language.name}".encode() for language in languages.all)
            return self.stream(wire.multiline(lines))
        language = languages.lookup(language_range)
        if language is None:
            raise errors.UnknownLanguage()
        self.language = language
        self.send(wire.ok(f"{language.tag} {self.text('Language changed')}"))
        return None

    def do_quit_authorization(self) -> None:
        self.say("Bye")
        self.close()

    # TRANSACTION

    @property
    def view(self) -> MaildropView:
        assert self._view is not None
        return self._view

    @property
    def mailbox(self) -> IMailbox:
        """The maildrop, in TRANSACTION (and UPDATE until it is released)."""
        assert self._mailbox is not None
        return self._mailbox

    def do_stat(self) -> None:
        count, octets = self.view.stat()
        self.send(wire.ok(f"{count} {octets}"))

    def do_list(self, number: int | None = None) -> Awaitable[None] | None:
        view = self.view
        if number is not None:
            self.send(wire.ok(f"{number} {view.size(number)}"))
            return None
        count, octets = view.stat()
        sizes = view.listing.sizes
        self.say("{count} messages ({octets} octets)", count=count, octets=octets)
        return self.stream(wire.numbered(view.live_runs(), lambda run: sizes[run.start : run.stop]))

    def do_uidl(self, number: int | None = None) -> Awaitable[None] | None:
        view = self.view
        if number is not None:
            self.send(wire.ok(f"{number} {view.uid(number)}"))
            return None
        uids = view.listing.uids
        self.say("Unique-ID listing follows")
        return self.stream(wire.numbered(view.live_runs(), lambda run: uids[run.start : run.stop]))

    def do_dele(self, number: int) -> None:
        self.view.delete(number)
        self.say("Message {number} deleted", number=number)

    def do_noop(self) -> None:
        self.send(wire.ok())

    def do_rset(self) -> None:
        self.view.reset()
        count, octets = self.view.stat()
        self.say("{count} messages ({octets} octets)", count=count, octets=octets)

    async def do_retr(self, number: int) -> None:
        size = self.view.size(number)
        await self._send_message(number, BodyEncoder(), f"{size} octets")
        self.view.retrieved(number)

    async def do_top(self, number: int, lines: int) -> None:
        await self._send_message(number, BodyEncoder(body_lines=lines), "Top of message follows")

    async def _send_message(self, number: int, encoder: BodyEncoder, text: str) -> None:
        """
        Send a message's +OK and body, exactly as large as the listing said
        (see popserv.core.retrieval): a mismatch found before the +OK is an -ERR,
        one found after it cuts the connection.
        """
        index = self.view.index(number)
        listing = self.view.listing
        listed = listing.sizes[index] if listing.exact_sizes else None
        message = await resolve(self.mailbox.open_message(index))
        try:
            body = MessageBody(message, encoder, listed, self.factory.policy.chunk_size)
            try:
                chunks = body.start()
            except errors.MessageChanged as e:
                self._message_changed(index, e, "refused")
                raise
            except OSError as e:
                log.failure("Reading a message failed")
                raise errors.storage_failure("cannot read a message", e) from None
            self.send(wire.ok(text))
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
            uid=wire.loggable(self.view.listing.uids[index]),
            peer=self.info.where,
            detail=error.detail,
            outcome=outcome,
        )

    async def do_quit_transaction(self) -> None:
        """Enter UPDATE: apply deletions (and EXPIRE), release the maildrop, close."""
        self.state = State.UPDATE
        view = self.view
        expired = view.expired_indexes(self.account.expire_days, self.factory.clock.seconds())
        deleted = sorted(set(view.deleted_indexes()).union(expired))
        try:
            await resolve(self.mailbox.commit(deleted, view.retrieved_indexes()))
        except Exception:
            failure = Failure()
            if not failure.check(errors.PopError):
                log.failure("Applying deletions failed", failure)
            response = self.error_line(errors.CommitFailed())
        else:
            count, _ = view.stat()
            left = count - len(expired)
            response = wire.ok(
                self.text("Bye, {deleted} deleted, {left} left", deleted=len(deleted), left=left)
            )
        finally:
            self._release()
        self.send(response)
        self.close()


def _penalty_name(user: object) -> str:
    """The user name a login attempt's penalty is counted under."""
    if isinstance(user, bytes):
        return user.decode("utf-8", "replace")
    return user if isinstance(user, str) else repr(user)


def _decode_sasl(line: bytes, initial_response: bool = False) -> bytes:
    """
    A SASL response line, base64-decoded: ``*`` cancels the exchange, and
    an initial response of ``=`` is an empty one (RFC 5034).
    """
    if line.strip() == b"*":
        raise SASLAborted()
    if initial_response and line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLMalformed("invalid base64") from None


Handler = Callable[..., Any]

#: Which command is legal in which state, and what runs it.  Client input
#: only ever selects an entry of this table, never a method by name.  The
#: verbs, and how their arguments are parsed, are the grammar of
#: :data:`wire.ARGUMENTS`: every verb there is run by some state here.
COMMANDS: dict[State, dict[str, Handler]] = {
    State.AUTHORIZATION: {
        "CAPA": POP3Protocol.do_capa,
        "USER": POP3Protocol.do_user,
        "APOP": POP3Protocol.do_apop,
        "AUTH": POP3Protocol.do_auth,
        "STLS": POP3Protocol.do_stls,
        "UTF8": POP3Protocol.do_utf8,
        "LANG": POP3Protocol.do_lang,
        "QUIT": POP3Protocol.do_quit_authorization,
    },
    State.USER_GIVEN: {
        "CAPA": POP3Protocol.do_capa,
        "USER": POP3Protocol.do_user,
        "PASS": POP3Protocol.do_pass,
        "APOP": POP3Protocol.do_apop,
        "AUTH": POP3Protocol.do_auth,
        "STLS": POP3Protocol.do_stls,
        "UTF8": POP3Protocol.do_utf8,
        "LANG": POP3Protocol.do_lang,
        "QUIT": POP3Protocol.do_quit_authorization,
    },
    State.TRANSACTION: {
        "CAPA": POP3Protocol.do_capa,
        "STAT": POP3Protocol.do_stat,
        "LIST": POP3Protocol.do_list,
        "RETR": POP3Protocol.do_retr,
        "DELE": POP3Protocol.do_dele,
        "NOOP": POP3Protocol.do_noop,
        "RSET": POP3Protocol.do_rset,
        "TOP": POP3Protocol.do_top,
        "UIDL": POP3Protocol.do_uidl,
        "LANG": POP3Protocol.do_lang,
        "QUIT": POP3Protocol.do_quit_transaction,
    },
    State.UPDATE: {},
}


@implementer(IRealm)
class _CountingRealm:
    """
    Stands before the application's realm: holds an admission lease for
    each user's session (the avatar id) from a successful login until its
    logout, and refuses a user already at :attr:`Policy.max_user_sessions`
    before the realm opens anything.
    """

    def __init__(self, admission: IAdmission, realm: Any) -> None:
        self._admission = admission
        self._realm = realm

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces_: Any) -> Deferred[Any]:
        if IMailbox not in interfaces_:
            return maybeDeferred(self._realm.requestAvatar, avatarId, mind, *interfaces_)
        user = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else avatarId
        return Deferred.fromCoroutine(self._open(user, avatarId, mind, interfaces_))

    async def _open(
        self, user: str, avatarId: Any, mind: Any, interfaces_: tuple[Any, ...]
    ) -> tuple[Any, Any, Callable[[], None]]:
        lease = await self._admission.user_session(user)
        try:
            interface, avatar, logout = await maybeDeferred(
                self._realm.requestAvatar, avatarId, mind, *interfaces_
            )
        except Exception:
            lease.release()
            raise
        return interface, avatar, _releasing(logout, lease)


def _releasing(logout: Callable[[], object], lease: ILease) -> Callable[[], None]:
    """``logout``, then the session's admission lease given back, whatever happens."""

    def logout_and_release() -> None:
        try:
            logout()
        finally:
            lease.release()

    return logout_and_release


class POP3Factory(Factory[POP3Protocol]):
    """
    Builds POP3 sessions that log in through ``portal``.

    The portal's realm must answer ``requestAvatar(avatarId, mind, IMailbox)``;
    ``mind`` is an :class:`ISessionInfo`.

    The factory keeps the limits that span sessions (see :class:`Policy`):
    connections in all and per client, sessions per user, and each
    client's failed-login penalty.
    """

    protocol = POP3Protocol

    def __init__(
        self,
        portal: PortalLike,
        policy: Policy | None = None,
        *,
        clock: interfaces.IReactorTime | None = None,
        announce: Callable[[], Announcement] | None = None,
        tls: TLSServer | None = None,
        sasl: Sequence[MechanismInfo] | None = None,
        languages: Languages | None = None,
        admission: IAdmission | None = None,
        accounts: object = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            # The module is the installed reactor at run time.
            clock = cast(interfaces.IReactorTime, reactor)
        self.portal = portal
        #: What answers questions about accounts, usually the password
        #: checker: as an ISecretInventory, which challenge-response logins
        #: to offer; as an IScramKeySource, SCRAM's keys.  None: offer them
        #: when the portal takes their credentials, and no SCRAM.
        self.accounts = accounts
        self.policy = policy or Policy()
        self.clock: interfaces.IReactorTime = clock
        #: Connection limits, user sessions and the failed-login penalty,
        #: shared with the SMTP/LMTP receiver when the service gives both one.
        self.admission: IAdmission = admission or LocalAdmission(self.policy, self.clock)

        self._announce = announce
        #: The TLS server side for STLS, or None when no certificate is set.
        self.tls = tls
        #: Every SASL mechanism the server knows, in CAPA order; the policy
        #: enables some (:meth:`enabled_mechanisms`), and each session offers
        #: those its connection allows (POP3Protocol.offered_mechanisms).
        self.sasl: list[MechanismInfo] = list(MECHANISMS if sasl is None else sasl)
        #: The response languages (LANG); the first is the default.
        self.languages = languages or Languages()
        #: The open sessions.
        self.sessions: set[POP3Protocol] = set()
        self._refusals = RefusalLog(self.clock, "POP3")
        #: Sources of CAPA lines, in order, each called per CAPA: the core
        #: ones (STLS among them) and SASL's.  An application may add its own.
        self.capabilities: list[CapabilitySource] = [core_capabilities, sasl_capability]

    # Connections

    def buildProtocol(self, addr: interfaces.IAddress | None) -> Any:
        """A session, or, over the connection limits, a refusal that costs next to nothing."""
        admitted = ask(self.admission, "pop3", self.client_key(addr))
        if admitted.refused is not None:
            self._refusals.refused(SessionInfo(addr, secure=False).where, admitted.refused)
            refusal = RefusedConnection(wire.err(errors.TooManyConnections()))
            refusal.factory = self
            return refusal
        session = super().buildProtocol(addr)
        assert session is not None  # Factory.buildProtocol always builds one
        session.lease, session.admitting = admitted.lease, admitted.pending
        return session

    def client_key(self, peer: interfaces.IAddress | None) -> str | None:
        """The key per-client limits count by; None for trusted clients and UNIX sockets."""
        return client_key(self.policy, peer)

    def session_opened(self, session: POP3Protocol) -> None:
        """Track a new session (from its connectionMade)."""
        self.sessions.add(session)

    def session_closed(self, session: POP3Protocol) -> None:
        """Stop tracking a session and give back its admission (from its connectionLost)."""
        self.sessions.discard(session)
        lease, session.lease = session.lease, None
        if lease is not None:
            lease.release()

    # Logins

    def login(self, credentials: Any, mind: ISessionInfo) -> Deferred[Any]:
        """
        ``portal.login(credentials, mind, IMailbox)``, counting each user's
        sessions; fires with ``(interface, mailbox, logout)``.

        A ``twisted.cred`` Portal's own checkers and realm do the work, with
        the realm behind :class:`_CountingRealm`, so sessions are counted by
        avatar id and a user at the limit is refused before the realm opens
        anything.  That Portal is made per login (it costs two attributes)
        so that an application which changes its Portal's realm or checkers
        later is followed, and its realm is never replaced in its hands.
        Any other portal is called as it is, and its sessions are counted
        by login name once it has logged in.
        """
        portal = self.portal
        if isinstance(portal, Portal):
            counting = Portal(_CountingRealm(self.admission, portal.realm))
            counting.checkers = portal.checkers
            return counting.login(credentials, mind, IMailbox)
        return Deferred.fromCoroutine(self._login_counted(credentials, mind))

    async def _login_counted(self, credentials: Any, mind: ISessionInfo) -> Any:
        """Another kind of portal: its sessions are counted by login name."""
        interface, mailbox, logout = await self.portal.login(credentials, mind, IMailbox)
        try:
            lease = await self.admission.user_session(_penalty_name(credentials.username))
        except Exception:
            logout()
            raise
        return interface, mailbox, _releasing(logout, lease)

    # Capabilities

    def apop_offered(self) -> bool:
        """Whether greetings carry an APOP timestamp (see :mod:`popserv.server.capabilities`)."""
        return capabilities.apop_offered(self)

    def enabled_mechanisms(self) -> list[MechanismInfo]:
        """The SASL mechanisms the policy enables (see :mod:`popserv.server.capabilities`)."""
        return capabilities.enabled_mechanisms(self)

    def coverage(self, kind: str) -> str:
        """
        How many accounts could pass ``kind`` of login (see
        :mod:`popserv.server.capabilities`).
        """
        return capabilities.coverage(self, kind)

    def announcement(self) -> Announcement:
        """LOGIN-DELAY and EXPIRE as CAPA states them before login."""
        if self._announce is not None:
            return self._announce()
        account = self.policy.account
        return Announcement(account.login_delay, account.expire_days, per_user=False)


__all__ = [
    "COMMANDS",
    "CapabilitySource",
    "POP3Factory",
    "POP3Protocol",
    "SessionInfo",
    "State",
    "apop_timestamp",
    "core_capabilities",
]
