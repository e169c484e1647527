"""
Listening behind a proxy that speaks the PROXY protocol (HAProxy's, v1 text
or v2 binary): every use of the client's address gets the client's, not
the proxy's.

Twisted's ``haproxy:`` endpoint wraps the factory so that ``getPeer()``
answers from the header once it is read.  But the wrapped factory's
``buildProtocol(addr)`` runs when the connection is accepted, with the
proxy's address, and so does the protocol's ``connectionMade``: admission
counted the proxy against the per-client limits, and the session fixed its
peer (logs, the penalty's key, ``--trusted-network``, whether the client
is local and may send a password in clear) before the header arrived.

:class:`ProxyHeaderEndpoint` reads the header first, and only then asks the
listener's factory for a protocol, with the client's address: admission,
the session and everything after it see only the client.  Until then a
connection costs one slot among :attr:`Policy.max_connections` waiting
ones and at most :data:`HEADER_TIMEOUT` seconds, and is counted against no
client.  ``twistd popserv`` uses it for every ``haproxy:`` listener
(:func:`inner_description`).

A PROXY header is believed from a proxy only: the peer of the connection
must be local (:attr:`Policy.local_networks`, or a UNIX socket) or on
:attr:`Policy.trusted_networks`; any other connection is closed unread.
Anyone else could claim any address, the loopback one included.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from popserv.server.policy import Policy
from popserv.server.transports import IStreamTransport

log = Logger()

#: Seconds a connection may take to send its header.  The proxy writes it
#: as soon as it has connected ("the sender must always ensure that the
#: header is sent at once", PROXY protocol spec, section 2), so it comes
#: with the first segment; 10 s leaves room for a loaded proxy and no more
#: for a connection that is not one.
HEADER_TIMEOUT = 10.0

#: v1 starts with this, v2 with Twisted's ``V2Parser.PREFIX`` (12 octets);
#: v2's header is at least 16 octets (spec section 2.2).
_V1_START = b"PROXY "
_V2_START = V2Parser.PREFIX
_V2_MINIMUM = 16

#: The description prefix Twisted gives its PROXY protocol endpoint.
PREFIX = "haproxy"


def inner_description(description: str) -> str | None:
    """
    For an endpoint description of Twisted's PROXY protocol listener
    (``haproxy:tcp:1110``), the listener inside it (``tcp:1110``), which
    :class:`ProxyHeaderEndpoint` should wrap instead; None for any other.
    Twisted matches endpoint prefixes case-insensitively, and so does this.
    """
    prefix, colon, rest = description.partition(":")
    if colon and prefix.strip().lower() == PREFIX:
        return rest
    return None


def proxied_through(transport: object) -> IAddress | None:
    """
    The proxy's own address when ``transport`` (or the TCP connection under
    its TLS) carries a proxied client; None otherwise.
    """
    # A TLS wrapper passes unknown attributes on to the transport under it.
    proxy = getattr(transport, "proxied_through", None)
    return proxy if isinstance(proxy, _ADDRESSES) else None


def client_is_local(policy: Policy, peer: IAddress | None, transport: object) -> bool:
    """
    Whether a password from ``peer`` may come in clear (see
    :attr:`Policy.local_networks`): the client is local and, when it came
    through a proxy, so is the proxy, as the password crosses the path
    between them in clear too.
    """
    proxy = proxied_through(transport)
    return policy.is_local(peer) and (proxy is None or policy.is_local(proxy))


def policy_of(factory: object) -> Policy:
    """The :class:`Policy` of a listener's factory, looked for through wrappers (TLS)."""
    while factory is not None:
        policy = getattr(factory, "policy", None)
        if isinstance(policy, Policy):
            return policy
        factory = getattr(factory, "wrappedFactory", None)
    return Policy(hostname="localhost")


_ADDRESSES = (IPv4Address, IPv6Address, UNIXAddress)


def _checked(address: IAddress | None) -> IAddress | None:
    """
    A source or destination from a header, its host checked and written the
    usual way (Twisted's v1 parser takes any word for an address, its v2
    parser writes IPv6 uncompressed); raises :class:`InvalidProxyHeader`.
    """
    if address is None or isinstance(address, UNIXAddress):
        return address
    if not isinstance(address, (IPv4Address, IPv6Address)) or address.type != "TCP":
        raise InvalidProxyHeader()
    try:
        host = ipaddress.ip_address(address.host)
    except ValueError:
        raise InvalidProxyHeader() from None
    if host.version != (4 if isinstance(address, IPv4Address) else 6):
        raise InvalidProxyHeader()
    if not 0 <= address.port <= 65535:
        raise InvalidProxyHeader()
    return type(address)("TCP", str(host), address.port)


