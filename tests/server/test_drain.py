"""
Stopping without dropping sessions (popserv.server.drain): the drain's
timing and counts on a fake clock; what POP3 sessions are told, and when,
on a StringTransport; SMTP sessions and a real Maildir over loopback.
"""

from __future__ import annotations

import poplib

from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from popserv.core import errors, wire
from popserv.core.smtpwire import SHUTTING_DOWN as SMTP_SHUTTING_DOWN
from popserv.interfaces import IMailbox
from popserv.server.drain import CLOSE_TIMEOUT, SHUTDOWN_GRACE, Drain, DrainingService
from popserv.stores.memory import MemoryMailbox
from tests.support import MESSAGES, Session
from tests.support.receiver import START_DATA, ReceiverTestCase, SMTPClient
from tests.support.servers import ServerTestCase, login

GRACE = 10.0
POP3_SHUTTING_DOWN = wire.err(errors.ShuttingDown())


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

    def test_last_session_ends_at_the_start(self) -> None:
        """One closed at once that ends during the start: over, and no timer left to fire."""
        session = FakeSession(self.holders[0], closes_at_once=True)
        session.drain_start = lambda: (session.end(), True)[1]  # type: ignore[method-assign]
        drain, done = self.drain()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(drain.finished, 0)

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


class _SlowCommit(MemoryMailbox):
    """commit answers later, through a Deferred the test fires."""

    def __init__(self, maildrop) -> None:
        super().__init__(maildrop)
        self.committing: Deferred | None = None

    def commit(self, deleted, retrieved) -> Deferred:
        super().commit(deleted, retrieved)
        self.committing = Deferred()
        return self.committing


