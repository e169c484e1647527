"""Shared test fixtures: servers."""

from __future__ import annotations

import os
import poplib
import shutil
import socket

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from popserv.logins.passwords import PasswdFile, hash_password
from popserv.server.service import make_factory
from popserv.stores.layout import Layout, ensure_maildir
from popserv.stores.maildir import deliver
from tests.support.peers import missing
from tests.support.sockets import MarkedReader

#: Stored as given (written straight into new/, no ,W= in the name), so the
#: store must compute their sizes: LF, CRLF, mixed, dots, no final newline.
RAW_MESSAGES = {
    "1700000001.M1P1.test": b"From: a@x\nSubject: lf\n\n.starts with dot\nend\n",
    "1700000002.M1P1.test": b"From: b@x\r\nSubject: crlf\r\n\r\n..two dots\r\nend\r\n",
    "1700000003.M1P1.test": b"From: c@x\nSubject: mixed\r\n\r\nline\n.\nlast, no newline",
}


DELIVERED = b"From: d@x\nSubject: delivered\n\n" + b"\xe4\xf6 8-bit body\n" * 3


def crlf(data: bytes) -> bytes:
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\r\n") else out + b"\r\n"


class RawClient(MarkedReader):
    """A blocking POP3 client that returns exactly the bytes the server sent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        return self.until(b"\r\n") + b"\r\n"

    def multi(self) -> bytes:
        return self.until(b"\r\n.\r\n") + b"\r\n.\r\n"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)



class ServerTestCase(TestCase):
    """
    Starts the real factory on 127.0.0.1 with four messages for alice (argon2id
    password) and, when :attr:`apop_user`, a user bob whose PLAIN password
    allows APOP (and so turns APOP on).
    """

    apop_user = True
    #: twistd options for this class's server, on top of the fixture's own.
    options: dict = {}

    def setUp(self):
        self.layout = Layout.create(self.mktemp())
        self.layout.data_dir.mkdir(parents=True)
        passwd = PasswdFile(self.layout.passwd_path)
        passwd.add("alice", hash_password("secret"))
        if self.apop_user:
            passwd.add("bob", hash_password("bob pw", "PLAIN"))
        self.maildir = ensure_maildir(self.layout.maildir_for("alice"))
        ensure_maildir(self.layout.maildir_for("bob"))
        for name, data in RAW_MESSAGES.items():
            (self.maildir / "new" / name).write_bytes(data)
        deliver(self.maildir, DELIVERED)
        self.messages = [*RAW_MESSAGES.values(), DELIVERED.replace(b"\r\n", b"\n")]
        options = {
            "data": str(self.layout.data_dir),
            "passwd": str(self.layout.passwd_path),
            "hostname": "pop.test",
            "auth-failure-delay": 0.05,
            **self.options,
        }
        self.factory = make_factory(options, reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.portno = self.port.getHost().port

    async def wait_idle(self):
        """Wait until the server has seen every session end."""
        for _ in range(200):
            if not self.factory.sessions:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("sessions still open")

    async def _teardown(self):
        await self.wait_idle()
        await self.port.stopListening()

    def tearDown(self):
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._teardown())

    def files(self) -> list[str]:
        return sorted(os.listdir(self.maildir / "new") + os.listdir(self.maildir / "cur"))

    def pop(self) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.portno, timeout=10)

    def run_in_thread(self, f, *args):
        return deferToThread(f, *args)


def command(client: poplib.POP3, line: str) -> bytes:
    """Send one command; return its answer, +OK or -ERR (poplib raises on -ERR)."""
    try:
        return client._shortcmd(line)
    except poplib.error_proto as e:
        return e.args[0]


def login(client: poplib.POP3, user: str, password: str) -> bytes:
    """USER/PASS; the answer to PASS, +OK or -ERR."""
    client.user(user)
    return command(client, f"PASS {password}")


class CurlTestCase(ServerTestCase):
    def setUp(self):
        if shutil.which("curl") is None:
            raise missing("curl is not installed")
        return super().setUp()

    async def run_curl(self, path: str, *args: str, user: str = "alice:secret"):
        """Run curl on ``pop3://server/path``; return (stdout, stderr, exit code)."""
        return await getProcessOutputAndValue(
            shutil.which("curl"),
            ["-sS", "--max-time", "20", f"pop3://127.0.0.1:{self.portno}/{path}",
             "-u", user, *args],
            env=os.environ,
        )

    async def curl(self, path: str, *args: str, user: str = "alice:secret") -> bytes:
        out, err, code = await self.run_curl(path, *args, user=user)
        self.assertEqual(code, 0, err)
        return out
