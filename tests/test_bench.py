"""
The benchmark's pure helpers: the client's wire checks must catch a server
that desyncs, and the generated messages must carry correct sizes in their
names.  No servers, no timing.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from bench import (
    BodyReader,
    DesyncError,
    Measurement,
    Target,
    check_retr,
    encode_body,
    make_large_message,
    make_message,
    name_for,
    parse_sizes,
    percentile,
    read_body,
    wire_size,
)
from bench._client import Connection, ServerError
from bench._creader import ReaderError, Retrieved, build, check, compiler, count, parse
from bench._report import table

MESSAGES = [
    b"Subject: a\n\nhello\n.dot\n..two\n.\nend\n",
    b"Subject: b\r\n\r\nCRLF already\r\n.\r\n",
    b".starts with a dot\nno final newline",
    b"Subject: lone\rCR inside\n\n",
    b"",
]


def feed_in_steps(response: bytes, step: int, keep: bool = False, lines: bool = True):
    reader = BodyReader(keep, lines)
    rest = None
    for i in range(0, len(response), step):
        rest = reader.feed(response[i : i + step])
        if rest is not None:
            rest += response[i + step :]
            break
    assert rest is not None, "terminator not found"
    return reader.result(), rest


class BodyReaderTests(SynchronousTestCase):
    def test_counts_octets_before_stuffing(self):
        """The counted octets are the wire size LIST must report, for every message."""
        for message in MESSAGES:
            body, rest = read_body(encode_body(message) + b"+OK next\r\n", keep=True)
            self.assertEqual(body.octets, wire_size(message), message)
            self.assertEqual(rest, b"+OK next\r\n")

    def test_unstuffs_kept_data(self):
        """Kept data is the message with CRLF line ends, dots unstuffed."""
        body, _ = read_body(encode_body(b".a\n..b\n.\nc\n"), keep=True)
        self.assertEqual(body.data, b".a\r\n..b\r\n.\r\nc\r\n")
        self.assertEqual(body.lines, 4)

    def test_every_chunking_agrees(self):
        """Patterns split across chunks are counted once, whatever the chunk size."""
        for data in [make_message(3000, seed=5), *MESSAGES]:
            response = encode_body(data) + b"+OK"
            whole = read_body(response, keep=True)
            self.assertEqual(whole[0].octets, wire_size(data))
            for step in (1, 2, 3, 4, 5, 6, 7, 64, 1000):
                self.assertEqual(feed_in_steps(response, step, keep=True), whole, step)

    def test_lines_counted_only_when_asked(self):
        """RETR bodies skip the line count past the checked part; octets stay exact."""
        message = make_large_message(3 * 1024 * 1024, seed=2)
        response = encode_body(message)
        counted, _ = feed_in_steps(response, 256 * 1024)
        uncounted, _ = feed_in_steps(response, 256 * 1024, lines=False)
        self.assertEqual(counted.lines, message.count(b"\n"))
        self.assertEqual(uncounted.lines, -1)
        self.assertEqual(uncounted.octets, counted.octets)
        self.assertEqual(counted.octets, wire_size(message))

    def test_empty_body(self):
        body, rest = read_body(b".\r\n")
        self.assertEqual((body.octets, body.lines, rest), (0, 0, b""))

    def test_missing_stuffing_is_a_desync(self):
        """A server that forgets to stuff a dot sends one octet fewer than it listed."""
        message = b"Subject: x\n\n.hidden\n"
        unstuffed = message.replace(b"\n", b"\r\n") + b".\r\n"
        body, _ = read_body(unstuffed)
        with self.assertRaises(DesyncError):
            check_retr(1, wire_size(message), body)

    def test_lf_sizes_are_a_desync(self):
        """LIST sizes counting LF line ends (twisted.mail's MaildirMailbox) are caught."""
        message = make_message(4096, seed=1)
        body, _ = read_body(encode_body(message))
        check_retr(1, wire_size(message), body)
        with self.assertRaises(DesyncError):
            check_retr(1, len(message), body)

    def test_bare_lf_is_a_desync(self):
        with self.assertRaises(DesyncError):
            read_body(b"line one\nline two\r\n.\r\n")

    def test_unterminated(self):
        reader = BodyReader()
        self.assertIsNone(reader.feed(b"no end\r\n"))
        with self.assertRaises(DesyncError):
            reader.result()

    def test_parse_sizes(self):
        body, _ = read_body(b"1 120\r\n2 4096\r\n.\r\n", keep=True)
        assert body.data is not None
        self.assertEqual(parse_sizes(body.data), {1: 120, 2: 4096})


class CReaderTests(SynchronousTestCase):
    """
    B2's C reader counts bodies as the Python client does (``--count`` mode,
    fed through stdin: no sockets); skipped where there is no ``cc``.
    """

    def setUp(self) -> None:
        if compiler() is None:
            raise SkipTest("no C compiler: the bench runs B2 with the asyncio client only")
        self.binary = build(Path(self.mktemp()))

    def test_counts_as_the_python_reader(self):
        """Octets, lines and no bare LFs, for every message, whatever the read size."""
        messages = [*MESSAGES, b".", b"..", b".\r", b"\r\n\r\n.\r.\r\n", make_message(3000, seed=5)]
        stream = b"".join(encode_body(m) for m in messages)
        # The Python reader's counts, and LIST's sizes.
        expected = [(read_body(encode_body(m))[0].lines, wire_size(m), 0) for m in messages]
        for step in (1, 2, 3, 4, 5, 7, 64, 1000, 1 << 20):
            counted = count(self.binary, stream, step)
            self.assertEqual([(r.lines, r.octets, r.bare_lf) for r in counted], expected, step)

    def test_missing_stuffing_counts_short(self):
        """A dot line sent unstuffed loses its dot: one octet fewer than LIST said."""
        message = b"Subject: x\n\n.hidden\n"
        [counted] = count(self.binary, message.replace(b"\n", b"\r\n") + b".\r\n", 3)
        self.assertEqual(counted.octets, wire_size(message) - 1)

    def test_bare_lf_counted(self):
        """Bare LFs anywhere in the body are counted, across reads too."""
        for step in (1, 2, 1000):
            [counted] = count(self.binary, b"a\nb\r\n\n.\n.\r\n", step)
            self.assertEqual(counted.bare_lf, 3, step)

    def test_unterminated(self):
        with self.assertRaises(ReaderError):
            count(self.binary, b"no end\r\n", 4)


class CReaderOutputTests(SynchronousTestCase):
    """The reader's output parsed and checked, with no compiler needed."""

    def test_parse(self):
        self.assertEqual(
            parse("1 120 120 3 0 0.001000000\n"), [Retrieved(1, 120, 120, 3, 0, 0.001)]
        )

    def test_check(self):
        check(Retrieved(1, 120, 120, 3, 0, 0.001))
        with self.assertRaises(DesyncError):
            check(Retrieved(1, 120, 119, 3, 0, 0.001))
        with self.assertRaises(DesyncError):
            check(Retrieved(1, 120, 120, 3, 1, 0.001))


class MessageTests(SynchronousTestCase):
    def test_deterministic(self):
        self.assertEqual(make_message(4096, seed=3), make_message(4096, seed=3))
        self.assertNotEqual(make_message(4096, seed=3), make_message(4096, seed=4))

    def test_size_and_dots(self):
        """About the size asked, LF line ends, and lines a server must stuff."""
        message = make_message(4096, seed=2)
        self.assertTrue(4000 <= len(message) <= 4096, len(message))
        self.assertNotIn(b"\r", message)
        self.assertIn(b"\n.\n", message)
        self.assertTrue(message.endswith(b"\n"))

    def test_name_sizes(self):
        """,S= is the stored size and ,W= the octets a client will count."""
        message = make_message(2048, seed=9)
        name = name_for(message, 1234).in_cur("S")
        fields = dict(re.findall(r",([SW])=(\d+)", name))
        self.assertEqual(int(fields["S"]), len(message))
        body, _ = read_body(encode_body(message))
        self.assertEqual(int(fields["W"]), body.octets)
        self.assertEqual(int(fields["W"]), len(message) + message.count(b"\n"))

    def test_name_format(self):
        """Dovecot's TIME.M<usec>P<pid>Q<n>.HOST[,S=][,W=][:2,FLAGS]."""
        message = make_message(100, seed=1)
        pattern = r"\d+\.M\d+P\d+Q\d+\.[a-z.]+,S=\d+,W=\d+:2,S"
        self.assertRegex(name_for(message, 5).in_cur("S"), pattern)
        bare = name_for(message, 5, sizes=False)
        self.assertNotIn(",", bare.in_new())
        self.assertEqual(bare.in_cur(), bare.unique() + ":2,")

    def test_names_sort_in_delivery_order(self):
        names = [name_for(b"x\n", n).unique() for n in (998, 999, 1000, 1001)]
        times = [int(n.split(".")[0]) for n in names]
        self.assertEqual(times, sorted(times))
        self.assertEqual(len(set(names)), 4)

    def test_large_message(self):
        message = make_large_message(1024 * 1024, seed=1)
        self.assertTrue(900_000 < len(message) <= 1024 * 1024)
        body, _ = read_body(encode_body(message))
        self.assertEqual(body.octets, wire_size(message))


class ReportTests(SynchronousTestCase):
    def test_percentile_nearest_rank(self):
        values = list(range(1, 101))
        self.assertEqual(percentile(values, 50), 50)
        self.assertEqual(percentile(values, 99), 99)
        self.assertEqual(percentile([7.0], 99), 7.0)

    def test_ratio_and_verdict(self):
        m = Measurement("B1", "sessions/s", "1/s", True, Target("ratio", 1.0, ">="))
        for v in (90, 100, 110):
            m.add("popserv", v)
        m.add("dovecot", 200)
        self.assertEqual(m.ratio("dovecot"), 0.5)
        self.assertEqual(m.verdict(), "MISSED")
        self.assertIn("0.50x", table([m], ["popserv", "dovecot"]))


class FakeTransport(asyncio.Transport):
    """Records what the client writes; no socket."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class ConnectionTests(SynchronousTestCase):
    """The client's protocol object fed bytes by hand: no sockets, no timing."""

    def run_exchange(self, coroutine_for, replies: list[bytes]):
        async def main():
            connection = Connection()
            transport = FakeTransport()
            connection.connection_made(transport)
            task = asyncio.ensure_future(coroutine_for(connection))
            for reply in replies:
                await asyncio.sleep(0)
                connection.data_received(reply)
            return await task, transport.written

        return asyncio.run(main())

    def test_status_then_body_split_anywhere(self):
        """A status line and the body after it, in one chunk or split mid-pattern."""
        message = make_message(500, seed=3)
        response = b"+OK 1 octets\r\n" + encode_body(message)
        for cut in (1, 10, 15, 16, len(response) - 3, len(response) - 1):

            async def retr(connection):
                return await connection.multiline(b"RETR 1", lines=False)

            body, written = self.run_exchange(retr, [response[:cut], response[cut:]])
            self.assertEqual(written, [b"RETR 1\r\n"])
            self.assertEqual(body.octets, wire_size(message), cut)

    def test_err_is_an_error(self):
        async def stat(connection):
            return await connection.ok(b"STAT")

        with self.assertRaises(ServerError):
            self.run_exchange(stat, [b"-ERR [IN-USE] locked\r\n"])

    def test_desync_surfaces(self):
        """A bare-LF body fails the command that read it."""

        async def retr(connection):
            return await connection.multiline(b"RETR 1")

        with self.assertRaises(DesyncError):
            self.run_exchange(retr, [b"+OK\r\nbad\nline\r\n.\r\n"])
