"""
The POP3 factory: what every session of a server shares.

:class:`POP3Factory` builds a :class:`~popserv.server.protocol.POP3Protocol`
per connection once admission lets it in, logs sessions in through the
application's portal (counting each user's sessions), and answers what the
server offers (APOP, SASL, CAPA) through :mod:`popserv.server.capabilities`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from twisted.cred.portal import IRealm, Portal
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from zope.interface import implementer

from popserv.core import errors, wire
from popserv.core.lang import Languages
from popserv.interfaces import IMailbox, ISessionInfo, PortalLike
from popserv.logins.accounts import Announcement
from popserv.logins.sasl import MECHANISMS
from popserv.logins.sasl.mechanism import MechanismInfo
from popserv.server import capabilities
from popserv.server.admission import (
    IAdmission,
    ILease,
    LocalAdmission,
    RefusalLog,
    RefusedConnection,
    ask,
    client_key,
)
from popserv.server.capabilities import CapabilitySource, core_capabilities, sasl_capability
from popserv.server.lastlogin import LastLogins
from popserv.server.policy import Policy
from popserv.server.protocol import POP3Protocol, SessionInfo
from popserv.server.signin import penalty_name
from popserv.server.tls import TLSServer

if TYPE_CHECKING:
    from popserv.server.drain import Drain
    from popserv.server.metrics import Metrics


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
        if isinstance(mind, SessionInfo):
            mind.user = user
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
        #: The server is stopping: told as each session ends (see popserv.server.drain).
        self.draining: Drain | None = None
        self._refusals = RefusalLog(self.clock, "POP3")
        #: What counts for Prometheus (see popserv.server.metrics); None when off.
        self.metrics: Metrics | None = None
        #: Sources of CAPA lines, in order, each called per CAPA: the core
        #: ones (STLS among them) and SASL's.  An application may add its own.
        self.capabilities: list[CapabilitySource] = [core_capabilities, sasl_capability]
        #: Each user's last login, when the server keeps them (``twistd
        #: popserv`` does, in DATA/lastlogin); None keeps none.
        self.last_logins: LastLogins | None = None

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
        # Secure from the start: a --pop3s listener (STLS comes later).
        session.listener = "pop3s" if session.info.secure else "pop3"
        self.sessions.add(session)
        if self.metrics is not None:
            self.metrics.connection_opened(session.listener)

    def session_closed(self, session: POP3Protocol) -> None:
        """Stop tracking a session and give back its admission (from its connectionLost)."""
        self.sessions.discard(session)
        if self.metrics is not None:
            self.metrics.session_ended(session)
        lease, session.lease = session.lease, None
        if lease is not None:
            lease.release()
        if self.draining is not None:
            self.draining.ended(session)

    def drainable(self) -> set[POP3Protocol]:
        """The sessions a stopping server drains: all those open."""
        return self.sessions

    def attach_metrics(self, metrics: Metrics) -> None:
        """Count this server's sessions and refusals in ``metrics``."""
        self.metrics = metrics
        self._refusals.metrics = metrics

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
            lease = await self.admission.user_session(penalty_name(credentials.username))
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


__all__ = ["CapabilitySource", "POP3Factory", "core_capabilities"]
