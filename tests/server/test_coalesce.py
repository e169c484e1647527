"""
Tests for popserv.server.coalesce: answers held while a session works and sent in
one system call, straight to the socket when nothing is queued.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.server.coalesce import FLUSH_AT, Coalescer, write_now
from tests.support import Session


class WritesTransport(StringTransport):
    """A StringTransport that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class CoalescerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.transport = WritesTransport()
        self.output = Coalescer()

    def test_not_held(self) -> None:
        """Outside a batch every write goes out at once."""
        self.output.write(self.transport, b"+OK a\r\n")
        self.output.write(self.transport, b"+OK b\r\n")
        self.assertEqual(self.transport.writes, [b"+OK a\r\n", b"+OK b\r\n"])

    def test_held_then_one_write(self) -> None:
        """A batch's writes are joined, in order, and written when it ends."""
        self.output.hold()
        self.output.write(self.transport, b"+OK a\r\n")
        self.output.hold()
        self.output.write(self.transport, b"+OK b\r\n")
        self.output.release(self.transport)
        self.assertEqual(self.transport.writes, [])
        self.output.write(self.transport, b"+OK c\r\n")
        self.output.release(self.transport)
        self.assertEqual(self.transport.writes, [b"+OK a\r\n+OK b\r\n+OK c\r\n"])

    def test_large_batch_flushed_early(self) -> None:
        """Held octets reaching FLUSH_AT go out, so flow control sees them."""
        self.output.hold()
        chunk = b"x" * (FLUSH_AT // 2)
        self.output.write(self.transport, chunk)
        self.assertEqual(self.transport.writes, [])
        self.output.write(self.transport, chunk)
        self.assertEqual(self.transport.writes, [chunk + chunk])
        self.output.write(self.transport, b"end")
        self.output.release(self.transport)
        self.assertEqual(self.transport.writes, [chunk + chunk, b"end"])

    def test_flush(self) -> None:
        """flush() sends what is held now (before a close or STLS)."""
        self.output.hold()
        self.output.write(self.transport, b"+OK Bye\r\n")
        self.output.flush(self.transport)
        self.assertEqual(self.transport.value(), b"+OK Bye\r\n")
        self.output.release(self.transport)
        self.assertEqual(self.transport.writes, [b"+OK Bye\r\n"])


class _Server(Protocol):
    def connectionMade(self) -> None:
        self.factory.made.callback(self)  # type: ignore[attr-defined]


class _Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.waiting: tuple[int, Deferred[bytes]] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.waiting is not None and len(self.received) >= self.waiting[0]:
            _, done = self.waiting
            self.waiting = None
            done.callback(self.received)

    def until(self, size: int) -> Deferred[bytes]:
        done: Deferred[bytes] = Deferred()
        self.waiting = (size, done)
        self.dataReceived(b"")
        return done


class WriteNowTests(TestCase):
    """write_now over a real loopback TCP connection."""

    async def connect(self) -> tuple[Protocol, _Client]:
        server_factory = Factory.forProtocol(_Server)
        server_factory.made = Deferred()  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Client()
        client_factory = ClientFactory.forProtocol(lambda: client)
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)
        self.addCleanup(connector.disconnect)
        server = await server_factory.made  # type: ignore[attr-defined]
        self.addCleanup(server.transport.loseConnection)
        return server, client

    async def test_sent_at_once(self) -> None:
        """With nothing queued the data is in the socket on return: Twisted holds none."""
        server, client = await self.connect()
        write_now(server.transport, b"+OK hello\r\n")
        self.assertEqual(server.transport.dataBuffer, b"")
        self.assertEqual(server.transport._tempDataLen, 0)
        self.assertEqual(await client.until(11), b"+OK hello\r\n")

    async def test_queued_behind(self) -> None:
        """Data queued by Twisted keeps its place: later data waits behind it."""
        server, client = await self.connect()
        server.transport.write(b"first ")
        write_now(server.transport, b"second")
        self.assertEqual(await client.until(12), b"first second")

    async def test_more_than_the_socket_takes(self) -> None:
        """What the socket does not take is queued by Twisted and arrives in order."""
        server, client = await self.connect()
        data = bytes(range(256)) * (64 * 1024)  # 16 MiB, beyond any socket buffer
        write_now(server.transport, data)
        self.assertGreater(len(server.transport.dataBuffer) + server.transport._tempDataLen, 0)
        self.assertEqual(await client.until(len(data)), data)


class SessionTests(SynchronousTestCase):
    def test_pipelined_answers_in_one_write(self) -> None:
        """The answers to one read of pipelined commands leave in one write, in order."""
        session = Session()
        session.login()
        writes: list[bytes] = []
        real = session.transport.write
        self.patch(session.transport, "write", lambda data: (writes.append(data), real(data)))
        lines = session.send(b"STAT\r\nNOOP\r\nRETR 2\r\nUIDL 1\r\n").split(b"\r\n")
        self.assertEqual(len(writes), 1)
        self.assertTrue(lines[0].startswith(b"+OK 3 "), lines[0])
        self.assertEqual(lines[1][:3], b"+OK")
        self.assertEqual(lines[-2][:6], b"+OK 1 ")

    def test_quit_answer_sent_before_close(self) -> None:
        """QUIT's answer, held with others, is written before the connection closes."""
        session = Session()
        session.login()
        answer = session.send(b"NOOP\r\nQUIT\r\n")
        self.assertEqual(answer.count(b"+OK"), 2)
        self.assertTrue(session.transport.disconnecting)
