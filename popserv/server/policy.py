"""
Every limit and timing of a POP3 session, in one object the factory holds.

Defaults are the safe ones; each is a twistd option.  Where a number comes
from is said beside it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from attrs import field, frozen
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IAddress

from popserv._version import __version__
from popserv.core.wire import MAX_AUTH_LINE, MAX_COMMAND_LINE
from popserv.logins.accounts import AccountSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _networks(nets: Iterable[str | Network]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n) for n in nets)


def peer_address(peer: IAddress | None) -> Address | None:
    """
    The IP address of a peer, IPv4-mapped IPv6 (``::ffff:192.0.2.1``, how a
    dual-stack socket sees IPv4 clients) as IPv4, a zone (``%eth0``)
    dropped; None for UNIX sockets and anything else without one.
    """
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@frozen
class Policy:
    """Limits and timings for the sessions of one POP3 factory."""

    #: Host name in the greeting's APOP timestamp.
    hostname: str = field(factory=socket.getfqdn)
    #: RFC 1939 section 3: the autologout timer is at least 10 minutes.
    idle_timeout: float = 600.0
    #: Seconds from connecting to a successful login, TLS handshake included:
    #: one deadline, not reset by activity, so a client that drips a byte
    #: now and then (slowloris) or never finishes its handshake is cut off.
    #: A mail client logs in within a second; three failed logins with the
    #: longest penalty take 45 s.
    login_timeout: float = 60.0
    #: RFC 2449 section 4: command lines are at most 255 octets with CRLF.
    max_line_length: int = MAX_COMMAND_LINE
    #: RFC 5034 section 4: AUTH lines may be longer; OAuth tokens run to a few KB.
    max_auth_line_length: int = MAX_AUTH_LINE
    #: Reading from the client pauses while this many commands wait.
    max_queued_commands: int = 32
    #: Bad command lines in a row (unknown, malformed, too long, or not
    #: valid in the state) before the session answers -ERR and closes: a
    #: client this confused, or not speaking POP3 at all (an HTTP request, a
    #: port scanner), is not coming back in sync.  Dovecot's pop3-login
    #: closes after 10 (CLIENT_MAX_BAD_COMMANDS; 3 since 2.3), its pop3 after
    #: 20 failed commands in a row.  Any accepted command resets the count.
    #: At least 1.
    max_bad_commands: int = 10
    #: Seconds before the -ERR of a client's first failed login; each further
    #: failure from the same client doubles it, up to
    #: :attr:`auth_failure_max_delay` (Dovecot's auth_penalty: 2, 4, 8, 15 s).
    auth_failure_delay: float = 2.0
    #: The longest failed-login delay.
    auth_failure_max_delay: float = 15.0
    #: A client's failures are forgotten this long after its last one.
    auth_penalty_expiry: float = 900.0
    #: Clients whose failures are remembered at once; the least recently
    #: failing are forgotten first (each costs ~200 bytes).
    auth_penalty_clients: int = 10_000
    #: Failed logins in one session before the connection is closed.
    max_auth_failures: int = 3
    #: Connections open at once, in all.  Each costs a file descriptor or two
    #: (three while a Maildir is open): keep ``ulimit -n`` well above.
    max_connections: int = 1000
    #: Connections open at once from one client: an IPv4 address, or an IPv6
    #: network of :attr:`ipv6_prefix` bits (one host usually has a whole /64).
    max_connections_per_ip: int = 20
    #: IPv6 clients are counted (and penalised) per network of this prefix
    #: length: a /64 is one LAN or one host, as SLAAC and privacy addresses
    #: hand out; Dovecot's penalty groups /48.
    ipv6_prefix: int = 64
    #: Sessions logged in at once as one user (from a login until the
    #: session ends).  The Maildir lock already allows only one; this bounds
    #: mailboxes that allow several.
    max_user_sessions: int = 10
    #: Clients on these networks (a webmail, a proxy) count as many users:
    #: no per-IP connection limit and no growing failed-login penalty (the
    #: fixed :attr:`auth_failure_delay` still applies).  Empty by default,
    #: like Dovecot's login_trusted_networks: a peer on loopback may be any
    #: local user, or a proxy for the whole internet.
    trusted_networks: tuple[Network, ...] = field(default=(), converter=_networks)
    #: Server-wide LOGIN-DELAY and EXPIRE; users may override them.
    account: AccountSettings = field(factory=AccountSettings)
    #: Offer APOP (the greeting's timestamp): True, False, or None for "when
    #: the portal's checker can verify APOP for at least one account".
    apop: bool | None = None
    #: Allow USER/PASS (and later password-exposing SASL) on a connection
    #: that is neither TLS nor local.  Off: passwords never cross a network
    #: in clear.
    allow_cleartext_auth: bool = False
    #: Allow APOP (and challenge-response SASL) on such connections: the
    #: password is not sent, but the exchange can be attacked offline.
    allow_cleartext_apop: bool = False
    #: SASL mechanisms to offer, by name; None ("auto"): PLAIN and LOGIN,
    #: and each challenge-response mechanism when every account has a
    #: secret it can use (clients pick those first and cannot fall back).
    sasl: tuple[str, ...] | None = None
    #: Peers on these networks count as local: cleartext logins are fine.
    #: (Whether a password may cross the path in clear, a question apart from
    #: :attr:`trusted_networks`, which is about who the client is.)
    local_networks: tuple[Network, ...] = field(
        default=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        converter=_networks,
    )
    #: Bytes read from the store per chunk while sending a message.  64 KiB
    #: (Twisted's buffer size) kept the client fed best in bench B2: 885 MB/s
    #: median against 857 with 256 KiB and 600 with 1 MiB (cache misses).
    chunk_size: int = 64 * 1024
    #: The IMPLEMENTATION capability.
    implementation: str = f"popserv-{__version__}"

    def is_local(self, peer: IAddress | None) -> bool:
        """
        True for a peer on :attr:`local_networks` (IPv4-mapped IPv6 included)
        and for UNIX sockets; False for anything else.
        """
        if isinstance(peer, UNIXAddress):
            return True  # a client's address is often unnamed: UNIXAddress(None)
        address = peer_address(peer)
        return address is not None and any(address in n for n in self.local_networks)

    def is_trusted(self, peer: IAddress | None) -> bool:
        """True for a peer on :attr:`trusted_networks`."""
        address = peer_address(peer)
        return address is not None and any(address in n for n in self.trusted_networks)

    def client_key(self, peer: IAddress | None) -> str | None:
        """
        What per-client limits count by: the IPv4 address, or the IPv6
        network of :attr:`ipv6_prefix` bits; None for peers without an IP
        address (UNIX sockets), which only the overall limits cover.
        """
        address = peer_address(peer)
        if address is None:
            return None
        if isinstance(address, ipaddress.IPv6Address) and self.ipv6_prefix < 128:
            network = ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False)
            return str(network)
        return str(address)
