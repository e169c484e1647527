"""
``popserv check``: the twistd options checked without starting, one line
per finding and a non-zero status on any error.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from popserv.logins.passwords import PasswdFile, hash_password
from popserv.server import cli
from popserv.server.startup import EXIT_CONFIG
from popserv.stores.layout import Layout
from tests.support.certs import CA
from tests.support.processes import free_port


def run_check(*argv: str) -> tuple[int, list[str]]:
    """``popserv check ARGV``: the exit status and the lines printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(["check", *argv])
    return status, out.getvalue().splitlines()


class CheckTests(SynchronousTestCase):
    def setUp(self):
        self.base = Path(self.mktemp())
        self.layout = Layout.create(self.base / "data")
        self.layout.data_dir.mkdir(parents=True, mode=0o700)
        self.passwd = self.layout.passwd_path
        PasswdFile(self.passwd).add("alice", hash_password("secret", "PLAIN"))
        os.chmod(self.passwd, 0o600)
        self.ca = CA()
        self.cert, self.key = self.ca.issue("pop.test", days=90).write(self.base / "tls", "pop")
        self.port = free_port()

    def argv(self, *more: str) -> list[str]:
        return [
            "--data", str(self.layout.data_dir),
            "--pop3", f"tcp:{self.port}:interface=127.0.0.1",
            "--tls-cert", str(self.cert), "--tls-key", str(self.key),
            *more,
        ]

    def check(self, *argv: str) -> tuple[int, list[str]]:
        return run_check(*argv)

    def assertError(self, argv: list[str], *fragments: str) -> list[str]:
        status, lines = self.check(*argv)
        self.assertEqual(status, EXIT_CONFIG, "\n".join(lines))
        errors = [line for line in lines if line.startswith("error: ")]
        for fragment in fragments:
            self.assertTrue(any(fragment in line for line in errors), "\n".join(lines))
        return lines

    def test_good(self):
        """A good configuration: only ok lines (and warnings), status 0."""
        status, lines = self.check(*self.argv())
        self.assertEqual(status, 0, "\n".join(lines))
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, r"^(ok|warning): ")
        text = "\n".join(lines)
        self.assertIn(f"ok: --pop3 tcp:{self.port}:interface=127.0.0.1: can be bound", text)
        self.assertIn(f"ok: certificate {self.cert} (pop.test): key matches, valid until", text)
        self.assertIn(f"ok: password file {self.passwd}: 1 users", text)

    def test_port_in_use(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", self.port))
            busy.listen(1)
            self.assertError(
                self.argv(), f"cannot listen on 127.0.0.1:{self.port}: address already in use"
            )

    def test_systemd_only_syntax(self):
        """systemd sockets exist only under systemd: their syntax is checked, nothing bound."""
        status, lines = self.check(*self.argv("--pop3s", "systemd:domain=INET:index=0"))
        self.assertEqual(status, 0, "\n".join(lines))
        expected = "ok: --pop3s systemd:domain=INET:index=0: a systemd socket"
        self.assertIn(f"{expected} (only its syntax is checked)", lines)

    def test_bad_endpoint(self):
        self.assertError(self.argv("--pop3", "tpc:110"), "--pop3 'tpc:110'")

    def test_expired_certificate(self):
        cert, key = self.ca.issue("old.test", days=-1).write(self.base / "tls", "old")
        argv = self.argv()
        argv[argv.index(str(self.cert))] = str(cert)
        argv[argv.index(str(self.key))] = str(key)
        self.assertError(argv, f"certificate {cert} (old.test) expired on")

    def test_certificate_expiring_soon(self):
        """Under 30 days: a warning, not an error."""
        cert, key = self.ca.issue("soon.test", days=10).write(self.base / "tls", "soon")
        argv = self.argv()
        argv[argv.index(str(self.cert))] = str(cert)
        argv[argv.index(str(self.key))] = str(key)
        status, lines = self.check(*argv)
        self.assertEqual(status, 0, "\n".join(lines))
        warning = f"warning: certificate {cert} (soon.test) expires in"
        self.assertTrue(any(line.startswith(warning) for line in lines), lines)

    def test_key_not_matching(self):
        _, other_key = self.ca.issue("other.test").write(self.base / "tls", "other")
        argv = self.argv()
        argv[argv.index(str(self.key))] = str(other_key)
        lines = self.assertError(argv, f"{other_key}: the key does not belong to {self.cert}")
        # Said once, though both the options and the certificate check find it.
        self.assertEqual(sum("does not belong" in line for line in lines), 1)

    def test_bad_passwd_line(self):
        """A malformed line is named by its number, never shown (it may hold a password)."""
        with open(self.passwd, "a") as f:
            f.write("not a valid line with secret-stuff\n")
        lines = self.assertError(self.argv(), f"{self.passwd}: line 2 is malformed")
        self.assertNotIn("secret-stuff", "\n".join(lines))

    def test_world_readable_passwd(self):
        os.chmod(self.passwd, 0o644)
        self.assertError(self.argv(), f"the password file {self.passwd} is readable by every user")

    def test_missing_passwd(self):
        """--passwd names a file that must exist."""
        self.assertError(
            self.argv("--passwd", str(self.base / "nope")),
            f"--passwd {self.base / 'nope'}: no such file",
        )

    def test_template_without_user(self):
        self.assertError(
            self.argv("--maildir", str(self.base / "mail")), "must contain {user}"
        )

    def test_data_directory_open_to_all(self):
        os.chmod(self.layout.data_dir, 0o755)
        status, lines = self.check(*self.argv())
        self.assertEqual(status, 0, "\n".join(lines))
        self.assertIn(
            f"warning: the data directory {self.layout.data_dir} is open to every user"
            " (mode 0755): chmod 0700",
            lines,
        )

    def test_free_space(self):
        _, lines = self.check(*self.argv())
        self.assertTrue(any("of its file system free" in line for line in lines), lines)

    def test_unknown_option(self):
        """An option twistd popserv does not have: a usage error."""
        status, lines = self.check("--no-such-option")
        self.assertEqual(status, 64)
        self.assertTrue(lines[0].startswith("error: "), lines)

    def test_paths_before_check(self):
        """popserv --data DIR check: the admin command's place for --data works too."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = cli.main(
                ["--data", str(self.layout.data_dir), "check",
                 "--pop3", f"tcp:{self.port}:interface=127.0.0.1"]
            )
        self.assertEqual(status, 0, out.getvalue())
        self.assertIn(f"ok: password file {self.passwd}: 1 users", out.getvalue())

    def test_autoconfig(self):
        """``--autoconfig``: what it would tell clients."""
        status, lines = run_check(
            *self.argv("--autoconfig", f"tcp:{free_port()}:interface=127.0.0.1",
                       "--submission", "smtp.pop.test:465")
        )  # fmt: skip
        self.assertEqual(status, 0, lines)
        self.assertIn(f"tells clients pop.test {self.port} (STLS)", "\n".join(lines))

    def test_autoconfig_without_submission(self):
        """``--autoconfig`` that would not start: the reason, as an error."""
        status, lines = run_check(*self.argv("--autoconfig", "tcp:8080"))
        self.assertEqual(status, EXIT_CONFIG)
        self.assertIn("error: --autoconfig needs --submission", "\n".join(lines))

