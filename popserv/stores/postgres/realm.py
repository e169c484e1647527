"""
The realm of the PostgreSQL mail store: a logged-in user's maildrop in the
database, leased for the session, with the user's LOGIN-DELAY, EXPIRE and
``max_listed``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress

from popserv.interfaces import IMailbox, ISessionInfo
from popserv.logins.accounts import AccountSettings
from popserv.logins.database import Database
from popserv.logins.passwords import PasswdFile
from popserv.logins.sqlaccounts import SQLAccounts
from popserv.stores.postgres.mailbox import LEASE_SECONDS, PostgresMailbox
from popserv.stores.realm import AccountRealm, Avatar


def client_text(mind: object) -> str:
    """The client's address as a lease records it (``""`` when unknown)."""
    if not ISessionInfo.providedBy(mind):
        return ""
    peer: IAddress | None = getattr(mind, "peer", None)
    host = getattr(peer, "host", None)
    return "" if host is None else str(host)


class PostgresRealm(AccountRealm):
    """Opens each user's maildrop in ``database`` (by the account's stored name)."""

    def __init__(
        self,
        database: Database,
        passwd: PasswdFile | SQLAccounts | None,
        defaults: AccountSettings | None = None,
        *,
        reactor: Any = None,
        lease: float = LEASE_SECONDS,
        shared: bool = True,
    ) -> None:
        super().__init__(passwd, defaults, reactor=reactor, shared=shared)
        self.database = database
        self.lease = lease

    async def _open(self, user: str, mind: object) -> Avatar:
        entry = await self._entry(user)
        if entry is not None:
            user = entry.name
        settings = self._settings(user, entry)
        mailbox = await PostgresMailbox.open(
            self.database,
            user,
            client=client_text(mind),
            lease=self.lease,
            login_delay=settings.login_delay,
            expire_days=settings.expire_days,
            max_listed=settings.max_listed,
            on_lost=getattr(mind, "end", None),
            shared=self.shared,
        )
        return IMailbox, mailbox, mailbox.close
