"""
Behind a proxy: real PROXY protocol v1 and v2 headers over a real loopback
listener made from a ``haproxy:tcp:...`` description, as ``twistd popserv``
makes it; everything that uses the client's address uses the header's.
"""

from __future__ import annotations

import socket
import struct

from attrs import evolve
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from popserv.server.configure import endpoint
from popserv.server.policy import Policy
from popserv.server.proxied import (
    HEADER_TIMEOUT,
    ProxyHeaderEndpoint,
    ProxyHeaderFactory,
    inner_description,
)
from popserv.server.startchecks import warn_about_cleartext
from tests.support import Session
from tests.support.receiver import ReceiverTestCase
from tests.support.sockets import MarkedReader

#: PROXY protocol v2's signature (spec section 2.2).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT = "198.51.100.7"


def v1(source: str = CLIENT, port: int = 55555, family: str = "TCP4") -> bytes:
    destination = "127.0.0.1" if family == "TCP4" else "::1"
    return f"PROXY {family} {source} {destination} {port} 110\r\n".encode()


def v2(source: str = CLIENT, port: int = 55555) -> bytes:
    """A v2 PROXY command for a TCP client, IPv4 or IPv6."""
    if ":" in source:
        family, addresses = 0x21, socket.inet_pton(socket.AF_INET6, source) + bytes(15) + b"\1"
    else:
        family, addresses = 0x11, socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    body = addresses + struct.pack("!HH", port, 110)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def v2_local() -> bytes:
    """A v2 LOCAL command: the proxy's own connection (a health check)."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def v2_unix(path: bytes = b"/run/haproxy/pop3.sock") -> bytes:
    body = path.ljust(108, b"\0") + b"/run/popserv.sock".ljust(108, b"\0")
    return V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", len(body)) + body


class Client(MarkedReader):
    """A blocking client that sends a PROXY header first, as HAProxy does."""

    def __init__(self, port: int, header: bytes, *, bytewise: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        if bytewise:
            for i in range(len(header)):
                self.sock.sendall(header[i : i + 1])
        else:
            self.sock.sendall(header)

    def line(self) -> bytes:
        return self.until(b"\r\n") + b"\r\n"

    def ask(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        return self.line()



class ProxiedTestCase(ReceiverTestCase):
    """POP3 and SMTP behind ``haproxy:tcp:0:interface=127.0.0.1`` listeners."""

    def setUp(self):
        super().setUp()
        self.proxied = {}
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        return self._listen()

    async def _listen(self):
        for name, factory in (("pop3", self.pop3), ("smtp", self.smtp)):
            made = endpoint(name, "haproxy:tcp:0:interface=127.0.0.1", reactor)
            port = await made.listen(factory)
            self.addCleanup(port.stopListening)
            self.proxied[name] = port.getHost().port

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def connect(self, header: bytes, service: str = "pop3", **kwargs) -> Client:
        client = Client(self.proxied[service], header, **kwargs)
        self.addCleanup(client.close)
        return client

    async def until_logged(self, text: str) -> None:
        for _ in range(200):
            if text in self.logged():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{text!r} not logged:\n{self.logged()}")

    @staticmethod
    def quit(client: Client) -> None:
        client.ask(b"QUIT")


class PeerTests(ProxiedTestCase):
    async def test_v1_header_is_the_peer(self):
        """The session's peer, and so its log lines, is the v1 header's source."""
        client = await self.in_thread(self.connect, v1())
        self.assertTrue((await self.in_thread(client.line)).startswith(b"+OK"))
        await self.in_thread(self.quit, client)
        await self.until_logged(f"Disconnected {CLIENT}:55555")

    async def test_v2_header_is_the_peer(self):
        """The same with a binary v2 header."""
        client = await self.in_thread(self.connect, v2(port=40000))
        await self.in_thread(client.line)
        await self.in_thread(self.quit, client)
        await self.until_logged(f"Disconnected {CLIENT}:40000")

    async def test_v2_ipv6_header_is_the_peer(self):
        """An IPv6 client, written the usual (compressed) way."""
        client = await self.in_thread(self.connect, v2("2001:db8::7", 40001))
        await self.in_thread(client.line)
        await self.in_thread(self.quit, client)
        await self.until_logged("Disconnected [2001:db8::7]:40001")

    async def test_header_one_byte_at_a_time_with_a_command_behind(self):
        """A header cut into single bytes, and a command in the header's segment, both work."""
        for header in (v1(), v2()):
            client = await self.in_thread(self.connect, header + b"QUIT\r\n", bytewise=True)
            self.assertTrue((await self.in_thread(client.line)).startswith(b"+OK POP3"))
            self.assertTrue((await self.in_thread(client.line)).startswith(b"+OK Bye"))

    async def test_local_command_is_the_proxy(self):
        """A v2 LOCAL command (a health check) carries no client: the proxy is the peer."""
        client = await self.in_thread(self.connect, v2_local())
        await self.in_thread(client.line)
        await self.in_thread(self.quit, client)
        await self.until_logged("Disconnected 127.0.0.1:")

    async def test_unix_socket_client(self):
        """A v2 header for a client of the proxy's UNIX socket: a local client."""
        client = await self.in_thread(self.connect, v2_unix())
        await self.in_thread(client.line)
        [session] = self.pop3.sessions
        self.assertIsInstance(session.info.peer, UNIXAddress)
        self.assertTrue(session.info.local)
        await self.in_thread(self.quit, client)

    async def test_invalid_headers_close_the_connection(self):
        """No header, a malformed one, or one with a made-up address: closed, unanswered."""
        for header in (
            b"USER alice\r\n",
            b"PROXY TCP4 not-an-address 127.0.0.1 1 110\r\n",
            b"PROXY TCP4 198.51.100.7 127.0.0.1 99999 110\r\n",
            b"PROXY TCP6 198.51.100.7 ::1 1 110\r\n",
            b"PROXY " + b"x" * 200,
        ):
            client = await self.in_thread(self.connect, header)
            self.assertTrue(await self.in_thread(client.closed), header)
        self.assertFalse(self.pop3.sessions)


