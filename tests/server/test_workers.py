"""
Admission across worker processes: one parent's LocalAdmission asked by
several RemoteAdmissions over real UNIX socketpairs, on the real reactor;
a real child process killed with SIGKILL; and real POP3 factories using a
RemoteAdmission, with poplib over loopback TCP.
"""

from __future__ import annotations

import os
import poplib
import signal
import socket
import sys
import time
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from popserv.core.errors import TemporaryFailure, TooManySessions
from popserv.server.admission import ILoginTurn, LocalAdmission, OverLimit
from popserv.server.factory import POP3Factory
from popserv.server.policy import Policy
from popserv.server.workers import (
    AdmissionServer,
    AdmissionUnavailable,
    RemoteAdmission,
    connect_admission,
    serve_admission,
)
from popserv.stores.memory import MemoryMaildrop, MemoryRealm
from tests.support import MESSAGES
from tests.support.processes import REPO

CLIENT = "192.0.2.1"


def policy(**limits: Any) -> Policy:
    return Policy(hostname="pop.example.org", **limits)


def failure_of(d: Deferred[Any]) -> Failure | None:
    box: list[Any] = []
    d.addBoth(box.append)
    return box[0] if box and isinstance(box[0], Failure) else None


def turns(server: AdmissionServer) -> list[object]:
    """The login turns a worker holds (its sync() leases may not be given back yet)."""
    return [held for held in server.held.values() if ILoginTurn.providedBy(held)]


class WorkersTestCase(TestCase):
    """A parent LocalAdmission and helpers to connect 'workers' to it in this process."""

    def setUp(self) -> None:
        self.servers: list[AdmissionServer] = []

    def parent(self, clock: Any = reactor, **limits: Any) -> LocalAdmission:
        self.local = LocalAdmission(policy(**limits), clock)
        return self.local

    def worker(self, clock: Any = None) -> tuple[AdmissionServer, RemoteAdmission]:
        """A 'worker': a socketpair, the parent's end served, the other adopted."""
        parent_end, worker_end = socket.socketpair()
        server = serve_admission(parent_end, self.local, reactor, name=f"w{len(self.servers)}")
        remote = connect_admission(worker_end.detach(), reactor, clock)
        self.servers.append(server)
        self.addCleanup(self.disconnect, remote, server)
        return server, remote

    async def disconnect(self, remote: RemoteAdmission, server: AdmissionServer) -> None:
        """The worker's end closes; wait until the parent has given back what it held."""
        if remote.protocol.transport is not None:
            remote.protocol.transport.loseConnection()
        await server.when_lost()

    async def sync(self, *remotes: RemoteAdmission) -> None:
        """A round trip on each connection: what was sent before has been handled."""
        for remote in remotes:
            lease = await remote.connection("sync", None)
            lease.release()

    async def refused(self, d: Deferred[Any], kind: type[Exception]) -> Exception:
        try:
            await d
        except kind as e:
            return e
        raise self.failureException(f"not refused with {kind.__name__}")


class LimitsAcrossWorkersTests(WorkersTestCase):
    async def test_connections_per_client(self) -> None:
        """With 4 per IP, the fifth connection is refused whichever worker asks."""
        self.parent(max_connections_per_ip=4)
        _, a = self.worker()
        _, b = self.worker()
        leases = [await a.connection("pop3", CLIENT), await b.connection("pop3", CLIENT)]
        leases += [await b.connection("pop3", CLIENT), await a.connection("pop3", CLIENT)]
        self.assertEqual(self.local.clients("pop3"), {CLIENT: 4})
        for remote in (a, b):
            error = await self.refused(remote.connection("pop3", CLIENT), OverLimit)
            self.assertEqual(str(error), f"4 connections from {CLIENT}")
        # Another client, and another service, are not affected.
        await a.connection("pop3", "192.0.2.2")
        await b.connection("smtp", CLIENT)
        # A connection ended in worker A makes room for one in worker B.
        leases[0].release()
        leases[0].release()  # Idempotent: given back once.
        # Releases are sent without an answer; the parent has them once A's
        # next round trip is over (only then is B's question sure to follow).
        await self.sync(a)
        await b.connection("pop3", CLIENT)
        self.assertEqual(self.local.clients("pop3"), {CLIENT: 4, "192.0.2.2": 1})

    async def test_connections_in_all(self) -> None:
        """max_connections counts every worker's connections."""
        self.parent(max_connections=3)
        _, a = self.worker()
        _, b = self.worker()
        await a.connection("pop3", "192.0.2.1")
        await b.connection("pop3", "192.0.2.2")
        lease = await b.connection("pop3", None)
        error = await self.refused(a.connection("pop3", "192.0.2.4"), OverLimit)
        self.assertEqual(str(error), "3 connections in all")
        lease.release()
        await self.sync(b)
        await a.connection("pop3", "192.0.2.4")
        self.assertEqual(self.local.connections["pop3"], 3)

    async def test_user_sessions(self) -> None:
        """max_user_sessions counts a user's sessions in every worker."""
        self.parent(max_user_sessions=2)
        _, a = self.worker()
        _, b = self.worker()
        first = await a.user_session("alice")
        await b.user_session("alice")
        for remote in (a, b):
            error = await self.refused(remote.user_session("alice"), TooManySessions)
            self.assertEqual(error.detail, "2 sessions already")
        await a.user_session("bob")
        first.release()
        await self.sync(a)
        await b.user_session("alice")
        self.assertEqual(self.local.user_sessions["alice"], 2)


