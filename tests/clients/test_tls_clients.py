"""
TLS end to end with real clients: ``openssl s_client``, curl, mpop and
fetchmail talk STLS (RFC 2595) and implicit POP3S (RFC 8314) to the real
server on loopback, verifying its certificate against the test CA, with
mail in Maildirs and again in the PostgreSQL store.

Each client runs as a child process (so the reactor keeps serving), under
``timeout`` and with its own network timeout, with HOME in a fresh temporary
directory.  The server side records, per session, the command lines it
received in the clear and inside TLS, and the session's TLS facts when it
ends, so a test can tell *where* a client sent what, not only what came out.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue

from popserv.core.body import wire_size
from popserv.server.protocol import POP3Protocol, SessionInfo
from tests.support.certs import CA
from tests.support.mail import mbox_messages, unix
from tests.support.peers import missing
from tests.support.servers import PostgresServer, crlf
from tests.support.tls import TLSTestCase


def stuffed(message: bytes) -> bytes:
    """``message`` as the body of a multi-line reply: CRLF, dot-stuffed, terminated."""
    body = crlf(message)
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@dataclass
class Seen:
    """What one server session received, and its facts once it ended."""

    chunks: list[tuple[bool, bytes]] = field(default_factory=list)
    info: SessionInfo | None = None

    def lines(self, tls: bool) -> list[bytes]:
        data = b"".join(chunk for protected, chunk in self.chunks if protected is tls)
        return [line for line in data.split(b"\r\n") if line]

    @property
    def clear(self) -> list[bytes]:
        """Command lines received before the TLS handshake completed."""
        return self.lines(False)

    @property
    def protected(self) -> list[bytes]:
        """Command lines received inside TLS."""
        return self.lines(True)


class TLSClientTestCase(TLSTestCase):
    """A :class:`TLSTestCase` that runs one real client program."""

    #: The client's executable name.
    client = ""
    #: No PLAIN-password user: no APOP timestamp, so curl does not try APOP
    #: for alice (whose argon2id password cannot pass it).
    apop_user = False
    #: Hard limit for one client run, seconds (each client also has its own).
    run_limit = 20
    timeout = 60

    def setUp(self):
        self.executable = shutil.which(self.client)
        if self.executable is None:
            raise missing(f"{self.client} is not installed")
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir(parents=True)
        self.seen: dict[POP3Protocol, Seen] = {}
        made, received, lost = (
            POP3Protocol.connectionMade,
            POP3Protocol.dataReceived,
            POP3Protocol.connectionLost,
        )

        def connectionMade(protocol):
            self.seen[protocol] = Seen()
            return made(protocol)

        def dataReceived(protocol, data):
            # The handshake's facts are set before any data inside TLS arrives.
            self.seen[protocol].chunks.append((protocol.info.tls is not None, data))
            return received(protocol, data)

        def connectionLost(protocol, reason=None):
            self.seen[protocol].info = protocol.info
            return lost(protocol, reason)

        self.patch(POP3Protocol, "connectionMade", connectionMade)
        self.patch(POP3Protocol, "dataReceived", dataReceived)
        self.patch(POP3Protocol, "connectionLost", connectionLost)
        result = super().setUp()
        # The clients run in their home directory; mktemp() paths are relative.
        self.ca_file = str(Path(self.cafile).absolute())
        return result

    async def sessions(self) -> list[Seen]:
        """Every session since the last call, in order, once the server has seen them end."""
        await self.wait_idle()
        sessions = list(self.seen.values())
        self.seen.clear()
        return sessions

    async def run_client(self, *args: str, stdin: bytes | None = None, **env: str):
        """Run the client with ``args``; return (stdout, stderr, exit code)."""
        argv = [self.executable, *args]
        limiter = shutil.which("timeout")
        if limiter is not None:
            argv = [limiter, "-k", "5", str(self.run_limit), *argv]
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LC_ALL": "C",
            "TZ": "UTC",
            **env,
        }
        return await getProcessOutputAndValue(
            argv[0], argv[1:], env=environment, path=str(self.home), stdinBytes=stdin
        )

    async def run_ok(self, *args: str, **kwargs) -> tuple[bytes, bytes]:
        """Run the client, which must exit with 0; return (stdout, stderr)."""
        out, err, code = await self.run_client(*args, **kwargs)
        self.assertEqual(code, 0, (out + err).decode("utf-8", "replace"))
        return out, err

    def assertTLS13(self, session: Seen, server_name=...) -> None:
        """The session ran TLS 1.3 (and the client sent ``server_name`` as SNI, when given)."""
        self.assertTrue(session.info.secure)
        self.assertIsNotNone(session.info.tls, "the handshake never completed")
        self.assertEqual(session.info.tls.version, "TLSv1.3")
        if server_name is not ...:
            self.assertEqual(session.info.tls.server_name, server_name)

    def assertSTLSFirst(self, session: Seen) -> None:
        """STLS came before anything secret, and CAPA was asked again inside TLS (RFC 2595 4)."""
        self.assertEqual(session.clear, [b"CAPA", b"STLS"])
        self.assertEqual(session.protected[0], b"CAPA")

    def other_ca(self) -> str:
        """A CA file that did not issue the server's certificate."""
        return str(CA("another CA").write(Path(self.mktemp()).absolute() / "other.pem"))


