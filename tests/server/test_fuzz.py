"""
Proof by fuzzing: properties of the pure core (parser, responses, line
framing, the body encoder and decoder, every SASL mechanism), and a stateful
test driving whole POP3 sessions over the real protocol object with the
in-memory store and a real Maildir.

The normal suite keeps example counts small so it stays fast.  For a long
run, set ``POPSERV_FUZZ_EXAMPLES`` (see docs/development.rst, "Fuzzing")::

    POPSERV_FUZZ_EXAMPLES=20000 python -m twisted.trial tests.server.test_fuzz

The stateful tests get a fifth of that (each example is a whole session).
Runs stay derandomized (tests/__init__.py), so a failure reproduces.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from popserv.core import errors, wire
from popserv.core.body import BodyDecoder, BodyEncoder, WireSizeCounter, wire_size
from popserv.logins.passwords.scram import ScramKeys
from popserv.logins.sasl import MECHANISMS, external_mechanism
from popserv.logins.sasl.exchange import decode as _decode_sasl
from popserv.logins.sasl.mechanism import (
    MAX_ROUNDS,
    Challenge,
    SASLAborted,
    SASLContext,
    SASLMalformed,
    Success,
)
from popserv.logins.sasl.scram import NeedKeys
from popserv.server.factory import POP3Factory
from popserv.server.policy import Policy
from popserv.stores.layout import ensure_maildir
from popserv.stores.maildir import deliver
from popserv.stores.memory import MemoryMaildrop, MemoryRealm
from tests.support import LOCAL_PEER
from tests.support.certs import CA
from tests.support.fuzzing import examples, stateful_settings
from tests.support.maildirs import _MaildirRealm, maildir_contents


def fuzz(normal: int):
    """Settings for a property of the pure core: fast, unless a long run asks for more."""
    return settings(
        max_examples=examples(normal),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of ``sizes`` (cycled; 0 gives an empty piece)."""
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        pieces.append(data[pos : pos + size])
        pos, i = pos + size, i + 1
    return pieces


#: Chunk sizes for "any chunking": small ones, some zero (an empty read).
CHUNKS = st.lists(st.integers(0, 70), min_size=1, max_size=12).filter(any)

#: Bytes rich in what matters to line-based code: CR, LF, dots, spaces.
LINEY = st.lists(
    st.one_of(
        st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b" ", b"\r\r\n", b"\n.\n", b"x"]),
        st.binary(max_size=20),
    ),
    max_size=80,
).map(b"".join)


# The command parser


#: Parsed-argument errors: the only exceptions parse_command may raise.
PARSE_ERRORS = (errors.UnknownCommand, errors.BadArguments)

VERBS = sorted(wire.ARGUMENTS)


@st.composite
def command_lines(draw):
    """Lines that look like commands: a known verb in any case, then anything."""
    verb = draw(st.sampled_from(VERBS))
    verb = "".join(c.lower() if draw(st.booleans()) else c for c in verb)
    rest = draw(
        st.one_of(
            st.none(),
            st.binary(max_size=40),
            st.lists(
                st.one_of(
                    st.integers(-5, 10**20).map(lambda n: str(n).encode()),
                    st.sampled_from([b"", b"0", b"00", b"+1", b"1.0", b"\xd9\xa1", b"*", b"-"]),
                ),
                max_size=4,
            ).map(b" ".join),
        )
    )
    return verb.encode() + (b"" if rest is None else b" " + rest)


NUMBER = st.integers(0, 10**18 - 1)
TOKEN = st.binary(min_size=1, max_size=30).filter(lambda b: b" " not in b)
REST = st.binary(min_size=1, max_size=60)


