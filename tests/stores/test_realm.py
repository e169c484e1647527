"""The default realm: LOGIN-DELAY holds across processes serving one Maildir."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from popserv.core.errors import LoginDelayed
from popserv.interfaces import IMailbox
from popserv.logins.passwords import PasswdFile
from popserv.stores.layout import Layout, ensure_maildir
from popserv.stores.realm import MaildirRealm


class SettableClock:
    """The real reactor's threads, with a clock the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class LoginDelayTests(TestCase):
    def setUp(self) -> None:
        self.layout = Layout.create(self.mktemp())
        self.layout.data_dir.mkdir(parents=True)
        self.layout.passwd_path.write_text("alice:{PLAIN}a::::::login_delay=60\n")
        ensure_maildir(self.layout.maildir_for("alice"))
        self.clock = SettableClock(1_000_000.0)

    def realm(self) -> MaildirRealm:
        """A realm as one worker process has it."""
        passwd = PasswdFile(self.layout.passwd_path)
        return MaildirRealm(self.layout, passwd, reactor=self.clock, index=False)

    async def log_in(self, realm: MaildirRealm) -> None:
        _, _, logout = await realm.requestAvatar("alice", None, IMailbox)
        logout()

    async def test_a_login_in_another_process_counts(self) -> None:
        first, second = self.realm(), self.realm()
        await self.log_in(first)
        self.clock.now += 70
        await self.log_in(second)
        self.clock.now += 10
        # The first process last saw a login 80 s ago; the file says 10 s.
        with self.assertRaises(LoginDelayed):
            await self.log_in(first)

    async def test_own_recent_login_refuses(self) -> None:
        realm = self.realm()
        await self.log_in(realm)
        self.clock.now += 30
        with self.assertRaises(LoginDelayed):
            await self.log_in(realm)
        self.clock.now += 31
        await self.log_in(realm)
