"""
Accounts in PostgreSQL: a user's stored password and settings, looked up by
name with one query, as Dovecot's ``passdb sql`` does.

By default the query reads Postfixadmin's ``mailbox`` table (also iRedMail's
and mailcow's), so a database those tools fill serves popserv unchanged.
The query may be replaced (``--database-query``, like Dovecot's
``password_query``); the user name is passed as the parameter
``%(user)s``, never formatted into the SQL.  It returns one row, by column
name:

``password`` (required)
    The stored password, in any scheme the password file reads
    (``{SHA512-CRYPT}$6$...``, a prefix-less ``$1$...`` crypt, ``{ARGON2ID}``...).
``user``
    The account's name as stored (the name its Maildir is known by);
    the name asked for when absent.
``active``
    False (or 0, ``'0'``, ``'f'``, ``'n'``): the account is locked.
``maildir``
    Its Maildir's path relative to the mail root (Postfixadmin's
    ``example.org/alice/``), for ``--maildir '/var/vmail/{maildir}'``.
``quota``
    Its quota in bytes (0: none); ``quota_messages``, ``login_delay``,
    ``expire`` and ``max_listed`` as in the password file's extra fields.

A row becomes a :class:`~popserv.logins.passwords.passwdfile.UserEntry`,
what the password file gives, so every login kind and scheme works the
same on both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from popserv.core.usernames import UsernameRules
from popserv.logins.database import Database
from popserv.logins.passwords.passwdfile import NoSuchUser, UserEntry

T = TypeVar("T")

#: Seconds an account looked up is answered again without a query (a
#: changed password, a locked account take effect within it), and how many
#: are kept.
CACHE_SECONDS = 1.0
CACHE_SIZE = 4096

#: Postfixadmin's mailbox table.
DEFAULT_QUERY = (
    "SELECT username AS user, password, maildir, quota, active"
    " FROM mailbox WHERE username = %(user)s"
)

#: Every row of Postfixadmin's table, for ``popserv user list``.
_EVERY_USER = (
    "SELECT username AS user, password, maildir, quota, active FROM mailbox ORDER BY username"
)

#: Columns copied into the entry's extra fields (by the name the password
#: file gives them); ``quota`` is Postfixadmin's bytes.
_EXTRA = {
    "maildir": "maildir",
    "quota": "quota_bytes",
    "quota_messages": "quota_messages",
    "login_delay": "login_delay",
    "expire": "expire",
    "max_listed": "max_listed",
}
_FALSE = frozenset({"0", "f", "false", "n", "no", "off"})


def _active(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE
    return bool(value)


def entry_of(row: Mapping[str, Any], name: str) -> UserEntry:
    """The account a row of the query describes (``name``: the name asked for)."""
    password = row.get("password") or ""
    if not _active(row.get("active")):
        # Locked as the password file locks: whatever secret is stored.
        password = "!" + password
    extra = {}
    for column, key in _EXTRA.items():
        value = row.get(column)
        if value is None or value == "":
            continue
        if key == "quota_bytes" and str(value).strip() in ("0", "-1"):
            continue  # Postfixadmin's 0: no quota (a bad value is judged with the quota)
        extra[key] = str(value)
    return UserEntry(str(row.get("user") or name), password, extra)


class SQLAccounts:
    """The accounts a query reads from ``database``, names matched under ``rules``."""

    def __init__(
        self,
        database: Database,
        rules: UsernameRules,
        query: str = DEFAULT_QUERY,
        clock: IReactorTime | None = None,
    ) -> None:
        self.database = database
        self.rules = rules
        self.query = query
        self.clock: IReactorTime = clock or database.reactor
        #: Accounts looked up in the last :data:`CACHE_SECONDS`, by name.
        self._recent: dict[str, tuple[float, UserEntry | None]] = {}

    def lookup(self, name: str) -> Deferred[UserEntry | None]:
        """
        The account named ``name`` (normalised), or None.  Answered again
        for :data:`CACHE_SECONDS` without a query: one login asks twice
        (the checker, then the realm), milliseconds apart.
        """
        now = self.clock.seconds()
        recent = self._recent.get(name)
        if recent is not None and now - recent[0] < CACHE_SECONDS:
            return succeed(recent[1])
        return self.database.fetch_one(self.query, {"user": name}).addCallback(
            self._found, name, now
        )

    def _found(self, row: dict[str, Any] | None, name: str, when: float) -> UserEntry | None:
        entry = None if row is None else entry_of(row, name)
        if len(self._recent) >= CACHE_SIZE:
            self._recent.clear()
        self._recent[name] = (when, entry)
        return entry

    def in_thread(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """``f``, which may call :meth:`lookup_here`, in one of the database's threads."""
        return self.database.in_thread(f, *args, **kwargs)

    def lookup_here(self, name: str) -> UserEntry | None:
        """:meth:`lookup`, blocking: for code run by :meth:`in_thread`."""
        row = self.database.fetch_one_here(self.query, {"user": name})
        return None if row is None else entry_of(row, name)




