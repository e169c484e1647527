"""
The receiver against clients that would exhaust it: DATA streamed to a
spool file, memory per session measured; the limits on commands without
mail and on a session's length.  Real sockets over loopback, real
Maildirs, real files.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import subprocess
import sys
import tracemalloc
import weakref
from pathlib import Path

from attrs import evolve
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from popserv.server.receiving import LMTPProtocol, ReceiverProtocol, ReceiverSettings
from popserv.server.service import SPOOL_DIR
from popserv.server.spool import SPOOL_BUFFER, Spool
from tests.support.receiver import START_DATA, ReceiverTestCase, SMTPClient

#: The bound the receiver promises: memory held per session, whatever the message.
SESSION_MEMORY = 256 * 1024

#: Opens COUNT sessions to PORT, starts DATA on each, sends SIZE octets of
#: body on each without ending it, says "sent", and hangs up when its
#: standard input closes.  A process of its own, so that none of its
#: buffers count in this process's memory.
UNFINISHED_DATA_CLIENT = r"""
import socket, sys

port, count, size = (int(a) for a in sys.argv[1:4])
block = (b"x" * 1022 + b"\r\n") * 64
sessions = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    seen = b""
    while b"\r\n354 " not in b"\r\n" + seen:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("closed: %r" % seen)
        seen += chunk
    sessions.append(s)
