"""
A POP3 session without I/O (RFC 1939, 2449, 2595, 5034, 6856).

:class:`Session` knows the protocol: which command is legal in which state
and which state it leads to (the one table :data:`TRANSITIONS`), the
deletion marks, the failed-login count, the language and UTF8 mode, and the
words of every answer.  It does nothing itself.  Each command line becomes
a generator of effects (:mod:`popserv.core.effects`: send these bytes,
stream these chunks, check these credentials, send message 3 with this
encoder, apply these deletions, start TLS, close); whoever drives the
session performs each effect, sends back its result or throws its failure
in, and takes the next.

:mod:`popserv.server.protocol` drives it for Twisted; tests drive it
directly, with no transport and no clock.  Nothing here imports Twisted.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from attrs import define, field, frozen

from popserv.core import errors, wire
from popserv.core.body import BodyEncoder
from popserv.core.effects import (
    APOPLogin,
    Authenticate,
    BeginAttempt,
    Capabilities,
    ChooseMechanism,
    Close,
    Commit,
    Effects,
    Log,
    LoggedIn,
    LogIn,
    Mechanisms,
    OpenMaildrop,
    PasswordLogin,
    Penalise,
    Rejected,
    Send,
    SendMessage,
    StartTLS,
    Steps,
    Stream,
)
from popserv.core.lang import Language, Languages
from popserv.core.state import State
from popserv.core.view import MaildropView

if TYPE_CHECKING:
    from popserv.interfaces import Listing


class SessionPolicy(Protocol):
    """The limits and choices a session follows (:class:`popserv.server.policy.Policy`)."""

    @property
    def hostname(self) -> str: ...
    @property
    def max_bad_commands(self) -> int: ...
    @property
    def max_auth_failures(self) -> int: ...
    @property
    def allow_cleartext_auth(self) -> bool: ...
    @property
    def allow_cleartext_apop(self) -> bool: ...


class Server(Protocol):
    """
    What a session reads from the server it runs in, each time it needs it
    (so a policy or language list changed at run time is followed):
    :class:`popserv.server.factory.POP3Factory` is one.
    """

    @property
    def policy(self) -> SessionPolicy: ...
    @property
    def languages(self) -> Languages: ...
    @property
    def tls(self) -> object | None:
        """What STLS starts TLS with; None when the server has no certificate."""


class Account(Protocol):
    """What the session needs of a logged-in user's settings."""

    @property
    def expire_days(self) -> int | None: ...
    @property
    def max_listed(self) -> int:
        """Show only the newest this many messages (0: all)."""


def apop_timestamp(hostname: str) -> bytes:
    """A fresh ``<random@host>`` for the greeting, from the CSPRNG: no pid, no clock."""
    return wire.msg_id(secrets.token_hex(16), hostname)


@define
class Tally:
    """What a session did, for its summary log line (counts and octets)."""

    top: int = 0
    top_octets: int = 0
    retr: int = 0
    retr_octets: int = 0
    deleted: int = 0
    deleted_octets: int = 0
    #: The maildrop when logged in, then what QUIT left in it (all of it,
    #: the messages a cap did not show too).
    left: int = 0
    left_octets: int = 0
    #: How many messages a capped session showed (``--max-listed``), else 0.
    listed: int = 0


