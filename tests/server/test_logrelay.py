"""A worker's log events, relayed as records and logged by the parent as they were."""

from __future__ import annotations

import json

from twisted.logger import Logger, LogLevel, eventAsText, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from popserv.server.workers.logrelay import event_of, record


def logged(emit: object) -> dict:
    events: list[dict] = []
    log = Logger(namespace="popserv.test", observer=events.append)
    emit(log)  # type: ignore[operator]
    return events[0]


class RelayTests(SynchronousTestCase):
    def test_text_level_system(self) -> None:
        event = logged(lambda log: log.warn("{user} did {what}", user="alice", what="RETR\n"))
        event["log_system"] = "POP3Protocol,7,192.0.2.1"
        line = record(event, fields=False)
        self.assertNotIn("\n", line)
        again = event_of(line.encode(), 4711)
        self.assertEqual(formatEvent(again), "alice did RETR\n")
        self.assertEqual(again["log_level"], LogLevel.warn)
        self.assertEqual(again["log_namespace"], "popserv.test")
        self.assertEqual(again["log_system"], "worker 4711,POP3Protocol,7,192.0.2.1")
        self.assertEqual(again["log_time"], event["log_time"])
        self.assertEqual(again["worker"], 4711)
        self.assertNotIn("user", again)

    def test_no_system(self) -> None:
        again = event_of(record(logged(lambda log: log.info("x")), fields=False), 12)
        self.assertIn("[worker 12] x", eventAsText(again))

    def test_fields_for_json(self) -> None:
        """With fields, the scalar ones come along (a summary's user, counts), not objects."""
        event = logged(lambda log: log.info("{s}", s="sum", user="bob", retr=3, obj=object()))
        again = event_of(record(event, fields=True), 1)
        self.assertEqual((again["user"], again["retr"]), ("bob", 3))
        self.assertNotIn("obj", again)

    def test_traceback_kept(self) -> None:
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        event = logged(lambda log: log.failure("It broke", failure))
        text = eventAsText(event_of(record(event, fields=False), 1))
        self.assertIn("It broke", text)
        self.assertIn("ZeroDivisionError", text)
        self.assertIn("Traceback", text)

    def test_not_a_record(self) -> None:
        for line in (b"hello", b"[1]", b"\xff", json.dumps({"t": 1}).encode()):
            with self.assertRaises(ValueError):
                event_of(line, 1)
