"""
``popserv probe URL``: the command line of the probe, registered under
the ``popserv`` command by :func:`add_probe_command`.

The password is never an argument: it comes from ``POPSERV_PROBE_PASSWORD``
(for CI), else is asked on the terminal, else read as one line from
standard input.
"""

from __future__ import annotations

import argparse
import getpass
import os
import ssl
import sys
from collections.abc import Callable, Set
from typing import Any, TextIO

from popserv.probe.checks import CHECKS, names, run_check
from popserv.probe.client import ProbeError, reason, tls_context
from popserv.probe.report import SKIP, Result, as_json, exit_status, row, summary, title_lines
from popserv.probe.session import Probe, Settings
from popserv.probe.target import BadTarget, Target, parse_target

#: Where CI puts the password.
PASSWORD_VARIABLE = "POPSERV_PROBE_PASSWORD"  # noqa: S105 (its name, not a password)

#: Exit statuses: no check failed; a check failed or the server could not be
#: reached; the command line was wrong (as argparse exits).
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = (
    "Check a POP3 server (any server, not only popserv) against RFC 1939, 2449, 2595, 3206"
    " and 8314: greeting and APOP timestamp, CAPA before and after login, STLS and"
    " command injection, TLS versions and the certificate, LIST sizes against what RETR"
    " sends, byte-stuffing, UIDL format and stability, TOP, pipelining, errors, the"
    " failed-login delay. Read-only: no DELE unless --allow-delete. One line per check"
    " (pass, warn, fail, skip). Exit status 0 without failures, 1 with any (or when the"
    " server cannot be reached), 2 for a bad command line. Without a user in the URL,"
    " only the checks that need no login run. The password comes from "
    f"{PASSWORD_VARIABLE}, the terminal, or one line of standard input."
)


class PasswordError(Exception):
    """No password could be read; the message says why."""


def add_probe_command(commands: Any) -> None:
    """The ``probe`` command, under the admin command's ``commands``."""
    probe = commands.add_parser(
        "probe",
        help="check a POP3 server's conformance (read-only; a table, exit 1 on failures)",
        description=DESCRIPTION,
    )
    probe.add_argument(
        "url",
        metavar="URL",
        type=_target,
        help="pop3://[user@]host[:port] (110) or pop3s://... (995); user%%40domain for an @",
    )
    probe.add_argument(
        "--starttls",
        action="store_true",
        help="require STLS on a pop3:// URL (without it, STLS is used whenever offered)",
    )
    probe.add_argument(
        "--cafile", metavar="FILE", help="trust this CA (PEM) instead of the system's"
    )
    probe.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive(float),
        default=30.0,
        help="wait this long for each answer (default: %(default)g)",
    )
    probe.add_argument(
        "--retrieve",
        metavar="N",
        type=_positive(int),
        default=10,
        help="RETR at most the first N messages (default: %(default)d)",
    )
    probe.add_argument(
        "--max-size",
        metavar="OCTETS",
        type=_positive(int),
        default=1 << 20,
        help="and only those of at most this size by LIST (default: %(default)d)",
    )
    probe.add_argument(
        "--allow-delete",
        action="store_true",
        help="also check DELE, RSET and hanging up without QUIT (on a conforming server"
        " nothing is deleted; use a test account)",
    )
    probe.add_argument(
        "--skip",
        metavar="CHECK",
        action="append",
        default=[],
        type=_check_name,
        help="do not run this check (repeatable): " + ", ".join(names()),
    )
    probe.add_argument("--json", action="store_true", help="print the results as JSON")
    probe.set_defaults(command=run_command)


def _target(text: str) -> Target:
    try:
        return parse_target(text)
    except BadTarget as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_name(text: str) -> str:
    if text not in names():
        raise argparse.ArgumentTypeError(
            f"no check named {text!r}; the checks: {', '.join(names())}"
        )
    return text


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not above 0")
        return value

    return parse


def read_password(target: Target, stdin: TextIO | None = None) -> str:
    """The password: from the environment, the terminal (asked once), or a line of stdin."""
    stdin = sys.stdin if stdin is None else stdin
    password = os.environ.get(PASSWORD_VARIABLE)
    if password is None:
        if stdin is None:
            raise PasswordError("no password: standard input is closed")
        try:
            if stdin.isatty():
                password = getpass.getpass(f"Password for {target.user}@{target.host}: ")
            else:
                line = stdin.readline()
                if not line:
                    raise PasswordError(
                        f"no password on standard input (or in {PASSWORD_VARIABLE})"
                    )
                password = line.removesuffix("\n").removesuffix("\r")
        except EOFError:
            raise PasswordError("no password given") from None
    if not password:
        raise PasswordError("the password is empty")
    return password


def run_command(args: argparse.Namespace) -> int:
    """``popserv probe``: run every check; print the table (or JSON); the exit status."""
    target: Target = args.url
    if args.starttls and target.implicit_tls:
        return _usage("--starttls is for pop3:// URLs")
    if args.cafile is not None:
        try:
            tls_context(args.cafile)
        except (OSError, ssl.SSLError) as e:
            return _usage(f"cannot use --cafile {args.cafile}: {reason(e)}")
    try:
        password = None if target.user is None else read_password(target)
    except PasswordError as e:
        return _usage(str(e))
    settings = Settings(
        target,
        password,
        starttls=args.starttls,
        cafile=args.cafile,
        timeout=args.timeout,
        retrieve=args.retrieve,
        max_size=args.max_size,
        allow_delete=args.allow_delete,
    )
    out = sys.stdout
    shown = not args.json
    try:
        results = probe(settings, set(args.skip), _printer(out, str(target)) if shown else None)
    except ProbeError as e:
        print(f"popserv: probe: {e}", file=sys.stderr)
        return EXIT_FAILED
    if shown:
        out.write(summary(results))
    else:
        out.write(as_json(str(target), results))
    out.flush()
    return exit_status(results)


def _usage(message: str) -> int:
    print(f"popserv: probe: {message}", file=sys.stderr)
    return EXIT_USAGE


def _printer(out: TextIO, target: str) -> Callable[[Result | None], None]:
    """Prints the title and header first (given None), then each result as it comes."""
    width = max(len(name) for name in names())

    def show(result: Result | None) -> None:
        out.write(
            title_lines(f"popserv probe {target}", width) if result is None else row(result, width)
        )
        out.flush()

    return show


def probe(
    settings: Settings,
    skip: Set[str] = frozenset(),
    shown: Callable[[Result | None], None] | None = None,
) -> list[Result]:
    """
    Run every check against ``settings.target`` and return the results,
    handing each to ``shown`` as it comes (after ``shown(None)`` once the
    server is reached).  A :class:`ProbeError` when it cannot be reached.
    """
    return run_checks(Probe(settings), skip, shown)


def run_checks(
    session: Probe,
    skip: Set[str] = frozenset(),
    shown: Callable[[Result | None], None] | None = None,
) -> list[Result]:
    """:func:`probe` with a :class:`Probe` of the caller's, which is closed after."""
    try:
        first = session.start()
        if shown is not None:
            shown(None)
        results: list[Result] = []
        for check in CHECKS:
            if check.name in skip:
                result = Result(check.name, SKIP, "--skip")
            elif results and (first.greeting is None or not first.greeting.ok):
                result = Result(check.name, SKIP, "see greeting: the server refuses sessions")
            else:
                result = run_check(session, check)
            results.append(result)
            if shown is not None:
                shown(result)
    finally:
        session.close()
    return results


__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PASSWORD_VARIABLE",
    "PasswordError",
    "add_probe_command",
    "probe",
    "read_password",
    "run_checks",
    "run_command",
]
