"""
The parent of ``--workers N`` (``WorkerSupervisor``) on a fake reactor:
restarts with back-off, giving up, stopping, SIGHUP passed on.
"""

from __future__ import annotations

import signal
import socket

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from popserv.server.admission import LocalAdmission
from popserv.server.drain import SHUTDOWN_GRACE
from popserv.server.policy import Policy
from popserv.server.startup import StartupError
from popserv.server.workers.supervisor import (
    EXIT_WORKERS_FAILED,
    KILL_MARGIN,
    MAX_RESTART_DELAY,
    WorkerSupervisor,
    bind,
)


class FakeProcess:
    def __init__(self, protocol, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.signals: list[str] = []
        self.ended = False
        protocol.transport = self

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def end(self, reason: Failure) -> None:
        self.ended = True
        self.protocol.processEnded(reason)


class FakeReactor(Clock):
    """Spawns nothing: records processes; adopts sockets by closing them."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.triggers: list[tuple[str, str, object]] = []
        self.stopped = False
        self._pids = iter(range(1000, 2000))

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        assert args[1:] == ["-m", "popserv.server.workers.child"]
        process = FakeProcess(protocol, next(self._pids))
        self.processes.append(process)
        return process

    def adoptStreamConnection(self, fd, family, factory):
        pass

    def addSystemEventTrigger(self, phase, event, f):
        self.triggers.append((phase, event, f))

    def stop(self):
        self.stopped = True


KILLED = Failure(ProcessTerminated(exitCode=None, signal=signal.SIGKILL))
DONE = Failure(ProcessDone(0))


class SupervisorTests(TestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        admission = LocalAdmission(Policy(), self.reactor)
        self.supervisor = WorkerSupervisor(2, [], admission, ["--workers", "2"], self.reactor)
        self.exits: list[int] = []
        self.supervisor.exit = self.exits.append
        self.supervisor.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.supervisor.running:
            self.supervisor.stopService()
            for process in self.live():
                process.end(DONE)

    def live(self) -> list[FakeProcess]:
        return [p for p in self.reactor.processes if not p.ended]

    def test_starts_count_workers(self) -> None:
        """startService starts N workers, each its own process."""
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(sorted(self.supervisor.workers), [0, 1])

    def kill_and_time_the_restart(self) -> float:
        """Kill the first worker; the seconds until another process is spawned."""
        victim = self.supervisor.workers[0].transport
        started = len(self.reactor.processes)
        victim.end(KILLED)
        waited = 0.0
        while len(self.reactor.processes) == started:
            self.reactor.advance(0.5)
            waited += 0.5
        return waited

    def test_restart_backs_off(self) -> None:
        """A dead worker is replaced after 1 s, then 2, 4 ... up to 30 s."""
        delays = []
        for _ in range(5):
            self.reactor.advance(61)  # each worker up over STABLE_AFTER
            delays.append(self.kill_and_time_the_restart())
        # Each worker was up over 60 s before it died: the back-off started over.
        self.assertEqual(delays, [1.0] * 5)

    def test_quick_deaths_double_the_delay(self) -> None:
        """Deaths soon after starting: 1, 2, 4 s (fewer than the give-up count)."""
        delays = []
        for _ in range(3):
            delays.append(self.kill_and_time_the_restart())
        self.assertEqual(delays, [1.0, 2.0, 4.0])
        self.assertLessEqual(max(self.supervisor._delays), MAX_RESTART_DELAY)

    def test_gives_up_when_workers_keep_dying(self) -> None:
        """More than 5 deaths within 60 s: the parent stops, exiting 70."""
        for process in self.live():
            process.end(KILLED)
        for _ in range(4):
            self.reactor.advance(1)
            for process in self.live():
                process.end(KILLED)
        self.assertTrue(self.reactor.stopped)
        [(phase, event, exit_)] = self.reactor.triggers
        self.assertEqual((phase, event), ("after", "shutdown"))
        exit_()
        self.assertEqual(self.exits, [EXIT_WORKERS_FAILED])

    def test_stop_terms_then_kills(self) -> None:
        """stopService: SIGTERM to each; SIGKILL to those still running after grace + 5 s."""
        first, second = self.live()
        stopped = self.supervisor.stopService()
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM"]))
        first.end(DONE)
        self.assertNoResult(stopped)
        self.assertEqual(self.supervisor.stop_timeout, SHUTDOWN_GRACE + KILL_MARGIN)
        self.reactor.advance(SHUTDOWN_GRACE)
        self.assertEqual(second.signals, ["TERM"])  # never within the workers' grace
        self.reactor.advance(KILL_MARGIN)
        self.assertEqual(second.signals, ["TERM", "KILL"])
        second.end(KILLED)
        self.successResultOf(stopped)
        # Nobody is restarted while stopping.
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_kill_waits_for_the_grace_given(self) -> None:
        """--shutdown-grace 30: the workers are killed 35 s after SIGTERM, not before."""
        supervisor = WorkerSupervisor(1, [], LocalAdmission(Policy(), self.reactor), [],
                                      self.reactor, grace=30.0)
        supervisor.startService()
        [worker] = supervisor.workers.values()
        supervisor.stopService()
        self.reactor.advance(34.9)
        self.assertEqual(worker.transport.signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(worker.transport.signals, ["TERM", "KILL"])
        worker.transport.end(KILLED)

    def test_listening_sockets_close_at_once(self) -> None:
        """Stopping, the parent closes its listening sockets before the workers have ended."""
        from twisted.internet import reactor

        from popserv.server.configure import endpoint

        description = "tcp:0:interface=127.0.0.1"
        supervisor = WorkerSupervisor(
            1, [("pop3", description, endpoint("pop3", description, reactor))],
            LocalAdmission(Policy(), self.reactor), [], self.reactor,
        )
        supervisor.privilegedStartService()
        supervisor.startService()
        [bound] = supervisor.bound
        assert bound.sock is not None
        stopped = supervisor.stopService()
        self.assertEqual(bound.sock.fileno(), -1)
        self.assertNoResult(stopped)
        for process in self.reactor.processes[2:]:
            process.end(DONE)
        self.successResultOf(stopped)

    def test_hangup_is_passed_on(self) -> None:
        """SIGHUP to the parent reaches every worker."""
        self.supervisor._hangup(signal.SIGHUP, None)
        self.assertEqual([p.signals for p in self.live()], [["HUP"], ["HUP"]])


class BindTests(TestCase):
    def test_port_in_use(self) -> None:
        """A port in use: one line naming the address, the cannot-listen status."""
        from twisted.internet import reactor

        from popserv.server.configure import endpoint
        from popserv.server.startup import EXIT_CANNOT_LISTEN

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        description = f"tcp:{port}:interface=127.0.0.1"
        with self.assertRaises(StartupError) as caught:
            bind("pop3", description, endpoint("pop3", description, reactor))
        self.assertEqual(caught.exception.status, EXIT_CANNOT_LISTEN)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}: address already in use",
                      caught.exception.message)

    def test_binds_and_listens(self) -> None:
        """A TCP listener: bound, listening, non-blocking, for the workers to adopt."""
        from twisted.internet import reactor

        from popserv.server.configure import endpoint

        description = "haproxy:tcp:0:interface=127.0.0.1"
        bound = bind("pop3", description, endpoint("pop3", description, reactor))
        self.addCleanup(bound.close)
        self.assertTrue(bound.proxied)
        self.assertEqual(bound.family, socket.AF_INET)
        assert bound.sock is not None
        self.assertFalse(bound.sock.getblocking())
        client = socket.create_connection(bound.sock.getsockname())
        client.close()


class SharedLastLoginsTests(TestCase):
    def test_workers_keep_each_others_logins(self) -> None:
        """Two workers saving to one file: each keeps what the other wrote, the newer login wins."""
        from pathlib import Path

        from popserv.server.lastlogin import read_last_logins
        from popserv.server.workers.adopted import SharedLastLogins

        path = Path(self.mktemp())
        a, b = SharedLastLogins.load(path), SharedLastLogins.load(path)
        a.record("alice", 100.0, "192.0.2.1", "PLAIN")
        a.record("carol", 300.0, "192.0.2.1", "PLAIN")
        a.save()
        b.record("bob", 200.0, "192.0.2.2", "USER")
        b.record("carol", 250.0, "192.0.2.2", "USER")
        b.save()
        saved = read_last_logins(path)
        self.assertEqual(sorted(saved), ["alice", "bob", "carol"])
        self.assertEqual(saved["carol"].time, 300.0)
