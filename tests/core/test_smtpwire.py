"""The receiver's pure SMTP/LMTP grammar: verbs, arguments, addresses, replies, counts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.mail import smtp
from twisted.trial.unittest import SynchronousTestCase

from popserv.core import smtpwire
from popserv.core.smtpwire import (
    PARAMETERS_NEED_EHLO,
    SIZE_EXCEEDED,
    UNSUPPORTED_PARAMETER,
    CommandCounters,
    Refused,
    mail_size,
    parse_mail,
    parse_path,
    parse_rcpt,
    split_command,
)

#: Characters that matter to the address grammar, and a few that do not.
ADDRESS_BYTES = st.binary(max_size=40).map(lambda b: bytes(c % 128 for c in b)) | st.text(
    alphabet='<>@.,:"\\ ab\t-', max_size=30
).map(str.encode)


class VerbTableTests(SynchronousTestCase):
    def test_smtp_verbs(self):
        """RFC 5321's minimum set, STARTTLS and the optional ones this receiver answers."""
        for verb in (b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT"):
            self.assertIn(verb, smtpwire.SMTP_VERBS)
        self.assertIn(b"STARTTLS", smtpwire.SMTP_VERBS)
        self.assertNotIn(b"LHLO", smtpwire.SMTP_VERBS)
        self.assertNotIn(b"AUTH", smtpwire.SMTP_VERBS)  # a receiver, not a submission server
        self.assertEqual(len(set(smtpwire.SMTP_VERBS)), len(smtpwire.SMTP_VERBS))

    def test_lmtp_adds_lhlo_only(self):
        """LMTP answers every SMTP verb (HELO and EHLO with a refusal) and LHLO."""
        self.assertEqual(set(smtpwire.LMTP_VERBS) - set(smtpwire.SMTP_VERBS), {b"LHLO"})
        self.assertLessEqual(set(smtpwire.SMTP_VERBS), set(smtpwire.LMTP_VERBS))

    def test_junk_commands_move_no_mail(self):
        """Greetings and NOOP-like verbs are junk; the verbs of a transaction are not."""
        self.assertLessEqual(smtpwire.JUNK_COMMANDS, set(smtpwire.LMTP_VERBS))
        for verb in (b"MAIL", b"RCPT", b"DATA", b"QUIT", b"STARTTLS"):
            self.assertNotIn(verb, smtpwire.JUNK_COMMANDS)
        for verb in (b"NOOP", b"RSET", b"VRFY", b"HELP", b"EHLO", b"LHLO"):
            self.assertIn(verb, smtpwire.JUNK_COMMANDS)

    def test_verbs_are_capitals(self):
        """The table holds capitals, which is what split_command gives."""
        for verb in smtpwire.LMTP_VERBS:
            self.assertEqual(verb, verb.upper())
            self.assertEqual(split_command(verb.lower() + b" x")[0], verb)


class SplitCommandTests(SynchronousTestCase):
    def test_verb_in_capitals_and_argument(self):
        self.assertEqual(split_command(b"mail FROM:<a@b>"), (b"MAIL", b"FROM:<a@b>"))

    def test_white_space_around_is_dropped(self):
        self.assertEqual(split_command(b"  RCPT   TO:<a@b>  \t"), (b"RCPT", b"TO:<a@b>"))

    def test_no_argument(self):
        self.assertEqual(split_command(b"NOOP"), (b"NOOP", b""))

    def test_empty_line_is_an_empty_verb(self):
        self.assertEqual(split_command(b""), (b"", b""))
        self.assertEqual(split_command(b"   "), (b"", b""))

    def test_only_a_space_separates_the_verb(self):
        """A tab is not a separator: ``NOOP\\tx`` is one unknown verb."""
        self.assertEqual(split_command(b"NOOP\tx"), (b"NOOP\tX", b""))


class ArgumentTests(SynchronousTestCase):
    def test_mail_path_and_parameters(self):
        self.assertEqual(
            parse_mail(b"FROM:<a@b.example> SIZE=10 BODY=8BITMIME"),
            (b"<a@b.example>", b"SIZE=10 BODY=8BITMIME"),
        )

    def test_mail_null_path(self):
        self.assertEqual(parse_mail(b"FROM:<>"), (b"<>", b""))

    def test_mail_is_case_blind_and_takes_spaces_after_the_colon(self):
        self.assertEqual(parse_mail(b"from: <a@b>"), (b"<a@b>", b""))

    def test_mail_without_brackets(self):
        self.assertEqual(parse_mail(b"FROM:a@b"), (b"a@b", b""))

    def test_mail_malformed(self):
        for rest in (b"", b"FROM", b"TO:<a@b>", b"FROM:<a@b", b"FROM:<a b>", b"FROM:"):
            self.assertIsNone(parse_mail(rest), rest)

    def test_rcpt_path_and_parameters(self):
        self.assertEqual(parse_rcpt(b"TO:<u@d> NOTIFY=NEVER"), (b"<u@d>", b"NOTIFY=NEVER"))
        self.assertEqual(parse_rcpt(b"to:<postmaster>"), (b"<postmaster>", b""))

    def test_rcpt_null_path_is_no_recipient(self):
        self.assertIsNone(parse_rcpt(b"TO:<>"))
        self.assertIsNone(parse_rcpt(b"FROM:<a@b>"))


class PathTests(SynchronousTestCase):
    def test_address(self):
        self.assertEqual(parse_path(b"<User@Example.org>"), "User@Example.org")

    def test_null_path(self):
        self.assertEqual(parse_path(b"<>"), "")

    def test_bare_local_part(self):
        self.assertEqual(parse_path(b"<postmaster>"), "postmaster")
        self.assertEqual(parse_path(b"postmaster"), "postmaster")

    def test_source_route_dropped(self):
        """RFC 5321 section 4.1.1.3: a source route may be ignored; the mailbox stays."""
        self.assertEqual(
            parse_path(b"<@relay.example,@r2.example:user@d.example>"), "user@d.example"
        )

    def test_quotes_kept_as_sent(self):
        self.assertEqual(parse_path(b'<"a b"@d>'), '"a b"@d')
        self.assertEqual(parse_path(b"<a\\ b@d>"), "a\\ b@d")

    def test_malformed(self):
        for path in (
            b"<a@b",  # unbalanced
            b"<a@b@c>",  # two @
            b"<@relay.example>",  # a route to nowhere
            b"<a b@c>",  # a space outside quotes
            b"<a;b@c>",  # not atext
            b"<a@b>\n",
        ):
            self.assertIsNone(parse_path(path), path)

    def test_non_ascii_refused(self):
        self.assertIsNone(parse_path("<jörg@example.org>".encode()))

    @settings(max_examples=500, deadline=None)
    @given(ADDRESS_BYTES)
    def test_same_as_twisted(self, path):
        """Every path parses as twisted.mail.smtp.Address parsed it before the move."""
        try:
            address = smtp.Address(path, b"")
        except smtp.AddressError:
            expected = None
        else:
            local = address.local.decode("ascii")
            domain = address.domain.decode("ascii") if address.domain else ""
            expected = f"{local}@{domain}" if domain else local
        self.assertEqual(parse_path(path), expected)

    @settings(max_examples=500, deadline=None)
    @given(ADDRESS_BYTES, st.sampled_from([b"FROM:", b"from: ", b"TO:", b" TO:"]))
    def test_arguments_same_as_twisted(self, path, prefix):
        """MAIL and RCPT arguments split as Twisted's SMTP.mail_re and rcpt_re split them."""
        for pattern, parse in ((smtp.SMTP.mail_re, parse_mail), (smtp.SMTP.rcpt_re, parse_rcpt)):
            rest = prefix + path + b" SIZE=1"
            match = pattern.match(rest)
            expected = None if match is None else (match["path"], match["opts"] or b"")
            self.assertEqual(parse(rest), expected, rest)


class MailSizeTests(SynchronousTestCase):
    def size(self, parameters: bytes, *, extended: bool = True, max_size: int = 1000) -> int:
        return mail_size(parameters, extended=extended, max_size=max_size)

    def refusal(self, parameters: bytes, *, extended: bool = True) -> smtpwire.Reply:
        with self.assertRaises(Refused) as raised:
            self.size(parameters, extended=extended)
        return raised.exception.reply

    def test_none_declared(self):
        self.assertEqual(self.size(b""), 0)
        self.assertEqual(self.size(b"", extended=False), 0)

    def test_size_and_body(self):
        self.assertEqual(self.size(b"size=999 body=8bitmime"), 999)
        self.assertEqual(self.size(b"BODY=7BIT"), 0)

    def test_last_size_counts(self):
        self.assertEqual(self.size(b"SIZE=900 SIZE=5"), 5)

    def test_at_the_limit_and_over(self):
        self.assertEqual(self.size(b"SIZE=1000"), 1000)
        self.assertEqual(self.refusal(b"SIZE=1001"), SIZE_EXCEEDED)

    def test_parameters_need_ehlo(self):
        self.assertEqual(self.refusal(b"SIZE=1", extended=False), PARAMETERS_NEED_EHLO)

    def test_unsupported(self):
        for parameters in (
            b"SMTPUTF8",
            b"SIZE=",
            b"SIZE=-1",
            b"SIZE=1e3",
            b"SIZE=" + b"1" * 21,  # too many digits to be a size
            b"BODY=BINARYMIME",
            b"AUTH=<>",
        ):
            self.assertEqual(self.refusal(parameters), UNSUPPORTED_PARAMETER, parameters)

    def test_twenty_digits_read_then_refused_as_too_big(self):
        self.assertEqual(self.refusal(b"SIZE=" + b"9" * 20), SIZE_EXCEEDED)

    def test_refusal_order(self):
        """An unsupported parameter is refused before the size is looked at."""
        self.assertEqual(self.refusal(b"SIZE=5000 FOO=1"), UNSUPPORTED_PARAMETER)


class ReplyTests(SynchronousTestCase):
    def test_reply_line(self):
        self.assertEqual(smtpwire.reply_line(250, "2.0.0 OK"), b"250 2.0.0 OK\r\n")
        self.assertEqual(
            smtpwire.SIZE_EXCEEDED.line(), b"552 " + SIZE_EXCEEDED.text.encode() + b"\r\n"
        )

    def test_unencodable_text_replaced(self):
        self.assertEqual(smtpwire.reply_line(550, "x\udcff"), b"550 x?\r\n")

    def test_multi_line_reply(self):
        """RFC 5321 section 4.2.1: a hyphen after the code on every line but the last."""
        self.assertEqual(
            smtpwire.reply_lines(250, b"mx Hello\nPIPELINING\nSIZE 10"),
            [b"250-mx Hello", b"250-PIPELINING", b"250 SIZE 10"],
        )
        self.assertEqual(smtpwire.reply_lines(354, b"go"), [b"354 go"])
        self.assertEqual(smtpwire.reply_lines(250, b""), [b"250 "])

    def test_extension_lines(self):
        self.assertEqual(
            smtpwire.extension_lines({b"PIPELINING": None, b"SIZE": [b"10"], b"AUTH": []}),
            [b"PIPELINING", b"SIZE 10"],
        )

    def test_ehlo_extensions(self):
        plain = smtpwire.ehlo_extensions(2048, starttls=False)
        self.assertEqual(plain[b"SIZE"], [b"2048"])
        self.assertNotIn(b"STARTTLS", plain)
        self.assertIn(b"STARTTLS", smtpwire.ehlo_extensions(2048, starttls=True))
        self.assertEqual(set(plain), {b"PIPELINING", b"SIZE", b"8BITMIME", b"ENHANCEDSTATUSCODES"})


class TraceTests(SynchronousTestCase):
    def test_address_literal(self):
        """RFC 5321 section 4.1.3: IPv6 literals are tagged."""
        self.assertEqual(smtpwire.address_literal("192.0.2.1"), "[192.0.2.1]")
        self.assertEqual(smtpwire.address_literal("2001:db8::1"), "[IPv6:2001:db8::1]")
        self.assertEqual(smtpwire.address_literal(None), "local")
        self.assertEqual(smtpwire.address_literal(""), "local")

    def test_trace_helo(self):
        self.assertEqual(smtpwire.trace_helo(b"mail.example"), "mail.example")
        self.assertEqual(smtpwire.trace_helo(b"a b\r\nX-Bad: 1"), "abX-Bad:1")
        self.assertEqual(smtpwire.trace_helo(b"x" * 300), "x" * 100)
        self.assertEqual(smtpwire.trace_helo(b"\xff\x00 "), "unknown")
        self.assertEqual(smtpwire.trace_helo(None), "unknown")


class CommandCountersTests(SynchronousTestCase):
    def test_only_permanent_refusals_are_errors(self):
        counters = CommandCounters(max_errors=2, max_junk=10)
        for code in (250, 354, 421, 452):
            counters.replied(code)
        self.assertFalse(counters.too_many_errors())
        counters.replied(550)
        self.assertFalse(counters.too_many_errors())
        counters.replied(501)
        self.assertTrue(counters.too_many_errors())

    def test_trusted_client_never_errs(self):
        counters = CommandCounters(max_errors=1, max_junk=10, trusted=True)
        counters.replied(550)
        self.assertFalse(counters.too_many_errors())

    def test_junk_past_the_limit(self):
        counters = CommandCounters(max_errors=1, max_junk=2)
        self.assertEqual([counters.junk_command() for _ in range(3)], [False, False, True])

    def test_a_message_taken_starts_the_junk_count_afresh(self):
        counters = CommandCounters(max_errors=1, max_junk=2)
        counters.junk_command()
        counters.junk_command()
        counters.message_taken()
        self.assertEqual([counters.junk_command() for _ in range(3)], [False, False, True])
