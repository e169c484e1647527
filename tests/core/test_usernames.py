"""User names: NFKC, case, mixed scripts (popserv.core.usernames)."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import poplib
import sys
from hashlib import md5
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.logger import LogLevel, capturedLogs, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.core.errors import InvalidUsername
from popserv.core.usernames import (
    KEEP,
    UsernameRules,
    is_valid_username,
    loggable_username,
    mixes_scripts,
    normalize_username,
    validate_username,
)
from popserv.core.wire import loggable
from popserv.interfaces import IMailbox
from popserv.logins.credentials import (
    ActAsPasswordCredentials,
    APOPCredentials,
    CramMD5Credentials,
    ExternalCredentials,
    ScramCredentials,
)
from popserv.logins.passwords import PasswdFile, PasswdFileChecker, UserExists, hash_secrets
from popserv.logins.passwords.scram import ScramKeys
from popserv.logins.sasl.mechanism import SASLContext
from popserv.logins.sasl.scram import Scram
from popserv.server.cli import main
from popserv.server.configure import username_rules
from popserv.server.service import make_factory, make_receiver
from popserv.server.tap import Options
from popserv.stores.delivery import Directory, UnknownUser
from popserv.stores.layout import Layout, ensure_maildir
from popserv.stores.maildir import deliver
from popserv.stores.realm import MaildirRealm
from tests.support.servers import ServerTestCase

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
            self.assertEqual(rules.key(validate_username(once)), once)
        for rules in (UsernameRules(), UsernameRules(case=KEEP)):
            if is_valid_username(name):
                try:
                    expected = normalize_username(name, rules)
                except InvalidUsername:
                    continue
                self.assertEqual(rules.key(name), expected)

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


class PasswdFileTests(SynchronousTestCase):
    """Names stored as written, looked up normalised."""

    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def passwd(self, text: str, rules: UsernameRules = UsernameRules()) -> PasswdFile:
        self.path.write_text(text, encoding="utf-8")
        return PasswdFile(self.path, rules)

    def test_mixed_case_names_keep_working(self) -> None:
        """An existing Alice is found as alice, ALICE and in full width, and stays Alice."""
        passwd = self.passwd("Alice:{PLAIN}a\n")
        for name in ("Alice", "alice", "ALICE", FULL_WIDTH_ALICE):
            self.assertEqual(passwd.lookup(name).name, "Alice", name)  # type: ignore[union-attr]

    def test_case_kept(self) -> None:
        passwd = self.passwd("Alice:{PLAIN}a\nalice:{PLAIN}b\n", UsernameRules(case=KEEP))
        self.assertEqual(passwd.lookup("Alice").password, "{PLAIN}a")  # type: ignore[union-attr]
        self.assertEqual(passwd.lookup("alice").password, "{PLAIN}b")  # type: ignore[union-attr]
        self.assertIsNone(passwd.lookup("ALICE"))
        self.assertEqual(passwd.lookup("\uff21lice").name, "Alice")  # type: ignore[union-attr]

    def test_names_alike_once_folded_are_one_user(self) -> None:
        """The first line counts, as for a repeated name, and the log says why."""
        with capturedLogs() as events:
            passwd = self.passwd("Alice:{PLAIN}a\nalice:{PLAIN}b\n")
            self.assertEqual(passwd.lookup("alice").password, "{PLAIN}a")  # type: ignore[union-attr]
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["number"], 2)
        self.assertIn("--username-case", formatEvent(warning))

    def test_mixed_script_lines_skipped(self) -> None:
        """Skipped with the reason, never the line; allowed when the rules say so."""
        text = f"{HOMOGLYPH_ALICE}:{{PLAIN}}s3cr3t\nalice:{{PLAIN}}a\n"
        with capturedLogs() as events:
            passwd = self.passwd(text)
            self.assertIsNone(passwd.lookup(HOMOGLYPH_ALICE))
            self.assertEqual(passwd.lookup("alice").password, "{PLAIN}a")  # type: ignore[union-attr]
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["number"], 1)
        self.assertIn("mixes scripts", formatEvent(warning))
        self.assertNotIn("s3cr3t", repr(warning))
        allowing = self.passwd(text, UsernameRules(mixed_scripts=True))
        self.assertEqual(allowing.lookup(HOMOGLYPH_ALICE).name, HOMOGLYPH_ALICE)  # type: ignore[union-attr]

    def test_add_stores_the_normalised_name(self) -> None:
        passwd = self.passwd("")
        self.assertEqual(passwd.add(FULL_WIDTH_ALICE.upper(), "{PLAIN}a").name, "alice")
        self.assertEqual(self.path.read_text(), "alice:{PLAIN}a\n")
        self.assertRaises(UserExists, passwd.add, "Alice", "{PLAIN}b")
        self.assertRaises(InvalidUsername, passwd.add, HOMOGLYPH_ALICE, "{PLAIN}b")

    def test_changes_find_the_stored_name(self) -> None:
        """passwd, extra fields and del reach Alice by any form of her name."""
        passwd = self.passwd("Alice:{PLAIN}a\n")
        passwd.set_password("ALICE", "{PLAIN}new")
        passwd.set_extra(FULL_WIDTH_ALICE, "quota_bytes", "1000")
        self.assertEqual(self.path.read_text(), "Alice:{PLAIN}new::::::quota_bytes=1000\n")
        passwd.remove("alice")
        self.assertEqual(self.path.read_text(), "")


class CheckerTests(TestCase):
    """Every kind of login looks the name up normalised; the avatar is the stored name."""

    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        stored, extras = hash_secrets("pw", ["PLAIN", "SCRAM-SHA-256"])
        path.write_text(f"Alice:{stored}::::::{extras_field(extras)}\nbob:{{PLAIN}}bob-pw\n")
        self.passwd = PasswdFile(path)
        self.checker = PasswdFileChecker(self.passwd, masters=["BOB"])

    async def login(self, credentials) -> str:
        return await self.checker.requestAvatarId(credentials)

    async def test_user_pass(self) -> None:
        for name in ("Alice", "alice", "ALICE", FULL_WIDTH_ALICE):
            self.assertEqual(await self.login(UsernamePassword(name.encode(), b"pw")), "Alice")

    async def test_challenge_response(self) -> None:
        stamp = b"<1.2@host>"
        apop = md5(stamp + b"pw").hexdigest().encode()
        avatar = await self.login(APOPCredentials(FULL_WIDTH_ALICE.encode(), stamp, apop))
        self.assertEqual(avatar, "Alice")
        cram = hmac.new(b"pw", stamp, "md5").hexdigest().encode()
        self.assertEqual(await self.login(CramMD5Credentials(b"ALICE", stamp, cram)), "Alice")

    async def test_external(self) -> None:
        self.assertEqual(await self.login(ExternalCredentials("ALICE")), "Alice")

    async def test_scram(self) -> None:
        """A SCRAM exchange as ALICE against Alice's stored keys."""
        keys = await self.checker.scram_keys("ALICE", "SHA-256")
        self.assertEqual(keys, await self.checker.scram_keys("Alice", "SHA-256"))
        client = ScramKeys.derive("SHA-256", "pw", keys.salt, keys.iterations)
        message = b"n=ALICE,r=x,r=xy,s=s,i=4096,c=biws,r=xy"
        signature = hmac.new(client.stored_key, message, "sha256").digest()
        client_key = hmac.new(
            hashlib.pbkdf2_hmac("sha256", b"pw", keys.salt, keys.iterations),
            b"Client Key",
            "sha256",
        ).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        credentials = ScramCredentials("ALICE", "SHA-256", message, proof)
        self.assertEqual(await self.login(credentials), "Alice")

    async def test_scram_salts_tell_no_names_apart(self) -> None:
        """
        The salt a SCRAM exchange sends is the same for ALICE and alice; so
        must it be for BOB and bob (keys derived from a PLAIN password) and
        for ZOE and zoe, who does not exist: else comparing the salts of two
        spellings would tell which names are users.
        """

        async def server_first(name: str) -> bytes:
            exchange = Scram(SASLContext(), "SHA-256", plus=False)
            need = exchange.step(f"n,,n={name},r=abcdef".encode())
            keys = await self.checker.scram_keys(need.username, need.hash_name)
            return exchange.provide(keys).data.split(b",")[1]  # s=salt

        for one, other in (("ALICE", "alice"), ("BOB", "bob"), ("ZOE", "zoe")):
            self.assertEqual(await server_first(one), await server_first(other), one)

    async def test_master_user_normalised(self) -> None:
        """--master-user BOB is bob; the user acted as is found by any form of its name."""
        credentials = ActAsPasswordCredentials(b"Bob", b"bob-pw", "\uff41LICE")
        self.assertEqual(await self.login(credentials), "Alice")

    async def test_homoglyph_fails_like_an_unknown_user(self) -> None:
        for credentials in (
            UsernamePassword(HOMOGLYPH_ALICE.encode(), b"pw"),
            APOPCredentials(HOMOGLYPH_ALICE.encode(), b"<1.2@host>", b"0" * 32),
            ExternalCredentials(HOMOGLYPH_ALICE),
        ):
            d = self.checker.requestAvatarId(credentials)
            await self.assertFailure(d, UnauthorizedLogin)
        self.assertFalse((await self.checker.scram_keys(HOMOGLYPH_ALICE, "SHA-256")).matches("pw"))

    async def test_case_kept(self) -> None:
        checker = PasswdFileChecker(PasswdFile(self.passwd.path, UsernameRules(case=KEEP)))
        self.assertEqual(await checker.requestAvatarId(UsernamePassword(b"Alice", b"pw")), "Alice")
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"pw"))
        await self.assertFailure(d, UnauthorizedLogin)