class OpenSSLTests(TLSClientTestCase):
    """openssl s_client: STLS and POP3S handshakes, host name checks, ALPN."""

    client = "openssl"

    async def s_client(self, port: int, *args: str, stdin: bytes = b"QUIT\n", ca=None):
        """s_client to ``port`` (with ``-starttls pop3`` on the plain port), verifying."""
        starttls = ["-starttls", "pop3"] if port == self.portno else []
        return await self.run_client(
            "s_client",
            "-crlf",
            *starttls,
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            ca or self.ca_file,
            "-verify_return_error",
            "-servername",
            "pop.test",
            *args,
            stdin=stdin,
        )

    async def test_stls_session(self):
        """
        -starttls pop3: the commands on stdin each get +OK inside TLS 1.3 and
        RETR 1 brings message 1 byte for byte (CRLF, dot-stuffed).
        """
        out, err, code = await self.s_client(
            self.portno,
            "-quiet",
            "-verify_hostname",
            "pop.test",
            stdin=b"USER alice\nPASS secret\nSTAT\nRETR 1\nQUIT\n",
        )
        self.assertEqual(code, 0, err)
        user, password, stat, retr, rest = out.split(b"\r\n", 4)
        self.assertTrue(user.startswith(b"+OK"), out)
        self.assertTrue(password.startswith(b"+OK"), out)
        self.assertEqual(stat, b"+OK 4 %d" % sum(wire_size(m) for m in self.messages))
        self.assertTrue(retr.startswith(b"+OK"), out)
        body = stuffed(self.messages[0])
        self.assertEqual(rest[: len(body)], body)
        bye = rest[len(body) :]
        self.assertTrue(bye.startswith(b"+OK"), out)
        self.assertEqual(bye.count(b"\r\n"), 1)
        self.assertTrue(bye.endswith(b"\r\n"))

        (session,) = await self.sessions()
        self.assertEqual(session.clear, [b"STLS"])
        self.assertEqual(
            session.protected, [b"USER alice", b"PASS secret", b"STAT", b"RETR 1", b"QUIT"]
        )
        self.assertTLS13(session, "pop.test")
        self.assertIsNone(session.info.tls.alpn)

    async def test_implicit_tls(self):
        """
        Straight TLS to the POP3S port: TLS 1.3, the certificate verifies for
        pop.test, the greeting comes inside TLS, LIST and an 8-bit RETR are exact.
        """
        out, err, code = await self.s_client(
            self.tls_portno,
            "-brief",
            "-ign_eof",
            "-verify_hostname",
            "pop.test",
            stdin=b"USER alice\nPASS secret\nLIST\nRETR 4\nQUIT\n",
        )
        self.assertEqual(code, 0, err)
        for line in (
            b"Protocol version: TLSv1.3",
            b"Verification: OK",
            b"Verified peername: pop.test",
        ):
            self.assertIn(line + b"\n", err)
        greeting, user, password, rest = out.split(b"\r\n", 3)
        self.assertTrue(greeting.startswith(b"+OK"), out)
        self.assertTrue(user.startswith(b"+OK"), out)
        self.assertTrue(password.startswith(b"+OK"), out)
        listing, rest = rest.split(b"\r\n.\r\n", 1)
        lines = listing.split(b"\r\n")
        self.assertTrue(lines[0].startswith(b"+OK"), out)
        self.assertEqual(
            lines[1:], [b"%d %d" % (n, wire_size(m)) for n, m in enumerate(self.messages, 1)]
        )
        retr, rest = rest.split(b"\r\n", 1)
        self.assertTrue(retr.startswith(b"+OK"), out)
        body = stuffed(self.messages[3])
        self.assertIn(b"\xe4\xf6 8-bit body\r\n", body)
        self.assertEqual(rest[: len(body)], body)
        self.assertTrue(rest[len(body) :].startswith(b"+OK"), out)

        (session,) = await self.sessions()
        self.assertEqual(session.clear, [])
        self.assertEqual(
            session.protected, [b"USER alice", b"PASS secret", b"LIST", b"RETR 4", b"QUIT"]
        )
        self.assertTLS13(session, "pop.test")

    async def test_alpn_pop3(self):
        """-alpn pop3 (alone, or after http/1.1) is accepted and pop3 chosen, on both ports."""
        for port in (self.portno, self.tls_portno):
            for offer in ("pop3", "http/1.1,pop3"):
                out, err, code = await self.s_client(port, "-ign_eof", "-alpn", offer)
                self.assertEqual(code, 0, err)
                self.assertIn(b"\nALPN protocol: pop3\n", out)
                self.assertIn(b"New, TLSv1.3, Cipher is ", out)
                self.assertIn(b"\n+OK Bye\r\n", out)
                (session,) = await self.sessions()
                self.assertEqual(session.protected, [b"QUIT"])
                self.assertEqual(session.info.tls.alpn, "pop3")

    async def test_alpn_other_protocol_refused(self):
        """
        -alpn http/1.1 only: the server ends the handshake with the
        no_application_protocol alert (RFC 7301 3.2), on both ports; no +OK reaches the client.
        """
        for port in (self.portno, self.tls_portno):
            out, err, code = await self.s_client(port, "-quiet", "-alpn", "http/1.1")
            self.assertNotEqual(code, 0)
            self.assertNotIn(b"+OK", out)
            self.assertIn(b"alert no application protocol", err)
            self.assertIn(b"SSL alert number 120", err)
            (session,) = await self.sessions()
            self.assertEqual(session.clear, [b"STLS"] if port == self.portno else [])
            self.assertEqual(session.protected, [])
            self.assertIsNone(session.info.tls)

    async def test_wrong_hostname_refused(self):
        """-verify_hostname other.test with -verify_return_error: s_client stops, both ports."""
        for port in (self.portno, self.tls_portno):
            out, err, code = await self.s_client(
                port, "-quiet", "-verify_hostname", "other.test", stdin=b"USER alice\n"
            )
            self.assertNotEqual(code, 0)
            self.assertNotIn(b"+OK", out)
            self.assertIn(b"verify error:num=62:hostname mismatch", err)
            (session,) = await self.sessions()
            self.assertEqual(session.protected, [])

    async def test_untrusted_ca_refused(self):
        """A CA file of another CA: verification fails and nothing is sent."""
        out, err, code = await self.s_client(self.tls_portno, "-quiet", ca=self.other_ca())
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"+OK", out)
        self.assertIn(b"certificate verify failed", err)
        (session,) = await self.sessions()
        self.assertEqual(session.protected, [])


