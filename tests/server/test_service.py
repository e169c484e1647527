"""
What README.rst and docs/ promise: the twistd plugin and its options, the first start
as a newcomer sees it, makeService, and the embedding example.
"""

from __future__ import annotations

import importlib.metadata
import os
import poplib
import re
import shutil
import signal
import sys
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

import popserv
import popserv.server.service
from popserv import MemoryMaildrop, MemoryRealm, Policy, POP3Factory, makeService
from popserv.server.configure import DEFAULT_POP3_ENDPOINT
from popserv.server.firstrun import _port_of
from popserv.server.service import LIMIT_OPTIONS, make_factory
from popserv.server.startchecks import ensure_fd_limit
from popserv.server.tap import Options
from tests.support.peers import missing
from tests.support.processes import REPO, _Twistd, free_port, twistd_script


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        """No options: loopback port 1110, ./popserv-data, APOP auto, EXPIRE NEVER."""
        options = self.parse()
        self.assertEqual(options["pop3"], [DEFAULT_POP3_ENDPOINT])
        self.assertEqual(DEFAULT_POP3_ENDPOINT, "tcp:1110:interface=127.0.0.1")
        self.assertEqual(options["data"], "popserv-data")
        self.assertIsNone(options["apop"])
        self.assertIsNone(options["expire"])
        self.assertEqual(options["idle-timeout"], 600.0)

    def test_values(self):
        options = self.parse(
            "--pop3", "tcp:110", "--pop3", "tcp6:110", "--apop", "no", "--expire", "30",
            "--login-delay", "900", "--idle-timeout", "900", "--max-auth-failures", "5",
        )
        self.assertEqual(options["pop3"], ["tcp:110", "tcp6:110"])
        self.assertIs(options["apop"], False)
        self.assertEqual((options["expire"], options["login-delay"]), (30, 900))
        self.assertEqual((options["idle-timeout"], options["max-auth-failures"]), (900.0, 5))
        self.assertIs(self.parse("--apop", "YES")["apop"], True)
        self.assertEqual(self.parse("--sasl", "plain, cram-md5")["sasl"], ("PLAIN", "CRAM-MD5"))
        self.assertIsNone(self.parse("--sasl", "auto")["sasl"])
        self.assertIsNone(self.parse("--expire", "never")["expire"])
        self.assertEqual(self.parse()["max-listed"], 0)
        self.assertEqual(self.parse("--max-listed", "250")["max-listed"], 250)

    def test_bad_values(self):
        """Bad values stop twistd with a usage error, not a traceback."""
        for argv in (["--apop", "maybe"], ["--expire", "-1"], ["--login-delay", "soon"],
                     ["--sasl", "PLAIN,GSSAPI"],
                     ["--idle-timeout", "0"], ["--max-auth-failures", "0"],
                     ["--login-timeout", "0"], ["--max-connections", "0"],
                     ["--max-connections-per-ip", "-1"], ["--max-user-sessions", "x"],
                     ["--ipv6-prefix", "0"], ["--ipv6-prefix", "129"],
                     ["--max-line-length", "254"], ["--max-auth-line-length", "100"],
                     ["--max-queued-commands", "0"], ["--trusted-network", "webmail"],
                     ["--max-bad-commands", "0"],
                     ["--max-listed", "-1"], ["--max-listed", "lots"],
                     ["--auth-failure-delay", "20"],
                     ["--uidl-format", "%m"], ["--uidl-format", "plain"],
                     ["--shutdown-grace", "-1"], ["--shutdown-grace", "nan"],
                     ["--shutdown-grace", "3601"],
                     # nan compares false with everything; inf is no timer.
                     ["--idle-timeout", "nan"], ["--idle-timeout", "inf"],
                     ["--login-timeout", "nan"], ["--auth-failure-delay", "nan"],
                     ["--auth-failure-max-delay", "inf"], ["--tls-reload-interval", "nan"]):
            self.assertRaises(UsageError, self.parse, *argv)

    def test_uidl_format(self):
        """--uidl-format: dovecot by default, maildir, or a Dovecot format, on to the realm."""
        self.assertEqual(self.parse()["uidl-format"], "dovecot")
        for value in ("maildir", "%v.%u", "%08Xu%08Xv", "dovecot"):
            scheme = self.parse("--uidl-format", value)["uidl-format"]
            self.assertEqual(scheme.text, value)
            data = self.mktemp()
            os.makedirs(data)
            Path(data, "passwd").write_text("")
            factory = popserv.server.service.make_factory(
                {"data": data, "passwd": str(Path(data, "passwd")), "uidl-format": scheme},
                reactor,
            )
            self.assertIs(factory.portal.realm.uidl_format, scheme)

    def test_limit_defaults(self):
        """Each limit's option defaults to the Policy's own value."""
        options = self.parse()
        policy = Policy(hostname="h")
        for option, field in LIMIT_OPTIONS.items():
            self.assertEqual(options[option], getattr(policy, field) if field != "trusted_networks"
                             else [], option)
        self.assertEqual((policy.login_timeout, policy.max_connections,
                          policy.max_connections_per_ip, policy.max_user_sessions,
                          policy.ipv6_prefix, policy.auth_failure_max_delay),
                         (60.0, 1000, 20, 10, 64, 15.0))
        self.assertEqual(policy.trusted_networks, ())

    def test_limits_reach_the_policy(self):
        passwd = Path(self.mktemp())
        passwd.write_text("")
        options = self.parse(
            "--data", self.mktemp(), "--passwd", str(passwd), "--hostname", "h",
            "--login-timeout", "30", "--auth-failure-delay", "1", "--auth-failure-max-delay",
            "10", "--max-connections", "500", "--max-connections-per-ip", "5",
            "--ipv6-prefix", "56", "--max-user-sessions", "2", "--max-line-length", "512",
            "--max-auth-line-length", "16384", "--max-queued-commands", "8",
            "--max-bad-commands", "3",
            "--trusted-network", "10.0.0.1/8", "--trusted-network", "2001:db8::/32",
        )
        policy = make_factory(options, reactor).policy
        self.assertEqual(
            (policy.login_timeout, policy.auth_failure_delay, policy.auth_failure_max_delay,
             policy.max_connections, policy.max_connections_per_ip, policy.ipv6_prefix,
             policy.max_user_sessions, policy.max_line_length, policy.max_auth_line_length,
             policy.max_queued_commands, policy.max_bad_commands),
            (30, 1, 10, 500, 5, 56, 2, 512, 16384, 8, 3))
        self.assertEqual([str(n) for n in policy.trusted_networks], ["10.0.0.0/8", "2001:db8::/32"])


