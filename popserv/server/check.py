"""
``popserv check``: the options of ``twistd popserv``, checked without
starting a server.

The options are parsed by the same :class:`popserv.server.tap.Options`, and
each part is checked by the code that uses it at start-up (endpoints and
the cross-option rules from :mod:`popserv.server.configure` and ``tap``,
certificates from :mod:`popserv.server.tls`, the password file's own
parser, :class:`~popserv.server.startchecks.AccessCheck`), with what a
running server would only find later on top: whether each listener can be
bound, when certificates expire, who owns the files and who may read them,
free space.  One line per finding, ``ok:``, ``warning:`` or ``error:``.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import textwrap
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from attrs import frozen
from twisted.internet.error import CannotListenError
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure

from popserv.logins.passwords import PasswdFile
from popserv.server.configure import LISTENER_OPTIONS, endpoint, layout_of, username_rules
from popserv.server.control import control_path, probe
from popserv.server.listeners import cannot_listen
from popserv.server.startchecks import AccessCheck, ensure_fd_limit, warn_about_cleartext
from popserv.server.startup import EXIT_CONFIG, StartupError, strerror
from popserv.server.tap import Options
from popserv.server.tls import CertificateError, find_certificates, load_identity
from popserv.stores.delivery import EX_USAGE
from popserv.stores.layout import Layout

OK, WARNING, ERROR = "ok", "warning", "error"

#: Warn this long before a certificate expires: twice Let's Encrypt's
#: renewal margin (certbot renews 30 days before), so a renewal that has
#: stopped working is noticed with a month to spare.
EXPIRY_MARGIN = timedelta(days=30)

#: Warn when a file system has less than this share of its blocks free
#: (what df reports as available to users, not root's reserve).
FREE_SPACE_MARGIN = 0.05


CHECK_HELP = (
    "Checks the options of twistd popserv, and what they name, without starting a"
    " server: listeners can be bound, certificates load, match their keys and are not"
    " near expiry, the password file parses, owners and modes, the Maildir template,"
    " free space. One line per finding (ok:, warning:, error:); exit status 0 without"
    " errors, 78 with any (64 for an option it does not know)."
)


@frozen
class Finding:
    """One line of ``popserv check``."""

    level: str
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.text}"


class CheckOptions(Options):
    """
    ``twistd popserv``'s options, whose cross-option checks become
    findings instead of stopping at the first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.findings: list[Finding] = []

    def postOptions(self) -> None:
        try:
            super().postOptions()
        except (usage.UsageError, StartupError) as e:
            self.findings.append(Finding(ERROR, str(e)))


class _Checker:
    def __init__(self, options: CheckOptions) -> None:
        self.options = options
        self.findings: list[Finding] = list(options.findings)

    def add(self, level: str, text: str) -> None:
        finding = Finding(level, text)
        if finding not in self.findings:
            self.findings.append(finding)

    def logged(self, level: str, run: Callable[[], object]) -> None:
        """Run ``run``, each warning or error it logs a finding of ``level``."""
        with capturedLogs() as events:
            run()
        for event in events:
            if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
                self.add(level, formatEvent(event))


def check(options: CheckOptions) -> list[Finding]:
    """Every finding about ``options`` (already parsed)."""
    checker = _Checker(options)
    layout = _layout(checker)
    if probe(control_path(layout)):
        checker.add(
            WARNING,
            f"a popserv is running on {layout.data_dir}: its listeners show as in use below",
        )
    _listeners(checker)
    _certificates(checker)
    _passwd(checker, layout)
    _files(checker, layout)
    _free_space(checker, layout)
    _rest(checker)
    return checker.findings


def _layout(checker: _Checker) -> Layout:
    try:
        layout = layout_of(checker.options)
    except StartupError as e:
        checker.add(ERROR, e.message)
        # The rest of the data directory can still be checked.
        options = checker.options
        return Layout.create(options["data"], options["passwd"])
    checker.add(OK, f"Maildirs at {layout.maildir_template}")
    return layout


# Listeners


def _listeners(checker: _Checker) -> None:
    options = checker.options
    for option in LISTENER_OPTIONS:
        for description in options[option]:
            where = f"--{option} {description}"
            try:
                made = endpoint(option, description)
            except usage.UsageError as e:
                if description.startswith("systemd:") and "systemd passed no" in str(e):
                    checker.add(OK, f"{where}: a systemd socket (only its syntax is checked)")
                else:
                    checker.add(ERROR, str(e))
                continue
            except Exception as e:
                checker.add(ERROR, f"{where}: {e}")
                continue
            if description.startswith("systemd:"):
                checker.add(OK, f"{where}: a systemd socket (only its syntax is checked)")
                continue
            problem = _bind(made)
            if problem is None:
                checker.add(OK, f"{where}: can be bound")
            elif problem:
                checker.add(ERROR, f"{where}: {problem}")
            else:
                checker.add(OK, f"{where}: a valid endpoint (not a kind that can be tried)")