class CurlTests(TLSClientTestCase):
    """curl 7.88: pop3s:// and pop3:// with --ssl-reqd (STLS), checking the certificate."""

    client = "curl"

    async def curl(self, url: str, *args: str, ca=None, user="alice:secret"):
        return await self.run_client(
            "-q",
            "-sS",
            "--max-time",
            "15",
            url,
            "--cacert",
            ca or self.ca_file,
            "-u",
            user,
            *args,
        )

    async def test_pop3s_fetch(self):
        """pop3s://.../N fetches each message exactly as plain pop3:// does, inside TLS 1.3."""
        for n, message in enumerate(self.messages, 1):
            out, err, code = await self.curl(f"pop3s://127.0.0.1:{self.tls_portno}/{n}")
            self.assertEqual(code, 0, err)
            self.assertEqual(out, crlf(message))
            (session,) = await self.sessions()
            self.assertEqual(session.clear, [])
            self.assertIn(b"RETR %d" % n, session.protected)
            self.assertEqual(session.protected[-1], b"QUIT")
            # No SNI for an address (RFC 6066 3).
            self.assertTLS13(session, server_name=None)

    async def test_stls_list(self):
        """
        pop3:// --ssl-reqd: curl upgrades with STLS, asks CAPA again inside
        TLS (which no longer offers STLS), logs in there and lists the messages.
        """
        out, err, code = await self.curl(f"pop3://127.0.0.1:{self.portno}/", "--ssl-reqd", "-v")
        self.assertEqual(code, 0, err)
        sizes = [wire_size(m) for m in self.messages]
        self.assertEqual(out, b"".join(b"%d %d\r\n" % (n, s) for n, s in enumerate(sizes, 1)))
        before, after = err.split(b"\n> STLS\r\n< +OK", 1)
        self.assertIn(b"\n< STLS\r\n", before)
        self.assertNotIn(b"\n< STLS\r\n", after)
        self.assertIn(b"SSL connection using TLSv1.3", after)
        self.assertIn(b"SSL certificate verify ok.", after)

        (session,) = await self.sessions()
        self.assertSTLSFirst(session)
        self.assertIn(b"LIST", session.protected)
        self.assertEqual(session.protected[-1], b"QUIT")
        self.assertTLS13(session, server_name=None)

    async def test_untrusted_ca_exit_60(self):
        """--cacert of another CA: exit 60 (peer certificate cannot be authenticated), both ways."""
        for url, args in (
            (f"pop3s://127.0.0.1:{self.tls_portno}/1", ()),
            (f"pop3://127.0.0.1:{self.portno}/", ("--ssl-reqd",)),
        ):
            out, err, code = await self.curl(url, *args, ca=self.other_ca())
            self.assertEqual(code, 60, err)
            self.assertEqual(out, b"")
            (session,) = await self.sessions()
            self.assertEqual(session.protected, [])
            secrets = [c for c in session.clear if c.startswith((b"USER", b"PASS", b"AUTH"))]
            self.assertEqual(secrets, [])