class Session:
    """
    The state of one POP3 session, and the effects of each command line.

    ``server`` is what it runs in; ``secure`` and ``local`` describe the
    connection (TLS, a loopback or trusted peer); ``apop_offered`` whether
    the server offers APOP at all; ``now`` the clock EXPIRE counts days by.
    """

    def __init__(
        self,
        server: Server,
        *,
        secure: bool = False,
        local: bool = False,
        apop_offered: bool = False,
        now: Callable[[], float],
    ) -> None:
        self.server = server
        self.secure = secure
        self.local = local
        self.apop_offered = apop_offered
        self.now = now
        self.state = State.AUTHORIZATION
        #: The language of human-readable texts (LANG), and UTF8 mode.
        self.language: Language = server.languages.default
        self.utf8 = False
        #: The greeting's APOP timestamp; empty when APOP is not offered.
        self.timestamp = b""
        #: The name given by USER, for PASS; another USER, APOP, AUTH or STLS
        #: forgets it (commands that change nothing may come between).
        self.user: bytes | None = None
        self.failures = 0
        #: Bad command lines since the last good one (Policy.max_bad_commands).
        self.bad_commands = 0
        #: The deletion marks over the maildrop's listing, from login on.
        self.view: MaildropView | None = None
        #: How the client logged in (USER, APOP, or the SASL mechanism).
        self.mechanism: str | None = None
        #: Why the session closed itself (QUIT, too many bad commands ...).
        self.ended: str | None = None
        self.tally = Tally()
        #: The logged-in user's settings (LOGIN-DELAY, EXPIRE).
        self.account: Account | None = None

    @property
    def policy(self) -> SessionPolicy:
        return self.server.policy

    @property
    def languages(self) -> Languages:
        return self.server.languages

    @property
    def tls_available(self) -> bool:
        return self.server.tls is not None

    # Answers

    def greeting(self) -> bytes:
        """The ``+OK`` greeting, with an APOP timestamp where APOP may be used."""
        text = "POP3 server ready"
        if self.apop_offered and self.apop_allowed():
            self.timestamp = apop_timestamp(self.policy.hostname)
            text += " " + self.timestamp.decode("ascii")
        return wire.ok(text)

    def text(self, template: str, **fields: object) -> str:
        """A human-readable text in the session's language (LANG)."""
        return self.language.text(template, **fields)

    def ok(self, template: str, **fields: object) -> Send:
        """A ``+OK`` line with a human-readable text, in the session's language."""
        return Send(wire.ok(self.text(template, **fields)))

    def error_line(self, error: errors.PopError) -> bytes:
        """The ``-ERR`` line for ``error``, its text in the session's language."""
        return wire.err(error, self.language.texts.get(error.text))

    # What the connection allows

    def cleartext_login_allowed(self) -> bool:
        """A password may be sent: under TLS, from a local peer, or where allowed."""
        return self.secure or self.local or self.policy.allow_cleartext_auth

    def apop_allowed(self) -> bool:
        """APOP on this connection: where passwords may be sent, or where allowed."""
        return self.cleartext_login_allowed() or self.policy.allow_cleartext_apop

    def stls_offered(self) -> bool:
        return (
            self.tls_available
            and not self.secure
            and self.state in (State.AUTHORIZATION, State.USER_GIVEN)
        )

    # Running commands

    def receive(self, line: wire.Line) -> Effects | Steps:
        """
        The effects of one command line: a tuple when the answer is known at
        once (most commands), or a generator for a command that needs the
        results of some effects (a login, a RETR, QUIT's commit).

        The line is parsed, then run by the state's entry of
        :data:`TRANSITIONS`; a line refused (unknown, malformed, not valid in
        this state) counts towards :attr:`Policy.max_bad_commands`, and a
        command that runs, however it ends, starts the count again.
        """
        try:
            if isinstance(line, wire.TooLong):
                raise errors.LineTooLong()
            command = wire.parse_command(line)
            transition = TRANSITIONS[self.state].get(command.verb)
            if transition is None:
                raise errors.BadState()
        except errors.PopError as e:
            return self._bad_command(e)
        self.bad_commands = 0
        if transition.entering is not None:
            self.state = transition.entering
        if transition.converses:
            return self._converse(transition, command.args)
        try:
            effects: Effects = transition.handler(self, *command.args)
        except errors.PopError as e:
            return (Send(self.error_line(e)),)
        if transition.after is not None:
            self.state = transition.after
        return effects

    def _converse(self, transition: Transition, args: tuple[Any, ...]) -> Steps:
        try:
            moved = yield from transition.handler(self, *args)
        except errors.PopError as e:
            yield Send(self.error_line(e))
            return
        if moved is not False and transition.after is not None:
            self.state = transition.after

    def _bad_command(self, error: errors.PopError) -> Effects:
        """Refuse a bad line; the last of too many in a row closes the session."""
        self.bad_commands += 1
        if self.bad_commands < self.policy.max_bad_commands:
            return (Send(self.error_line(error)),)
        self.ended = "too many bad commands"
        return (
            Log("{count} bad commands in a row from {peer}, closing", {"count": self.bad_commands}),
            Send(self.error_line(errors.TooManyBadCommands())),
            Close(),
        )

    # AUTHORIZATION

    def _capa(self) -> Steps:
        lines = yield Capabilities()
        yield self.ok("Capability list follows")
        yield Stream(wire.multiline(line.encode("ascii") for line in lines))

    def _user(self, name: bytes) -> Effects:
        if not self.cleartext_login_allowed():
            # Refused before the client sends the password.
            raise errors.TLSRequired()
        self.user = name
        return (self.ok("Send PASS"),)

    def _pass(self, password: bytes) -> Steps:
        user, self.user = self.user, None
        assert user is not None
        self.mechanism = "USER"
        yield BeginAttempt()
        return (yield from self._log_in(PasswordLogin(user, password), errors.AuthFailed()))

    def _apop(self, name: bytes, digest: bytes) -> Steps:
        self.user = None
        if not self.apop_allowed():
            raise errors.TLSRequired()
        if not self.timestamp:
            raise errors.APOPUnavailable()
        self.mechanism = "APOP"
        yield BeginAttempt()
        if len(digest) != 32 or not all(c in b"0123456789abcdefABCDEF" for c in digest):
            rejected = Rejected(name, "malformed APOP digest")
            return (yield from self._failed(rejected, errors.APOPFailed()))
        login = APOPLogin(name, self.timestamp, digest)
        return (yield from self._log_in(login, errors.APOPFailed()))

    def _auth(self, name: bytes | None = None, initial: bytes | None = None) -> Steps:
        """AUTH (RFC 5034): list the mechanisms, or log in through one."""
        self.user = None
        if name is None:
            names = yield Mechanisms()
            yield self.ok("Supported mechanisms follow")
            yield Stream(wire.multiline(n.encode("ascii") for n in names))
            return False
        wanted = name.decode("ascii", "replace").upper()
        mechanism = yield ChooseMechanism(wanted)
        self.mechanism = wanted
        yield BeginAttempt()
        try:
            login = yield Authenticate(mechanism, initial)
        except Rejected as rejected:
            return (yield from self._failed(rejected, errors.AuthFailed()))
        return (yield from self._log_in(login, errors.AuthFailed()))

    def _log_in(self, login: object, failed: errors.PopError) -> Steps:
        """Check ``login``; on success, open the maildrop (TRANSACTION)."""
        try:
            user = yield LogIn(login)
        except Rejected as rejected:
            return (yield from self._failed(rejected, failed))
        listing, account = yield OpenMaildrop()
        self.view = view = MaildropView(listing, account.max_listed)
        self.account = account
        self.failures = 0
        yield LoggedIn(user)
        count, octets = view.stat()
        tally = self.tally
        if view.capped:
            tally.listed = count
            tally.left, tally.left_octets = len(listing), sum(listing.sizes)
        else:
            tally.left, tally.left_octets = count, octets
        yield self.ok("Logged in, {count} messages ({octets} octets)", count=count, octets=octets)
        return True

    def _failed(self, rejected: Rejected, answer: errors.PopError) -> Steps:
        """
        A failed login: counted, answered once the client's penalty is
        served, and the last of :attr:`Policy.max_auth_failures` closes.
        """
        self.failures += 1
        yield Penalise(rejected.user, rejected.reason)
        if self.failures >= self.policy.max_auth_failures:
            yield Send(self.error_line(errors.TooManyFailures()))
            self.ended = "too many failed logins"
            yield Close()
        else:
            yield Send(self.error_line(answer))
        return False

    def _stls(self) -> Effects:
        """
        STLS (RFC 2595).  Nothing learned in clear carries into TLS, where
        a man in the middle could have set it: a USER, the language, the
        failed logins.
        """
        if not self.tls_available:
            raise errors.TLSUnavailable()
        if self.secure:
            raise errors.TLSActive()
        if self.utf8:
            raise errors.TLSAfterUTF8()
        self.user = None
        self.failures = 0
        self.language = self.languages.default
        self.secure = True
        return (self.ok("Begin TLS negotiation"), StartTLS())

    def _utf8(self) -> Effects:
        """
        UTF8 (RFC 6856): the client may send UTF-8 and accepts it.  User
        names are UTF-8 (and SASLprep'd) in any case; messages are served
        as they are stored, before and after.
        """
        self.utf8 = True
        return (self.ok("UTF8 enabled"),)

    def _lang(self, language_range: str | None = None) -> Effects:
        """LANG (RFC 6856): list the languages, or switch to one."""
        if language_range is None:
            lines = (f"{lang.tag} {lang.name}".encode() for lang in self.languages.all)
            return (self.ok("Language listing follows"), Stream(wire.multiline(lines)))
        language = self.languages.lookup(language_range)
        if language is None:
            raise errors.UnknownLanguage()
        self.language = language
        return (Send(wire.ok(f"{language.tag} {self.text('Language changed')}")),)

    def _quit_authorization(self) -> Effects:
        self.ended = "QUIT"
        return (self.ok("Bye"), Close())

    # TRANSACTION

    @property
    def maildrop(self) -> MaildropView:
        """The deletion marks, in TRANSACTION and UPDATE."""
        view = self.view
        assert view is not None
        return view

    def _stat(self) -> Effects:
        count, octets = self.maildrop.stat()
        return (Send(wire.ok(f"{count} {octets}")),)

    def _list(self, number: int | None = None) -> Effects:
        view = self.maildrop
        if number is not None:
            return (Send(wire.ok(f"{number} {view.size(number)}")),)
        count, octets = view.stat()
        sizes = view.sizes
        return (
            self.ok("{count} messages ({octets} octets)", count=count, octets=octets),
            Stream(wire.numbered(view.live_runs(), lambda run: sizes[run.start : run.stop])),
        )

    def _uidl(self, number: int | None = None) -> Effects:
        view = self.maildrop
        if number is not None:
            return (Send(wire.ok(f"{number} {view.uid(number)}")),)
        uids = view.uids
        return (
            self.ok("Unique-ID listing follows"),
            Stream(wire.numbered(view.live_runs(), lambda run: uids[run.start : run.stop])),
        )

    def _dele(self, number: int) -> Effects:
        self.maildrop.delete(number)
        return (self.ok("Message {number} deleted", number=number),)

    def _noop(self) -> Effects:
        return (Send(wire.ok()),)

    def _rset(self) -> Effects:
        view = self.maildrop
        view.reset()
        count, octets = view.stat()
        return (self.ok("{count} messages ({octets} octets)", count=count, octets=octets),)

    def _retr(self, number: int) -> Steps:
        index = self.maildrop.index(number)
        size = self.maildrop.listing.sizes[index]
        sent = yield self._send_message(index, BodyEncoder(), f"{size} octets")
        self.maildrop.retrieved(number)
        self.tally.retr += 1
        self.tally.retr_octets += sent

    def _top(self, number: int, lines: int) -> Steps:
        index = self.maildrop.index(number)
        encoder = BodyEncoder(body_lines=lines)
        sent = yield self._send_message(index, encoder, "Top of message follows")
        self.tally.top += 1
        self.tally.top_octets += sent

    def _send_message(self, index: int, encoder: BodyEncoder, text: str) -> SendMessage:
        listing: Listing = self.maildrop.listing
        listed = listing.sizes[index] if listing.exact_sizes else None
        return SendMessage(index, encoder, text, listed)

    def _quit_transaction(self) -> Steps:
        """UPDATE: apply the deletions (and EXPIRE), release the maildrop, close."""
        view = self.maildrop
        expire_days = None if self.account is None else self.account.expire_days
        expired = view.expired_indexes(expire_days, self.now())
        deleted = sorted(set(view.deleted_indexes()).union(expired))
        try:
            yield Commit(deleted, view.retrieved_indexes())
        except errors.PopError:
            yield Send(self.error_line(errors.CommitFailed()))
            self.ended = "QUIT, deletions failed"
        else:
            sizes = view.listing.sizes
            tally = self.tally
            tally.deleted, tally.deleted_octets = len(deleted), sum(sizes[i] for i in deleted)
            # The tally holds the maildrop as it was at login.
            tally.left -= tally.deleted
            tally.left_octets -= tally.deleted_octets
            yield self.ok(
                "Bye, {deleted} deleted, {left} left", deleted=len(deleted), left=tally.left
            )
            self.ended = "QUIT"
        yield Close()


