"""
The ``popserv`` admin command: users of the password file, and ``pw``.

Passwords are never taken from the command line, where other users can see
them in the process list: they are asked twice on a terminal, or read as
one line from standard input (``echo secret | popserv user add alice``).
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

from popserv.core.errors import InvalidUsername
from popserv.core.headers import header_field
from popserv.core.usernames import CASES
from popserv.logins.database import Database, connect
from popserv.logins.passwords import (
    DEFAULT_SCHEME,
    HASH_SCHEMES,
    InvalidField,
    NoSuchUser,
    PasswdFile,
    PasswordTooLong,
    UnknownScheme,
    UserEntry,
    UserExists,
    canonical_scheme,
    hash_password,
    hash_secrets,
)
from popserv.logins.sqlaccounts import PostfixadminTable
from popserv.probe.command import add_probe_command
from popserv.server import sessioncommands
from popserv.server.adminargs import CommandError, accounts_of, layout_of, mail_in_database
from popserv.server.control import ControlError
from popserv.server.dbcommands import DatabaseCommandError
from popserv.server.dbcommands import add_commands as add_database_commands
from popserv.server.lastlogin import LAST_LOGIN_FILE, read_last_logins
from popserv.server.migratecommand import add_command as add_migrate_command
from popserv.server.optionvalues import STORES
from popserv.stores.delivery import (
    EX_CONFIG,
    EX_NOUSER,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    BadSender,
    DeliveryError,
    Directory,
    deliver_message,
    has_control,
)
from popserv.stores.layout import DEFAULT_DATA_DIR, ensure_maildir
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.postgres.delivery import PostgresStore, deliver_into
from popserv.stores.postgres.queries import drop_maildrop
from popserv.stores.quota import Quota, parse_count, parse_size

PROG = "popserv"

_SHOWN_LEVELS = (LogLevel.warn, LogLevel.error, LogLevel.critical)


_EXPECTED = (
    CommandError,
    DatabaseCommandError,
    InvalidField,
    NoSuchUser,
    PasswordTooLong,
    UnknownScheme,
    UserExists,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``popserv`` command; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    handed_on = _twistd_arguments(argv)
    if handed_on is not None:
        word, arguments = handed_on
        if word == "dns":
            from popserv.server.dnscommand import main as dns

            return dns(arguments)
        from popserv.server.check import main as check

        return check(arguments)
    args = _parser().parse_args(argv)
    globalLogPublisher.addObserver(_WARNINGS)
    try:
        command: Callable[[argparse.Namespace], int | None] = args.command
        status = command(args)
        if status is not None:
            return status
    except _EXPECTED as e:
        return _fail(str(e))
    except ControlError as e:
        return _fail(str(e))
    except InvalidUsername as e:
        return _fail(f"invalid user name: {e.detail}")
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return _fail(f"{e.strerror or e}{where}")
    except ValueError as e:
        # Layout's template check, and passlib refusing a password (NUL bytes).
        return _fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        globalLogPublisher.removeObserver(_WARNINGS)
    return 0


#: The admin command's options that take a value, as the next argument.
_VALUED = ("--data", "--passwd", "--maildir", "--username-case")


def _twistd_arguments(argv: list[str]) -> tuple[str, list[str]] | None:
    """
    For ``popserv [paths] check OPTIONS`` and ``popserv [paths] dns DOMAIN
    OPTIONS``: the command and what it is given (``dns``'s domain first,
    then the paths given before the command, then the rest); None for any
    other command.  Both take the options of ``twistd popserv``, which
    argparse cannot pass on.
    """
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "check":
            return word, argv[:index] + argv[index + 1 :]
        if word == "dns":
            return word, argv[index + 1 : index + 2] + argv[:index] + argv[index + 2 :]
        if not word.startswith("-"):
            return None
        index += 2 if word in _VALUED else 1
    return None


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def _print_warnings(event: dict[str, Any]) -> None:
    """Show the library's warnings (a malformed passwd line ...) on stderr."""
    if event.get("log_level") in _SHOWN_LEVELS:
        print(f"{PROG}: warning: {formatEvent(event)}", file=sys.stderr)


_WARNINGS = cast(ILogObserver, _print_warnings)