for s in sessions:
    for _ in range(size // len(block)):
        s.sendall(block)
print("sent", flush=True)
sys.stdin.read()
for s in sessions:
    s.close()
"""


def open_files_under(directory: Path) -> list[os.stat_result]:
    """The files this process has open under ``directory``, named or not (Linux /proc)."""
    if not os.path.isdir("/proc/self/fd"):
        raise SkipTest("needs /proc/self/fd")
    prefix = str(directory) + os.sep
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                found.append(os.stat(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the descriptor listdir itself used, or one just closed
    return found


def big_message(size: int) -> bytes:
    """A message of about ``size`` octets, LF line ends as stored, with dot
    lines, 8-bit text and a lone CR, so every rule of the way is exercised."""
    header = b"From: sender@remote.test\nSubject: big\n\n"
    lines = []
    total = len(header)
    number = 0
    while total < size:
        line = b"%07d .line \xe4\xf6 lone\rCR " % number + b"y" * 70 + b"\n"
        if number % 1000 == 0:
            line = b"." + line
        lines.append(line)
        total += len(line)
        number += 1
    return header + b"".join(lines)


async def wait_for(condition, timeout: float = 30.0) -> None:
    """Let the reactor run until ``condition()`` holds."""
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class SpoolTests(SynchronousTestCase):
    """The spool file on its own."""

    def test_unnamed_private_and_made_when_missing(self):
        """The file has no name in its directory and mode 0600; the directory
        is made, mode 0700, when missing."""
        directory = Path(self.mktemp()).absolute() / "spool"
        directory.parent.mkdir()
        spool = Spool.open(directory)
        self.addCleanup(spool.close)
        self.assertEqual(os.listdir(directory), [])
        self.assertEqual(directory.stat().st_mode & 0o777, 0o700)
        [opened] = open_files_under(directory)
        self.assertEqual(opened.st_mode & 0o777, 0o600)
        self.assertEqual(opened.st_nlink, 0)
        spool.close()
        self.assertEqual(open_files_under(directory), [])

    def test_buffered_then_written_then_read_back(self):
        """Small pieces wait in memory until 64 KiB have come; the file then
        reads back exactly what was written, from its start."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        spool = Spool.open(directory)
        self.addCleanup(spool.close)
        pieces = [b"%05d\r\n" % n for n in range(SPOOL_BUFFER // 7)]
        for piece in pieces:
            spool.write(piece)
        [opened] = open_files_under(directory)
        self.assertEqual(opened.st_size, 0)
        spool.write(b"z" * 100)
        spool.write(b"big" * SPOOL_BUFFER)
        [opened] = open_files_under(directory)
        self.assertEqual(opened.st_size, spool.size)
        spool.write(b"end\r\n")
        message = spool.finish()
        expected = b"".join(pieces) + b"z" * 100 + b"big" * SPOOL_BUFFER + b"end\r\n"
        message.seek(0)
        self.assertEqual(message.read(), expected)
        self.assertEqual(spool.size, len(expected))

    def test_full_disk(self):
        """A write error (here /dev/full) is kept for the end; later writes are dropped."""
        if not os.path.exists("/dev/full"):
            raise SkipTest("needs /dev/full")
        spool = Spool(open("/dev/full", "r+b", buffering=0))
        self.addCleanup(spool.close)
        spool.write(b"x" * (SPOOL_BUFFER + 1))
        spool.write(b"more")
        with self.assertRaises(OSError) as raised:
            spool.finish()
        self.assertEqual(raised.exception.errno, errno.ENOSPC)


class StreamingTests(ReceiverTestCase):
    """DATA goes to a spool file as it arrives, never into memory whole."""

    options = {"max-message-size": 64 << 20, "max-connections-per-ip": 100}

    def spool_dir(self) -> Path:
        return self.layout.data_dir / SPOOL_DIR

    async def test_memory_per_session_is_bounded(self):
        """
        20 sessions each send 4 MiB of DATA and stop before its end: the
        server's memory grows by less than 256 KiB a session (traced
        allocations, after the server has read all of it), the bodies are in
        spool files, and when the clients hang up the files and sessions go.
        """
        count, size = 20, 4 << 20
        sessions: list[weakref.ref] = []
        build = self.smtp.buildProtocol

        def recorded(addr):
            session = build(addr)
            sessions.append(weakref.ref(session))
            return session

        self.smtp.buildProtocol = recorded

        def received() -> int:
            alive = [ref() for ref in sessions]
            return sum(s._reader.size for s in alive if s is not None and s._reader is not None)

        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        client = subprocess.Popen(
            [sys.executable, "-c", UNFINISHED_DATA_CLIENT, str(self.ports["smtp"]), str(count),
             str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        self.addCleanup(client.kill)
        self.assertEqual(await self.in_thread(client.stdout.readline), b"sent\n")
        # A body's last CRLF may be held back as a possible start of the end line.
        await wait_for(lambda: len(sessions) == count and received() >= count * (size - 2))
        gc.collect()
        during, peak = tracemalloc.get_traced_memory()
        per_session = (during - before) / count
        self.assertLess(per_session, SESSION_MEMORY, f"{per_session / 1024:.0f} KiB a session")
        self.assertLess(peak - before, count * SESSION_MEMORY)
        spooled = open_files_under(self.spool_dir())
        self.assertEqual(len(spooled), count)
        for spool in spooled:  # what is not in the file yet is the buffer
            self.assertGreater(spool.st_size, size - 2 - SPOOL_BUFFER)
        self.assertEqual(os.listdir(self.spool_dir()), [])

        client.stdin.close()
        await self.in_thread(client.wait)
        await wait_for(lambda: self.smtp.sessions == 0)
        gc.collect()
        self.assertEqual([ref() for ref in sessions], [None] * count)
        self.assertEqual(open_files_under(self.spool_dir()), [])
        self.assertLess(tracemalloc.get_traced_memory()[0] - before, SESSION_MEMORY)
        self.assertEqual(self.stored("alice"), [])

    async def test_large_message_arrives_byte_exact(self):
        """An 8 MB message through the spool is stored exactly, and POP3
        serves it with the size LIST announced."""
        message = big_message(8 << 20)
        refused = await self.in_thread(
            self.smtplib_send,
            "sender@remote.test",
            ["alice@example.org"],
            message.replace(b"\n", b"\r\n"),  # smtplib sends bytes as they are
        )
        self.assertEqual(refused, {})
        [stored] = self.stored("alice")
        trace, _, rest = stored.partition(b"From: sender@remote.test\n")
        self.assertEqual(b"From: sender@remote.test\n" + rest, message)
        self.assertTrue(trace.startswith(b"Return-Path: <sender@remote.test>\n"))
        [(size, body)] = await self.in_thread(self.fetch, "alice", "alice pw")
        self.assertEqual(size, len(body))
        self.assertTrue(body.endswith(message[-1000:].replace(b"\n", b"\r\n")))
        self.assertEqual(open_files_under(self.spool_dir()), [])

    async def test_large_message_for_several_lmtp_recipients(self):
        """Over LMTP, one 5 MB spool read once per Maildir: alice and bob get
        exact copies, carol's quota refuses hers, each with its own reply."""
        message = big_message(5 << 20)
        client = await self.in_thread(SMTPClient, self.ports["lmtp"])
        self.addCleanup(client.close)
        client.send(
            b"LHLO mta\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<bob@example.org>\r\nRCPT TO:<carol@example.org>\r\n"
            b"RCPT TO:<bob+copy@example.org>\r\nDATA\r\n"
        )
        replies = await self.in_thread(client.codes, 7)
        self.assertEqual(replies[-1], START_DATA)
        wire = message.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        await self.in_thread(client.send, wire + b".\r\n")
        accepted = b"250 2.0.0 Message accepted for delivery"
        self.assertEqual(
            await self.in_thread(client.codes, 4),
            [accepted, accepted, b"552 5.2.2 Mailbox full", accepted],
        )
        for user, address in (("alice", b"alice@example.org"), ("bob", b"bob@example.org")):
            [stored] = self.stored(user)
            trace, _, rest = stored.partition(b"From: sender@remote.test\n")
            self.assertEqual(b"From: sender@remote.test\n" + rest, message)
            self.assertIn(b"Delivered-To: " + address + b"\n", trace)
        self.assertEqual(self.stored("carol"), [])
        self.assertEqual(open_files_under(self.spool_dir()), [])

    async def test_spool_goes_when_the_client_drops_mid_data(self):
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        self.assertEqual((await self.in_thread(client.codes, 4))[-1], START_DATA)
        await self.in_thread(client.send, b"Subject: cut\r\n\r\n" + b"w" * 300_000)
        await wait_for(lambda: sum(f.st_size for f in open_files_under(self.spool_dir())) > 0)
        client.close()
        await wait_for(lambda: self.smtp.sessions == 0)
        self.assertEqual(open_files_under(self.spool_dir()), [])
        self.assertEqual(self.stored("alice") + self.tmp_files("alice"), [])

    async def test_spool_cannot_be_made(self):
        """A spool directory that cannot be made: DATA gets a temporary 451,
        the session goes on, and the reason is logged."""
        blocker = Path(self.mktemp())
        blocker.write_bytes(b"")
        self.smtp.settings = evolve(self.smtp.settings, spool_dir=blocker / "spool")
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
            b"DATA\r\nNOOP\r\n"
        )
        replies = await self.in_thread(client.codes, 5)
        self.assertEqual(
            replies[3:],
            [b"451 4.3.0 Temporary local problem, try again later", b"250 2.0.0 OK"],
        )


class StreamingLimitTests(ReceiverTestCase):
    """The size limit and the disk's limits, enforced while streaming."""

    async def test_too_big_is_dropped_on_the_way(self):
        """Past --max-message-size (100,000 here) the spool is closed at once,
        while the client goes on; the end of DATA gets 552 5.3.4."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        self.assertEqual((await self.in_thread(client.codes, 4))[-1], START_DATA)
        spool_dir = self.layout.data_dir / SPOOL_DIR
        self.assertEqual(len(open_files_under(spool_dir)), 1)
        await self.in_thread(client.send, b"Subject: big\r\n\r\n" + b"b" * 1_000_000)
        # Still in DATA, yet the spool is gone.
        await wait_for(lambda: open_files_under(spool_dir) == [])
        self.assertEqual(self.smtp.sessions, 1)
        client.send(b"\r\n.\r\nNOOP\r\n")
        self.assertEqual(
            await self.in_thread(client.codes, 2),
            [b"552 5.3.4 Message too big", b"250 2.0.0 OK"],
        )
        self.assertEqual(self.stored("alice") + self.tmp_files("alice"), [])

    async def test_full_disk_while_spooling(self):
        """The spool's disk full (/dev/full): the client sends on, then gets
        a temporary 452 4.3.1; nothing is stored and the session goes on."""
        if not os.path.exists("/dev/full"):
            raise SkipTest("needs /dev/full")
        self.patch(self.smtp, "open_spool", lambda: Spool(open("/dev/full", "r+b", buffering=0)))
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        self.assertEqual((await self.in_thread(client.codes, 4))[-1], START_DATA)
        client.send(b"Subject: s\r\n\r\n" + b"f" * 90_000 + b"\r\n.\r\nNOOP\r\n")
        self.assertEqual(
            await self.in_thread(client.codes, 2),
            [b"452 4.3.1 Insufficient system storage, try again later", b"250 2.0.0 OK"],
        )
        self.assertEqual(self.stored("alice") + self.tmp_files("alice"), [])


class SessionLimitTests(ReceiverTestCase):
    """Commands without mail, and the session's length, are bounded."""

    def test_defaults(self):
        settings = ReceiverSettings(hostname="mx.example.org")
        self.assertEqual(settings.max_junk_commands, 100)
        self.assertEqual(settings.max_session_time, 1800.0)
        self.assertEqual(self.smtp.settings.spool_dir, self.layout.data_dir / ".spool")

    async def test_dripping_noops(self):
        """The 101st NOOP (or RSET, VRFY, HELP, EHLO) with no message taken
        gets 421 4.7.0 and the connection closes."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n" * 25 + b"EHLO c\r\n")
        replies = await self.in_thread(client.codes, 100)
        self.assertEqual(replies[-1], b"214 2.0.0 See RFC 5321")
        self.assertEqual(
            await self.in_thread(client.codes, 1),
            [b"421 4.7.0 Too many commands without mail, closing"],
        )
        with self.assertRaises(EOFError):
            await self.in_thread(client.line)

    async def test_unknown_commands_count_over_lmtp(self):
        """LMTP does not count refusals as errors, but junk it does count."""
        client = await self.in_thread(SMTPClient, self.ports["lmtp"])
        self.addCleanup(client.close)
        client.send(b"BOGUS\r\n" * 101)
        replies = await self.in_thread(client.codes, 101)
        self.assertEqual(replies[-2], b"500 5.5.1 Command unrecognized")
        self.assertEqual(replies[-1], b"421 4.7.0 Too many commands without mail, closing")

    async def test_a_message_taken_starts_the_count_again(self):
        """Postfix's rule: the count starts again after a message is taken."""
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"NOOP\r\n" * 90
            + b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        await self.in_thread(client.codes, 94)
        client.send(b"Subject: s\r\n\r\nhi\r\n.\r\n" + b"NOOP\r\n" * 95 + b"QUIT\r\n")
        replies = await self.in_thread(client.codes, 97)
        self.assertEqual(replies[0], b"250 2.0.0 Message accepted for delivery")
        self.assertEqual(replies[1:], [b"250 2.0.0 OK"] * 95 + [b"221 2.0.0 Bye"])

    def clocked(self) -> Clock:
        clock = Clock()
        self.smtp.clock = clock
        return clock

    async def test_session_time_limit(self):
        """After 30 minutes, whatever the client does: 421 4.4.2 and a close."""
        clock = self.clocked()
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        clock.advance(1799)
        client.send(b"EHLO c\r\nNOOP\r\n")
        await self.in_thread(client.reply)
        self.assertEqual(await self.in_thread(client.codes, 1), [b"250 2.0.0 OK"])
        clock.advance(1)
        self.assertEqual(
            await self.in_thread(client.codes, 1),
            [b"421 4.4.2 mx.example.org Session too long, closing"],
        )
        with self.assertRaises(EOFError):
            await self.in_thread(client.line)

    async def test_session_time_limit_inside_data(self):
        """Inside DATA too: the sender keeps its message, nothing is stored,
        the spool goes."""
        clock = self.clocked()
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        self.assertEqual((await self.in_thread(client.codes, 4))[-1], START_DATA)
        spool_dir = self.layout.data_dir / SPOOL_DIR
        self.assertEqual(len(open_files_under(spool_dir)), 1)
        await self.in_thread(client.send, b"Subject: slow\r\n\r\n" + b"s" * 50_000 + b"\r\n")
        clock.advance(1800)
        self.assertEqual(
            await self.in_thread(client.codes, 1),
            [b"421 4.4.2 mx.example.org Session too long, closing"],
        )
        await wait_for(lambda: self.smtp.sessions == 0)
        self.assertEqual(open_files_under(spool_dir), [])
        self.assertEqual(self.stored("alice"), [])

    async def test_session_time_limit_waits_for_a_delivery(self):
        """A delivery under way when time is up still gets its 250; then 421."""
        clock = self.clocked()
        entered, release = self.hold_deliveries()
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(
            b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        self.assertEqual((await self.in_thread(client.codes, 4))[-1], START_DATA)
        client.send(b"Subject: s\r\n\r\nhi\r\n.\r\nNOOP\r\n")
        await self.in_thread(entered.wait, 10)
        clock.advance(1800)
        release.set()
        self.assertEqual(
            await self.in_thread(client.codes, 2),
            [
                b"250 2.0.0 Message accepted for delivery",
                b"421 4.4.2 mx.example.org Session too long, closing",
            ],
        )
        self.assertEqual(len(self.stored("alice")), 1)

    async def test_smtplib_still_works(self):
        """A normal session is far from every limit."""
        await self.in_thread(
            self.smtplib_send, "a@remote.test", ["alice@example.org"], b"Subject: s\r\n\r\nhi\r\n"
        )
        self.assertEqual(len(self.stored("alice")), 1)


class UnreadRepliesTests(ReceiverTestCase):
    """A client that sends and never reads cannot fill the server's memory with replies."""

    async def test_replies_nobody_reads(self):
        """
        Over LMTP (where refusals are not errors) a client pipelines MAIL
        commands, each refused, and never reads a reply: once the replies
        fill the send buffer the server stops reading, so its memory stays
        bounded (it grew by 48 MB for 16 MB of commands before).  How much the
        client sends before it stalls is the kernel's socket buffers' business.
        """
        command = b"MAIL FROM:<a@b>\r\n"
        block = command * (65536 // len(command))
        limit = 16 << 20
        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]

        def flood() -> int:
            sock = socket.create_connection(("127.0.0.1", self.ports["lmtp"]), timeout=10)
            # A small receive buffer: the replies back up into the server sooner.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(1.0)
            sent = 0
            try:
                while sent < limit:
                    sent += sock.send(block)
            except TimeoutError:
                pass
            finally:
                self.flood_socket = sock
            return sent

        sent = await self.in_thread(flood)
        self.addCleanup(self.flood_socket.close)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        self.assertLess(grown, SESSION_MEMORY, f"{grown / 1024:.0f} KiB for {sent} octets sent")
        self.flood_socket.close()
        await wait_for(lambda: self.smtp.sessions == 0)


class VerbTableTests(SynchronousTestCase):
    def test_every_verb_in_one_table(self):
        """Each cmd_ method is reached through the table, and nothing else is."""
        for cls in (ReceiverProtocol, LMTPProtocol):
            methods = {name for name in dir(cls) if name.startswith("cmd_")}
            self.assertEqual(set(cls.VERBS.values()), methods)
            for verb, method in cls.VERBS.items():
                self.assertEqual(method, "cmd_" + verb.decode())
        self.assertNotIn(b"LHLO", ReceiverProtocol.VERBS)
        self.assertIn(b"LHLO", LMTPProtocol.VERBS)


class EndlessRefusalsTests(ReceiverTestCase):
    """Refusals that were neither junk nor errors ran until the time limit."""

    async def test_recipients_past_the_limit_count_as_junk(self):
        client = await self.in_thread(SMTPClient, self.ports["smtp"])
        self.addCleanup(client.close)
        client.send(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\n")
        await self.in_thread(client.codes, 2)
        client.send(b"RCPT TO:<alice@example.org>\r\n" * 100)
        self.assertEqual(set(await self.in_thread(client.codes, 100)),
                         {b"250 2.1.5 Recipient OK"})
        client.send(b"RCPT TO:<alice@example.org>\r\n" * 200)
        replies = await self.in_thread(client.codes, 100)
        self.assertEqual(replies[0], b"452 4.5.3 Too many recipients")
        self.assertEqual(replies[-1], b"421 4.7.0 Too many commands without mail, closing")