@st.composite
def valid_commands(draw):
    """A command, and a line that says it (any case, any valid number spelling)."""
    verb = draw(st.sampled_from(VERBS))
    if verb in ("USER", "PASS"):
        args = (draw(REST),)
    elif verb == "APOP":
        args = (draw(TOKEN), draw(TOKEN))
    elif verb == "AUTH":
        args = tuple(draw(st.lists(TOKEN, max_size=2)))
    elif verb in ("RETR", "DELE"):
        args = (draw(NUMBER),)
    elif verb in ("LIST", "UIDL"):
        args = tuple(draw(st.lists(NUMBER, max_size=1)))
    elif verb == "TOP":
        args = (draw(NUMBER), draw(NUMBER))
    elif verb == "LANG":
        args = tuple(
            draw(
                st.lists(
                    st.from_regex(r"\*|[a-z]{1,8}(-[A-Za-z0-9]{1,8}){0,3}", fullmatch=True),
                    max_size=1,
                )
            )
        )
    else:
        args = ()
    spelled = []
    for arg in args:
        if isinstance(arg, int):
            spelled.append(b"0" * draw(st.integers(0, 18 - len(str(arg)))) + str(arg).encode())
        elif isinstance(arg, str):
            spelled.append(arg.encode())
        else:
            spelled.append(arg)
    case = draw(st.sampled_from([str.upper, str.lower, str.title]))
    line = b" ".join([case(verb).encode(), *spelled])
    return wire.Command(verb, args), line


class ParserFuzzTests(SynchronousTestCase):
    @given(st.one_of(st.binary(max_size=300), command_lines()))
    @fuzz(500)
    def test_any_line_is_a_command_or_a_defined_error(self, line):
        """Any bytes: a Command whose verb is known, or UnknownCommand / BadArguments."""
        try:
            command = wire.parse_command(line)
        except PARSE_ERRORS:
            return
        self.assertIn(command.verb, wire.ARGUMENTS)
        for arg in command.args:
            if isinstance(arg, int):
                self.assertGreaterEqual(arg, 0)
                self.assertLess(arg, 10**wire.MAX_NUMBER_DIGITS)

    @given(valid_commands())
    @fuzz(500)
    def test_valid_commands_round_trip(self, case):
        command, line = case
        self.assertEqual(wire.parse_command(line), command)


# Responses


class _AnyError(errors.PopError):
    pass


class ResponseFuzzTests(SynchronousTestCase):
    def assertOneLine(self, line: bytes, prefix: bytes) -> None:
        self.assertTrue(line.startswith(prefix), line)
        self.assertTrue(line.endswith(b"\r\n"), line)
        self.assertNotIn(b"\r", line[:-2])
        self.assertNotIn(b"\n", line[:-2])

    @given(st.text(max_size=80))
    @fuzz(300)
    def test_ok_is_one_line(self, text):
        self.assertOneLine(wire.ok(text), b"+OK")

    @given(
        st.text(max_size=80),
        st.one_of(st.none(), st.text(max_size=20)),
        st.one_of(st.none(), st.text(max_size=80)),
    )
    @fuzz(300)
    def test_err_is_one_line(self, text, code, translated):
        error = type("E", (_AnyError,), {"text": text, "code": code})("detail\r\nnot sent")
        line = wire.err(error, translated)
        self.assertOneLine(line, b"-ERR")
        self.assertNotIn(b"not sent", line)

    def test_line_breaks_in_texts_become_spaces(self):
        """A translation with a line break in it cannot add a line to the session."""
        self.assertEqual(wire.ok("a\r\n+OK b\n"), b"+OK a  +OK b \r\n")
        self.assertEqual(wire.err(errors.NoSuchMessage(), "no\r\nsuch"), b"-ERR no  such\r\n")

    def test_every_defined_error_is_one_line(self):
        def every(cls):
            yield cls
            for sub in cls.__subclasses__():
                yield from every(sub)

        for cls in every(errors.PopError):
            if not cls.__module__.startswith("popserv"):
                continue
            self.assertOneLine(wire.err(cls("x")), b"-ERR")


# Line framing