def _parser() -> argparse.ArgumentParser:
    # The paths are accepted before or after the subcommand; SUPPRESS keeps
    # a subcommand's unset option from hiding the one given before it.
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument(
        "--data",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"the data directory (default: {DEFAULT_DATA_DIR})",
    )
    paths.add_argument(
        "--passwd",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="the password file (default: DIR/passwd)",
    )
    paths.add_argument(
        "--maildir",
        metavar="TEMPLATE",
        default=argparse.SUPPRESS,
        help="where Maildirs are, with {user} (default: DIR/mail/{user})",
    )
    paths.add_argument(
        "--database",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="users in PostgreSQL, Postfixadmin's mailbox table, instead of the password"
        " file (the server's --database; the password in PGPASSWORD or PGPASSFILE)",
    )
    paths.add_argument(
        "--store",
        choices=STORES,
        default=argparse.SUPPRESS,
        help="where mail is kept, as the server's --store (default: maildir)",
    )
    paths.add_argument(
        "--follow-maildir-symlinks",
        action="store_true",
        default=argparse.SUPPRESS,
        help="follow symbolic links in the Maildir's path from {user} on (as the server option)",
    )
    paths.add_argument(
        "--username-case",
        choices=CASES,
        default=argparse.SUPPRESS,
        help="how user names match, as the server's option: fold (the default; Alice is"
        " stored and found as alice) or keep (exactly)",
    )
    paths.add_argument(
        "--allow-mixed-script-names",
        action="store_true",
        default=argparse.SUPPRESS,
        help="accept user names mixing scripts (Latin with Cyrillic...), as the server option",
    )
    schemes = ", ".join(HASH_SCHEMES)
    scheme = argparse.ArgumentParser(add_help=False)
    scheme.add_argument(
        "-s",
        "--scheme",
        action="append",
        help=f"password scheme: {schemes} (default: {DEFAULT_SCHEME}); repeat it to store"
        " the password in several (the first is what USER/PASS checks; e.g. add"
        " SCRAM-SHA-256 for SCRAM, CRAM-MD5 for CRAM-MD5)",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[paths],
        description="Manage popserv users. Passwords are read from the terminal "
        "(asked twice) or as one line from standard input, never from arguments.",
    )
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    user = commands.add_parser("user", help="add, change, delete and list users")
    user_commands = user.add_subparsers(metavar="ACTION", required=True)
    add = user_commands.add_parser(
        "add", parents=[paths, scheme], help="add a user and create the Maildir"
    )
    add.add_argument("name")
    add.set_defaults(command=_user_add)
    passwd = user_commands.add_parser(
        "passwd", parents=[paths, scheme], help="change a user's password"
    )
    passwd.add_argument("name")
    passwd.set_defaults(command=_user_passwd)
    delete = user_commands.add_parser("del", parents=[paths], help="delete a user")
    delete.add_argument("name")
    delete.add_argument(
        "--purge", action="store_true", help="also delete the user's Maildir and all mail in it"
    )
    delete.set_defaults(command=_user_del)
    listing = user_commands.add_parser(
        "list",
        parents=[paths],
        help="list the users, their password schemes and last logins (UTC time, address,"
        " mechanism, or never)",
    )
    listing.set_defaults(command=_user_list)

    pw = commands.add_parser(
        "pw", parents=[scheme], help="print a password's stored form, like doveadm pw"
    )
    pw.set_defaults(command=_pw)

    deliver = commands.add_parser(
        "deliver",
        parents=[paths],
        help="deliver a message read on stdin (an MDA for Postfix, procmail, fdm)",
        description="Deliver the message on standard input into a user's Maildir, with"
        " the user's quota. Exit status as in sysexits.h: 0 delivered, 67 no such user,"
        " 73 mailbox full, 75 temporary failure (the MTA retries), 64 bad usage.",
    )
    who = deliver.add_mutually_exclusive_group()
    who.add_argument("--user", "-u", help="the user to deliver to")
    who.add_argument(
        "--recipient",
        "-r",
        help="the envelope recipient; its local part names the user (user+tag works)",
    )
    deliver.add_argument(
        "--from",
        "-f",
        dest="sender",
        help="the envelope sender, for Return-Path (default: $SENDER, or the mbox From_ line)",
    )
    deliver.add_argument(
        "--quota-bytes", type=parse_size, help="default quota when the user has none, e.g. 1G"
    )
    deliver.add_argument("--quota-messages", type=parse_count, help="default message limit")
    deliver.set_defaults(command=_deliver)

    sessioncommands.add_commands(commands, paths)
    add_database_commands(commands, paths)
    add_migrate_command(commands, paths)
    add_probe_command(commands)
    # Only for --help: main() hands what follows "check" to the twistd options.
    commands.add_parser(
        "check",
        help="check twistd popserv's options without starting it",
        description=CHECK_DESCRIPTION,
        add_help=False,
    )
    commands.add_parser(
        "dns",
        help="print the DNS records (SRV, MX) a mail domain needs",
        description=DNS_DESCRIPTION,
        add_help=False,
    )
    return parser