class CleartextTests(ProxiedTestCase):
    async def test_cleartext_refused_for_a_remote_client_through_a_local_proxy(self):
        """The proxy is on loopback, the client is not: no USER/PASS without TLS."""
        client = await self.in_thread(self.connect, v1())
        await self.in_thread(client.line)
        answer = await self.in_thread(client.ask, b"USER alice")
        self.assertTrue(answer.startswith(b"-ERR [AUTH]"), answer)
        await self.in_thread(self.quit, client)

    async def test_local_client_through_a_local_proxy_may(self):
        """A loopback client through a loopback proxy logs in, logged with its own port."""
        client = await self.in_thread(self.connect, v1("127.0.0.1", 44444))
        await self.in_thread(client.line)
        await self.in_thread(client.ask, b"USER alice")
        answer = await self.in_thread(client.ask, b"PASS alice pw")
        self.assertTrue(answer.startswith(b"+OK"), answer)
        await self.until_logged("alice logged in from 127.0.0.1:44444")
        await self.in_thread(self.quit, client)

    async def test_local_client_through_a_remote_proxy_may_not(self):
        """The password would cross the proxy's network in clear: refused."""
        peer = IPv4Address("TCP", "127.0.0.1", 1)
        factory = ProxyHeaderFactory(self.pop3, Clock())
        factory.policy = evolve(factory.policy, trusted_networks=["192.0.2.0/24"])
        wrapper = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 5000))
        wrapper.makeConnection(StringTransport(peerAddress=peer))
        wrapper.dataReceived(v1("127.0.0.1", 44444))
        [session] = self.pop3.sessions
        self.assertFalse(session.info.local)
        wrapper.transport.loseConnection()
        wrapper.connectionLost(None)


