"""
The parent-worker channel: its line format (pure), and both ends over a
real UNIX socketpair on the reactor, asking each other.
"""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionClosed
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.server.admission import LocalAdmission
from popserv.server.policy import Policy
from popserv.server.workers import connect_admission, serve_admission
from popserv.server.workers.channel import Channel, RemoteError, decode, encode
from tests.support.fuzzing import examples

texts = st.one_of(st.none(), st.text())


class FormatTests(SynchronousTestCase):
    @settings(max_examples=examples(300), deadline=None)
    @given(op=st.sampled_from([b"C", b"+", b"!", b"Q"]), id=st.integers(0, 2**63),
           fields=st.lists(texts, max_size=5))
    def test_round_trip(self, op: bytes, id: int, fields: list[str | None]) -> None:
        """Any text (tabs, newlines, backslashes, a leading '-') and None come back as sent."""
        line = encode(op, id, fields)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(decode(line[:-1]), (op, id, fields))

    def test_none_and_dash_differ(self) -> None:
        self.assertEqual(encode(b"T", 7, [None, "-", "--x"]), b"T\t7\t-\t--\t---x\n")

    def test_short(self) -> None:
        """A connection's question is a few bytes (AMP's was about 90)."""
        self.assertEqual(encode(b"C", 12, ["pop3", "192.0.2.1"]), b"C\t12\tpop3\t192.0.2.1\n")

    def test_malformed(self) -> None:
        for line in (b"", b"C", b"C\tx", b"C\t1\t\xff"):
            with self.assertRaises((ValueError, UnicodeDecodeError)):
                decode(line)


class _Echo(Channel):
    answered = frozenset({b"E", b"X"})  # X has no handler

    def __init__(self) -> None:
        super().__init__()
        self.told: list[tuple[int, str | None]] = []
        self.handlers[b"E"] = lambda id, *fields: fields
        self.handlers[b"N"] = lambda id, text: self.told.append((id, text))


class ChannelTests(TestCase):
    def pair(self) -> tuple[_Echo, _Echo]:
        from popserv.server.workers.admission import _adopt

        a, b = _Echo(), _Echo()
        left, right = socket.socketpair()
        for end, sock in ((a, left), (b, right)):
            _adopt(reactor, sock.fileno(), end)
            sock.close()
        self.addCleanup(self.close, a, b)
        return a, b

    async def close(self, *ends: Channel) -> None:
        for end in ends:
            if not end.lost and end.transport is not None:
                end.transport.loseConnection()

    async def test_both_ends_ask(self) -> None:
        a, b = self.pair()
        self.assertEqual(await a.call(b"E", a.next_id(), "x\ty", None), ["x\ty", None])
        self.assertEqual(await b.call(b"E", b.next_id(), "-"), ["-"])

    async def test_cancelled_question_forgotten(self) -> None:
        """A question given up (a timeout) is forgotten: its late answer breaks nothing."""
        a, b = self.pair()
        later: Deferred[list[str]] = Deferred()
        b.handlers[b"E"] = lambda id, *fields: later
        waiting = a.call(b"E", a.next_id(), "x")
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual(a.waiting, {})
        b.handlers[b"E"] = lambda id, *fields: fields
        with capturedLogs():
            later.callback(["late"])
            self.assertEqual(await a.call(b"E", a.next_id(), "next"), ["next"])

    async def test_many_in_flight_in_order(self) -> None:
        """Answers find their questions however the lines are split into reads."""
        a, _ = self.pair()
        answers = [a.call(b"E", a.next_id(), str(i) * (i % 50)) for i in range(2000)]
        for i, answer in enumerate(answers):
            self.assertEqual(await answer, [str(i) * (i % 50)])

    async def test_unhandled_question_answered_with_error(self) -> None:
        a, _ = self.pair()
        with self.assertRaises(RemoteError) as caught:
            await a.call(b"X", a.next_id())
        self.assertEqual(caught.exception.code, "FAILED")
        self.assertEqual(len(self.flushLoggedErrors(LookupError)), 1)
        self.assertEqual(await a.call(b"E", a.next_id(), "still"), ["still"])

    async def test_notice_is_not_answered(self) -> None:
        a, b = self.pair()
        a.send(b"N", 5, "hello")
        await a.call(b"E", a.next_id())
        self.assertEqual(b.told, [(5, "hello")])

    async def test_malformed_line_dropped_and_logged(self) -> None:
        """A bad line is logged; the lines after it are still read."""
        a, _ = self.pair()
        with capturedLogs() as events:
            a.transport.write(b"garbage\n")
            self.assertEqual(await a.call(b"E", a.next_id(), "ok"), ["ok"])
        self.assertTrue(any("malformed" in formatEvent(e) for e in events))

    async def test_lost_fails_waiting_questions(self) -> None:
        a, b = self.pair()
        handler_answer: Deferred[list[str]] = Deferred()
        b.handlers[b"E"] = lambda id, *fields: handler_answer
        waiting = a.call(b"E", a.next_id(), "x")
        b.transport.loseConnection()
        with self.assertRaises(ConnectionClosed):
            await waiting
        with self.assertRaises(ConnectionClosed):
            await a.call(b"E", a.next_id())
        handler_answer.callback(["late"])  # Answered after the end: nothing is sent, no error.


class QueryTests(TestCase):
    """The parent asks a worker (who, kick, metrics are asked this way)."""

    def setUp(self) -> None:
        parent_end, worker_end = socket.socketpair()
        local = LocalAdmission(Policy(hostname="pop.example.org"), reactor)
        self.server = serve_admission(parent_end, local, reactor)
        self.remote = connect_admission(worker_end.detach(), reactor)

    async def tearDown(self) -> None:
        self.remote.protocol.transport.loseConnection()
        await self.server.when_lost()

    async def test_answered_with_json(self) -> None:
        self.remote.answer("double", lambda argument: {"twice": argument * 2})
        self.assertEqual(await self.server.ask("double", 21), {"twice": 42})

    async def test_deferred_answer(self) -> None:
        later: Deferred[list[int]] = Deferred()
        self.remote.answer("later", lambda _: later)
        answer = self.server.ask("later")
        reactor.callLater(0, later.callback, [1, 2])
        self.assertEqual(await answer, [1, 2])

    async def test_stuck_worker_times_out(self) -> None:
        self.remote.answer("stuck", lambda _: Deferred())
        with self.assertRaises(defer.TimeoutError):
            await self.server.ask("stuck", timeout=0.1)
        self.remote.answer("one", lambda _: 1)
        self.assertEqual(await self.server.ask("one"), 1)

    async def test_unknown_kind(self) -> None:
        with self.assertRaises(RemoteError) as caught:
            await self.server.ask("nothing")
        self.assertEqual(caught.exception.code, "FAILED")
        self.assertEqual(len(self.flushLoggedErrors(LookupError)), 1)

    async def test_failing_answer(self) -> None:
        def broken(_: object) -> None:
            raise RuntimeError("boom")

        self.remote.answer("broken", broken)
        with self.assertRaises(RemoteError):
            await self.server.ask("broken")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # The channel still works.
        self.remote.answer("one", lambda _: 1)
        self.assertEqual(await self.server.ask("one"), 1)
