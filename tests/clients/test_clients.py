"""
End to end with real POP3 clients: mpop, fetchmail and getmail6 fetch from
the real server on loopback TCP, backed by a real Maildir on disk, and
again by the PostgreSQL store (the ``...PostgresTests`` classes).

Each client runs as a child process (so the reactor keeps serving), under
``timeout`` and with its own network timeout, with its configuration and
home directory in a fresh temporary directory.  The server side records the
command bytes each session received, so a test can tell *how* a client
logged in and what it asked for, not only what came out.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue

from popserv.server.protocol import POP3Protocol
from tests.support.mail import mbox_messages, unix
from tests.support.peers import missing
from tests.support.servers import PostgresServer, ServerTestCase

#: For bob: a body that needs mbox quoting, a line that needs dot-stuffing,
#: and an 8-bit line.
BOB_MESSAGE = (
    b"From: carol@example.org\nSubject: for bob\n\n"
    b"From the top\n>From quoted once\n.dot\n\xe4 8-bit\n"
)



class ClientTestCase(ServerTestCase):
    """A :class:`ServerTestCase` that runs one real client program."""

    #: The client's executable name.
    client = ""
    #: Hard limit for one client run, seconds (each client also has its own).
    run_limit = 30
    timeout = 60

    def setUp(self):
        self.executable = shutil.which(self.client)
        if self.executable is None:
            raise missing(f"{self.client} is not installed")
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir(parents=True)
        self.received: list[bytes] = []
        original = POP3Protocol.dataReceived

        def recording(protocol, data):
            self.received.append(data)
            return original(protocol, data)

        self.patch(POP3Protocol, "dataReceived", recording)
        return super().setUp()

    def commands(self) -> list[bytes]:
        """Every command line the server has received so far, then forget them."""
        lines = b"".join(self.received).split(b"\r\n")
        self.received.clear()
        return [line for line in lines if line]

    async def run_client(self, *args: str, expect: int = 0, **env: str) -> bytes:
        """Run the client with ``args``; check its exit code; return its stdout+stderr."""
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
        out, err, code = await getProcessOutputAndValue(
            argv[0], argv[1:], env=environment, path=str(self.home)
        )
        output = out + err
        self.assertEqual(code, expect, output.decode("utf-8", "replace"))
        return output

    def assert_fetched_and_kept(self, commands: list[bytes], uids: list[bytes]) -> None:
        """RETR 1-4 in order, no DELE; the mbox holds the four messages; the store is intact."""
        self.assertEqual(
            [c for c in commands if c.startswith(b"RETR")],
            [b"RETR 1", b"RETR 2", b"RETR 3", b"RETR 4"],
        )
        self.assertFalse([c for c in commands if c.startswith(b"DELE")])
        self.assertEqual(self.mbox(), [unix(m) for m in self.messages])
        self.assertEqual(self.uids(), uids)

    def uids(self) -> list[bytes]:
        """alice's UIDs (what UIDL lists), sorted."""
        return [uid.encode() for uid in self.stored_uids()]


