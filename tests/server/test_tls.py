"""
TLS end to end: STLS and implicit POP3S with real handshakes over loopback,
certificates from a throw-away CA made by the tests.
"""

from __future__ import annotations

import hashlib
import os
import poplib
import signal
import socket
import ssl
import subprocess
from pathlib import Path

from attrs import evolve
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from popserv.core import errors, wire
from popserv.core.body import wire_size
from popserv.server.certreload import CertificateReloader
from popserv.server.output import OutputGate as _OutputGate
from popserv.server.startup import EXIT_CONFIG, StartupError
from popserv.server.tap import Options
from popserv.server.tls import CertificateError, CertificateFiles, find_certificates, load_identity
from popserv.stores.maildir import deliver
from tests.support.certs import CA, key_pem
from tests.support.processes import REPO, twistd_script
from tests.support.servers import RawClient, command, login
from tests.support.tls import TLSTestCase


class STLSTests(TLSTestCase):
    async def test_stls_with_poplib(self):
        """CAPA lists STLS, STLS upgrades, then CAPA no longer lists it and login works."""
        def session():
            c = self.pop()
            before = c.capa()
            answer = c.stls(context=self.context())
            after = c.capa()
            version = c.sock.version()
            again = command(c, "STLS")
            logged_in = login(c, "alice", "secret")
            info = self.session_info()
            c.quit()
            return before, answer, after, version, again, logged_in, info

        before, answer, after, version, again, logged_in, info = await self.run_in_thread(session)
        self.assertIn("STLS", before)
        self.assertEqual(answer, b"+OK Begin TLS negotiation")
        self.assertNotIn("STLS", after)
        self.assertEqual(version, "TLSv1.3")
        self.assertEqual(again, wire.err(errors.TLSActive()).rstrip())
        self.assertTrue(logged_in.startswith(b"+OK"))
        self.assertTrue(info.secure)
        self.assertEqual(info.tls.version, "TLSv1.3")

    async def test_stls_refused_after_login(self):
        def session():
            c = self.pop()
            login(c, "alice", "secret")
            answer = command(c, "STLS")
            c.quit()
            return answer

        answer = await self.run_in_thread(session)
        self.assertEqual(answer, wire.err(errors.BadState()).rstrip())

    async def test_injected_commands_are_discarded(self):
        """
        STLS and CAPA in one write: CAPA arrived before the handshake, so it is
        never answered, not in clear and not inside TLS.
        """
        def session():
            c = RawClient(self.portno)
            c.send(b"STLS\r\nCAPA\r\n")
            answer = c.line()
            tls = self.context().wrap_socket(c.sock, server_hostname="pop.test")
            tls.sendall(b"QUIT\r\n")
            received = b""
            while chunk := tls.recv(4096):
                received += chunk
            tls.close()
            return answer, c.buffer, received

        answer, leftover, received = await self.run_in_thread(session)
        self.assertEqual(answer, b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(leftover, b"")
        self.assertEqual(received, b"+OK Bye\r\n")

    async def test_user_given_is_forgotten(self):
        """A USER sent before STLS does not carry over into the TLS session."""
        def session():
            c = self.pop()
            c.user("alice")
            c.stls(context=self.context())
            answer = command(c, "PASS secret")
            c.quit()
            return answer

        answer = await self.run_in_thread(session)
        self.assertEqual(answer, wire.err(errors.BadState()).rstrip())


class LargeMessageTests(TLSTestCase):
    """A message of several MB, streamed with backpressure through the TLS layer."""

    def setUp(self):
        super().setUp()
        body = b"".join(b".%07d line of the body\n" % i for i in range(150_000))
        self.big = b"Subject: big\n\n" + body
        deliver(self.maildir, self.big)

    def fetch(self, client) -> tuple[int, bytes]:
        login(client, "alice", "secret")
        size = int(client.list(5).split()[2])
        client._putcmd("RETR 5")
        client._getresp()
        received = bytearray()
        while (line := client.file.readline()) != b".\r\n":
            received += line
        client.quit()
        return size, bytes(received)

    async def test_over_stls_and_pop3s(self):
        expected = self.big.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        expected = b"Subject: big\r\n\r\n" + expected.split(b"\r\n\r\n", 1)[1]

        def over_stls():
            c = self.pop()
            c.stls(context=self.context())
            return self.fetch(c)

        pauses = []
        original = _OutputGate.pauseProducing

        def counting(gate):
            pauses.append(gate)
            original(gate)

        self.patch(_OutputGate, "pauseProducing", counting)
        for fetch in (over_stls, lambda: self.fetch(self.pop3s())):
            del pauses[:]
            size, received = await self.run_in_thread(fetch)
            self.assertEqual(len(received), len(expected))
            self.assertEqual(received, expected)
            self.assertEqual(size, wire_size(self.big))
            # The send buffer filled and the session waited: no whole message in memory.
            self.assertTrue(pauses)


class ImplicitTLSTests(TLSTestCase):
    async def test_pop3s_with_poplib(self):
        def session():
            c = self.pop3s()
            capa = c.capa()
            stls = command(c, "STLS")
            logged_in = login(c, "alice", "secret")
            stat = c.stat()
            info = self.session_info()
            c.quit()
            return capa, stls, logged_in, stat, info

        capa, stls, logged_in, stat, info = await self.run_in_thread(session)
        self.assertNotIn("STLS", capa)
        self.assertIn("USER", capa)
        self.assertEqual(stls, wire.err(errors.TLSActive()).rstrip())
        self.assertTrue(logged_in.startswith(b"+OK"))
        self.assertEqual(stat[0], 4)
        self.assertTrue(info.secure)

    async def test_hostname_checked(self):
        """The certificate passes for its own names and fails for another."""
        def connect(name):
            try:
                with self.tls_socket(self.tls_portno, server_hostname=name) as s:
                    return s.recv(100)
            except ssl.SSLCertVerificationError as e:
                return e.verify_message

        self.assertTrue((await self.run_in_thread(connect, "pop.test")).startswith(b"+OK"))
        refused = await self.run_in_thread(connect, "other.test")
        self.assertIn("Hostname mismatch", refused)

    async def test_alpn(self):
        """pop3 is accepted and chosen; no ALPN is fine; only http/1.1 is refused."""
        def connect(alpn):
            try:
                with self.tls_socket(self.tls_portno, alpn=alpn) as s:
                    return s.selected_alpn_protocol(), s.recv(100)
            except (ssl.SSLError, OSError) as e:
                return "refused", type(e).__name__

        self.assertEqual((await self.run_in_thread(connect, ["pop3"]))[0], "pop3")
        self.assertEqual((await self.run_in_thread(connect, ["http/1.1", "pop3"]))[0], "pop3")
        chosen, greeting = await self.run_in_thread(connect, None)
        self.assertIsNone(chosen)
        self.assertTrue(greeting.startswith(b"+OK"))
        self.assertEqual((await self.run_in_thread(connect, ["http/1.1"]))[0], "refused")
        self.assertEqual((await self.run_in_thread(connect, ["imap", "h2"]))[0], "refused")

    async def test_alpn_refused_after_stls_too(self):
        def session():
            c = RawClient(self.portno)
            c.send(b"STLS\r\n")
            c.line()
            try:
                self.context(alpn=["http/1.1"]).wrap_socket(c.sock, server_hostname="pop.test")
            except (ssl.SSLError, OSError) as e:
                return type(e).__name__
            return "accepted"

        self.assertNotEqual(await self.run_in_thread(session), "accepted")

    async def test_tls_1_2_and_resumption(self):
        """A TLS 1.2 client gets an intermediate (AEAD, forward-secret) cipher; sessions resume."""
        context = self.context(maximum_version=ssl.TLSVersion.TLSv1_2)

        def connect(session=None):
            raw = socket.create_connection(("127.0.0.1", self.tls_portno), timeout=10)
            s = context.wrap_socket(raw, server_hostname="pop.test", session=session)
            s.recv(100)
            result = (s.version(), s.cipher()[0], s.session, s.session_reused)
            s.sendall(b"QUIT\r\n")
            s.recv(100)
            s.close()
            return result

        version, cipher, session, reused = await self.run_in_thread(connect)
        self.assertEqual(version, "TLSv1.2")
        self.assertTrue(cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA" in cipher))
        self.assertFalse(reused)
        again = await self.run_in_thread(connect, session)
        self.assertTrue(again[3])

    async def test_no_compression(self):
        def connect():
            with self.tls_socket(self.tls_portno) as s:
                return s.compression()

        self.assertIsNone(await self.run_in_thread(connect))

    async def test_channel_bindings(self):
        """tls-server-end-point is the SHA-256 of our certificate; tls-exporter is 32 bytes."""
        def session():
            with self.tls_socket(self.tls_portno) as s:
                s.recv(100)
                s.sendall(b"NOOP\r\n")  # any round trip: the handshake is over
                s.recv(100)
                return self.session_info().tls, s.getpeercert(binary_form=True)

        tls, der = await self.run_in_thread(session)
        self.assertEqual(tls.channel_bindings["tls-server-end-point"], hashlib.sha256(der).digest())
        self.assertEqual(len(tls.channel_bindings["tls-exporter"]), 32)
        self.assertEqual(tls.server_name, "pop.test")
        self.assertIsNone(tls.client_certificate)


class MinimumVersionTests(TLSTestCase):
    extra_options = {"tls-min-version": "1.3"}

    async def test_tls_1_2_refused(self):
        def connect():
            try:
                with self.tls_socket(self.tls_portno,
                                     maximum_version=ssl.TLSVersion.TLSv1_2) as s:
                    return s.version()
            except (ssl.SSLError, OSError) as e:
                return type(e).__name__

        self.assertNotEqual(await self.run_in_thread(connect), "TLSv1.2")


class SNITests(TLSTestCase):
    def setUp(self):
        super().setUp()
        other = self.ca.issue("mail.other.test", "*.wild.test")
        cert, key = other.write(self.certs, "other")
        self.factory.tls.config = evolve(
            self.factory.tls.config,
            certificates=(*self.factory.tls.config.certificates, CertificateFiles(cert, key)),
        )
        self.assertTrue(self.factory.tls.reload())
        self.other = other

    async def test_certificate_by_name(self):
        def served(name):
            with self.tls_socket(self.tls_portno, server_hostname=name) as s:
                return s.getpeercert(binary_form=True)

        der = lambda issued: issued.certificate.public_bytes(serialization.Encoding.DER)  # noqa: E731
        self.assertEqual(await self.run_in_thread(served, "pop.test"), der(self.server_cert))
        self.assertEqual(await self.run_in_thread(served, "mail.other.test"), der(self.other))
        self.assertEqual(await self.run_in_thread(served, "x.wild.test"), der(self.other))


class ReloadTests(TLSTestCase):
    def renew(self):
        """Write a new certificate for the same names over the old files."""
        self.renewed = self.ca.issue("pop.test", "127.0.0.1")
        self.renewed.write(self.certs, "server")
        # The file-change check looks at the modification time.
        future = os.stat(self.cert_path).st_mtime + 10
        os.utime(self.cert_path, (future, future))

    def serial_served(self):
        with self.tls_socket(self.tls_portno) as s:
            der = s.getpeercert(binary_form=True)
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    async def test_files_changed(self):
        """A renewal is picked up by the file check; a running session goes on."""
        old = self.server_cert.certificate.serial_number
        self.assertEqual(await self.run_in_thread(self.serial_served), old)
        running = await self.run_in_thread(self.pop3s)
        self.addCleanup(running.close)
        await self.run_in_thread(login, running, "alice", "secret")
        self.assertFalse(self.factory.tls.reload_if_changed())
        self.renew()
        self.assertTrue(self.factory.tls.reload_if_changed())
        new = self.renewed.certificate.serial_number
        self.assertEqual(await self.run_in_thread(self.serial_served), new)
        self.assertTrue((await self.run_in_thread(running.noop)).startswith(b"+OK"))
        await self.run_in_thread(running.quit)

    async def test_broken_files_keep_the_old_certificate(self):
        old = self.server_cert.certificate.serial_number
        self.key_path.write_bytes(key_pem(self.ca.issue("x.test").key))  # a key of another cert
        self.assertFalse(self.factory.tls.reload())
        self.assertEqual(await self.run_in_thread(self.serial_served), old)

    async def test_sighup(self):
        reloader = CertificateReloader(self.factory.tls, 3600, reactor)
        reloader.startService()
        self.addCleanup(reloader.stopService)
        self.renew()
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            await deferLater(reactor, 0.02, lambda: None)
            if self.factory.tls.reload_if_changed() is False:
                break
        new = self.renewed.certificate.serial_number
        self.assertEqual(await self.run_in_thread(self.serial_served), new)


class ClientCertificateTests(TLSTestCase):
    def setUp(self):
        self.client_ca = CA("client CA")
        path = Path(self.mktemp())
        self.extra_options = {"tls-client-ca": str(self.client_ca.write(path / "clients.pem"))}
        super().setUp()

    def connect(self, issued=None):
        context = self.context()
        if issued is not None:
            cert, key = issued.write(Path(self.mktemp()), "client")
            context.load_cert_chain(cert, key)
        raw = socket.create_connection(("127.0.0.1", self.tls_portno), timeout=10)
        try:
            with context.wrap_socket(raw, server_hostname="pop.test") as s:
                s.recv(100)
                s.sendall(b"NOOP\r\n")
                s.recv(100)
                return self.session_info().tls.client_certificate
        except (ssl.SSLError, OSError) as e:
            return type(e).__name__

    async def test_verified_certificate(self):
        issued = self.client_ca.issue("alice", client=True)
        certificate = await self.run_in_thread(self.connect, issued)
        self.assertEqual(certificate, issued.certificate)

    async def test_no_certificate_is_fine(self):
        self.assertIsNone(await self.run_in_thread(self.connect))

    async def test_untrusted_certificate_refused(self):
        stranger = CA("stranger").issue("mallory", client=True)
        self.assertIsInstance(await self.run_in_thread(self.connect, stranger), str)


class CleartextPolicyTests(TLSTestCase):
    """A client at 127.0.0.2 while only 127.0.0.1 counts as local."""

    def setUp(self):
        super().setUp()
        self.factory.policy = evolve(self.factory.policy, local_networks=("127.0.0.1/32",))

    def remote(self) -> poplib.POP3:
        client = poplib.POP3.__new__(poplib.POP3)
        client.host, client.port = "127.0.0.1", self.portno
        client._tls_established = False
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", self.portno))
        client.sock = sock
        client.file = sock.makefile("rb")
        client._debugging = 0
        client.welcome = client._getresp()
        return client

    async def test_no_cleartext_password(self):
        def session():
            c = self.remote()
            greeting = c.welcome
            capa = c.capa()
            answers = [command(c, line) for line in ("USER alice", "APOP bob " + "0" * 32)]
            c.stls(context=self.context())
            tls_capa = c.capa()
            logged_in = login(c, "alice", "secret")
            c.quit()
            return greeting, capa, answers, tls_capa, logged_in

        greeting, capa, answers, tls_capa, logged_in = await self.run_in_thread(session)
        # APOP is off for this connection: no timestamp for a client to try.
        self.assertNotIn(b"<", greeting)
        self.assertNotIn("USER", capa)
        self.assertIn("STLS", capa)
        refusal = wire.err(errors.TLSRequired()).rstrip()
        self.assertTrue(refusal.startswith(b"-ERR [AUTH] "))
        self.assertEqual(answers, [refusal, refusal])
        self.assertIn("USER", tls_capa)
        self.assertTrue(logged_in.startswith(b"+OK"))

    async def test_local_peer_unchanged(self):
        def session():
            c = self.pop()
            capa = c.capa()
            logged_in = login(c, "alice", "secret")
            c.quit()
            return c.welcome, capa, logged_in

        greeting, capa, logged_in = await self.run_in_thread(session)
        self.assertIn(b"<", greeting)
        self.assertIn("USER", capa)
        self.assertTrue(logged_in.startswith(b"+OK"))

    async def test_allowed_by_the_admin(self):
        self.factory.policy = evolve(self.factory.policy, allow_cleartext_auth=True)

        def session():
            c = self.remote()
            capa = c.capa()
            logged_in = login(c, "alice", "secret")
            c.quit()
            return capa, logged_in

        capa, logged_in = await self.run_in_thread(session)
        self.assertIn("USER", capa)
        self.assertTrue(logged_in.startswith(b"+OK"))

    async def test_apop_allowed_alone(self):
        self.factory.policy = evolve(self.factory.policy, allow_cleartext_apop=True)

        def session():
            c = self.remote()
            capa = c.capa()
            answer = c.apop("bob", "bob pw")
            c.quit()
            return capa, answer

        capa, answer = await self.run_in_thread(session)
        self.assertNotIn("USER", capa)
        self.assertTrue(answer.startswith(b"+OK"))


class ConfigurationTests(SynchronousTestCase):
    """Bad TLS options stop startup with one line naming the problem."""

    def setUp(self):
        self.dir = Path(self.mktemp())
        self.ca = CA()
        self.cert, self.key = self.ca.issue("pop.test").write(self.dir, "server")

    def error(self, *argv: str) -> str:
        """The one line a bad TLS option stops startup with."""
        options = Options()
        with self.assertRaises((UsageError, StartupError)) as raised:
            options.parseOptions(list(argv))
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        return message

    def test_twistd_prints_one_line(self):
        """twistd with a missing certificate: one line on stderr, no traceback, exit 78."""
        twistd = twistd_script()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        missing = self.dir / "missing.pem"
        done = subprocess.run(
            [str(twistd), "-n", "--pidfile", "", "popserv", "--data", str(self.dir / "data"),
             "--tls-cert", str(missing)], capture_output=True, text=True, env=env, timeout=60,
            check=False)
        self.assertEqual(done.returncode, EXIT_CONFIG)
        self.assertEqual(done.stderr, f"popserv: {missing}: No such file or directory\n")
        self.assertNotIn("Traceback", done.stdout)

    def test_missing_file(self):
        self.assertIn("No such file", self.error("--tls-cert", str(self.dir / "nope.pem")))

    def test_not_a_certificate(self):
        self.key.write_bytes(b"junk")
        message = self.error("--tls-cert", str(self.key))
        self.assertEqual(message, f"{self.key}: no PEM certificate in the file")

    def test_wrong_key(self):
        other = self.ca.issue("x.test").write(self.dir, "other")[1]
        message = self.error("--tls-cert", str(self.cert), "--tls-key", str(other))
        self.assertIn("does not belong to", message)

    def test_encrypted_key(self):
        key = self.ca.issue("x.test").key
        self.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw")))
        self.assertIn("encrypted", self.error("--tls-cert", str(self.cert),
                                              "--tls-key", str(self.key)))

    def test_key_count(self):
        self.assertIn("--tls-key", self.error("--tls-cert", str(self.cert), "--tls-cert",
                                              str(self.cert), "--tls-key", str(self.key)))

    def test_pop3s_needs_certificate(self):
        self.assertIn("--tls-cert", self.error("--pop3s", "tcp:995"))

    def test_bad_version_and_ciphers(self):
        self.assertIn("1.2", self.error("--tls-cert", str(self.cert), "--tls-key",
                                        str(self.key), "--tls-min-version", "1.0"))
        self.assertIn("cipher", self.error("--tls-cert", str(self.cert), "--tls-key",
                                           str(self.key), "--tls-ciphers", "NOPE"))

    def test_combined_file_and_letsencrypt_directory(self):
        """One PEM with key and chain works, and so does a Let's Encrypt live/ tree."""
        combined, _ = self.ca.issue("a.test").write(self.dir / "flat", "a", combined=True)
        live = self.dir / "live" / "b.test"
        cert, key = self.ca.issue("b.test").write(live, "x")
        cert.rename(live / "fullchain.pem")
        key.rename(live / "privkey.pem")
        found = find_certificates([str(combined), str(self.dir / "live")], [])
        self.assertEqual([f.certificate.name for f in found], ["a.pem", "fullchain.pem"])
        self.assertEqual([load_identity(f).names for f in found], [("a.test",), ("b.test",)])
        options = Options()
        options.parseOptions(["--tls-cert", str(combined), "--tls-cert", str(self.dir / "live"),
                              "--pop3s", "tcp:0"])
        self.assertEqual(set(options["tls"].names), {"a.test", "b.test"})

    def test_empty_directory(self):
        (self.dir / "empty").mkdir()
        self.assertRaises(CertificateError, find_certificates, [str(self.dir / "empty")], [])

    def test_end_point_hash_follows_signature(self):
        from popserv.server.tls import end_point_hash

        sha384 = self.ca.issue("x.test", hash_algorithm=hashes.SHA384()).certificate
        self.assertIsInstance(end_point_hash(sha384), hashes.SHA384)
        sha256 = self.ca.issue("x.test").certificate
        self.assertIsInstance(end_point_hash(sha256), hashes.SHA256)


def _self_signed(key, name="pop.test", days=30):
    """A self-signed certificate for ``key`` (any type cryptography can put in one)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(signer, hashes.SHA256())
    )


class ReviewRegressionTests(TLSTestCase):
    """Found in review of the TLS code; each failed before its fix."""

    def write(self, certificate, key, stem):
        from tests.support.certs import cert_pem, key_pem

        cert_path, key_path = self.certs / f"{stem}.pem", self.certs / f"{stem}.key"
        cert_path.write_bytes(cert_pem(certificate))
        key_path.write_bytes(key_pem(key))
        return cert_path, key_path

    def test_openssl_refusals_are_one_line(self):
        """An RSA-1024 key or an X25519 certificate stops startup with a line, not a traceback."""
        from cryptography.hazmat.primitives.asymmetric import rsa, x25519

        from popserv.server.tls import TLSConfig, TLSServer

        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        cert, key = self.write(_self_signed(small), small, "small")
        with self.assertRaises(CertificateError) as raised:
            TLSServer(TLSConfig((CertificateFiles(cert, key),)))
        self.assertIn("small.pem: OpenSSL refuses it", str(raised.exception))
        odd = x25519.X25519PrivateKey.generate()
        cert = self.certs / "x25519.pem"
        from tests.support.certs import cert_pem

        cert.write_bytes(cert_pem(_self_signed(odd)))
        self.assertRaises(CertificateError, TLSServer, TLSConfig((CertificateFiles(cert, key),)))

    def test_reload_survives_anything(self):
        """An unexpected error in a reload is logged; the polling goes on and works later."""
        import popserv.server.tls

        def broken(files):
            raise RuntimeError("something unforeseen")

        self.patch(popserv.server.tls, "load_identity", broken)
        self.assertFalse(self.factory.tls.reload())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.patch(popserv.server.tls, "load_identity", load_identity)
        self.assertTrue(self.factory.tls.reload())

    async def test_valid_certificate_wins_a_shared_name(self):
        """An expired certificate listed first does not shadow a valid one for the same name."""
        expired = self.ca.issue("pop.test", "127.0.0.1", days=0)
        cert, key = expired.write(self.certs, "expired")
        config = self.factory.tls.config
        self.factory.tls.config = evolve(
            config, certificates=(CertificateFiles(cert, key), *config.certificates))
        self.assertTrue(self.factory.tls.reload())

        def served():
            with self.tls_socket(self.tls_portno) as s:
                return s.getpeercert(binary_form=True)

        der = self.server_cert.certificate.public_bytes(serialization.Encoding.DER)
        self.assertEqual(await self.run_in_thread(served), der)

    async def test_no_end_point_binding_on_resumed_sessions(self):
        """A resumed session may carry another certificate than SNI picks now: no such binding."""
        context = self.context()

        def connect(session=None):
            raw = socket.create_connection(("127.0.0.1", self.tls_portno), timeout=10)
            with context.wrap_socket(raw, server_hostname="pop.test", session=session) as s:
                s.recv(100)
                s.sendall(b"NOOP\r\n")
                s.recv(100)
                return s.session, s.session_reused, self.session_info().tls

        session, reused, tls = await self.run_in_thread(connect)
        self.assertFalse(reused)
        self.assertIn("tls-server-end-point", tls.channel_bindings)
        _, reused, tls = await self.run_in_thread(connect, session)
        self.assertTrue(reused)
        self.assertNotIn("tls-server-end-point", tls.channel_bindings)
        self.assertIn("tls-exporter", tls.channel_bindings)

    def test_sni_on_a_connection_made_before_a_reload(self):
        """A connection accepted just before a reload gets the new certificate for its name."""
        from cryptography import x509
        from OpenSSL import SSL

        tls = self.factory.tls
        server = tls.serverConnectionForTLS(None)  # on the old contexts
        renewed = self.ca.issue("pop.test", "other.test", "127.0.0.1")
        renewed.write(self.certs, "server")
        self.assertTrue(tls.reload())
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(str(self.cafile))
        client = SSL.Connection(context, None)
        client.set_tlsext_host_name(b"other.test")
        client.set_connect_state()
        server.set_accept_state()
        _handshake_in_memory(client, server)
        certificate = client.get_peer_certificate(as_cryptography=True)
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertIn("other.test", san.value.get_values_for_type(x509.DNSName))


def _handshake_in_memory(client, server) -> None:
    """Complete a TLS handshake between two memory-BIO pyOpenSSL connections."""
    from OpenSSL import SSL

    done = {client: False, server: False}
    for _ in range(50):
        for side, other in ((client, server), (server, client)):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except SSL.WantReadError:
                    pass
            try:
                other.bio_write(side.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")
