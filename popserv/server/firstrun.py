"""
The first start on an empty data directory: one account and a welcome message.

So that a newcomer can fetch mail a minute after installing, the first
``twistd popserv`` without a password file creates one user, named after
the person running it (``postmaster`` when that is root), with a random
password printed once on the terminal, and delivers a welcome message into
that user's Maildir.  Nothing is created when the password file exists or
was given explicitly.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shlex
import shutil
import sys
from collections.abc import Sequence
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TextIO

from attrs import frozen

from popserv.core.errors import InvalidUsername
from popserv.core.headers import header_field
from popserv.core.usernames import DEFAULT_RULES, UsernameRules, is_valid_username
from popserv.logins.passwords import PasswdFile, hash_password
from popserv.stores.layout import Layout, Owner, ensure_maildir, give_to, missing
from popserv.stores.maildir import deliver

FALLBACK_USER = "postmaster"


@frozen
class FirstAccount:
    user: str
    password: str


def first_user_name() -> str:
    """The OS login name when it is a sensible mail user, else ``postmaster``."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return FALLBACK_USER
    if name == "root" or not is_valid_username(name) or not name.isascii():
        return FALLBACK_USER
    return name


def admin_command(options: Sequence[str] = ()) -> str:
    """
    The ``popserv`` admin command as the person who started the server can
    type it: the script beside this Python (``.venv/bin/popserv``) unless
    that is the one on PATH, followed by ``options``.
    """
    script = Path(sys.executable).with_name("popserv")
    found = shutil.which("popserv")
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        command = "popserv"
    else:
        try:
            command = os.path.relpath(script)
        except ValueError:  # another drive (Windows)
            command = str(script)
        if command.startswith(".."):
            command = str(script)
    return shlex.join([command, *options])


def welcome_message(user: str, hostname: str, command: str = "popserv") -> bytes:
    """The first user's first message; its fields made by the one safe function."""
    fields = [
        ("From", f"popserv <postmaster@{hostname}>"),
        ("To", f"{user}@{hostname}"),
        ("Subject", "Welcome to popserv"),
        ("Date", formatdate(localtime=True)),
        ("Message-ID", make_msgid(domain=hostname)),
        ("Content-Type", 'text/plain; charset="utf-8"'),
        ("Content-Transfer-Encoding", "8bit"),
        ("MIME-Version", "1.0"),
    ]
    body = (
        f"Hello {user},\n\n"
        "popserv is running and this message came from your Maildir.\n\n"
        f"Add more users with:  {command} user add NAME\n"
        f"Change this password: {command} user passwd {shlex.quote(user)}\n"
        "Delete this message with your client, or: DELE 1 then QUIT.\n"
    )
    header = "".join(header_field(name, value, eol="\n") for name, value in fields)
    return (header + "\n" + body).encode("utf-8")


def bootstrap(
    layout: Layout,
    hostname: str,
    owner: Owner | None = None,
    rules: UsernameRules = DEFAULT_RULES,
    command: str = "popserv",
) -> FirstAccount | None:
    """
    Create the first account if there is no password file yet, its name
    normalised under ``rules``.

    ``owner`` (uid, gid) is who the server will run as: root starting
    ``twistd --uid`` creates the files, and hands all it created to that
    user, or the server could not read its own password file.  ``command``
    is the admin command the welcome message tells the user to run.
    """
    passwd = PasswdFile(layout.passwd_path, rules)
    if passwd.exists():
        return None
    try:
        user = rules.normalize(first_user_name())
    except InvalidUsername:
        user = FALLBACK_USER
    password = secrets.token_urlsafe(12)
    maildir = layout.maildir_for(user)
    created = [
        *missing(layout.data_dir),
        *missing(maildir),
        *missing(layout.passwd_path.parent),
        layout.passwd_path,
        passwd.lock_path,
    ]
    layout.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    location = layout.maildir_location(user)
    ensure_maildir(location)
    passwd.add(user, hash_password(password))
    deliver(location, welcome_message(user, hostname, command), hostname=hostname)
    if owner is not None:
        give_to(owner, created)
    return FirstAccount(user, password)


def make_data_dir(layout: Layout, owner: Owner | None = None) -> None:
    """
    The data directory (mode 0700), when accounts are not in a password file
    there: the control socket, the spool and the last logins still are.
    """
    created = missing(layout.data_dir)
    layout.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if owner is not None:
        give_to(owner, created)


def announce(
    account: FirstAccount, endpoint: str, command: str = "popserv", out: TextIO | None = None
) -> None:
    """
    Print the new account once, with a command that fetches its mail and
    ``command``, the admin command with the options that find this data.
    """
    out = out or sys.stdout
    port = _port_of(endpoint) or "PORT"
    out.write(
        "\n"
        "popserv: first start, created a mail account (this is shown only once):\n"
        f"    user:     {account.user}\n"
        f"    password: {account.password}\n"
        "Fetch the welcome message with:\n"
        f"    curl pop3://127.0.0.1:{port}/1 -u '{account.user}:{account.password}'\n"
        f"Change the password with: {command} user passwd {shlex.quote(account.user)}\n\n"
    )
    out.flush()


def _port_of(endpoint: str) -> str | None:
    """The port of a ``tcp:``/``tcp6:`` endpoint string (positional or ``port=``)."""
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6"):
        return None
    for index, part in enumerate(rest.split(":")):
        key, equals, value = part.rpartition("=")
        if equals and key == "port":
            return value
        if not equals and index == 0 and part.isdigit():
            return part
    return None