class MpopTests(ClientTestCase):
    """mpop 1.4: USER/PASS and APOP, mbox delivery, keep / only-new / delete."""

    client = "mpop"

    async def mpop(
        self, *args: str, user="alice", password="secret", auth="user", mbox="alice.mbox", expect=0
    ) -> bytes:
        return await self.run_client(
            "--host=127.0.0.1",
            f"--port={self.portno}",
            "--timeout=10",
            "--tls=off",
            f"--auth={auth}",
            f"--user={user}",
            f"--passwordeval=echo '{password}'",
            "--received-header=off",
            f"--delivery=mbox,{self.home / mbox}",
            f"--uidls-file={self.home / 'uidls'}",
            *args,
            expect=expect,
        )

    def mbox(self, name="alice.mbox") -> list[bytes]:
        return mbox_messages((self.home / name).read_bytes())

    async def test_user_pass_keep_then_delete(self):
        """
        --auth=user with --keep=on downloads all four messages byte for byte
        and leaves them on the server; --keep=off then deletes every one.
        """
        uids = self.uids()
        await self.mpop("--keep=on", "--only-new=off")
        commands = self.commands()
        self.assertIn(b"USER alice", commands)
        self.assertIn(b"PASS secret", commands)
        self.assert_fetched_and_kept(commands, uids)

        await self.mpop("--keep=off", "--only-new=off")
        commands = self.commands()
        self.assertEqual(
            [c for c in commands if c.startswith(b"DELE")],
            [b"DELE 1", b"DELE 2", b"DELE 3", b"DELE 4"],
        )
        self.assertEqual(commands[-1], b"QUIT")
        self.assertEqual(self.mbox(), [unix(m) for m in self.messages] * 2)
        self.assertEqual(self.stored_uids(), [])

    async def test_only_new_with_uidls_file(self):
        """
        --only-new=on records the server's UIDs and fetches nothing the
        second time; the messages stay on the server.
        """
        uids = self.uids()
        await self.mpop("--keep=on", "--only-new=on")
        self.assertEqual(self.mbox(), [unix(m) for m in self.messages])
        listed = (self.home / "uidls").read_bytes().split(b" 4 127.0.0.1 alice\n", 1)[1]
        self.assertEqual(sorted(listed.splitlines()), uids)
        self.commands()

        output = await self.mpop("--keep=on", "--only-new=on")
        self.assertIn(b"new: no messages", output)
        commands = self.commands()
        self.assertIn(b"UIDL", commands)
        self.assertFalse([c for c in commands if c.startswith((b"RETR", b"TOP", b"DELE"))])
        self.assertEqual(self.mbox(), [unix(m) for m in self.messages])
        self.assertEqual(self.uids(), uids)

    async def test_apop(self):
        """--auth=apop logs bob in with APOP (no password on the wire) and fetches his mail."""
        self.add_message("bob", BOB_MESSAGE)
        await self.mpop(
            "--keep=on",
            "--only-new=off",
            user="bob",
            password="bob pw",
            auth="apop",
            mbox="bob.mbox",
        )
        commands = self.commands()
        self.assertRegex(commands[1].decode(), r"^APOP bob [0-9a-f]{32}$")
        self.assertFalse([c for c in commands if c.startswith((b"USER", b"PASS"))])
        raw = (self.home / "bob.mbox").read_bytes()
        self.assertIn(b"\n>From the top\n>>From quoted once\n", raw)
        self.assertEqual(self.mbox("bob.mbox"), [BOB_MESSAGE])

    async def test_apop_refused_for_hashed_password(self):
        """APOP for alice (argon2id password) fails; mpop reports the [AUTH] error."""
        output = await self.mpop("--keep=on", user="alice", auth="apop", expect=77)
        self.assertIn(b"[AUTH]", output)
        self.assertFalse((self.home / "alice.mbox").exists())

    async def test_serverinfo(self):
        """--serverinfo shows the greeting's APOP timestamp and the CAPA list."""
        output = (await self.mpop("--serverinfo")).decode()
        self.assertRegex(output, r"POP3 server ready <[^<>@]+@pop\.test>")
        for capability in (
            "TOP",
            "UIDL",
            "PIPELINING",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "LOGIN-DELAY 0",
            "EXPIRE NEVER",
        ):
            self.assertRegex(output, rf"(?m)^ +{capability}:$")
        self.assertRegex(output, r"(?m)^ +IMPLEMENTATION:\n +popserv-\S+$")
        self.assertRegex(output, r"(?m)^ +USER PLAIN APOP LOGIN *$")
        self.assertEqual(self.commands()[0], b"CAPA")


