"""
``popserv who`` and ``popserv kick``: the running server's sessions, asked
through its control socket, or with ``--store postgresql`` every node's
logged-in sessions, from their leases in the database.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from popserv.logins.database import connect
from popserv.server.adminargs import layout_of, mail_in_database
from popserv.server.control import ControlClient, control_path


def _control(args: argparse.Namespace) -> ControlClient:
    return ControlClient(control_path(layout_of(args)))


def who(args: argparse.Namespace) -> int:
    if mail_in_database(args):
        return _who_everywhere(args.database)
    with _control(args) as control:
        rows = control.who()
    table = [("USER", "CLIENT", "SINCE", "TLS", "STATE", "LOGIN", "WORKER")]
    for row in rows:
        since = datetime.fromtimestamp(row["since"]).isoformat(sep=" ", timespec="seconds")
        table.append((
            row["user"] or "-",
            row["client"],
            since,
            "yes" if row["tls"] else "no",
            row["state"],
            row["mechanism"] or "-",
            str(row["worker"]),
        ))
    _print_table(table)
    return 0


def _who_everywhere(url: str) -> int:
    """The logged-in sessions of every node, from the leases in the database."""
    with connect(url) as connection:
        rows = connection.execute(
            'SELECT "user", client, since, node FROM popserv.sessions ORDER BY since'
        ).fetchall()
    table = [("USER", "CLIENT", "SINCE", "NODE")]
    for user, client, since, node in rows:
        when = since.astimezone().replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
        table.append((user, client or "-", when, node or "-"))
    _print_table(table)
    return 0


def _print_table(table: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())


def kick(args: argparse.Namespace) -> int:
    target: str = args.target
    as_address = args.address or (not args.user and _looks_like_address(target))
    with _control(args) as control:
        kicked = control.kick(address=target) if as_address else control.kick(user=target)
    what = f"from {target}" if as_address else f"of {target}"
    print(f"kicked {kicked} session{'' if kicked == 1 else 's'} {what}")
    return 0 if kicked else 1


def _looks_like_address(target: str) -> bool:
    """An IP address, a network, or host:port (a user name never has ':' or '/')."""
    return ":" in target or "/" in target or _is_ipv4(target)


def _is_ipv4(target: str) -> bool:
    try:
        ipaddress.IPv4Address(target)
    except ValueError:
        return False
    return True


def add_commands(commands: Any, paths: argparse.ArgumentParser) -> None:
    """Register ``popserv who`` and ``popserv kick`` on the ``popserv`` command's subparsers."""
    listing_sessions = commands.add_parser(
        "who",
        parents=[paths],
        help="list the POP3 sessions of the running server",
        description="List the running server's POP3 sessions, oldest first: user (- before"
        " login), client, since when, TLS or not, state, and the worker process. The server"
        " is reached through DIR/control.sock. With --store postgresql and --database: the"
        " logged-in sessions of every node, from their leases.",
    )
    listing_sessions.set_defaults(command=who)
    kicking = commands.add_parser(
        "kick",
        parents=[paths],
        help="end the sessions of a user, or from an address",
        description="End the running server's POP3 sessions of USER, or from ADDRESS (an IP"
        " address, a network such as 192.0.2.0/24, or one client's host:port as popserv who"
        " shows it), at once. Deletions they marked are not applied, as for a dropped"
        " connection. Exit status 1 when no session matched.",
    )
    kicking.add_argument("target", metavar="USER|ADDRESS")
    kind = kicking.add_mutually_exclusive_group()
    kind.add_argument("--user", action="store_true", help="TARGET is a user name")
    kind.add_argument("--address", action="store_true", help="TARGET is an address")
    kicking.set_defaults(command=kick)