class _Resource:
    """A stand-in for the resource module."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard, refuse=False):
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


class FileLimitTests(SynchronousTestCase):
    def test_raised_to_what_the_connections_need(self):
        resource = _Resource(1024, 65536)
        self.assertEqual(ensure_fd_limit(1000, resource), 3064)
        self.assertEqual(resource.limits, (3064, 65536))

    def test_enough_already(self):
        resource = _Resource(100_000, 100_000, refuse=True)
        self.assertEqual(ensure_fd_limit(1000, resource), 100_000)

    def test_hard_limit_too_low_warns(self):
        resource = _Resource(1024, 2048)
        with capturedLogs() as events:
            self.assertEqual(ensure_fd_limit(1000, resource), 2048)
        (warning,) = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("Open-file limit 2048 is too low for --max-connections 1000", warning)


class PluginTests(SynchronousTestCase):
    def test_plugin_found(self):
        """``twistd popserv`` exists: the plugin names popserv.server.service."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("popserv", makers)
        self.assertEqual(makers["popserv"].module, "popserv.server.service")

    def test_plugin_installed(self):
        """A regular ``pip install .`` ships twisted/plugins/popserv_plugin.py."""
        files = importlib.metadata.files("popserv") or []
        names = {str(f).replace(os.sep, "/") for f in files}
        if "popserv/__init__.py" not in names:
            raise SkipTest("popserv is installed in editable mode")
        self.assertIn("twisted/plugins/popserv_plugin.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)

    def test_port_in_first_start_message(self):
        self.assertEqual(_port_of("tcp:1110:interface=127.0.0.1"), "1110")
        self.assertEqual(_port_of("tcp6:port=2110"), "2110")
        self.assertIsNone(_port_of("systemd:domain=INET:index=0"))


class MakeServiceTests(TestCase):
    def test_one_listener_per_endpoint(self):
        """Each --pop3 endpoint becomes a listening service sharing one factory."""
        data = self.mktemp()
        options = Options()
        options.parseOptions(["--data", data, "--pop3", "tcp:0:interface=127.0.0.1",
                              "--pop3", "tcp:0:interface=127.0.0.1", "--hostname", "h"])
        self.patch(sys, "stdout", open(os.devnull, "w"))  # the first-start message
        self.addCleanup(sys.stdout.close)
        service = makeService(options)
        listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 2)
        self.assertIs(listeners[0].factory, listeners[1].factory)
        self.assertTrue((Path(data) / "passwd").exists())

    def test_receivers(self):
        """--smtp and --lmtp add listeners with their own factories; both are off by default."""
        data = self.mktemp()
        options = Options()
        options.parseOptions(
            ["--data", data, "--hostname", "h", "--smtp", "tcp:0:interface=127.0.0.1",
             "--lmtp", "unix:" + self.mktemp(), "--domain", "example.org",
             "--max-message-size", "10M", "--quota-bytes", "1G"]
        )  # fmt: skip
        self.patch(sys, "stdout", open(os.devnull, "w"))
        self.addCleanup(sys.stdout.close)
        listeners = [s for s in makeService(options) if isinstance(s, StreamServerEndpointService)]
        _pop3, smtp, lmtp = (s.factory for s in listeners)
        self.assertFalse(smtp.lmtp)
        self.assertTrue(lmtp.lmtp)
        self.assertEqual(smtp.settings.max_message_size, 10 * 1024**2)
        self.assertEqual(smtp.directory.domains, {"example.org"})
        self.assertEqual(smtp.directory.quota.bytes, 1024**3)
        self.assertRaises(UsageError, Options().parseOptions, ["--max-message-size", "0"])