class PenaltyAcrossWorkersTests(WorkersTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.parent(self.clock, auth_failure_delay=2.0, auth_failure_max_delay=15.0)

    async def test_penalty_grows_across_workers(self) -> None:
        """Failures via worker A delay attempts via worker B, and the penalty grows."""
        _, a = self.worker()
        _, b = self.worker()
        turn = await a.login_turn(CLIENT)
        self.assertEqual(await turn.failed("alice"), 2.0)
        waiting = b.login_turn(CLIENT)
        await self.sync(a, b)
        self.clock.advance(1.9)
        await self.sync(b)
        self.assertFalse(waiting.called)
        self.clock.advance(0.1)
        turn = await waiting
        self.assertEqual(await turn.failed("alice"), 4.0)
        # Back in worker A, the next attempt waits the grown penalty.
        waiting = a.login_turn(CLIENT)
        await self.sync(a)
        self.clock.advance(3.9)
        await self.sync(a)
        self.assertFalse(waiting.called)
        self.clock.advance(0.1)
        turn = await waiting
        # A success forgives that user's failures, in every worker.
        turn.succeeded("alice")
        await self.sync(a)
        turn = await b.login_turn(CLIENT)
        turn.release()

    async def test_attempts_take_turns_across_workers(self) -> None:
        """A penalised client's attempts in two workers are checked one at a time."""
        _, a = self.worker()
        _, b = self.worker()
        (await a.login_turn(CLIENT)).release()
        await (await a.login_turn(CLIENT)).failed("x")
        first = a.login_turn(CLIENT)
        second = b.login_turn(CLIENT)
        await self.sync(a, b)
        self.clock.advance(2.0)
        held = await first
        await self.sync(b)
        self.clock.advance(10)
        await self.sync(b)
        self.assertFalse(second.called)  # Behind A's attempt, however long it takes.
        held.release()
        await self.sync(a, b)
        self.clock.advance(2.0)
        (await second).release()

    async def test_cancelling_gives_up_the_place(self) -> None:
        """Cancelling a waiting login_turn in a worker gives up its place in the parent."""
        server_a, a = self.worker()
        _, b = self.worker()
        await (await a.login_turn(CLIENT)).failed("x")
        first = a.login_turn(CLIENT)
        second = b.login_turn(CLIENT)
        await self.sync(a, b)
        self.assertEqual(len(server_a.open), 1)
        first.cancel()
        self.assertIsInstance(failure_of(first).value, CancelledError)  # type: ignore[union-attr]
        await self.sync(a)
        self.assertEqual((server_a.open, turns(server_a)), ({}, []))
        self.clock.advance(2.0)
        (await second).release()

    async def test_cancel_after_the_turn_began(self) -> None:
        """A cancel that crosses the answer gives the turn back all the same."""
        server_a, a = self.worker()
        waiting = a.login_turn(CLIENT)
        waiting.cancel()  # Sent right after the question, before its answer.
        self.assertIsInstance(failure_of(waiting).value, CancelledError)  # type: ignore[union-attr]
        await self.sync(a)
        self.assertEqual((server_a.open, turns(server_a)), ({}, []))

    async def test_started_is_the_workers_clock(self) -> None:
        """A remote turn's ``started`` is the worker's clock when it asked, not the parent's."""
        worker_clock = Clock()
        worker_clock.advance(1000)
        self.clock.advance(5)
        _, a = self.worker(worker_clock)
        turn = await a.login_turn(CLIENT)
        self.assertEqual(turn.started, 1000)
        await turn.failed("x")
        worker_clock.advance(1)
        waiting = a.login_turn(CLIENT)
        await self.sync(a)
        self.clock.advance(2.0)
        turn = await waiting
        # Asked at 1001 on the worker's clock; the 2 s waited in the parent count.
        self.assertEqual(turn.started, 1001)
        turn.release()


class WorkerLostTests(WorkersTestCase):
    async def test_leases_given_back(self) -> None:
        """A worker's connection lost: its users can log in at once via another worker."""
        self.parent(max_user_sessions=1, max_connections_per_ip=1)
        server_b, b = self.worker()
        _, a = self.worker()
        await b.user_session("alice")
        await b.connection("pop3", CLIENT)
        await self.refused(a.user_session("alice"), TooManySessions)
        with capturedLogs() as events:
            await self.disconnect(b, server_b)
        await a.user_session("alice")
        await a.connection("pop3", CLIENT)
        self.assertEqual(dict(self.local.user_sessions), {"alice": 1})
        self.assertEqual(self.local.clients("pop3"), {CLIENT: 1})
        logged = [formatEvent(e) for e in events]
        self.assertTrue(any("gave back 2 lease(s), 0 login turn(s)" in m for m in logged), logged)

    async def test_turns_given_back(self) -> None:
        """A lost worker's held and waiting turns pass on to the other workers."""
        clock = Clock()
        self.parent(clock, auth_failure_delay=2.0)
        server_b, b = self.worker()
        _, a = self.worker()
        await (await b.login_turn(CLIENT)).failed("x")
        clock.advance(2.0)  # Nothing waits yet: the next turn still waits 2 s.
        held = b.login_turn(CLIENT)
        await self.sync(b)
        clock.advance(2.0)
        await held
        waiting_b = b.login_turn(CLIENT)
        waiting_a = a.login_turn(CLIENT)
        await self.sync(a, b)
        self.assertEqual((len(turns(server_b)), len(server_b.open)), (1, 1))
        await self.disconnect(b, server_b)
        self.assertIsInstance(failure_of(waiting_b).value, AdmissionUnavailable)  # type: ignore[union-attr]
        clock.advance(2.0)
        (await waiting_a).release()

    async def test_worker_fails_closed(self) -> None:
        """With the parent gone, a worker refuses connections and logins, and logs it once."""
        self.parent()
        server, a = self.worker()
        lease = await a.connection("pop3", CLIENT)
        with capturedLogs() as events:
            server.transport.loseConnection()
            await a.when_lost()
        logged = [formatEvent(e) for e in events if "refusing every" in formatEvent(e)]
        self.assertEqual(len(logged), 1)
        lease.release()  # Nothing to tell: the parent gave it back already.
        error = await self.refused(a.connection("pop3", CLIENT), AdmissionUnavailable)
        # A listener refuses the connection (OverLimit); a login answers SYS/TEMP.
        self.assertIsInstance(error, OverLimit)
        self.assertIsInstance(error, TemporaryFailure)
        await self.refused(a.user_session("alice"), AdmissionUnavailable)
        await self.refused(a.login_turn(CLIENT), AdmissionUnavailable)
        self.assertEqual(dict(self.local.connections), {})

    async def test_open_questions_fail_closed(self) -> None:
        """A question waiting in the parent when the connection ends fails closed."""
        clock = Clock()
        self.parent(clock)
        server, a = self.worker()
        await (await a.login_turn(CLIENT)).failed("x")
        waiting = a.login_turn(CLIENT)
        await self.sync(a)
        server.transport.loseConnection()
        await self.refused(waiting, AdmissionUnavailable)

    async def test_duplicate_id_refused(self) -> None:
        """A worker reusing an id it holds is answered with an error, and keeps its connection."""
        self.parent()
        server, a = self.worker()
        from popserv.server.workers.admission import CONNECT

        await a.connection("pop3", CLIENT)
        held = next(iter(server.held))
        with capturedLogs():
            d = a._call(CONNECT, held, "pop3", CLIENT)
            await self.refused(d, AdmissionUnavailable)
        await a.connection("pop3", CLIENT)
        self.assertEqual(self.local.clients("pop3"), {CLIENT: 2})


# A worker process: takes a connection lease, a user session and a login
# turn (of a penalised client: it holds the client's lock), says so, runs.
CHILD = """
import sys
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from popserv.server.workers import connect_admission

admission = connect_admission(3, reactor)

async def main():
    await admission.connection("pop3", "192.0.2.1")
    await admission.user_session("alice")
    await admission.login_turn("192.0.2.1")
    sys.stdout.write("held\\n")
    sys.stdout.flush()

def crash(failure):
    failure.printTraceback()
    reactor.stop()

reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()).addErrback(crash))
reactor.run()
"""


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.held: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"held\n" in self.output and not self.held.called:
            self.held.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.held.called:
            self.held.errback(AssertionError(self.output.decode(errors="replace")))
        self.ended.callback(None)


class ChildProcessTests(WorkersTestCase):
    async def test_killed_worker_gives_back(self) -> None:
        """A worker process killed with SIGKILL: the parent gives back all it held."""
        self.parent(max_user_sessions=1, auth_failure_delay=0.05)
        self.local.penalties.failed(CLIENT, "x")
        parent_end, child_end = socket.socketpair()
        server = serve_admission(parent_end, self.local, reactor, name="child")
        child = _Child()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-c", CHILD],
            env,
            childFDs={0: "w", 1: "r", 2: "r", 3: child_end.fileno()},
        )
        # The parent keeps no copy of the child's end, or its death is not seen.
        child_end.close()
        self.addCleanup(lambda: child.ended)
        await child.held.addTimeout(30, reactor)
        self.assertEqual(dict(self.local.user_sessions), {"alice": 1})
        self.assertEqual(self.local.clients("pop3"), {CLIENT: 1})
        # Another worker's attempt from that client waits behind the child's turn.
        _, a = self.worker()
        waiting = a.login_turn(CLIENT)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(waiting.called)
        process.signalProcess(signal.SIGKILL)
        await server.when_lost().addTimeout(30, reactor)
        self.assertEqual(dict(self.local.user_sessions), {})
        self.assertEqual(self.local.clients("pop3"), {})
        (await waiting.addTimeout(10, reactor)).release()
        await a.user_session("alice")


