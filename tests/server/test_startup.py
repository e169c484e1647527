"""
Start-up errors of ``twistd popserv``: one line naming the problem, a
non-zero exit status, never a traceback, never a server left running with
nothing listening.
"""

from __future__ import annotations

import errno
import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv import makeService
from popserv._version import __version__
from popserv.server.firstrun import FirstAccount, announce
from popserv.server.helptext import HELP_GROUPS
from popserv.server.listeners import Listener, PopservService, cannot_listen
from popserv.server.service import admin_options, make_factory
from popserv.server.startchecks import AccessCheck
from popserv.server.startup import EXIT_CANNOT_LISTEN, EXIT_CONFIG, StartupError
from popserv.server.tap import Options
from popserv.stores.layout import Layout
from tests.support.processes import REPO, free_port, twistd_script

#: One line of an error: ``popserv: `` and no line break.
ONE_LINE = re.compile(r"popserv: [^\n]+\n")


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def quiet(test: SynchronousTestCase | TestCase) -> None:
    """Keep a first start's account message off the test output."""
    test.patch(sys, "stdout", io.StringIO())


class OptionErrorTests(SynchronousTestCase):
    """Bad options are usage errors that name the option and the value."""

    def usage_error(self, *argv: str) -> str:
        with self.assertRaises(UsageError) as raised:
            parse(*argv)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertNotIn("Parameter type enforcement", message)
        return message

    def test_value_names_the_option(self):
        """``--expire soon`` says which option and what it takes, not int()'s complaint."""
        self.assertEqual(
            self.usage_error("--expire", "soon"),
            "--expire 'soon': must be a number of days >= 0, or NEVER",
        )
        self.assertEqual(self.usage_error("--max-connections", "many"),
                         "--max-connections 'many': not a whole number")
        self.assertEqual(self.usage_error("--idle-timeout", "x"),
                         "--idle-timeout 'x': not a number")
        self.assertEqual(self.usage_error("--idle-timeout", "0"), "--idle-timeout '0': must be > 0")

    def test_unknown_endpoint_type(self):
        """A typo in an endpoint's type is found when parsing, not at start as a traceback."""
        message = self.usage_error("--pop3", "tpc:1110")
        self.assertEqual(message, "--pop3 'tpc:1110': Unknown endpoint type: 'tpc'")
        self.assertIn("--smtp 'tcp:", self.usage_error("--smtp", "tcp:port=x"))

    def test_impossible_port(self):
        self.assertEqual(
            self.usage_error("--pop3", "tcp:99999"),
            "--pop3 'tcp:99999': the port must be 0 to 65535",
        )
        self.assertIn("--lmtp", self.usage_error("--lmtp", "tcp6:70000"))

    def test_maildir_without_user(self):
        self.assertEqual(
            self.usage_error("--maildir", "/srv/mail"),
            "--maildir '/srv/mail': the maildir template must contain {user} (or {local})",
        )

    def test_systemd_endpoints_parse_outside_systemd(self):
        """systemd: endpoints are only checked at start, where systemd passes the sockets."""
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "LISTEN_FDS"})
        options = parse("--pop3", "systemd:domain=INET:index=0", "--data", self.mktemp())
        quiet(self)
        with self.assertRaises(StartupError) as raised:
            makeService(options)
        self.assertIn("--pop3 'systemd:domain=INET:index=0': systemd passed no such socket",
                      str(raised.exception))
        self.assertEqual(raised.exception.status, EXIT_CONFIG)
        # Checked before the first start creates anything.
        self.assertFalse(Path(options["data"]).exists())