class POP3DrainTests(SynchronousTestCase):
    """What a POP3 session is told when the server stops, on a StringTransport."""

    def drain(self, s: Session) -> Deferred:
        self.events = self.enterContext(capturedLogs())
        self.drainer = Drain([s.factory], GRACE, s.clock)
        return self.drainer.start()

    def end(self, s: Session) -> None:
        """The connection closes, as the transport would after loseConnection."""
        s.protocol.connectionLost(None)

    def test_not_logged_in_closed_at_once(self) -> None:
        """Waiting for a command before login (USER given or not): -ERR [SYS/TEMP], closed."""
        s = Session()
        other = s.connect()
        other.send(b"USER alice\r\n")
        done = self.drain(s)
        self.assertEqual(POP3_SHUTTING_DOWN, b"-ERR [SYS/TEMP] Server shutting down\r\n")
        self.assertEqual(s.take(), POP3_SHUTTING_DOWN)
        self.assertEqual(other.take(), POP3_SHUTTING_DOWN)
        self.assertTrue(s.transport.disconnecting and other.transport.disconnecting)
        self.assertEqual(self.drainer.closed_at_once, 2)
        self.end(s)
        other.close()
        self.successResultOf(done)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_logged_in_goes_on_and_quit_commits(self) -> None:
        """Logged in: it may still RETR, DELE and QUIT; the QUIT's deletions are applied."""
        s = Session()
        s.login()
        done = self.drain(s)
        self.assertEqual(s.take(), b"")
        self.assertFalse(s.transport.disconnecting)
        self.assertTrue(s.send(b"RETR 1\r\n").startswith(b"+OK"))
        self.assertEqual(s.send(b"DELE 1\r\n"), b"+OK Message 1 deleted\r\n")
        self.assertTrue(s.send(b"QUIT\r\n").startswith(b"+OK Bye, 1 deleted"))
        self.assertEqual(s.maildrop.contents(), MESSAGES[1:])
        self.end(s)
        self.successResultOf(done)
        self.assertEqual((self.drainer.finished, self.drainer.cut), (1, 0))

    def test_idle_at_the_grace_told_and_closed(self) -> None:
        """Logged in and waiting at the grace: -ERR [SYS/TEMP] and closed; DELE not applied."""
        s = Session()
        s.login()
        s.send(b"DELE 1\r\n")
        done = self.drain(s)
        s.clock.advance(GRACE)
        self.assertEqual(s.take(), POP3_SHUTTING_DOWN)
        self.assertTrue(s.transport.disconnecting)
        self.assertFalse(s.transport.disconnected)
        # Still there a moment later (the client does not read): aborted.
        s.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(s.transport.disconnected)
        self.end(s)
        self.successResultOf(done)
        self.assertEqual(s.maildrop.contents(), MESSAGES)
        self.assertFalse(s.maildrop.locked)
        self.assertEqual(self.drainer.cut, 1)
        self.assertTrue(any("server shutting down" in formatEvent(e) for e in self.events))

    def test_mid_retr_cut_without_a_word(self) -> None:
        """Streaming a RETR at the grace: cut, no -ERR inside the message; DELE not applied."""
        s = Session(messages=[b"x" * 100_000, *MESSAGES])
        s.login()
        s.send(b"DELE 2\r\n")
        write = s.transport.write

        def slow_reader(data: bytes) -> None:
            write(data)
            s.transport.producer.pauseProducing()  # the send buffer is full

        self.patch(s.transport, "write", slow_reader)
        self.assertTrue(s.send(b"RETR 1\r\n").startswith(b"+OK 100002 octets\r\nxxx"))
        done = self.drain(s)
        s.clock.advance(GRACE)
        self.assertTrue(s.transport.disconnected)  # aborted
        self.assertEqual(s.take(), b"")
        self.end(s)
        self.successResultOf(done)
        self.assertEqual(len(s.maildrop.contents()), 4)

    def test_login_under_way_finishes_first(self) -> None:
        """A failing login being answered at the start: its -ERR, then the shutdown's."""
        s = Session()
        s.send(b"USER alice\r\nPASS wrong\r\n")
        s.take()
        done = self.drain(s)
        self.assertEqual(self.drainer.closed_at_once, 0)
        self.assertFalse(s.transport.disconnecting)
        s.advance(5)
        self.assertEqual(s.take(), b"-ERR [AUTH] Authentication failed\r\n" + POP3_SHUTTING_DOWN)
        self.assertTrue(s.transport.disconnecting)
        self.end(s)
        self.successResultOf(done)

    def test_a_quit_committing_is_not_cut(self) -> None:
        """A QUIT's commit under way at the grace: not cut; it answers and closes when done."""
        s = Session()
        mailboxes: list[_SlowCommit] = []

        def requestAvatar(avatarId, mind, *interfaces):
            mailboxes.append(_SlowCommit(s.maildrop))
            return IMailbox, mailboxes[-1], mailboxes[-1].close

        self.patch(s.realm, "requestAvatar", requestAvatar)
        s.login()
        s.send(b"DELE 1\r\nQUIT\r\n")
        done = self.drain(s)
        s.clock.advance(GRACE + CLOSE_TIMEOUT)
        self.assertEqual(s.take(), b"")
        self.assertFalse(s.transport.disconnecting)
        mailboxes[0].committing.callback(None)
        self.assertTrue(s.take().startswith(b"+OK Bye, 1 deleted"))
        self.assertTrue(s.transport.disconnecting)
        self.end(s)
        self.successResultOf(done)
        self.assertEqual((self.drainer.finished, self.drainer.cut), (1, 0))
        self.assertEqual(s.maildrop.contents(), MESSAGES[1:])

    def test_admitted_after_the_start(self) -> None:
        """A connection greeted after the drain began gets the -ERR as its greeting."""
        s = Session()
        self.drain(s)
        late = s.connect()
        self.assertEqual(late.greeting, POP3_SHUTTING_DOWN)
        self.assertTrue(late.transport.disconnecting)