def reference_lines(data: bytes, in_exchange: bool) -> list[wire.Line]:
    """What LineSplitter should give for ``data``, written the slow, obvious way."""

    def limit(line: bytes) -> int:
        if in_exchange or line[:5].upper() == b"AUTH ":
            return max(wire.MAX_COMMAND_LINE, wire.MAX_AUTH_LINE)
        return wire.MAX_COMMAND_LINE

    *complete, partial = data.split(b"\n")
    out: list[wire.Line] = []
    for line in complete:
        if len(line) + 1 > limit(line):
            out.append(wire.TooLong())
        else:
            out.append(line[:-1] if line.endswith(b"\r") else line)
    if len(partial) > limit(partial):
        out.append(wire.TooLong())
    return out


LONG_LINES = st.lists(
    st.one_of(
        LINEY,
        st.tuples(
            st.sampled_from([b"", b"AUTH ", b"auth x", b"AUT"]),
            st.integers(200, 9000),
            st.sampled_from([b"\n", b"\r\n", b""]),
        ).map(lambda t: t[0] + b"y" * t[1] + t[2]),
    ),
    max_size=6,
).map(b"".join)


class LineSplitterFuzzTests(SynchronousTestCase):
    @given(LONG_LINES, CHUNKS, st.booleans())
    @fuzz(300)
    def test_any_chunking_matches_the_reference(self, data, sizes, in_exchange):
        """Any bytes, cut anywhere (empty reads too): the same lines and TooLongs as the model."""
        splitter = wire.LineSplitter()
        splitter.in_exchange = in_exchange
        lines: list[wire.Line] = []
        for piece in chunked(data, sizes):
            lines += splitter.feed(piece)
        self.assertEqual(lines, reference_lines(data, in_exchange))
        self.assertEqual(splitter.feed(), [])
        self.assertLessEqual(splitter.buffered, wire.MAX_AUTH_LINE)

    @given(LONG_LINES, CHUNKS, st.lists(st.integers(0, 3), min_size=1))
    @fuzz(300)
    def test_batches_and_chunks_together(self, data, sizes, batches):
        """Taking at most a few lines per call, with any chunking, loses and invents nothing."""
        splitter = wire.LineSplitter()
        lines: list[wire.Line] = []
        calls = 0
        for piece in chunked(data, sizes):
            batch = batches[calls % len(batches)]
            calls += 1
            got = splitter.feed(piece, max_lines=batch)
            self.assertLessEqual(len(got), batch)
            lines += got
        lines += splitter.feed()
        self.assertEqual(lines, reference_lines(data, False))


# The body: encoder, size counter, decoder


def encode_chunks(pieces: list[bytes], body_lines: int | None = None) -> bytes:
    encoder = BodyEncoder(body_lines)
    return b"".join(encoder.feed(p) for p in pieces) + encoder.finish()


def normalised(data: bytes) -> bytes:
    """The message as RETR carries it, unstuffed: CRLF line ends, a last one added."""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\n"):
        out += b"\r\n"
    return out


def decode_chunks(pieces: list[bytes], limit: int | None = None) -> tuple[BodyDecoder, bytes]:
    decoder = BodyDecoder(limit)
    for i, piece in enumerate(pieces):
        rest = decoder.feed(piece)
        if rest is not None:
            return decoder, rest + b"".join(pieces[i + 1 :])
    raise AssertionError("the body never ended")


