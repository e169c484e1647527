"""
The control socket, ``popserv who`` and ``popserv kick``: a real server
(the factory on a TCP port, the control service on a real UNIX socket),
real poplib sessions, and the command run as the admin runs it.
"""

from __future__ import annotations

import contextlib
import io
import os
import poplib
import shutil
import socket
import stat
import struct
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.core.usernames import UsernameRules
from popserv.logins.passwords import PasswdFile, hash_password
from popserv.server import cli
from popserv.server.control import (
    WHO_PAGE,
    ControlClient,
    ControlError,
    ControlFactory,
    ControlProtocol,
    ControlService,
    LocalSessions,
    WorkerSessions,
    control_path,
)
from popserv.server.service import make_factory, makeService
from popserv.server.startup import StartupError
from popserv.stores.layout import Layout, ensure_maildir
from popserv.stores.maildir import deliver


def short_tempdir(test: TestCase) -> Path:
    """A directory whose socket paths fit in sun_path (trial's mktemp() paths may not)."""
    path = Path(tempfile.mkdtemp(prefix="psctl"))
    test.addCleanup(shutil.rmtree, path, True)
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``popserv ARGV`` in this thread: status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


class ControlTestCase(TestCase):
    def setUp(self):
        self.layout = Layout.create(short_tempdir(self) / "data")
        self.layout.data_dir.mkdir(mode=0o700)
        passwd = PasswdFile(self.layout.passwd_path)
        passwd.add("alice", hash_password("secret", "PLAIN"))
        passwd.add("bob", hash_password("bob pw", "PLAIN"))
        self.maildir = ensure_maildir(self.layout.maildir_for("alice"))
        ensure_maildir(self.layout.maildir_for("bob"))
        for n in range(3):
            deliver(self.maildir, f"Subject: {n}\n\nbody {n}\n".encode())
        options = {
            "data": str(self.layout.data_dir),
            "hostname": "pop.test",
            "allow-cleartext-auth": True,
            "auth-failure-delay": 0.0,
        }
        self.factory = make_factory(options, reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.path = control_path(self.layout)
        self.control = self.start_control()

    def start_control(self) -> ControlService:
        service = ControlService(
            self.path, ControlFactory(LocalSessions(self.factory, UsernameRules())), reactor
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def files(self) -> list[str]:
        return sorted(os.listdir(self.maildir / "new") + os.listdir(self.maildir / "cur"))

    def login(self, user: str = "alice", password: str = "secret") -> Deferred[poplib.POP3]:
        def connect():
            client = poplib.POP3("127.0.0.1", self.port.getHost().port, timeout=10)
            client.user(user)
            client.pass_(password)
            return client

        return deferToThread(connect)

    def cli(self, *argv: str) -> Deferred[tuple[int, str, str]]:
        """The popserv command, in a thread: it blocks on the control socket."""
        return deferToThread(run_cli, "--data", str(self.layout.data_dir), *argv)

    async def until_closed(self, count: int = 0) -> None:
        for _ in range(300):
            if len(self.factory.sessions) <= count:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("sessions still open")

    def quit_all(self, *clients: poplib.POP3) -> Deferred[None]:
        def close():
            for client in clients:
                with contextlib.suppress(OSError, poplib.error_proto):
                    client.quit()
                client.close()

        return deferToThread(close)


class WhoTests(ControlTestCase):
    async def test_who_lists_a_session(self):
        """popserv who: the user, the client's address, since when, TLS no, the pid."""
        client = await self.login()
        local = "{}:{}".format(*client.sock.getsockname())
        status, out, err = await self.cli("who")
        await self.quit_all(client)
        self.assertEqual((status, err), (0, ""))
        header, row = out.splitlines()
        self.assertEqual(
            header.split(), ["USER", "CLIENT", "SINCE", "TLS", "STATE", "LOGIN", "WORKER"]
        )
        fields = row.split()
        self.assertEqual(fields[0], "alice")
        self.assertEqual(fields[1], local)
        self.assertRegex(" ".join(fields[2:4]), r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
        self.assertEqual(fields[4:], ["no", "TRANSACTION", "USER", str(os.getpid())])

    async def test_before_login(self):
        """A connection not logged in yet is listed without a user."""
        client = await deferToThread(poplib.POP3, "127.0.0.1", self.port.getHost().port, 10)
        rows = await deferToThread(lambda: ControlClient(self.path).who())
        await self.quit_all(client)
        [row] = rows
        self.assertEqual((row["user"], row["state"], row["mechanism"]), ("", "AUTHORIZATION", ""))
        self.assertIs(row["tls"], False)
        self.assertEqual(row["worker"], os.getpid())

    async def test_pages(self):
        """More sessions than one AMP answer holds come in pages, each session once."""
        fakes = [_FakeSession(n) for n in range(WHO_PAGE * 2 + 7)]
        self.factory.sessions.update(fakes)
        try:
            rows = await deferToThread(lambda: ControlClient(self.path).who())
        finally:
            self.factory.sessions.difference_update(fakes)
        self.assertEqual([r["client"] for r in rows], [f.info.where for f in fakes])

    async def test_no_server(self):
        """No server on the data directory: one line saying so, status 1."""
        await self.control.stopService()
        status, _, err = await self.cli("who")
        self.assertEqual(status, 1)
        self.assertIn("no control socket at", err)


class _FakeInfo:
    def __init__(self, n: int) -> None:
        self.where = f"192.0.2.{n % 250}:{10000 + n}"
        self.secure = bool(n % 2)
        self.peer = None


class _FakeState:
    name = "TRANSACTION"


class _FakePop3:
    state = _FakeState()
    mechanism = "PLAIN"


class _FakeSession:
    def __init__(self, n: int) -> None:
        self.info = _FakeInfo(n)
        self.started = 1000.0 + n
        self.logged_in_as = "x" * 255
        self.session = _FakePop3()


class KickTests(ControlTestCase):
    async def test_kick_user(self):
        """popserv kick alice: her session is cut, and the DELE it made is not applied."""
        before = self.files()
        alice = await self.login()
        bob = await self.login("bob", "bob pw")
        await deferToThread(alice.dele, 1)
        with capturedLogs() as events:
            status, out, err = await self.cli("kick", "alice")
            await self.until_closed(1)
        self.assertEqual((status, out, err), (0, "kicked 1 session of alice\n", ""))
        with self.assertRaises((OSError, poplib.error_proto, EOFError)):
            await deferToThread(alice.stat)
        self.assertEqual(self.files(), before)
        text = [formatEvent(e) for e in events]
        self.assertTrue(any("Kicked 1 session(s) of user alice" in line for line in text), text)
        self.assertTrue(any("kicked by admin" in line for line in text), text)
        # Bob's session goes on.
        self.assertEqual((await deferToThread(bob.stat))[0], 0)
        await self.quit_all(bob)
        alice.close()

    async def test_kick_matches_names_as_logins_do(self):
        """ALICE kicks alice (names fold case by default)."""
        alice = await self.login()
        status, out, _ = await self.cli("kick", "ALICE")
        self.assertEqual((status, out), (0, "kicked 1 session of ALICE\n"))
        await self.until_closed()
        alice.close()

    async def test_kick_address(self):
        """By IP address every session from it goes; by host:port only that one."""
        one = await self.login()
        two = await self.login("bob", "bob pw")
        where = "{}:{}".format(*two.sock.getsockname())
        status, out, _ = await self.cli("kick", where)
        self.assertEqual((status, out), (0, f"kicked 1 session from {where}\n"))
        await self.until_closed(1)
        status, out, _ = await self.cli("kick", "127.0.0.0/8")
        self.assertEqual((status, out), (0, "kicked 1 session from 127.0.0.0/8\n"))
        await self.until_closed(0)
        three = await self.login()
        status, out, _ = await self.cli("kick", "127.0.0.1")
        self.assertEqual((status, out), (0, "kicked 1 session from 127.0.0.1\n"))
        await self.until_closed(0)
        for client in (one, two, three):
            client.close()

    async def test_kick_nobody(self):
        """Nothing matched: said, and status 1 (as pkill)."""
        status, out, _ = await self.cli("kick", "carol")
        self.assertEqual((status, out), (1, "kicked 0 sessions of carol\n"))

    async def test_bad_target(self):
        """An address that is not one is refused by the server, in one line."""
        status, _, err = await self.cli("kick", "--address", "nowhere")
        self.assertEqual(status, 1)
        self.assertIn("not an address, network or host:port", err)


class SocketTests(ControlTestCase):
    def test_mode(self):
        """The socket is the owner's only: mode 0600."""
        st = os.stat(self.path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertEqual(st.st_uid, os.getuid())

    async def test_removed_at_stop(self):
        await self.control.stopService()
        self.assertFalse(os.path.lexists(self.path))

    async def test_stale_socket_replaced(self):
        """A socket nothing answers on (a crash) is replaced at start."""
        await self.control.stopService()
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(self.path))
        self.assertTrue(self.path.is_socket())
        self.start_control()
        rows = await deferToThread(lambda: ControlClient(self.path).who())
        self.assertEqual(rows, [])

    async def test_live_socket_not_stolen(self):
        """A second server on the same data directory does not start; the first keeps its socket."""
        second = ControlService(
            self.path, ControlFactory(LocalSessions(self.factory, UsernameRules())), reactor
        )
        with self.assertRaises(StartupError) as raised:
            await deferToThread(second.privilegedStartService)
        self.assertIn("another popserv serves this data directory", str(raised.exception))
        # Even asked to listen, it does not take the socket over.
        with capturedLogs() as events:
            await deferToThread(second.startService)
        self.assertIsNone(second.port)
        self.assertTrue(any("another popserv" in formatEvent(e) for e in events))
        rows = await deferToThread(lambda: ControlClient(self.path).who())
        self.assertEqual(rows, [])

    async def test_not_a_socket(self):
        """A file that is not a socket is left alone: no control socket, said in the log."""
        await self.control.stopService()
        self.path.write_text("mine")
        with capturedLogs() as events:
            self.start_control()
        self.assertEqual(self.path.read_text(), "mine")
        self.assertTrue(any("not a socket" in formatEvent(e) for e in events))

    def test_other_users_refused(self):
        """A peer of another uid (SO_PEERCRED) is cut without an answer."""
        if not hasattr(socket, "SO_PEERCRED"):
            self.skipTest("no SO_PEERCRED here")
        protocol = ControlFactory(LocalSessions(self.factory, UsernameRules())).buildProtocol(None)
        transport = _PeerTransport(os.getuid() + 4242)
        protocol.makeConnection(transport)
        self.assertTrue(transport.aborted)
        ours = ControlProtocol()
        ours.factory = protocol.factory
        transport = _PeerTransport(os.getuid())
        ours.makeConnection(transport)
        self.assertFalse(transport.aborted)

    def test_in_the_service(self):
        """makeService runs the control socket in the data directory."""
        service = makeService({
            "data": str(self.layout.data_dir),
            "pop3": ["tcp:0:interface=127.0.0.1"],
            "hostname": "pop.test",
        })
        [control] = [s for s in service if isinstance(s, ControlService)]
        self.assertEqual(control.path, self.path)


class _Handle:
    def __init__(self, uid: int) -> None:
        self.uid = uid

    def getsockopt(self, level, option, size):
        return struct.pack("3i", 1, self.uid, 1)


class _PeerTransport:
    def __init__(self, uid: int) -> None:
        self.handle = _Handle(uid)
        self.aborted = False

    def getHandle(self):
        return self.handle

    def abortConnection(self):
        self.aborted = True

    def getPeer(self):
        return None

    def getHost(self):
        return None

    def write(self, data):
        pass

    def loseConnection(self):
        pass


class ClientErrorTests(TestCase):
    def test_nothing_answers(self):
        """A stale socket: the client says the server is not running."""
        path = short_tempdir(self) / "control.sock"
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(path))
        with self.assertRaises(ControlError) as raised:
            ControlClient(path)
        self.assertIn("popserv is not running", str(raised.exception))


class _Link:
    """A worker's answers to who, as AdmissionServer.ask gives them (its own sessions, paged)."""

    def __init__(self, pid: int, starts: list[float]) -> None:
        self.rows = [{"since": t, "client": f"192.0.2.{pid}:{i}", "worker": pid}
                     for i, t in enumerate(starts)]

    def ask(self, kind: str, after: object) -> Deferred:
        rows = [r for r in self.rows if after is None or (r["since"], r["client"]) > tuple(after)]
        return succeed({"sessions": rows[:WHO_PAGE], "more": len(rows) > WHO_PAGE})


class WorkerSessionsTests(SynchronousTestCase):
    def test_pages_merge_in_order(self):
        """Pages across workers are in start order, each session once, none missed."""
        links = [_Link(1, [i * 2.0 for i in range(150)]), _Link(2, [i * 3.0 for i in range(120)])]
        sessions = WorkerSessions(lambda: links, UsernameRules())
        seen, after = [], None
        while True:
            page = self.successResultOf(sessions.who(after))
            seen += page["sessions"]
            if not page["more"]:
                break
            after = (seen[-1]["since"], seen[-1]["client"])
        self.assertEqual(len(seen), 270)
        keys = [(r["since"], r["client"]) for r in seen]
        self.assertEqual(keys, sorted(set(keys)))

    def test_bad_target_refused_before_asking(self):
        sessions = WorkerSessions(list, UsernameRules())
        self.failureResultOf(sessions.kick(None, "not an address", "admin"), ValueError)