class PostfixadminTable:
    """
    Postfixadmin's ``mailbox`` table, written by ``popserv user add``,
    ``passwd``, ``del`` and ``list --database``, with the methods of the
    password file those commands use.  Blocking (the command runs no
    reactor): one connection, each change its own transaction.

    A row is what Postfixadmin itself writes: the name, the password (one
    column: one stored form), ``local_part`` and ``domain`` split at the last
    ``@``, ``maildir`` as ``domain/local/``, active.
    """

    def __init__(self, url: str, rules: UsernameRules) -> None:
        import psycopg

        from popserv.logins.database import check_url

        self.path = check_url(url)  # where, for the messages
        self.rules = rules
        try:
            self._connection = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as e:
            # libpq's message has a hint on a second line: one line is what is shown.
            why = " ".join(str(e).split())
            raise ConnectionError(f"cannot reach the database: {why}") from None

    def exists(self) -> bool:
        return True

    def _rows(self, query: str, parameters: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        with self._connection.cursor(row_factory=dict_row) as cursor:
            cursor.execute(query, parameters)
            return list(cursor.fetchall())

    def lookup(self, name: str) -> UserEntry | None:
        rows = self._rows(DEFAULT_QUERY.replace("%(user)s", "%s"), (name,))
        return entry_of(rows[0], name) if rows else None

    def users(self) -> tuple[UserEntry, ...]:
        rows = self._rows(_EVERY_USER)
        return tuple(entry_of(row, str(row["user"])) for row in rows)

    def add(self, name: str, stored: str, secrets: Mapping[str, str] | None = None) -> None:
        self._one_form(secrets)
        local, at, domain = name.rpartition("@")
        if not at:
            local, domain = name, ""
        maildir = f"{domain}/{local}/" if domain else f"{local}/"
        self._change(
            "INSERT INTO mailbox (username, password, local_part, domain, maildir, active)"
            " VALUES (%s, %s, %s, %s, %s, true)",
            (name, stored, local, domain, maildir),
        )

    def set_password(
        self, name: str, stored: str, secrets: Mapping[str, str] | None = None
    ) -> None:
        self._one_form(secrets)
        self._change(
            "UPDATE mailbox SET password = %s, modified = now() WHERE username = %s",
            (stored, name),
        )

    def remove(self, name: str) -> None:
        self._change("DELETE FROM mailbox WHERE username = %s", (name,))

    def _change(self, statement: str, parameters: tuple[Any, ...]) -> None:
        """One change; the database's refusal as one line (ValueError), none made: NoSuchUser."""
        import psycopg

        try:
            changed = self._connection.execute(statement, parameters).rowcount
        except psycopg.Error as e:
            raise ValueError(f"the database refused it: {' '.join(str(e).split())}") from None
        if changed == 0:
            raise NoSuchUser(str(parameters[-1]))

    def _one_form(self, secrets: Mapping[str, str] | None) -> None:
        if secrets:
            raise ValueError(
                "the mailbox table has one password column: give one --scheme"
            )


__all__ = ["DEFAULT_QUERY", "PostfixadminTable", "SQLAccounts", "entry_of"]