def _bind(made: Any) -> str | None:
    """
    Bind the endpoint's address and close it at once: None when that
    works, the reason (as ``twistd popserv`` would say it) when not, ""
    for an endpoint that is not TCP or UNIX.
    """
    # Wrappers (haproxy:, PROXY protocol) keep what they wrap here.
    while hasattr(made, "_wrappedEndpoint"):
        made = made._wrappedEndpoint
    port, interface = getattr(made, "_port", None), getattr(made, "_interface", None)
    if isinstance(port, int) and isinstance(interface, str):
        return _bind_tcp(interface, port)
    address = getattr(made, "_address", None)
    if isinstance(address, str):
        return _bind_unix(address)
    return ""


def _bind_tcp(interface: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # As Twisted listens: a port in TIME_WAIT is no obstacle.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((interface, port))
            sock.listen(1)
    except OSError as e:
        error = CannotListenError(interface, port, e)  # type: ignore[no-untyped-call]
        return cannot_listen("", Failure(error))
    return None


def _bind_unix(path: str) -> str | None:
    if os.path.lexists(path):
        answers = probe(Path(path))
        why = (
            "something answers on it"
            if answers
            else "nothing answers on it (lockfile=1 in the endpoint removes a stale one)"
        )
        return f"cannot listen on {path}: the file exists, {why}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
        os.unlink(path)
    except OSError as e:
        error = CannotListenError(None, path, e)  # type: ignore[no-untyped-call]
        return cannot_listen(path, Failure(error))
    return None


# TLS


def _certificates(checker: _Checker) -> None:
    options = checker.options
    if not options["tls-cert"]:
        return
    try:
        found = find_certificates(options["tls-cert"], options["tls-key"])
    except CertificateError as e:
        checker.add(ERROR, str(e))
        return
    now = datetime.now(UTC)
    for files in found:
        try:
            with capturedLogs():  # load_identity's own expiry warning: said below.
                identity = load_identity(files)
        except CertificateError as e:
            checker.add(ERROR, str(e))
            continue
        expires = identity.chain[0].not_valid_after_utc
        names = ", ".join(identity.names) or "no names"
        when = expires.date().isoformat()
        if expires < now:
            checker.add(ERROR, f"certificate {files.certificate} ({names}) expired on {when}")
        elif expires < now + EXPIRY_MARGIN:
            days = (expires - now).days
            checker.add(
                WARNING,
                f"certificate {files.certificate} ({names}) expires in {days} days, on {when}",
            )
        else:
            checker.add(
                OK, f"certificate {files.certificate} ({names}): key matches, valid until {when}"
            )


# Files


def _passwd(checker: _Checker, layout: Layout) -> None:
    path = layout.passwd_path
    given = bool(checker.options["passwd"])
    if not os.path.lexists(path):
        if given:
            checker.add(ERROR, f"--passwd {checker.options['passwd']}: no such file")
        else:
            checker.add(
                WARNING,
                f"no password file {path} yet: the first start creates one, with a first account",
            )
        return
    passwd = PasswdFile(path, username_rules(checker.options))
    users: Sequence[object] = ()

    def read() -> None:
        nonlocal users
        users = passwd.users()

    try:
        # The parser's own warnings name bad lines by number, never their content.
        checker.logged(ERROR, read)
    except OSError as e:
        checker.add(ERROR, f"cannot read the password file {path}: {strerror(e)}")
        return
    checker.add(OK, f"password file {path}: {len(users)} users")
    mode = _mode(path)
    if mode is not None:
        if mode & stat.S_IROTH:
            checker.add(
                ERROR,
                f"the password file {path} is readable by every user (mode {mode:04o}):"
                " chmod o-rwx",
            )
        elif mode & stat.S_IWGRP:
            checker.add(
                WARNING, f"the password file {path} is writable by its group (mode {mode:04o})"
            )
    _owner(checker, path, "the password file")


def _files(checker: _Checker, layout: Layout) -> None:
    data = layout.data_dir
    if not data.is_dir():
        parent = next((p for p in data.parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            checker.add(
                ERROR, f"the data directory {data} does not exist, and {parent} is not writable"
            )
        else:
            checker.add(
                WARNING, f"the data directory {data} does not exist yet: the first start makes it"
            )
        return
    mode = _mode(data)
    if mode is not None:
        if mode & stat.S_IWOTH:
            checker.add(
                ERROR, f"the data directory {data} is writable by every user (mode {mode:04o})"
            )
        elif mode & (stat.S_IROTH | stat.S_IXOTH):
            checker.add(
                WARNING,
                f"the data directory {data} is open to every user (mode {mode:04o}): chmod 0700",
            )
        else:
            checker.add(OK, f"data directory {data} (mode {mode:04o})")
    _owner(checker, data, "the data directory")
    receiving = bool(checker.options["smtp"] or checker.options["lmtp"])
    from popserv.server.service import SPOOL_DIR

    access = AccessCheck(layout, data / SPOOL_DIR if receiving else None)
    for problem in access.problems():
        if problem.startswith("There is no password file"):
            continue  # said by _passwd
        checker.add(ERROR, problem)


def _owner(checker: _Checker, path: Path, what: str) -> None:
    try:
        owner = os.stat(path).st_uid
    except OSError:
        return
    me = os.getuid()
    if me != 0 and owner not in (me, 0):
        checker.add(
            WARNING,
            f"{what} {path} belongs to {_user_name(owner)}, not to {_user_name(me)}"
            " who runs this check",
        )


def _user_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


def _free_space(checker: _Checker, layout: Layout) -> None:
    head = layout.maildir_template.split("{user}", 1)[0]
    seen: set[int] = set()
    for place in (layout.data_dir, Path(head)):
        where = next((p for p in (place, *place.parents) if p.exists()), None)
        if where is None:
            continue
        try:
            device = os.stat(where).st_dev
            usage_ = os.statvfs(where)
        except OSError:
            continue
        if device in seen or not usage_.f_blocks:
            continue
        seen.add(device)
        free = usage_.f_bavail / usage_.f_blocks
        text = f"{where}: {free:.0%} of its file system free"
        checker.add(WARNING if free < FREE_SPACE_MARGIN else OK, text)


# What start-up would log


def _rest(checker: _Checker) -> None:
    options = checker.options
    plain = options["pop3"]
    tls = options.get("tls")
    # warn_about_cleartext asks only these two things of the factory.
    policy = type("_Policy", (), {"allow_cleartext_auth": options["allow-cleartext-auth"]})
    factory = cast(Any, type("_Factory", (), {"tls": tls, "policy": policy}))
    checker.logged(WARNING, lambda: warn_about_cleartext(plain, factory))
    checker.logged(WARNING, lambda: ensure_fd_limit(options["max-connections"]))
    if options.get("autoconfig"):
        _autoconfig(checker)


def _autoconfig(checker: _Checker) -> None:
    """What ``--autoconfig`` would tell clients, or why it would not start."""
    from popserv.server.autoconfigweb import autoconfig_setup

    options = checker.options
    description = options["autoconfig"]
    try:
        made = endpoint("autoconfig", description)
    except usage.UsageError as e:
        checker.add(ERROR, str(e))
        return
    problem = _bind(made)
    if problem:
        checker.add(ERROR, f"--autoconfig {description}: {problem}")
    try:
        with capturedLogs() as events:
            setup = autoconfig_setup(options)
    except StartupError as e:
        checker.add(ERROR, e.message)
        return
    for event in events:
        if event.get("log_level") == LogLevel.warn:
            checker.add(WARNING, formatEvent(event))
    ports = ", ".join(f"{s.port} ({'TLS' if s.implicit_tls else 'STLS'})" for s in setup.services)
    checker.add(OK, f"--autoconfig {description}: tells clients {setup.hostname} {ports}")


def main(argv: Sequence[str]) -> int:
    """``popserv check OPTIONS``: print the findings; 0 without errors, 78 with any."""
    options = CheckOptions()
    if "--help" in argv or "-h" in argv:
        print("Usage: popserv check [twistd popserv options]")
        print(textwrap.fill(CHECK_HELP, 79))
        print(options.getUsage())
        return 0
    try:
        with capturedLogs():  # the expiry warnings of loading certificates: said below.
            options.parseOptions(list(argv))
    except usage.UsageError as e:
        print(f"error: {e}")
        return EX_USAGE
    except SystemExit as e:  # --version
        return int(e.code or 0)
    findings = check(options)
    for finding in findings:
        print(finding)
    sys.stdout.flush()
    return EXIT_CONFIG if any(f.level == ERROR for f in findings) else 0


__all__ = ["CheckOptions", "Finding", "check", "main"]