@frozen
class Transition:
    """
    A command legal in some state: what runs it, the state it enters as it
    starts (if it changes), and the state it leads to when it succeeds (a
    handler that raises did not, nor a generator that returns False: a
    failed login, AUTH listing the mechanisms).  A handler returns its
    effects as a tuple, or is a generator of them.
    """

    #: Returns Effects, or is a generator function (Steps).
    handler: Callable[..., Any]
    entering: State | None = None
    after: State | None = None
    #: The handler is a generator (it needs results of its effects).
    converses: bool = field(init=False)

    @converses.default
    def _is_generator(self) -> bool:
        return inspect.isgeneratorfunction(self.handler)


_AUTHORIZATION: dict[str, Transition] = {
    "CAPA": Transition(Session._capa),
    "USER": Transition(Session._user, after=State.USER_GIVEN),
    "APOP": Transition(Session._apop, entering=State.AUTHORIZATION, after=State.TRANSACTION),
    "AUTH": Transition(Session._auth, entering=State.AUTHORIZATION, after=State.TRANSACTION),
    "STLS": Transition(Session._stls, after=State.AUTHORIZATION),
    "UTF8": Transition(Session._utf8),
    "LANG": Transition(Session._lang),
    "QUIT": Transition(Session._quit_authorization),
}

