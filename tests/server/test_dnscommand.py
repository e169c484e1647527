"""
``popserv dns DOMAIN [twistd popserv options]``: the zone-file lines for
the options given, through the ``popserv`` command as an operator runs it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from popserv.server import cli
from popserv.server.startup import EXIT_CONFIG
from popserv.stores.delivery import EX_USAGE
from tests.support.certs import CA


def run_dns(*argv: str) -> tuple[int, list[str], str]:
    """``popserv ARGV``: the exit status, the lines printed, and what went to stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue().splitlines(), err.getvalue()


def records(lines: list[str]) -> list[str]:
    """The records among ``lines``, one space between fields (comments left out)."""
    return [" ".join(line.split()) for line in lines if line and not line.startswith(";")]


class DnsTests(SynchronousTestCase):
    def setUp(self):
        self.base = Path(self.mktemp())
        self.data = str(self.base / "data")
        self.cert, self.key = CA().issue("mail.example.org").write(self.base / "tls", "mail")

    def tls(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]

    def test_full(self):
        """POP3S preferred to POP3, IMAP not offered, submission, the MX."""
        status, lines, _ = run_dns(
            "dns", "Example.org", "--data", self.data,
            "--hostname", "mail.example.org",
            "--pop3", "tcp:110", "--pop3s", "tcp:995", *self.tls(),
            "--smtp", "tcp:25", "--domain", "example.org",
            "--submission", "smtp.example.org:465",
        )  # fmt: skip
        self.assertEqual(status, 0)
        self.assertEqual(
            records(lines),
            [
                "_pop3s._tcp.example.org. 3600 IN SRV 0 1 995 mail.example.org.",
                "_pop3._tcp.example.org. 3600 IN SRV 10 1 110 mail.example.org.",
                "_imaps._tcp.example.org. 3600 IN SRV 0 0 0 .",
                "_imap._tcp.example.org. 3600 IN SRV 0 0 0 .",
                "_submissions._tcp.example.org. 3600 IN SRV 0 1 465 smtp.example.org.",
                "example.org. 3600 IN MX 10 mail.example.org.",
            ],
        )  # fmt: skip
        self.assertFalse([line for line in lines if "warning" in line], lines)

    def test_paths_before_the_command(self):
        """``popserv --data DIR dns DOMAIN ...`` as for the other commands; the cert's name."""
        status, lines, _ = run_dns(
            "--data", self.data, "dns", "example.org", "--pop3s", "tcp:995", *self.tls()
        )
        self.assertEqual(status, 0)
        self.assertIn(
            "_pop3s._tcp.example.org. 3600 IN SRV 0 1 995 mail.example.org.",
            records(lines),
        )
        self.assertIn("_pop3._tcp.example.org. 3600 IN SRV 0 0 0 .", records(lines))

    def test_behind_haproxy_and_notes(self):
        """Assumed ports, a name the certificate lacks, MX off port 25: said in comments."""
        status, lines, _ = run_dns(
            "dns", "example.org", "--data", self.data,
            "--hostname", "pop.example.org",
            "--pop3s", "haproxy:tcp:10995", *self.tls(),
            "--smtp", "tcp:2525", "--domain", "example.org",
            "--autoconfig", "tcp:8080",
        )  # fmt: skip
        self.assertEqual(status, 0)
        text = "\n".join(lines)
        self.assertIn("--pop3s haproxy:tcp:10995: port 995 assumed", text)
        self.assertIn("warning: no --tls-cert names pop.example.org", text)
        self.assertIn("warning: --smtp tcp:2525 listens on port 2525", text)
        self.assertIn(";   autoconfig.example.org. 3600 IN CNAME pop.example.org.", text)
        self.assertIn("no --submission", text)

    def test_public_port(self):
        status, lines, _ = run_dns(
            "dns", "example.org", "--data", self.data,
            "--pop3s", "tcp:10995", "--public-port", "pop3s=995", *self.tls(),
        )  # fmt: skip
        self.assertEqual(status, 0)
        self.assertIn(" 995 ", records(lines)[0])

    def test_cleartext_only(self):
        """No TLS: POP3 is published only when cleartext logins are allowed, with a warning."""
        argv = ["dns", "example.org", "--data", self.data, "--hostname", "mail.example.org",
                "--pop3", "tcp:110"]  # fmt: skip
        _, lines, _ = run_dns(*argv)
        self.assertTrue(records(lines)[1].endswith(" 0 0 0 ."))
        _, lines, _ = run_dns(*argv, "--allow-cleartext-auth")
        self.assertTrue(records(lines)[1].endswith(" 110 mail.example.org."))
        self.assertIn("in the clear", "\n".join(lines))

    def test_no_hostname(self):
        """Neither --hostname nor a certificate: one line, status 78."""
        status, lines, err = run_dns("dns", "example.org", "--data", self.data)
        self.assertEqual((status, lines), (EXIT_CONFIG, []))
        self.assertIn("give --hostname", err)

    def test_domain_not_served(self):
        status, _, err = run_dns(
            "dns", "example.com", "--data", self.data, "--hostname", "mail.example.org",
            "--domain", "example.org",
        )  # fmt: skip
        self.assertEqual(status, EXIT_CONFIG)
        self.assertIn("example.com is not among the --domain values", err)
        status, _, err = run_dns(
            "dns", "example.com", "--data", self.data, "--hostname", "mail.example.org",
            "--smtp", "tcp:25",
        )  # fmt: skip
        self.assertEqual(status, EXIT_CONFIG)
        self.assertIn("give --domain example.com", err)

    def test_usage(self):
        self.assertEqual(run_dns("dns")[0], EX_USAGE)
        self.assertEqual(run_dns("dns", "--hostname", "x")[0], EX_USAGE)
        self.assertEqual(run_dns("dns", "example.org", "--no-such-option")[0], EX_USAGE)
        status, lines, _ = run_dns("dns", "--help")
        self.assertEqual(status, 0)
        self.assertIn("Usage: popserv dns DOMAIN", lines[0])
