"""
The pure POP3 session (:mod:`popserv.core.session`), driven directly: no
transport, no clock, no Twisted.  A small synchronous driver performs each
effect against a model maildrop and answers it; unit tests check what RFC
1939 (and 2449, 2595, 6856) says each command does, and a hypothesis state
machine runs random sessions against a model.

The normal suite keeps the state machine's example count small; for a long
run set ``POPSERV_FUZZ_EXAMPLES`` (the state machine gets a fifth of it)::

    POPSERV_FUZZ_EXAMPLES=20000 python -m twisted.trial tests.core.test_session
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from hashlib import md5
from typing import Any

from attrs import define
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from twisted.trial.unittest import SynchronousTestCase

from popserv.core import effects as pop3
from popserv.core import errors, wire
from popserv.core.body import BodyEncoder, wire_size
from popserv.core.effects import Rejected
from popserv.core.lang import Language, Languages
from popserv.core.session import TRANSITIONS, Session
from popserv.core.state import State
from popserv.core.view import SECONDS_PER_DAY
from popserv.interfaces import Listing
from popserv.logins.sasl.mechanism import SASLUnknownMechanism
from popserv.server.policy import Policy
from tests.support.fuzzing import examples

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nHello\n.dotted line\n",
    b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n",
    b"Subject: three\n\nno final newline",
]

#: What the driver answers Capabilities and Mechanisms with.
CAPABILITIES = ["TOP", "USER", "UIDL"]
MECHANISMS = ["PLAIN", "X-TEST"]

NOW = 1_800_000_000.0


def encoded(message: bytes, body_lines: int | None = None) -> bytes:
    """A message as RETR (or TOP) sends it: CRLF lines, stuffed dots, the ``.`` line."""
    encoder = BodyEncoder(body_lines)
    return encoder.feed(message) + encoder.finish()


# The driver


@define
class Server:
    """What a session reads from its server."""

    policy: Policy
    languages: Languages
    tls: object | None = None


@define
class Account:
    expire_days: int | None = None
    max_listed: int = 0


@define
class SASLSuccess:
    """What the driver's Authenticate answers for an exchange that went right."""

    username: bytes


class Store:
    """A model maildrop: messages with their UIDs, in listing order."""

    def __init__(
        self,
        messages: Iterable[bytes] = MESSAGES,
        received: list[float] | None = None,
        seen: list[bool] | None = None,
    ) -> None:
        self.messages = [(f"m{i}", m) for i, m in enumerate(messages, 1)]
        self.received = received
        self.seen = seen

    def listing(self) -> Listing:
        return Listing(
            uids=[uid for uid, _ in self.messages],
            sizes=[wire_size(m) for _, m in self.messages],
            received=self.received,
            seen=self.seen,
        )

    def contents(self) -> list[bytes]:
        return [m for _, m in self.messages]

    def remove(self, indexes: Iterable[int]) -> None:
        gone = set(indexes)
        self.messages = [m for i, m in enumerate(self.messages) if i not in gone]
        if self.received is not None:
            self.received = [r for i, r in enumerate(self.received) if i not in gone]
        if self.seen is not None:
            self.seen = [s for i, s in enumerate(self.seen) if i not in gone]


class Driver:
    """
    Runs a :class:`Session` synchronously: feeds it one line at a time and
    performs each effect against a :class:`Store`, recording what a test
    may want to look at.  A line fed after a Close, or an effect after
    one, fails the test.
    """

    def __init__(
        self,
        messages: Iterable[bytes] = MESSAGES,
        *,
        store: Store | None = None,
        policy: Policy | None = None,
        languages: Languages | None = None,
        tls: object | None = None,
        secure: bool = False,
        local: bool = True,
        apop_offered: bool = False,
        expire_days: int | None = None,
        max_listed: int = 0,
        passwords: dict[bytes, bytes] | None = None,
    ) -> None:
        self.store = Store(messages) if store is None else store
        self.server = Server(
            policy or Policy(hostname="pop.example.org"), languages or Languages(), tls
        )
        self.passwords = {b"alice": b"secret"} if passwords is None else passwords
        self.account = Account(expire_days, max_listed)
        self.now = NOW
        self.session = Session(
            self.server, secure=secure, local=local, apop_offered=apop_offered, now=lambda: self.now
        )
        self.greeting = self.session.greeting()
        self.closed = False
        #: The effects of the last command line, in order.
        self.effects: list[Any] = []
        self.penalised: list[tuple[object, str]] = []
        self.logged: list[pop3.Log] = []
        self.commits: list[pop3.Commit] = []
        self.tls_started = 0
        #: Set to make the next effects fail.
        self.fail_commit = False
        self.refuse_login: errors.PopError | None = None
        self.fail_message: errors.PopError | None = None
        self.listing: Listing | None = None

    def send(self, line: wire.Line) -> bytes:
        """Run one command line; return what the session sent."""
        if self.closed:
            raise AssertionError(f"{line!r} fed to a closed session")
        steps = self.session.receive(line)
        self.effects = []
        out: list[bytes] = []
        result: Any = None
        failure: BaseException | None = None
        if isinstance(steps, tuple):
            for effect in steps:
                if self.closed:
                    raise AssertionError(f"{effect!r} after Close")
                self.effects.append(effect)
                self._perform(effect, out)
            return b"".join(out)
        while True:
            try:
                effect = steps.send(result) if failure is None else steps.throw(failure)
            except StopIteration:
                break
            if self.closed:
                raise AssertionError(f"{effect!r} after Close")
            self.effects.append(effect)
            try:
                result, failure = self._perform(effect, out), None
            except Exception as e:
                result, failure = None, e
        return b"".join(out)

    def kinds(self) -> list[type]:
        """The types of the last command's effects."""
        return [type(e) for e in self.effects]

    def login(self) -> bytes:
        self.send(b"USER alice")
        return self.send(b"PASS secret")

    def _perform(self, effect: Any, out: list[bytes]) -> Any:
        match effect:
            case pop3.Send(data):
                out.append(data)
            case pop3.Stream(chunks):
                out.append(b"".join(chunks))
            case pop3.Close():
                self.closed = True
            case pop3.Log():
                self.logged.append(effect)
            case pop3.StartTLS():
                self.tls_started += 1
            case pop3.Capabilities():
                return list(CAPABILITIES)
            case pop3.Mechanisms():
                return list(MECHANISMS)
            case pop3.ChooseMechanism(name):
                if name not in MECHANISMS:
                    raise SASLUnknownMechanism()
                return name
            case pop3.BeginAttempt():
                return None
            case pop3.Authenticate(mechanism, initial):
                # "user:password" as the initial response, checked here.
                user, _, password = (initial or b"").partition(b":")
                if self.passwords.get(user) != password:
                    raise Rejected(f"({mechanism})", "wrong password")
                return SASLSuccess(user)
            case pop3.LogIn(login):
                return self._log_in(login)
            case pop3.Penalise(user, reason):
                self.penalised.append((user, reason))
            case pop3.OpenMaildrop():
                self.listing = self.store.listing()
                return self.listing, self.account
            case pop3.LoggedIn():
                pass
            case pop3.SendMessage(index, encoder, text, listed):
                if self.fail_message is not None:
                    raise self.fail_message
                assert self.listing is not None
                assert listed == self.listing.sizes[index], (listed, index)
                _, message = self.store.messages[index]
                body = encoder.feed(message) + encoder.finish()
                out.append(wire.ok(text) + body)
                return len(body)
            case pop3.Commit(deleted, _):
                self.commits.append(effect)
                if self.fail_commit:
                    raise errors.CommitFailed()
                self.store.remove(deleted)
            case _:
                raise AssertionError(f"unknown effect {effect!r}")
        return None

    def _log_in(self, login: object) -> bytes:
        if self.refuse_login is not None:
            raise self.refuse_login
        match login:
            case pop3.PasswordLogin(username, password):
                right = self.passwords.get(username) == password
            case pop3.APOPLogin(username, timestamp, digest):
                password = self.passwords.get(username)
                right = (
                    password is not None
                    and md5(timestamp + password).hexdigest().encode() == digest.lower()
                )
            case SASLSuccess(username):
                right = True
            case _:
                raise AssertionError(f"unknown login {login!r}")
        if not right:
            raise Rejected(username, "wrong password")
        return username