class LimitTests(ProxiedTestCase):
    options = {"max-connections-per-ip": 2, "auth-failure-delay": 0.05}

    async def test_per_client_limit_counts_the_client(self):
        """Two connections from one client behind the proxy are its allowance; others get in."""
        first = await self.in_thread(self.connect, v1(port=1))
        second = await self.in_thread(self.connect, v2(port=2))
        for client in (first, second):
            self.assertTrue((await self.in_thread(client.line)).startswith(b"+OK"))
        third = await self.in_thread(self.connect, v1(port=3))
        self.assertTrue((await self.in_thread(third.line)).startswith(b"-ERR [SYS/TEMP]"))
        other = await self.in_thread(self.connect, v1("198.51.100.8"))
        self.assertTrue((await self.in_thread(other.line)).startswith(b"+OK"))
        self.assertEqual(self.pop3.admission.clients("pop3"), {CLIENT: 2, "198.51.100.8": 1})
        for client in (first, second, other):
            await self.in_thread(self.quit, client)

    async def test_penalty_keyed_by_the_client(self):
        """A failed login is the client's failure, not the proxy's."""
        client = await self.in_thread(self.connect, v1("127.0.0.9"))
        await self.in_thread(client.line)
        await self.in_thread(client.ask, b"USER alice")
        answer = await self.in_thread(client.ask, b"PASS wrong")
        self.assertTrue(answer.startswith(b"-ERR"), answer)
        penalties = self.pop3.admission.penalties
        self.assertEqual((penalties.failures("127.0.0.9"), penalties.failures("127.0.0.1")), (1, 0))
        await self.until_logged("Failed login for alice from 127.0.0.9:55555")
        await self.in_thread(self.quit, client)


class TrustedTests(ProxiedTestCase):
    options = {"max-connections-per-ip": 1, "trusted-network": ["198.51.100.0/24"]}

    async def test_trusted_network_applies_to_the_client(self):
        """A client on a trusted network is not counted per client; another one is."""
        trusted = [await self.in_thread(self.connect, v1(port=p)) for p in (1, 2)]
        for client in trusted:
            self.assertTrue((await self.in_thread(client.line)).startswith(b"+OK"))
        first = await self.in_thread(self.connect, v1("203.0.113.5"))
        second = await self.in_thread(self.connect, v1("203.0.113.5", 2))
        self.assertTrue((await self.in_thread(first.line)).startswith(b"+OK"))
        self.assertTrue((await self.in_thread(second.line)).startswith(b"-ERR [SYS/TEMP]"))
        self.assertEqual(self.pop3.admission.clients("pop3"), {"203.0.113.5": 1})
        for client in (*trusted, first):
            await self.in_thread(self.quit, client)


class ReceiverTests(ProxiedTestCase):
    def send_mail(self, header: bytes) -> None:
        client = self.connect(header, "smtp")
        self.assertTrue(client.line().startswith(b"220"))
        client.sock.sendall(b"EHLO client.example\r\n")
        while not client.line().startswith(b"250 "):
            pass
        for command in (b"MAIL FROM:<x@example.com>", b"RCPT TO:<alice@example.org>", b"DATA"):
            self.assertTrue(client.ask(command)[:1] in b"23", command)
        self.assertTrue(client.ask(b"Subject: hi\r\n\r\nbody\r\n.").startswith(b"250"))
        client.ask(b"QUIT")

    async def test_received_line_shows_the_client(self):
        """The Received field names the client from the header, not the proxy."""
        await self.in_thread(self.send_mail, v2())
        [message] = self.stored("alice")
        received = message.split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"from client.example ([198.51.100.7])", received)
        self.assertNotIn(b"127.0.0.1", received)
        # The session's summary line names it too.
        await self.until_logged("SMTP session from [198.51.100.7] ended")

    async def test_bare_local_part_only_from_a_local_client(self):
        """Whether a bare local part is taken depends on the client behind the proxy."""

        def rcpt(header: bytes) -> bytes:
            client = self.connect(header, "smtp")
            client.line()
            client.ask(b"HELO client.example")
            client.ask(b"MAIL FROM:<x@example.com>")
            answer = client.ask(b"RCPT TO:<alice>")
            client.ask(b"QUIT")
            return answer

        self.assertTrue((await self.in_thread(rcpt, v1())).startswith(b"5"))
        self.assertTrue((await self.in_thread(rcpt, v1("127.0.0.1"))).startswith(b"250"))