class FileErrorTests(SynchronousTestCase):
    """Files named by options that cannot be used stop the start, in one line."""

    def test_missing_passwd_file(self):
        """--passwd naming no file: refused, rather than failing every login later."""
        missing = str(Path(self.mktemp()) / "passwd")
        options = parse("--passwd", missing, "--data", self.mktemp())
        with self.assertRaises(StartupError) as raised:
            make_factory(options, reactor)
        self.assertEqual(str(raised.exception), f"--passwd {missing}: no such file")
        self.assertEqual(raised.exception.status, EXIT_CONFIG)

    def test_data_directory_cannot_be_made(self):
        blocker = Path(self.mktemp())
        blocker.write_text("a file, not a directory")
        data = str(blocker / "data")
        quiet(self)
        with self.assertRaises(StartupError) as raised:
            makeService(parse("--data", data))
        self.assertRegex(str(raised.exception),
                         rf"^--data {re.escape(data)}: cannot create .*: not a directory$")

    def test_missing_passwd_is_not_a_permission_problem(self):
        """The start-up check says the password file is missing, not unreadable."""
        data = Path(self.mktemp())
        data.mkdir()
        problems = AccessCheck(Layout.create(data)).problems()
        self.assertEqual(len(problems), 1)
        self.assertTrue(
            problems[0].startswith(f"There is no password file {data.absolute()}/passwd"), problems)


class ListenErrorTests(TestCase):
    """A listener that cannot listen is a StartupError with status 75."""

    async def test_port_in_use(self):
        """The service raises one line; listeners already listening are closed again."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = free_port()
        quiet(self)
        service = makeService(parse("--data", self.mktemp(), "--hostname", "h",
                                    "--pop3", f"tcp:{free}:interface=127.0.0.1",
                                    "--pop3", f"tcp:{port}:interface=127.0.0.1"))
        self.assertIsInstance(service, PopservService)
        with self.assertRaises(StartupError) as raised:
            service.privilegedStartService()
        self.assertEqual(str(raised.exception),
                         f"cannot listen on 127.0.0.1:{port}: address already in use")
        self.assertEqual(raised.exception.status, EXIT_CANNOT_LISTEN)
        await service.closed
        with socket.socket() as client:
            self.assertNotEqual(client.connect_ex(("127.0.0.1", free)), 0)

    def test_late_failure_stops_with_the_status(self):
        """An endpoint whose listen() fails later: the line, then stop and exit 75."""
        from twisted.internet.defer import Deferred

        class Later:
            def __init__(self):
                self.waiting: Deferred[object] = Deferred()

            def listen(self, factory):
                return self.waiting

        class Reactor:
            stopped = False
            triggers: list = []

            def addSystemEventTrigger(self, phase, event, f, *args):
                self.triggers.append((phase, event, f))

            def stop(self):
                self.stopped = True

        class Twistd(dict):
            pass

        options = Options()
        options.parent = Twistd(pidfile="")
        fake = Reactor()
        service = PopservService(options, fake)
        endpoint = Later()
        Listener(endpoint, object(), "later:1").setServiceParent(service)
        exits: list[int] = []
        self.patch(service, "_exit", exits.append)
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        service.privilegedStartService()
        self.assertFalse(fake.stopped)
        endpoint.waiting.errback(RuntimeError("refused"))
        self.assertEqual(stderr.getvalue(), "popserv: cannot listen on later:1: refused\n")
        self.assertTrue(fake.stopped)
        [(phase, event, exit_now)] = fake.triggers
        self.assertEqual((phase, event), ("after", "shutdown"))
        exit_now()
        self.assertEqual(exits, [EXIT_CANNOT_LISTEN])
        self.flushLoggedErrors()

    def test_messages(self):
        def line(error: Exception, description: str = "d") -> str:
            return cannot_listen(description, Failure(error))

        in_use = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        self.assertEqual(line(CannotListenError("::1", 110, in_use)),
                         "cannot listen on [::1]:110: address already in use")
        self.assertEqual(line(CannotListenError("", 110, PermissionError(13, "Permission denied"))),
                         "cannot listen on 0.0.0.0:110: permission denied")
        self.assertEqual(line(CannotListenError(None, "/run/x.sock", in_use)),
                         "cannot listen on /run/x.sock: address already in use")
        self.assertEqual(line(RuntimeError("odd"), "weird:1"), "cannot listen on weird:1: odd")


class HelpTests(SynchronousTestCase):
    """``twistd popserv --help``: grouped, readable, the defaults as written in the docs."""

    def help(self) -> str:
        return Options().getUsage()

    def test_every_option_in_one_group(self):
        options = Options()
        names = {name.rstrip("=") for name in options.longOpt}
        grouped = [name for _, members in HELP_GROUPS for name in members]
        self.assertEqual(sorted(grouped), sorted(names))
        self.assertEqual(len(grouped), len(set(grouped)))

    def test_groups_in_order_newcomers_first(self):
        text = self.help()
        titles = [title for title, _ in HELP_GROUPS]
        self.assertEqual(titles[:3], ["Listening", "Data", "TLS"])
        positions = [text.index(f"\n{title}:\n") for title in titles]
        self.assertEqual(positions, sorted(positions))
        self.assertLess(text.index("--pop3 ENDPOINT"), text.index("--data DIR"))

    def test_no_runs_of_spaces_inside_sentences(self):
        for line in self.help().splitlines():
            self.assertNotRegex(line.strip(), r" {3,}", line)
            self.assertLessEqual(len(line), 79, line)

    def test_sizes_and_words(self):
        text = self.help()
        self.assertIn("Default: 25M.", text)
        self.assertNotIn("26214400", text)
        self.assertIn("Default: Mozilla intermediate.", text)
        self.assertNotIn("ECDHE", text)  # the cipher list itself
        self.assertIn("Default: 600.", text)  # not 600.0
        self.assertIn("SCRAM", text[text.index("--sasl"):text.index("--username-case")])

    def test_docs_have_the_same_groups(self):
        """docs/options.rst documents every option, in the same groups and order."""
        doc = (REPO / "docs" / "options.rst").read_text()
        titles = [title for title, _ in HELP_GROUPS if title != "Other"]
        positions = [doc.index(f"\n{title}\n{'-' * len(title)}\n") for title in titles]
        self.assertEqual(positions, sorted(positions))
        for index, (title, members) in enumerate(HELP_GROUPS[:-1]):
            start = positions[index]
            end = positions[index + 1] if index + 1 < len(positions) else len(doc)
            section = doc[start:end]
            for name in members:
                self.assertIn(f"--{name}", section, f"--{name} not under {title}")

    def test_version(self):
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as raised:
            parse("--version")
        self.assertEqual(raised.exception.code, 0)
        self.assertTrue(out.getvalue().startswith(f"popserv {__version__} (Twisted "))


class FirstStartMessageTests(SynchronousTestCase):
    def test_admin_command_has_the_data_directory(self):
        """The banner's command finds the user: --data when it is not the default."""
        self.assertEqual(admin_options({"data": "popserv-data"}), [])
        self.assertEqual(
            admin_options({"data": "/srv/pop", "username-case": "keep"}),
            ["--data", "/srv/pop", "--username-case", "keep"],
        )
        out = io.StringIO()
        announce(FirstAccount("alice", "pw"), "tcp:1110", "popserv --data '/srv/my pop'", out)
        self.assertIn("Change the password with: popserv --data '/srv/my pop' user passwd alice\n",
                      out.getvalue())