def err(error: errors.PopError) -> bytes:
    return wire.err(error)


BAD_STATE = err(errors.BadState())
UNKNOWN = err(errors.UnknownCommand())
AUTH_FAILED = err(errors.AuthFailed())
TOO_MANY_BAD = err(errors.TooManyBadCommands())
TOTAL = sum(wire_size(m) for m in MESSAGES)


# The table


class StateTableTests(SynchronousTestCase):
    def test_grammar_and_table_name_the_same_verbs(self):
        """Every verb the parser knows is run in some state, and every verb run is parsed."""
        run = {verb for table in TRANSITIONS.values() for verb in table}
        self.assertEqual(run, set(wire.ARGUMENTS))

    def test_table_covers_rfc1939(self):
        authorization = {"CAPA", "USER", "APOP", "AUTH", "STLS", "UTF8", "LANG", "QUIT"}
        self.assertEqual(set(TRANSITIONS[State.AUTHORIZATION]), authorization)
        self.assertEqual(set(TRANSITIONS[State.USER_GIVEN]), authorization | {"PASS"})
        self.assertEqual(
            set(TRANSITIONS[State.TRANSACTION]),
            {"CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "LANG", "QUIT"},
        )
        self.assertEqual(TRANSITIONS[State.UPDATE], {})

    def test_where_commands_lead(self):
        """Logins lead to TRANSACTION, USER to USER_GIVEN, QUIT in TRANSACTION to UPDATE."""
        for verb in ("APOP", "AUTH"):
            for state in (State.AUTHORIZATION, State.USER_GIVEN):
                self.assertEqual(TRANSITIONS[state][verb].after, State.TRANSACTION)
        self.assertEqual(TRANSITIONS[State.USER_GIVEN]["PASS"].after, State.TRANSACTION)
        self.assertEqual(TRANSITIONS[State.AUTHORIZATION]["USER"].after, State.USER_GIVEN)
        self.assertEqual(TRANSITIONS[State.TRANSACTION]["QUIT"].entering, State.UPDATE)
        for verb, transition in TRANSITIONS[State.TRANSACTION].items():
            if verb != "QUIT":
                self.assertEqual((transition.entering, transition.after), (None, None), verb)


# AUTHORIZATION


class GreetingTests(SynchronousTestCase):
    def timestamp(self, **kwargs: Any) -> bytes:
        driver = Driver(**kwargs)
        self.assertTrue(driver.greeting.startswith(b"+OK POP3 server ready"))
        self.assertTrue(driver.greeting.endswith(b"\r\n"))
        return driver.session.timestamp

    def test_timestamp_when_apop_offered_and_allowed(self):
        stamp = self.timestamp(apop_offered=True)
        self.assertRegex(stamp, rb"^<[0-9a-f]{32}@pop\.example\.org>$")
        self.assertNotEqual(stamp, self.timestamp(apop_offered=True))

    def test_timestamp_in_the_greeting(self):
        driver = Driver(apop_offered=True)
        self.assertEqual(
            driver.greeting, b"+OK POP3 server ready " + driver.session.timestamp + b"\r\n"
        )

    def test_no_timestamp_when_not_offered(self):
        self.assertEqual(self.timestamp(apop_offered=False), b"")
        self.assertEqual(Driver().greeting, b"+OK POP3 server ready\r\n")

    def test_no_timestamp_where_apop_is_not_allowed(self):
        """A remote peer in clear: APOP only with allow_cleartext_apop (or _auth)."""
        self.assertEqual(self.timestamp(apop_offered=True, local=False), b"")
        for allowed in ("allow_cleartext_apop", "allow_cleartext_auth"):
            policy = Policy(hostname="h", **{allowed: True})
            self.assertNotEqual(
                self.timestamp(apop_offered=True, local=False, policy=policy), b"", allowed
            )
        self.assertNotEqual(self.timestamp(apop_offered=True, local=False, secure=True), b"")


class UserPassTests(SynchronousTestCase):
    def test_good_login(self):
        """USER, PASS: TRANSACTION, with the maildrop's count and octets."""
        d = Driver()
        self.assertEqual(d.send(b"USER alice"), b"+OK Send PASS\r\n")
        self.assertIs(d.session.state, State.USER_GIVEN)
        self.assertEqual(
            d.send(b"PASS secret"), b"+OK Logged in, 3 messages (%d octets)\r\n" % TOTAL
        )
        self.assertIs(d.session.state, State.TRANSACTION)
        self.assertEqual(
            d.kinds(),
            [pop3.BeginAttempt, pop3.LogIn, pop3.OpenMaildrop, pop3.LoggedIn, pop3.Send],
        )
        self.assertEqual(d.effects[1], pop3.LogIn(pop3.PasswordLogin(b"alice", b"secret")))
        self.assertEqual(d.effects[3], pop3.LoggedIn(b"alice"))

    def test_empty_maildrop(self):
        d = Driver([])
        self.assertEqual(d.login(), b"+OK Logged in, 0 messages (0 octets)\r\n")
        self.assertEqual(d.send(b"STAT"), b"+OK 0 0\r\n")
        self.assertEqual(d.send(b"LIST"), b"+OK 0 messages (0 octets)\r\n.\r\n")

    def test_user_refused_in_clear_from_a_remote_peer(self):
        """No password in clear over a network: USER is refused before PASS is sent."""
        d = Driver(local=False)
        self.assertEqual(d.send(b"USER alice"), err(errors.TLSRequired()))
        self.assertTrue(err(errors.TLSRequired()).startswith(b"-ERR [AUTH] "))
        self.assertIs(d.session.state, State.AUTHORIZATION)
        self.assertIsNone(d.session.user)
        self.assertEqual(d.send(b"PASS secret"), BAD_STATE)

    def test_user_allowed_under_tls_locally_or_by_policy(self):
        for kwargs in (
            {"local": False, "secure": True},
            {"local": True},
            {"local": False, "policy": Policy(hostname="h", allow_cleartext_auth=True)},
        ):
            d = Driver(**kwargs)
            self.assertEqual(d.send(b"USER alice"), b"+OK Send PASS\r\n", kwargs)
            self.assertTrue(d.send(b"PASS secret").startswith(b"+OK Logged in"), kwargs)

    def test_pass_without_user(self):
        """PASS before USER is not valid in this state, and counts as a bad command."""
        d = Driver()
        self.assertEqual(d.send(b"PASS secret"), BAD_STATE)
        self.assertEqual(d.kinds(), [pop3.Send])
        self.assertIs(d.session.state, State.AUTHORIZATION)
        self.assertEqual(d.session.bad_commands, 1)

    def test_pass_uses_the_user_up(self):
        d = Driver()
        d.send(b"USER alice")
        self.assertEqual(d.send(b"PASS wrong"), AUTH_FAILED)
        self.assertEqual(d.send(b"PASS secret"), BAD_STATE)

    def test_the_last_user_counts(self):
        d = Driver(passwords={b"alice": b"secret", b"bob": b"other"})
        d.send(b"USER alice")
        self.assertEqual(d.send(b"USER bob"), b"+OK Send PASS\r\n")
        self.assertTrue(d.send(b"PASS other").startswith(b"+OK Logged in"))

    def test_password_keeps_spaces(self):
        d = Driver(passwords={b"alice": b" two words "})
        d.send(b"USER alice")
        self.assertTrue(d.send(b"PASS  two words ").startswith(b"+OK Logged in"))

    def test_rejected_login_penalised_then_answered(self):
        """Penalise comes before the -ERR [AUTH]; the failure is counted; AUTHORIZATION again."""
        d = Driver()
        d.send(b"USER alice")
        self.assertEqual(d.send(b"PASS wrong"), AUTH_FAILED)
        self.assertEqual(d.kinds(), [pop3.BeginAttempt, pop3.LogIn, pop3.Penalise, pop3.Send])
        self.assertEqual(d.penalised, [(b"alice", "wrong password")])
        self.assertEqual(d.session.failures, 1)
        self.assertIs(d.session.state, State.AUTHORIZATION)
        self.assertFalse(d.closed)

    def test_the_last_failure_closes(self):
        """The max_auth_failures-th failed login closes, with its own -ERR [AUTH]."""
        d = Driver(policy=Policy(hostname="h", max_auth_failures=3))
        for _ in range(2):
            d.send(b"USER alice")
            self.assertEqual(d.send(b"PASS wrong"), AUTH_FAILED)
            self.assertFalse(d.closed)
        d.send(b"USER nobody")
        self.assertEqual(d.send(b"PASS secret"), err(errors.TooManyFailures()))
        self.assertTrue(err(errors.TooManyFailures()).startswith(b"-ERR [AUTH] "))
        self.assertEqual(d.kinds()[-3:], [pop3.Penalise, pop3.Send, pop3.Close])
        self.assertTrue(d.closed)
        self.assertEqual(d.session.failures, 3)
        self.assertRaises(AssertionError, d.send, b"USER alice")

    def test_success_forgets_failures(self):
        d = Driver()
        d.send(b"USER alice")
        d.send(b"PASS wrong")
        d.login()
        self.assertEqual(d.session.failures, 0)

    def test_refused_login_is_not_a_failure(self):
        """A login refused for another reason (the maildrop is in use): its -ERR, no penalty."""
        d = Driver()
        d.refuse_login = errors.MailboxInUse()
        d.send(b"USER alice")
        self.assertEqual(d.send(b"PASS secret"), err(errors.MailboxInUse()))
        self.assertEqual(d.session.failures, 0)
        self.assertEqual(d.penalised, [])
        self.assertIs(d.session.state, State.AUTHORIZATION)
        d.refuse_login = None
        self.assertTrue(d.login().startswith(b"+OK Logged in"))

    def test_quit(self):
        d = Driver()
        d.send(b"USER alice")
        self.assertEqual(d.send(b"QUIT"), b"+OK Bye\r\n")
        self.assertEqual(d.kinds(), [pop3.Send, pop3.Close])
        self.assertEqual(d.commits, [])

    def test_transaction_commands_refused(self):
        d = Driver(policy=Policy(hostname="h", max_bad_commands=100))
        for line in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL"):
            self.assertEqual(d.send(line), BAD_STATE, line)
            self.assertIs(d.session.state, State.AUTHORIZATION)

    def test_capa(self):
        """CAPA lists what the driver answers, in every state."""
        d = Driver()
        expected = b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n.\r\n"
        self.assertEqual(d.send(b"CAPA"), expected)
        self.assertEqual(d.kinds(), [pop3.Capabilities, pop3.Send, pop3.Stream])
        d.login()
        self.assertEqual(d.send(b"CAPA"), expected)


class APOPTests(SynchronousTestCase):
    def digest(self, driver: Driver, password: bytes = b"secret") -> bytes:
        return md5(driver.session.timestamp + password).hexdigest().encode()

    def test_apop(self):
        d = Driver(apop_offered=True)
        out = d.send(b"APOP alice " + self.digest(d))
        self.assertEqual(out, b"+OK Logged in, 3 messages (%d octets)\r\n" % TOTAL)
        self.assertEqual(
            d.effects[1],
            pop3.LogIn(pop3.APOPLogin(b"alice", d.session.timestamp, self.digest(d))),
        )
        self.assertIs(d.session.state, State.TRANSACTION)

    def test_wrong_digest(self):
        d = Driver(apop_offered=True)
        self.assertEqual(d.send(b"APOP alice " + self.digest(d, b"x")), err(errors.APOPFailed()))
        self.assertEqual(d.session.failures, 1)
        self.assertIn(pop3.Penalise, d.kinds())

    def test_malformed_digest_is_a_failed_login(self):
        """Not 32 hex digits: a failed login, penalised, without asking the checker."""
        d = Driver(apop_offered=True)
        self.assertEqual(d.send(b"APOP alice nothex"), err(errors.APOPFailed()))
        self.assertEqual(d.kinds(), [pop3.BeginAttempt, pop3.Penalise, pop3.Send])
        self.assertEqual(d.penalised, [(b"alice", "malformed APOP digest")])

    def test_without_a_timestamp(self):
        d = Driver(apop_offered=False)
        self.assertEqual(d.send(b"APOP alice " + b"0" * 32), err(errors.APOPUnavailable()))
        self.assertEqual(d.session.failures, 0)

    def test_apop_uses_a_user_up(self):
        d = Driver(apop_offered=True)
        d.send(b"USER alice")
        d.send(b"APOP alice " + b"0" * 32)
        self.assertIs(d.session.state, State.AUTHORIZATION)
        self.assertEqual(d.send(b"PASS secret"), BAD_STATE)


class AuthTests(SynchronousTestCase):
    def test_listing(self):
        d = Driver()
        self.assertEqual(
            d.send(b"AUTH"), b"+OK Supported mechanisms follow\r\nPLAIN\r\nX-TEST\r\n.\r\n"
        )
        self.assertIs(d.session.state, State.AUTHORIZATION)

    def test_login(self):
        d = Driver()
        self.assertTrue(d.send(b"auth x-test alice:secret").startswith(b"+OK Logged in"))
        self.assertEqual(
            d.kinds()[:4],
            [pop3.ChooseMechanism, pop3.BeginAttempt, pop3.Authenticate, pop3.LogIn],
        )
        self.assertEqual(d.effects[0], pop3.ChooseMechanism("X-TEST"))
        self.assertEqual(d.effects[2], pop3.Authenticate("X-TEST", b"alice:secret"))
        self.assertIs(d.session.state, State.TRANSACTION)

    def test_rejected(self):
        d = Driver()
        self.assertEqual(d.send(b"AUTH PLAIN alice:wrong"), AUTH_FAILED)
        self.assertEqual(d.penalised, [("(PLAIN)", "wrong password")])
        self.assertEqual(d.session.failures, 1)
        self.assertIs(d.session.state, State.AUTHORIZATION)

    def test_unknown_mechanism(self):
        d = Driver()
        self.assertEqual(d.send(b"AUTH NOPE"), err(SASLUnknownMechanism()))
        self.assertEqual(d.session.failures, 0)
        self.assertIs(d.session.state, State.AUTHORIZATION)


# TRANSACTION


class TransactionTests(SynchronousTestCase):
    def setUp(self):
        self.d = Driver(policy=Policy(hostname="h", max_bad_commands=10**6))
        self.d.login()

    def assertRefused(self, line: bytes, error: errors.PopError) -> None:
        """``line`` gets ``error``'s -ERR and changes nothing."""
        session = self.d.session
        before = (session.state, session.maildrop.stat(), session.maildrop.deleted_indexes())
        self.assertEqual(self.d.send(line), err(error), line)
        after = (session.state, session.maildrop.stat(), session.maildrop.deleted_indexes())
        self.assertEqual(after, before, line)
        self.assertFalse(self.d.closed)

    def test_stat_list_uidl(self):
        d = self.d
        self.assertEqual(d.send(b"STAT"), b"+OK 3 %d\r\n" % TOTAL)
        sizes = [wire_size(m) for m in MESSAGES]
        self.assertEqual(
            d.send(b"LIST"),
            b"+OK 3 messages (%d octets)\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n" % (TOTAL, *sizes),
        )
        self.assertEqual(d.send(b"LIST 2"), b"+OK 2 %d\r\n" % sizes[1])
        self.assertEqual(
            d.send(b"UIDL"), b"+OK Unique-ID listing follows\r\n1 m1\r\n2 m2\r\n3 m3\r\n.\r\n"
        )
        self.assertEqual(d.send(b"UIDL 3"), b"+OK 3 m3\r\n")

    def test_numbers_out_of_range(self):
        """0 and numbers past the end: no such message, for every command that takes one."""
        for n in (b"0", b"00", b"4", b"999999999999"):
            for verb in (b"RETR", b"DELE", b"LIST", b"UIDL"):
                self.assertRefused(verb + b" " + n, errors.NoSuchMessage())
            self.assertRefused(b"TOP " + n + b" 1", errors.NoSuchMessage())

    def test_bad_arguments(self):
        for line in (b"RETR", b"RETR x", b"DELE -1", b"LIST 1 2", b"TOP 1", b"STAT 1", b"NOOP x"):
            self.assertRefused(line, errors.BadArguments())

    def test_dele(self):
        """A deleted message keeps its number, leaves the listings, and cannot be used."""
        d = self.d
        self.assertEqual(d.send(b"DELE 2"), b"+OK Message 2 deleted\r\n")
        self.assertIs(d.session.state, State.TRANSACTION)
        rest = TOTAL - wire_size(MESSAGES[1])
        self.assertEqual(d.send(b"STAT"), b"+OK 2 %d\r\n" % rest)
        self.assertEqual(
            d.send(b"LIST"),
            b"+OK 2 messages (%d octets)\r\n1 %d\r\n3 %d\r\n.\r\n"
            % (rest, wire_size(MESSAGES[0]), wire_size(MESSAGES[2])),
        )
        self.assertEqual(d.send(b"UIDL"), b"+OK Unique-ID listing follows\r\n1 m1\r\n3 m3\r\n.\r\n")
        for line in (b"DELE 2", b"RETR 2", b"TOP 2 0", b"LIST 2", b"UIDL 2"):
            self.assertRefused(line, errors.MessageDeleted())
        self.assertEqual(d.send(b"UIDL 3"), b"+OK 3 m3\r\n")

    def test_dele_everything(self):
        d = self.d
        for n in (3, 1, 2):
            d.send(b"DELE %d" % n)
        self.assertEqual(d.send(b"STAT"), b"+OK 0 0\r\n")
        self.assertEqual(d.send(b"UIDL"), b"+OK Unique-ID listing follows\r\n.\r\n")

    def test_rset(self):
        d = self.d
        d.send(b"DELE 1")
        d.send(b"DELE 3")
        self.assertEqual(d.send(b"RSET"), b"+OK 3 messages (%d octets)\r\n" % TOTAL)
        self.assertEqual(
            d.send(b"UIDL"), b"+OK Unique-ID listing follows\r\n1 m1\r\n2 m2\r\n3 m3\r\n.\r\n"
        )
        self.assertEqual(d.send(b"DELE 1"), b"+OK Message 1 deleted\r\n")

    def test_retr_and_top(self):
        d = self.d
        for n, message in enumerate(MESSAGES, 1):
            self.assertEqual(
                d.send(b"RETR %d" % n), b"+OK %d octets\r\n" % wire_size(message) + encoded(message)
            )
            self.assertEqual(d.effects[0].listed, wire_size(message))
            self.assertEqual(
                d.send(b"TOP %d 1" % n), b"+OK Top of message follows\r\n" + encoded(message, 1)
            )
        self.assertIn(b"\r\n..dotted line\r\n", d.send(b"RETR 1"))

    def test_noop(self):
        self.assertEqual(self.d.send(b"NOOP"), b"+OK\r\n")

    def test_login_commands_refused(self):
        for line in (
            b"USER alice",
            b"PASS secret",
            b"APOP a " + b"0" * 32,
            b"AUTH",
            b"STLS",
            b"UTF8",
        ):
            self.assertRefused(line, errors.BadState())

    def test_failed_retr_is_not_retrieved(self):
        """A message the store could not send is not a retrieval: EXPIRE 0 keeps it."""
        d = Driver(expire_days=0)
        d.login()
        d.fail_message = errors.MessageGone()
        self.assertEqual(d.send(b"RETR 1"), err(errors.MessageGone()))
        self.assertIs(d.session.state, State.TRANSACTION)
        d.fail_message = None
        d.send(b"QUIT")
        self.assertEqual(d.commits, [pop3.Commit([], [])])
        self.assertEqual(d.store.contents(), MESSAGES)


class MaxListedTests(SynchronousTestCase):
    """``--max-listed``: the session sees the newest messages only, numbered from 1."""

    def driver(self, **kw: Any) -> Driver:
        d = Driver([b"%d\n" % n for n in range(1, 11)], max_listed=3, **kw)
        d.login()
        return d

    def test_numbered_from_one(self):
        """The last 3 of 10 are 1 to 3, with their own UIDLs, sizes and bodies."""
        d = self.driver()
        self.assertEqual(d.send(b"STAT"), b"+OK 3 10\r\n")
        self.assertEqual(
            d.send(b"UIDL"), b"+OK Unique-ID listing follows\r\n1 m8\r\n2 m9\r\n3 m10\r\n.\r\n"
        )
        self.assertEqual(
            d.send(b"LIST"), b"+OK 3 messages (10 octets)\r\n1 3\r\n2 3\r\n3 4\r\n.\r\n"
        )
        self.assertEqual(d.send(b"RETR 1"), b"+OK 3 octets\r\n8\r\n.\r\n")
        self.assertEqual(d.send(b"TOP 3 0"), b"+OK Top of message follows\r\n10\r\n.\r\n")
        self.assertEqual(d.send(b"UIDL 2"), b"+OK 2 m9\r\n")

    def test_beyond_the_cap(self):
        """Numbers past the cap are no such message, as past the end of a maildrop."""
        d = self.driver()
        for line in (b"RETR 4", b"DELE 4", b"LIST 4", b"UIDL 10", b"TOP 4 0"):
            self.assertEqual(d.send(line), err(errors.NoSuchMessage()), line)

    def test_dele_and_quit(self):
        """DELE 1 deletes the 8th message of the store; the 7 older stay."""
        d = self.driver()
        d.send(b"DELE 1")
        self.assertEqual(d.send(b"STAT"), b"+OK 2 7\r\n")
        self.assertEqual(d.send(b"QUIT"), b"+OK Bye, 1 deleted, 9 left\r\n")
        self.assertEqual(d.commits, [pop3.Commit([7], [])])
        self.assertEqual(d.store.contents(), [b"%d\n" % n for n in (1, 2, 3, 4, 5, 6, 7, 9, 10)])
        self.assertEqual((d.session.tally.listed, d.session.tally.left), (3, 9))

    def test_expire_leaves_the_rest(self):
        """EXPIRE 1 day: only messages shown expire, however old and seen the rest are."""
        old = NOW - 2 * SECONDS_PER_DAY
        store = Store([b"%d\n" % n for n in range(1, 11)], received=[old] * 10, seen=[True] * 10)
        d = Driver(store=store, expire_days=1, max_listed=3)
        d.login()
        d.send(b"QUIT")
        self.assertEqual(d.commits, [pop3.Commit([7, 8, 9], [])])
        self.assertEqual(len(d.store.contents()), 7)

    def test_cap_at_or_above_the_size(self):
        """A cap the maildrop does not reach changes nothing."""
        for cap in (3, 4, 1000):
            d = Driver(max_listed=cap)
            d.login()
            self.assertEqual(d.send(b"STAT"), b"+OK 3 %d\r\n" % TOTAL)
            self.assertEqual(d.session.tally.listed, 0)


class UpdateTests(SynchronousTestCase):
    def test_quit_commits_the_deletions(self):
        d = Driver()
        d.login()
        d.send(b"DELE 3")
        d.send(b"RETR 2")
        d.send(b"DELE 1")
        self.assertEqual(d.send(b"QUIT"), b"+OK Bye, 2 deleted, 1 left\r\n")
        self.assertIs(d.session.state, State.UPDATE)
        self.assertEqual(d.kinds(), [pop3.Commit, pop3.Send, pop3.Close])
        self.assertEqual(d.commits, [pop3.Commit([0, 2], [1])])
        self.assertEqual(d.store.contents(), [MESSAGES[1]])

    def test_quit_after_rset_deletes_nothing(self):
        d = Driver()
        d.login()
        d.send(b"DELE 1")
        d.send(b"RSET")
        self.assertEqual(d.send(b"QUIT"), b"+OK Bye, 0 deleted, 3 left\r\n")
        self.assertEqual(d.commits, [pop3.Commit([], [])])
        self.assertEqual(d.store.contents(), MESSAGES)

    def test_expire_zero_removes_retrieved(self):
        """EXPIRE 0: what RETR sent is deleted at QUIT; TOP is not a retrieval."""
        d = Driver(expire_days=0)
        d.login()
        d.send(b"RETR 2")
        d.send(b"TOP 3 0")
        d.send(b"RETR 1")
        d.send(b"DELE 1")
        self.assertEqual(d.send(b"QUIT"), b"+OK Bye, 2 deleted, 1 left\r\n")
        self.assertEqual(d.commits, [pop3.Commit([0, 1], [0, 1])])
        self.assertEqual(d.store.contents(), [MESSAGES[2]])

    def test_expire_days(self):
        """EXPIRE n: retrieved now, or seen before, and delivered n days ago or more."""
        old, new = NOW - 3 * SECONDS_PER_DAY, NOW - 2 * SECONDS_PER_DAY
        store = Store(
            [*MESSAGES, b"x\n"], received=[old, old, new, old], seen=[False, True, True, False]
        )
        d = Driver(store=store, expire_days=3)
        d.login()
        d.send(b"RETR 1")
        d.send(b"RETR 3")
        self.assertEqual(d.send(b"QUIT"), b"+OK Bye, 2 deleted, 2 left\r\n")
        self.assertEqual(d.commits, [pop3.Commit([0, 1], [0, 2])])

    def test_commit_failure(self):
        """The store could not delete: -ERR [SYS/TEMP], and the session closes all the same."""
        d = Driver()
        d.login()
        d.send(b"DELE 1")
        d.fail_commit = True
        self.assertEqual(d.send(b"QUIT"), err(errors.CommitFailed()))
        self.assertTrue(err(errors.CommitFailed()).startswith(b"-ERR [SYS/TEMP] "))
        self.assertEqual(d.kinds(), [pop3.Commit, pop3.Send, pop3.Close])
        self.assertTrue(d.closed)
        self.assertEqual(d.store.contents(), MESSAGES)

    def test_nothing_is_valid_in_update(self):
        """Were a driver to go on after QUIT, every command would be refused."""
        d = Driver()
        d.login()
        d.send(b"QUIT")
        d.closed = False  # a broken driver
        for line in (b"STAT", b"QUIT", b"RSET", b"USER alice"):
            self.assertEqual(d.send(line), BAD_STATE)
            self.assertIs(d.session.state, State.UPDATE)
        self.assertEqual(len(d.commits), 1)


# Bad commands


class BadCommandTests(SynchronousTestCase):
    def test_closes_at_the_limit(self):
        d = Driver(policy=Policy(hostname="h", max_bad_commands=4))
        bad = [b"XYZZY", b"RETR x", b"STAT", wire.TooLong()]
        answers = [UNKNOWN, err(errors.BadArguments()), BAD_STATE]
        for line, answer in zip(bad, answers, strict=False):
            self.assertEqual(d.send(line), answer, line)
            self.assertFalse(d.closed)
        self.assertEqual(d.send(bad[-1]), TOO_MANY_BAD)
        self.assertEqual(d.kinds(), [pop3.Log, pop3.Send, pop3.Close])
        self.assertEqual(d.logged[0].fields, {"count": 4})
        self.assertIn("{peer}", d.logged[0].template)
        self.assertTrue(d.closed)

    def test_too_long(self):
        d = Driver()
        self.assertEqual(d.send(wire.TooLong()), b"-ERR Line too long\r\n")

    def test_a_good_command_resets_the_count(self):
        d = Driver(policy=Policy(hostname="h", max_bad_commands=3))
        for _ in range(2):
            self.assertEqual(d.send(b"XYZZY"), UNKNOWN)
        d.send(b"CAPA")
        self.assertEqual(d.session.bad_commands, 0)
        for _ in range(2):
            self.assertEqual(d.send(b"XYZZY"), UNKNOWN)
        self.assertFalse(d.closed)
        self.assertEqual(d.send(b"XYZZY"), TOO_MANY_BAD)

    def test_a_command_that_fails_resets_the_count(self):
        """A well-formed command that fails (no such message, failed login) is not a bad one."""
        d = Driver(policy=Policy(hostname="h", max_bad_commands=2))
        d.send(b"XYZZY")
        d.send(b"USER alice")
        d.send(b"XYZZY")
        self.assertEqual(d.send(b"PASS wrong"), AUTH_FAILED)
        d.send(b"XYZZY")
        d.login()
        d.send(b"XYZZY")
        self.assertEqual(d.send(b"RETR 9"), err(errors.NoSuchMessage()))
        self.assertEqual(d.send(b"XYZZY"), UNKNOWN)
        self.assertFalse(d.closed)

    def test_a_bad_line_changes_no_state(self):
        d = Driver(policy=Policy(hostname="h", max_bad_commands=100))
        d.send(b"USER alice")
        d.send(b"XYZZY")
        self.assertIs(d.session.state, State.USER_GIVEN)
        d.send(b"PASS secret")
        d.send(b"DELE 1")
        for line in (b"XYZZY", b"USER alice", wire.TooLong(), b"DELE"):
            d.send(line)
            self.assertIs(d.session.state, State.TRANSACTION)
        self.assertEqual(d.session.maildrop.deleted_indexes(), [0])


# STLS, UTF8, LANG


GERMAN = Language(
    "de",
    "Deutsch",
    {
        "Send PASS": "PASS senden",
        "Language changed": "Sprache gewechselt",
        "Logged in, {count} messages ({octets} octets)": "Angemeldet, {count} Nachrichten",
        "Command not valid in this state": "Nicht in diesem Zustand",
    },
)


class STLSTests(SynchronousTestCase):
    def driver(self, **kwargs: Any) -> Driver:
        return Driver(
            tls=object(), languages=Languages([Language("en", "English"), GERMAN]), **kwargs
        )

    def test_stls(self):
        d = self.driver()
        self.assertTrue(d.session.stls_offered())
        self.assertEqual(d.send(b"STLS"), b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(d.kinds(), [pop3.Send, pop3.StartTLS])
        self.assertEqual(d.tls_started, 1)
        self.assertTrue(d.session.secure)
        self.assertFalse(d.session.stls_offered())
        self.assertEqual(d.send(b"STLS"), err(errors.TLSActive()))
        self.assertEqual(d.tls_started, 1)

    def test_nothing_learned_in_clear_carries_over(self):
        """STLS forgets the USER, the failed logins and the language."""
        d = self.driver(policy=Policy(hostname="h", max_auth_failures=2))
        d.send(b"USER alice")
        d.send(b"PASS wrong")
        d.send(b"LANG de")
        d.send(b"USER alice")
        self.assertEqual(d.session.failures, 1)
        d.send(b"STLS")
        self.assertIs(d.session.state, State.AUTHORIZATION)
        self.assertIsNone(d.session.user)
        self.assertEqual(d.session.failures, 0)
        self.assertEqual(d.session.language.tag, "en")
        self.assertEqual(d.send(b"PASS secret"), BAD_STATE)
        d.send(b"USER alice")
        self.assertEqual(d.send(b"PASS wrong"), AUTH_FAILED)
        self.assertFalse(d.closed)

    def test_refused_after_utf8(self):
        d = self.driver()
        self.assertEqual(d.send(b"UTF8"), b"+OK UTF8 enabled\r\n")
        self.assertTrue(d.session.utf8)
        self.assertEqual(d.send(b"STLS"), err(errors.TLSAfterUTF8()))
        self.assertEqual(d.tls_started, 0)
        self.assertFalse(d.session.secure)

    def test_refused_without_a_certificate(self):
        d = Driver(tls=None)
        self.assertFalse(d.session.stls_offered())
        self.assertEqual(d.send(b"STLS"), err(errors.TLSUnavailable()))
        self.assertEqual(d.tls_started, 0)
        self.assertIs(d.session.state, State.AUTHORIZATION)
        self.assertTrue(d.login().startswith(b"+OK"))

    def test_refused_after_login(self):
        d = self.driver()
        d.login()
        self.assertFalse(d.session.stls_offered())
        self.assertEqual(d.send(b"STLS"), BAD_STATE)
        self.assertEqual(d.tls_started, 0)

    def test_allows_user_for_a_remote_peer(self):
        d = self.driver(local=False)
        self.assertEqual(d.send(b"USER alice"), err(errors.TLSRequired()))
        d.send(b"STLS")
        self.assertEqual(d.send(b"USER alice"), b"+OK Send PASS\r\n")


class LangTests(SynchronousTestCase):
    def setUp(self):
        self.d = Driver(languages=Languages([Language("en", "English"), GERMAN]))

    def test_listing(self):
        self.assertEqual(
            self.d.send(b"LANG"),
            b"+OK Language listing follows\r\nen English\r\nde Deutsch\r\n.\r\n",
        )

    def test_switch(self):
        """Texts come in the new language, the LANG answer first; -ERR texts too, codes kept."""
        d = self.d
        self.assertEqual(d.send(b"LANG de-CH"), b"+OK de Sprache gewechselt\r\n")
        self.assertEqual(d.send(b"USER alice"), b"+OK PASS senden\r\n")
        self.assertEqual(d.send(b"PASS secret"), b"+OK Angemeldet, 3 Nachrichten\r\n")
        self.assertEqual(d.send(b"STAT"), b"+OK 3 %d\r\n" % TOTAL)
        self.assertEqual(d.send(b"USER x"), b"-ERR Nicht in diesem Zustand\r\n")
        self.assertEqual(d.send(b"RETR 9"), err(errors.NoSuchMessage()))
        self.assertEqual(d.send(b"LANG *"), b"+OK en Language changed\r\n")
        self.assertEqual(d.send(b"USER x"), BAD_STATE)

    def test_unknown(self):
        self.assertEqual(self.d.send(b"LANG fr"), err(errors.UnknownLanguage()))
        self.assertEqual(self.d.session.language.tag, "en")


class TallyTests(SynchronousTestCase):
    """What a session counts for its summary line."""

    def test_counts(self):
        d = Driver()
        d.login()
        retr = d.send(b"RETR 1")
        d.send(b"TOP 2 0")
        d.send(b"DELE 3")
        d.send(b"QUIT")
        tally, sizes = d.session.tally, [wire_size(m) for m in MESSAGES]
        body = len(retr) - len(retr.split(b"\r\n", 1)[0]) - 2
        self.assertEqual((tally.retr, tally.retr_octets, tally.top), (1, body, 1))
        self.assertEqual((tally.deleted, tally.deleted_octets), (1, sizes[2]))
        self.assertEqual((tally.left, tally.left_octets), (len(sizes) - 1, sum(sizes) - sizes[2]))
        self.assertEqual((d.session.mechanism, d.session.ended), ("USER", "QUIT"))


class UserGivenTests(SynchronousTestCase):
    """
    What keeps a USER's name for PASS.  RFC 1939 has PASS "immediately
    after a successful USER command"; popserv, like Dovecot, lets commands
    that change nothing about the login (CAPA, LANG, UTF8, a refused STLS,
    a bad line) come between, since clients send CAPA there, and forgets the
    name at anything that starts another login or resets the session.
    """

    def test_harmless_commands_keep_the_name(self):
        for between in (b"CAPA", b"LANG", b"UTF8", b"STLS", b"XYZZY"):
            d = Driver()
            d.send(b"USER alice")
            d.send(between)
            self.assertTrue(d.send(b"PASS secret").startswith(b"+OK"), between)

    def test_another_login_forgets_it(self):
        for between in (b"APOP alice " + b"0" * 32, b"AUTH"):
            d = Driver()
            d.send(b"USER alice")
            d.send(between)
            self.assertEqual(d.send(b"PASS secret"), BAD_STATE, between)


# Random sessions against a model


#: The commands RFC 1939 (with CAPA, STLS, UTF8, LANG, AUTH) allows in each state.
VALID = {
    "AUTHORIZATION": {"CAPA", "USER", "APOP", "AUTH", "STLS", "UTF8", "LANG", "QUIT"},
    "USER_GIVEN": {"CAPA", "USER", "PASS", "APOP", "AUTH", "STLS", "UTF8", "LANG", "QUIT"},
    "TRANSACTION": set("CAPA STAT LIST RETR DELE NOOP RSET TOP UIDL LANG QUIT".split()),
}

LINEY = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b" ", b"x", b"Subject: y\n", b"\n\n"]),
    max_size=20,
).map(b"".join)
MESSAGE = st.one_of(LINEY, st.sampled_from(MESSAGES))
#: Message numbers: 0 and past the end included.
NUMBERS = st.integers(0, 6)
BAD_ARGUMENTS = st.sampled_from(
    [b"", b" ", b"-1", b"abc", b"1 2", b"1 ", b" 1", b"+1", b"99999999999999999999", b"\xd9\xa1"]
)


