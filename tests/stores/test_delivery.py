"""
Delivery without a network: the DATA decoder, quotas, the two-phase Maildir
write, cleaning ``tmp/`` after a crash, and ``popserv deliver`` run as an
MDA (a real subprocess, with a real write failure from RLIMIT_FSIZE).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.core.body import BodyDecoder, BodyEncoder
from popserv.logins.passwords import PasswdFile, hash_password
from popserv.server.startchecks import TmpCleaner
from popserv.stores.delivery import (
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOUSER,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    Directory,
    MailboxFull,
    check_room,
)
from popserv.stores.layout import Layout, ensure_maildir
from popserv.stores.maildir import clean_tmp, deliver
from popserv.stores.maildir.deliver import prepare
from popserv.stores.maildir.names import make_unique
from popserv.stores.quota import Quota, Usage, maildir_usage, parse_size
from tests.support.processes import REPO, subprocess_env


def decode(data: bytes, sizes: list[int], limit: int | None = None) -> tuple[BodyDecoder, bytes]:
    """Feed ``data`` in pieces of ``sizes`` (cycled); return the decoder and what followed."""
    decoder = BodyDecoder(limit)
    pos, i = 0, 0
    while True:
        step = sizes[i % len(sizes)] if sizes else len(data)
        rest = decoder.feed(data[pos : pos + step])
        pos, i = pos + step, i + 1
        if rest is not None:
            return decoder, rest + data[pos:]
        if pos >= len(data):
            raise AssertionError("no end of data")


class BodyDecoderTests(SynchronousTestCase):
    def test_unstuffs_and_stops_at_the_dot_line(self):
        decoder, rest = decode(b"..a\r\nb\r\n...\r\n.\r\nQUIT\r\n", [3])
        self.assertEqual(b"".join(decoder.chunks), b".a\r\nb\r\n..\r\n")
        self.assertEqual(rest, b"QUIT\r\n")

    def test_empty_body(self):
        decoder, rest = decode(b".\r\n", [1])
        self.assertEqual((decoder.chunks, decoder.size, rest), ([], 0, b""))

    def test_bare_lf_never_ends_the_body(self):
        """``\\n.\\n`` is content (no SMTP smuggling); only CRLF.CRLF ends it."""
        decoder, rest = decode(b"a\n.\nMAIL FROM:<x>\n\r\n.\r\n", [2])
        self.assertEqual(b"".join(decoder.chunks), b"a\n.\nMAIL FROM:<x>\n\r\n")
        self.assertEqual(rest, b"")

    def test_limit(self):
        """Past the limit nothing is kept, but the end is still found."""
        decoder, rest = decode(b"x" * 100 + b"\r\n" + b"y" * 5000 + b"\r\n.\r\nNOOP\r\n", [7], 50)
        self.assertTrue(decoder.overflow)
        self.assertEqual(decoder.chunks, [])
        self.assertEqual(rest, b"NOOP\r\n")

    def test_sink(self):
        """With a sink, the body goes there as it comes and nothing is kept;
        past the limit the sink hears nothing more."""
        given: list[bytes] = []
        decoder = BodyDecoder(20, sink=given.append)
        self.assertIsNone(decoder.feed(b"..one\r\ntwo\r"))
        self.assertEqual(b"".join(given), b".one\r\ntwo")
        self.assertIsNone(decoder.feed(b"\nthree and more\r\n"))
        self.assertTrue(decoder.overflow)
        self.assertEqual(b"".join(given), b".one\r\ntwo")
        self.assertEqual(decoder.feed(b".\r\nNOOP\r\n"), b"NOOP\r\n")
        self.assertEqual(decoder.chunks, [])

    def test_over_the_limit_dot_line_split_across_reads(self):
        """
        A ``.`` line arriving in two reads (``.`` then CRLF) still ends a body
        that is over the limit; it was taken for content, so the session read
        on into the next message's commands.
        """
        cases = [(b".\r\nNOOP\r\n", 0), (b"x" * 20 + b"\r\n.\r\nNOOP\r\n", 10),
                 (b"\r\r\n.\r\nNOOP\r\n", 0)]
        for data, limit in cases:
            for sizes in ([len(data) - 8, 1], [1]):
                decoder, rest = decode(data, sizes, limit)
                self.assertEqual(rest, b"NOOP\r\n")
                self.assertEqual(decoder.overflow, limit < len(data) - 9)

    @given(st.binary(max_size=300), st.lists(st.integers(1, 40), min_size=1, max_size=8))
    def test_round_trip(self, message, sizes):
        """decode(encode(x)) is x with CRLF line ends, for any bytes and any chunking."""
        encoder = BodyEncoder()
        wire = encoder.feed(message) + encoder.finish()
        decoder, rest = decode(wire + b"NEXT", sizes)
        expected = wire[:-3]
        expected = expected.replace(b"\r\n.", b"\r\n")
        if expected.startswith(b"."):
            expected = expected[1:]
        self.assertEqual(b"".join(decoder.chunks), expected)
        self.assertEqual(rest, b"NEXT")
        self.assertEqual(decoder.size, len(expected))


class QuotaTests(SynchronousTestCase):
    def test_sizes(self):
        self.assertEqual(parse_size("10M"), 10 * 1024**2)
        self.assertEqual(parse_size("2 GB"), 2 * 1024**3)
        self.assertEqual(parse_size("512"), 512)
        self.assertIsNone(parse_size("0"))
        self.assertIsNone(parse_size("none"))
        self.assertRaises(ValueError, parse_size, "ten")

    def test_overrides(self):
        default = Quota(1000, 10)
        self.assertEqual(default.override({"quota_bytes": "1k"}), Quota(1024, 10))
        self.assertEqual(default.override({"quota_messages": "none"}), Quota(1000, None))
        # Dovecot's rules: a bare storage number is in kilobytes.
        self.assertEqual(
            default.override({"userdb_quota_rule": "*:storage=2", "quota_rule2": "*:messages=5"}),
            Quota(2048, 5),
        )
        self.assertEqual(default.override({"quota_rule": "Trash:storage=+10M"}), default)
        self.assertRaises(ValueError, default.override, {"quota_bytes": "lots"})

    def test_check(self):
        quota = Quota(100, 2)
        self.assertFalse(quota.full(Usage(99, 1)))
        self.assertTrue(quota.full(Usage(100, 1)))
        self.assertTrue(quota.full(Usage(0, 2)))
        quota.check(Usage(50, 1), 50)
        self.assertRaises(Exception, quota.check, Usage(50, 1), 51)

    def test_usage(self):
        maildir = Path(self.mktemp())
        deliver(maildir, b"12345\n")
        (maildir / "cur" / "1.2.host:2,S").write_bytes(b"abc")
        self.assertEqual(maildir_usage(maildir), Usage(9, 2))

    def test_usage_counts_what_a_session_lists(self):
        """A link, a directory or a dot file in new/ or cur/ is no message: not counted."""
        maildir = Path(self.mktemp())
        deliver(maildir, b"12345\n")
        (maildir / "cur" / "2.link.host,S=1000:2,S").symlink_to(maildir / "new")
        (maildir / "cur" / "3.dir.host,S=1000").mkdir()
        (maildir / "new" / ".hidden,S=1000").write_bytes(b"x")
        self.assertEqual(maildir_usage(maildir), Usage(6, 1))

    def test_check_room(self):
        layout = Layout.create(self.mktemp())
        layout.data_dir.mkdir(parents=True)
        passwd = PasswdFile(layout.passwd_path)
        passwd.add("dave", hash_password("x", "PLAIN"), {"quota_messages": "1"})
        directory = Directory(layout, passwd, ["example.org"])
        dave = directory.resolve("dave@example.org")
        check_room(dave, 10**9)
        deliver(dave.maildir, b"one\n")
        self.assertRaises(MailboxFull, check_room, dave)


class TwoPhaseTests(SynchronousTestCase):
    def test_prepared_is_invisible_until_published(self):
        maildir = Path(self.mktemp())
        pending = prepare(maildir, [b"a\r\n", b"b\r\n"], header=b"X-Trace: 1\r\n")
        self.assertEqual(os.listdir(maildir / "new"), [])
        name = pending.publish()
        self.assertEqual(os.listdir(maildir / "new"), [name])
        self.assertEqual((maildir / "new" / name).read_bytes(), b"X-Trace: 1\na\nb\n")
        self.assertTrue(name.endswith(",S=15,W=18"))
        self.assertEqual(os.listdir(maildir / "tmp"), [])

    def test_discarded_leaves_nothing(self):
        maildir = Path(self.mktemp())
        prepare(maildir, b"a\n").discard()
        self.assertEqual(os.listdir(maildir / "new") + os.listdir(maildir / "tmp"), [])


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class CleanTmpTests(TestCase):
    def test_dead_writers_are_cleaned_at_once(self):
        """A fresh tmp file of a dead process of this host goes; a live one's stays."""
        layout = Layout.create(self.mktemp())
        layout.data_dir.mkdir(parents=True)
        PasswdFile(layout.passwd_path).add("erin", hash_password("x", "PLAIN"))
        maildir = ensure_maildir(layout.maildir_for("erin"))
        alive = make_unique(None, None)
        dead = make_unique(None, None).replace(f"P{os.getpid()}Q", f"P{dead_pid()}Q")
        other_host = make_unique(None, None, hostname="elsewhere")
        for name in (alive, dead, other_host):
            (maildir / "tmp" / name).write_bytes(b"half a mess")
        self.assertEqual(clean_tmp(maildir), 1)
        self.assertEqual(sorted(os.listdir(maildir / "tmp")), sorted([alive, other_host]))

    async def test_cleaned_at_start(self):
        layout = Layout.create(self.mktemp())
        layout.data_dir.mkdir(parents=True)
        PasswdFile(layout.passwd_path).add("erin", hash_password("x", "PLAIN"))
        maildir = ensure_maildir(layout.maildir_for("erin"))
        dead = make_unique(None, None).replace(f"P{os.getpid()}Q", f"P{dead_pid()}Q")
        (maildir / "tmp" / dead).write_bytes(b"half")
        service = TmpCleaner(layout, PasswdFile(layout.passwd_path), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        for _ in range(200):
            if not os.listdir(maildir / "tmp"):
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(os.listdir(maildir / "tmp"), [])


class DeliverCommandTests(SynchronousTestCase):
    """``popserv deliver`` in a subprocess, as Postfix's mailbox_command runs it."""

    def setUp(self):
        self.layout = Layout.create(self.mktemp())
        self.layout.data_dir.mkdir(parents=True)
        passwd = PasswdFile(self.layout.passwd_path)
        passwd.add("frank", hash_password("x", "PLAIN"))
        passwd.add("gina", hash_password("x", "PLAIN"), {"quota_bytes": "100"})

    def deliver(self, *args: str, message: bytes, fsize: int | None = None, env=None):
        def limit() -> None:
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        return subprocess.run(
            [
                sys.executable,
                "-m",
                "popserv.server.cli",
                "deliver",
                "--data",
                str(self.layout.data_dir),
                *args,
            ],
            input=message,
            capture_output=True,
            env={**subprocess_env(), **(env or {})},
            cwd=REPO,
            preexec_fn=limit,
            timeout=60,
            check=False,
        )

    def files(self, user: str, sub: str = "new") -> list[Path]:
        directory = self.layout.maildir_for(user) / sub
        return sorted(directory.iterdir()) if directory.exists() else []

    def test_delivers_with_trace_fields(self):
        result = self.deliver(
            "--recipient", "frank+news@example.org",
            message=b"From bounce@remote.test Tue Nov 24 10:00:00 2026\nSubject: hi\n\nbody\n",
        )  # fmt: skip
        self.assertEqual(result.returncode, EX_OK, result.stderr)
        [path] = self.files("frank")
        self.assertEqual(
            path.read_bytes(),
            b"Return-Path: <bounce@remote.test>\nDelivered-To: frank+news@example.org\n"
            b"Subject: hi\n\nbody\n",
        )

    def test_keeps_the_mtas_own_trace_fields(self):
        """Postfix already wrote Return-Path and Delivered-To: not twice."""
        message = b"Return-Path: <a@b>\nDelivered-To: frank\nSubject: hi\n\nbody\n"
        result = self.deliver("--user", "frank", message=message, env={"SENDER": "a@b"})
        self.assertEqual(result.returncode, EX_OK, result.stderr)
        [path] = self.files("frank")
        self.assertEqual(path.read_bytes(), message)

    def test_trace_fields_for_crlf_mail_and_the_null_sender(self):
        """A CRLF message whose body names the user still gets Delivered-To; a
        MAILER-DAEMON postmark is the null sender; $RECIPIENT alone will do."""
        message = b"From MAILER-DAEMON Tue Nov 24\nSubject: hi\r\n\r\nDelivered-To: frank\r\n"
        result = self.deliver(message=message, env={"RECIPIENT": "frank"})
        self.assertEqual(result.returncode, EX_OK, result.stderr)
        [path] = self.files("frank")
        self.assertEqual(
            path.read_bytes(),
            b"Return-Path: <>\nDelivered-To: frank\nSubject: hi\n\nDelivered-To: frank\n",
        )

    def test_exit_statuses(self):
        unknown = self.deliver("--user", "nobody", message=b"x\n")
        self.assertEqual(
            (unknown.returncode, unknown.stderr), (EX_NOUSER, b"popserv: 5.1.1 User unknown\n")
        )
        full = self.deliver("--user", "gina", message=b"Subject: big\n\n" + b"x" * 200)
        self.assertEqual(
            (full.returncode, full.stderr), (EX_CANTCREAT, b"popserv: 5.2.2 Mailbox full\n")
        )
        usage = self.deliver(message=b"x\n")
        self.assertEqual(usage.returncode, EX_USAGE)
        self.assertEqual(self.files("gina"), [])

    def test_control_characters_in_addresses(self):
        """A CR in the recipient or the sender would forge a header field:
        refused (64 and 65, permanent), nothing stored."""
        message = b"Subject: hi\n\nbody\n"
        recipient = self.deliver(message=message, env={"RECIPIENT": "frank\rX-Injected: yes"})
        self.assertEqual(
            (recipient.returncode, recipient.stderr),
            (EX_USAGE, b"popserv: 5.1.3 Bad recipient address syntax\n"),
        )
        named = self.deliver("--user", "frank", message=message, env={"RECIPIENT": "f\nX: y"})
        self.assertEqual(named.returncode, EX_USAGE)
        sender = self.deliver(
            "--user", "frank", message=message, env={"SENDER": '"a\rX-Injected: yes"@b.c'}
        )
        self.assertEqual(
            (sender.returncode, sender.stderr),
            (EX_DATAERR, b"popserv: 5.1.7 Bad sender address syntax\n"),
        )
        postmark = self.deliver("--user", "frank", message=b"From a\x00b Tue\n" + message)
        self.assertEqual(postmark.returncode, EX_DATAERR)
        self.assertEqual(self.files("frank") + self.files("frank", "tmp"), [])

    def test_write_failure_is_temporary_and_leaves_nothing(self):
        """A real write failure (EFBIG from RLIMIT_FSIZE) halfway: exit 75, nothing visible."""
        result = self.deliver("--user", "frank", message=b"y" * 200_000, fsize=50_000)
        self.assertEqual(result.returncode, EX_TEMPFAIL, result.stderr)
        self.assertIn(b"4.3.1", result.stderr)
        self.assertEqual(self.files("frank") + self.files("frank", "tmp"), [])

    def test_missing_password_file_is_temporary(self):
        self.layout.passwd_path.unlink()
        result = self.deliver("--user", "frank", message=b"x\n")
        self.assertEqual(result.returncode, EX_TEMPFAIL)


class BodyDecoderBoundaryTests(SynchronousTestCase):
    def test_terminator_split_at_every_offset_around_the_limit(self):
        """At, below and over the limit, every split of the end line is seen."""
        for size, overflow in ((99, False), (100, False), (101, True), (5000, True)):
            body = b"x" * (size - 2) + b"\r\n"
            wire = body + b".\r\nNEXT"
            for cut in range(len(body) - 3, len(body) + 3):
                decoder = BodyDecoder(100)
                self.assertIsNone(decoder.feed(wire[:cut]), (size, cut))
                rest = decoder.feed(wire[cut:])
                self.assertEqual((rest, decoder.overflow), (b"NEXT", overflow), (size, cut))

    def test_long_lines_are_linear(self):
        """A 25 MB body without a line end is held back four octets at a time, not whole."""
        decoder = BodyDecoder()
        for _ in range(400):
            decoder.feed(b"a" * 65536)
            self.assertLessEqual(len(decoder._tail), 4)
        self.assertEqual(decoder.feed(b"\r\n.\r\n"), b"")
        self.assertEqual(decoder.size, 400 * 65536 + 2)
