"""
Every limit and timing of a POP3 session, in one object the factory holds.

Defaults are the safe ones; each is a twistd option.  Where a number comes
from is said beside it.
"""

from __future__ import annotations

import ipaddress
import socket

from attrs import field, frozen
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IAddress

from popserv._version import __version__
from popserv.accounts import AccountSettings
from popserv.wire import MAX_COMMAND_LINE


@frozen
class Policy:
    """Limits and timings for the sessions of one POP3 factory."""

    #: Host name in the greeting's APOP timestamp.
    hostname: str = field(factory=socket.getfqdn)
    #: RFC 1939 section 3: the autologout timer is at least 10 minutes.
    idle_timeout: float = 600.0
    #: RFC 2449 section 4: command lines are at most 255 octets with CRLF.
    max_line_length: int = MAX_COMMAND_LINE
    #: Reading from the client pauses while this many commands wait.
    max_queued_commands: int = 32
    #: Seconds before a failed login's -ERR (Dovecot waits about 2 s).
    auth_failure_delay: float = 2.0
    #: Failed logins in one session before the connection is closed.
    max_auth_failures: int = 3
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
    local_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        converter=lambda nets: tuple(ipaddress.ip_network(n) for n in nets),
    )
    #: Bytes read from the store per chunk while sending a message.
    chunk_size: int = 256 * 1024
    #: The IMPLEMENTATION capability.
    implementation: str = f"popserv-{__version__}"

    def is_local(self, peer: IAddress | None) -> bool:
        """
        True for a peer on :attr:`local_networks` (IPv4-mapped IPv6 included)
        and for UNIX sockets; False for anything else.
        """
        if isinstance(peer, UNIXAddress):
            return True  # a client's address is often unnamed: UNIXAddress(None)
        host = getattr(peer, "host", None)
        if host is None:
            return False
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.local_networks)
