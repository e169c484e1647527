"""
popserv behind a real HAProxy (Debian's ``haproxy``), run with the tested
config in ``contrib/haproxy/haproxy.cfg``: its ``send-proxy-v2`` header
gives popserv the client's own address and port.
"""

from __future__ import annotations

import poplib
import re
import shutil
import socket
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from popserv.server.configure import endpoint
from tests.support.peers import missing
from tests.support.processes import REPO, free_port
from tests.support.receiver import ReceiverTestCase

CONFIG = REPO / "contrib" / "haproxy" / "haproxy.cfg"


class _HAProxy(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


def configured(text: str, ports: dict[str, int]) -> str:
    """contrib's config with its ports (110, 1110 ...) replaced, all on loopback."""
    return re.sub(
        r"(?m)^(\s*(?:bind|server popserv)\s+)(?:127\.0\.0\.1)?:(\d+)",
        lambda m: f"{m.group(1)}127.0.0.1:{ports[m.group(2)]}",
        text,
    )


class HAProxyTests(ReceiverTestCase):
    def setUp(self):
        if shutil.which("haproxy") is None:
            raise missing("haproxy is not installed (Debian: apt-get install haproxy)")
        super().setUp()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        return Deferred.fromCoroutine(self._start())

    async def _start(self):
        listening = {}
        for name, factory in (("pop3", self.pop3), ("smtp", self.smtp)):
            made = endpoint(name, "haproxy:tcp:0:interface=127.0.0.1", reactor)
            port = await made.listen(factory)
            self.addCleanup(port.stopListening)
            listening[name] = port.getHost().port
        # Distinct: free_port() may hand out a port it just gave.
        chosen: set[int] = set(listening.values())
        while len(chosen) < len(listening) + 6:
            chosen.add(free_port())
        spare = sorted(chosen - set(listening.values()))
        self.front = dict(zip(("110", "995", "25", "24"), spare[:4], strict=True))
        ports = {
            **self.front,
            "1110": listening["pop3"],
            "1025": listening["smtp"],
            "1995": spare[4],
            "1024": spare[5],
        }
        config = Path(self.mktemp())
        config.write_text(configured(CONFIG.read_text(), ports))
        self.haproxy = _HAProxy()
        process = reactor.spawnProcess(
            self.haproxy, shutil.which("haproxy"), ["haproxy", "-f", str(config), "-db"], env={}
        )
        self.addCleanup(self._stop, process)
        waiting = list(self.front.values())
        for _ in range(500):
            try:
                # Every front port: a test uses any of them first.
                while waiting:
                    socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
                    waiting.pop(0)
                return
            except OSError:
                if self.haproxy.ended.called:
                    break
                await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"haproxy did not start: {self.haproxy.output.decode(errors='replace')}")

    def _stop(self, process):
        if not self.haproxy.ended.called:
            process.signalProcess("TERM")
        return self.haproxy.ended

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def test_config_ports_are_all_replaced(self):
        """Every port of the contrib config is one the test chose (none is 110 or 25)."""
        text = configured(
            CONFIG.read_text(),
            {p: 1 for p in ("110", "995", "25", "24", "1110", "1995", "1025", "1024")},
        )
        self.assertEqual(re.findall(r"(?m)^\s*(?:bind|server)\b.*?:(\d+)", text), ["1"] * 8)

    async def test_poplib_through_haproxy_is_logged_with_its_own_port(self):
        """
        popserv logs the port poplib's socket has, not the one HAProxy
        connects from: the address came from the PROXY v2 header.
        """

        def session() -> int:
            client = poplib.POP3("127.0.0.1", self.front["110"], timeout=10)
            try:
                client.user("alice")
                client.pass_("alice pw")
                return client.sock.getsockname()[1]
            finally:
                client.quit()

        port = await self.in_thread(session)
        for _ in range(200):
            if f"alice logged in from 127.0.0.1:{port}" in self.logged():
                break
            await deferLater(reactor, 0.01, lambda: None)
        else:
            self.fail(f"no login from 127.0.0.1:{port} in:\n{self.logged()}")
        ports = {int(p) for p in re.findall(r"logged in from 127\.0\.0\.1:(\d+)", self.logged())}
        self.assertEqual(ports, {port})

    async def test_smtp_through_haproxy(self):
        """Mail sent through HAProxy is delivered, its Received field naming the client."""
        await self.in_thread(
            self.smtplib_send_to, self.front["25"], "x@example.com", ["alice@example.org"]
        )
        [message] = self.stored("alice")
        self.assertIn(b"([127.0.0.1])", message.split(b"\r\n\r\n", 1)[0])

    def smtplib_send_to(self, port: int, sender: str, recipients: list[str]) -> None:
        import smtplib

        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail(sender, recipients, b"Subject: via haproxy\r\n\r\nbody\r\n")
