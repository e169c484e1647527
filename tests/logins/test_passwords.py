"""Tests for popserv.logins.passwords: schemes, the passwd-file and the cred checker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import threading
from functools import cache
from hashlib import md5
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from passlib.hash import argon2, bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.logger import LogLevel, capturedLogs, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from popserv.core.errors import InvalidUsername, TemporaryFailure
from popserv.interfaces import ISecretInventory
from popserv.logins.credentials import APOPCredentials, CramMD5Credentials
from popserv.logins.passwords import (
    DEFAULT_SCHEME,
    HASH_SCHEMES,
    SCHEMES,
    InvalidField,
    NoSuchUser,
    PasswdFile,
    PasswdFileChecker,
    PasswordTooLong,
    UnknownScheme,
    UserEntry,
    UserExists,
    canonical_scheme,
    hash_password,
    hash_secrets,
    plaintext_secret,
    scheme_of,
    verify_password,
)
from popserv.logins.passwords import checker as checker_module
from popserv.logins.passwords.checker import dummy_hash
from popserv.logins.passwords.passwdfile import parse_line
from popserv.logins.passwords.schemes import hash_parameters

NON_ASCII = "pässwörd ✓ 密码"

# Known vectors from independent implementations and the algorithms' specs:
# the argon2 reference implementation's tests, OpenBSD's bcrypt test for
# "U*U", Drepper's SHA-crypt specification, ``openssl passwd -5 / -1``.
ARGON2I_REF = (
    "$argon2i$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$wWKIMhR9lyDFvRz9YTZweHKfbftvj+qf+YFY4NeBbtA"
)
ARGON2ID_REF = (
    "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc"
)
BCRYPT_REF = "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"
SHA512_CRYPT_REF = (
    "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBF"
    "dcbYEdFCoEOfaS35inz1"
)
SHA256_CRYPT_REF = "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"
MD5_CRYPT_REF = "$1$saltstri$qQY4WxjABChYG1ccLpfkz/"


def cheap_argon2(password: str | bytes) -> str:
    """An argon2id hash with tiny costs, for tests that are not about the defaults."""
    return argon2.using(type="ID", memory_cost=256, time_cost=1).hash(password)


@cache
def alice_hash() -> str:
    """One default-cost ARGON2ID hash of "secret", shared by the checker tests."""
    return hash_password("secret")


class DefaultSchemeTests(SynchronousTestCase):
    def test_argon2id_with_dovecot_parameters(self) -> None:
        """The default is ARGON2ID with Dovecot's m=65536,t=3,p=1, and UTF-8 passwords."""
        self.assertEqual(DEFAULT_SCHEME, "ARGON2ID")
        stored = hash_password(NON_ASCII)
        self.assertTrue(stored.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"))
        self.assertTrue(verify_password(stored, NON_ASCII.encode("utf-8")))
        self.assertFalse(verify_password(stored, "pässwörd ✓ 密"))

    def test_argon2i(self) -> None:
        stored = hash_password("secret", "argon2i")
        self.assertTrue(stored.startswith("{ARGON2I}$argon2i$v=19$m=65536,t=3,p=1$"))
        self.assertTrue(verify_password(stored, "secret"))

    def test_blf_crypt(self) -> None:
        """BLF-CRYPT writes ``$2y$`` (as Dovecot does) with cost 12."""
        stored = hash_password("secret", "BLF-CRYPT")
        self.assertTrue(stored.startswith("{BLF-CRYPT}$2y$12$"))
        self.assertTrue(verify_password(stored, "secret"))

    def test_sha_crypt_without_rounds_field(self) -> None:
        """SHA-crypt hashes use glibc's default 5000 rounds, written as doveadm does."""
        for scheme, ident in (("SHA512-CRYPT", "$6$"), ("SHA256-CRYPT", "$5$")):
            stored = hash_password(NON_ASCII, scheme)
            self.assertTrue(stored.startswith("{" + scheme + "}" + ident))
            self.assertNotIn("rounds=", stored)
            self.assertTrue(verify_password(stored, NON_ASCII))
            self.assertFalse(verify_password(stored, "other"))


class SchemeTests(SynchronousTestCase):
    def test_argon2_vectors(self) -> None:
        """The argon2 reference implementation's hashes verify, bare or prefixed."""
        self.assertTrue(verify_password(ARGON2I_REF, "password"))
        self.assertTrue(verify_password("{ARGON2ID}" + ARGON2ID_REF, "password"))
        self.assertFalse(verify_password("{CRYPT}" + ARGON2ID_REF, "Password"))
        self.assertEqual(scheme_of(ARGON2I_REF), "ARGON2I")
        self.assertEqual(scheme_of("{CRYPT}" + ARGON2ID_REF), "ARGON2ID")

    def test_crypt_vectors(self) -> None:
        """Hashes made by other implementations verify, with or without a prefix."""
        vectors = [
            (BCRYPT_REF, "U*U", "BLF-CRYPT"),
            (BCRYPT_REF.replace("$2a$", "$2y$"), "U*U", "BLF-CRYPT"),
            (SHA512_CRYPT_REF, "Hello world!", "SHA512-CRYPT"),
            (SHA256_CRYPT_REF, "Hello world!", "SHA256-CRYPT"),
            (MD5_CRYPT_REF, "password", "MD5-CRYPT"),
        ]
        for crypted, password, scheme in vectors:
            for stored in (crypted, "{" + scheme + "}" + crypted, "{CRYPT}" + crypted):
                self.assertTrue(verify_password(stored, password), stored)
                self.assertFalse(verify_password(stored, password + "x"), stored)
                self.assertEqual(scheme_of(stored), scheme)

    def test_md5_alias(self) -> None:
        """Dovecot's ``{MD5}`` is MD5-CRYPT."""
        self.assertTrue(verify_password("{MD5}" + MD5_CRYPT_REF, "password"))

    def test_sha_digests(self) -> None:
        """``{SHA256}`` etc. are base64 digests; Dovecot also reads hex."""
        digest = hashlib.sha256(b"test").digest()
        for body in (base64.b64encode(digest).decode(), digest.hex(), digest.hex().upper()):
            self.assertTrue(verify_password("{SHA256}" + body, "test"))
            self.assertFalse(verify_password("{SHA256}" + body, "tesT"))
        sha1 = base64.b64encode(hashlib.sha1(b"test").digest()).decode()
        self.assertTrue(verify_password("{SHA}" + sha1, "test"))
        self.assertTrue(verify_password("{SHA1}" + sha1, "test"))

    def test_salted_digests(self) -> None:
        """``{SSHA512}`` is base64(digest(password + salt) + salt), any salt length."""
        salt = b"\x01\x02\x03\x04"
        body = base64.b64encode(hashlib.sha512(b"test" + salt).digest() + salt).decode()
        self.assertTrue(verify_password("{SSHA512}" + body, "test"))
        self.assertFalse(verify_password("{SSHA512}" + body, "test2"))

    def test_digest_round_trips(self) -> None:
        for scheme in ("SSHA512", "SSHA256", "SHA512", "SHA256"):
            stored = hash_password(NON_ASCII, scheme)
            self.assertTrue(stored.startswith("{" + scheme + "}"))
            self.assertTrue(verify_password(stored, NON_ASCII))
            self.assertFalse(verify_password(stored, NON_ASCII[:-1]))
        self.assertNotEqual(hash_password("a", "SSHA256"), hash_password("a", "SSHA256"))

    def test_plain_and_aliases(self) -> None:
        """PLAIN, CLEAR and CLEARTEXT, any case, compare the text itself."""
        self.assertEqual(hash_password("secret", "plain"), "{PLAIN}secret")
        for stored in ("{PLAIN}secret", "{plain}secret", "{CLEAR}secret", "{CLEARTEXT}secret"):
            self.assertTrue(verify_password(stored, "secret"))
            self.assertTrue(verify_password(stored, b"secret"))
            self.assertFalse(verify_password(stored, "secret "))
            self.assertEqual(plaintext_secret(stored), "secret")
            self.assertEqual(scheme_of(stored), "PLAIN")
        self.assertTrue(verify_password("{PLAIN}" + NON_ASCII, NON_ASCII))

    def test_plain_b64(self) -> None:
        stored = hash_password("a:b\nc", "PLAIN-B64")
        self.assertEqual(stored, "{PLAIN-B64}" + base64.b64encode(b"a:b\nc").decode())
        self.assertTrue(verify_password(stored, "a:b\nc"))
        self.assertEqual(plaintext_secret(stored), "a:b\nc")

    @settings(max_examples=50, deadline=None)
    @given(st.text(min_size=1))
    def test_cheap_schemes_round_trip(self, password: str) -> None:
        """Any text round-trips through the cheap schemes."""
        for scheme in ("PLAIN", "PLAIN-B64", "SSHA256"):
            stored = hash_password(password, scheme)
            self.assertTrue(verify_password(stored, password))
            self.assertFalse(verify_password(stored, password + "x"))
        self.assertEqual(plaintext_secret(hash_password(password, "PLAIN-B64")), password)

    def test_long_passwords(self) -> None:
        """Over 72 bytes: bcrypt refuses to hash, verifying never crashes."""
        long = "é" * 50
        self.assertRaises(PasswordTooLong, hash_password, long, "BLF-CRYPT")
        # As crypt(3) does, bcrypt hashes made elsewhere use the first 72 bytes.
        self.assertTrue(verify_password(BCRYPT_REF, "U*U"))
        self.assertFalse(verify_password(BCRYPT_REF, "U*U" + "x" * 100))
        self.assertFalse(verify_password("{SHA512-CRYPT}" + SHA512_CRYPT_REF, "x" * 10000))
        stored = cheap_argon2(long)
        self.assertTrue(verify_password(stored, long))
        self.assertFalse(verify_password(stored, long[:-1]))

    def test_bcrypt_uses_72_bytes(self) -> None:
        prefix = "x" * 72
        stored = "{BLF-CRYPT}" + bcrypt.using(ident="2y", rounds=4).hash(prefix)
        self.assertTrue(verify_password(stored, prefix + "anything"))

    def test_nul_bytes(self) -> None:
        """Schemes that cannot take NUL answer False instead of raising."""
        self.assertFalse(verify_password(SHA512_CRYPT_REF, "Hello\x00world!"))
        self.assertFalse(verify_password(BCRYPT_REF, b"U*U\x00"))

    def test_locked(self) -> None:
        """Empty, ``!`` and ``*`` fields (crypt(3) conventions) match nothing."""
        for stored in ("", "!", "*", "!" + SHA512_CRYPT_REF):
            self.assertFalse(verify_password(stored, "Hello world!"))
            self.assertFalse(verify_password(stored, ""))

    def test_unknown_scheme(self) -> None:
        self.assertRaises(UnknownScheme, hash_password, "x", "NOPE")
        self.assertRaises(UnknownScheme, verify_password, "{NOPE}x", "x")
        self.assertRaises(ValueError, canonical_scheme, "rot13")

    def test_verify_only_schemes(self) -> None:
        """Weak schemes are read but never written."""
        for scheme in ("MD5-CRYPT", "MD5", "SHA", "SSHA", "CRYPT"):
            self.assertRaises(UnknownScheme, hash_password, "x", scheme)
        self.assertTrue(set(HASH_SCHEMES) < set(SCHEMES))

    def test_broken_hashes(self) -> None:
        """Fields that cannot be read raise, so the caller can log them."""
        broken = [
            "{SHA512-CRYPT}$6$garbage",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$abc",
            "{BLF-CRYPT}$2y$10$short",
            "{ARGON2ID}" + BCRYPT_REF,
            "{SHA256}not base64!",
            "{SHA256}" + base64.b64encode(b"short").decode(),
            "{PLAIN-B64}%%%",
            "abc",
            "xyAbCdEfGhIjK",
            "{CRYPT}abc",
        ]
        for stored in broken:
            self.assertRaises(UnknownScheme, verify_password, stored, "x")

    def test_plaintext_secret_only_for_plain(self) -> None:
        for stored in (
            "{SHA512-CRYPT}" + SHA512_CRYPT_REF,
            SHA512_CRYPT_REF,
            "{ARGON2ID}" + ARGON2ID_REF,
            "{NOPE}x",
            "{PLAIN-B64}%%%",
            "{PLAIN-B64}" + base64.b64encode(b"\xff").decode(),
            "secret",
        ):
            self.assertIsNone(plaintext_secret(stored))

    def test_hash_parameters(self) -> None:
        """Scheme and costs without salt or checksum: equal ones cost the same to check."""
        self.assertEqual(
            hash_parameters("{ARGON2ID}" + ARGON2ID_REF), "ARGON2ID$argon2id$v=19$m=65536,t=2,p=1"
        )
        self.assertEqual(
            hash_parameters(ARGON2ID_REF), hash_parameters("{ARGON2ID}" + ARGON2ID_REF)
        )
        self.assertEqual(hash_parameters(BCRYPT_REF), "BLF-CRYPT$2a$05")
        self.assertEqual(hash_parameters(SHA512_CRYPT_REF), "SHA512-CRYPT$6")
        self.assertEqual(
            hash_parameters(hash_password("x")), hash_parameters(hash_password("y"))
        )
        for other in ("{PLAIN}x", "{SSHA256}" + "A" * 44, "{ARGON2ID}" + BCRYPT_REF, "!x", ""):
            self.assertIsNone(hash_parameters(other), other)

    def test_scheme_of(self) -> None:
        self.assertEqual(scheme_of("{argon2id}$argon2id$..."), "ARGON2ID")
        self.assertEqual(scheme_of("{cleartext}x"), "PLAIN")
        self.assertEqual(scheme_of("{Nope}x"), "NOPE")
        self.assertEqual(scheme_of("abc"), "CRYPT")
        self.assertEqual(scheme_of("$2y$05$..."), "BLF-CRYPT")

    def test_canonical_scheme(self) -> None:
        self.assertEqual(canonical_scheme(" blf-crypt "), "BLF-CRYPT")
        self.assertEqual(canonical_scheme("clear"), "PLAIN")


SAMPLE = (
    b"# popserv users\n"
    b"\n"
    b"alice:{PLAIN}a-secret:1000:1000:Alice A.:/home/alice:/bin/sh:login_delay=900 expire=30\n"
    b"bob:{SHA512-CRYPT}" + SHA512_CRYPT_REF.encode() + b"\n"
    b"   # indented comment\n"
    b"no colon on this line\n"
    b"../evil:{PLAIN}x\n"
    b"carol:{PLAIN}c\xffc\n"
    b"dave:{PLAIN}d:::::: nopassword  allow_nets=10.0.0.0/8 \n"
    b"alice:{PLAIN}shadowed\n"
    b"erin:{PLAIN}e\r\n"
    b"frank:{PLAIN}f"
)


class PasswdFileReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "passwd"
        self.path.write_bytes(SAMPLE)
        self.passwd = PasswdFile(self.path)

    def test_parse(self) -> None:
        """Users, their middle and extra fields; comments and blank lines skipped."""
        with capturedLogs():
            alice = self.passwd.lookup("alice")
        assert alice is not None
        self.assertEqual(alice.password, "{PLAIN}a-secret")
        self.assertEqual(dict(alice.extra), {"login_delay": "900", "expire": "30"})
        self.assertEqual(alice.fields, ("1000", "1000", "Alice A.", "/home/alice", "/bin/sh"))
        bob = self.passwd.lookup("bob")
        assert bob is not None
        self.assertEqual(bob.scheme, "SHA512-CRYPT")
        self.assertEqual(dict(bob.extra), {})
        dave = self.passwd.lookup("dave")
        assert dave is not None
        self.assertEqual(dict(dave.extra), {"nopassword": "", "allow_nets": "10.0.0.0/8"})
        self.assertEqual(
            [u.name for u in self.passwd.users()], ["alice", "bob", "dave", "erin", "frank"]
        )
        self.assertEqual(self.passwd.lookup("erin").password, "{PLAIN}e")  # type: ignore[union-attr]
        self.assertEqual(self.passwd.lookup("frank").password, "{PLAIN}f")  # type: ignore[union-attr]
        self.assertIsNone(self.passwd.lookup("nobody"))

    def test_malformed_lines_warned_by_number(self) -> None:
        """Bad lines are skipped with their line number, never their content."""
        with capturedLogs() as events:
            self.passwd.lookup("alice")
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["number"] for e in warnings], [6, 7, 8, 10])
        for event in warnings:
            text = repr(event)
            for secret in ("shadowed", "evil", "no colon", "c\\xffc"):
                self.assertNotIn(secret, text)

    def test_first_of_repeated_users_counts(self) -> None:
        with capturedLogs():
            self.assertEqual(self.passwd.lookup("alice").password, "{PLAIN}a-secret")  # type: ignore[union-attr]

    def test_cached_until_changed(self) -> None:
        """The file is read again only after it changed."""
        with capturedLogs() as events:
            first = self.passwd.users()
            self.assertIs(self.passwd.users(), first)
            self.passwd.lookup("bob")
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.warn]), 4)
        self.path.write_bytes(b"zoe:{PLAIN}z\n")
        self.assertIsNone(self.passwd.lookup("alice"))
        self.assertEqual(self.passwd.lookup("zoe").password, "{PLAIN}z")  # type: ignore[union-attr]
        self.assertIsNot(self.passwd.users(), first)

    def test_reload_after_replace_same_size(self) -> None:
        """A file replaced by another (new inode) of the same size is read again."""
        self.path.write_bytes(b"amy:{PLAIN}1\n")
        self.assertIsNotNone(self.passwd.lookup("amy"))
        other = self.dir / "new"
        other.write_bytes(b"ann:{PLAIN}2\n")
        os.utime(other, ns=(os.stat(self.path).st_atime_ns, os.stat(self.path).st_mtime_ns))
        os.replace(other, self.path)
        self.assertIsNone(self.passwd.lookup("amy"))
        self.assertIsNotNone(self.passwd.lookup("ann"))

    def test_missing_file(self) -> None:
        passwd = PasswdFile(self.dir / "nothing")
        self.assertFalse(passwd.exists())
        self.assertRaises(FileNotFoundError, passwd.lookup, "alice")
        self.assertRaises(FileNotFoundError, passwd.users)
        self.assertTrue(self.passwd.exists())

    def test_entry_line_round_trip(self) -> None:
        entry = UserEntry("amy", "{PLAIN}x", {"login_delay": "900", "flag": ""})
        self.assertEqual(entry.to_line(), "amy:{PLAIN}x::::::login_delay=900 flag")
        self.assertEqual(parse_line(entry.to_line()), entry)
        self.assertEqual(UserEntry("amy", "{PLAIN}x").to_line(), "amy:{PLAIN}x")

        def change() -> None:
            entry.extra["a"] = "b"  # type: ignore[index]

        self.assertRaises(TypeError, change)


class PasswdFileWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.path = self.dir / "data" / "passwd"

    def test_create(self) -> None:
        """The first add creates the file 0600 and its directory 0700."""
        passwd = PasswdFile(self.path)
        entry = passwd.add("alice", "{PLAIN}a", {"login_delay": "60"})
        self.assertEqual(entry, UserEntry("alice", "{PLAIN}a", {"login_delay": "60"}))
        self.assertEqual(self.path.read_text(), "alice:{PLAIN}a::::::login_delay=60\n")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.path.parent.stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(passwd.lock_path.stat().st_mode), 0o600)
        self.assertEqual(passwd.lookup("alice"), entry)
        self.assertEqual(sorted(os.listdir(self.path.parent)), ["passwd", "passwd.lock"])

    def test_writes_keep_other_lines(self) -> None:
        """Comments, other users and unreadable lines survive byte for byte."""
        self.path.parent.mkdir(parents=True)
        self.path.write_bytes(SAMPLE)
        passwd = PasswdFile(self.path)
        with capturedLogs():
            passwd.lookup("bob")
        passwd.add("zoe", "{PLAIN}z")
        self.assertEqual(self.path.read_bytes(), SAMPLE + b"\nzoe:{PLAIN}z\n")
        passwd.set_password("alice", "{PLAIN}new")
        expected = SAMPLE.replace(b"{PLAIN}a-secret", b"{PLAIN}new") + b"\nzoe:{PLAIN}z\n"
        self.assertEqual(self.path.read_bytes(), expected)
        with capturedLogs():
            alice = passwd.lookup("alice")
        assert alice is not None
        self.assertEqual(alice.password, "{PLAIN}new")
        self.assertEqual(alice.fields[2], "Alice A.")
        self.assertEqual(dict(alice.extra), {"login_delay": "900", "expire": "30"})

    def test_mode_kept(self) -> None:
        """A rewrite keeps the mode the administrator gave the file."""
        passwd = PasswdFile(self.path)
        passwd.add("alice", "{PLAIN}a")
        os.chmod(self.path, 0o640)
        passwd.add("bob", "{PLAIN}b")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o640)

    def test_set_extra(self) -> None:
        passwd = PasswdFile(self.path)
        passwd.add("alice", "{PLAIN}a")
        passwd.set_extra("alice", "expire", "30")
        passwd.set_extra("alice", "login_delay", "900")
        passwd.set_extra("alice", "expire", "NEVER")
        self.assertEqual(
            self.path.read_text(), "alice:{PLAIN}a::::::expire=NEVER login_delay=900\n"
        )
        entry = passwd.set_extra("alice", "expire", None)
        self.assertEqual(dict(entry.extra), {"login_delay": "900"})
        passwd.set_extra("alice", "login_delay", None)
        self.assertEqual(self.path.read_text(), "alice:{PLAIN}a\n")

    def test_remove(self) -> None:
        """Every line of the user goes, so a repeated line cannot become live."""
        self.path.parent.mkdir(parents=True)
        self.path.write_bytes(b"# c\nalice:{PLAIN}1\nbob:{PLAIN}b\nalice:{PLAIN}2\n")
        passwd = PasswdFile(self.path)
        with capturedLogs():
            passwd.remove("alice")
        self.assertEqual(self.path.read_bytes(), b"# c\nbob:{PLAIN}b\n")
        self.assertIsNone(passwd.lookup("alice"))
        self.assertRaises(NoSuchUser, passwd.remove, "alice")

    def test_missing_user(self) -> None:
        passwd = PasswdFile(self.path)
        self.assertRaises(NoSuchUser, passwd.remove, "alice")
        self.assertRaises(NoSuchUser, passwd.set_password, "alice", "{PLAIN}x")
        self.assertRaises(NoSuchUser, passwd.set_extra, "alice", "expire", "1")
        self.assertFalse(self.dir.exists())
        self.assertEqual(str(NoSuchUser("alice")), "no user 'alice'")

    def test_existing_user(self) -> None:
        passwd = PasswdFile(self.path)
        passwd.add("alice", "{PLAIN}a")
        error = self.assertRaises(UserExists, passwd.add, "alice", "{PLAIN}b")
        self.assertEqual(str(error), "user 'alice' already exists")
        self.assertEqual(self.path.read_text(), "alice:{PLAIN}a\n")

    def test_bad_names_refused(self) -> None:
        passwd = PasswdFile(self.path)
        for name in ("", "../x", "a:b", "a b", "a\nb", ".hidden", "-x", "a/b"):
            self.assertRaises(InvalidUsername, passwd.add, name, "{PLAIN}x")
            self.assertRaises(InvalidUsername, passwd.remove, name)
        self.assertFalse(self.dir.exists())

    def test_bad_fields_refused(self) -> None:
        passwd = PasswdFile(self.path)
        passwd.add("alice", "{PLAIN}a")
        for field in ("{PLAIN}a:b", "{PLAIN}a\nbob:{PLAIN}b", "x\r", "x\x00"):
            self.assertRaises(InvalidField, passwd.add, "bob", field)
            self.assertRaises(InvalidField, passwd.set_password, "alice", field)
        for key, value in (("a b", "1"), ("a", "1 2"), ("a=b", "1"), ("", "1"), ("a", "x:y")):
            self.assertRaises(InvalidField, passwd.set_extra, "alice", key, value)
            self.assertRaises(InvalidField, passwd.add, "bob", "{PLAIN}b", {key: value})
        self.assertEqual(self.path.read_text(), "alice:{PLAIN}a\n")

    def test_writers_serialised(self) -> None:
        """Writers with their own (stale) views never lose each other's users."""
        names = [f"user{i}" for i in range(8)]
        files = [PasswdFile(self.path) for _ in names]
        files[0].add("first", "{PLAIN}x")
        for passwd in files:
            passwd.lookup("first")
        threads = [
            threading.Thread(target=passwd.add, args=(name, "{PLAIN}x"))
            for passwd, name in zip(files, names)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(
            sorted(u.name for u in PasswdFile(self.path).users()), sorted(["first", *names])
        )


class CheckerTests(TestCase):
    def setUp(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        self.path = directory / "passwd"
        self.path.write_text(
            f"alice:{alice_hash()}\n"
            "bob:{PLAIN}apop-secret\n"
            f"carol:{{SHA512-CRYPT}}{SHA512_CRYPT_REF}\n"
            "dave:{NOPE}dave-secret\n"
        )
        self.checker = PasswdFileChecker(PasswdFile(self.path))
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_interface(self) -> None:
        verifyObject(ICredentialsChecker, self.checker)
        verifyObject(ISecretInventory, self.checker)

    def test_coverage_follows_the_file(self) -> None:
        """APOP is possible while some user has a PLAIN password, and not after."""
        self.assertEqual(self.checker.coverage("apop"), "some")
        self.checker.passwd.remove("bob")
        self.assertEqual(self.checker.coverage("apop"), "none")
        self.checker.passwd.add("erin", "{PLAIN-B64}c2VjcmV0")
        self.assertEqual(self.checker.coverage("apop"), "some")
        self.path.unlink()
        self.assertEqual(self.checker.coverage("apop"), "none")

    async def test_secrets_in_extra_fields(self) -> None:
        """An argon2id user with SCRAM and CRAM-MD5 forms too: each mechanism finds its own."""
        stored, extras = hash_secrets("pencil", ["ARGON2ID", "SCRAM-SHA-256", "CRAM-MD5"])
        self.checker.passwd.add("erin", stored, extras)
        keys = await self.checker.scram_keys("erin", "SHA-256")
        self.assertTrue(keys.matches("pencil"))
        # No SHA-1 secret: decoys, as for an unknown user.
        self.assertFalse((await self.checker.scram_keys("erin", "SHA-1")).matches("pencil"))
        challenge = b"<1.2@x>"
        digest = hmac.new(b"pencil", challenge, "md5").hexdigest().encode()
        name = await self.checker.requestAvatarId(CramMD5Credentials(b"erin", challenge, digest))
        self.assertEqual(name, "erin")
        name = await self.checker.requestAvatarId(UsernamePassword(b"erin", b"pencil"))
        self.assertEqual(name, "erin")

    def test_coverage_all(self) -> None:
        """CRAM-MD5 works with PLAIN or CRAM-MD5 secrets; 'all' only when every user has one."""
        for name in ("alice", "carol", "dave"):
            self.checker.passwd.remove(name)
        self.assertEqual(self.checker.coverage("cram-md5"), "all")
        self.checker.passwd.add("erin", hash_password("pw", "CRAM-MD5"))
        self.assertEqual(self.checker.coverage("cram-md5"), "all")
        self.assertEqual(self.checker.coverage("apop"), "some")
        for name in ("bob", "erin"):
            self.checker.passwd.remove(name)
        self.assertEqual(self.checker.coverage("cram-md5"), "none")

    async def test_right_password(self) -> None:
        """The avatar id is the user name as str, for bytes and str credentials."""
        name = await self.checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        self.assertEqual(name, "alice")
        name = await self.checker.requestAvatarId(UsernamePassword("carol", "Hello world!"))
        self.assertEqual(name, "carol")

    def test_wrong_password(self):
        return self.assertFailure(
            self.checker.requestAvatarId(UsernamePassword(b"alice", b"Secret")),
            UnauthorizedLogin,
        )

    def test_unknown_user(self):
        """Unknown users fail like wrong passwords (after checking a dummy hash)."""
        return self.assertFailure(
            self.checker.requestAvatarId(UsernamePassword(b"zoe", b"secret")),
            UnauthorizedLogin,
        )

    def test_empty_password(self):
        return self.assertFailure(
            self.checker.requestAvatarId(UsernamePassword(b"bob", b"")), UnauthorizedLogin
        )

    async def test_bad_names_do_not_touch_the_disk(self) -> None:
        """Invalid or undecodable names fail as logins, even with no passwd file."""
        self.path.unlink()
        for name in (b"../alice", b"\xff", b"", b"a:b", "a\nb"):
            d = self.checker.requestAvatarId(UsernamePassword(name, b"secret"))
            await self.assertFailure(d, UnauthorizedLogin)

    async def test_missing_file(self) -> None:
        """An unreadable passwd file is a temporary failure, not a wrong password."""
        self.path.unlink()
        for credentials in (
            UsernamePassword(b"alice", b"secret"),
            APOPCredentials("bob", b"<1.2@host>", b"0" * 32),
        ):
            d = self.checker.requestAvatarId(credentials)
            await self.assertFailure(d, TemporaryFailure)
        self.assertTrue(any(e["log_level"] == LogLevel.error for e in self.events))

    async def test_unknown_scheme(self) -> None:
        """A broken entry fails the login and is logged, without its content."""
        d = self.checker.requestAvatarId(UsernamePassword(b"dave", b"dave-secret"))
        await self.assertFailure(d, UnauthorizedLogin)
        errors = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["user"], "dave")
        self.assertNotIn("dave-secret", repr(errors[0]))

    async def test_apop_plain(self) -> None:
        """APOP works against a PLAIN secret."""
        stamp = b"<1896.697170952@dbc.mtview.ca.us>"
        digest = md5(stamp + b"apop-secret").hexdigest().encode()
        name = await self.checker.requestAvatarId(APOPCredentials("bob", stamp, digest))
        self.assertEqual(name, "bob")
        wrong = md5(stamp + b"other").hexdigest().encode()
        d = self.checker.requestAvatarId(APOPCredentials("bob", stamp, wrong))
        await self.assertFailure(d, UnauthorizedLogin)
        d = self.checker.requestAvatarId(APOPCredentials("zoe", stamp, digest))
        await self.assertFailure(d, UnauthorizedLogin)

    async def test_apop_hashed(self) -> None:
        """APOP against a hashed secret fails, and the log says why."""
        stamp = b"<1.2@host>"
        digest = md5(stamp + b"secret").hexdigest().encode()
        d = self.checker.requestAvatarId(APOPCredentials("alice", stamp, digest))
        await self.assertFailure(d, UnauthorizedLogin)
        infos = [e for e in self.events if e["log_level"] == LogLevel.info]
        self.assertEqual(len(infos), 1)
        self.assertEqual(infos[0]["scheme"], "ARGON2ID")
        self.assertIn("PLAIN", infos[0]["log_format"])

    def test_unhandled_credentials(self):
        class Other:
            username = b"alice"

        return self.assertFailure(self.checker.requestAvatarId(Other()), UnhandledCredentials)


class FailureCostTests(TestCase):
    """
    An unknown user costs one real check of the dummy hash, as a wrong
    password of the default scheme costs one check of the user's hash; a
    cheaper field's failure adds the dummy's.  (What is counted is what
    runs: timings vary too much to assert on.)
    """

    def setUp(self) -> None:
        CheckerTests.setUp(self)  # type: ignore[arg-type]  # the same users
        self.checked: list[str] = []
        real = checker_module.verify_password

        def counting(stored: str, password: str | bytes) -> bool:
            self.checked.append(stored)
            return real(stored, password)

        self.patch(checker_module, "verify_password", counting)

    async def checks(self, user: bytes, password: bytes) -> list[str]:
        del self.checked[:]
        try:
            await self.checker.requestAvatarId(UsernamePassword(user, password))
        except UnauthorizedLogin:
            pass
        return ["dummy" if s == dummy_hash() else s.split("}")[0] + "}" for s in self.checked]

    async def test_unknown_users_check_the_dummy(self) -> None:
        for user in (b"zoe", "\u0430lice".encode(), b"../etc", b"\xff"):
            self.assertEqual(await self.checks(user, b"guess"), ["dummy"], user)

    async def test_default_scheme_checks_only_its_own(self) -> None:
        self.assertEqual(await self.checks(b"alice", b"guess"), ["{ARGON2ID}"])
        self.assertEqual(await self.checks(b"alice", b"secret"), ["{ARGON2ID}"])

    async def test_cheaper_fields_fail_no_faster(self) -> None:
        """PLAIN, SHA512-CRYPT and a broken entry: their own check, then the dummy's."""
        self.assertEqual(await self.checks(b"bob", b"guess"), ["{PLAIN}", "dummy"])
        self.assertEqual(await self.checks(b"carol", b"guess"), ["{SHA512-CRYPT}", "dummy"])
        self.assertEqual(await self.checks(b"dave", b"guess"), ["{NOPE}", "dummy"])

    async def test_successes_are_not_delayed(self) -> None:
        self.assertEqual(await self.checks(b"bob", b"apop-secret"), ["{PLAIN}"])
        self.assertEqual(await self.checks(b"carol", b"Hello world!"), ["{SHA512-CRYPT}"])
