"""
``popserv migrate``: every user's Maildir copied into the PostgreSQL store
(``--to postgresql``, the default) or back (``--to maildir``), keeping each
message's UIDL, order, delivery time and seen flag; the work itself is in
:mod:`popserv.stores.postgres.migrate`.  One line per user and the totals;
exit status 1 if any message failed or any user was skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from attrs import define, field

from popserv.core.errors import InvalidUsername, MailboxInUse
from popserv.logins.database import DatabaseUnavailable, connect
from popserv.logins.passwords import PasswdFile, UserEntry
from popserv.logins.sqlaccounts import PostfixadminTable
from popserv.server.adminargs import CommandError, accounts_of, layout_of
from popserv.server.optionvalues import uidl_format
from popserv.stores.layout import Layout
from popserv.stores.maildir.locktable import LockTable, table_in
from popserv.stores.maildir.uidls import DOVECOT, UidlScheme
from popserv.stores.postgres.migrate import (
    LeaseLost,
    Tally,
    UidlistUnusable,
    to_maildir,
    to_postgresql,
)
from popserv.stores.postgres.schema import SchemaError, check

#: ``--to`` values, the first the default.
TARGETS = ("postgresql", "maildir")

DESCRIPTION = (
    "Copy each user's Maildir into the PostgreSQL mail store (--to postgresql, the default)"
    " or back (--to maildir), keeping every message's UIDL (with the same --uidl-format"
    " the server uses: Dovecot's UIDLs carry over), its order, delivery time and seen"
    " flag, so that no POP3 client downloads anything again. The source is copied, never"
    " changed; messages already there are skipped, so running it again resumes an"
    " interrupted run. A user whose maildrop is in use is skipped. USER: these users of"
    " the accounts (default: all of them). Exit status 1 if anything failed or was skipped."
)


def add_command(commands: Any, paths: argparse.ArgumentParser) -> None:
    """The ``migrate`` command, under the admin command's ``commands``."""
    migrate = commands.add_parser(
        "migrate",
        parents=[paths],
        help="copy Maildirs into the PostgreSQL mail store, or back, keeping their UIDLs",
        description=DESCRIPTION,
    )
    migrate.add_argument("users", nargs="*", metavar="USER")
    migrate.add_argument(
        "--to",
        choices=TARGETS,
        default=TARGETS[0],
        help="where the mail goes (default: %(default)s)",
    )
    migrate.add_argument(
        "--uidl-format",
        type=_uidl_format,
        default=DOVECOT,
        metavar="FORMAT",
        help="the server's --uidl-format, so the Maildir's UIDLs are read (and written) as"
        " it serves them (default: dovecot)",
    )
    migrate.add_argument(
        "-q", "--quiet", action="store_true", help="only failures, skipped users and the totals"
    )
    migrate.set_defaults(command=_migrate)


def _uidl_format(value: str) -> UidlScheme:
    try:
        return uidl_format(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@define
class _Totals:
    #: Users copied, skipped as in use, and stopped by an error.
    users: int = 0
    skipped: int = 0
    stopped: int = 0
    tally: Tally = field(factory=Tally)


def _shown(tally: Tally) -> str:
    return f"{tally.copied} copied, {tally.already} already there, {tally.failed} failed"


def _entries(
    accounts: PasswdFile | PostfixadminTable, given: list[str]
) -> Iterator[tuple[str, UserEntry | None]]:
    """Each user to copy: the name given (or stored), and its entry (None: no such user)."""
    if isinstance(accounts, PasswdFile) and not accounts.exists():
        raise CommandError(f"no password file at {accounts.path}")
    if not given:
        for entry in accounts.users():
            yield entry.name, entry
        return
    for name in given:
        try:
            found = accounts.lookup(accounts.rules.normalize(name))
        except InvalidUsername:
            found = None
        yield name, found


def _migrate(args: argparse.Namespace) -> int:
    url = getattr(args, "database", None)
    if not url:
        raise CommandError("give the database: --database postgresql://USER@HOST/DB")
    layout = layout_of(args)
    accounts = accounts_of(args, layout)
    try:
        with connect(url) as connection:
            check(connection)
            # The server's 10 s per statement is for sessions: one message of
            # a migration may be far bigger than anything RETR reads at once.
            connection.execute("SET statement_timeout = 0")
            run = _Run(
                connection, layout, args.uidl_format, args.to, args.quiet, table_in(layout.data_dir)
            )
            for name, entry in _entries(accounts, args.users):
                run.user(name, entry)
    except (SchemaError, DatabaseUnavailable) as e:
        raise CommandError(str(e)) from None
    totals = run.totals
    skipped = f"; {totals.skipped} skipped (in use)" if totals.skipped else ""
    stopped = f"; {totals.stopped} stopped by an error" if totals.stopped else ""
    users = f"{totals.users} user{'' if totals.users == 1 else 's'}"
    print(f"{users}: {_shown(totals.tally)}{skipped}{stopped}.")
    if args.to == "postgresql":
        print("The Maildirs were copied, not moved: they are unchanged.")
    else:
        print("The messages were copied, not moved: they are still in PostgreSQL too.")
    return 1 if totals.tally.failed or totals.skipped or totals.stopped else 0


@define
class _Run:
    """One ``popserv migrate``: the copy of each user in turn, and the totals."""

    connection: Any
    layout: Layout
    scheme: UidlScheme
    to: str
    quiet: bool
    #: The data directory's maildrop lock table, which sessions lock in.
    locks: LockTable | None = None
    totals: _Totals = field(factory=_Totals)

    def user(self, name: str, entry: UserEntry | None) -> None:
        """Copy one user's mail, and say how it went."""
        import psycopg

        def note(text: str) -> None:
            print(f"{name}: {text}", file=sys.stderr)

        totals = self.totals
        if entry is None:
            note("no such user")
            totals.stopped += 1
            return
        copy = to_postgresql if self.to == "postgresql" else to_maildir
        tally = Tally()
        try:
            location = self.layout.maildir_location(entry.name, entry.extra.get("maildir"))
            copy(
                self.connection, entry.name, location, self.scheme,
                note=note, tally=tally, locks=self.locks,
            )  # fmt: skip
        except MailboxInUse:
            print(f"{name}: skipped, in use by a POP3 session: run the command again later")
            totals.skipped += 1
            return
        except InvalidUsername as e:
            note(f"no Maildir for this name: {e.detail}")
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            note(f"stopped: {e.strerror or e}{where}")
        except (LeaseLost, UidlistUnusable) as e:
            note(f"stopped: {e}")
        except psycopg.Error as e:
            error = " ".join(str(e).split())
            if self.connection.broken:
                raise CommandError(f"the database connection broke: {error}") from None
            note(f"stopped: {error}")
        else:
            totals.users += 1
            totals.tally.add(tally)
            if tally.failed or not self.quiet:
                print(f"{name}: {_shown(tally)}")
            return
        totals.stopped += 1
        totals.tally.add(tally)
        print(f"{name}: {_shown(tally)}, then stopped")