class ShutdownGraceTests(TestCase):
    def service(self, *argv: str):
        options = Options()
        options.parseOptions(["--data", self.mktemp(), "--hostname", "h", *argv])
        self.patch(sys, "stdout", open(os.devnull, "w"))  # the first-start message
        self.addCleanup(sys.stdout.close)
        return makeService(options)

    def test_default_and_value(self):
        """--shutdown-grace: 10 s by default; 0 closes every session when the stop begins."""
        self.assertEqual(Options()["shutdown-grace"], 10.0)
        self.assertEqual(self.service().grace, 10.0)
        self.assertEqual(self.service("--shutdown-grace", "0").grace, 0.0)

    def test_what_drains(self):
        """The top service stops its POP3 and SMTP listeners first, then drains both factories."""
        service = self.service("--shutdown-grace", "2.5",
                               "--pop3", "tcp:0:interface=127.0.0.1",
                               "--smtp", "tcp:0:interface=127.0.0.1")
        self.assertEqual(service.grace, 2.5)
        listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(service.accepting, listeners)
        self.assertEqual(service.drained, [s.factory for s in listeners])


class TLSServiceTests(TestCase):
    def service(self, *argv: str):
        data = self.mktemp()
        options = Options()
        options.parseOptions(["--data", data, "--hostname", "h", *argv])
        self.patch(sys, "stdout", open(os.devnull, "w"))  # the first-start message
        self.addCleanup(sys.stdout.close)
        return makeService(options)

    def test_pop3s_listener_and_reloader(self):
        """--pop3s alone: only a TLS listener (no default plain one), and a certificate reloader."""
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from popserv.server.certreload import CertificateReloader
        from tests.support.certs import CA

        cert, key = CA().issue("pop.test").write(Path(self.mktemp()), "server")
        service = self.service("--tls-cert", str(cert), "--tls-key", str(key),
                               "--pop3s", "tcp:0:interface=127.0.0.1")
        listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 1)
        self.assertIsInstance(listeners[0].factory, TLSMemoryBIOFactory)
        self.assertEqual(len([s for s in service if isinstance(s, CertificateReloader)]), 1)

    def test_warning_when_remote_clients_cannot_log_in(self):
        """Listening beyond loopback with neither TLS nor cleartext allowed is worth a warning."""
        with capturedLogs() as events:
            self.service("--pop3", "tcp:0")
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("cannot log in", warnings[0])
        with capturedLogs() as events:
            self.service("--pop3", "tcp:0:interface=127.0.0.1")
            self.service("--pop3", "tcp:0", "--allow-cleartext-auth")
        self.assertFalse([e for e in events if e["log_level"] == LogLevel.warn])


