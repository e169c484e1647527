"""
Tests for the pure UIDL modules: the dovecot-uidlist parser and the
``--uidl-format`` templates, with expected values taken from a real
Dovecot 2.3.19 (see tests/clients/test_dovecot.py for the live comparison).
"""

from __future__ import annotations

import hashlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from popserv.stores.maildir.names import digest_uidl, is_valid_uidl, uidl_for
from popserv.stores.maildir.uidlist import Uidlist, UidlistRecord, parse_uidlist
from popserv.stores.maildir.uidls import (
    DOVECOT,
    MAILDIR,
    assign_uidls,
    parse_uidl_format,
    render,
)

#: A uidlist as Dovecot 2.3 wrote it for four messages, UIDVALIDITY 0x6b05669f.
DOVECOT_UIDLIST = (
    b"3 V1795516063 N5 G301bef0c9f66056bfe05000083ecc375\n"
    b"1 W23 :plainname\n"
    b"2 W23 :1700000001.M1P1.host\n"
    b"3 :1700000002.M2P1.host,S=20,W=21\n"
    b"4 W23 :1700000003.M3P1.host\n"
)
NAMES = [
    "plainname",
    "1700000001.M1P1.host",
    "1700000002.M2P1.host,S=20,W=21",
    "1700000003.M3P1.host",
]


def uidls(text: str, uidlist: bytes = DOVECOT_UIDLIST, names=NAMES) -> list[str]:
    return assign_uidls(names, parse_uidl_format(text), parse_uidlist(uidlist))


class ParseUidlistTests(SynchronousTestCase):
    def test_version_3(self) -> None:
        """Header fields and records by base file name; sizes are not kept."""
        parsed = parse_uidlist(DOVECOT_UIDLIST)
        assert parsed is not None
        self.assertEqual(
            (parsed.version, parsed.uidvalidity, parsed.next_uid, parsed.skipped),
            (3, 1795516063, 5, 0),
        )
        self.assertEqual(list(parsed.records), NAMES)
        self.assertEqual(parsed.records["plainname"], UidlistRecord(1))
        self.assertEqual(parsed.records["1700000003.M3P1.host"].uid, 4)

    def test_extension_records(self) -> None:
        """P (POP3 UIDL, possibly empty), G (GUID) and O (POP3 order); unknown keys ignored."""
        parsed = parse_uidlist(
            b"3 V7 N9\n"
            b"1 P0123abcd G77 O2 W10 S9 K5 :a.host\n"
            b"2 P :b.host\n"
            b"3 G :c.host\n"
        )
        assert parsed is not None
        self.assertEqual(parsed.records["a.host"], UidlistRecord(1, "0123abcd", "77", 2))
        self.assertEqual(parsed.records["b.host"], UidlistRecord(2, ""))
        self.assertEqual(parsed.records["c.host"], UidlistRecord(3))

    def test_version_1(self) -> None:
        """Dovecot 1.0's format: ``1 <uidvalidity> <next uid>``, ``<uid> <name>``."""
        parsed = parse_uidlist(b"1 1100000000 4\n1 1.a.host\n3 1.b.host\n")
        assert parsed is not None
        self.assertEqual((parsed.version, parsed.uidvalidity, parsed.next_uid), (1, 1100000000, 4))
        self.assertEqual(
            parsed.records, {"1.a.host": UidlistRecord(1), "1.b.host": UidlistRecord(3)}
        )

    def test_names(self) -> None:
        """Names keep spaces and colons after the first " :"; bytes decode as os.fsdecode."""
        raw = b"caf\xc3\xa9 \xff odd"
        parsed = parse_uidlist(b"3 V1 N3\n1 :with space :colon\n2 :" + raw + b"\n")
        assert parsed is not None
        self.assertEqual(list(parsed.records), ["with space :colon", os.fsdecode(raw)])

    def test_unusable_header(self) -> None:
        """No header line, another version, or junk: no uidlist at all."""
        for data in (b"", b"3 V1 N2", b"2 1 2\n1 0 a\n", b"1 1\n", b"junk\n1 :a\n", b"\x00\n"):
            self.assertIsNone(parse_uidlist(data), data)

    def test_missing_header_fields(self) -> None:
        """A header without V still gives the records (%u formats can use them)."""
        parsed = parse_uidlist(b"3 N2\n1 :a\n")
        assert parsed is not None
        self.assertIsNone(parsed.uidvalidity)
        self.assertEqual(parsed.records, {"a": UidlistRecord(1)})

    def test_damaged_lines_skipped(self) -> None:
        """Bad lines, UIDs not ascending, repeated names and a cut-off last line are skipped."""
        parsed = parse_uidlist(
            b"3 V1 N20\n"
            b"1 :a\n"
            b"x :bad-uid\n"
            b"0 :zero-uid\n"
            b"4294967296 :too-big\n"
            b"2 w5 :lowercase-key\n"
            b"3 no-colon\n"
            b"4 :\n"
            b"\n"
            b"5 :b\n"
            b"5 :same-uid\n"
            b"3 :lower-uid\n"
            b"6 :a\n"
            b"7 :c\n"
            b"8 :trunc"
        )
        assert parsed is not None
        self.assertEqual(
            parsed.records, {"a": UidlistRecord(1), "b": UidlistRecord(5), "c": UidlistRecord(7)}
        )
        self.assertEqual(parsed.skipped, 11)

    @settings(max_examples=300)
    @given(st.binary(max_size=200))
    def test_any_bytes(self, data: bytes) -> None:
        """Any bytes give a Uidlist or None, never an exception."""
        result = parse_uidlist(b"3 V1 N2\n" + data)
        self.assertIsInstance(result, Uidlist)
        parse_uidlist(data)


