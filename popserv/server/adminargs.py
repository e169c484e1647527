"""
What the admin command's shared options name: the Maildir layout and the
accounts (the password file, or with ``--database`` Postfixadmin's
mailbox table), for ``popserv`` and the commands in modules of their own
(``popserv migrate``).
"""

from __future__ import annotations

import argparse

from popserv.core.usernames import FOLD, UsernameRules
from popserv.logins.passwords import PasswdFile
from popserv.logins.sqlaccounts import PostfixadminTable
from popserv.stores.layout import DEFAULT_DATA_DIR, Layout


class CommandError(Exception):
    """An expected failure, reported as one line on stderr with exit status 1."""


def layout_of(args: argparse.Namespace) -> Layout:
    return Layout.create(
        getattr(args, "data", DEFAULT_DATA_DIR),
        getattr(args, "passwd", None),
        getattr(args, "maildir", None),
        follow_symlinks=getattr(args, "follow_maildir_symlinks", False),
    )


def accounts_of(
    args: argparse.Namespace, layout: Layout | None = None
) -> PasswdFile | PostfixadminTable:
    """
    The password file, or with ``--database`` the database's mailbox table,
    matching names as the server does with the same options.
    """
    rules = UsernameRules(
        getattr(args, "username_case", FOLD), getattr(args, "allow_mixed_script_names", False)
    )
    url = getattr(args, "database", None)
    if url:
        if len(getattr(args, "scheme", None) or ()) > 1:
            raise CommandError(
                "--database: the mailbox table has one password column, so give one --scheme"
            )
        return PostfixadminTable(url, rules)
    return PasswdFile((layout or layout_of(args)).passwd_path, rules)


def mail_in_database(args: argparse.Namespace) -> bool:
    """``--store postgresql``: mail in the database (which needs ``--database``)."""
    if getattr(args, "store", "maildir") != "postgresql":
        return False
    if not getattr(args, "database", None):
        raise CommandError("--store postgresql needs --database")
    return True