#: Which command is legal in which state, what runs it, and where it leads.
#: Client input only ever selects an entry of this table.  The verbs, and
#: how their arguments are parsed, are the grammar of :data:`wire.ARGUMENTS`:
#: every verb there is run by some state here.
TRANSITIONS: dict[State, dict[str, Transition]] = {
    State.AUTHORIZATION: _AUTHORIZATION,
    State.USER_GIVEN: {
        **_AUTHORIZATION,
        "PASS": Transition(Session._pass, entering=State.AUTHORIZATION, after=State.TRANSACTION),
    },
    State.TRANSACTION: {
        "CAPA": Transition(Session._capa),
        "STAT": Transition(Session._stat),
        "LIST": Transition(Session._list),
        "RETR": Transition(Session._retr),
        "DELE": Transition(Session._dele),
        "NOOP": Transition(Session._noop),
        "RSET": Transition(Session._rset),
        "TOP": Transition(Session._top),
        "UIDL": Transition(Session._uidl),
        "LANG": Transition(Session._lang),
        "QUIT": Transition(Session._quit_transaction, entering=State.UPDATE),
    },
    State.UPDATE: {},
}


__all__ = [
    "TRANSITIONS",
    "Account",
    "Server",
    "Session",
    "SessionPolicy",
    "Tally",
    "Transition",
    "apop_timestamp",
]
