"""
What one run of ``popserv probe`` shares between its checks: the
settings, the connections (the first, which goes on to log in, and the
ones checks open for themselves), and what the server said that several
checks look at (its CAPA answers, the listing, the messages retrieved),
each fetched once, when first needed.

Nothing here sends DELE: only the checks that ``--allow-delete`` turns on
do.  A logged-in session ends with QUIT, except when the server said it
expires retrieved mail (RFC 2449 EXPIRE other than NEVER): then the probe
hangs up without QUIT, so the server never reaches the UPDATE state and
removes nothing (RFC 1939 section 6).
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

from attrs import define, field, frozen

from popserv.probe.client import (
    Closed,
    Connection,
    ProbeError,
    TimedOut,
    Transcript,
    reason,
    tls_context,
    tls_facts,
)
from popserv.probe.syntax import Reply, capabilities, scan_listing, unique_id_listing, unstuffed
from popserv.probe.target import Target

#: How often, and how far apart, a login refused ``[IN-USE]`` is tried
#: again: the server may not have seen the probe's previous session end.
IN_USE_TRIES = 10
IN_USE_PAUSE = 0.3

T = TypeVar("T")


@define
class Settings:
    """What ``popserv probe``'s command line asked for."""

    target: Target
    password: str | None = None
    #: STLS is required (without it, STLS is used whenever the server offers it).
    starttls: bool = False
    cafile: str | None = None
    timeout: float = 30.0
    #: RETR at most this many messages, the first ones, each at most ``max_size`` octets.
    retrieve: int = 10
    max_size: int = 1 << 20
    allow_delete: bool = False


class Skip(Exception):
    """A check cannot run here; its message says why (the check is skipped)."""


class NotLoggedIn(Skip):
    """The checks that need a session cannot have one."""


class LoginRefused(NotLoggedIn):
    """The server refused the probe's login."""

    def __init__(self, message: str, reply: Reply | None) -> None:
        super().__init__(message)
        self.reply = reply


