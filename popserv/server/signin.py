"""
How a POP3 connection logs in: the effects of the session's login steps.

A login attempt waits for its turn (the client's failed-login penalty,
see :mod:`popserv.server.admission`), runs a SASL exchange over the
connection when it is AUTH, checks the credentials through the factory's
portal, holds the maildrop the realm gives, and serves a failed attempt's
penalty before the ``-ERR``.  A mixin of
:class:`~popserv.server.protocol.POP3Protocol`.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Sequence
from time import perf_counter as metrics_clock
from typing import TYPE_CHECKING, Any, cast

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.core import effects as pop3
from popserv.core import errors, wire
from popserv.core.effects import Rejected
from popserv.core.usernames import loggable_username
from popserv.interfaces import IAccountSettings, IMailbox
from popserv.logins.accounts import session_settings
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
from popserv.server.admission import ILoginTurn
from popserv.server.maybe import fired, resolve

if TYPE_CHECKING:
    from popserv.core.session import Session
    from popserv.server.factory import POP3Factory
    from popserv.server.protocol import POP3Protocol, SessionInfo

log = Logger()

#: The longest reason a failed login's log line quotes, in characters.
MAX_REASON = 200


def penalty_name(user: object) -> str:
    """The user name a login attempt's penalty is counted under."""
    if isinstance(user, bytes):
        return user.decode("utf-8", "replace")
    return user if isinstance(user, str) else repr(user)


def _loggable(user: object) -> str:
    return loggable_username(user if isinstance(user, (bytes, str)) else repr(user))


class LoginEffects:
    """The login half of a POP3 connection."""

    factory: POP3Factory
    info: SessionInfo
    session: Session
    _lost: bool
    _turn: ILoginTurn | None
    _sleeping: Deferred[Any] | None
    _splitter: wire.LineSplitter
    _line_waiter: Deferred[wire.Line] | None
    _mailbox: IMailbox | None
    _logout: Callable[[], object] | None
    logged_in_as: bytes | str | None

    if TYPE_CHECKING:  # Provided by the protocol.

        def send(self, data: bytes) -> None: ...

        def _release(self) -> None: ...

        def _cancel_login_timer(self) -> None: ...

        @property
        def mailbox(self) -> IMailbox: ...

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

    def _do_begin_attempt(self, effect: pop3.BeginAttempt) -> Deferred[None] | None:
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
        if waiting.called:
            turn, failure = fired(waiting)
            if failure is not None:
                raise failure
            self._turn = turn
            return None
        # Cancelled, giving up the place, if the connection is lost meanwhile.
        self._sleeping = waiting
        return waiting.addCallback(self._take_turn)

    def _take_turn(self, turn: ILoginTurn) -> None:
        self._turn = turn

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
        return capabilities.offered_mechanisms(cast("POP3Protocol", self))

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
        metrics = self.factory.metrics
        started = metrics_clock() if metrics is not None else 0.0
        try:
            _, mailbox, logout = await self.factory.login(credentials, self.info)
        except (UnauthorizedLogin, UnhandledCredentials, errors.InvalidUsername) as e:
            if metrics is not None:
                metrics.login_checked(metrics_clock() - started)
            if failure is not None:
                # The client's dummy answer; a cancel or junk ends it the same way.
                with contextlib.suppress(errors.PopError):
                    await self._challenge(failure)
            raise Rejected(user, str(e) or type(e).__name__) from None
        except errors.PopError as e:
            if metrics is not None:
                metrics.login_checked(metrics_clock() - started)
                metrics.login(self.session.mechanism, "refused")
            self._end_turn()
            log.info(
                "Login of {user} refused: {reason}",
                user=_loggable(user),
                reason=wire.loggable(e.detail or e.text, MAX_REASON),
            )
            raise
        if metrics is not None:
            metrics.login_checked(metrics_clock() - started)
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
            user=_loggable(user),
            peer=self.info.where,
            # A checker's words may quote the client (a token library's
            # error): escaped like every client value.
            reason=wire.loggable(reason, MAX_REASON),
        )
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.login(self.session.mechanism, "failure")
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
        started = metrics_clock() if self.factory.metrics is not None else 0.0
        try:
            listing = self.mailbox.listing()
        except BaseException:
            self._not_opened(None)
            raise
        if isinstance(listing, Deferred):
            return listing.addCallbacks(
                self._opened, self._not_opened, callbackArgs=(started,)
            )
        return self._opened(listing, started)

    def _opened(self, listing: Any, started: float) -> tuple[Any, IAccountSettings]:
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.maildrop_opened(metrics_clock() - started)
        if self._lost:
            self._release()
            raise CancelledError()
        defaults = self.factory.policy.account
        return listing, session_settings(IAccountSettings(self.mailbox, defaults), defaults)

    def _not_opened(self, failure: Failure | None) -> Failure | None:
        self._release()
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.login(self.session.mechanism, "error")
        return failure

    def _do_logged_in(self, effect: pop3.LoggedIn) -> None:
        self._cancel_login_timer()
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.login(self.session.mechanism, "success")
        user = effect.user
        self.logged_in_as = user if isinstance(user, (bytes, str)) else repr(user)
        log.info(
            "{user} logged in from {peer}",
            user=_loggable(effect.user),
            peer=self.info.where,
        )
        last_logins = self.factory.last_logins
        if last_logins is not None:
            peer = self.info.peer
            last_logins.record(
                self.info.user or penalty_name(user),
                self.factory.clock.seconds(),
                getattr(peer, "host", None) or self.info.where,
                self.session.mechanism or "-",
            )


__all__ = ["LoginEffects", "penalty_name"]