class _HeaderReader:
    """Cuts a v1 or v2 header from the front of the stream, fed in pieces of any size."""

    def __init__(self) -> None:
        self._start = b""
        self._parser: V1Parser | V2Parser | None = None

    def feed(self, data: bytes) -> tuple[ProxyInfo, bytes] | None:
        """
        The header and the bytes after it, once it is whole; None until then.
        Raises :class:`InvalidProxyHeader` for anything else.
        """
        try:
            return self._feed(data)
        except (InvalidProxyHeader, ValueError, UnicodeError):
            # Twisted's v1 parser lets int() and decode() errors through.
            raise InvalidProxyHeader() from None

    def _feed(self, data: bytes) -> tuple[ProxyInfo, bytes] | None:
        if self._parser is None:
            # Twisted's wrapper decides from the first segment alone, and
            # drops a connection whose first segment is short; this waits.
            start = self._start = self._start + data
            if len(start) >= _V2_MINIMUM and start.startswith(_V2_START):
                self._parser = V2Parser()
            elif start.startswith(_V1_START):
                self._parser = V1Parser()
            elif _V2_START.startswith(start[:12]) or _V1_START.startswith(start[:6]):
                return None
            else:
                raise InvalidProxyHeader()
            data, self._start = start, b""
        info, rest = self._parser.feed(data)
        if info is None:
            return None
        assert rest is not None
        parsed = ProxyInfo(info.header, _checked(info.source), _checked(info.destination))
        return parsed, rest


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads one connection's PROXY header, then builds the listener's
    protocol for the client's address and is its transport: ``getPeer()``
    and ``getHost()`` are the header's, the rest is the connection's.
    """

    factory: ProxyHeaderFactory
    #: Set by makeConnection (see popserv.server.transports).
    transport: IStreamTransport
    wrappedProtocol: IProtocol | None  # type: ignore[assignment]  # None until the header is read

    def __init__(self, factory: ProxyHeaderFactory, proxy: IAddress) -> None:
        self.factory = factory
        self.wrappedProtocol = None
        #: The proxy's own address: the connection's peer.
        self.proxied_through = proxy
        self._reader: _HeaderReader | None = _HeaderReader()
        self._peer: IAddress = proxy
        self._host: IAddress | None = None
        self._timer: IDelayedCall | None = None
        #: Counted among the factory's connections waiting for a header.
        self._waiting = True

    def makeConnection(self, transport: Any) -> None:
        # As ProtocolWrapper does, but the wrapped protocol is made later.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)  # type: ignore[no-untyped-call]  # Twisted's, unannotated
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]  # Twisted's, unannotated

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._too_late)

    def _too_late(self) -> None:
        self._timer = None
        self._refuse("no PROXY header in time")

    def _refuse(self, why: str) -> None:
        log.info(
            "Closing a connection from proxy {proxy}: {why}",
            proxy=_where(self.proxied_through),
            why=why,
        )
        self._reader = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._reader is None:
            return  # refused, closing
        try:
            header = self._reader.feed(data)
        except InvalidProxyHeader:
            self._refuse("not a valid PROXY header")
            return
        if header is not None:
            self._header_read(*header)

    def _header_read(self, info: ProxyInfo, rest: bytes) -> None:
        self._reader = None
        self._stop_waiting()
        # LOCAL (v2: the proxy's own health check) and UNKNOWN (v1) carry no
        # client: the connection's own addresses hold (spec section 2.1, 2.2).
        self._peer = info.source or self.proxied_through
        self._host = info.destination
        log.debug(
            "{client} through proxy {proxy}",
            client=_where(self._peer),
            proxy=_where(self.proxied_through),
        )
        wrapped = self.factory.wrappedFactory.buildProtocol(self._peer)
        if wrapped is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = wrapped
        wrapped.makeConnection(self)
        if rest and not self.transport.disconnecting:
            wrapped.dataReceived(rest)

    def _stop_waiting(self) -> None:
        """No longer waiting for the header (it came, or the connection went)."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._waiting:
            self._waiting = False
            self.factory.header_read(self)

    def getPeer(self) -> IAddress:
        return self._peer

    def getHost(self) -> IAddress:
        return self._host or self.transport.getHost()

    # What Twisted's ProtocolWrapper does not pass on: half-close (POP3
    # answers pipelined commands after the client's EOF) and the end of a
    # TLS handshake started by STLS/STARTTLS under this wrapper (its facts,
    # SASL EXTERNAL's certificate among them).

    #
    # Half-close is passed on only to a protocol whose class implements it
    # (POP3Protocol): a TLS wrapper (POP3S) is a ProtocolWrapper, which
    # copies this wrapper's interfaces onto itself and forwards what it
    # lacks to its transport, this wrapper: asking it would call back here
    # until RecursionError.  TLS has no half-close; EOF ends it.

    def _half_closeable(self) -> Any:
        wrapped = self.wrappedProtocol
        if wrapped is not None and IHalfCloseableProtocol.implementedBy(type(wrapped)):
            return wrapped
        return None

    def readConnectionLost(self) -> None:
        wrapped = self._half_closeable()
        if wrapped is not None:
            wrapped.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        wrapped = self._half_closeable()
        if wrapped is not None:
            wrapped.writeConnectionLost()
        else:
            self.transport.loseConnection()

    def handshakeCompleted(self) -> None:
        wrapped = self.wrappedProtocol
        if wrapped is not None and IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()

    def connectionLost(self, reason: Any = None) -> None:
        self._reader = None
        self._stop_waiting()
        self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]  # Twisted's, unannotated
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)