class FetchmailTests(ClientTestCase):
    """fetchmail 6.4: keep/fetchall, UIDL bookkeeping, deletion, APOP."""

    client = "fetchmail"

    async def fetchmail(
        self,
        keywords: str,
        *args: str,
        uidl=False,
        user="alice",
        password="secret",
        out="alice.mail",
        expect=0,
    ) -> bytes:
        # sslproto '': fetchmail 6.4 otherwise insists on STLS, which popserv
        # (without TLS configured) refuses.  invisible: no Received: header.
        rc = self.home / "fetchmailrc"
        rc.write_text(
            "set no bouncemail\n"
            "set invisible\n"
            f"poll 127.0.0.1 proto pop3 port {self.portno} timeout 10"
            + (" uidl\n" if uidl else "\n")
            + f'  user "{user}" password "{password}" {keywords}\n'
            "  sslproto '' no rewrite\n"
            f'  mda "cat >>{self.home / out}"\n'
        )
        rc.chmod(0o600)
        return await self.run_client(
            "-f",
            str(rc),
            "--nosyslog",
            "-v",
            # As root the lock is /var/run/fetchmail.pid whatever FETCHMAILHOME says.
            "--pidfile",
            str(self.home / "fetchmail.pid"),
            *args,
            expect=expect,
            FETCHMAILHOME=str(self.home),
        )

    def delivered(self, name="alice.mail") -> bytes:
        return (self.home / name).read_bytes()

    async def test_keep_fetchall(self):
        """keep fetchall: all four messages reach the MDA unchanged and stay on the server."""
        uids = self.uids()
        await self.fetchmail("keep fetchall")
        commands = self.commands()
        self.assertEqual(commands[:3], [b"CAPA", b"USER alice", b"PASS secret"])
        self.assertEqual(
            [c for c in commands if c.startswith(b"RETR")],
            [b"RETR 1", b"RETR 2", b"RETR 3", b"RETR 4"],
        )
        self.assertFalse([c for c in commands if c.startswith(b"DELE")])
        self.assertEqual(self.delivered(), b"".join(unix(m) for m in self.messages))
        self.assertEqual(self.uids(), uids)

    async def test_uidl_second_run_fetches_nothing(self):
        """With ``uidl`` (and no fetchall) the second poll finds no new mail."""
        uids = self.uids()
        await self.fetchmail("keep", uidl=True)
        self.assertIn(b"UIDL", self.commands())
        self.assertEqual(self.delivered(), b"".join(unix(m) for m in self.messages))
        ids = (self.home / ".fetchids").read_bytes()
        for uid in uids:
            self.assertIn(b" " + uid + b"\n", ids)

        output = await self.fetchmail("keep", uidl=True, expect=1)  # 1: no mail
        self.assertIn(b"4 messages (4 seen) for alice at 127.0.0.1", output)
        commands = self.commands()
        self.assertIn(b"UIDL", commands)
        self.assertFalse([c for c in commands if c.startswith((b"RETR", b"TOP", b"DELE"))])
        self.assertEqual(self.delivered(), b"".join(unix(m) for m in self.messages))
        self.assertEqual(self.uids(), uids)

    async def test_no_keep_deletes(self):
        """Without ``keep`` fetchmail deletes what it delivered: the maildrop ends up empty."""
        await self.fetchmail("fetchall")
        commands = self.commands()
        self.assertEqual(
            [c for c in commands if c.startswith(b"DELE")],
            [b"DELE 1", b"DELE 2", b"DELE 3", b"DELE 4"],
        )
        self.assertEqual(commands[-1], b"QUIT")
        self.assertEqual(self.delivered(), b"".join(unix(m) for m in self.messages))
        self.assertEqual(self.stored_uids(), [])

    async def test_apop(self):
        """-p APOP logs bob in with APOP and delivers his message."""
        self.add_message("bob", BOB_MESSAGE)
        await self.fetchmail(
            "keep fetchall", "-p", "APOP", user="bob", password="bob pw", out="bob.mail"
        )
        commands = self.commands()
        self.assertRegex(commands[0].decode(), r"^APOP bob [0-9a-f]{32}$")
        self.assertFalse([c for c in commands if c.startswith((b"USER", b"PASS"))])
        self.assertEqual(self.delivered("bob.mail"), BOB_MESSAGE)


