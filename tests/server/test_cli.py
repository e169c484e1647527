"""Tests for the ``popserv`` admin command."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from popserv.logins.passwords import PasswdFile, scheme_of, verify_password
from popserv.server.cli import main
from tests.support.processes import subprocess_env

ARGON2ID_REF = (
    "{ARGON2ID}$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$"
    "CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc"
)


def _has_pty() -> bool:
    try:
        primary, secondary = os.openpty()
    except OSError:
        return False
    os.close(primary)
    os.close(secondary)
    return True


TERMINAL_SKIP = None if _has_pty() else "no pseudo-terminals on this system"


def run(argv: list[str], input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=input,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )


class CommandTests(SynchronousTestCase):
    """``main()`` in-process, the password read from a (non-TTY) stdin."""

    def setUp(self) -> None:
        self.data = Path(self.mktemp())
        self.passwd = self.data / "passwd"

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        self.stdin = io.StringIO(stdin)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", self.stdin)
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["--data", str(self.data), *argv])
        return code, out.getvalue(), err.getvalue()

    def entry(self, name: str) -> str:
        found = PasswdFile(self.passwd).lookup(name)
        assert found is not None
        return found.password

    def assertFailsWith(self, result: tuple[int, str, str], text: str) -> None:
        code, out, err = result
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("popserv: "), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(text, err)

    def test_add_default_scheme(self) -> None:
        """``user add`` stores an ARGON2ID hash and creates the Maildir."""
        code, out, err = self.run_cli("user", "add", "alice", stdin="s3cret pass\n")
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("s3cret", out)
        stored = self.entry("alice")
        self.assertEqual(scheme_of(stored), "ARGON2ID")
        self.assertTrue(verify_password(stored, "s3cret pass"))
        maildir = self.data / "mail" / "alice"
        self.assertIn(str(maildir), out)
        for sub in ("cur", "new", "tmp"):
            self.assertTrue((maildir / sub).is_dir())
        self.assertEqual(self.data.stat().st_mode & 0o777, 0o700)
        self.assertEqual(self.passwd.stat().st_mode & 0o777, 0o600)

    def test_several_schemes(self) -> None:
        """Repeated --scheme: the first in the password field, the others in extra fields."""
        argv = ("user", "add", "alice", "-s", "ARGON2ID", "-s", "SCRAM-SHA-256", "-s",
                "CRAM-MD5", "-s", "PLAIN")
        code, _, err = self.run_cli(*argv, stdin="pencil and paper\n")
        self.assertEqual((code, err), (0, ""))
        entry = PasswdFile(self.data / "passwd").lookup("alice")
        self.assertEqual(entry.schemes, ("ARGON2ID", "SCRAM-SHA-256", "CRAM-MD5", "PLAIN-B64"))
        self.assertEqual(set(entry.extra), {"scram-sha-256", "cram-md5", "plain-b64"})
        for secret in entry.secrets:
            self.assertTrue(verify_password(secret, "pencil and paper"), secret)
        _, out, _ = self.run_cli("user", "list")
        self.assertEqual(out, "alice ARGON2ID+SCRAM-SHA-256+CRAM-MD5+PLAIN-B64 never\n")
        # A new password replaces every stored form; other extra fields stay.
        PasswdFile(self.data / "passwd").set_extra("alice", "login_delay", "60")
        self.run_cli("user", "passwd", "alice", "-s", "SHA512-CRYPT", stdin="new\n")
        entry = PasswdFile(self.data / "passwd").lookup("alice")
        self.assertEqual(entry.schemes, ("SHA512-CRYPT",))
        self.assertEqual(dict(entry.extra), {"login_delay": "60"})

    def test_pw_several(self) -> None:
        code, out, _ = self.run_cli("pw", "-s", "SHA256", "-s", "CRAM-MD5", stdin="x\n")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[1],
                         "{CRAM-MD5}4638c77f1a70c6fda4ddfa6fbe34e6ee090a0f0088f15da8fed5e0a5ff2b4152")
        self.assertTrue(verify_password(out.splitlines()[0], "x"))

    def test_only_the_newline_is_stripped(self) -> None:
        self.run_cli("user", "add", "alice", "-s", "PLAIN", stdin="  pass word \t\nignored\n")
        self.assertEqual(self.entry("alice"), "{PLAIN}  pass word \t")
        self.run_cli("user", "add", "bob", "--scheme", "plain", stdin="crlf\r\n")
        self.assertEqual(self.entry("bob"), "{PLAIN}crlf")
        self.run_cli("user", "add", "carol", "-s", "PLAIN", stdin="no newline")
        self.assertEqual(self.entry("carol"), "{PLAIN}no newline")

    def test_empty_password_refused(self) -> None:
        self.assertFailsWith(self.run_cli("user", "add", "alice", stdin="\n"), "empty")
        self.assertFailsWith(self.run_cli("user", "add", "alice", stdin=""), "no password")
        self.assertFalse(self.data.exists())

    def test_existing_user(self) -> None:
        """An existing user is refused before any password is read."""
        self.run_cli("user", "add", "alice", "-s", "PLAIN", stdin="one\n")
        result = self.run_cli("user", "add", "alice", "-s", "PLAIN", stdin="two\n")
        self.assertFailsWith(result, "user 'alice' already exists")
        self.assertEqual(self.stdin.tell(), 0)
        self.assertEqual(self.entry("alice"), "{PLAIN}one")

    def test_bad_name(self) -> None:
        for name in ("../etc", "a:b", ".x", "a b"):
            result = self.run_cli("user", "add", name, stdin="pw\n")
            self.assertFailsWith(result, "invalid user name")
            self.assertEqual(self.stdin.tell(), 0)
        self.assertFalse(self.data.exists())

    def test_unknown_scheme(self) -> None:
        """Unknown and read-only schemes are refused before the password is read."""
        for scheme in ("NOPE", "MD5-CRYPT"):
            result = self.run_cli("user", "add", "alice", "-s", scheme, stdin="pw\n")
            self.assertFailsWith(result, "cannot hash with scheme")
            self.assertEqual(self.stdin.tell(), 0)
        self.assertFalse(self.data.exists())

    def test_unstorable_password(self) -> None:
        """A PLAIN password with ``:`` cannot be stored; nothing is left behind."""
        result = self.run_cli("user", "add", "alice", "-s", "PLAIN", stdin="a:b\n")
        self.assertFailsWith(result, "must not contain ':'")
        self.assertFalse((self.data / "mail" / "alice").exists())
        self.run_cli("user", "add", "alice", "-s", "PLAIN-B64", stdin="a:b\n")
        self.assertTrue(verify_password(self.entry("alice"), "a:b"))

    def test_passwd(self) -> None:
        self.run_cli("user", "add", "alice", "-s", "PLAIN", stdin="old\n")
        code, out, err = self.run_cli(
            "user", "passwd", "alice", "-s", "SHA512-CRYPT", stdin="new\n"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("new\n", out)
        self.assertTrue(verify_password(self.entry("alice"), "new"))
        self.assertFailsWith(self.run_cli("user", "passwd", "bob", stdin="x\n"), "no user 'bob'")

    def test_missing_passwd_file(self) -> None:
        for argv in (("user", "passwd", "alice"), ("user", "del", "alice"), ("user", "list")):
            self.assertFailsWith(self.run_cli(*argv, stdin="x\n"), "no password file at")
        self.assertFalse(self.data.exists())

    def test_del_keeps_mail(self) -> None:
        self.run_cli("user", "add", "alice", "-s", "PLAIN", stdin="pw\n")
        code, out, err = self.run_cli("user", "del", "alice")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("kept", out)
        self.assertIsNone(PasswdFile(self.passwd).lookup("alice"))
        self.assertTrue((self.data / "mail" / "alice" / "new").is_dir())
        self.assertFailsWith(self.run_cli("user", "del", "alice"), "no user 'alice'")

    def test_del_purge(self) -> None:
        self.run_cli("user", "add", "alice", "-s", "PLAIN", stdin="pw\n")
        (self.data / "mail" / "alice" / "new" / "1.msg").write_bytes(b"Subject: x\n\nhi\n")
        code, out, _ = self.run_cli("user", "del", "alice", "--purge")
        self.assertEqual(code, 0)
        self.assertIn("deleted", out)
        self.assertFalse((self.data / "mail" / "alice").exists())

    def test_list(self) -> None:
        self.data.mkdir()
        self.passwd.write_text(
            f"# users\nalice:{ARGON2ID_REF}\nbob:{{CLEARTEXT}}b\nbroken line\ncarol:$6$x$y\n"
        )
        code, out, err = self.run_cli("user", "list")
        self.assertEqual(code, 0)
        self.assertEqual(out, "alice ARGON2ID never\nbob PLAIN never\ncarol SHA512-CRYPT never\n")
        self.assertIn("popserv: warning:", err)
        self.assertIn("line 4 is malformed", err)
        self.assertNotIn("broken", err)

    def test_paths_before_or_after_the_command(self) -> None:
        """``--passwd`` and ``--maildir`` place the file and the Maildirs."""
        other = Path(self.mktemp())
        passwd = other / "users"
        template = str(other / "home" / "{user}" / "Maildir")
        code, _, err = self.run_cli(
            "--passwd",
            str(passwd),
            "user",
            "add",
            "bob",
            "--maildir",
            template,
            "-s",
            "PLAIN",
            stdin="pw\n",
        )
        self.assertEqual((code, err), (0, ""))
        self.assertTrue((other / "home" / "bob" / "Maildir" / "cur").is_dir())
        self.assertIsNotNone(PasswdFile(passwd).lookup("bob"))
        self.assertFalse(self.data.exists())
        code, out, _ = self.run_cli("user", "list", "--passwd", str(passwd))
        self.assertEqual(out, "bob PLAIN never\n")

    def test_bad_template(self) -> None:
        result = self.run_cli("--maildir", "/tmp/nouser", "user", "add", "bob", stdin="pw\n")
        self.assertFailsWith(result, "{user}")

    def test_pw(self) -> None:
        """``pw`` prints the stored form, like ``doveadm pw``."""
        code, out, err = self.run_cli("pw", "-s", "sha512-crypt", stdin="Hello world!\n")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("{SHA512-CRYPT}$6$"))
        self.assertTrue(verify_password(out.strip(), "Hello world!"))
        self.assertEqual(self.run_cli("pw", "-s", "PLAIN", stdin="x")[1], "{PLAIN}x\n")
        self.assertFailsWith(self.run_cli("pw", "-s", "NOPE", stdin="x"), "NOPE")
        self.assertFalse(self.data.exists())

    def test_usage_errors(self) -> None:
        """Usage errors exit 2, as argparse does."""
        self.patch(sys, "stderr", io.StringIO())
        for argv in ([], ["user"], ["user", "add"], ["frobnicate"], ["pw", "secret"]):
            error = self.assertRaises(SystemExit, main, argv)
            self.assertEqual(error.code, 2)


class ProcessTests(SynchronousTestCase):
    """``python -m popserv.server.cli`` as a real process."""

    def setUp(self) -> None:
        self.data = self.mktemp()

    def test_subprocess(self) -> None:
        argv = [sys.executable, "-m", "popserv.server.cli", "--data", self.data]
        add = [*argv, "user", "add", "alice", "-s", "SHA512-CRYPT"]
        done = run(add, input="pw\n")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        again = run(add, input="pw\n")
        self.assertEqual(again.returncode, 1)
        self.assertEqual(again.stderr, "popserv: user 'alice' already exists\n")
        listed = run([*argv, "user", "list"])
        self.assertEqual(listed.stdout, "alice SHA512-CRYPT never\n")

    def talk(self, argv: list[str], answers: list[str]) -> tuple[int, str]:
        """Run ``argv`` on a terminal, answering each ``password:`` prompt in turn."""
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover (the child)
            os.environ.update(subprocess_env())
            os.execv(sys.executable, [sys.executable, "-m", "popserv.server.cli", *argv])
        output = b""
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 1)
                if not ready:
                    continue
                try:
                    chunk = os.read(fd, 1024)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
                if answers and output.lower().endswith(b"password: "):
                    os.write(fd, answers.pop(0).encode() + b"\n")
        finally:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), output.decode()

    def test_terminal_prompts_twice(self) -> None:
        """On a terminal the password is asked twice, without echo."""
        code, output = self.talk(["pw", "-s", "SHA256"], ["tty secret", "tty secret"])
        self.assertEqual(code, 0, output)
        self.assertIn("Repeat password: ", output)
        self.assertNotIn("tty secret", output)
        self.assertTrue(verify_password(output.strip().splitlines()[-1], "tty secret"))

    test_terminal_prompts_twice.skip = TERMINAL_SKIP  # type: ignore[attr-defined]

    def test_terminal_mismatch(self) -> None:
        code, output = self.talk(["pw", "-s", "SHA256"], ["one", "two"])
        self.assertEqual(code, 1)
        self.assertIn("popserv: the passwords do not match", output)

    test_terminal_mismatch.skip = TERMINAL_SKIP  # type: ignore[attr-defined]
