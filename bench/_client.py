"""
The load client: asyncio POP3 (and SMTP/LMTP) sessions, checked as they go.

Every multi-line response is read to its terminating line and counted (see
:class:`bench._wire.BodyReader`); every RETR must deliver exactly the octets
LIST promised, and UIDL must list as many messages as STAT.  A server that
desyncs raises :class:`~bench._wire.DesyncError`, which the workloads count
and print: a fast wrong answer is not a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence

from bench._wire import Body, BodyReader, DesyncError, check_retr, parse_sizes

CRLF = b"\r\n"


class ServerError(Exception):
    """A server answered ``-ERR`` (or an SMTP error) where success was due."""


class Connection(asyncio.Protocol):
    """One client connection: send a line, await a status line or a multi-line body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._waiter: asyncio.Future[object] | None = None
        self._reader: BodyReader | None = None
        self._closed: Exception | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(cls, host, port)
        return connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = exc or ConnectionResetError("server closed the connection")
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._closed)

    def data_received(self, data: bytes) -> None:
        if self._reader is not None and not self._buffer:
            self._feed_body(data)
        else:
            self._buffer += data
            self._advance()

    def _advance(self) -> None:
        if self._waiter is None:
            return
        if self._reader is not None:
            data, self._buffer = self._buffer, b""
            if data:
                self._feed_body(data)
            return
        end = self._buffer.find(CRLF)
        if end >= 0:
            line = self._buffer[:end]
            self._buffer = self._buffer[end + 2 :]
            self._resolve(line)

    def _feed_body(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        rest = reader.feed(data)
        if rest is None:
            return
        self._reader = None
        self._buffer = rest
        try:
            body: object = reader.result()
        except DesyncError as e:
            self._fail(e)
            return
        self._resolve(body)

    def _resolve(self, value: object) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _wait(self) -> asyncio.Future[object]:
        if self._closed is not None and not self._buffer:
            raise self._closed
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._advance()
        if self._closed is not None and not waiter.done():
            self._fail(self._closed)
        return waiter

    async def line(self) -> bytes:
        """The next line, without its CRLF."""
        result = await self._wait()
        assert isinstance(result, bytes)
        return result

    async def body(self, keep: bool = False, lines: bool = True) -> Body:
        """The next multi-line body, counted (and kept if asked)."""
        self._reader = BodyReader(keep, lines)
        result = await self._wait()
        assert isinstance(result, Body)
        return result

    def send(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line + CRLF)

    async def ok(self, line: bytes) -> bytes:
        """Send a command; return its ``+OK`` line or raise :class:`ServerError`."""
        self.send(line)
        status = await self.line()
        if not status.startswith(b"+OK"):
            raise ServerError(f"{line.split()[0].decode()}: {status[:80]!r}")
        return status

    async def multiline(self, line: bytes, keep: bool = False, lines: bool = True) -> Body:
        """Send a command with a multi-line answer; return the counted body."""
        await self.ok(line)
        return await self.body(keep, lines)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def login(host: str, port: int, user: str, password: str) -> Connection:
    """Connect, read the greeting, and log in with USER/PASS."""
    connection = await Connection.open(host, port)
    try:
        greeting = await connection.line()
        if not greeting.startswith(b"+OK"):
            raise ServerError(f"greeting: {greeting[:80]!r}")
        await connection.ok(b"USER " + user.encode())
        await connection.ok(b"PASS " + password.encode())
    except BaseException:
        connection.abort()
        raise
    return connection


async def quit_(connection: Connection) -> None:
    """QUIT, expecting ``+OK``, then close."""
    try:
        await connection.ok(b"QUIT")
    finally:
        connection.close()


def _stat_count(status: bytes) -> tuple[int, int]:
    fields = status.split()
    return int(fields[1]), int(fields[2])


async def mail_session(
    host: str,
    port: int,
    user: str,
    password: str,
    retrieve: int = 10,
    delete: bool = False,
) -> int:
    """
    B1 (and B5): log in, STAT, LIST, UIDL, RETR up to ``retrieve`` messages
    checking each against LIST, optionally DELE them, QUIT.  Returns the
    octets retrieved.
    """
    connection = await login(host, port, user, password)
    try:
        count, octets = _stat_count(await connection.ok(b"STAT"))
        listing = await connection.multiline(b"LIST", keep=True)
        assert listing.data is not None
        sizes = parse_sizes(listing.data)
        if len(sizes) != count or sum(sizes.values()) != octets:
            raise DesyncError(f"LIST has {len(sizes)} messages, STAT said {count}")
        uidl = await connection.multiline(b"UIDL")
        if uidl.lines != count:
            raise DesyncError(f"UIDL has {uidl.lines} lines, STAT said {count}")
        received = 0
        numbers = sorted(sizes)[:retrieve]
        for number in numbers:
            body = await connection.multiline(b"RETR %d" % number, lines=False)
            check_retr(number, sizes[number], body)
            received += body.octets
        if delete:
            for number in numbers:
                await connection.ok(b"DELE %d" % number)
        await connection.ok(b"QUIT")
    finally:
        connection.close()
    return received


async def big_login(host: str, port: int, user: str, password: str) -> int:
    """B3: log in, STAT, UIDL (every line counted), QUIT; returns the message count."""
    connection = await login(host, port, user, password)
    try:
        count, _ = _stat_count(await connection.ok(b"STAT"))
        uidl = await connection.multiline(b"UIDL")
        if uidl.lines != count:
            raise DesyncError(f"UIDL has {uidl.lines} lines, STAT said {count}")
        await connection.ok(b"QUIT")
    finally:
        connection.close()
    return count


async def retrieve_all(
    host: str, port: int, user: str, password: str
) -> tuple[list[int], list[float]]:
    """B2: one session, RETR of every message; returns (octets, seconds) per RETR."""
    loop = asyncio.get_running_loop()
    connection = await login(host, port, user, password)
    octets: list[int] = []
    seconds: list[float] = []
    try:
        listing = await connection.multiline(b"LIST", keep=True)
        assert listing.data is not None
        sizes = parse_sizes(listing.data)
        for number in sorted(sizes):
            start = loop.time()
            body = await connection.multiline(b"RETR %d" % number, lines=False)
            seconds.append(loop.time() - start)
            check_retr(number, sizes[number], body)
            octets.append(body.octets)
        await connection.ok(b"QUIT")
    finally:
        connection.close()
    return octets, seconds


# Delivery (B5)


class MailSender:
    """A persistent SMTP or LMTP connection delivering one message per transaction."""

    def __init__(self, connection: Connection, lmtp: bool) -> None:
        self.connection = connection
        self.lmtp = lmtp

    @classmethod
    async def open(cls, host: str, port: int, lmtp: bool) -> MailSender:
        connection = await Connection.open(host, port)
        sender = cls(connection, lmtp)
        await sender._reply(b"220")
        connection.send((b"LHLO" if lmtp else b"EHLO") + b" bench.example.net")
        await sender._reply(b"250")
        return sender

    async def _reply(self, code: bytes) -> bytes:
        while True:
            line = await self.connection.line()
            if line[3:4] != b"-":
                break
        if not line.startswith(code):
            raise ServerError(f"expected {code.decode()}: {line[:80]!r}")
        return line

    async def deliver(self, recipient: str, message: bytes) -> None:
        """One transaction: MAIL, RCPT, DATA (dot-stuffed, CRLF), the reply."""
        c = self.connection
        c.send(b"MAIL FROM:<sender@example.net>")
        await self._reply(b"250")
        c.send(b"RCPT TO:<" + recipient.encode() + b">")
        await self._reply(b"250")
        c.send(b"DATA")
        await self._reply(b"354")
        assert c.transport is not None
        data = message.replace(CRLF, b"\n").replace(b"\n", CRLF)
        if data.startswith(b"."):
            data = b"." + data
        c.transport.write(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        await self._reply(b"250")

    async def close(self) -> None:
        self.connection.send(b"QUIT")
        with contextlib.suppress(ServerError, ConnectionError):
            await self._reply(b"221")
        self.connection.close()


def pick(rng: random.Random, users: Sequence[str]) -> str:
    return users[rng.randrange(len(users))]