class GetmailTests(ClientTestCase):
    """getmail6: SimplePOP3Retriever into an mboxrd file, USER/PASS and APOP."""

    client = "getmail"

    def setUp(self):
        result = super().setUp()
        # trial's mktemp() parent is private (0700); getmail delivers as nobody.
        self.home.parent.chmod(0o755)
        return result

    async def getmail(
        self, user="alice", password="secret", apop=False, mbox="alice.mbox", expect=0
    ) -> bytes:
        # As root getmail delivers as ``user``, so the mbox must be writable by nobody.
        path = self.home / mbox
        if not path.exists():
            path.touch()
            path.chmod(0o666)
        lines = [
            "[retriever]",
            "type = SimplePOP3Retriever",
            "server = 127.0.0.1",
            f"port = {self.portno}",
            f"username = {user}",
            f"password = {password}",
            f"use_apop = {str(apop).lower()}",
            "timeout = 10",
            "[destination]",
            "type = Mboxrd",
            f"path = {path}",
            *(["user = nobody"] if os.geteuid() == 0 else []),
            "[options]",
            "delete = false",
            "read_all = true",
            "received = false",
            "delivered_to = false",
            "verbose = 1",
        ]
        rc = self.home / "getmailrc"
        rc.write_text("\n".join(lines) + "\n")
        return await self.run_client(f"--getmaildir={self.home}", f"--rcfile={rc}", expect=expect)

    def mbox(self, name="alice.mbox") -> list[bytes]:
        """The messages, less the ``Return-Path:`` line getmail puts first."""
        messages = mbox_messages((self.home / name).read_bytes())
        for message in messages:
            self.assertTrue(message.startswith(b"Return-Path: <unknown>\n"), message)
        return [message.split(b"\n", 1)[1] for message in messages]

    async def test_user_pass(self):
        """USER/PASS, delete = false: four messages with the right bodies, none deleted."""
        uids = self.uids()
        output = await self.getmail()
        self.assertIn(b"4 messages (228 bytes) retrieved", output)
        commands = self.commands()
        self.assertIn(b"USER alice", commands)
        self.assert_fetched_and_kept(commands, uids)

    async def test_apop(self):
        """use_apop = true logs bob in with APOP; his message arrives intact."""
        self.add_message("bob", BOB_MESSAGE)
        await self.getmail(user="bob", password="bob pw", apop=True, mbox="bob.mbox")
        commands = self.commands()
        self.assertRegex(commands[0].decode(), r"^APOP bob [0-9a-f]{32}$")
        self.assertFalse([c for c in commands if c.startswith((b"USER", b"PASS"))])
        raw = (self.home / "bob.mbox").read_bytes()
        self.assertIn(b"\n>From the top\n>>From quoted once\n", raw)
        self.assertEqual(self.mbox("bob.mbox"), [BOB_MESSAGE])

    async def test_apop_refused_for_hashed_password(self):
        """use_apop for alice is refused with the server's [AUTH] text, and nothing is fetched."""
        output = await self.getmail(apop=True, expect=127)
        self.assertIn(b"-ERR [AUTH] Authentication failed", output)
        self.assertEqual((self.home / "alice.mbox").read_bytes(), b"")


class MpopPostgresTests(PostgresServer, MpopTests):
    """mpop against the PostgreSQL store."""


class FetchmailPostgresTests(PostgresServer, FetchmailTests):
    """fetchmail against the PostgreSQL store."""


class GetmailPostgresTests(PostgresServer, GetmailTests):
    """getmail6 against the PostgreSQL store."""