@frozen
class Capa:
    """A CAPA answer: its status line and, after +OK, its lines."""

    reply: Reply
    lines: tuple[bytes, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reply.ok

    @property
    def tags(self) -> dict[str, list[str]]:
        return capabilities(self.lines)

    def has(self, tag: str) -> bool:
        return tag in self.tags

    def sasl(self) -> list[str]:
        return [name.upper() for name in self.tags.get("SASL", [])]

    def shown(self) -> str:
        """The tags and their parameters: ``TOP USER SASL(PLAIN,LOGIN) EXPIRE(NEVER) ...``"""
        words = [
            f"{tag}({','.join(params)})" if params else tag
            for tag, params in self.tags.items()
            if tag != "IMPLEMENTATION"
        ]
        return " ".join(words) or "(empty)"


@frozen
class Maildrop:
    """STAT's count and octets, and LIST's message numbers and sizes."""

    count: int
    octets: int
    listing: tuple[tuple[int, int], ...]

    def size(self, number: int) -> int:
        return dict(self.listing)[number]


@frozen
class FailedLogin:
    """A login with a wrong password: the answer, and how long it took."""

    method: str
    reply: Reply | None
    #: From sending the password to its answer, less one round trip.
    seconds: float


@define
class Certificate:
    """What verifying the server's certificate found."""

    error: str | None = None
    peer: dict[str, Any] = field(factory=dict)
    tls: str = ""


class Probe:
    """One run's connections and what they learnt."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.target = settings.target
        self.transcript = Transcript()
        self.verifying = tls_context(settings.cafile)
        self.trusting = tls_context(verify=False)
        self.opened: list[Connection] = []
        #: The first connection: greeting, CAPA, STLS, then the first login.
        self.first: Connection | None = None
        self.first_verified = False
        #: CAPA on the first connection: before TLS (pop3://) or first (pop3s://),
        #: after STLS, and after login.
        self.capa_first: Capa | None = None
        self.capa_tls: Capa | None = None
        self.capa_login: Capa | None = None
        self.certificate: Certificate | None = None
        self.session: Connection | None = None
        self.login_method = ""
        self.login_refused: LoginRefused | None = None
        self.retrieved: dict[int, list[bytes]] = {}
        #: How long the first CAPA took: how long to wait for what may yet come.
        self.round_trip = 0.1
        self._memos: dict[str, Any] = {}

    # Connections

    def open(self, context: ssl.SSLContext | None = None, *, greeted: bool = True) -> Connection:
        """
        A new connection, greeted +OK (unless not ``greeted``): on pop3://
        plain, on pop3s:// with ``context`` (default: one that trusts any
        certificate, for what sends no password).
        """
        context = (context or self.trusting) if self.target.implicit_tls else None
        connection = Connection.open(
            self.target.host,
            self.target.port,
            self.transcript,
            self.settings.timeout,
            context,
            greeted=greeted,
        )
        self.opened.append(connection)
        return connection

    def start(self) -> Connection:
        """
        The first connection.  On pop3:// that is all; on pop3s:// its
        handshake verifies the certificate, and if that fails a second
        connection that does not check it serves the checks that send no
        password.  A :class:`ProbeError` when no connection can be made.
        """
        if not self.target.implicit_tls:
            try:
                self.first = self.open(greeted=False)
            except TimedOut:
                raise ProbeError(
                    f"no greeting from {self.where} within {self.settings.timeout:g} s"
                    " (is it a pop3s:// port?)"
                ) from None
            return self.first
        try:
            self.first = self.open(self.verifying, greeted=False)
        except ssl.SSLCertVerificationError as e:
            self.first = self.open(self.trusting, greeted=False)
            assert self.first.tls is not None
            self.certificate = Certificate(error=reason(e), tls=tls_facts(self.first.tls))
        except ssl.SSLError as e:
            raise ProbeError(
                f"the TLS handshake with {self.where} failed: {reason(e)} (is it a pop3:// port?)"
            ) from None
        else:
            self.first_verified = True
            self.certificate = _certificate_of(self.first)
        return self.first

    @property
    def where(self) -> str:
        host = self.target.host
        return f"[{host}]:{self.target.port}" if ":" in host else f"{host}:{self.target.port}"

    def on_first(self) -> Connection:
        """The first connection, while it is open and nobody has logged in on it."""
        first = self.first
        if first is None or first.closed or first.logged_in:
            raise Skip("the first connection is gone")
        if first.greeting is None or not first.greeting.ok:
            raise Skip("see greeting")
        return first

    def patience(self) -> float:
        """How long to wait for an answer that should not come: 0.2 s and 4 round trips, to 2 s."""
        return min(2.0, 0.2 + 4 * self.round_trip)

    def stls(self, connection: Connection, context: ssl.SSLContext) -> Reply:
        """STLS, and after +OK the handshake (its errors raised as they come)."""
        reply = connection.command("STLS")
        if reply.ok:
            connection.start_tls(context, self.target.host)
        return reply

    def stls_offered(self) -> bool:
        """Whether the server offered STLS before TLS (pop3:// only)."""
        if self.target.implicit_tls:
            return False
        return self.first_capa().has("STLS")

    def uses_tls(self) -> bool:
        """Whether the probe logs in over TLS: pop3s://, or STLS when required or offered."""
        return self.target.implicit_tls or self.settings.starttls or self.stls_offered()

    def first_capa(self) -> Capa:
        """CAPA on the first connection (or, when it is gone, a new one), before TLS on pop3://."""
        if self.capa_first is None:
            if self.first is not None and not self.first.closed and not self.first.logged_in:
                started = time.monotonic()
                self.capa_first = capa(self.on_first())
                self.round_trip = time.monotonic() - started
            else:
                connection = self.open()
                self.capa_first = capa(connection)
                self.end(connection)
        return self.capa_first

    def secure(self, connection: Connection) -> Capa:
        """
        Make a fresh pop3:// connection ready to log in: STLS with the
        certificate verified when the probe uses TLS; CAPA either way.
        """
        if connection.tls is None and self.uses_tls():
            if not self.stls_offered() and self.settings.starttls:
                raise NotLoggedIn("--starttls: the server does not offer STLS")
            try:
                reply = self.stls(connection, self.verifying)
            except ssl.SSLCertVerificationError as e:
                connection.close()
                self.certificate = Certificate(error=reason(e))
                raise NotLoggedIn(f"the certificate did not verify: {reason(e)}") from None
            except ssl.SSLError as e:
                connection.close()
                raise ProbeError(f"the TLS handshake after STLS failed: {reason(e)}") from None
            if not reply.ok:
                raise ProbeError(f"STLS was offered, but answered {reply}")
            if self.certificate is None:
                self.certificate = _certificate_of(connection)
        return capa(connection)

    def verified_connection(self) -> tuple[Connection, Capa]:
        """A new connection ready to log in (see :meth:`secure`)."""
        if self.certificate is not None and self.certificate.error is not None:
            raise NotLoggedIn(f"the certificate did not verify: {self.certificate.error}")
        connection = self.open(self.verifying)
        return connection, self.secure(connection)

    def is_local(self, connection: Connection) -> bool:
        try:
            return ipaddress.ip_address(connection.peer.split("%")[0]).is_loopback
        except (ValueError, OSError):
            return False

    # Logging in

    def login_commands(self, capa: Capa, connection: Connection, password: str) -> list[str]:
        """How to log in on ``connection``, by what CAPA offers: USER/PASS, or AUTH PLAIN."""
        user = self.target.user
        assert user is not None
        if connection.tls is None and self.uses_tls():
            raise NotLoggedIn("no password is sent without TLS")
        if not capa.ok or capa.has("USER"):
            self.login_method = "USER/PASS"
            return [f"USER {user}", f"PASS {password}"]
        if "PLAIN" in capa.sasl():
            self.login_method = "AUTH PLAIN"
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            return [f"AUTH PLAIN {token}"]
        where = "over TLS" if connection.tls is not None else "without TLS"
        raise LoginRefused(
            f"the server offers neither USER nor SASL PLAIN {where} (CAPA: {capa.shown()})", None
        )

    def log_in(self, connection: Connection, capa: Capa, password: str) -> Reply:
        """Send the login; the answer to its last command (or the first -ERR)."""
        reply = None
        for command in self.login_commands(capa, connection, password):
            reply = connection.command(command)
            if not reply.ok:
                break
        assert reply is not None
        connection.logged_in = reply.ok
        return reply

    def transaction(self) -> Connection:
        """
        A logged-in session: the one open, or a new login (on the first
        connection if it is still waiting).  :class:`NotLoggedIn` when
        there is no user or the login was refused.
        """
        if self.session is not None and not self.session.closed:
            return self.session
        self.can_log_in()
        try:
            self.session = self.new_session()
        except LoginRefused as e:
            self.login_refused = e
            raise
        if self.capa_login is None:
            self.capa_login = capa(self.session)
        return self.session

    def can_log_in(self) -> None:
        """:class:`NotLoggedIn` when there is no user, or the login was refused before."""
        if self.login_refused is not None:
            raise NotLoggedIn(f"not logged in (see login: {self.login_refused})")
        if self.target.user is None or self.settings.password is None:
            raise NotLoggedIn("no user in the URL")

    def new_session(self) -> Connection:
        """Log in on a connection of its own (or the first), trying again while [IN-USE]."""
        assert self.settings.password is not None
        for attempt in range(IN_USE_TRIES):
            if attempt:
                time.sleep(IN_USE_PAUSE)
            connection, capa_now = self._login_connection()
            reply = self.log_in(connection, capa_now, self.settings.password)
            if reply.ok:
                return connection
            self.end(connection)
            if reply.code is None or reply.code.upper() != "IN-USE":
                break
        raise LoginRefused(f"{self.login_method} refused: {reply}", reply)

    def _login_connection(self) -> tuple[Connection, Capa]:
        """The first connection if it is still waiting (made ready), or a new one."""
        tls = self.uses_tls()
        first = self.first
        if first is None or first.closed or first.logged_in:
            return self.verified_connection()
        self.first = None  # used once
        if first.tls is not None and not self.first_verified:
            first.close()
            return self.verified_connection()
        if first.tls is not None or not tls:
            return first, self.capa_tls or self.capa_first or capa(first)
        return first, self.secure(first)

    def end(self, connection: Connection) -> Reply | None:
        """
        End a session: QUIT, and wait for the server to close; or, when it
        expires retrieved mail, hang up without QUIT.  The QUIT's answer.
        """
        if connection.closed:
            return None
        if connection.logged_in and self.expires():
            connection.close()
            return None
        try:
            reply = connection.command("QUIT")
            connection.arriving(min(2.0, self.settings.timeout))
        except ProbeError:
            reply = None
        connection.close()
        return reply

    def expires(self) -> bool:
        """RFC 2449 EXPIRE, after login, says retrieved mail may be removed at QUIT."""
        capa_now = self.capa_login
        if capa_now is None or not capa_now.ok:
            return False
        params = capa_now.tags.get("EXPIRE")
        return params is not None and (not params or params[0].upper() != "NEVER")

    def drop(self, connection: Connection | None) -> None:
        """Forget a connection a check left in an unknown state (without QUIT)."""
        if connection is not None:
            connection.close()
        if connection is self.session:
            self.session = None

    def close(self) -> None:
        """End every connection still open, as :meth:`end` does."""
        for connection in self.opened:
            self.end(connection)

    # What several checks look at, fetched once

    def memo(self, name: str, compute: Callable[[], T]) -> T:
        """``compute()`` once; a failure is raised once, then a :class:`Skip` naming ``name``."""
        if name in self._memos:
            found = self._memos[name]
            if isinstance(found, NotLoggedIn):
                raise NotLoggedIn(str(found))
            if isinstance(found, Exception):
                raise Skip(f"see {name}: {found}")
            return found  # type: ignore[no-any-return]
        try:
            self._memos[name] = compute()
        except Skip as e:
            self._memos[name] = e
            raise
        except ProbeError as e:
            self._memos[name] = e
            raise
        return self._memos[name]  # type: ignore[no-any-return]

    def maildrop(self) -> Maildrop:
        return self.memo("stat-list", self._maildrop)

    def _maildrop(self) -> Maildrop:
        session = self.transaction()
        stat = session.command("STAT")
        counted = scan_listing(stat.text.encode()) if stat.ok else None
        if counted is None:
            raise ProbeError(f"STAT answered {stat}, not +OK count octets")
        reply, lines = session.multi("LIST")
        if not reply.ok:
            raise ProbeError(f"LIST answered {reply}")
        listing = []
        for line in lines:
            entry = scan_listing(line)
            if entry is None:
                raise ProbeError(f"LIST sent {line[:60]!r}, not a scan listing (n size)")
            listing.append(entry)
        return Maildrop(counted[0], counted[1], tuple(listing))

    def retrieve(self, number: int) -> list[bytes]:
        """
        RETR ``number``'s lines as received (stuffed), once.  An answer
        shorter than LIST said, and followed by more, was cut short by a
        line of one '.' that the server did not stuff: a :class:`ProbeError`.
        """
        if number not in self.retrieved:
            session = self.transaction()
            reply, lines = session.multi(f"RETR {number}")
            if not reply.ok:
                raise ProbeError(f"RETR {number} answered {reply}")
            self.check_not_cut(session, f"RETR {number}", lines, self.maildrop().size(number))
            self.retrieved[number] = lines
        return self.retrieved[number]

    def check_not_cut(
        self, connection: Connection, command: str, lines: list[bytes], expected: int
    ) -> None:
        """If ``lines`` are fewer octets than ``expected`` and more follows, they were cut short."""
        got = len(unstuffed(lines))
        if got >= expected:
            return
        more = connection.arriving(self.patience())
        if more:
            raise ProbeError(
                f"{command} ended at a line '.' {expected - got} octets early, and"
                f" {len(more)} more followed: a line beginning with '.' was not byte-stuffed"
            )

    def to_retrieve(self) -> list[int]:
        """The first ``--retrieve`` messages no bigger than ``--max-size``."""
        drop = self.maildrop()
        small = [n for n, size in drop.listing if size <= self.settings.max_size]
        return small[: self.settings.retrieve]

    def uidl(self) -> list[tuple[int, bytes]] | None:
        """UIDL's listing in the first session; None if UIDL answered -ERR."""
        return self.memo("uidl", self._uidl)

    def _uidl(self) -> list[tuple[int, bytes]] | None:
        return unique_ids(self.transaction())

    def failed_login(self) -> FailedLogin:
        return self.memo("failed-login", self._failed_login)

    def _failed_login(self) -> FailedLogin:
        """
        One login with a wrong password, as the probe logs in (the URL's
        user, or a made-up one), over TLS when the probe uses it.  Its time
        is from the command that was refused to the -ERR, less the time a
        CAPA took on the same connection.
        """
        user = self.target.user or "popserv-probe-no-such-user"
        wrong = f"popserv-probe-wrong-password-{secrets.token_hex(8)}"
        connection = self._wrong_password_connection() if self.uses_tls() else self.open()
        method = "USER/PASS"
        try:
            started = time.monotonic()
            capa_now = capa(connection)
            round_trip = time.monotonic() - started
            if not capa_now.ok or capa_now.has("USER"):
                commands = [f"USER {user}", f"PASS {wrong}"]
            elif "PLAIN" in capa_now.sasl():
                method = "AUTH PLAIN"
                token = base64.b64encode(f"\0{user}\0{wrong}".encode()).decode("ascii")
                commands = [f"AUTH PLAIN {token}"]
            else:
                raise Skip(
                    f"the server offers neither USER nor SASL PLAIN (CAPA: {capa_now.shown()})"
                )
            for command in commands:
                started = time.monotonic()
                reply = connection.command(command)
                if not reply.ok:
                    break
        except Closed:
            connection.close()
            return FailedLogin(method, None, 0.0)
        seconds = max(0.0, time.monotonic() - started - round_trip)
        if reply.ok:
            # A wrong password let in: leave without QUIT, changing nothing.
            connection.close()
        else:
            self.end(connection)
        return FailedLogin(method, reply, seconds)

    def _wrong_password_connection(self) -> Connection:
        """Over TLS (not verified: a wrong password is no secret)."""
        connection = self.open()
        if connection.tls is None:
            reply = self.stls(connection, self.trusting)
            if not reply.ok:
                raise ProbeError(f"STLS answered {reply}")
        return connection


def capa(connection: Connection) -> Capa:
    """CAPA on ``connection``."""
    reply, lines = connection.multi("CAPA")
    return Capa(reply, tuple(lines))


def unique_ids(connection: Connection) -> list[tuple[int, bytes]] | None:
    """UIDL's listing; None when UIDL answered -ERR."""
    reply, lines = connection.multi("UIDL")
    if not reply.ok:
        return None
    found = []
    for line in lines:
        entry = unique_id_listing(line)
        if entry is None:
            raise ProbeError(f"UIDL sent {line[:80]!r}, not a unique-id listing (n uid)")
        found.append(entry)
    return found


def _certificate_of(connection: Connection) -> Certificate:
    tls = connection.tls
    assert tls is not None
    return Certificate(peer=tls.getpeercert() or {}, tls=tls_facts(tls))


__all__ = [
    "Capa",
    "Certificate",
    "FailedLogin",
    "LoginRefused",
    "Maildrop",
    "NotLoggedIn",
    "Probe",
    "Settings",
    "Skip",
    "capa",
    "unique_ids",
]