class BodyFuzzTests(SynchronousTestCase):
    @given(LINEY, CHUNKS)
    @fuzz(400)
    def test_size_counter_any_chunking(self, data, sizes):
        """WireSizeCounter fed in any pieces is the length of what RETR sends, unstuffed."""
        counter = WireSizeCounter()
        for piece in chunked(data, sizes):
            counter.feed(piece)
        self.assertEqual(counter.result(), len(normalised(data)))
        self.assertEqual(counter.result(), wire_size(data))

    @given(LINEY, CHUNKS, CHUNKS)
    @fuzz(400)
    def test_encode_then_decode_any_chunkings(self, data, encode_sizes, decode_sizes):
        """
        decode(encode(x)) is x with CRLF line ends, whatever the chunking on
        either side (the encoder's output is one byte stream for the decoder).
        """
        encoded = encode_chunks(chunked(data, encode_sizes))
        self.assertEqual(encoded, encode_chunks([data]))
        self.assertTrue(encoded.endswith(b".\r\n"))
        decoder, rest = decode_chunks(chunked(encoded + b"QUIT\r\n", decode_sizes))
        self.assertEqual(b"".join(decoder.chunks), normalised(data))
        self.assertEqual(decoder.size, len(normalised(data)))
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertFalse(decoder.overflow)

    @given(LINEY, CHUNKS, st.integers(0, 400))
    @fuzz(400)
    def test_decoder_limit(self, data, sizes, limit):
        """Over the limit: overflow, nothing kept, and still the end found in the right place."""
        body = normalised(data)
        encoded = encode_chunks([data])
        decoder, rest = decode_chunks(chunked(encoded + b"NOOP\r\n", sizes), limit)
        self.assertEqual(rest, b"NOOP\r\n")
        self.assertEqual(decoder.overflow, len(body) > limit)
        if not decoder.overflow:
            self.assertEqual(b"".join(decoder.chunks), body)
        else:
            self.assertEqual(decoder.chunks, [])

    @given(st.binary(max_size=400), CHUNKS)
    @fuzz(400)
    def test_decoder_any_bytes(self, data, sizes):
        """Arbitrary DATA bytes never raise: the body goes on, or it ends at CRLF.CRLF."""
        decoder = BodyDecoder(100)
        end = (b"\r\n" + data).find(b"\r\n.\r\n")
        for piece in chunked(data, sizes):
            rest = decoder.feed(piece)
            if rest is not None:
                break
        self.assertEqual(decoder.done, end >= 0)

    @given(LINEY, CHUNKS, st.integers(0, 6))
    @fuzz(400)
    def test_top_any_chunking(self, data, sizes, lines):
        """TOP's body does not depend on how the stored message is read, and RETR starts with it."""
        top = encode_chunks(chunked(data, sizes), lines)
        self.assertEqual(top, encode_chunks([data], lines))
        self.assertTrue(encode_chunks([data]).startswith(top[:-3]))


# SASL


SASL_RESPONSE = st.one_of(
    st.binary(max_size=120),
    st.sampled_from(
        [
            b"",
            b"\0",
            b"\0a\0b",
            b"a\0b\0c",
            b"n,,n=a,r=b",
            b"n,,",
            b"y,,n=a,r=b",
            b"p=tls-exporter,,n=a,r=b",
            b"c=biws,r=x,p=AAAA",
            b"user a\x01auth=Bearer t",
            b"n,a=x,\x01auth=Bearer t\x01\x01",
            b"user=a\x01auth=Bearer t\x01\x01",
            b"alice 0123456789abcdef0123456789abcdef",
            b"\xff\xfe",
            "é".encode(),
        ]
    ),
    st.lists(
        st.sampled_from(
            [
                b"n",
                b"y",
                b"a=",
                b"n=",
                b"r=",
                b"c=",
                b"p=",
                b",",
                b"=2C",
                b"=3D",
                b"=",
                b"\x01",
                b"\0",
                b"auth=",
                b"Bearer ",
                b"user=",
                b"alice",
                b"x",
            ]
        ),
        max_size=12,
    ).map(b"".join),
)


@functools.cache
def certificate():
    return CA().issue("alice", client=True, emails=("alice@example.org",)).certificate


MECHANISM_INFOS = [*MECHANISMS, external_mechanism("email"), external_mechanism("email-local")]