class MaildirDrainTests(ServerTestCase):
    """A real Maildir behind a session cut by the drain, over loopback."""

    async def test_dele_without_quit_is_not_applied(self) -> None:
        """DELE, then cut at the grace: -ERR [SYS/TEMP], and every message is still there."""
        before = self.files()

        def open_and_delete() -> poplib.POP3:
            client = self.pop()
            login(client, "alice", "secret")
            client.dele(1)
            client.dele(2)
            return client

        client = await self.run_in_thread(open_and_delete)
        self.addCleanup(client.close)
        clock = Clock()
        done = Drain([self.factory], GRACE, clock).start()
        clock.advance(GRACE)
        line = await self.run_in_thread(client.file.readline)
        self.assertEqual(line, POP3_SHUTTING_DOWN)
        await done
        self.assertEqual(self.files(), before)

    async def test_quit_within_the_grace_is_applied(self) -> None:
        """The same session ending with QUIT within the grace: its DELEs are applied."""
        before = self.files()
        client = await self.run_in_thread(self.pop)
        self.addCleanup(client.close)
        await self.run_in_thread(login, client, "alice", "secret")
        clock = Clock()
        done = Drain([self.factory], GRACE, clock).start()
        await self.run_in_thread(client.dele, 1)
        await self.run_in_thread(client.quit)
        await done
        self.assertEqual(len(self.files()), len(before) - 1)


def stored_count(case: ReceiverTestCase) -> int:
    return len(case.stored("alice"))


class SMTPDrainTests(ReceiverTestCase):
    """SMTP sessions over loopback while the receiver drains (the drain on a fake clock)."""

    def drain(self) -> Deferred:
        self.clock = Clock()
        return Drain([self.smtp], GRACE, self.clock).start()

    async def client(self) -> SMTPClient:
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        return client

    async def ended(self, client: SMTPClient) -> None:
        with self.assertRaises(EOFError):
            await self.in_thread(client.line)

    async def until_no_session(self) -> None:
        for _ in range(500):
            if not self.smtp.sessions:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("sessions still open")

    async def test_idle_session_gets_421_at_once(self) -> None:
        """No mail transaction under way: 421 4.3.2 at once, and the close."""
        client = await self.client()
        client.send(b"EHLO c\r\n")
        await self.in_thread(client.reply)
        done = self.drain()
        self.assertEqual(SMTP_SHUTTING_DOWN, b"421 4.3.2 Service shutting down\r\n")
        self.assertEqual(await self.in_thread(client.codes, 1),
                         [b"421 4.3.2 Service shutting down"])
        await self.ended(client)
        await done

    async def test_transaction_finishes_then_421(self) -> None:
        """A transaction under way goes on: its message is taken and answered, then 421."""
        client = await self.client()
        client.send(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\n")
        await self.in_thread(client.codes, 3)
        done = self.drain()
        client.send(b"DATA\r\nSubject: s\r\n\r\nhi\r\n.\r\n")
        self.assertEqual(await self.in_thread(client.codes, 3), [
            START_DATA,
            b"250 2.0.0 Message accepted for delivery",
            b"421 4.3.2 Service shutting down",
        ])
        await self.ended(client)
        await done
        self.assertEqual(stored_count(self), 1)

    async def test_cut_inside_data_is_never_acknowledged(self) -> None:
        """Mid-DATA at the grace: 421, and the message is neither stored nor answered."""
        client = await self.client()
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        self.assertEqual((await self.in_thread(client.codes, 4))[-1], START_DATA)
        await self.in_thread(client.send, b"Subject: slow\r\n\r\nfirst half\r\n")
        done = self.drain()
        self.clock.advance(GRACE)
        self.assertEqual(await self.in_thread(client.codes, 1),
                         [b"421 4.3.2 Service shutting down"])
        try:
            client.send(b"second half\r\n.\r\n")
        except OSError:
            pass
        await self.ended(client)
        self.assertEqual(client.buffer, b"")
        await done
        self.assertEqual(stored_count(self), 0)

    async def test_a_delivery_under_way_is_answered_first(self) -> None:
        """A delivery running at the grace gets its 250 (it is stored); then the 421."""
        entered, release = self.hold_deliveries()
        client = await self.client()
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        self.assertEqual((await self.in_thread(client.codes, 4))[-1], START_DATA)
        client.send(b"Subject: s\r\n\r\nhi\r\n.\r\n")
        await self.in_thread(entered.wait, 10)
        done = self.drain()
        self.clock.advance(GRACE + CLOSE_TIMEOUT)
        release.set()
        self.assertEqual(await self.in_thread(client.codes, 2), [
            b"250 2.0.0 Message accepted for delivery",
            b"421 4.3.2 Service shutting down",
        ])
        await done
        self.assertEqual(stored_count(self), 1)