class ProxyHeaderFactory(WrappingFactory):
    """
    Wraps a listener's factory: connections from proxies only (see the
    module), and each one's protocol made once its PROXY header is read.
    """

    protocol = ProxyHeaderProtocol

    def __init__(self, wrappedFactory: IProtocolFactory, clock: IReactorTime) -> None:
        super().__init__(wrappedFactory)  # type: ignore[no-untyped-call]  # Twisted's, unannotated
        self.clock = clock
        self.policy = policy_of(wrappedFactory)
        #: Connections whose header has not come yet.
        self.waiting = 0
        self._refusals = _RateLimitedLog(clock)

    def buildProtocol(self, addr: IAddress) -> ProxyHeaderProtocol | None:  # type: ignore[override]
        policy = self.policy
        if not (policy.is_local(addr) or policy.is_trusted(addr)):
            self._refusals.refused(addr, "not a proxy: neither local nor on --trusted-network")
            return None
        if self.waiting >= policy.max_connections:
            self._refusals.refused(addr, f"{self.waiting} connections waiting for their header")
            return None
        self.waiting += 1
        return ProxyHeaderProtocol(self, addr)

    def header_read(self, protocol: ProxyHeaderProtocol) -> None:
        """``protocol`` is no longer waiting for its header (it came, or the connection went)."""
        self.waiting -= 1


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """
    ``endpoint``, its connections coming from a proxy that sends a PROXY
    header first (the replacement for Twisted's ``haproxy:`` endpoint).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, clock: IReactorTime) -> None:
        self.endpoint = endpoint
        self.clock = clock

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(ProxyHeaderFactory(protocolFactory, self.clock))


class _RateLimitedLog:
    """Refused connections logged at most once a minute, with a count (a flood logs little)."""

    INTERVAL = 60.0

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._count = 0
        self._logged_at: float | None = None

    def refused(self, peer: IAddress, why: str) -> None:
        self._count += 1
        now = self._clock.seconds()
        if self._logged_at is None or now - self._logged_at >= self.INTERVAL:
            log.warn(
                "Refused {count} connection(s) to a PROXY protocol listener since the last"
                " such message; the latest from {peer}: {why}",
                count=self._count,
                peer=_where(peer),
                why=why,
            )
            self._count = 0
            self._logged_at = now


def _where(address: IAddress | None) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = [
    "HEADER_TIMEOUT",
    "ProxyHeaderEndpoint",
    "ProxyHeaderFactory",
    "ProxyHeaderProtocol",
    "client_is_local",
    "inner_description",
    "policy_of",
    "proxied_through",
]
