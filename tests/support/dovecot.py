"""
Shared test fixtures: a private Dovecot serving POP3 (and with a
certificate, STLS and POP3S) on 127.0.0.1 from files under a directory of
the test's, for the tests that hold popserv to what Dovecot does
(``tests/clients/test_dovecot.py``) or check Dovecot with ``popserv probe``
(``tests/clients/test_probe.py``).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support.peers import missing
from tests.support.processes import free_port, wait_for_port

#: Where distributions put Dovecot's pop3 service binary.
POP3_BINARIES = (
    "/usr/lib/dovecot/pop3",
    "/usr/libexec/dovecot/pop3",
    "/usr/local/libexec/dovecot/pop3",
)


def pop3_binary() -> str | None:
    return next((path for path in POP3_BINARIES if os.access(path, os.X_OK)), None)


def require_dovecot() -> None:
    """Skip (or fail, under POPSERV_REQUIRE_PEERS) without Dovecot's POP3 server."""
    if shutil.which("dovecot") is None or pop3_binary() is None:
        raise missing("Dovecot's POP3 server is not installed (apt-get install dovecot-pop3d)")


def mail_ids() -> str:
    """
    The ``uid:gid`` Dovecot runs the mail processes as, for the password
    file: nobody when the tests run as root (Dovecot will not run them as
    root), the test's own user otherwise.
    """
    return "65534:65534" if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}"


def give_to_mail_user(root: Path) -> None:
    """
    As root: everything under ``root`` (Maildirs, password file) becomes
    nobody's, and ``root``'s parent is opened, so that Dovecot's auth process
    (user dovecot) reaches the password file.
    """
    if os.geteuid() != 0:
        return
    for path in [root, *root.rglob("*")]:
        os.chown(path, 65534, 65534)
    root.parent.chmod(0o755)


class PrivateDovecot:
    """
    A Dovecot serving POP3 on 127.0.0.1 from files under ``root``; stop() ends it.
    With ``tls`` (certificate and key files), STLS on :attr:`port` and POP3S on
    :attr:`pop3s_port`.
    """

    def __init__(
        self,
        root: Path,
        passwd: Path,
        maildir: Path,
        settings: str = "",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.root = root
        self.port = free_port()
        self.pop3s_port = free_port() if tls else None
        self.log = root / "dovecot.log"
        self.output = ""
        root.mkdir(parents=True)
        # Dovecot's sockets live in base_dir, and socket paths are limited to
        # about 100 bytes: a trial temp path is too long.
        run = Path(tempfile.mkdtemp(prefix="popserv-dovecot-"))
        run.chmod(0o755)
        self.run_dir = run
        if os.geteuid() == 0:
            users = chroot = ""
        else:
            # Not root: run every process as this user, with no chroot (checked
            # by hand as nobody; CI runs as root).
            users = (
                f"default_internal_user = {pwd.getpwuid(os.getuid()).pw_name}\n"
                f"default_login_user = {pwd.getpwuid(os.getuid()).pw_name}\n"
                f"default_internal_group = {grp.getgrgid(os.getgid()).gr_name}\n"
                "service anvil {\n  chroot =\n}\n"
            )
            chroot = "  chroot =\n"
        if tls is None:
            ssl = "ssl = no\n"
            pop3s = ""
        else:
            ssl = f"ssl = yes\nssl_cert = <{tls[0]}\nssl_key = <{tls[1]}\n"
            pop3s = f"  inet_listener pop3s {{\n    port = {self.pop3s_port}\n    ssl = yes\n  }}\n"
        config = root / "dovecot.conf"
        config.write_text(
            f"base_dir = {run}\n"
            f"state_dir = {run}/state\n"
            f"instance_name = popserv-test-{self.port}\n"
            f"{users}"
            "protocols = pop3\n"
            "listen = 127.0.0.1\n"
            f"{ssl}"
            "disable_plaintext_auth = no\n"
            "auth_mechanisms = plain\n"
            f"log_path = {self.log}\n"
            f"mail_location = maildir:{maildir}\n"
            "first_valid_uid = 1\n"
            f"passdb {{\n  driver = passwd-file\n  args = {passwd}\n}}\n"
            f"userdb {{\n  driver = passwd-file\n  args = {passwd}\n}}\n"
            f"service pop3-login {{\n{chroot}"
            f"  inet_listener pop3 {{\n    port = {self.port}\n  }}\n{pop3s}}}\n"
            f"{settings}\n"
        )
        self.process = subprocess.Popen(
            ["dovecot", "-F", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            for port in filter(None, (self.port, self.pop3s_port)):
                wait_for_port(port, lambda: self.process.poll() is None, "Dovecot", 10)
        except AssertionError:
            self.stop()
            raise AssertionError(f"Dovecot did not start: {self.output}") from None

    def stop(self) -> None:
        """
        End this Dovecot: its master and the processes it started, which
        share the process group it leads (start_new_session), so nothing
        else is touched.  SIGKILL, as a SIGTERM'd master lingers a second
        waiting for its children; each POP3 session is over by then (QUIT
        answered), so no Maildir write is cut short.
        """
        # Also when the master died on its own: its children may remain.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        assert self.process.stderr is not None
        self.output = self.process.stderr.read().decode(errors="replace")
        self.process.stderr.close()
        if self.log.exists():
            self.output += self.log.read_text(errors="replace")
        shutil.rmtree(self.run_dir, ignore_errors=True)