class FactoryTests(SynchronousTestCase):
    """The wrapper alone, on a fake transport and clock."""

    def setUp(self):
        class Wrapped:
            policy = Policy(hostname="test", trusted_networks=["192.0.2.0/24"])
            built: list = []

            def buildProtocol(self, addr):
                from twisted.internet.protocol import Protocol

                self.built.append(addr)
                return Protocol()

        self.wrapped = Wrapped()
        self.clock = Clock()
        self.factory = ProxyHeaderFactory(self.wrapped, self.clock)

    def connect(self, peer: str):
        wrapper = self.factory.buildProtocol(IPv4Address("TCP", peer, 5000))
        if wrapper is not None:
            transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 5000))
            wrapper.makeConnection(transport)
        return wrapper

    def test_only_local_or_trusted_peers_are_proxies(self):
        """A header is not even read from a peer that is neither local nor trusted."""
        self.assertIsNone(self.connect("203.0.113.9"))
        self.assertIsNotNone(self.connect("127.0.0.1"))
        self.assertIsNotNone(self.connect("192.0.2.44"))

    def test_no_header_in_time(self):
        """A connection that sends no header is cut after HEADER_TIMEOUT, unbuilt."""
        wrapper = self.connect("127.0.0.1")
        self.assertEqual(self.factory.waiting, 1)
        self.clock.advance(HEADER_TIMEOUT)
        self.assertTrue(wrapper.transport.disconnecting)
        wrapper.connectionLost(None)
        self.assertEqual((self.factory.waiting, self.wrapped.built), (0, []))

    def test_waiting_connections_are_bounded(self):
        """Connections waiting for their header count against max_connections, no client's."""
        self.factory.policy = evolve(self.factory.policy, max_connections=2)
        self.assertIsNotNone(self.connect("127.0.0.1"))
        self.assertIsNotNone(self.connect("127.0.0.1"))
        self.assertIsNone(self.connect("127.0.0.1"))

    def test_built_with_the_client_address_once_the_header_is_read(self):
        """buildProtocol of the listener's factory gets the client, after the header."""
        wrapper = self.connect("127.0.0.1")
        wrapper.dataReceived(v1()[:10])
        self.assertEqual(self.wrapped.built, [])
        wrapper.dataReceived(v1()[10:])
        self.assertEqual(self.wrapped.built, [IPv4Address("TCP", CLIENT, 55555)])
        self.assertEqual(self.factory.waiting, 0)

    def test_half_close_under_a_tls_wrapper(self):
        """
        POP3S behind HAProxy: the listener's protocol is a TLS wrapper
        (Twisted's ProtocolWrapper, which copies the transport's interfaces
        and forwards what it lacks, readConnectionLost included, to it).
        The client's EOF closes the connection; it used to recurse until
        RecursionError, a traceback per health check or half-closing client.
        """
        from twisted.internet.protocol import Factory, Protocol
        from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

        wrapping = WrappingFactory(Factory.forProtocol(Protocol))
        self.wrapped.buildProtocol = lambda addr: ProtocolWrapper(wrapping, Protocol())
        wrapper = self.connect("127.0.0.1")
        wrapper.dataReceived(v1())
        wrapper.readConnectionLost()
        self.assertTrue(wrapper.transport.disconnecting)
        wrapper.writeConnectionLost()

    def test_inner_description(self):
        """haproxy: descriptions are recognised, in any case; others are not."""
        self.assertEqual(inner_description("haproxy:tcp:1110"), "tcp:1110")
        self.assertEqual(inner_description("HAProxy:unix:/run/p.sock"), "unix:/run/p.sock")
        self.assertIsNone(inner_description("tcp:1110"))
        self.assertIsNone(inner_description("systemd:domain=INET:index=0"))

    def test_endpoint_replaces_twisteds(self):
        """twistd's endpoint() makes ours for haproxy:, so the header is read first."""
        made = endpoint("pop3", "haproxy:tcp:1110:interface=127.0.0.1", reactor)
        self.assertIsInstance(made, ProxyHeaderEndpoint)


class CleartextWarningTests(SynchronousTestCase):
    """The start-up warning about logins without TLS knows a proxy brings remote clients."""

    def warned(self, endpoint: str) -> bool:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            warn_about_cleartext([endpoint], Session().factory)
        finally:
            globalLogPublisher.removeObserver(events.append)
        return any("cannot log in" in formatEvent(e) for e in events)

    def test_loopback_listener_is_quiet(self) -> None:
        self.assertFalse(self.warned("tcp:110:interface=127.0.0.1"))

    def test_proxied_loopback_listener_warns(self) -> None:
        self.assertTrue(self.warned("haproxy:tcp:110:interface=127.0.0.1"))
