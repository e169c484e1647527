"""User names: NFKC, case, mixed scripts (popserv.usernames)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from popserv.errors import InvalidUsername
from popserv.usernames import (
    KEEP,
    UsernameRules,
    is_valid_username,
    loggable_username,
    mixes_scripts,
    normalize_username,
    validate_username,
)
from popserv.wire import loggable

#: "alice" with a Cyrillic a (U+0430) for the Latin one.
HOMOGLYPH_ALICE = "\u0430lice"
FULL_WIDTH_ALICE = "\uff41\uff4c\uff49\uff43\uff45"


class NormalizeTests(SynchronousTestCase):
    def test_nfkc(self) -> None:
        """Full-width letters, ligatures and a decomposed ü become their plain forms."""
        self.assertEqual(normalize_username(FULL_WIDTH_ALICE), "alice")
        self.assertEqual(normalize_username("\ufb01le"), "file")
        self.assertEqual(normalize_username("ju\u0308rgen"), "j\u00fcrgen")

    def test_case_folded_by_default(self) -> None:
        for name in ("Alice", "ALICE", "alice", "\uff21\uff2c\uff29\uff23\uff25"):
            self.assertEqual(normalize_username(name), "alice")
        self.assertEqual(normalize_username("\u0418\u0412\u0410\u041d"), "\u0438\u0432\u0430\u043d")

    def test_lower_case_not_case_folding(self) -> None:
        """toLowerCase as PRECIS does: ß stays ß rather than becoming ss."""
        self.assertEqual(normalize_username("STRA\u00dfE"), "stra\u00dfe")

    def test_case_kept(self) -> None:
        keep = UsernameRules(case=KEEP)
        self.assertEqual(normalize_username("Alice", keep), "Alice")
        self.assertEqual(normalize_username("\uff21lice", keep), "Alice")

    def test_refused(self) -> None:
        for name in ("", "../x", "a:b", "a b", "a\x00", ".hidden", "-rf", HOMOGLYPH_ALICE):
            self.assertRaises(InvalidUsername, normalize_username, name)

    @given(st.text(min_size=1, max_size=40))
    def test_idempotent(self, name: str) -> None:
        """A normalised name is its own key: what user add stores is what logins look up."""
        for rules in (UsernameRules(), UsernameRules(case=KEEP)):
            try:
                once = normalize_username(name, rules)
            except InvalidUsername:
                continue
            self.assertEqual(normalize_username(once, rules), once)
            self.assertTrue(is_valid_username(once))

    def test_unknown_case_rule(self) -> None:
        self.assertRaises(ValueError, UsernameRules, case="upper")


class MixedScriptTests(SynchronousTestCase):
    def test_latin_with_cyrillic_or_greek(self) -> None:
        for name in (HOMOGLYPH_ALICE, "p\u0430yp\u0430l", "\u03bfscar", "ivan\u0438"):
            self.assertTrue(mixes_scripts(name), name)
            self.assertRaises(InvalidUsername, validate_username, name)

    def test_one_script(self) -> None:
        """Any one script is fine, with digits, punctuation and combining marks."""
        for name in (
            "alice",
            "j\u00fcrgen",
            "\u0438\u0432\u0430\u043d",  # иван
            "\u0438\u0432\u0430\u043d.2024",
            "\u03b1\u03bb\u03af\u03ba\u03b7",  # αλίκη
            "\u05d3\u05e0\u05d4",  # Hebrew
        ):
            self.assertFalse(mixes_scripts(name), name)
            self.assertEqual(validate_username(name), name)

    def test_scripts_written_together(self) -> None:
        """Japanese mixes Han and kana, and each of CJK may go with Latin (UTS #39)."""
        for name in ("\u7530\u4e2d\u305f\u308d\u3046", "tanaka\u7530\u4e2d", "\ud55c\uad6d\u4eba"):
            self.assertFalse(mixes_scripts(name), name)
        self.assertTrue(mixes_scripts("\u7530\u4e2d\u0430"))  # Han with Cyrillic

    def test_allowed_when_asked(self) -> None:
        self.assertEqual(validate_username(HOMOGLYPH_ALICE, mixed_scripts=True), HOMOGLYPH_ALICE)
        rules = UsernameRules(mixed_scripts=True)
        self.assertEqual(normalize_username(HOMOGLYPH_ALICE, rules), HOMOGLYPH_ALICE)


class LoggableTests(SynchronousTestCase):
    def test_readable(self) -> None:
        """Names popserv accepts are shown as they are, NFKC'd."""
        self.assertEqual(loggable_username(FULL_WIDTH_ALICE.encode()), "alice")
        self.assertEqual(loggable_username("\u0438\u0432\u0430\u043d"), "\u0438\u0432\u0430\u043d")
        self.assertEqual(loggable_username(b"ALICE"), "ALICE")

    def test_escaped(self) -> None:
        """Others are escaped: a homoglyph stands out, control characters cannot forge lines."""
        self.assertEqual(loggable_username(HOMOGLYPH_ALICE.encode()), "\\u0430lice")
        self.assertEqual(loggable_username(b"a\r\nb"), "a\\r\\nb")
        self.assertEqual(loggable_username(b"\xff"), loggable(b"\xff"))
        self.assertEqual(loggable_username("\u200ex\u00e9"), "\\u200ex\\xe9")
        self.assertEqual(loggable_username(None), "-")
