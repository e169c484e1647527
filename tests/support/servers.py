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
from popserv.stores.maildir import deliver, parse_name
from popserv.stores.maildir.deliver import lf_chunks
from popserv.stores.postgres import queries
from popserv.stores.postgres.delivery import new_uidl
from tests.support.peers import missing
from tests.support.postgres import store_database
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

    Accounts and mail are in a password file and Maildirs; tests put mail in
    and look at what is stored only through :meth:`add_message`,
    :meth:`stored_uids` and :meth:`seen_uids`, so that
    :class:`PostgresServer` runs the same tests on the PostgreSQL store.
    """

    apop_user = True
    #: twistd options for this class's server, on top of the fixture's own.
    options: dict = {}

    def setUp(self):
        self.layout = Layout.create(self.mktemp())
        self.layout.data_dir.mkdir(parents=True)
        self.maildir = self.layout.maildir_for("alice")
        self.add_user("alice", hash_password("secret"))
        if self.apop_user:
            self.add_user("bob", hash_password("bob pw", "PLAIN"))
        for name, data in RAW_MESSAGES.items():
            self.add_message("alice", data, uid=name)
        self.add_message("alice", DELIVERED)
        self.messages = [*RAW_MESSAGES.values(), DELIVERED.replace(b"\r\n", b"\n")]
        options = {
            **self.store_options(),
            "hostname": "pop.test",
            "auth-failure-delay": 0.05,
            **self.options,
        }
        self.factory = make_factory(options, reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.portno = self.port.getHost().port

    # The store: here a password file and Maildirs (PostgresServer: the database)

    def store_options(self) -> dict:
        """The options that say where accounts and mail are."""
        return {"data": str(self.layout.data_dir), "passwd": str(self.layout.passwd_path)}

    def add_user(self, name: str, stored_password: str) -> None:
        PasswdFile(self.layout.passwd_path).add(name, stored_password)
        ensure_maildir(self.layout.maildir_for(name))

    def add_message(self, user: str, data: bytes, uid: str | None = None) -> None:
        """
        Store ``data`` for ``user``: as delivered, or with ``uid`` as its UIDL
        (a Maildir file written straight into new/, its delivery time the
        name's, so no size in the name: the store must count it).
        """
        maildir = self.layout.maildir_for(user)
        if uid is None:
            deliver(maildir, data)
        else:
            (maildir / "new" / uid).write_bytes(data)

    def stored_uids(self, user: str = "alice") -> list[str]:
        """The UIDLs of ``user``'s stored messages, sorted."""
        maildir = self.layout.maildir_for(user)
        names = os.listdir(maildir / "new") + os.listdir(maildir / "cur")
        return sorted(name.split(":")[0] for name in names)

    def seen_uids(self, user: str = "alice") -> list[str]:
        """The UIDLs of ``user``'s messages marked retrieved, sorted."""
        names = os.listdir(self.layout.maildir_for(user) / "cur")
        return sorted(name.split(":")[0] for name in names if "S" in parse_name(name).flags)

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


class PostgresServer:
    """
    Put before a :class:`ServerTestCase` in the bases
    (``class XPostgresTests(PostgresServer, XTests)``): the same server and
    tests with accounts in Postfixadmin's ``mailbox`` table and mail in the
    PostgreSQL store (``--database``, ``--store postgresql``), a new database
    per test.  Messages are stored as deliveries store them (LF line ends),
    so clients must see exactly what they see from a Maildir.
    """

    def setUp(self):
        self.database_url = store_database()
        result = super().setUp()
        self.addCleanup(self.factory.accounts.passwd.database.stop)
        return result

    def store_options(self) -> dict:
        return {
            "data": str(self.layout.data_dir),
            "database": self.database_url,
            "store": "postgresql",
        }

    def connect(self):
        import psycopg

        return psycopg.connect(self.database_url, autocommit=True)

    def add_user(self, name: str, stored_password: str) -> None:
        with self.connect() as connection:
            connection.execute(
                "INSERT INTO mailbox (username, password) VALUES (%s, %s)", (name, stored_password)
            )

    def add_message(self, user: str, data: bytes, uid: str | None = None) -> None:
        """As a delivery stores it; with ``uid``, delivered when that Maildir name says."""
        delivered = None if uid is None else float(uid.split(".")[0])
        with self.connect() as connection, connection.transaction():
            queries.store(
                connection, user, lf_chunks(data), uidl=uid or new_uidl(), delivered=delivered
            )

    def _uids(self, user: str, condition: str) -> list[str]:
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT m.uidl FROM popserv.messages m JOIN popserv.maildrops d"
                f" ON d.id = m.maildrop WHERE d.name = %s AND {condition}",
                (user,),
            ).fetchall()
        return sorted(row[0] for row in rows)

    def stored_uids(self, user: str = "alice") -> list[str]:
        return self._uids(user, "true")

    def seen_uids(self, user: str = "alice") -> list[str]:
        return self._uids(user, "m.seen")


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