class Sessions(RuleBasedStateMachine):
    """
    Random sessions of valid and invalid commands, right and wrong logins,
    over-long lines and nonsense, on one maildrop across sessions, checked
    against a model of RFC 1939: each answer exactly, when the session
    closes, and what the store holds.
    """

    @initialize(
        messages=st.lists(MESSAGE, max_size=5),
        strict=st.booleans(),
        expire_zero=st.booleans(),
        log_in=st.booleans(),
    )
    def start(self, messages, strict, expire_zero, log_in):
        self.store = Store(messages)
        #: The model of the store: (uid, message) in listing order.
        self.stored = list(self.store.messages)
        # Strict limits close sessions often; lax ones let them run long.
        self.max_failures = 3 if strict else 10**6
        self.max_bad = 5 if strict else 10**6
        self.expire_days = 0 if expire_zero else None
        self.sessions = 1
        self.connect()
        if log_in:
            self.login()

    def connect(self) -> None:
        policy = Policy(
            hostname="pop.example.org",
            max_auth_failures=self.max_failures,
            max_bad_commands=self.max_bad,
        )
        self.driver = Driver(store=self.store, policy=policy, expire_days=self.expire_days)
        self.state = "AUTHORIZATION"
        self.closed = False
        #: The name USER gave, until used up.
        self.given: bytes | None = None
        self.failures = 0
        self.bad = 0
        self.deleted: set[int] = set()
        self.retrieved: set[int] = set()

    # Running a line

    def refusal(self, line: wire.Line) -> errors.PopError | None:
        """The error a bad line gets, or None for a command valid in the model's state."""
        if isinstance(line, wire.TooLong):
            return errors.LineTooLong()
        try:
            command = wire.parse_command(line)
        except errors.PopError as e:
            return e
        if command.verb not in VALID[self.state]:
            return errors.BadState()
        return None

    def command(self, line: wire.Line) -> bytes | None:
        """
        Run ``line``.  A bad one is checked here (its -ERR, or the close at
        the limit) and gives None; a good one gives its answer, unchecked.
        """
        error = self.refusal(line)
        out = self.driver.send(line)
        if error is None:
            self.bad = 0
            return out
        self.bad += 1
        if self.bad >= self.max_bad:
            assert out == TOO_MANY_BAD, (line, out)
            assert self.driver.kinds() == [pop3.Log, pop3.Send, pop3.Close], self.driver.effects
            self.closed = True
        else:
            assert out == wire.err(error), (line, out, error)
            assert not self.driver.closed
        return None

    def expect(self, line: bytes, answer: bytes) -> None:
        out = self.command(line)
        if out is not None:
            assert out == answer, (line, out, answer)

    def live(self) -> list[int]:
        return [n for n in range(1, len(self.stored) + 1) if n not in self.deleted]

    def octets(self, numbers: Iterable[int]) -> int:
        return sum(wire_size(self.stored[n - 1][1]) for n in numbers)

    def number_error(self, number: int) -> bytes | None:
        """The -ERR for a message number in TRANSACTION, None if the message is there."""
        if not 1 <= number <= len(self.stored):
            return err(errors.NoSuchMessage())
        if number in self.deleted:
            return err(errors.MessageDeleted())
        return None

    def message_command(self, line: bytes, number: int, answer: Callable[[], bytes]) -> bool:
        """Run a command on message ``number``; True when it answered ``answer()``."""
        out = self.command(line)
        if out is None:
            return False
        error = self.number_error(number)
        assert out == (answer() if error is None else error), (line, out)
        return error is None

    # Logging in

    @rule(right=st.booleans())
    def user(self, right):
        self.reopen()
        name = b"alice" if right else b"bob"
        if self.command(b"USER " + name) is None:
            return
        assert self.driver.effects == [pop3.Send(b"+OK Send PASS\r\n")]
        self.state, self.given = "USER_GIVEN", name

    @rule(right=st.booleans())
    def password(self, right):
        self.reopen()
        out = self.command(b"PASS " + (b"secret" if right else b"wrong"))
        if out is None:
            return
        kinds = self.driver.kinds()
        if right and self.given == b"alice":
            count, octets = len(self.stored), self.octets(range(1, len(self.stored) + 1))
            assert out == b"+OK Logged in, %d messages (%d octets)\r\n" % (count, octets), out
            assert pop3.LoggedIn in kinds and pop3.Penalise not in kinds, kinds
            self.state, self.failures = "TRANSACTION", 0
            self.deleted, self.retrieved = set(), set()
        else:
            self.failures += 1
            self.state = "AUTHORIZATION"
            assert kinds.index(pop3.Penalise) < kinds.index(pop3.Send), kinds
            if self.failures >= self.max_failures:
                assert out == err(errors.TooManyFailures()), out
                assert kinds[-1] is pop3.Close, kinds
                self.closed = True
            else:
                assert out == AUTH_FAILED, out
        self.given = None

    @rule()
    def login(self):
        """USER and PASS right, as most sessions start (so TRANSACTION gets explored)."""
        self.reopen()
        self.user(True)
        if not self.closed:
            self.password(True)

    @rule()
    def failed_login(self):
        """USER right, PASS wrong: the failed logins add up to the close."""
        self.reopen()
        self.user(True)
        self.password(False)

    # TRANSACTION

    @rule()
    def stat(self):
        self.reopen()
        live = self.live()
        self.expect(b"STAT", b"+OK %d %d\r\n" % (len(live), self.octets(live)))

    @rule(number=st.one_of(st.none(), NUMBERS))
    def list(self, number):
        self.reopen()
        if number is not None:
            self.message_command(
                b"LIST %d" % number,
                number,
                lambda: b"+OK %d %d\r\n" % (number, self.octets([number])),
            )
            return
        live = self.live()
        lines = b"".join(b"%d %d\r\n" % (n, self.octets([n])) for n in live)
        self.expect(
            b"LIST",
            b"+OK %d messages (%d octets)\r\n" % (len(live), self.octets(live)) + lines + b".\r\n",
        )

    @rule(number=st.one_of(st.none(), NUMBERS))
    def uidl(self, number):
        self.reopen()

        def uid(n: int) -> bytes:
            return self.stored[n - 1][0].encode()

        if number is not None:
            self.message_command(
                b"UIDL %d" % number, number, lambda: b"+OK %d %s\r\n" % (number, uid(number))
            )
            return
        lines = b"".join(b"%d %s\r\n" % (n, uid(n)) for n in self.live())
        self.expect(b"UIDL", b"+OK Unique-ID listing follows\r\n" + lines + b".\r\n")

    @rule(number=NUMBERS)
    def retr(self, number):
        self.reopen()

        def answer() -> bytes:
            message = self.stored[number - 1][1]
            return b"+OK %d octets\r\n" % wire_size(message) + encoded(message)

        if self.message_command(b"RETR %d" % number, number, answer):
            self.retrieved.add(number)

    @rule(number=NUMBERS, lines=st.integers(0, 3))
    def top(self, number, lines):
        self.reopen()
        self.message_command(
            b"TOP %d %d" % (number, lines),
            number,
            lambda: b"+OK Top of message follows\r\n" + encoded(self.stored[number - 1][1], lines),
        )

    @rule(number=NUMBERS)
    def dele(self, number):
        self.reopen()
        if self.message_command(
            b"DELE %d" % number, number, lambda: b"+OK Message %d deleted\r\n" % number
        ):
            self.deleted.add(number)

    @rule()
    def rset(self):
        self.reopen()
        count, octets = len(self.stored), self.octets(range(1, len(self.stored) + 1))
        if self.command(b"RSET") is not None:
            assert self.driver.effects == [
                pop3.Send(b"+OK %d messages (%d octets)\r\n" % (count, octets))
            ]
            self.deleted.clear()

    @rule()
    def noop(self):
        self.reopen()
        self.expect(b"NOOP", b"+OK\r\n")

    @rule()
    def capa(self):
        self.reopen()
        self.expect(b"CAPA", b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n.\r\n")

    # Nonsense

    @rule(
        verb=st.sampled_from([b"RETR", b"DELE", b"LIST", b"UIDL", b"TOP", b"TOP 1", b"retr"]),
        argument=BAD_ARGUMENTS,
    )
    def bad_argument(self, verb, argument):
        self.reopen()
        line = verb + b" " + argument
        if self.refusal(line) is not None:
            self.command(line)

    @rule(line=st.binary(max_size=60))
    def garbage(self, line):
        self.reopen()
        if self.refusal(line) is not None:
            self.command(line)

    @rule()
    def too_long(self):
        self.reopen()
        self.command(wire.TooLong())

    # Ends

    @rule(fail=st.booleans())
    def quit(self, fail):
        """QUIT: in TRANSACTION, the DELEted messages (and with EXPIRE 0 the RETRieved), only."""
        self.reopen()
        self.driver.fail_commit = fail
        before = self.state
        out = self.command(b"QUIT")
        assert out is not None
        self.closed = True
        if before != "TRANSACTION":
            assert out == b"+OK Bye\r\n", out
            assert self.driver.kinds() == [pop3.Send, pop3.Close]
            return
        assert self.driver.session.state is State.UPDATE
        expired = self.retrieved - self.deleted if self.expire_days == 0 else set()
        gone = self.deleted | expired
        assert self.driver.commits == [
            pop3.Commit(sorted(n - 1 for n in gone), sorted(n - 1 for n in self.retrieved))
        ], self.driver.commits
        if fail:
            assert out == err(errors.CommitFailed()), out
        else:
            left = len(self.stored) - len(gone)
            assert out == b"+OK Bye, %d deleted, %d left\r\n" % (len(gone), left), out
            self.stored = [m for n, m in enumerate(self.stored, 1) if n not in gone]

    @rule()
    def hang_up(self):
        """The client goes away without QUIT: the driver feeds nothing more, nothing is deleted."""
        self.reopen()
        self.closed = True
        assert self.driver.commits == []

    def reopen(self) -> None:
        """
        A closed session is never fed again: the next rule starts a new
        one on the same store (cheaper for hypothesis than a precondition
        on every rule), logged in every other time so that TRANSACTION
        gets explored.
        """
        if self.closed:
            assert self.driver.closed or not self.driver.commits
            self.connect()
            self.sessions += 1
            if self.sessions % 2:
                self.user(True)
                self.password(True)

    @invariant()
    def agrees_with_the_model(self):
        """The store changes only at QUIT; the session's state, counts and close are the model's."""
        if not hasattr(self, "driver"):
            return
        assert self.store.messages == self.stored, (self.store.messages, self.stored)
        if self.closed:
            return
        assert not self.driver.closed
        session = self.driver.session
        assert session.state.value == self.state, (session.state, self.state)
        assert session.user == self.given
        assert session.failures == self.failures
        assert session.bad_commands == self.bad
        if self.state == "TRANSACTION":
            live = self.live()
            assert session.maildrop.stat() == (len(live), self.octets(live))


class SessionTests(Sessions.TestCase):
    """Random sessions on the pure session."""

    settings = settings(
        max_examples=examples(150, share=5),
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )

    def test_sessions(self):
        """(trial runs ``test*`` methods; hypothesis names its one ``runTest``.)"""
        self.runTest()