DNS_DESCRIPTION = (
    "popserv dns DOMAIN [twistd popserv options]: print the DNS records DOMAIN needs"
    " (RFC 6186 SRV records, POP3S preferred; the submission server's; the MX with"
    " --smtp) as zone-file lines. Exit status 78 when the options name no public host name."
)

CHECK_DESCRIPTION = (
    "popserv check [twistd popserv options]: check what the options name without"
    " starting a server (listeners can be bound, certificates, the password file,"
    " owners and modes, the Maildir template, free space). One line per finding"
    " (ok:, warning:, error:); exit status 0 without errors, 78 with any."
)


def _hash_schemes(names: list[str] | None) -> list[str]:
    """Check the schemes before asking for a password that could not be hashed."""
    return [_hash_scheme(name) for name in names or [DEFAULT_SCHEME]]


def _hash_scheme(name: str) -> str:
    try:
        scheme = canonical_scheme(name)
    except UnknownScheme:
        scheme = None
    if scheme not in HASH_SCHEMES:
        raise CommandError(
            f"cannot hash with scheme {name!r}; choose one of {', '.join(HASH_SCHEMES)}"
        )
    return scheme


def _read_password() -> str:
    """Ask twice on a terminal; otherwise read one line from standard input."""
    stdin = sys.stdin
    if stdin is None:
        raise CommandError("no password: standard input is closed")
    try:
        if stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Repeat password: ") != password:
                raise CommandError("the passwords do not match")
        else:
            line = stdin.readline()
            if not line:
                raise CommandError("no password on standard input")
            password = line.removesuffix("\n")
            if len(password) < len(line):
                password = password.removesuffix("\r")
    except EOFError:
        raise CommandError("no password given") from None
    if not password:
        raise CommandError("empty passwords are refused")
    return password


def _existing(passwd: PasswdFile | PostfixadminTable, given: str) -> UserEntry:
    """The entry the name ``given`` finds; its ``name`` is the one stored."""
    name = passwd.rules.normalize(given)
    if not passwd.exists():
        raise CommandError(f"no password file at {passwd.path}")
    entry = passwd.lookup(name)
    if entry is None:
        raise NoSuchUser(name)
    return entry


def _user_add(args: argparse.Namespace) -> None:
    layout = layout_of(args)
    passwd = accounts_of(args, layout)
    # Stored normalised (NFKC, lower case unless --username-case keep), the
    # form every login and delivery looks it up under.
    name = passwd.rules.normalize(args.name)
    schemes = _hash_schemes(args.scheme)
    existing = passwd.lookup(name) if passwd.exists() else None
    if existing is not None:
        raise UserExists(existing.name)
    stored, secrets = hash_secrets(_read_password(), schemes)
    if mail_in_database(args):
        # The maildrop is made by its first delivery or login.
        passwd.add(name, stored, secrets)
        given = "" if name == args.name else f" (given as {args.name})"
        print(f"added user {name}{given}, mail in the database")
        return
    maildir = layout.maildir_for(name)
    if layout.data_dir in maildir.parents:
        layout.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    existed = maildir.is_dir()
    passwd.add(name, stored, secrets)
    try:
        ensure_maildir(layout.maildir_location(name))
    except OSError:
        passwd.remove(name)
        raise
    kept = " (it already existed)" if existed else ""
    given = "" if name == args.name else f" (given as {args.name})"
    print(f"added user {name}{given}, Maildir {maildir}{kept}")


def _user_passwd(args: argparse.Namespace) -> None:
    passwd = accounts_of(args)
    schemes = _hash_schemes(args.scheme)
    name = _existing(passwd, args.name).name
    passwd.set_password(name, *hash_secrets(_read_password(), schemes))
    print(f"changed the password of {name}")


def _user_del(args: argparse.Namespace) -> None:
    layout = layout_of(args)
    passwd = accounts_of(args, layout)
    # The stored name: its Maildir, not one named after how it was typed here.
    name = _existing(passwd, args.name).name
    if mail_in_database(args):
        passwd.remove(name)
        if not args.purge:
            print(f"removed user {name}; the mail in the database is kept (--purge deletes it)")
            return
        with connect(args.database) as connection:
            count = drop_maildrop(connection, name)
        print(f"removed user {name} and deleted {count} messages from the database")
        return
    location = layout.maildir_location(name)
    maildir = location.path
    passwd.remove(name)
    if not maildir.exists():
        print(f"removed user {name}")
    elif args.purge:
        _purge(location)
        print(f"removed user {name} and deleted the Maildir {maildir}")
    else:
        print(f"removed user {name}; the Maildir {maildir} is kept (--purge deletes it)")