class SASLFuzzTests(SynchronousTestCase):
    """Every mechanism, fed any responses: a step, or its defined failure, nothing else."""

    @given(
        st.sampled_from(MECHANISM_INFOS),
        st.one_of(st.none(), SASL_RESPONSE),
        st.lists(SASL_RESPONSE, max_size=4),
        st.booleans(),
        st.booleans(),
    )
    @fuzz(600)
    def test_any_responses(self, info, initial, answers, with_tls, have_keys):
        context = SASLContext(
            secure=with_tls,
            channel_bindings={"tls-exporter": b"\x01" * 32} if with_tls else {},
            client_certificate=certificate() if with_tls else None,
            channel_binding_offered=with_tls,
        )
        exchange = info.factory(context)
        responses = [initial, *answers]
        try:
            for response in responses[:MAX_ROUNDS]:
                step = exchange.step(response)
                if isinstance(step, NeedKeys):
                    self.assertIsInstance(step.username, str)
                    keys = ScramKeys.derive(step.hash_name, "pencil") if have_keys else None
                    step = exchange.provide(keys)
                self.assertIsInstance(step, (Challenge, Success))
                if isinstance(step, Success):
                    self.assertIsNotNone(step.credentials)
                    break
                self.assertIsInstance(step.data, bytes)
        except (SASLMalformed, errors.AuthFailed):
            pass

    @given(st.binary(max_size=200), st.booleans())
    @fuzz(500)
    def test_response_lines(self, line, initial):
        """A response line is bytes, a cancel, or malformed base64: nothing else."""
        try:
            decoded = _decode_sasl(line, initial=initial)
        except (SASLAborted, SASLMalformed):
            return
        self.assertIsInstance(decoded, bytes)

    @given(st.binary(max_size=200))
    @fuzz(300)
    def test_base64_round_trip(self, data):
        self.assertEqual(_decode_sasl(base64.b64encode(data)), data)


# Whole sessions, as a state machine


@implementer(IReactorThreads)


def encoded(message: bytes, body_lines: int | None = None) -> bytes:
    return encode_chunks([message], body_lines)


MESSAGE = st.one_of(
    LINEY,
    st.sampled_from([b"", b"Subject: x\r\n\r\nbody\r\n.\r\n..\r\n", b"A: 1\n\nl1\nl2\nl3"]),
)
NUMBERS = st.integers(1, 5)
BAD_NUMBERS = st.sampled_from(
    [
        b"0",
        b"-1",
        b"99",
        b"abc",
        b"",
        b"1 2",
        b"1 ",
        b" 1",
        b"+1",
        b"99999999999999999999",
        b"\xd9\xa1",
    ]
)
UIDL_RE = re.compile(rb"[\x21-\x7e]{1,70}")


