"""Shared test fixtures: a protocol on a StringTransport, sample messages."""

from __future__ import annotations

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from popserv.server.factory import POP3Factory
from popserv.server.policy import Policy
from popserv.stores.memory import MemoryMaildrop, MemoryRealm

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nHello\n.dotted line\n",
    b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n",
    b"Subject: three\n\nno final newline",
]


#: The client of a test session: local, so cleartext logins are allowed.
LOCAL_PEER = IPv4Address("TCP", "127.0.0.1", 4321)
#: A client elsewhere on the network (TEST-NET-1).
REMOTE_PEER = IPv4Address("TCP", "192.0.2.1", 4321)


class Connection:
    """One more client connection to a :class:`Session`'s factory."""

    def __init__(self, factory: POP3Factory, peer: IAddress) -> None:
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        return self.take()

    def close(self) -> None:
        """The client hangs up."""
        self.protocol.connectionLost(None)


class Session:
    """A POP3 protocol over a StringTransport, with a fake clock."""

    def __init__(
        self,
        messages=MESSAGES,
        policy: Policy | None = None,
        peer: IAddress = LOCAL_PEER,
        **users: str,
    ) -> None:
        self.clock = Clock()
        self.maildrop = MemoryMaildrop(messages)
        self.realm = MemoryRealm({"alice": self.maildrop})
        users = users or {"alice": "secret"}
        checker = InMemoryUsernamePasswordDatabaseDontUse(
            **{name: password.encode() for name, password in users.items()}
        )
        self.factory = POP3Factory(
            Portal(self.realm, [checker]),
            policy or Policy(hostname="pop.example.org"),
            clock=self.clock,
        )
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = self.factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """
        Let ``seconds`` pass on the fake clock in small steps, so that a wait
        which starts another (a failed login's penalty, then the rest of its
        delay) runs through too.
        """
        self.clock.pump([step] * round(seconds / step))

    def connect(self, peer: IAddress = LOCAL_PEER) -> Connection:
        """Another client of the same server."""
        return Connection(self.factory, peer)

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        """Feed ``data``; return everything the server wrote in response."""
        self.protocol.dataReceived(data)
        return self.take()

    def lines(self, data: bytes) -> list[bytes]:
        return self.send(data).split(b"\r\n")[:-1]

    def login(self) -> bytes:
        self.send(b"USER alice\r\n")
        return self.send(b"PASS secret\r\n")
