"""The grammar the probe holds servers to (RFC 1939, 2449, 3206), as pure functions."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from popserv.probe.syntax import (
    apop_timestamp,
    capa_problems,
    capabilities,
    code_problem,
    parse_reply,
    per_user_after_login,
    scan_listing,
    status_line_problem,
    timestamp_problem,
    uidl_problem,
    unique_id_listing,
    unstuffed,
    unstuffed_dots,
)


class ReplyTests(SynchronousTestCase):
    def test_parse(self):
        reply = parse_reply(b"-ERR [SYS/TEMP] try later\r\n")
        assert reply is not None
        self.assertEqual(
            (reply.ok, reply.code, reply.text), (False, "SYS/TEMP", "[SYS/TEMP] try later")
        )
        self.assertEqual(str(reply), "-ERR [SYS/TEMP] try later")
        reply = parse_reply(b"+OK\r\n")
        assert reply is not None
        self.assertEqual((reply.ok, reply.code, reply.text), (True, None, ""))
        for raw in (b"+OKAY\r\n", b"OK\r\n", b"", b"* OK\r\n", b"-err x\r\n"):
            self.assertIsNone(parse_reply(raw), raw)

    def test_status_line(self):
        self.assertIsNone(status_line_problem(b"+OK ready\r\n"))
        self.assertIsNone(status_line_problem(b"+OK " + b"x" * 506 + b"\r\n"))
        for raw, said in {
            b"+OK ready\n": "does not end with CRLF",
            b"+OK " + b"x" * 507 + b"\r\n": "is 513 octets long",
            b"hello\r\n": "neither +OK nor -ERR",
            b"+OK a\rb\r\n": "holds a CR",
            b"+OK a\0\r\n": "NUL",
        }.items():
            self.assertIn(said, status_line_problem(raw) or "", raw)

    def test_codes(self):
        """RFC 2449 8: a bracket opens a code; '/' separates levels; ']' and '/' are not in them."""
        for text in ("[AUTH] no", "[SYS/TEMP] later", "[LOGIN-DELAY] wait", "[IN-USE]", "no [x"):
            reply = parse_reply(f"-ERR {text}\r\n".encode())
            assert reply is not None
            self.assertIsNone(code_problem(reply), text)
        for text in ("[AUTH no", "[] x", "[SYS//TEMP] x", "[/x] y", "[A B] c"):
            reply = parse_reply(f"-ERR {text}\r\n".encode())
            assert reply is not None
            self.assertIsNotNone(code_problem(reply), text)


class TimestampTests(SynchronousTestCase):
    def test_found(self):
        greeting = parse_reply(b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n")
        assert greeting is not None
        self.assertEqual(apop_timestamp(greeting), "<1896.697170952@dbc.mtview.ca.us>")
        plain = parse_reply(b"+OK Dovecot ready.\r\n")
        assert plain is not None
        self.assertIsNone(apop_timestamp(plain))

    def test_msg_id(self):
        """RFC 822's msg-id: <local-part@domain>, of atoms, quoted strings, domain literals."""
        for good in (
            "<1896.697170952@dbc.mtview.ca.us>",
            "<18b3.3.6b156fb9.ZMgZYNl8hhV6f60CkKf4uA==@vm>",
            "<2b1e15d01a877929ab166fd6bebc7ece@pop.test>",
            '<"quoted part"@host>',
            "<x@[192.0.2.1]>",
            "<a+b/c=d@h>",
        ):
            self.assertIsNone(timestamp_problem(good), good)
        for bad in (
            "<1896.697170952>",
            "<@host>",
            "<a@>",
            "<a b@host>",
            "<a..b@host>",
            "<a@b@c>",
            "<a@host.>",
            "<.a@host>",
        ):
            self.assertIsNotNone(timestamp_problem(bad), bad)
        self.assertIn("has no @", timestamp_problem("<1896.697170952>") or "")


class CapaTests(SynchronousTestCase):
    def test_lines(self):
        lines = [
            b"TOP",
            b"SASL PLAIN SCRAM-SHA-256",
            b"EXPIRE NEVER",
            b"LOGIN-DELAY 900 USER",
            b"IMPLEMENTATION popserv-0.1.0",
        ]
        self.assertEqual(capa_problems(lines), [])
        self.assertEqual(capabilities(lines)["SASL"], ["PLAIN", "SCRAM-SHA-256"])
        self.assertEqual(capabilities([b"top"]), {"TOP": []})

    def test_problems(self):
        for line, said in {
            b"X." + b"y": "is not a capability",  # no dot in a tag
            b"TOP  double": "is not a capability",
            b" TOP": "is not a capability",
            b"T\xe4G": "is not a capability",
            b"X " + b"y" * 509: "a line of 513 octets",
            b"EXPIRE": "EXPIRE : not EXPIRE",
            b"EXPIRE soon": "not EXPIRE",
            b"LOGIN-DELAY NEVER": "not LOGIN-DELAY",
            b"LOGIN-DELAY 5 USER OTHER": "not LOGIN-DELAY",
        }.items():
            problems = capa_problems([line])
            self.assertEqual(len(problems), 1, line)
            self.assertIn(said, problems[0], line)

    def test_per_user_after_login(self):
        self.assertEqual(
            per_user_after_login([b"EXPIRE 30 USER", b"LOGIN-DELAY 0"]), ["EXPIRE 30 USER"]
        )


class ListingTests(SynchronousTestCase):
    def test_scan_listing(self):
        self.assertEqual(scan_listing(b"1 120"), (1, 120))
        self.assertEqual(scan_listing(b"2 200 more, as RFC 1939 allows"), (2, 200))
        for bad in (b"1", b"1  120", b"a 1", b"1 -5", b"", b"1 12x"):
            self.assertIsNone(scan_listing(bad), bad)

    def test_uidl(self):
        self.assertEqual(
            unique_id_listing(b"1 whqtswO00WBw418f9t5JxYwZ"), (1, b"whqtswO00WBw418f9t5JxYwZ")
        )
        self.assertIsNone(unique_id_listing(b"1 two words"))
        self.assertIsNone(uidl_problem(b"!" + b"~" * 69))
        self.assertIn("is 71 characters long", uidl_problem(b"x" * 71) or "")
        self.assertIn("outside 0x21-0x7E", uidl_problem(b"caf\xc3\xa9") or "")
        self.assertIn("is 0 characters long", uidl_problem(b"") or "")


class StuffingTests(SynchronousTestCase):
    def test_unstuffed(self):
        """What the client keeps: one dot fewer on stuffed lines, CRLF on every line."""
        lines = [b"Subject: x", b"", b"..dot", b"...", b"plain"]
        self.assertEqual(unstuffed(lines), b"Subject: x\r\n\r\n.dot\r\n..\r\nplain\r\n")
        self.assertEqual(unstuffed([]), b"")

    def test_counts(self):
        self.assertEqual(unstuffed_dots([b"..a", b"..", b".b", b"c.", b""]), (2, 1))
