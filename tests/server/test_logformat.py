"""
``--log-format json``: one JSON object per line with the time, level,
module, the text line and the event's own scalar fields.
"""

from __future__ import annotations

import io
import json
import os
import poplib
import re
import signal
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.logins.passwords import PasswdFile, hash_password
from popserv.server import logformat
from popserv.server.logformat import event_as_json, json_file_observer, json_observer
from popserv.server.startup import EXIT_CONFIG
from popserv.stores.maildir import deliver
from tests.support.processes import REPO, _Twistd, free_port, twistd_script


def event(**fields) -> dict:
    return {
        "log_time": 1_765_008_000.25,
        "log_level": LogLevel.info,
        "log_namespace": "popserv.server.protocol",
        "log_logger": Logger(),
        "log_source": None,
        "log_system": "POP3Factory,1,127.0.0.1",
        **fields,
    }


class EventTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """The object's own keys, then the event's scalars; no log_* key, no objects."""
        line = event_as_json(event(
            log_format="Logged out {user}: retr={retr}/{retr_octets}, {duration} s",
            user="alice", retr=2, retr_octets=4096, duration=1.5, tls=None, ok=True,
            raw=b"bytes", thing=object(), nan=float("nan"),
        ))
        self.assertNotIn("\n", line)
        self.assertEqual(json.loads(line), {
            "time": "2025-12-06T08:00:00.250Z",
            "level": "info",
            "namespace": "popserv.server.protocol",
            "text": "Logged out alice: retr=2/4096, 1.5 s",
            "user": "alice", "retr": 2, "retr_octets": 4096, "duration": 1.5,
            "tls": None, "ok": True,
        })

    def test_the_objects_own_keys_win(self) -> None:
        """A field named like one of the object's keys never replaces it."""
        record = json.loads(event_as_json(event(log_format="x", time=5, level="forged")))
        self.assertEqual((record["time"][:4], record["level"]), ("2025", "info"))

    def test_failure_has_its_traceback_in_text(self) -> None:
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = json.loads(event_as_json(event(
            log_format="Reading a message failed", log_failure=failure,
            log_level=LogLevel.critical,
        )))
        self.assertEqual(record["level"], "critical")
        self.assertIn("Reading a message failed", record["text"])
        self.assertIn("ZeroDivisionError", record["text"])

    def test_control_characters_never_raw(self) -> None:
        """CR, LF, ESC, DEL and C1 controls are escaped by JSON; so is non-ASCII."""
        evil = "a\r\nFAKE\x1b[2J\x07\x7f\x9b\u0430"
        line = event_as_json(event(log_format="{name}", name=evil))
        self.assertIsNone(re.search(r"[\x00-\x1f\x7f-\uffff]", line), line)
        self.assertEqual(json.loads(line)["name"], evil)

    def test_legacy_events(self) -> None:
        """twisted.python.log's events (Twisted's own "Starting factory"): their text only."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            legacy.msg(format="(TCP Port %(port)s Closed)", port=110)
        finally:
            globalLogPublisher.removeObserver(events.append)
        record = json.loads(event_as_json(events[-1]))
        self.assertEqual(record["text"], "(TCP Port 110 Closed)")
        self.assertEqual(record["port"], 110)
        for key in ("message", "isError", "system", "format", "time"):
            self.assertNotEqual(record.get(key), events[-1].get(key), key)

    def test_observer_writes_one_line_per_event(self) -> None:
        out = io.StringIO()
        observer = json_file_observer(out)
        observer(event(log_format="one"))
        observer(event(log_format="two {n}", n=2))
        lines = out.getvalue().splitlines()
        self.assertEqual([json.loads(x)["text"] for x in lines], ["one", "two 2"])


class OptionTests(SynchronousTestCase):
    """How twistd's options and popserv's meet."""

    def setUp(self) -> None:
        self.addCleanup(logformat._destination.clear)
        self.data = str(Path(self.mktemp()).absolute())

    def parse(self, *argv: str) -> ServerOptions:
        config = ServerOptions()
        config.parseOptions([*argv, "popserv", "--data", self.data, "--pop3", "tcp:0",
                             *(["--log-format", "json"] if "text" not in argv else [])])
        return config

    def test_json_names_the_observer_factory(self) -> None:
        config = self.parse("-n")
        self.assertIs(config["logger"], json_observer)
        self.assertEqual(config.subOptions["log-format"], "json")

    def test_text_is_twistds_own(self) -> None:
        config = ServerOptions()
        config.parseOptions(["-n", "popserv", "--data", self.data, "--log-format", "text"])
        self.assertIsNone(config["logger"])

    def test_destination(self) -> None:
        """Standard output with -n; otherwise the --logfile, as twistd would write text."""
        self.parse("-n")
        self.patch(sys, "stdout", io.StringIO())
        json_observer()(event(log_format="to stdout"))
        self.assertIn('"text":"to stdout"', sys.stdout.getvalue())
        path = Path(self.mktemp()).absolute()
        self.parse("-n", "--logfile", str(path))
        observer = json_observer()
        observer(event(log_format="to the file"))
        [line] = path.read_text().splitlines()
        self.assertEqual(json.loads(line)["text"], "to the file")

    def test_bad_value(self) -> None:
        from twisted.python.usage import UsageError

        from popserv.server.tap import Options

        with self.assertRaises(UsageError) as raised:
            Options().parseOptions(["--log-format", "xml"])
        self.assertIn("log-format", str(raised.exception))


class TwistdJSONTests(TestCase):
    """A real ``twistd popserv --log-format json``, a real session, its log lines."""

    def setUp(self):
        self.twistd = twistd_script()
        self.dir = Path(self.mktemp()).absolute()
        data = self.dir / "data"
        data.mkdir(parents=True)
        PasswdFile(data / "passwd").add("alice", hash_password("alice pw", "PLAIN"))
        deliver(data / "mail" / "alice", b"Subject: hi\n\nhello\n")
        self.data = data

    def start(self, *twistd: str) -> _Twistd:
        self.port = free_port()
        process = _Twistd()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("LISTEN_FDS", None)
        command = [self.twistd, "-n", "--pidfile", "", *twistd, "popserv",
                   "--pop3", f"tcp:{self.port}:interface=127.0.0.1", "--hostname", "pop.test",
                   "--data", str(self.data), "--log-format", "json"]
        transport = reactor.spawnProcess(process, self.twistd, command, env, str(self.dir))

        async def stop():
            if transport.pid is not None:
                transport.signalProcess(signal.SIGTERM)
            await process.ended

        self.stop = stop
        self.addCleanup(lambda: Deferred.fromCoroutine(stop()) if not process.ended.called
                        else None)
        return process

    def session(self) -> None:
        client = poplib.POP3("127.0.0.1", self.port, timeout=30)
        client.user("alice")
        client.pass_("alice pw")
        client.retr(1)
        client.quit()

    async def test_stdout(self):
        """Every line is one JSON object; the summary's fields are queryable."""
        process = self.start()
        await process.wait_for(b"starting on")
        await deferToThread(self.session)
        await process.wait_for(b"Logged out")
        await self.stop()
        lines = process.output.decode().splitlines()
        records = [json.loads(line) for line in lines]
        [summary] = [r for r in records if r["text"].startswith("Logged out")]
        self.assertEqual(
            {k: summary[k] for k in ("user", "mechanism", "retr", "ended", "namespace")},
            {"user": "alice", "mechanism": "USER", "retr": 1, "ended": "QUIT",
             "namespace": "popserv.server.protocol"},
        )
        self.assertRegex(summary["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertTrue(any(r["text"].startswith("twistd ") for r in records))
        self.assertFalse(any(k.startswith("log_") for r in records for k in r))
        # The last login, written at shutdown.
        last = (self.data / "lastlogin").read_text()
        self.assertTrue(last.startswith("alice\t"), last)

    async def test_logfile(self):
        process = self.start("--logfile", "popserv.log")
        log = self.dir / "popserv.log"
        for _ in range(300):
            if log.exists() and b"starting on" in log.read_bytes():
                break
            await deferLater(0.05)
        await deferToThread(self.session)
        await self.stop()
        records = [json.loads(line) for line in log.read_text().splitlines()]
        self.assertTrue(any(r.get("user") == "alice" and "retr" in r for r in records))
        self.assertEqual(process.output, b"")


def deferLater(seconds: float) -> Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class RefusedTests(SynchronousTestCase):
    def test_syslog_or_logger_refused(self) -> None:
        """--syslog or --logger with json: one line naming the conflict, exit 78."""
        import subprocess

        twistd = twistd_script()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        directory = Path(self.mktemp())
        directory.mkdir()
        for option in (["--syslog"], ["--logger", "twisted.logger.textFileLogObserver"]):
            done = subprocess.run(
                [str(twistd), "-n", "--pidfile", "", *option, "popserv", "--pop3", "tcp:0",
                 "--log-format", "json"],
                capture_output=True, text=True, env=env, cwd=directory, timeout=60, check=False,
            )
            self.assertEqual(done.returncode, EXIT_CONFIG, done.stderr)
            self.assertIn(f"{option[0]}", done.stderr.splitlines()[-1])
            self.assertNotIn("Traceback", done.stderr)
            self.assertEqual(list(directory.iterdir()), [])

