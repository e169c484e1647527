"""``popserv probe``'s command line: options, usage errors, where the password comes from."""

from __future__ import annotations

import getpass
import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from popserv.probe.checks import CHECKS, names
from popserv.probe.command import PASSWORD_VARIABLE, PasswordError, read_password
from popserv.probe.target import parse_target
from popserv.server.cli import main

TARGET = parse_target("pop3://alice@pop.example.org")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class PasswordTests(SynchronousTestCase):
    def setUp(self):
        self.patch(sys, "stderr", io.StringIO())
        environ = {k: v for k, v in os.environ.items() if k != PASSWORD_VARIABLE}
        self.patch(os, "environ", environ)

    def test_environment_first(self):
        os.environ[PASSWORD_VARIABLE] = "from env"
        self.assertEqual(read_password(TARGET, io.StringIO("from stdin\n")), "from env")

    def test_one_line_of_stdin(self):
        self.assertEqual(read_password(TARGET, io.StringIO("s3cret \r\nmore\n")), "s3cret ")
        self.assertEqual(read_password(TARGET, io.StringIO("no newline")), "no newline")

    def test_terminal_asks_once(self):
        asked = []
        self.patch(getpass, "getpass", lambda prompt: asked.append(prompt) or "typed")
        self.assertEqual(read_password(TARGET, Terminal()), "typed")
        self.assertEqual(asked, ["Password for alice@pop.example.org: "])

    def test_none(self):
        for stdin, said in (
            (io.StringIO(""), "no password on standard input"),
            (io.StringIO("\n"), "the password is empty"),
        ):
            with self.assertRaises(PasswordError) as caught:
                read_password(TARGET, stdin)
            self.assertIn(said, str(caught.exception))


class UsageTests(SynchronousTestCase):
    def setUp(self):
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.patch(sys, "stdout", io.StringIO())

    def usage(self, *argv: str) -> str:
        error = self.assertRaises(SystemExit, main, ["probe", *argv])
        self.assertEqual(error.code, 2)
        return self.stderr.getvalue()

    def test_bad_arguments(self):
        self.assertIn("a password in the URL is refused", self.usage("pop3://a:b@h"))
        self.assertIn("no check named 'nope'", self.usage("pop3://h", "--skip", "nope"))
        self.assertIn("'0' is not above 0", self.usage("pop3://h", "--retrieve", "0"))
        self.assertIn("'x' is not a number", self.usage("pop3://h", "--timeout", "x"))
        self.assertIn("the following arguments are required: URL", self.usage())

    def test_conflicts(self):
        """--starttls on pop3s://, a --cafile that is not there: exit status 2 before connecting."""
        self.assertEqual(main(["probe", "pop3s://h", "--starttls"]), 2)
        self.assertIn("--starttls is for pop3:// URLs", self.stderr.getvalue())
        self.assertEqual(main(["probe", "pop3://h", "--cafile", "/nonexistent"]), 2)
        self.assertIn("cannot use --cafile /nonexistent: No such file", self.stderr.getvalue())
        garbage = self.mktemp()
        with open(garbage, "w") as f:
            f.write("not a certificate\n")
        self.assertEqual(main(["probe", "pop3://h", "--cafile", garbage]), 2)
        self.assertIn(f"cannot use --cafile {garbage}:", self.stderr.getvalue())

    def test_every_check_named_once(self):
        self.assertEqual(len(set(names())), len(CHECKS))
        self.assertEqual(names()[0], "greeting")
        self.assertEqual(names()[-1], "responses")
