"""
``--autoconfig``: the whole service started in this process with its
listeners, the documents fetched over real HTTP by curl and by Twisted's
Agent, read as Thunderbird and Outlook read them, checked against the
listeners they name (a POP3S login through what Thunderbird was told), and
hostile requests refused: oversized bodies before they are read, entity
bombs, unknown domains, other paths and methods.
"""

from __future__ import annotations

import io
import os
import poplib
import shutil
import socket
import ssl
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from popserv.logins.passwords import PasswdFile, hash_password
from popserv.server.autoconfig import MAX_REQUEST_BODY
from popserv.server.autoconfigweb import AutoconfigSite
from popserv.server.listeners import Listener
from popserv.server.service import makeService
from popserv.server.startup import StartupError
from popserv.server.tap import Options
from tests.support.autoconfig import (
    autodiscover_request,
    billion_laughs,
    read_autodiscover,
    read_thunderbird,
)
from tests.support.certs import CA
from tests.support.peers import missing
from tests.support.processes import free_port


class _Data:
    """A data directory with alice@example.org, a certificate for mail.example.org."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.data.mkdir(parents=True)
        self.passwd = self.data / "passwd"
        PasswdFile(self.passwd).add("alice@example.org", hash_password("secret", "PLAIN"))
        self.cert, self.key = CA().issue("mail.example.org").write(base / "tls", "mail")

    def argv(self, *more: str) -> list[str]:
        return [
            "--data", str(self.data),
            "--passwd", str(self.passwd),
            "--maildir", str(self.data / "mail" / "{domain}" / "{local}"),
            "--tls-cert", str(self.cert), "--tls-key", str(self.key),
            "--shutdown-grace", "0",
            *more,
        ]  # fmt: skip

    def options(self, *more: str) -> Options:
        options = Options()
        options.parseOptions(self.argv(*more))
        return options


class ServedTests(TestCase):
    def setUp(self):
        self.curl = shutil.which("curl")
        if self.curl is None:
            raise missing("curl is not installed")
        self.files = _Data(Path(self.mktemp()))
        self.pop3, self.pop3s, self.http = free_port(), free_port(), free_port()
        options = self.files.options(
            "--pop3", f"tcp:{self.pop3}:interface=127.0.0.1",
            "--pop3s", f"tcp:{self.pop3s}:interface=127.0.0.1",
            "--autoconfig", f"tcp:{self.http}:interface=127.0.0.1",
            "--submission", "smtp.example.org:587",
            "--domain", "example.org",
        )  # fmt: skip
        self.service = makeService(options)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.url = f"http://127.0.0.1:{self.http}"

    async def fetch(self, path: str, *args: str) -> tuple[int, bytes]:
        """curl ``path``: the status and the body."""
        out, err, code = await getProcessOutputAndValue(
            self.curl,
            ["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", *args, self.url + path],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        body, _, status = out.rpartition(b"\n")
        return int(status), body

    async def test_thunderbird_with_curl(self):
        """Thunderbird's document: POP3S on its port first, then STLS, as the listeners are."""
        status, body = await self.fetch("/mail/config-v1.1.xml?emailaddress=alice%40example.org")
        self.assertEqual(status, 200)
        config = read_thunderbird(body)
        self.assertEqual(
            [(s.hostname, s.port, s.socket_type) for s in config.incoming],
            [("mail.example.org", self.pop3s, "SSL"), ("mail.example.org", self.pop3, "STARTTLS")],
        )
        self.assertEqual({s.username for s in config.incoming}, {"%EMAILADDRESS%"})
        self.assertEqual(config.outgoing[0].port, 587)
        self.assertEqual(config.outgoing[0].socket_type, "STARTTLS")
        # What Thunderbird was told logs in, once it fills in the address.
        first = config.incoming[0]
        user = first.username.replace("%EMAILADDRESS%", "alice@example.org")
        welcome = await deferToThread(self.log_in_over_tls, first.port, user)
        self.assertTrue(welcome.startswith(b"+OK"), welcome)

    def log_in_over_tls(self, port: int, user: str) -> bytes:
        context = ssl.create_default_context(cafile=None)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=10)
        try:
            client.user(user)
            return client.pass_("secret")
        finally:
            client.quit()

    async def test_well_known_from_the_host(self):
        """/.well-known/: without emailaddress the domain is the Host's."""
        status, body = await self.fetch(
            "/.well-known/autoconfig/mail/config-v1.1.xml", "-H", "Host: example.org"
        )
        self.assertEqual(status, 200)
        self.assertEqual(read_thunderbird(body).domains, ("example.org",))
        status, _ = await self.fetch("/mail/config-v1.1.xml", "-H", "Host: autoconfig.example.org")
        self.assertEqual(status, 200)

    async def test_outlook_with_agent(self):
        """Outlook's POST, by twisted.web's Agent: the login name is the whole address."""
        agent = Agent(reactor)
        response = await agent.request(
            b"POST",
            f"{self.url}/Autodiscover/Autodiscover.xml".encode(),
            Headers({b"Content-Type": [b"text/xml"]}),
            FileBodyProducer(io.BytesIO(autodiscover_request("alice@example.org"))),
        )
        body = await readBody(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            [(p.kind, p.port, p.encryption, p.login) for p in read_autodiscover(body)],
            [
                ("POP3", self.pop3s, "SSL", "alice@example.org"),
                ("POP3", self.pop3, "TLS", "alice@example.org"),
                ("SMTP", 587, "TLS", "alice@example.org"),
            ],
        )

    async def test_refusals(self):
        """Unknown domain 404, no address 400, other path 404, wrong method 405."""
        for path, args, expected in (
            ("/mail/config-v1.1.xml?emailaddress=bob%40example.com", (), 404),
            ("/mail/config-v1.1.xml?emailaddress=bob", (), 400),
            ("/mail/config-v1.1.xml", ("-H", "Host: 127.0.0.1"), 400),
            ("/metrics", (), 404),
            ("/autodiscover/autodiscover.xml", (), 405),
            ("/mail/config-v1.1.xml", ("-X", "DELETE"), 405),
        ):
            status, _ = await self.fetch(path, *args)
            self.assertEqual(status, expected, path)

    async def test_autodiscover_refusals(self):
        """An entity bomb and an address of another domain."""
        bomb = Path(self.mktemp())
        bomb.write_bytes(billion_laughs())
        status, body = await self.fetch(
            "/autodiscover/autodiscover.xml", "--data-binary", f"@{bomb}"
        )
        self.assertEqual((status, body), (400, b"document type declarations are not accepted\n"))
        other = Path(self.mktemp())
        other.write_bytes(autodiscover_request("bob@example.com"))
        status, _ = await self.fetch("/autodiscover/autodiscover.xml", "--data-binary", f"@{other}")
        self.assertEqual(status, 404)

    def raw(self, request: bytes, then: bytes = b"") -> bytes:
        """Send ``request`` (then ``then`` while the server lets us); all it answered."""
        with socket.create_connection(("127.0.0.1", self.http), timeout=10) as sock:
            sock.sendall(request)
            try:
                sock.sendall(then)
            except OSError:
                pass  # closed on us: the point
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    async def test_oversized_body_refused_unread(self):
        """A Content-Length over the limit is answered 413 and closed, the body never sent."""
        answer = await deferToThread(
            self.raw,
            b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n",
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertNotIn(b"100 Continue", answer)

    async def test_chunked_body_refused_when_too_long(self):
        """A chunked body is refused as soon as it passes the limit."""
        chunk = b"%x\r\n%s\r\n" % (4096, b"a" * 4096)
        answer = await deferToThread(
            self.raw,
            b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            chunk * (MAX_REQUEST_BODY // 4096 + 2),
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)


class StartTests(SynchronousTestCase):
    def setUp(self):
        self.files = _Data(Path(self.mktemp()))

    def start_error(self, *argv: str) -> str:
        with self.assertRaises(StartupError) as caught:
            makeService(self.files.options(*argv))
        return str(caught.exception)

    def test_needs_submission(self):
        """Thunderbird refuses a document without an outgoing server: said at start."""
        error = self.start_error("--pop3s", "tcp:995", "--autoconfig", "tcp:8080")
        self.assertIn("--autoconfig needs --submission", error)

    def test_needs_tls(self):
        options = Options()
        options.parseOptions(
            ["--data", str(self.files.data), "--passwd", str(self.files.passwd),
             "--hostname", "mail.example.org", "--autoconfig", "tcp:8080",
             "--submission", "smtp.example.org"]
        )  # fmt: skip
        with self.assertRaises(StartupError) as caught:
            makeService(options)
        self.assertIn("only POP3 over TLS", str(caught.exception))

    def test_bad_endpoint(self):
        error = self.start_error("--autoconfig", "tpc:8080", "--submission", "smtp.example.org")
        self.assertIn("--autoconfig 'tpc:8080'", error)

    def test_workers_parent_serves_it(self):
        """With --workers the parent, which binds every listener, serves it too."""
        service = makeService(
            self.files.options(
                "--workers", "2", "--pop3s", "tcp:995", "--autoconfig", "tcp:8080",
                "--submission", "smtp.example.org",
            )
        )  # fmt: skip
        sites = [s.factory for s in service if isinstance(s, Listener)]
        self.assertEqual([type(site) for site in sites], [AutoconfigSite])