def _purge(maildir: MaildirPath) -> None:
    """
    Delete the Maildir, reached as the server reaches it: a symbolic link
    in its path is removed (or refused), never followed into.
    """
    *above, name = maildir.parts
    parent = MaildirPath(maildir.root, tuple(above), maildir.follow_symlinks)
    with parent.opened() as (directory,):
        if stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=directory)
        else:
            shutil.rmtree(name, dir_fd=directory)


def _user_list(args: argparse.Namespace) -> None:
    """
    Each user, the password's schemes, and the last login the server
    recorded (time in UTC, client address, mechanism) or ``never``.
    """
    layout = layout_of(args)
    passwd = accounts_of(args, layout)
    if not passwd.exists():
        raise CommandError(f"no password file at {passwd.path}")
    last_logins = read_last_logins(layout.data_dir / LAST_LOGIN_FILE)
    for entry in passwd.users():
        last = last_logins.get(entry.name)
        print(f"{entry.name} {'+'.join(entry.schemes)} {'never' if last is None else last.shown()}")


def _pw(args: argparse.Namespace) -> None:
    schemes = _hash_schemes(args.scheme)
    password = _read_password()
    for scheme in schemes:
        print(hash_password(password, scheme))


def _deliver(args: argparse.Namespace) -> int:
    """``popserv deliver``: every failure is an exit status an MTA understands."""
    try:
        return _deliver_stdin(args)
    except DeliveryError as e:
        print(f"{PROG}: {e.status} {e.text}", file=sys.stderr)
        return e.exit_status
    except InvalidUsername:
        print(f"{PROG}: 5.1.1 User unknown", file=sys.stderr)
        return EX_NOUSER
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EX_CONFIG
    except Exception as e:
        # Anything unexpected: the MTA keeps the message and retries.
        print(f"{PROG}: 4.3.0 {type(e).__name__}: {e}", file=sys.stderr)
        return EX_TEMPFAIL


def _deliver_stdin(args: argparse.Namespace) -> int:
    recipient_address = args.recipient or os.environ.get("RECIPIENT")
    if not args.user and not recipient_address:
        print(f"{PROG}: deliver needs --user or --recipient", file=sys.stderr)
        return EX_USAGE
    layout = layout_of(args)
    passwd = accounts_of(args, layout)
    database = Database(args.database, reactor=None) if mail_in_database(args) else None
    directory = Directory(
        layout,
        passwd,
        (),
        quota=Quota(args.quota_bytes, args.quota_messages),
        store=None if database is None else PostgresStore(database),
    )
    if args.user:
        recipient = directory.recipient(args.user, recipient_address)
    else:
        assert recipient_address  # checked above: --user or --recipient
        recipient = directory.resolve(recipient_address, any_domain=True)
    message = sys.stdin.buffer.read()
    sender = args.sender if args.sender is not None else os.environ.get("SENDER")
    if message.startswith(b"From "):
        # An mbox postmark (procmail, fdm, Postfix with flags=F): not part of the message.
        postmark, _, message = message.partition(b"\n")
        if sender is None:
            words = postmark.split()
            sender = words[1].decode("utf-8", "replace") if len(words) > 1 else None
    if sender == "MAILER-DAEMON":
        sender = ""  # how mbox postmarks spell the null sender
    if sender is not None and has_control(sender):
        raise BadSender(sender)
    header = _trace_lines(message, sender, recipient.address)
    if database is None:
        [result] = deliver_message([(recipient, header)], message, atomic=True)
    else:
        with database.connect_here() as connection:
            [result] = deliver_into(connection, [(recipient, header)], message, atomic=True)
    if result is not None:
        raise result
    return EX_OK


def _header_lines(message: bytes) -> list[bytes]:
    """The message's header lines, lower-cased, without line ends (LF or CRLF)."""
    lines = []
    for raw in message.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            break
        lines.append(line.lower())
    return lines


def _trace_lines(message: bytes, sender: str | None, recipient: str) -> bytes:
    """Return-Path and Delivered-To, unless the MTA already put the same ones on top."""
    head = _header_lines(message)
    fields = []
    if sender is not None and not (head and head[0].startswith(b"return-path:")):
        fields.append(header_field("Return-Path", f"<{sender}>", eol="\n"))
    delivered = header_field("Delivered-To", recipient, eol="\n")
    wanted = delivered.rstrip("\n").lower().encode("utf-8", "surrogateescape")
    if not any(line.replace(b"\t", b" ").strip() == wanted for line in head):
        fields.append(delivered)
    return "".join(fields).encode("utf-8", "surrogateescape")


if __name__ == "__main__":
    sys.exit(main())
