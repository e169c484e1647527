"""
Stopping without dropping sessions (popserv.server.drain): the drain's
timing and counts on a fake clock.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from popserv.server.drain import CLOSE_TIMEOUT, SHUTDOWN_GRACE, Drain, DrainingService

GRACE = 10.0


class FakeSession:
    """A session that says what the drain asked of it, and ends when told."""

    def __init__(self, holder: FakeHolder, *, closes_at_once=False, committing=False) -> None:
        self.holder = holder
        self.closes_at_once = closes_at_once
        self.committing = committing
        self.asked: list[str] = []
        holder.sessions.add(self)

    def drain_start(self) -> bool:
        self.asked.append("start")
        return self.closes_at_once

    def drain_cut(self) -> bool:
        self.asked.append("cut")
        return not self.committing

    def drain_abort(self) -> None:
        self.asked.append("abort")

    def end(self) -> None:
        self.holder.sessions.discard(self)
        if self.holder.draining is not None:
            self.holder.draining.ended(self)


class FakeHolder:
    def __init__(self) -> None:
        self.draining = None
        self.sessions: set[FakeSession] = set()

    def drainable(self) -> set[FakeSession]:
        return self.sessions


def log_lines(events) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "popserv.server.drain"]


class DrainTests(SynchronousTestCase):
    """The drain's timing on a fake clock, with sessions that do as told."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.holders = [FakeHolder(), FakeHolder()]

    def drain(self) -> tuple[Drain, Deferred]:
        drain = Drain(self.holders, GRACE, self.clock)
        return drain, drain.start()

    def test_no_sessions(self) -> None:
        """Nothing open: the drain is over at once, with no timer left behind."""
        _, done = self.drain()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_over_when_the_last_session_ends(self) -> None:
        """Sessions that end within the grace: done at the last one, nothing cut."""
        first, second = FakeSession(self.holders[0]), FakeSession(self.holders[1])
        with capturedLogs() as events:
            _, done = self.drain()
            self.clock.advance(GRACE - 1)
            first.end()
            self.assertNoResult(done)
            second.end()
        self.successResultOf(done)
        self.assertEqual(first.asked, ["start"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(log_lines(events), [
            "Shutting down: no new connections; 2 sessions open, 0 closed at once"
            " (not logged in, or no mail under way), 10 s for the rest",
            "Shut down: 2 sessions finished, 0 cut at the end of the grace",
        ])

    def test_the_rest_cut_at_the_grace(self) -> None:
        """At the grace the sessions left are cut; aborted if still there a moment later."""
        quick, slow = FakeSession(self.holders[0]), FakeSession(self.holders[0])
        at_once = FakeSession(self.holders[1], closes_at_once=True)
        with capturedLogs() as events:
            drain, done = self.drain()
            at_once.end()
            quick.end()
            self.clock.advance(GRACE - 0.1)
            self.assertEqual(slow.asked, ["start"])
            self.clock.advance(0.1)
            self.assertEqual(slow.asked, ["start", "cut"])
            self.assertNoResult(done)
            self.clock.advance(CLOSE_TIMEOUT)
            self.assertEqual(slow.asked, ["start", "cut", "abort"])
            slow.end()
        self.successResultOf(done)
        self.assertEqual((drain.open, drain.closed_at_once, drain.cut, drain.finished),
                         (3, 1, 1, 1))
        self.assertIn("Shut down: 1 sessions finished, 1 cut at the end of the grace",
                      log_lines(events))

    def test_a_commit_is_waited_for(self) -> None:
        """A session committing a QUIT is not cut: the drain waits for it, past the grace."""
        committing = FakeSession(self.holders[0], committing=True)
        drain, done = self.drain()
        self.clock.advance(GRACE + CLOSE_TIMEOUT + 60)
        self.assertNoResult(done)
        committing.end()
        self.successResultOf(done)
        self.assertEqual((drain.cut, drain.finished), (0, 1))


class _Listener(Service):
    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name

    def stopService(self) -> None:
        super().stopService()
        self.log.append(self.name)


class DrainingServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stopped: list[str] = []
        self.service = DrainingService(GRACE, self.clock)
        _Listener(self.stopped, "writer").setServiceParent(self.service)
        self.service.serve(_Listener(self.stopped, "listener"))
        self.holder = FakeHolder()
        self.service.drained = [self.holder]
        self.service.startService()

    def test_default_grace(self) -> None:
        self.assertEqual(SHUTDOWN_GRACE, 10.0)
        self.assertEqual(DrainingService().grace, SHUTDOWN_GRACE)

    def test_listeners_first_then_the_sessions_then_the_rest(self) -> None:
        """Listening stops at once; the other children once the last session has ended."""
        session = FakeSession(self.holder)
        stopping = self.service.stopService()
        self.assertEqual(self.stopped, ["listener"])
        self.assertEqual(session.asked, ["start"])
        self.clock.advance(GRACE - 1)
        self.assertNoResult(stopping)
        session.end()
        self.successResultOf(stopping)
        self.assertEqual(self.stopped, ["listener", "writer"])
        self.assertFalse(self.service.running)

    def test_bounded_by_the_grace(self) -> None:
        """A session that does not end is cut at the grace, and the stop completes."""
        session = FakeSession(self.holder)
        stopping = self.service.stopService()
        self.clock.advance(GRACE)
        self.assertEqual(session.asked, ["start", "cut"])
        self.assertEqual(self.stopped, ["listener"])
        session.end()
        self.successResultOf(stopping)
        self.assertEqual(self.stopped, ["listener", "writer"])
