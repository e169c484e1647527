"""The pure wire layer: framing, parsing, responses, and the body encoder."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from popserv.core import errors, wire
from popserv.core.body import BodyEncoder, possible_wire_size, wire_size
from popserv.core.view import MaildropView
from popserv.interfaces import Listing
from popserv.logins.accounts import AccountSettings, Announcement, capability_lines


def feed_all(splitter: wire.LineSplitter, data: bytes, step: int) -> list[wire.Line]:
    out: list[wire.Line] = []
    for i in range(0, len(data), step):
        out += splitter.feed(data[i : i + step])
    return out


class LineSplitterTests(SynchronousTestCase):
    def test_crlf_and_lf(self):
        self.assertEqual(wire.LineSplitter().feed(b"A\r\nB\nC"), [b"A", b"B"])

    def test_every_chunking_gives_same_lines(self):
        data = b"USER a\r\nPASS b c\n" + b"x" * 300 + b"\r\nSTAT\r\n"
        whole = feed_all(wire.LineSplitter(), data, len(data))
        for step in (1, 2, 7, 255, 256):
            self.assertEqual(feed_all(wire.LineSplitter(), data, step), whole)
        self.assertEqual(whole, [b"USER a", b"PASS b c", wire.TooLong(), b"STAT"])

    def test_limit_counts_line_end(self):
        exact = b"x" * 253 + b"\r\n"
        self.assertEqual(wire.LineSplitter().feed(exact), [b"x" * 253])
        self.assertEqual(wire.LineSplitter().feed(b"x" * 254 + b"\r\n"), [wire.TooLong()])

    def test_discard(self):
        splitter = wire.LineSplitter()
        splitter.feed(b"CAPA")
        splitter.discard()
        self.assertEqual(splitter.feed(b"\r\nNOOP\r\n"), [b"", b"NOOP"])

    @given(st.binary(max_size=2000), st.integers(1, 300))
    @settings(max_examples=200, deadline=None)
    def test_any_bytes_any_chunks(self, data, step):
        """Any input gives the same lines whatever the chunking, none over the limit."""
        whole = wire.LineSplitter().feed(data)
        self.assertEqual(feed_all(wire.LineSplitter(), data, step), whole)
        for line in whole:
            if isinstance(line, bytes):
                self.assertLessEqual(len(line), wire.MAX_COMMAND_LINE)
                self.assertNotIn(b"\n", line)


def feed_in_batches(splitter: wire.LineSplitter, data: bytes, step: int, batch: int):
    """Feed ``data`` ``step`` bytes at a time, taking at most ``batch`` lines per call."""
    out: list[wire.Line] = []
    for i in range(0, len(data), step):
        lines = splitter.feed(data[i : i + step], max_lines=batch)
        assert len(lines) <= batch
        out += lines
        while batch and (more := splitter.feed(max_lines=batch)):
            out += more
    return out


class BatchTests(SynchronousTestCase):
    def test_at_most_max_lines(self):
        splitter = wire.LineSplitter()
        self.assertEqual(splitter.feed(b"A\nB\nC\nD", max_lines=2), [b"A", b"B"])
        self.assertEqual(splitter.buffered, 3)
        self.assertEqual(splitter.feed(max_lines=2), [b"C"])
        self.assertEqual(splitter.feed(), [])
        self.assertEqual(splitter.feed(b"\n"), [b"D"])

    def test_zero_lines_keeps_everything(self):
        splitter = wire.LineSplitter()
        self.assertEqual(splitter.feed(b"NOOP\r\n" * 3, max_lines=0), [])
        self.assertEqual(splitter.feed(), [b"NOOP"] * 3)

    def test_long_line_behind_a_batch(self):
        """A too-long line waiting behind the batch is still read through and refused once."""
        splitter = wire.LineSplitter()
        data = b"A\n" + b"x" * 1000 + b"\nB\n"
        self.assertEqual(splitter.feed(data, max_lines=1), [b"A"])
        self.assertEqual(splitter.feed(max_lines=1), [wire.TooLong()])
        self.assertEqual(splitter.feed(), [b"B"])

    def test_never_more_than_max_lines(self):
        """A line found too long while the batch is full is refused on the next call."""
        splitter = wire.LineSplitter()
        self.assertEqual(splitter.feed(b"x" * 1000, max_lines=0), [])
        self.assertEqual(splitter.feed(b"x" * 1000 + b"\nNOOP\n"), [wire.TooLong(), b"NOOP"])

    def test_discard_drops_waiting_lines(self):
        splitter = wire.LineSplitter()
        splitter.feed(b"STLS\r\nUSER x\r\n", max_lines=1)
        splitter.discard()
        self.assertEqual((splitter.buffered, splitter.feed()), (0, []))

    @given(st.binary(max_size=2000), st.integers(1, 300), st.integers(0, 5))
    @settings(max_examples=200, deadline=None)
    def test_batches_give_the_same_lines(self, data, step, batch):
        whole = wire.LineSplitter().feed(data)
        splitter = wire.LineSplitter()
        batched = feed_in_batches(splitter, data, step, batch)
        if batch == 0:
            self.assertEqual(batched, [])
            batched = splitter.feed()
        self.assertEqual(batched, whole)


class ParseTests(SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(wire.parse_command(b"top 3 10"), wire.Command("TOP", (3, 10)))
        self.assertEqual(wire.parse_command(b"LIST"), wire.Command("LIST", ()))
        self.assertEqual(wire.parse_command(b"PASS a b "), wire.Command("PASS", (b"a b ",)))

    def test_errors(self):
        for line, error in [
            (b"", errors.UnknownCommand),
            (b"LAST", errors.UnknownCommand),
            (b"RETR", errors.BadArguments),
            (b"RETR 1 ", errors.BadArguments),
            (b"TOP 1", errors.BadArguments),
            (b"USER", errors.BadArguments),
            (b"USER ", errors.BadArguments),
            (b"\x00", errors.UnknownCommand),
        ]:
            self.assertRaises(error, wire.parse_command, line)

    @given(
        st.one_of(
            st.binary(max_size=300),
            st.tuples(
                st.sampled_from([*wire.ARGUMENTS, "noop", "Retr", "top", "XTND", ""]),
                st.sampled_from(["", " ", " 1", " 1 2", " 01", " x", " alice pw", " 1 -2"]),
                st.binary(max_size=20),
            ).map(lambda t: t[0].encode() + t[1].encode() + t[2]),
        )
    )
    @settings(max_examples=500, deadline=None)
    def test_any_line_parses_or_pop_error(self, line):
        """
        Any line is a Command named by its first word in any case, with
        non-negative numbers, or UnknownCommand / BadArguments: never
        another error.
        """
        try:
            command = wire.parse_command(line)
        except (errors.UnknownCommand, errors.BadArguments):
            return
        verb = line.partition(b" ")[0]
        self.assertEqual(command.verb, verb.decode("ascii").upper())
        self.assertIn(command.verb, wire.ARGUMENTS)
        self.assertEqual(wire.parse_command(verb.swapcase() + line[len(verb) :]), command)
        for arg in command.args:
            self.assertIsInstance(arg, (int, bytes, str))
            if isinstance(arg, int):
                self.assertGreaterEqual(arg, 0)

    def test_responses(self):
        self.assertEqual(wire.ok(), b"+OK\r\n")
        self.assertEqual(wire.ok("2 320"), b"+OK 2 320\r\n")
        self.assertEqual(
            wire.err(errors.MailboxInUse("/secret/path")),
            b"-ERR [IN-USE] Another session of this user is open; try again when it ends\r\n",
        )
        self.assertEqual(wire.err(errors.NoSuchMessage()), b"-ERR No such message\r\n")

    def test_multiline_batches(self):
        chunks = list(wire.multiline((b"%d" % i for i in range(2500)), batch=1000))
        self.assertEqual(len(chunks), 4)
        self.assertEqual(b"".join(chunks).split(b"\r\n")[-2:], [b".", b""])


def encode(data: bytes, step: int, lines: int | None = None) -> bytes:
    return encode_counted(data, step, lines)[0]


def encode_counted(data: bytes, step: int, lines: int | None = None) -> tuple[bytes, int]:
    """The encoded body and the octets the encoder counted in it."""
    encoder = BodyEncoder(lines)
    out = b"".join(encoder.feed(data[i : i + step]) for i in range(0, len(data), step))
    out += encoder.finish()
    return out, encoder.octets


def unstuff(body: bytes) -> bytes:
    assert body.endswith(b".\r\n")
    lines = body[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class BodyEncoderTests(SynchronousTestCase):
    def test_stuffing_first_line_and_chunk_edges(self):
        data = b".a\n..b\nc\n.\n"
        for step in range(1, len(data) + 1):
            self.assertEqual(encode(data, step), b"..a\r\n...b\r\nc\r\n..\r\n.\r\n")

    def test_crlf_split_across_chunks(self):
        self.assertEqual(encode(b"a\r\nb\r\n", 2), b"a\r\nb\r\n.\r\n")

    def test_empty_message(self):
        self.assertEqual(encode(b"", 1), b".\r\n")
        self.assertEqual(wire_size(b""), 0)

    def test_top(self):
        msg = b"A: 1\r\nB: 2\n\nl1\n.l2\nl3"
        self.assertEqual(encode(msg, 3, 0), b"A: 1\r\nB: 2\r\n\r\n.\r\n")
        self.assertEqual(encode(msg, 3, 2), b"A: 1\r\nB: 2\r\n\r\nl1\r\n..l2\r\n.\r\n")
        self.assertEqual(encode(msg, 3, 10), encode(msg, 3))

    def test_top_blank_line_at_chunk_start(self):
        msg = b"A: 1\n\nbody\n"
        for step in range(1, len(msg) + 1):
            self.assertEqual(encode(msg, step, 0), b"A: 1\r\n\r\n.\r\n", step)

    def test_octets_leave_out_stuffing_and_terminator(self):
        """The encoder counts CRLF line ends, not stuffing dots or the final '.' line."""
        cases = [
            (b".a\n..b\nc", None, b"..a\r\n...b\r\nc\r\n.\r\n", 12),
            (b"", None, b".\r\n", 0),
            (b"x\r", None, b"x\r\r\n.\r\n", 4),
            (b"H: v\n\n.1\n2\n", 1, b"H: v\r\n\r\n..1\r\n.\r\n", 12),
        ]
        for data, lines, body, octets in cases:
            for step in (1, 2, 5, 100):
                self.assertEqual(encode_counted(data, step, lines), (body, octets), (data, step))

    @given(st.binary(max_size=3000), st.integers(1, 64))
    @settings(max_examples=300, deadline=None)
    def test_round_trip_and_size(self, data, step):
        """decode(encode(x)) is x with CRLF line ends; LIST's size is its length, and the count."""
        body, octets = encode_counted(data, step)
        self.assertEqual(body, encode(data, len(data) or 1))
        plain = unstuff(body)
        self.assertEqual(len(plain), wire_size(data))
        self.assertEqual(octets, wire_size(data))
        normalised = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if data and not data.endswith(b"\n"):
            normalised += b"\r\n"
        self.assertEqual(plain, normalised)

    @given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b".."]), max_size=60),
           st.integers(1, 9))
    @settings(max_examples=500, deadline=None)
    def test_retr_matches_line_by_line(self, parts, step):
        """
        RETR encodes whole chunks, partial lines included, holding back only
        a CR at a chunk's end: it must agree with encoding line by line.
        """
        data = b"".join(parts)
        expected = []
        lines = data.split(b"\n")
        last = lines.pop()
        for stored in lines:
            line = stored[:-1] if stored.endswith(b"\r") else stored
            expected.append((b"." if line.startswith(b".") else b"") + line + b"\r\n")
        if last:
            expected.append((b"." if last.startswith(b".") else b"") + last + b"\r\n")
        self.assertEqual(encode(data, step), b"".join(expected) + b".\r\n")

    @given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"H: v\n"]), max_size=60),
           st.integers(1, 9), st.integers(0, 5))
    @settings(max_examples=300, deadline=None)
    def test_top_is_prefix_of_retr(self, parts, step, lines):
        """TOP starts RETR, and counts no more octets than the whole message has."""
        data = b"".join(parts)
        (top, octets), retr = encode_counted(data, step, lines), encode(data, step)
        self.assertTrue(retr.startswith(top[:-3]))
        self.assertEqual(octets, len(unstuff(top)))
        self.assertLessEqual(octets, wire_size(data))


    @given(st.binary(max_size=300))
    @settings(max_examples=300, deadline=None)
    def test_possible_wire_size_bounds(self, data):
        """Every message's wire size is within the bounds its stored size gives, and tight."""
        self.assertTrue(possible_wire_size(len(data), wire_size(data)))
        self.assertFalse(possible_wire_size(len(data), len(data) - 1))
        self.assertFalse(possible_wire_size(len(data), 2 * len(data) + 2))
        # The longest: LFs, then one octet without a line end.
        longest = b"\n" * (len(data) - 1) + b"x" if data else b""
        self.assertEqual(wire_size(longest), 2 * len(data) + 1 if data else 0)


