"""
The default realm: a logged-in user name becomes that user's opened, locked
Maildir, with the user's LOGIN-DELAY, EXPIRE and ``max_listed`` settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple, cast

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import Interface, implementer

from popserv.core.errors import LoginDelayed, storage_failure
from popserv.interfaces import IMailbox
from popserv.logins.accounts import AccountSettings, Announcement
from popserv.logins.passwords import PasswdFile
from popserv.logins.passwords.passwdfile import UserEntry
from popserv.logins.sqlaccounts import SQLAccounts
from popserv.stores.layout import Layout
from popserv.stores.maildir import MaildirMailbox
from popserv.stores.maildir.directory import MaildirPath, refuse_shared
from popserv.stores.maildir.locktable import LockTable
from popserv.stores.maildir.uidls import DOVECOT, UidlScheme, parse_uidl_format

log = Logger()

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

#: What ``IRealm.requestAvatar`` gives: the interface, the avatar, its logout.
Avatar = tuple[type[Interface], object, Callable[[], None]]

#: Where the time of a user's last login is kept, for LOGIN-DELAY across restarts.
LAST_LOGIN_FILE = "popserv.lastlogin"


@implementer(IRealm)
class AccountRealm:
    """
    What every store's realm shares: the user's account (the password
    file's or a database's) and the settings it gives the session.
    Subclasses open the maildrop (:meth:`_open`).

    ``shared`` (``--maildrop-lock shared``, the default): several sessions
    may hold a maildrop at once, each with its own snapshot, as several
    devices polling one mailbox need; false: one at a time, the others get
    ``-ERR [IN-USE]`` (RFC 1939's exclusive lock).
    """

    def __init__(
        self,
        passwd: PasswdFile | SQLAccounts | None,
        defaults: AccountSettings | None = None,
        *,
        reactor: Any = None,
        shared: bool = True,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.shared = shared
        self.passwd = passwd
        self.defaults = defaults or AccountSettings()
        self._reactor = reactor
        self._announced: tuple[object, Announcement] | None = None

    def settings_for(self, user: str) -> AccountSettings:
        """The server defaults with the user's password-file overrides applied."""
        entry = self.passwd.lookup(user) if isinstance(self.passwd, PasswdFile) else None
        return self._settings(user, entry)

    def _settings(self, user: str, entry: UserEntry | None) -> AccountSettings:
        if entry is None:
            return self.defaults
        try:
            return self.defaults.override(entry.extra)
        except ValueError:
            log.warn("Ignoring bad login_delay/expire/max_listed fields for {user}", user=user)
            return self.defaults

    def announcement(self) -> Announcement:
        """The most restrictive LOGIN-DELAY and EXPIRE of any user, for CAPA."""
        if not isinstance(self.passwd, PasswdFile):  # none, or a database's: the defaults
            return Announcement.of(self.defaults, ())
        try:
            users = self.passwd.users()
        except OSError:
            return Announcement.of(self.defaults, ())
        cached = self._announced
        if cached is not None and cached[0] is users:
            return cached[1]
        settings = []
        for entry in users:
            try:
                settings.append(self.defaults.override(entry.extra))
            except ValueError:
                continue
        announcement = Announcement.of(self.defaults, settings)
        self._announced = (users, announcement)
        return announcement

    def requestAvatar(
        self, avatarId: bytes | str | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> Deferred[Avatar]:
        if IMailbox not in interfaces:
            raise NotImplementedError(f"{type(self).__name__} only serves IMailbox")
        # popserv's checkers give a user name (str, or bytes from Twisted's
        # own); the anonymous () is no user and no checker here gives it.
        user = cast(str, avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId)
        return Deferred.fromCoroutine(self._open(user, mind))

    async def _open(self, user: str, mind: object) -> Avatar:
        raise NotImplementedError

    async def _entry(self, user: str) -> UserEntry | None:
        """``user``'s account: the password file's, or a database's (awaited)."""
        if self.passwd is None:
            return None
        found = self.passwd.lookup(user)
        if isinstance(found, Deferred):
            found = await found
        return found


class MaildirRealm(AccountRealm):
    """
    Opens ``layout.maildir_for(user)`` for each login, with UIDLs as
    ``uidl_format`` says (a ``--uidl-format`` value, see
    :mod:`popserv.stores.maildir.uidls`) and a ``popserv.index`` unless ``index`` is false.
    """

    def __init__(
        self,
        layout: Layout,
        passwd: PasswdFile | SQLAccounts | None,
        defaults: AccountSettings | None = None,
        *,
        reactor: Any = None,
        uidl_format: UidlScheme | str = DOVECOT,
        index: bool = True,
        shared: bool = True,
        locks: LockTable | None = None,
    ) -> None:
        super().__init__(passwd, defaults, reactor=reactor, shared=shared)
        #: The data directory's lock table (no descriptor per session), if any.
        self.locks = locks
        if isinstance(uidl_format, str):
            uidl_format = parse_uidl_format(uidl_format)
        self.uidl_format = uidl_format
        self.index = index
        self.layout = layout
        self._last_login: dict[str, float] = {}

    async def _open(self, user: str, mind: object) -> Avatar:
        # The name the accounts store for ``user``, whose Maildir it is: a
        # checker other than the file's own (an OAuth token's ``ALICE``)
        # still opens the file's ``alice``; ``user`` itself when not there.
        entry = await self._entry(user)
        if entry is not None:
            user = entry.name
        settings = self._settings(user, entry)
        path = self.layout.maildir_location(user, entry.extra.get("maildir") if entry else None)
        now = self._reactor.seconds()
        if settings.login_delay > 0:
            # This process's own record can refuse at once; an older one (or
            # none) is checked against the file, which another process
            # serving the same Maildir (a worker) may have renewed since.
            last = self._last_login.get(user)
            if last is None or now - last >= settings.login_delay:
                try:
                    last = await self._in_thread(_read_last_login, path)
                except OSError as e:
                    raise storage_failure("cannot read the last login time", e) from None
            if last is not None and now - last < settings.login_delay:
                raise LoginDelayed(f"{now - last:.0f}s since the last login")
        mailbox = await MaildirMailbox.open(
            path,
            reactor=self._reactor,
            login_delay=settings.login_delay,
            expire_days=settings.expire_days,
            max_listed=settings.max_listed,
            uidl_format=self.uidl_format,
            index=self.index,
            shared=self.shared,
            locks=self.locks,
        )
        self._last_login[user] = now
        if settings.login_delay > 0:
            try:
                await self._in_thread(_write_last_login, path, now)
            except OSError as e:
                mailbox.close()
                raise storage_failure("cannot record the login time", e) from None
        return IMailbox, mailbox, mailbox.close

    def _in_thread(self, f: Callable[[*_Ts], _T], *args: *_Ts) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)


def _read_last_login(maildir: MaildirPath) -> float | None:
    try:
        with maildir.opened() as (top,):
            return os.stat(LAST_LOGIN_FILE, dir_fd=top, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return None


def _write_last_login(maildir: MaildirPath, when: float) -> None:
    with maildir.opened() as (top,):
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(LAST_LOGIN_FILE, flags, 0o600, dir_fd=top)
        refuse_shared(fd, LAST_LOGIN_FILE)
        try:
            os.utime(fd, (when, when))
        finally:
            os.close(fd)