class TwistdTests(SynchronousTestCase):
    """Real ``twistd popserv`` processes, as an operator or systemd starts them."""

    def setUp(self):
        self.twistd = twistd_script()
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()

    def run_twistd(self, *argv: str, twistd: tuple[str, ...] = ("-n", "--pidfile", "")):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("LISTEN_FDS", None)
        return subprocess.run([self.twistd, *twistd, "popserv", *argv], capture_output=True,
                              text=True, env=env, cwd=self.dir, timeout=60, check=False)

    def assert_one_line(self, done, status: int, *words: str, usage: bool = False) -> str:
        """Exit ``status``; stderr: (the usage line and) one ``popserv:`` line with ``words``."""
        self.assertEqual(done.returncode, status, done.stderr + done.stdout)
        self.assertNotIn("Traceback", done.stdout + done.stderr)
        lines = done.stderr.splitlines(keepends=True)
        if usage:
            self.assertTrue(lines[0].startswith("Usage: twistd [options] popserv [options]"))
            lines = lines[1:]
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertRegex(lines[0], ONE_LINE)
        for word in words:
            self.assertIn(word, lines[0])
        return lines[0]

    def test_port_in_use(self):
        """Exit 75, one line; nothing left running."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = self.run_twistd("--pop3", f"tcp:{port}:interface=127.0.0.1", "--hostname", "h")
        line = self.assert_one_line(done, EXIT_CANNOT_LISTEN)
        self.assertEqual(
            line, f"popserv: cannot listen on 127.0.0.1:{port}: address already in use\n")
        # The log has it too (twistd -n logs to stdout).
        self.assertIn("cannot listen on", done.stdout)

    def test_port_in_use_daemon(self):
        """A daemonizing twistd's parent reports the line and fails; the PID file is gone."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pidfile = self.dir / "twistd.pid"
        done = self.run_twistd("--pop3", f"tcp:{port}:interface=127.0.0.1", "--hostname", "h",
                               twistd=("--pidfile", str(pidfile), "--logfile", "log"))
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(f"popserv: cannot listen on 127.0.0.1:{port}: address already in use",
                      done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        self.assertFalse(pidfile.exists())
        log = (self.dir / "log").read_text()
        self.assertIn("cannot listen on", log)
        self.assertNotIn("Traceback", log)

    def test_missing_passwd_file(self):
        done = self.run_twistd("--passwd", "/nonexistent/passwd", "--pop3", "tcp:0")
        line = self.assert_one_line(done, EXIT_CONFIG, "--passwd /nonexistent/passwd")
        self.assertEqual(line, "popserv: --passwd /nonexistent/passwd: no such file\n")
        self.assertEqual(done.stdout, "")

    def test_usage_errors(self):
        """Each bad option: the usage line and one line naming it; not the whole help."""
        cases = [
            (["--pop3", "tpc:1110"], "--pop3 'tpc:1110'"),
            (["--pop3", "tcp:99999"], "--pop3 'tcp:99999'"),
            (["--expire", "soon"], "--expire 'soon'"),
            (["--maildir", "/srv/mail"], "--maildir '/srv/mail'"),
            (["--tls-key", "key.pem"], "--tls-key"),
            (["--no-such-option"], "--no-such-option"),
        ]
        for argv, named in cases:
            done = self.run_twistd(*argv)
            self.assert_one_line(done, EXIT_CONFIG, named, usage=True)
            self.assertEqual(done.stdout, "", argv)
        self.assertEqual(list(self.dir.iterdir()), [])  # no first start happened

    def test_data_directory_unusable(self):
        (self.dir / "file").write_text("")
        done = self.run_twistd("--data", "file/data", "--pop3", "tcp:0")
        self.assert_one_line(done, EXIT_CONFIG, "--data file/data", "not a directory")

    def test_help_and_version(self):
        done = self.run_twistd("--help")
        self.assertEqual(done.returncode, 0)
        self.assertIn("\nListening:\n  --pop3 ENDPOINT\n", done.stdout)
        self.assertIn("Default: 25M.", done.stdout)
        done = self.run_twistd("--version")
        self.assertEqual((done.returncode, done.stdout), (0, f"popserv {__version__} "
                                                            f"(Twisted {_twisted_version()})\n"))


def _twisted_version() -> str:
    import twisted

    return twisted.__version__


def literal_block(text: str, marker: str) -> str:
    """The reStructuredText literal block after ``marker``, unindented."""
    after = text.split(marker + "\n\n", 1)[1]
    lines = []
    for line in after.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


class DocumentedExamplesTests(SynchronousTestCase):
    def test_tac_example_runs(self):
        """The .tac in docs/embedding.rst is complete: it builds the service as written."""
        from twisted.application.service import IServiceCollection

        doc = (REPO / "docs" / "embedding.rst").read_text()
        code = literal_block(doc, "``.venv/bin/twistd -ny popserv.tac``)::")
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir()
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(workdir)
        quiet(self)
        namespace: dict[str, object] = {}
        exec(compile(code, "popserv.tac", "exec"), namespace)
        services = list(IServiceCollection(namespace["application"]))
        self.assertEqual([type(s).__name__ for s in services], ["PopservService"])
        self.assertTrue((workdir / "popserv-data" / "passwd").exists())

    def test_tls_example_files_are_ignored(self):
        """docs/tls.rst writes cert.pem and key.pem into the checkout: .gitignore covers them."""
        ignored = (REPO / ".gitignore").read_text().splitlines()
        self.assertIn("/cert.pem", ignored)
        self.assertIn("/key.pem", ignored)
        self.assertIn("-keyout key.pem -out cert.pem", (REPO / "docs" / "tls.rst").read_text())
