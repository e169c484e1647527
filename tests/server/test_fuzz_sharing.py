"""
Proof by fuzzing, two sessions at once: random interleavings of two POP3
sessions of one user on a real Maildir, with deliveries in between, over
the real protocol objects, checked against a model of ``--maildrop-lock``.

Shared: each session sees the maildrop as it was at its login; RETR of a
message the other session's QUIT removed is an ``-ERR``; a QUIT removes the
messages it deleted that are still there and nothing else; a hang-up
removes nothing.  Exclusive: while one session is logged in, the other's
login gets ``-ERR [IN-USE]``.  ``POPSERV_FUZZ_EXAMPLES`` lengthens the run
as for tests/server/test_fuzz.py.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from attrs import define, field
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from popserv.core import errors, wire
from popserv.core.body import BodyEncoder, wire_size
from popserv.server.factory import POP3Factory
from popserv.server.policy import Policy
from popserv.stores.layout import ensure_maildir
from popserv.stores.maildir import deliver
from tests.support import LOCAL_PEER
from tests.support.fuzzing import stateful_settings
from tests.support.maildirs import _MaildirRealm, maildir_contents

SESSIONS = st.sampled_from((0, 1))
NUMBERS = st.integers(1, 6)


def encoded(message: bytes) -> bytes:
    encoder = BodyEncoder()
    return encoder.feed(message) + encoder.finish()


@define
class Session:
    """One client's connection and what the model expects of it."""

    transport: StringTransport
    protocol: object
    #: Its messages as listed at its login (None: not logged in).
    snapshot: list[bytes] | None = None
    deleted: set[int] = field(factory=set)

    def live(self, number: int) -> bool:
        return (
            self.snapshot is not None
            and 1 <= number <= len(self.snapshot)
            and number not in self.deleted
        )


