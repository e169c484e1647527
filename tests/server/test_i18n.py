"""UTF8 and LANG (RFC 6856): the commands, translated texts, and UTF-8 user names."""

from __future__ import annotations

from pathlib import Path

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.core import errors, wire
from popserv.core.lang import ENGLISH, Language, Languages
from popserv.logins.passwords import PasswdFile, PasswdFileChecker, hash_password
from tests.support import Session

#: A language for the tests only: the mechanism, not a translation.
GERMAN = Language("de", "Deutsch", {
    "Language changed": "Sprache gewechselt",
    "Unknown command": "Unbekannter Befehl",
    "Bye, {deleted} deleted, {left} left":
        "Tsch\u00fcss, {deleted} gel\u00f6scht, {left} \u00fcbrig",
    "{count} messages ({octets} octets)": "{count} Nachrichten ({octets} Oktette)",
})


class UTF8Tests(SynchronousTestCase):
    def test_capability_and_command(self):
        s = Session()
        for lines in (s.lines(b"CAPA\r\n"),):
            self.assertIn(b"UTF8 USER", lines)
            self.assertIn(b"LANG", lines)
        self.assertEqual(s.send(b"UTF8\r\n"), b"+OK UTF8 enabled\r\n")
        self.assertTrue(s.protocol.utf8)
        s.login()
        self.assertIn(b"UTF8 USER", s.lines(b"CAPA\r\n"))
        self.assertEqual(s.send(b"UTF8\r\n"), wire.err(errors.BadState()))

    def test_no_stls_after_utf8(self):
        s = Session()
        s.factory.tls = object()  # a certificate is configured
        s.send(b"UTF8\r\n")
        self.assertEqual(s.send(b"STLS\r\n"), wire.err(errors.TLSAfterUTF8()))

    def test_message_served_unchanged(self):
        """8-bit and UTF-8 headers go out as stored, with or without UTF8 (the issue's choice)."""
        message = "Subject: Gr\u00fc\u00dfe\n\nK\u00e4se\n".encode()
        for commands in (b"", b"UTF8\r\n"):
            s = Session(messages=[message])
            s.send(commands)
            s.login()
            self.assertEqual(s.send(b"RETR 1\r\n").split(b"\r\n", 1)[1],
                             message.replace(b"\n", b"\r\n") + b".\r\n")


class LangTests(SynchronousTestCase):
    def session(self) -> Session:
        s = Session()
        s.factory.languages = Languages([ENGLISH, GERMAN])
        s.protocol.language = ENGLISH
        return s

    def test_listing(self):
        self.assertEqual(self.session().lines(b"LANG\r\n"),
                         [b"+OK Language listing follows", b"en English", b"de Deutsch", b"."])

    def test_select(self):
        """RFC 4647 lookup: exact, by prefix, case-blind, and * for the default."""
        s = self.session()
        for request, tag in ((b"en", b"en"), (b"DE-ch", b"de"), (b"*", b"en"), (b"de", b"de")):
            self.assertTrue(s.send(b"LANG " + request + b"\r\n").startswith(b"+OK " + tag + b" "))
        self.assertEqual(s.send(b"LANG fr\r\n"),
                         wire.err(errors.UnknownLanguage(), None))
        self.assertIs(s.protocol.language, GERMAN)  # a failed LANG changes nothing
        self.assertEqual(s.send(b"LANG en_US\r\n"), wire.err(errors.BadArguments()))

    def test_texts_translated_numbers_not(self):
        s = self.session()
        self.assertEqual(s.send(b"LANG de\r\n"), b"+OK de Sprache gewechselt\r\n")
        self.assertEqual(s.send(b"XYZZY\r\n"), b"-ERR Unbekannter Befehl\r\n")
        s.login()
        stat = s.send(b"STAT\r\n")
        self.assertRegex(stat, rb"^\+OK 3 \d+\r\n$")
        self.assertIn(b"3 Nachrichten (", s.send(b"LIST\r\n"))
        self.assertEqual(s.send(b"QUIT\r\n").split(b",")[0], "+OK Tsch\u00fcss".encode())

    def test_lookup(self):
        languages = Languages([ENGLISH, Language("zh-Hant", "\u4e2d\u6587")])
        self.assertEqual(languages.lookup("zh-Hant-TW").tag, "zh-Hant")
        self.assertIsNone(languages.lookup("zh"))
        self.assertEqual(languages.lookup("en-x-private").tag, "en")
        self.assertRaises(ValueError, Languages, [])


class UTF8UserNameTests(TestCase):
    def setUp(self):
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        self.passwd = PasswdFile(path)
        self.passwd.add("j\u00fcrgen", hash_password("pw", "SHA256"))
        self.checker = PasswdFileChecker(self.passwd)

    async def test_saslprep(self):
        """A decomposed name (u + combining diaeresis) is the same user after SASLprep."""
        for name in ("j\u00fcrgen", "ju\u0308rgen"):
            avatar = await self.checker.requestAvatarId(UsernamePassword(name.encode(), b"pw"))
            self.assertEqual(avatar, "j\u00fcrgen")

    async def test_refused(self):
        for name in (b"j\xfcrgen", "j\u00fcrgen\u0007".encode(), "\u200ej\u00fcrgen".encode()):
            with self.assertRaises(UnauthorizedLogin):
                await self.checker.requestAvatarId(UsernamePassword(name, b"pw"))


class UserNameFormTests(SynchronousTestCase):
    def test_names_must_be_in_saslprep_form(self):
        """Logins SASLprep the name, so a stored name it would change could never log in."""
        from popserv.core.errors import InvalidUsername
        from popserv.core.usernames import validate_username

        self.assertEqual(validate_username("j\u00fcrgen"), "j\u00fcrgen")
        for name in ("\ufb01le", "ju\u0308rgen", "\U0001f600x"):  # ligature, NFD, unassigned
            self.assertRaises(InvalidUsername, validate_username, name)
