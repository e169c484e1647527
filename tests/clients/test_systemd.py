"""
The systemd units in contrib/systemd: their sockets, and their ExecStart run
as written (only the install paths swapped for the test's) under
systemd-socket-activate, which passes listening sockets the way systemd does.
"""

from __future__ import annotations

import os
import poplib
import shlex
import shutil
import ssl
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from popserv.logins.passwords import PasswdFile, hash_password
from popserv.stores.layout import Layout, ensure_maildir
from popserv.stores.maildir import deliver
from tests.support.certs import CA
from tests.support.processes import REPO, _Twistd, free_port, stop_at_cleanup, twistd_script

UNITS = REPO / "contrib" / "systemd"


def unit(name: str) -> dict[str, list[str]]:
    """A unit file's settings as ``{"Section.Key": [values...]}``, continuation lines joined."""
    settings: dict[str, list[str]] = {}
    section = ""
    text = (UNITS / name).read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def exec_start() -> list[str]:
    (command,) = unit("popserv.service")["Service.ExecStart"]
    return shlex.split(command)


def substitute(argv: list[str], **paths: str) -> list[str]:
    """``argv`` with each ``--option value`` named in ``paths`` given the new value."""
    out = list(argv)
    for option, value in paths.items():
        flag = "--" + option.replace("_", "-")
        out[out.index(flag) + 1] = value
    return out


class UnitTests(SynchronousTestCase):
    def test_socket_order_is_the_service_indexes(self):
        """110 is index 0 (--pop3), 995 index 1 (--pop3s), both dual-stack IPv6 sockets."""
        socket_unit = unit("popserv.socket")
        self.assertEqual(socket_unit["Socket.ListenStream"], ["[::]:110", "[::]:995"])
        self.assertEqual(socket_unit["Socket.BindIPv6Only"], ["both"])
        argv = exec_start()
        self.assertEqual(argv[argv.index("--pop3") + 1], "systemd:domain=INET6:index=0")
        self.assertEqual(argv[argv.index("--pop3s") + 1], "systemd:domain=INET6:index=1")

    def test_service_runs_unprivileged(self):
        service = unit("popserv.service")
        self.assertEqual(service["Service.User"], ["popserv"])
        self.assertEqual(service["Unit.Requires"], ["popserv.socket"])
        self.assertEqual(service["Service.StateDirectory"], ["popserv"])
        argv = exec_start()
        self.assertNotIn("--uid", argv)
        self.assertEqual(argv[argv.index("--data") + 1], "/var/lib/popserv")

    def test_exec_start_parses(self):
        """The command line is one twistd accepts, with popserv options it knows."""
        argv = exec_start()
        self.assertEqual(argv[0], "/usr/bin/twistd")
        cert, key = CA().issue("pop.example.org").write(Path(self.mktemp()), "server")
        argv = substitute(argv, data=self.mktemp(), tls_cert=str(cert), tls_key=str(key))
        options = ServerOptions()
        options.parseOptions(argv[1:])
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options["pidfile"], "")
        self.assertEqual(options.subCommand, "popserv")
        self.assertEqual(options.subOptions["pop3s"], ["systemd:domain=INET6:index=1"])


class SocketActivationTests(TestCase):
    """ExecStart under systemd-socket-activate on [::1], high ports."""

    def setUp(self):
        self.activate = shutil.which("systemd-socket-activate")
        if self.activate is None:
            raise SkipTest("systemd-socket-activate is not installed")
        self.twistd = twistd_script()
        base = Path(self.mktemp()).absolute()
        self.ca = CA()
        self.cafile = self.ca.write(base / "ca.pem")
        self.cert, self.key = self.ca.issue("pop.example.org").write(base, "server")
        self.layout = Layout.create(base / "data")
        PasswdFile(self.layout.passwd_path).add("alice", hash_password("secret"))
        deliver(ensure_maildir(self.layout.maildir_for("alice")), b"Subject: hi\n\nactivated\n")

    async def test_both_sockets_serve(self):
        await self.both_sockets_serve()

    async def test_both_sockets_serve_with_workers(self):
        """--workers 2: the parent passes systemd's sockets on to its workers."""
        process = await self.both_sockets_serve("--workers", "2")
        self.assertIn(b"[worker ", process.output)

    async def both_sockets_serve(self, *extra: str) -> _Twistd:
        plain, secure = free_port(), free_port()
        argv = substitute(exec_start(), data=str(self.layout.data_dir),
                          tls_cert=str(self.cert), tls_key=str(self.key))
        argv += extra
        argv[0] = self.twistd
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        # systemd names every socket (by default after its unit), and Twisted
        # adopts none unless each has a name; systemd-socket-activate only
        # names them when told.
        command = [self.activate, "-l", f"[::1]:{plain}", "-l", f"[::1]:{secure}",
                   "--fdname=popserv.socket:popserv.socket",
                   "-E", f"PYTHONPATH={pythonpath}", "-E", "PATH", *argv]
        process = _Twistd()
        transport = reactor.spawnProcess(process, command[0], command, dict(os.environ))

        stop_at_cleanup(self, process, transport)

        def fetch():
            c = poplib.POP3("::1", plain, timeout=30)  # starts the server
            c.user("alice")
            c.pass_("secret")
            over_plain = c.retr(1)[1]
            c.quit()
            context = ssl.create_default_context(cafile=str(self.cafile))
            context.check_hostname = False
            c = poplib.POP3_SSL("::1", secure, context=context, timeout=30)
            c.user("alice")
            c.pass_("secret")
            over_tls = c.retr(1)[1]
            c.quit()
            return over_plain, over_tls

        await process.wait_for(f"[::1]:{secure}".encode())  # both sockets bound
        over_plain, over_tls = await deferToThread(fetch)
        self.assertEqual(over_plain, [b"Subject: hi", b"", b"activated"])
        self.assertEqual(over_tls, over_plain)
        self.assertNotIn(b"Traceback", process.output)
        return process