class EmbeddingTests(TestCase):
    async def test_readme_example(self):
        """The embedding example (docs/embedding.rst) serves its in-memory message to poplib."""
        maildrop = MemoryMaildrop([b"Subject: hello\n\nfirst message\n"])
        realm = MemoryRealm({"alice": maildrop})
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        factory = POP3Factory(Portal(realm, [checker]), Policy(hostname="pop.example.org"))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def fetch():
            client = poplib.POP3("127.0.0.1", port.getHost().port, timeout=10)
            client.user("alice")
            client.pass_("secret")
            lines = client.retr(1)[1]
            client.dele(1)
            client.quit()
            return lines

        lines = await deferToThread(fetch)
        self.assertEqual(lines, [b"Subject: hello", b"", b"first message"])
        self.assertEqual(maildrop.contents(), [])


class FirstStartTests(TestCase):
    """``twistd -n popserv`` in a fresh directory, then the curl command it prints."""

    def setUp(self):
        self.twistd = twistd_script()
        self.workdir = Path(self.mktemp())
        self.workdir.mkdir()

    def start(self) -> _Twistd:
        self.port = free_port()
        process = _Twistd()
        env = dict(os.environ)
        # An editable install hides twisted/plugins from twistd; the checkout has it.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        argv = [self.twistd, "-n", "--pidfile", "", "popserv",
                "--pop3", f"tcp:{self.port}:interface=127.0.0.1", "--hostname", "pop.test"]
        transport = reactor.spawnProcess(process, self.twistd, argv, env, str(self.workdir))

        async def stop():
            if transport.pid is not None:
                transport.signalProcess(signal.SIGTERM)
            self.assertEqual(await process.ended, 0, process.output)

        self.stop = stop
        self.addCleanup(lambda: Deferred.fromCoroutine(stop()) if not process.ended.called
                        else None)
        return process

    async def test_first_start_then_curl(self):
        if shutil.which("curl") is None:
            raise missing("curl is not installed")
        process = self.start()
        await process.wait_for(b"Starting factory")
        match = re.search(rb"\n    (curl pop3://\S+ -u '([^']+)')\n", process.output)
        self.assertIsNotNone(match, process.output)
        self.assertIn(b"shown only once", process.output)
        self.assertIn(b"127.0.0.1:%d/1" % self.port, match.group(1))
        user, password = match.group(2).decode().split(":", 1)
        self.assertGreaterEqual(len(password), 16)
        stored = (self.workdir / "popserv-data" / "passwd").read_text()
        self.assertTrue(stored.startswith(f"{user}:{{ARGON2ID}}"))
        self.assertNotIn(password, stored)

        # The exact command a newcomer copies from the terminal.
        out, err, code = await getProcessOutputAndValue(
            shutil.which("curl"),
            ["-sS", "--max-time", "20", f"pop3://127.0.0.1:{self.port}/1", "-u",
             f"{user}:{password}"], env=os.environ)
        self.assertEqual(code, 0, err)
        self.assertIn(b"Subject: Welcome to popserv\r\n", out)
        self.assertIn(f"Hello {user},".encode(), out)
        await self.stop()

        # A second start finds the password file: no new account, nothing printed.
        process = self.start()
        await process.wait_for(b"Starting factory")
        self.assertNotIn(b"password:", process.output)
        self.assertEqual((self.workdir / "popserv-data" / "passwd").read_text(), stored)
        await self.stop()