class MaildropViewTests(SynchronousTestCase):
    def view(self, **kw):
        return MaildropView(Listing(uids=("a", "b", "c"), sizes=(10, 20, 30), **kw))

    @given(st.lists(st.booleans(), max_size=40), st.integers(1, 5))
    def test_live_runs(self, deleted: list[bool], most: int) -> None:
        """Runs cover exactly the live messages, in order, each consecutive and short enough."""
        count = len(deleted)
        view = MaildropView(Listing(uids=[str(i) for i in range(count)], sizes=[1] * count))
        for i, gone in enumerate(deleted):
            if gone:
                view.delete(i + 1)
        runs = list(view.live_runs(most))
        self.assertEqual(
            [i + 1 for run in runs for i in run],
            [i + 1 for i, gone in enumerate(deleted) if not gone],
        )
        self.assertTrue(all(0 < len(run) <= most and run.step == 1 for run in runs))

    def test_numbered(self) -> None:
        """LIST/UIDL bodies: N VALUE lines from runs, then the terminator."""
        values = ["a", "b", "c", "d"]
        body = b"".join(wire.numbered([range(2), range(3, 4)], lambda r: values[r.start : r.stop]))
        self.assertEqual(body, b"1 a\r\n2 b\r\n4 d\r\n.\r\n")
        self.assertEqual(b"".join(wire.numbered([], lambda r: [])), b".\r\n")

    def test_delete_reset(self):
        view = self.view()
        view.delete(2)
        self.assertEqual(view.stat(), (2, 40))
        self.assertEqual([i + 1 for run in view.live_runs() for i in run], [1, 3])
        self.assertRaises(errors.MessageDeleted, view.size, 2)
        self.assertRaises(errors.NoSuchMessage, view.size, 4)
        view.reset()
        self.assertEqual(view.stat(), (3, 60))

    def test_expire(self):
        day = 86400
        view = self.view(received=(0.0, 9 * day, 0.0), seen=(True, True, False))
        view.retrieved(3)
        self.assertEqual(view.expired_indexes(None, 10 * day), [])
        self.assertEqual(view.expired_indexes(5, 10 * day), [0, 2])
        # EXPIRE 0: only what this session retrieved, not what was seen before.
        self.assertEqual(view.expired_indexes(0, 10 * day), [2])
        view.retrieved(1)
        self.assertEqual(view.expired_indexes(0, 10 * day), [0, 2])
        view.delete(1)
        self.assertEqual(view.expired_indexes(0, 10 * day), [2])
        self.assertEqual(view.expired_indexes(5, 10 * day), [2])

    def test_listing_columns_checked(self):
        self.assertRaises(ValueError, Listing, uids=("a",), sizes=(1, 2))


class AccountTests(SynchronousTestCase):
    def test_override_and_announce(self):
        default = AccountSettings(0, None)
        users = [default.override({"login_delay": "900"}), default.override({"expire": "5"}),
                 default.override({"expire": "never"})]
        announced = Announcement.of(default, users)
        self.assertEqual(capability_lines(announced, per_user=announced.per_user),
                         ["LOGIN-DELAY 900 USER", "EXPIRE 5 USER"])
        self.assertEqual(capability_lines(default), ["LOGIN-DELAY 0", "EXPIRE NEVER"])
        self.assertRaises(ValueError, default.override, {"expire": "-1"})