class DirectoryTests(SynchronousTestCase):
    """Delivery finds users as logins do, and writes to the stored name's Maildir."""

    def setUp(self) -> None:
        self.layout = Layout.create(self.mktemp())
        self.layout.data_dir.mkdir(parents=True)
        self.layout.passwd_path.write_text("Alice:{PLAIN}a\n")
        self.directory = Directory(self.layout, PasswdFile(self.layout.passwd_path), ["x.test"])

    def test_resolve(self) -> None:
        for address in ("alice@x.test", "ALICE+news@x.test", f"{FULL_WIDTH_ALICE}@x.test"):
            recipient = self.directory.resolve(address)
            self.assertEqual(recipient.user, "Alice", address)
            self.assertEqual(recipient.maildir.path, self.layout.maildir_for("Alice"))

    def test_named_user(self) -> None:
        """``popserv deliver --user ALICE`` delivers to Alice's Maildir, not one named ALICE."""
        recipient = self.directory.recipient("ALICE")
        self.assertEqual(recipient.maildir.path, self.layout.maildir_for("Alice"))

    def test_homoglyph_unknown(self) -> None:
        self.assertRaises(UnknownUser, self.directory.resolve, f"{HOMOGLYPH_ALICE}@x.test")
        self.assertRaises(UnknownUser, self.directory.recipient, HOMOGLYPH_ALICE)