class UidlFormatTests(SynchronousTestCase):
    def test_dovecot_default(self) -> None:
        """``dovecot``: Dovecot 2.3's default %08Xu%08Xv, in lower-case hex as it prints it."""
        self.assertEqual(
            uidls(DOVECOT),
            ["000000016b05669f", "000000026b05669f", "000000036b05669f", "000000046b05669f"],
        )
        self.assertEqual(uidls("%08Xu%08Xv"), uidls(DOVECOT))

    def test_formats_as_dovecot_served_them(self) -> None:
        """Each format gives what Dovecot 2.3.19 served for the same Maildir."""
        md5 = [hashlib.md5(name.encode()).hexdigest() for name in NAMES]
        expected = {
            "%08Xv%08Xu": ["6b05669f0000000" + str(i) for i in range(1, 5)],
            "%u": ["1", "2", "3", "4"],
            "%v.%u": [f"1795516063.{i}" for i in range(1, 5)],
            "%v-%u": [f"1795516063-{i}" for i in range(1, 5)],
            "%g": NAMES,
            "%f": NAMES,
            "%Mf": md5,
            "%3Mf": [m[:3] for m in md5],
            "%Uf": [name.upper() for name in NAMES],
            "%08u": [f"0000000{i}" for i in range(1, 5)],
            "%8Xu": ["1", "2", "3", "4"],
            "%UXv-%u": [f"6b05669f-{i}" for i in range(1, 5)],
            "%v%%%u": [f"1795516063%{i}" for i in range(1, 5)],
            # Only the first values: Dovecot repeated the later ones, popserv
            # makes repeats unique (test_duplicates_made_unique).
            "%3Ug": ["PLA", "170"],
            "%2.1g": ["a", "0"],
            "%-3.2g": ["am", "os", "=2"],
        }
        self.assertEqual(md5[0], "4a5ca7bcb2d31dc29e8578b74d7bb08e")
        for text, want in expected.items():
            self.assertEqual(uidls(text)[: len(want)], want, text)

    def test_maildir(self) -> None:
        """``maildir``: the unique names, whatever the uidlist says."""
        self.assertEqual(uidls(MAILDIR), NAMES)
        self.assertFalse(parse_uidl_format(MAILDIR).reads_uidlist)

    def test_names_are_uidls(self) -> None:
        """
        Which formats serve a message without a uidlist record its own name,
        and the promise holds for a dotted name (the scan's shortcut relies on it).
        """
        name = "1700000000.M1P2.host,S=1,W=2"
        for text, expected in [
            (MAILDIR, True),
            (DOVECOT, True),
            ("%u", True),
            ("%08Xv-%Mu", True),
            ("%u.%v", False),
            ("%Mf", False),
            ("%g", False),
            ("%u%f", False),
        ]:
            scheme = parse_uidl_format(text)
            self.assertEqual(scheme.names_are_uidls, expected, text)
            if expected:
                self.assertEqual(assign_uidls([name], scheme, None), [name], text)

    def test_refused(self) -> None:
        """Unknown variables and modifiers, %m (mbox-only) and misplaced parts are refused."""
        for text in ("", "abc", "%", "%q", "%{uid}", "%U3g", "%X08u", "%Xg", "%MXu", "%Eu",
                     "%08%", "%m"):
            with self.assertRaises(ValueError, msg=text):
                parse_uidl_format(text)
        with self.assertRaises(ValueError) as caught:
            parse_uidl_format("%m")
        self.assertIn("mbox", str(caught.exception))

    def test_saved_uidl_wins(self) -> None:
        """A P record is served instead of the format; an empty one means the base name."""
        uidlist = DOVECOT_UIDLIST.replace(b"2 W23 :", b"2 W23 Pcourier-7 :").replace(
            b"3 :", b"3 P :"
        )
        for text in (DOVECOT, "%u", "%g"):
            got = uidls(text, uidlist)
            self.assertEqual(got[1:3], ["courier-7", NAMES[2]], text)

    def test_guid_record(self) -> None:
        """%g is the G record when there is one, else the base file name."""
        uidlist = DOVECOT_UIDLIST.replace(b"1 W23 :", b"1 W23 G0123456789abcdef :")
        self.assertEqual(uidls("%g", uidlist)[:2], ["0123456789abcdef", NAMES[1]])

    def test_unlisted_get_own(self) -> None:
        """Messages the uidlist does not list get popserv's own UIDL under %u/%v formats."""
        names = [*NAMES, "1800000000.new.host"]
        self.assertEqual(uidls(DOVECOT, names=names)[-1], "1800000000.new.host")
        self.assertEqual(uidls("%u", names=names)[-1], "1800000000.new.host")
        # Formats of the name alone apply to every message, as in Dovecot.
        self.assertEqual(
            uidls("%Mf", names=names)[-1], hashlib.md5(b"1800000000.new.host").hexdigest()
        )

    def test_no_uidlist(self) -> None:
        """Without a uidlist every message gets its own UIDL."""
        scheme = parse_uidl_format(DOVECOT)
        self.assertEqual(assign_uidls(NAMES, scheme, None), NAMES)
        self.assertEqual(assign_uidls(NAMES, parse_uidl_format("%u"), None), NAMES)

    def test_own_never_looks_like_dovecot(self) -> None:
        """An own UIDL the format could produce, or a saved one holds, becomes a digest."""
        hexname = "000000096b05669f"
        uidlist = DOVECOT_UIDLIST + b"5 Pzzz :5.gone.host\n"
        got = uidls(DOVECOT, uidlist, [*NAMES, hexname, "zzz"])
        self.assertEqual(got[-2:], [digest_uidl(hexname), digest_uidl("zzz")])
        # The same without the uidlist file, so it does not change when one appears.
        self.assertEqual(
            assign_uidls([hexname], parse_uidl_format(DOVECOT), None), [digest_uidl(hexname)]
        )
        # Under %u, digit-only names are the ones that could collide.
        self.assertEqual(uidls("%u", names=["12", "1.a.host"]), [digest_uidl("12"), "1.a.host"])

    def test_missing_uidvalidity(self) -> None:
        """Without V in the header %v is unknown: own UIDLs; %u still works."""
        uidlist = DOVECOT_UIDLIST.replace(b"V1795516063 ", b"")
        self.assertEqual(uidls(DOVECOT, uidlist), NAMES)
        self.assertEqual(uidls("%u", uidlist), ["1", "2", "3", "4"])

    def test_invalid_results_fall_back(self) -> None:
        """A Dovecot UIDL that RFC 1939 forbids (too long, spaces) is not served."""
        long_name = "1." + "x" * 80
        uidlist = b"3 V1 N4\n1 :" + long_name.encode() + b"\n2 :a b\n3 P\xc3\xa9 :c\n"
        got = uidls("%f", uidlist, [long_name, "a b", "c"])
        self.assertEqual(got, [uidl_for(long_name), uidl_for("a b"), digest_uidl("c")])

    def test_duplicates_made_unique(self) -> None:
        """Formats that repeat (%3g) or saved duplicates still give distinct UIDLs."""
        got = uidls("%3g")
        self.assertEqual(got[:2], ["pla", "170"])
        self.assertEqual(len(set(got)), 4)
        uidlist = b"3 V1 N3\n1 Psame :a\n2 Psame :b\n"
        self.assertEqual(uidls(DOVECOT, uidlist, ["a", "b"]), ["same", digest_uidl("b")])

    def test_render(self) -> None:
        """render() alone: None when a value is missing."""
        scheme = parse_uidl_format("%v.%u")
        uidlist = parse_uidlist(DOVECOT_UIDLIST)
        self.assertEqual(render(scheme, "x", UidlistRecord(7), uidlist), "1795516063.7")
        self.assertIsNone(render(scheme, "x", None, uidlist))
        self.assertIsNone(render(scheme, "x", UidlistRecord(7), None))

    @settings(max_examples=200)
    @given(
        st.lists(st.text(min_size=0, max_size=80), max_size=12, unique=True),
        st.lists(st.tuples(st.integers(0, 20), st.text(max_size=8)), max_size=12),
        st.sampled_from([DOVECOT, MAILDIR, "%u", "%g", "%3g", "%v.%u", "%Mf", "%2u"]),
    )
    def test_always_valid_and_distinct(self, names, records, text) -> None:
        """Whatever the names, uidlist and format: valid RFC 1939 UIDLs, no two equal."""
        lines = [b"3 V9 N99"]
        for i, (which, saved) in enumerate(records):
            if names and saved.strip():
                name = names[which % len(names)]
                pop3 = saved.split()[0]
                lines.append(f"{i + 1} P{pop3} :{name}".encode("utf-8", "surrogateescape"))
        uidlist = parse_uidlist(b"\n".join(lines) + b"\n")
        got = assign_uidls(names, parse_uidl_format(text), uidlist)
        self.assertEqual(len(got), len(names))
        self.assertEqual(len(set(got)), len(got))
        for uid in got:
            self.assertTrue(is_valid_uidl(uid), uid)