class TwoSessions(RuleBasedStateMachine):
    """Two sessions of alice and a delivering MTA, against the model."""

    shared = True

    @initialize(count=st.integers(0, 5))
    def start(self, count: int) -> None:
        self.clock = Clock()
        self.sessions: list[Session] = []
        self.path = Path(tempfile.mkdtemp(prefix="popserv-fuzz2-")) / "alice"
        ensure_maildir(self.path)
        self.delivered = 0
        for _ in range(count):
            self.deliver_one()
        self.store = maildir_contents(self.path)
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        policy = Policy(
            hostname="pop.example.org", login_timeout=1e9, idle_timeout=1e9,
            max_auth_failures=10**6, max_bad_commands=10**6,
        )  # fmt: skip
        realm = _MaildirRealm(self.path, shared=self.shared)
        self.factory = POP3Factory(Portal(realm, [checker]), policy, clock=self.clock)
        self.sessions = [self.connect(), self.connect()]

    def contents(self) -> list[bytes] | None:
        """The store in listing order; None while an exclusive session keeps it from us."""
        if not self.shared and any(s.snapshot is not None for s in self.sessions):
            return None
        return maildir_contents(self.path, shared=True)

    def deliver_one(self) -> None:
        self.delivered += 1
        deliver(self.path, self.message(self.delivered))

    @staticmethod
    def message(number: int) -> bytes:
        return b"Message-Id: <%d@fuzz>\n\nbody %d\n" % (number, number)

    def connect(self) -> Session:
        transport = StringTransport(peerAddress=LOCAL_PEER)
        protocol = self.factory.buildProtocol(LOCAL_PEER)
        protocol.makeConnection(transport)
        greeting = transport.value()
        transport.clear()
        assert greeting.startswith(b"+OK "), greeting
        return Session(transport, protocol)

    def command(self, session: Session, line: bytes) -> tuple[bytes, bytes]:
        session.protocol.dataReceived(line + b"\r\n")
        self.clock.pump([1.0] * 35)
        out = session.transport.value()
        session.transport.clear()
        status, sep, rest = out.partition(b"\r\n")
        assert sep and status.startswith((b"+OK", b"-ERR")), (line, out)
        return status, rest

    def other(self, which: int) -> Session:
        return self.sessions[1 - which]

    @rule(which=SESSIONS)
    def login(self, which: int) -> None:
        session = self.sessions[which]
        if session.snapshot is not None:
            return
        listed = self.contents()
        if listed is not None:
            # The listing's order, which the model's deliveries only guessed.
            assert sorted(listed) == sorted(self.store)
            self.store = listed
        self.command(session, b"USER alice")
        status, _ = self.command(session, b"PASS secret")
        if not self.shared and self.other(which).snapshot is not None:
            assert status == wire.err(errors.MailboxInUse()).rstrip(), status
            return
        octets = sum(wire_size(m) for m in self.store)
        assert status == b"+OK Logged in, %d messages (%d octets)" % (len(self.store), octets), (
            status
        )
        session.snapshot = list(self.store)

    @rule(which=SESSIONS)
    def stat(self, which: int) -> None:
        session = self.sessions[which]
        if session.snapshot is None:
            return
        status, _ = self.command(session, b"STAT")
        kept = [m for n, m in enumerate(session.snapshot, 1) if n not in session.deleted]
        assert status == b"+OK %d %d" % (len(kept), sum(wire_size(m) for m in kept)), status

    @rule(which=SESSIONS, number=NUMBERS)
    def retr(self, which: int, number: int) -> None:
        session = self.sessions[which]
        if session.snapshot is None:
            return
        status, body = self.command(session, b"RETR %d" % number)
        if not session.live(number):
            assert status.startswith(b"-ERR"), status
        elif session.snapshot[number - 1] in self.store:
            assert status.startswith(b"+OK"), status
            assert body == encoded(session.snapshot[number - 1]), body
        else:
            assert status == wire.err(errors.MessageGone()).rstrip(), status

    @rule(which=SESSIONS, number=NUMBERS)
    def dele(self, which: int, number: int) -> None:
        session = self.sessions[which]
        if session.snapshot is None:
            return
        status, _ = self.command(session, b"DELE %d" % number)
        if session.live(number):
            assert status.startswith(b"+OK"), status
            session.deleted.add(number)
        else:
            assert status.startswith(b"-ERR"), status

    @rule(which=SESSIONS)
    def rset(self, which: int) -> None:
        session = self.sessions[which]
        if session.snapshot is not None:
            assert self.command(session, b"RSET")[0].startswith(b"+OK")
            session.deleted.clear()

    @rule()
    def deliver(self) -> None:
        self.deliver_one()
        listed = self.contents()
        if listed is None:
            self.store.append(self.message(self.delivered))
            return
        assert len(listed) == len(self.store) + 1, "a delivery changed what was there"
        assert set(self.store) < set(listed), "a delivery changed what was there"
        self.store = listed

    @rule(which=SESSIONS, hang_up=st.booleans())
    def end(self, which: int, hang_up: bool) -> None:
        """QUIT removes what it deleted that is still there; a hang-up removes nothing."""
        session = self.sessions[which]
        if hang_up:
            session.protocol.connectionLost(None)
        else:
            status, _ = self.command(session, b"QUIT")
            assert status.startswith(b"+OK"), status
            if session.snapshot is not None:
                gone = {session.snapshot[n - 1] for n in session.deleted}
                self.store = [m for m in self.store if m not in gone]
            session.protocol.connectionLost(None)
        self.sessions[which] = self.connect()

    @invariant()
    def the_store_is_the_model(self) -> None:
        listed = self.contents() if hasattr(self, "path") else None
        if listed is not None:
            assert sorted(listed) == sorted(self.store)

    def teardown(self) -> None:
        for session in self.sessions if hasattr(self, "sessions") else []:
            session.protocol.connectionLost(None)
        if hasattr(self, "path"):
            shutil.rmtree(self.path.parent, ignore_errors=True)


class ExclusiveTwoSessions(TwoSessions):
    shared = False


class SharedSessionsFuzzTests(TwoSessions.TestCase):
    """Two shared sessions on a real Maildir."""

    settings = stateful_settings(25)

    def test_sessions(self):
        """(trial runs ``test*`` methods; hypothesis names its one ``runTest``.)"""
        self.runTest()


class ExclusiveSessionsFuzzTests(ExclusiveTwoSessions.TestCase):
    """Two sessions with ``--maildrop-lock exclusive`` on a real Maildir."""

    settings = stateful_settings(15)

    def test_sessions(self):
        """(trial runs ``test*`` methods; hypothesis names its one ``runTest``.)"""
        self.runTest()