class POP3EndToEndTests(WorkersTestCase):
    """Real POP3 factories in two 'workers', each on its own loopback port."""

    def pop3_worker(self) -> tuple[int, RemoteAdmission]:
        _, remote = self.worker()
        realm = MemoryRealm({"alice": MemoryMaildrop(MESSAGES)})
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        factory = POP3Factory(Portal(realm, [checker]), self.local.policy, admission=remote)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, remote

    def client(self, port: int) -> poplib.POP3:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        self.addCleanup(pop.close)
        return pop

    async def test_login_and_user_sessions(self) -> None:
        """poplib logs in via worker A; the user-session limit holds via worker B."""
        self.parent(max_user_sessions=1)
        port_a, _ = self.pop3_worker()
        port_b, _ = self.pop3_worker()

        def log_in(port: int) -> tuple[poplib.POP3, bytes]:
            pop = self.client(port)
            pop.user("alice")
            try:
                return pop, pop.pass_("secret")
            except poplib.error_proto as e:
                return pop, e.args[0]

        pop_a, answer = await deferToThread(log_in, port_a)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertEqual((await deferToThread(pop_a.stat))[0], len(MESSAGES))
        _, answer = await deferToThread(log_in, port_b)
        self.assertTrue(answer.startswith(b"-ERR [IN-USE]"), answer)
        await deferToThread(pop_a.quit)
        for _ in range(100):
            if not self.local.user_sessions:
                break
            await deferLater(reactor, 0.01, lambda: None)
        pop_b, answer = await deferToThread(log_in, port_b)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        await deferToThread(pop_b.quit)

    async def test_penalty_across_factories(self) -> None:
        """A failed login via worker A delays the next attempt's answer via worker B."""
        self.parent(auth_failure_delay=0.3, auth_failure_max_delay=1.0)
        port_a, _ = self.pop3_worker()
        port_b, _ = self.pop3_worker()

        def failed_login(port: int) -> float:
            pop = self.client(port)
            pop.user("alice")
            began = time.monotonic()
            with self.assertRaises(poplib.error_proto):
                pop.pass_("wrong")
            return time.monotonic() - began

        self.assertGreaterEqual(await deferToThread(failed_login, port_a), 0.29)
        # B's attempt waits 0.3 s for its turn, and is answered 0.6 s after it began.
        self.assertGreaterEqual(await deferToThread(failed_login, port_b), 0.59)

    async def test_connections_refused_after_parent_lost(self) -> None:
        """A worker whose parent is gone refuses connections rather than admitting them."""
        self.parent()
        port, remote = self.pop3_worker()
        self.servers[0].transport.loseConnection()
        await remote.when_lost()

        def greeting() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                return s.recv(1024)

        answer = await deferToThread(greeting)
        self.assertEqual(answer, b"-ERR [SYS/TEMP] Too many connections, try again later\r\n")
