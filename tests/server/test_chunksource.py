"""
RETR and TOP from a store whose reads do not block (IChunkSource, as a
database's would be): each chunk a Deferred fired on a later turn of the
reactor, over loopback with poplib, the bytes compared with those of the
same messages read from a file-like store.
"""

from __future__ import annotations

import io
import poplib

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from popserv.core.errors import TemporaryFailure
from popserv.interfaces import IChunkSource, IMailbox, Listing
from popserv.server.factory import POP3Factory
from popserv.server.policy import Policy
from popserv.stores.memory import MemoryMailbox, MemoryMaildrop, MemoryRealm
from tests.support import MESSAGES

#: A message over many chunks (the server reads 64 KiB at a time), lines
#: starting with dots and bare LFs included.
BIG = b"Subject: big\n\n" + b"".join(
    b".line %d with a dot first\n" % i if i % 7 == 0 else b"line %d\r\n" % i
    for i in range(60_000)
)


@implementer(IChunkSource)
class _Chunks:
    """A message read a chunk at a time, each on a later turn of the reactor."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self._data = io.BytesIO(data)
        self._fail_at = fail_at
        self.reads = 0
        self.in_flight = 0
        self.closed = False

    def read(self, size: int) -> Deferred[bytes]:
        assert self.in_flight == 0, "a read while another is in flight"
        self.in_flight += 1
        self.reads += 1

        def done() -> bytes:
            self.in_flight -= 1
            if self._fail_at is not None and self.reads >= self._fail_at:
                raise TemporaryFailure("the database went away")
            return self._data.read(size)

        return deferLater(reactor, 0, done)

    def close(self) -> None:
        self.closed = True


class _ChunkMailbox(MemoryMailbox):
    opened: list[_Chunks]
    fail_at: int | None = None
    #: Sizes listed, when a test wants them wrong.
    sizes: list[int] | None = None

    def listing(self) -> Listing:
        listing = super().listing()
        if self.sizes is not None:
            return Listing(uids=listing.uids, sizes=self.sizes)
        return listing

    def open_message(self, index: int) -> _Chunks:  # type: ignore[override]
        chunks = _Chunks(self._snapshot[index][1], self.fail_at)
        self.opened.append(chunks)
        return chunks


class _ChunkRealm(MemoryRealm):
    def __init__(self, maildrops: dict[str, MemoryMaildrop], mailbox: type[_ChunkMailbox]) -> None:
        super().__init__(maildrops)
        self.mailbox = mailbox

    def requestAvatar(self, avatarId, mind, *interfaces):
        maildrop = self.maildrops[avatarId.decode() if isinstance(avatarId, bytes) else avatarId]
        mailbox = self.mailbox(maildrop)
        return IMailbox, mailbox, mailbox.close


class ChunkSourceTests(TestCase):
    def serve(self, mailbox: type[_ChunkMailbox] | None) -> int:
        """A server of alice's messages: from ``mailbox``, or (None) the file-like memory store."""
        maildrops = {"alice": MemoryMaildrop([*MESSAGES, BIG])}
        realm = MemoryRealm(maildrops) if mailbox is None else _ChunkRealm(maildrops, mailbox)
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        factory = POP3Factory(Portal(realm, [checker]), Policy(hostname="pop.test"))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def retrieve_all(self, port: int) -> list[tuple[bytes, list[bytes]]]:
        client = poplib.POP3("127.0.0.1", port, timeout=30)
        try:
            client.user("alice")
            client.pass_("secret")
            count = client.stat()[0]
            got = [client.retr(i)[:2] for i in range(1, count + 1)]
            got += [client.top(i, 2)[:2] for i in range(1, count + 1)]
            client.quit()
            return got
        finally:
            client.close()

    async def test_same_bytes_as_a_file_store(self) -> None:
        class Mailbox(_ChunkMailbox):
            opened: list[_Chunks] = []

        expected = await deferToThread(self.retrieve_all, self.serve(None))
        got = await deferToThread(self.retrieve_all, self.serve(Mailbox))
        self.assertEqual(got, expected)
        big = [c for c in Mailbox.opened if c.reads > 10]
        self.assertTrue(big, "the big message was read in many chunks")
        self.assertTrue(all(c.closed for c in Mailbox.opened))

    async def test_short_listed_size_refused_before_the_ok(self) -> None:
        """A short message whose size is not the listed one: -ERR, and the session goes on."""
        class Mailbox(_ChunkMailbox):
            opened: list[_Chunks] = []
            sizes = [1, 1, 1, 1]

        port = self.serve(Mailbox)

        def retr() -> tuple[bytes, int]:
            client = poplib.POP3("127.0.0.1", port, timeout=30)
            try:
                client.user("alice")
                client.pass_("secret")
                try:
                    client.retr(1)
                    answer = b"+OK"
                except poplib.error_proto as e:
                    answer = e.args[0]
                count = client.stat()[0]
                client.quit()
                return answer, count
            finally:
                client.close()

        answer, count = await deferToThread(retr)
        self.assertTrue(answer.startswith(b"-ERR [SYS/TEMP]"), answer)
        self.assertEqual(count, 4)
        self.flushLoggedErrors()

    async def test_failed_read_mid_stream_cuts(self) -> None:
        """A read failing after the +OK (the database gone): the connection is cut, no '.'."""
        class Mailbox(_ChunkMailbox):
            opened: list[_Chunks] = []
            fail_at = 5

        port = self.serve(Mailbox)

        def retr_big() -> bytes:
            client = poplib.POP3("127.0.0.1", port, timeout=30)
            client.user("alice")
            client.pass_("secret")
            client._putcmd("RETR 4")
            received = b""
            while True:
                try:
                    data = client.sock.recv(65536)
                except ConnectionResetError:  # cut with a reset: what was read is all
                    break
                if not data:
                    break
                received += data
            client.close()
            return received

        received = await deferToThread(retr_big)
        self.assertTrue(received.startswith(b"+OK"), received[:80])
        self.assertFalse(received.endswith(b"\r\n.\r\n"))
        self.assertEqual(len(self.flushLoggedErrors(TemporaryFailure)), 1)
