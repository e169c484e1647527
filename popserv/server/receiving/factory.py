"""
The receiver's listener: :class:`ReceiverSettings` (the limits and names of
one SMTP or LMTP listener) and :class:`ReceiverFactory`, which admits each
connection, makes its session, and holds what the sessions share (the
recipient directory, the spool, the thread pool, admission).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from attrs import frozen
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorThreads, IReactorTime

from popserv.core.smtpwire import TOO_MANY
from popserv.server.admission import (
    IAdmission,
    LocalAdmission,
    RefusalLog,
    RefusedConnection,
    ask,
    client_key,
)
from popserv.server.policy import Policy
from popserv.server.proxied import client_is_local
from popserv.server.receiving.connection import ReceiverConnection, peer_text
from popserv.server.receiving.protocol import LMTPProtocol, ReceiverProtocol
from popserv.server.spool import Spool
from popserv.server.tls import TLSServer
from popserv.stores.delivery import BadAddress, Directory, Recipient

if TYPE_CHECKING:
    from popserv.server.drain import Drain
    from popserv.server.metrics import Metrics


@frozen
class ReceiverSettings:
    """Limits and names of one SMTP or LMTP listener."""

    hostname: str
    #: SIZE (RFC 1870): the largest message accepted, in octets.
    max_message_size: int = 25 * 1024 * 1024
    #: RFC 5321 section 4.5.3.1.8: at least 100 must be accepted.
    max_recipients: int = 100
    #: RFC 5321 section 4.5.3.2: 5 minutes for a command, 10 for DATA blocks.
    timeout: float = 300.0
    #: Errors in one session before it is closed (Postfix: 20).
    max_errors: int = 20
    #: Commands that move no mail (:data:`~popserv.core.smtpwire.JUNK_COMMANDS`,
    #: and unknown ones) before the session is closed; counted afresh after
    #: each message taken.
    #: Postfix's smtpd_junk_command_limit is 100 too.
    max_junk_commands: int = 100
    #: The longest a session may last, whatever it does, so that a client
    #: dripping NOOPs inside the idle timeout cannot hold a connection slot
    #: for ever.  30 minutes still carries a 25 MB message at 15 KB/s; MTAs
    #: reuse a connection for 5 minutes at most (Postfix's
    #: smtp_connection_reuse_time_limit: 300 s).
    max_session_time: float = 30 * 60.0
    #: Where DATA is spooled (made, mode 0700, if missing).  None is the
    #: system's temporary directory, which is often a tmpfs, so memory;
    #: ``twistd popserv`` uses ``.spool`` in the data directory.
    spool_dir: Path | None = None


class ReceiverFactory(protocol.ServerFactory):
    """
    Makes SMTP (or, with ``lmtp``, LMTP) sessions that deliver through
    ``directory``, within the connection limits of ``policy`` (the POP3
    ones: in all, and per client IP or IPv6 network, trusted ones exempt).
    ``clock`` times the session limit (default: ``reactor``).
    """

    def __init__(
        self,
        directory: Directory,
        settings: ReceiverSettings,
        *,
        lmtp: bool = False,
        tls: TLSServer | None = None,
        policy: Policy | None = None,
        reactor: IReactorThreads | None = None,
        clock: IReactorTime | None = None,
        admission: IAdmission | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor  # type: ignore[assignment]
        self.directory = directory
        self.settings = settings
        self.lmtp = lmtp
        self.tls = tls
        self.policy = policy or Policy(hostname=settings.hostname)
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        #: Connection limits, shared with POP3 when the service gives both one.
        self.admission: IAdmission = admission or LocalAdmission(self.policy, self.clock)
        self.service = "lmtp" if lmtp else "smtp"
        self._refusals = RefusalLog(self.clock, self.service.upper())
        #: Connections open now, admitted or waiting for admission.
        self.connections: set[ReceiverConnection] = set()
        #: The server is stopping: told as each session ends (see popserv.server.drain).
        self.draining: Drain | None = None
        #: What counts for Prometheus (see popserv.server.metrics); None when off.
        self.metrics: Metrics | None = None

    @property
    def sessions(self) -> int:
        """Sessions open now."""
        return len(self.connections)

    def drainable(self) -> set[ReceiverConnection]:
        """The sessions a stopping server drains: all those open."""
        return self.connections

    def attach_metrics(self, metrics: Metrics) -> None:
        """Count this listener's connections, refusals and deliveries in ``metrics``."""
        self.metrics = metrics
        self._refusals.metrics = metrics

    def buildProtocol(self, addr: IAddress | None) -> protocol.Protocol:
        admitted = ask(self.admission, self.service, client_key(self.policy, addr))
        if admitted.refused is not None:
            self._refusals.refused(peer_text(addr), admitted.refused)
            return RefusedConnection(TOO_MANY)
        session = (LMTPProtocol if self.lmtp else ReceiverProtocol)(self)
        session.lease, session.admitting = admitted.lease, admitted.pending
        self.connections.add(session)
        return session

    def session_closed(self, session: ReceiverConnection) -> None:
        self.connections.discard(session)
        lease, session.lease = session.lease, None
        if lease is not None:
            lease.release()
        if self.draining is not None:
            self.draining.ended(session)

    def resolve(
        self, address: str, peer: IAddress, transport: object = None
    ) -> Recipient | Deferred[Recipient]:
        """
        The local recipient for ``address``.  Over LMTP the MTA has routed
        the mail already, so any domain is taken; over SMTP only ours, and
        a bare local part only from a local client (and, behind a proxy,
        through a local proxy: the connection's ``transport`` says).  With
        accounts in a database, a Deferred: the lookup runs in a thread.
        """
        if not address:
            raise BadAddress("empty")
        if self.lmtp:
            options = {"any_domain": True}
        else:
            # RFC 5321 section 4.5.1: "postmaster" alone must be accepted from anyone.
            local = client_is_local(self.policy, peer, transport)
            options = {"bare": local or address.lower() == "postmaster"}
        if self.directory.blocking:  # accounts in a database: never on the reactor
            return self.directory.resolve_in_thread(address, **options)
        return self.directory.resolve(address, **options)

    def open_spool(self) -> Spool:
        """A new spool file for one message (raises OSError)."""
        return Spool.open(self.settings.spool_dir)