class MpopTests(TLSClientTestCase):
    """mpop 1.4 with GnuTLS: --tls-starttls=on (STLS) and off (POP3S), USER/PASS."""

    client = "mpop"

    async def mpop(self, port: int, starttls: bool) -> bytes:
        out, err = await self.run_ok(
            "--host=127.0.0.1",
            f"--port={port}",
            "--timeout=10",
            "--tls=on",
            f"--tls-starttls={'on' if starttls else 'off'}",
            f"--tls-trust-file={self.ca_file}",
            "--auth=user",
            "--user=alice",
            "--passwordeval=echo secret",
            "--received-header=off",
            "--keep=on",
            "--only-new=off",
            f"--delivery=mbox,{self.home / 'alice.mbox'}",
            f"--uidls-file={self.home / 'uidls'}",
        )
        return out + err

    def assertDownloaded(self, session: Seen) -> None:
        self.assertEqual(
            [c for c in session.protected if c.startswith(b"RETR")],
            [b"RETR 1", b"RETR 2", b"RETR 3", b"RETR 4"],
        )
        self.assertIn(b"USER alice", session.protected)
        self.assertIn(b"PASS secret", session.protected)
        self.assertEqual(session.protected[-1], b"QUIT")
        self.assertEqual(
            mbox_messages((self.home / "alice.mbox").read_bytes()),
            [unix(m) for m in self.messages],
        )

    async def test_stls(self):
        """--tls-starttls=on: STLS, CAPA again inside TLS 1.3, the four messages into the mbox."""
        output = await self.mpop(self.portno, starttls=True)
        self.assertIn(b"new: 4 messages in 228 bytes", output)
        (session,) = await self.sessions()
        self.assertSTLSFirst(session)
        self.assertTLS13(session)
        self.assertDownloaded(session)

    async def test_pop3s(self):
        """--tls-starttls=off to the POP3S port: everything inside TLS 1.3, four messages."""
        await self.mpop(self.tls_portno, starttls=False)
        (session,) = await self.sessions()
        self.assertEqual(session.clear, [])
        self.assertEqual(session.protected[0], b"CAPA")
        self.assertTLS13(session)
        self.assertDownloaded(session)
        self.assertEqual(len(self.stored_uids()), 4)