def extras_field(extras: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in extras.items())


class RealmTests(TestCase):
    async def test_other_checkers_open_the_stored_name(self) -> None:
        """An avatar id from elsewhere (an OAuth token's ALICE) opens the file's Alice."""
        layout = Layout.create(self.mktemp())
        layout.data_dir.mkdir(parents=True)
        layout.passwd_path.write_text("Alice:{PLAIN}a\n")
        deliver(ensure_maildir(layout.maildir_for("Alice")), b"Subject: hi\n\nhello\n")
        realm = MaildirRealm(layout, PasswdFile(layout.passwd_path), index=False)
        _, mailbox, logout = await realm.requestAvatar("ALICE", None, IMailbox)
        try:
            self.assertEqual(len(mailbox.listing()), 1)
        finally:
            logout()
        self.assertFalse(layout.maildir_for("ALICE").exists())


class CommandTests(SynchronousTestCase):
    """``popserv user`` and ``popserv deliver`` normalise names as the server does."""

    def setUp(self) -> None:
        self.data = Path(self.mktemp())
        self.passwd = self.data / "passwd"

    def run_cli(self, *argv: str, stdin: str = "pw\n") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["--data", str(self.data), *argv])
        return code, out.getvalue(), err.getvalue()

    def test_add_stores_the_normal_form(self) -> None:
        code, out, _ = self.run_cli("user", "add", FULL_WIDTH_ALICE.upper())
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith(f"added user alice (given as {FULL_WIDTH_ALICE.upper()})"))
        self.assertEqual(self.passwd.read_text().split(":")[0], "alice")
        self.assertTrue((self.data / "mail" / "alice" / "new").is_dir())
        code, _, err = self.run_cli("user", "add", "Alice")
        self.assertEqual((code, err), (1, "popserv: user 'alice' already exists\n"))

    def test_add_keeps_case_when_asked(self) -> None:
        code, _, _ = self.run_cli("user", "add", "Alice", "--username-case", "keep")
        self.assertEqual(code, 0)
        self.assertEqual(self.passwd.read_text().split(":")[0], "Alice")

    def test_mixed_scripts_refused(self) -> None:
        code, _, err = self.run_cli("user", "add", HOMOGLYPH_ALICE)
        self.assertEqual((code, err), (1, "popserv: invalid user name: user name mixes scripts\n"))
        self.assertFalse(self.passwd.exists())
        code, _, _ = self.run_cli("user", "add", HOMOGLYPH_ALICE, "--allow-mixed-script-names")
        self.assertEqual(code, 0)

    def test_passwd_and_del_reach_the_stored_name(self) -> None:
        """An existing Alice (say from Dovecot) is changed and purged as ALICE."""
        self.data.mkdir()
        self.passwd.write_text("Alice:{PLAIN}old\n")
        maildir = ensure_maildir(self.data / "mail" / "Alice")
        self.assertEqual(self.run_cli("user", "passwd", "ALICE", stdin="new\n")[0], 0)
        self.assertTrue(self.passwd.read_text().startswith("Alice:{ARGON2ID}"))
        code, out, _ = self.run_cli("user", "del", FULL_WIDTH_ALICE, "--purge")
        self.assertEqual(code, 0, out)
        self.assertEqual(self.passwd.read_text(), "")
        self.assertFalse(maildir.exists())

    def test_deliver(self) -> None:
        self.data.mkdir()
        self.passwd.write_text("Alice:{PLAIN}a\n")
        maildir = ensure_maildir(self.data / "mail" / "Alice")
        for who in (("--user", "ALICE"), ("--recipient", f"{FULL_WIDTH_ALICE}+tag@x.test")):
            stdin = io.TextIOWrapper(io.BytesIO(b"Subject: hi\n\nhello\n"))
            self.patch(sys, "stdin", stdin)
            out, err = io.StringIO(), io.StringIO()
            self.patch(sys, "stdout", out)
            self.patch(sys, "stderr", err)
            self.assertEqual(main(["--data", str(self.data), "deliver", *who]), 0, err.getvalue())
        self.assertEqual(len(os.listdir(maildir / "new")), 2)
        self.assertEqual(sorted(os.listdir(self.data / "mail")), ["Alice"])


class OptionTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--data", self.mktemp(), *argv])
        return options

    def test_defaults(self) -> None:
        self.assertEqual(username_rules(self.parse()), UsernameRules(case="fold"))

    def test_given(self) -> None:
        options = self.parse("--username-case", "keep", "--allow-mixed-script-names")
        self.assertEqual(username_rules(options), UsernameRules(KEEP, mixed_scripts=True))

    def test_refused(self) -> None:
        self.assertRaises(UsageError, self.parse, "--username-case", "upper")
        self.assertRaises(UsageError, self.parse, "--master-user", HOMOGLYPH_ALICE)

    def test_factory_uses_them(self) -> None:
        """The server's checker and receiver match names by the options' rules."""
        data = Path(self.mktemp())
        data.mkdir()
        (data / "passwd").write_text("Alice:{PLAIN}a\n")
        options = {"data": str(data), "passwd": str(data / "passwd"), "hostname": "h"}
        for case, found in (("fold", True), ("keep", False)):
            factory = make_factory({**options, "username-case": case})
            checker = factory.portal.checkers[IUsernamePassword]
            self.assertEqual(checker.passwd.lookup("alice") is not None, found)
            receiver = make_receiver({**options, "username-case": case}, factory, lmtp=True)
            self.assertEqual(receiver.directory.passwd.rules.case, case)


class PoplibTests(ServerTestCase):
    """Over real POP3: alice (argon2id) and bob (PLAIN), case folded by default."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def login(self, user: str, password: str, *, apop: bool = False) -> bytes:
        """Log in with poplib (UTF-8 names); the answer, +OK or -ERR."""
        client = self.pop()
        try:
            if apop:
                answer = client.apop(user, password)
            else:
                client.user(user)
                answer = client.pass_(password)
        except poplib.error_proto as e:
            client.close()
            return e.args[0]
        client.quit()  # releases the maildrop before the next login
        return answer

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    async def test_case_folded(self) -> None:
        for name in ("ALICE", "Alice"):
            answer = await self.run_in_thread(self.login, name, "secret")
            self.assertTrue(answer.startswith(b"+OK Logged in, 4 messages"), (name, answer))
        answer = await self.run_in_thread(lambda: self.login("BOB", "bob pw", apop=True))
        self.assertTrue(answer.startswith(b"+OK"), answer)

    async def test_full_width_name_is_alice(self) -> None:
        answer = await self.run_in_thread(self.login, FULL_WIDTH_ALICE, "secret")
        self.assertTrue(answer.startswith(b"+OK Logged in, 4 messages"), answer)
        await self.wait_idle()
        self.assertIn("alice logged in from", self.logged())
        self.assertNotIn("uff41", self.logged())

    async def test_homoglyph_fails_like_an_unknown_user(self) -> None:
        """The same answer as for a user that does not exist; the log shows the \\u0430."""
        homoglyph = await self.run_in_thread(self.login, HOMOGLYPH_ALICE, "secret")
        unknown = await self.run_in_thread(self.login, "zelda", "secret")
        self.assertEqual(homoglyph, unknown)
        self.assertTrue(homoglyph.startswith(b"-ERR [AUTH]"), homoglyph)
        await self.wait_idle()
        self.assertIn("Failed login for \\u0430lice from", self.logged())


class CaseKeptTests(ServerTestCase):
    options = {"username-case": "keep"}

    def test_exact_names_only(self) -> None:
        def login(name: str) -> bytes:
            client = self.pop()
            try:
                client.user(name)
                answer = client.pass_("secret")
            except poplib.error_proto as e:
                client.close()
                return e.args[0]
            client.quit()
            return answer

        return self.run_in_thread(
            lambda: self.assertEqual(
                [login(n)[:3] for n in ("alice", "ALICE", FULL_WIDTH_ALICE)],
                [b"+OK", b"-ER", b"+OK"],
            )
        )
