"""
Hostile clients against the real server over loopback TCP: malformed and
oversized input, floods of connections, slow-drip clients and stalled TLS
handshakes.  Each gets a bounded, defined answer (a fixed -ERR, or a close)
and the server stays healthy for the next client.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import threading
import tracemalloc

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from popserv.core import errors, wire
from popserv.server.protocol import POP3Protocol
from tests.support.servers import RawClient, ServerTestCase, crlf
from tests.support.tls import TLSTestCase

REFUSED = wire.err(errors.TooManyConnections())
AUTH_FAILED = wire.err(errors.AuthFailed())
TOO_LONG = wire.err(errors.LineTooLong())
UNKNOWN = wire.err(errors.UnknownCommand())


class _HealthyServerMixin:
    """After each hostile client: a normal login and RETR still work."""

    async def assert_healthy(self):
        def fetch():
            c = self.pop()
            c.user("alice")
            c.pass_("secret")
            lines = c.retr(1)[1]
            c.quit()
            return lines

        lines = await self.run_in_thread(fetch)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", crlf(self.messages[0]))

    def exchange(self, data: bytes, answers: int) -> list[bytes]:
        """Send ``data`` on a new connection; return the next ``answers`` lines, then QUIT."""
        c = RawClient(self.portno)
        try:
            c.send(data)
            lines = [c.line() for _ in range(answers)]
            c.send(b"QUIT\r\n")
            c.line()
            return lines
        finally:
            c.close()


class HostileInputTests(_HealthyServerMixin, ServerTestCase):
    options = {"auth-failure-max-delay": 0.4}

    def setUp(self):
        super().setUp()
        self.failures: list = []
        globalLogPublisher.addObserver(self._watch)
        self.addCleanup(globalLogPublisher.removeObserver, self._watch)

    def _watch(self, event):
        if event.get("log_failure") is not None or "Traceback" in str(event.get("log_format")):
            self.failures.append(event)

    async def tearDown(self):
        await super().tearDown()
        self.assertEqual(self.failures, [])

    async def test_nul_bytes(self):
        lines = await self.run_in_thread(
            self.exchange, b"US\x00ER alice\r\n\x00\x00\x00\r\nUSER al\x00ice\r\nPASS secret\r\n", 4
        )
        self.assertEqual(lines, [UNKNOWN, UNKNOWN, b"+OK Send PASS\r\n", AUTH_FAILED])
        await self.assert_healthy()

    async def test_not_utf8(self):
        lines = await self.run_in_thread(
            self.exchange, b"\xff\xfe\r\nCAPA\xc3\r\nUSER \xff\xc3(\r\nPASS \xfe\r\n", 4
        )
        self.assertEqual(lines, [UNKNOWN, UNKNOWN, b"+OK Send PASS\r\n", AUTH_FAILED])
        await self.assert_healthy()

    async def test_one_megabyte_line_is_discarded_not_buffered(self):
        """-ERR Line too long, then the session goes on; the server never holds the line."""
        biggest = []
        feed = wire.LineSplitter.feed

        def watched(splitter, *args, **kwargs):
            lines = feed(splitter, *args, **kwargs)
            biggest.append(splitter.buffered)
            return lines

        self.patch(wire.LineSplitter, "feed", watched)
        line = b"NOOP " + b"x" * (1 << 20) + b"\r\nCAPA\r\n"
        tracemalloc.start()
        try:
            answers = await self.run_in_thread(self.exchange, line, 2)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(answers, [TOO_LONG, b"+OK Capability list follows\r\n"])
        self.assertLessEqual(max(biggest), self.factory.policy.max_line_length)
        # A buffered line would be a megabyte at least (twice that, joined).
        self.assertLess(peak, 1 << 20)
        await self.assert_healthy()

    async def test_one_megabyte_of_base64(self):
        """AUTH with 1 MB of base64, as the initial response and as an answer: refused, bounded."""
        blob = base64.b64encode(b"\0alice\0" + b"p" * 786_000)
        answers = await self.run_in_thread(
            self.exchange, b"AUTH PLAIN " + blob + b"\r\nAUTH PLAIN\r\n" + blob + b"\r\nNOOP\r\n", 4
        )
        self.assertEqual(answers, [TOO_LONG, b"+ \r\n", TOO_LONG,
                                   wire.err(errors.BadState())])
        await self.assert_healthy()

    async def test_carriage_returns_alone(self):
        """A lone CR ends nothing: CR-only 'lines' run together into one over-long line."""
        answers = await self.run_in_thread(
            self.exchange, b"NOOP\rNOOP\r" * 100 + b"\r\nCAPA\r\r\nUSER a\rPASS b\r\n", 3
        )
        self.assertEqual(answers, [TOO_LONG, UNKNOWN, b"+OK Send PASS\r\n"])
        await self.assert_healthy()

    async def test_ten_thousand_pipelined_commands(self):
        """Answered in order, all of them, while reading is paced by the bounded queue."""
        commands = b"NOOP\r\n" * 10_000 + b"STAT\r\n"

        def session():
            c = RawClient(self.portno)
            c.send(b"USER alice\r\nPASS secret\r\n")
            c.line(), c.line()
            sender = threading.Thread(target=c.send, args=(commands,))
            sender.start()
            answers = [c.line() for _ in range(10_001)]
            sender.join()
            c.send(b"QUIT\r\n")
            c.line()
            c.close()
            return answers

        answers = await self.run_in_thread(session)
        self.assertEqual(answers[:10_000], [b"+OK\r\n"] * 10_000)
        self.assertTrue(answers[10_000].startswith(b"+OK 4 "))
        await self.assert_healthy()

    async def test_ten_thousand_pipelined_before_login(self):
        """
        Unknown commands pipelined before login: the first nine refused, the
        tenth answered with the last -ERR, then the connection closes, and
        nothing behind them (QUIT, a login) runs.
        """
        commands = b"XYZ\r\n" * 10_000 + b"QUIT\r\nUSER alice\r\n"

        def send(c: RawClient) -> None:
            with contextlib.suppress(OSError):  # the server closes while we send
                c.send(commands)

        def session():
            c = RawClient(self.portno)
            sender = threading.Thread(target=send, args=(c,))
            sender.start()
            answers = []
            with contextlib.suppress(EOFError, ConnectionResetError):
                while True:
                    answers.append(c.line())
            sender.join()
            c.close()
            return answers

        answers = await self.run_in_thread(session)
        self.assertEqual(answers, [UNKNOWN] * 9 + [wire.err(errors.TooManyBadCommands())])
        await self.assert_healthy()

    async def test_bad_commands_then_good_ones(self):
        """Nine bad lines, a good one, nine bad again: the session is still served."""

        def session():
            c = RawClient(self.portno)
            c.send(b"XYZ\r\n" * 9 + b"CAPA\r\n" + b"XYZ\r\n" * 9
                   + b"USER alice\r\nPASS secret\r\nSTAT\r\nQUIT\r\n")
            answers = [c.line() for _ in range(9)]
            c.line(), c.multi()
            answers += [c.line() for _ in range(13)]
            return answers, c.closed()

        answers, closed = await self.run_in_thread(session)
        self.assertEqual(answers[:18], [UNKNOWN] * 18)
        self.assertTrue(answers[20].startswith(b"+OK 4 "), answers[18:])
        self.assertTrue(closed)
        await self.assert_healthy()

    async def test_path_traversal_user_names(self):
        """Names with ../ on every login path: [AUTH], and nothing outside the data dir."""
        before = sorted(p.name for p in self.layout.data_dir.iterdir())
        plain = base64.b64encode(b"\0../../etc/passwd\0x")
        authzid = base64.b64encode(b"../bob\0alice\0secret")
        answers = await self.run_in_thread(
            self.exchange, b"USER ../../etc/passwd\r\nPASS x\r\nUSER ..\r\nPASS x\r\n", 4
        )
        answers += await self.run_in_thread(
            self.exchange, b"AUTH PLAIN " + plain + b"\r\nAUTH PLAIN " + authzid + b"\r\n", 2
        )
        self.assertEqual(answers, [b"+OK Send PASS\r\n", AUTH_FAILED, b"+OK Send PASS\r\n",
                                   AUTH_FAILED, AUTH_FAILED, AUTH_FAILED])
        self.assertEqual(sorted(p.name for p in self.layout.data_dir.iterdir()), before)
        self.assertEqual(sorted(p.name for p in (self.layout.data_dir / "mail").iterdir()),
                         ["alice", "bob"])
        await self.assert_healthy()


class FloodTests(_HealthyServerMixin, ServerTestCase):
    """Loopback is an ordinary client: the per-IP limit applies to it."""

    options = {"max-connections-per-ip": 3}

    async def wait_for_sessions(self, count: int):
        for _ in range(500):
            if len(self.factory.sessions) == count:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{len(self.factory.sessions)} sessions, not {count}")

    async def test_over_the_per_ip_limit(self):
        clients = [await self.run_in_thread(RawClient, self.portno) for _ in range(3)]
        self.assertTrue(all(c.greeting.startswith(b"+OK") for c in clients))

        def refused():
            c = RawClient(self.portno)
            return c.greeting, c.closed()

        self.assertEqual(await self.run_in_thread(refused), (REFUSED, True))
        self.assertEqual(len(self.factory.sessions), 3)
        clients.pop().close()
        await self.wait_for_sessions(2)
        await self.assert_healthy()
        for c in clients:
            c.close()

    async def test_a_burst_of_connections(self):
        """200 connections at once: three served, the rest refused at once, none hang."""
        def burst():
            socks = [socket.create_connection(("127.0.0.1", self.portno), timeout=10)
                     for _ in range(200)]
            greetings = []
            for s in socks:
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    data += chunk
                greetings.append(data)
            for s in socks:
                s.close()
            return greetings

        greetings = await self.run_in_thread(burst)
        self.assertEqual(sum(g.startswith(b"+OK") for g in greetings), 3)
        self.assertEqual(greetings.count(REFUSED), 197)
        await self.wait_for_sessions(0)
        await self.assert_healthy()


class TotalLimitTests(_HealthyServerMixin, ServerTestCase):
    options = {"max-connections": 1}

    async def test_over_the_total(self):
        holder = await self.run_in_thread(RawClient, self.portno)

        def refused():
            c = RawClient(self.portno)
            return c.greeting, c.closed()

        self.assertEqual(await self.run_in_thread(refused), (REFUSED, True))
        holder.close()
        for _ in range(500):
            if not self.factory.sessions:
                break
            await deferLater(reactor, 0.01, lambda: None)
        await self.assert_healthy()


class SlowClientTests(_HealthyServerMixin, ServerTestCase):
    # Long enough for an argon2id login on a loaded machine (assert_healthy).
    options = {"login-timeout": 2.0}

    def drip_until_closed(self, first: bytes, drip: bytes) -> int:
        """Send ``first``, then ``drip`` each time 0.1 s pass without news; return the drips."""
        sock = socket.create_connection(("127.0.0.1", self.portno), timeout=10)
        try:
            sock.sendall(first)
            sock.settimeout(0.1)
            for drips in range(100):
                try:
                    if not sock.recv(4096):
                        return drips
                except TimeoutError:
                    sock.sendall(drip)
                except ConnectionResetError:
                    return drips
            self.fail("the server never closed the connection")
        finally:
            sock.close()

    async def test_slowloris_is_cut_by_the_login_deadline(self):
        """A byte at a time, never a whole line: closed at the deadline."""
        drips = await self.run_in_thread(self.drip_until_closed, b"USER", b"x")
        self.assertGreater(drips, 1)
        await self.assert_healthy()

    async def test_endless_commands_without_login_are_cut_too(self):
        """Whole commands keep the idle timer young, not the login deadline."""
        drips = await self.run_in_thread(self.drip_until_closed, b"NOOP\r\n", b"CAPA\r\n")
        self.assertGreater(drips, 1)


class SlowTLSTests(_HealthyServerMixin, TLSTestCase):
    extra_options = {"login-timeout": 2.0}

    def wait_closed(self, port: int, send: bytes) -> bytes:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(send)
            data = b""
            while True:
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    return data
                if not chunk:
                    return data
                data += chunk
        finally:
            sock.close()

    async def test_stalled_handshake_on_pop3s(self):
        """Half a ClientHello, then silence: closed at the login deadline."""
        data = await self.run_in_thread(self.wait_closed, self.tls_portno, b"\x16\x03\x01\x02\x00")
        self.assertEqual(data, b"")
        await self.assert_healthy()

    async def test_stalled_handshake_after_stls(self):
        data = await self.run_in_thread(self.wait_closed, self.portno, b"STLS\r\n\x16\x03\x01")
        self.assertTrue(data.startswith(b"+OK POP3 server ready"))
        self.assertTrue(data.endswith(b"+OK Begin TLS negotiation\r\n"))


class TLSFloodTests(_HealthyServerMixin, TLSTestCase):
    extra_options = {"max-connections": 1}

    async def test_pop3s_refused_before_the_handshake(self):
        """Over the limit on implicit TLS: the connection closes at once, no handshake, no hang."""
        holder = await self.run_in_thread(RawClient, self.portno)

        def handshake():
            try:
                s = self.tls_socket(self.tls_portno)
            except (ssl.SSLError, OSError) as e:
                return e
            s.close()
            return None

        error = await self.run_in_thread(handshake)
        self.assertIsNotNone(error)
        self.assertNotIsInstance(error, TimeoutError)
        self.assertEqual([type(s) for s in self.factory.sessions], [POP3Protocol])
        holder.close()
        for _ in range(500):
            if not self.factory.sessions:
                break
            await deferLater(reactor, 0.01, lambda: None)
        await self.assert_healthy()