class FetchmailTests(TLSClientTestCase):
    """
    fetchmail 6.4 with sslcertck against the test CA.  It matches the
    certificate only against DNS names, not IP addresses, hence
    ``sslcommonname "pop.test"`` while it connects to 127.0.0.1.
    """

    client = "fetchmail"

    async def fetchmail(self, port: int, tls: str) -> bytes:
        rc = self.home / "fetchmailrc"
        rc.write_text(
            "set no bouncemail\n"
            "set invisible\n"
            f"poll 127.0.0.1 proto pop3 port {port} timeout 10\n"
            '  user "alice" password "secret" keep fetchall\n'
            f'  {tls} sslcertck sslcertfile "{self.ca_file}" sslcommonname "pop.test"\n'
            "  no rewrite\n"
            f'  mda "cat >>{self.home / "alice.mail"}"\n'
        )
        rc.chmod(0o600)
        out, err = await self.run_ok(
            "-f",
            str(rc),
            "--nosyslog",
            "-v",
            # As root the lock is /var/run/fetchmail.pid whatever FETCHMAILHOME says.
            "--pidfile",
            str(self.home / "fetchmail.pid"),
            FETCHMAILHOME=str(self.home),
        )
        output = out + err
        self.assertIn(b"SSL/TLS: using protocol TLSv1.3", output)
        self.assertEqual(
            (self.home / "alice.mail").read_bytes(), b"".join(unix(m) for m in self.messages)
        )
        return output

    def assertFetched(self, session: Seen) -> None:
        self.assertEqual(session.protected[1:3], [b"USER alice", b"PASS secret"])
        self.assertEqual(
            [c for c in session.protected if c.startswith(b"RETR")],
            [b"RETR 1", b"RETR 2", b"RETR 3", b"RETR 4"],
        )
        self.assertFalse([c for c in session.protected if c.startswith(b"DELE")])
        self.assertEqual(session.protected[-1], b"QUIT")
        # sslcommonname is also the name fetchmail sends as SNI.
        self.assertTLS13(session, server_name="pop.test")

    async def test_stls(self):
        """sslproto 'tls1.2+': STLS, CAPA again inside TLS, the four messages to the MDA."""
        output = await self.fetchmail(self.portno, "sslproto 'tls1.2+'")
        self.assertIn(b"upgrade to TLS succeeded", output)
        (session,) = await self.sessions()
        self.assertSTLSFirst(session)
        self.assertFetched(session)

    async def test_implicit_tls(self):
        """``ssl`` to the POP3S port: nothing in the clear, the four messages to the MDA."""
        await self.fetchmail(self.tls_portno, "ssl")
        (session,) = await self.sessions()
        self.assertEqual(session.clear, [])
        self.assertEqual(session.protected[0], b"CAPA")
        self.assertFetched(session)
        self.assertEqual(len(self.stored_uids()), 4)


class OpenSSLPostgresTests(PostgresServer, OpenSSLTests):
    pass


class CurlPostgresTests(PostgresServer, CurlTests):
    pass


class MpopPostgresTests(PostgresServer, MpopTests):
    pass


class FetchmailPostgresTests(PostgresServer, FetchmailTests):
    pass
