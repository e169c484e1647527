"""
``twistd popserv`` stopped with SIGTERM while a client is logged in, end to
end: a real twistd (one process, then ``--workers 2``), real poplib clients.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.processes import (
    _Twistd,
    free_port,
    stop_at_cleanup,
    subprocess_env,
    twistd_script,
)

#: The longest a stopped server may take to exit once its last session has
#: ended (a worker's is reported to the parent, which then exits too).
EXIT_WITHIN = 5.0


class ShutdownTests(TestCase):
    """``twistd -n popserv`` in one process, on a loopback port, in a fresh data directory."""

    #: Extra options for this class's server, and for one test's.
    options: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()
    #: How many processes serve sessions (log "Starting factory").
    serving = 1

    def setUp(self) -> None:
        self.twistd = twistd_script()
        self.workdir = Path(tempfile.mkdtemp(prefix="popserv-shutdown-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    async def started(self, *argv: str) -> tuple[str, str]:
        """Start the server and wait until it serves; the first start's user and password."""
        self.port = free_port()
        self.process = _Twistd()
        command = [self.twistd, "-n", "--pidfile", "", "popserv",
                   "--pop3", f"tcp:{self.port}:interface=127.0.0.1", "--hostname", "pop.test",
                   "--data", str(self.workdir / "data"), *self.options, *argv]
        self.transport = reactor.spawnProcess(
            self.process, self.twistd, command, subprocess_env(), str(self.workdir)
        )
        stop_at_cleanup(self, self.process, self.transport)
        await self.process.until(lambda: self.process.output.count(b"Starting factory")
                              >= self.serving)
        match = re.search(rb"user:\s+(\S+)\n\s+password:\s+(\S+)\n", self.process.output)
        self.assertIsNotNone(match, self.process.output)
        self.user, password = (g.decode() for g in match.groups())
        return self.user, password

    def messages(self) -> int:
        maildir = self.workdir / "data" / "mail" / self.user
        return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur"))

    async def logged_in(self) -> poplib.POP3:
        user, password = await self.started(*self.argv)

        def log_in() -> poplib.POP3:
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            client.user(user)
            client.pass_(password)
            return client

        client = await deferToThread(log_in)
        self.addCleanup(client.close)
        return client

    def refused(self) -> bool:
        """New connections are refused, within a few seconds."""
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
            except ConnectionRefusedError:
                return True
            time.sleep(0.05)
        return False

    async def test_session_finishes_after_sigterm(self) -> None:
        """SIGTERM: no new connections; the open session still RETRs and QUITs, its DELE
        applied; the server exits at once after it."""
        client = await self.logged_in()
        self.assertEqual(self.messages(), 1)  # the first start's welcome
        self.transport.signalProcess(signal.SIGTERM)
        await self.process.until(lambda: self.process.output.count(b"Shutting down:")
                              >= self.serving)
        self.assertTrue(await deferToThread(self.refused), self.process.output)

        def finish() -> bytes:
            lines = client.retr(1)[1]
            self.assertIn(b"Subject: Welcome to popserv", lines)
            client.dele(1)
            return client.quit()

        self.assertTrue((await deferToThread(finish)).startswith(b"+OK Bye, 1 deleted"))
        quit_at = time.monotonic()
        self.assertEqual(await self.process.ended, 0, self.process.output)
        self.assertLess(time.monotonic() - quit_at, EXIT_WITHIN)
        self.assertEqual(self.messages(), 0)
        self.assertIn(b"Shut down: 1 sessions finished, 0 cut", self.process.output)
        self.assertNotIn(b"Traceback", self.process.output)

    async def test_idle_session_cut_at_the_grace(self) -> None:
        """--shutdown-grace 1: a session left idle is told and closed after 1 s; the
        server exits soon after."""
        self.argv = ("--shutdown-grace", "1")
        client = await self.logged_in()
        await deferToThread(client.dele, 1)
        stopped_at = time.monotonic()
        self.transport.signalProcess(signal.SIGTERM)
        line = await deferToThread(client.file.readline)
        told_at = time.monotonic()
        self.assertEqual(line, b"-ERR [SYS/TEMP] Server shutting down\r\n")
        self.assertGreaterEqual(told_at - stopped_at, 0.9)
        self.assertEqual(await deferToThread(client.file.readline), b"")  # closed
        self.assertEqual(await self.process.ended, 0, self.process.output)
        self.assertLess(time.monotonic() - told_at, EXIT_WITHIN)
        self.assertEqual(self.messages(), 1)  # DELE without QUIT: not applied
        self.assertIn(b"Shut down: 0 sessions finished, 1 cut", self.process.output)
        self.assertNotIn(b"Traceback", self.process.output)

    def every_process(self) -> list[int]:
        """The server's processes, as systemd signals them (KillMode=control-group)."""
        return [self.transport.pid]

    def draining_marks(self) -> list[bytes]:
        """How the log lines of the processes still draining begin (after the time)."""
        return [b"[popserv.server.drain#info]"]

    async def test_sigterm_again_is_only_logged(self) -> None:
        """A second SIGTERM while draining (systemd signals every process, the parent
        passes its own on) is logged; the session still has its grace."""
        self.argv = ("--shutdown-grace", "1")
        await self.logged_in()
        self.transport.signalProcess(signal.SIGTERM)
        await self.process.until(lambda: self.process.output.count(b"Shutting down:")
                              >= self.serving)
        for pid in self.every_process():
            os.kill(pid, signal.SIGTERM)
        self.assertEqual(await self.process.ended, 0, self.process.output)
        for mark in self.draining_marks():
            self.assertIn(mark + b" SIGTERM again: already stopping", self.process.output)
        self.assertIn(b"Shut down: 0 sessions finished, 1 cut", self.process.output)
        self.assertNotIn(b"Traceback", self.process.output)


class WorkersShutdownTests(ShutdownTests):
    """The same with ``--workers 2``: the parent passes SIGTERM on; each worker drains."""

    options = ("--workers", "2")
    serving = 2

    def every_process(self) -> list[int]:
        workers = re.findall(rb"Started worker (\d+)", self.process.output)
        return [self.transport.pid, *(int(pid) for pid in workers)]

    def draining_marks(self) -> list[bytes]:
        # The worker with the session (the other may have exited already).
        serving = re.search(rb"\[worker (\d+)\] Shutting down: [^;]*; 1 sessions",
                            self.process.output)
        assert serving is not None
        return [*super().draining_marks(), b"[worker %s]" % serving.group(1)]