class POP3Sessions(RuleBasedStateMachine):
    """
    Random sessions of valid and invalid commands against a maildrop,
    checked against a model of what RFC 1939 says they must do.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.logged: list[dict] = []
        self.observer = lambda event: (
            self.logged.append(event)
            if event.get("log_level") in (LogLevel.error, LogLevel.critical)
            else None
        )
        globalLogPublisher.addObserver(self.observer)
        self.transport: StringTransport | None = None
        self.protocol = None

    # The store, by kind (subclasses)

    def make_store(self, messages: list[bytes]):
        raise NotImplementedError

    def contents(self) -> list[bytes]:
        raise NotImplementedError

    # Sessions

    @initialize(messages=st.lists(MESSAGE, max_size=5), log_in=st.booleans())
    def start(self, messages, log_in):
        realm = self.make_store(messages)
        #: What the store holds, in listing order, as it reads it back.
        self.stored = self.contents()
        # Stored as delivered (the order of same-second deliveries is the store's).
        self.assertEqual(
            sorted(encoded(m) for m in self.stored),
            sorted(encoded(m) for m in messages),
            "stored form",
        )
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        policy = Policy(
            hostname="pop.example.org",
            login_timeout=1e9,
            idle_timeout=1e9,
            max_auth_failures=10**6,
            # Nonsense comes in runs here; the bad-command limit has its own tests.
            max_bad_commands=10**6,
        )
        self.factory = POP3Factory(Portal(realm, [checker]), policy, clock=self.clock)
        self.connect(log_in)

    def connect(self, log_in: bool = False) -> None:
        self.transport = StringTransport(peerAddress=LOCAL_PEER)
        self.protocol = self.factory.buildProtocol(LOCAL_PEER)
        self.protocol.makeConnection(self.transport)
        greeting = self.take()
        self.assertTrue(greeting.startswith(b"+OK ") and greeting.endswith(b"\r\n"), greeting)
        self.state = "AUTHORIZATION"
        self.user: bytes | None = None
        self.deleted: set[int] = set()
        self.uids: dict[int, bytes] = {}
        if log_in:
            self.send_user(True)
            self.send_password(True)

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def assertTrue(self, condition, message=None) -> None:
        if not condition:
            raise AssertionError(message)

    def assertEqual(self, a, b, message=None) -> None:
        if a != b:
            raise AssertionError(f"{a!r} != {b!r}" + (f" ({message})" if message else ""))

    def command(self, line: bytes) -> tuple[bytes, bytes | None]:
        """
        Send one command line; return its status line and, for a multi-line
        +OK, its body (stuffed, with the final ``.`` line).  Checks that the
        server wrote exactly one response.
        """
        self.protocol.dataReceived(line + b"\r\n")
        # Long enough for any failed-login penalty (at most 15 s, twice).
        self.clock.pump([1.0] * 35)
        out = self.take()
        status, sep, rest = out.partition(b"\r\n")
        self.assertTrue(sep, f"no complete response to {line!r}: {out!r}")
        self.assertTrue(status.startswith((b"+OK", b"-ERR")), status)
        command = self.parsed(line)
        multiline = isinstance(command, wire.Command) and (
            command.verb in ("CAPA", "RETR", "TOP")
            or (command.verb in ("LIST", "UIDL") and not command.args)
        )
        if status.startswith(b"+OK") and multiline:
            self.assertTrue(rest == b".\r\n" or rest.endswith(b"\r\n.\r\n"), rest[-20:])
            body_lines = rest[:-3].split(b"\r\n")[:-1]
            self.assertTrue(b"." not in body_lines, "a lone '.' inside a multi-line answer")
            return status, rest
        self.assertEqual(rest, b"", f"more than one response to {line!r}")
        return status, None

    @staticmethod
    def parsed(line: bytes):
        try:
            return wire.parse_command(line)
        except errors.PopError as e:
            return e

    def live(self) -> list[int]:
        return [n for n in range(1, len(self.stored) + 1) if n not in self.deleted]

    def is_live(self, number: int) -> bool:
        return (
            self.state == "TRANSACTION"
            and 1 <= number <= len(self.stored)
            and (number not in self.deleted)
        )

    def expect_err(self, line: bytes) -> bytes:
        status, _ = self.command(line)
        self.assertTrue(status.startswith(b"-ERR"), f"{line!r} -> {status!r}")
        return status

    # Logging in

    @rule(right=st.booleans())
    def user(self, right):
        self.send_user(right)

    def send_user(self, right):
        name = b"alice" if right else b"bob"
        if self.state == "TRANSACTION":
            self.expect_err(b"USER " + name)
            return
        status, _ = self.command(b"USER " + name)
        self.assertEqual(status, b"+OK Send PASS")
        self.state, self.user = "USER_GIVEN", name

    @rule(right=st.booleans())
    def password(self, right):
        self.send_password(right)

    def send_password(self, right):
        line = b"PASS " + (b"secret" if right else b"wrong")
        if self.state != "USER_GIVEN":
            self.expect_err(line)
            return
        status, _ = self.command(line)
        if right and self.user == b"alice":
            count, octets = len(self.stored), sum(wire_size(m) for m in self.stored)
            self.assertEqual(status, b"+OK Logged in, %d messages (%d octets)" % (count, octets))
            self.state = "TRANSACTION"
        else:
            self.assertTrue(status.startswith(b"-ERR [AUTH]"), status)
            self.state = "AUTHORIZATION"

    @rule()
    def login(self):
        """USER and PASS right, as most sessions start (so TRANSACTION gets explored)."""
        self.send_user(True)
        self.send_password(True)

    # TRANSACTION

    @rule()
    def stat(self):
        if self.state != "TRANSACTION":
            self.expect_err(b"STAT")
            return
        status, _ = self.command(b"STAT")
        live = self.live()
        octets = sum(wire_size(self.stored[n - 1]) for n in live)
        self.assertEqual(status, b"+OK %d %d" % (len(live), octets))
        # STAT matches LIST.
        _, body = self.command(b"LIST")
        lines = body[:-3].split(b"\r\n")[:-1]
        self.assertEqual(len(lines), len(live))
        self.assertEqual(sum(int(line.split()[1]) for line in lines), octets)

    @rule(number=st.one_of(st.none(), NUMBERS))
    def list(self, number):
        line = b"LIST" if number is None else b"LIST %d" % number
        if self.state != "TRANSACTION" or (number is not None and not self.is_live(number)):
            self.expect_err(line)
            return
        status, body = self.command(line)
        if number is not None:
            self.assertEqual(status, b"+OK %d %d" % (number, wire_size(self.stored[number - 1])))
            return
        expected = b"".join(b"%d %d\r\n" % (n, wire_size(self.stored[n - 1])) for n in self.live())
        self.assertEqual(body, expected + b".\r\n")

    @rule(number=st.one_of(st.none(), NUMBERS))
    def uidl(self, number):
        line = b"UIDL" if number is None else b"UIDL %d" % number
        if self.state != "TRANSACTION" or (number is not None and not self.is_live(number)):
            self.expect_err(line)
            return
        status, body = self.command(line)
        if number is not None:
            _, n, uid = status.split(b" ")
            pairs = [(int(n), uid)]
        else:
            pairs = [
                (int(n), uid)
                for n, uid in (entry.split(b" ") for entry in body[:-3].split(b"\r\n")[:-1])
            ]
            self.assertEqual([n for n, _ in pairs], self.live())
        for n, uid in pairs:
            self.assertTrue(UIDL_RE.fullmatch(uid), uid)
            self.assertEqual(self.uids.setdefault(n, uid), uid, "UIDL changed")
        self.assertEqual(len(set(self.uids.values())), len(self.uids), "UIDLs not unique")

    @rule(number=NUMBERS)
    def retr(self, number):
        line = b"RETR %d" % number
        if not self.is_live(number):
            self.expect_err(line)
            return
        status, body = self.command(line)
        message = self.stored[number - 1]
        self.assertEqual(status, b"+OK %d octets" % wire_size(message))
        self.assertEqual(body, encoded(message))

    @rule(number=NUMBERS, lines=st.integers(0, 4))
    def top(self, number, lines):
        line = b"TOP %d %d" % (number, lines)
        if not self.is_live(number):
            self.expect_err(line)
            return
        _, body = self.command(line)
        self.assertEqual(body, encoded(self.stored[number - 1], lines))

    @rule(number=NUMBERS)
    def dele(self, number):
        line = b"DELE %d" % number
        if not self.is_live(number):
            self.expect_err(line)
            return
        status, _ = self.command(line)
        self.assertEqual(status, b"+OK Message %d deleted" % number)
        self.deleted.add(number)

    @rule()
    def rset(self):
        if self.state != "TRANSACTION":
            self.expect_err(b"RSET")
            return
        status, _ = self.command(b"RSET")
        self.deleted.clear()
        octets = sum(wire_size(m) for m in self.stored)
        self.assertEqual(status, b"+OK %d messages (%d octets)" % (len(self.stored), octets))

    @rule()
    def noop(self):
        if self.state != "TRANSACTION":
            self.expect_err(b"NOOP")
            return
        self.assertEqual(self.command(b"NOOP")[0], b"+OK")

    # Nonsense

    @rule(
        verb=st.sampled_from([b"RETR", b"DELE", b"LIST", b"UIDL", b"TOP", b"TOP 1", b"retr"]),
        argument=BAD_NUMBERS,
    )
    def bad_number(self, verb, argument):
        """0, negative, out of range, not numbers, too many: -ERR, in any state."""
        line = verb + b" " + argument
        number = self.parsed(line)
        if (
            isinstance(number, wire.Command)
            and number.args
            and all(self.is_live(n) for n in number.args[:1])
        ):
            return  # TOP 1 1 and the like are valid
        self.expect_err(line)

    @rule(line=st.binary(max_size=300))
    def garbage(self, line):
        line = line.replace(b"\n", b"")
        stripped = line[:-1] if line.endswith(b"\r") else line
        if len(line) + 2 <= wire.MAX_COMMAND_LINE and isinstance(
            self.parsed(stripped), wire.Command
        ):
            return  # a real command: the other rules cover those
        self.expect_err(line)

    @rule(
        length=st.integers(254, 3000), verb=st.sampled_from([b"NOOP ", b"PASS ", b"X", b"RETR 1"])
    )
    def long_line(self, length, verb):
        status = self.expect_err(verb + b"x" * length)
        self.assertEqual(status, b"-ERR Line too long")

    # Ends

    @rule(hang_up=st.booleans(), log_in=st.booleans())
    def end(self, hang_up, log_in):
        """
        QUIT: the DELEted messages, and only they, are gone.  A hang-up
        without QUIT: nothing is deleted.  Either way the lock is released
        (the next session logs in).
        """
        if hang_up:
            self.protocol.connectionLost(None)
        else:
            status, _ = self.command(b"QUIT")
            self.assertTrue(status.startswith(b"+OK"), status)
            self.assertTrue(self.transport.disconnecting, "QUIT did not close")
            if self.state == "TRANSACTION":
                self.stored = [m for n, m in enumerate(self.stored, 1) if n not in self.deleted]
            self.protocol.connectionLost(None)
        self.assertEqual(self.contents(), self.stored)
        self.connect(log_in)

    @invariant()
    def nothing_logged_as_an_error(self):
        self.assertEqual([formatEvent(e) for e in self.logged], [])

    def teardown(self):
        globalLogPublisher.removeObserver(self.observer)
        if self.protocol is not None:
            self.protocol.connectionLost(None)


class MemorySessions(POP3Sessions):
    def make_store(self, messages):
        self.maildrop = MemoryMaildrop(messages)
        return MemoryRealm({"alice": self.maildrop})

    def contents(self):
        return self.maildrop.contents()


class MaildirSessions(POP3Sessions):
    def make_store(self, messages):
        self.path = Path(tempfile.mkdtemp(prefix="popserv-fuzz-")) / "alice"
        ensure_maildir(self.path)
        for message in messages:
            deliver(self.path, message)
        return _MaildirRealm(self.path)

    def contents(self):
        return maildir_contents(self.path)

    def teardown(self):
        try:
            super().teardown()
        finally:
            shutil.rmtree(self.path.parent, ignore_errors=True)


class MemorySessionTests(MemorySessions.TestCase):
    """Sessions on the in-memory store."""

    settings = stateful_settings(40)

    def test_sessions(self):
        """(trial runs ``test*`` methods; hypothesis names its one ``runTest``.)"""
        self.runTest()


class MaildirSessionTests(MaildirSessions.TestCase):
    """Sessions on a real Maildir in a temporary directory."""

    settings = stateful_settings(25)

    def test_sessions(self):
        """(trial runs ``test*`` methods; hypothesis names its one ``runTest``.)"""
        self.runTest()
