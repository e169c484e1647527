"""
``popserv db init|upgrade|status``: the PostgreSQL mail store's schema,
made and upgraded by the operator (the server never changes it by itself).
"""

from __future__ import annotations

import argparse
from typing import Any

from popserv.logins.database import DatabaseUnavailable, connect
from popserv.stores.postgres.schema import VERSION, SchemaError, upgrade, version


class DatabaseCommandError(Exception):
    """What the command says before it exits with status 1."""


def add_commands(commands: Any, paths: argparse.ArgumentParser) -> None:
    """The ``db`` command and its actions, under the admin command's ``commands``."""
    db = commands.add_parser(
        "db",
        help="create, upgrade or show the PostgreSQL mail store's tables",
        description="The tables of --store postgresql, in the schema popserv of the"
        " --database. init creates them (a no-op when they exist); upgrade brings them to"
        " this popserv's version; status shows the version and what the store holds.",
    )
    actions = db.add_subparsers(metavar="ACTION", required=True)
    for name, command, text in (
        ("init", _init, "create the tables (or bring them up to date)"),
        ("upgrade", _upgrade, "upgrade the tables made by an older popserv"),
        ("status", _status, "show the schema version, maildrops, messages and leases"),
    ):
        action = actions.add_parser(name, parents=[paths], help=text)
        action.set_defaults(command=command)


def _url(args: argparse.Namespace) -> str:
    url = getattr(args, "database", None)
    if not url:
        raise DatabaseCommandError("give the database: --database postgresql://USER@HOST/DB")
    return str(url)


def _change(args: argparse.Namespace, *, create: bool) -> int:
    try:
        with connect(_url(args)) as connection:
            before, after = upgrade(connection, create=create)
    except (SchemaError, DatabaseUnavailable) as e:
        raise DatabaseCommandError(str(e)) from None
    if before == after:
        print(f"The popserv schema is at version {after}: nothing to do.")
    elif before is None:
        print(f"Created the popserv schema, version {after}.")
    else:
        print(f"Upgraded the popserv schema from version {before} to {after}.")
    return 0


def _init(args: argparse.Namespace) -> int:
    return _change(args, create=True)


def _upgrade(args: argparse.Namespace) -> int:
    return _change(args, create=False)


def _status(args: argparse.Namespace) -> int:
    try:
        with connect(_url(args)) as connection:
            found = version(connection)
            if found is None:
                print("No popserv schema: run `popserv db init`.")
                return 1
            print(f"Schema version {found} (this popserv: {VERSION}).")
            if found != VERSION:
                return 1
            row = connection.execute(
                "SELECT count(*), coalesce(sum(messages), 0), coalesce(sum(octets), 0),"
                " count(*) FILTER (WHERE lock_owner IS NOT NULL AND lock_expires > now())"
                " FROM popserv.maildrops"
            ).fetchone()
    except DatabaseUnavailable as e:
        raise DatabaseCommandError(str(e)) from None
    maildrops, messages, octets, leased = row
    print(f"{maildrops} maildrops, {messages} messages, {octets} octets, {leased} in use.")
    return 0
