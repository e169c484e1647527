"""The ``twistd popserv`` command line."""

from __future__ import annotations

import ipaddress
import os
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from twisted.logger import Logger
from twisted.python import usage

from popserv._version import __version__
from popserv.core.errors import InvalidUsername
from popserv.core.usernames import CASES, FOLD, UsernameRules
from popserv.logins.accounts import parse_expire, parse_login_delay
from popserv.logins.oauth import JWTValidator
from popserv.logins.sasl import MECHANISMS
from popserv.logins.sasl.external import RULES
from popserv.server.policy import Policy
from popserv.server.tls import (
    INTERMEDIATE_CIPHERS,
    VERSIONS,
    CertificateError,
    TLSConfig,
    TLSServer,
    find_certificates,
)
from popserv.stores.delivery import EX_CONFIG, EX_TEMPFAIL
from popserv.stores.layout import DEFAULT_DATA_DIR, Layout
from popserv.stores.maildir.uidls import DOVECOT, UidlScheme, parse_uidl_format
from popserv.stores.quota import parse_count, parse_size

log = Logger()

#: Loopback only, on a port that needs no root: safe for a first start.
DEFAULT_POP3_ENDPOINT = "tcp:1110:interface=127.0.0.1"

#: Exit status of ``twistd popserv`` when the configuration is wrong (an
#: option, or a file one names): sysexits.h EX_CONFIG.  Restarting cannot
#: help, so the systemd unit lists it in RestartPreventExitStatus=.
EXIT_CONFIG = EX_CONFIG
#: Exit status when a listener cannot listen (port in use, no permission):
#: sysexits.h EX_TEMPFAIL, since the port may be free a moment later (an old
#: instance still shutting down) and Restart=on-failure retries.
EXIT_CANNOT_LISTEN = EX_TEMPFAIL


class StartupError(Exception):
    """
    A reason popserv cannot start, told in one line (no traceback): under
    ``twistd popserv`` it is printed as ``popserv: LINE`` and the process
    exits with ``status``; an application embedding popserv gets the
    exception.
    """

    def __init__(self, message: str, status: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


def under_twistd(options: object) -> bool:
    """True when ``options`` are the ``popserv`` subcommand of a twistd command line."""
    return getattr(options, "parent", None) is not None


def exit_at_startup(
    options: object, message: str, status: int, *, usage_line: str | None = None
) -> NoReturn:
    """
    End ``twistd popserv`` before it serves: ``popserv: MESSAGE`` as one line
    on the real stderr (after an optional usage line), in the log when
    twistd's logging has begun, and to a daemonizing twistd's waiting parent
    through its status pipe; the PID file removed; exit ``status``.
    """
    line = f"popserv: {message}"
    config: Any = getattr(options, "parent", None) or {}
    # Once twistd logs, sys.stderr is a file that writes log events; the
    # process's own stderr is still sys.__stderr__ (the terminal, the journal).
    stderr = sys.__stderr__ or sys.stderr
    if usage_line:
        stderr.write(usage_line + "\n")
    stderr.write(line + "\n")
    stderr.flush()
    if sys.stderr is not sys.__stderr__:
        log.critical("{line}", line=line)
    pipe = config.get("statusPipe")
    if pipe is not None:
        # The parent of a daemonizing twistd waits for this and prints it
        # (it reads at most 100 bytes, then exits 1 whatever we send).
        os.write(pipe, b"1 " + line.encode("utf-8", "replace")[:98])
        os.close(pipe)
        config["statusPipe"] = None
    remove_pidfile(options)
    raise SystemExit(status)


def remove_pidfile(options: object) -> None:
    """Remove twistd's PID file if it is this process's (twistd would, on a normal exit)."""
    config: Any = getattr(options, "parent", None) or {}
    pidfile = config.get("pidfile")
    if pidfile and os.path.exists(pidfile):
        try:
            with open(pidfile) as f:
                ours = f.read().strip() == str(os.getpid())
            if ours:
                os.unlink(pidfile)
        except OSError:
            pass


@contextmanager
def exit_on_startup_error(options: object) -> Iterator[None]:
    """
    Under twistd, a :class:`StartupError` raised inside ends the process in
    one line (:func:`exit_at_startup`); elsewhere it propagates.
    """
    try:
        yield
    except StartupError as e:
        if not under_twistd(options):
            raise
        exit_at_startup(options, e.message, e.status)


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _size(value: str) -> int:
    size = parse_size(value)
    if size is None:
        raise ValueError("must be > 0")
    return size


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise ValueError(f"must be >= {minimum}")
        return number

    return parse


def _prefix_length(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 128:
        raise ValueError("must be 1 to 128")
    return number


def _tristate(value: str) -> bool | None:
    """``yes``/``no``/``auto`` as True/False/None."""
    choices = {"yes": True, "on": True, "no": False, "off": False, "auto": None}
    try:
        return choices[value.strip().lower()]
    except KeyError:
        raise ValueError("must be yes, no or auto") from None


def _mechanisms(value: str) -> tuple[str, ...] | None:
    """``auto``, or a comma-separated list of SASL mechanism names popserv has."""
    if value.strip().lower() == "auto":
        return None
    names = tuple(name.strip().upper() for name in value.split(",") if name.strip())
    known = [m.name for m in MECHANISMS]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown: {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _uidl_format(value: str) -> UidlScheme:
    """``dovecot``, ``maildir`` or a Dovecot ``pop3_uidl_format`` such as ``%08Xu%08Xv``."""
    return parse_uidl_format(value.strip())


def _username_case(value: str) -> str:
    if value not in CASES:
        raise ValueError(f"must be one of {', '.join(CASES)}")
    return value


def _identity_rule(value: str) -> str:
    if value not in RULES:
        raise ValueError(f"must be one of {', '.join(RULES)}")
    return value


def _expire(value: str) -> int | None:
    try:
        return parse_expire(value)
    except ValueError:
        raise ValueError("must be a number of days >= 0, or NEVER") from None


def _reason(error: ValueError) -> str:
    """A coercer's complaint, in words (not ``invalid literal for int() ...``)."""
    text = str(error)
    if text.startswith("invalid literal for int()"):
        return "not a whole number"
    if text.startswith("could not convert string to float"):
        return "not a number"
    return text


def _named(name: str, coerce: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            return coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{name} {value!r}: {_reason(e)}") from None

    return parse


def _naming_the_option(parameters: list[list[Any]]) -> list[list[Any]]:
    """
    Make each coercer's ValueError a usage error that names the option and
    the value given; twistd's own says ``Parameter type enforcement failed``
    and names neither.
    """
    for parameter in parameters:
        if len(parameter) == 5:
            parameter[4] = _named(parameter[0], parameter[4])
    return parameters


#: The Policy defaults, which the options show.
_DEFAULTS = Policy(hostname="localhost")


#: ``--help`` in groups, those a newcomer needs first; docs/options.rst has
#: the same groups in the same order (a test compares them).
HELP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Listening", ("pop3", "pop3s", "hostname", "metrics")),
    ("Data", ("data", "passwd", "maildir", "follow-maildir-symlinks", "uidl-format")),
    (
        "TLS",
        (
            "tls-cert",
            "tls-key",
            "tls-min-version",
            "tls-ciphers",
            "tls-client-ca",
            "tls-reload-interval",
        ),
    ),
    (
        "Logins",
        (
            "allow-cleartext-auth",
            "allow-cleartext-apop",
            "apop",
            "sasl",
            "username-case",
            "allow-mixed-script-names",
            "master-user",
            "external-identity",
            "oauth-key",
            "oauth-issuer",
            "oauth-audience",
            "oauth-user-claim",
            "login-delay",
            "expire",
        ),
    ),
    (
        "Limits",
        (
            "max-connections",
            "max-connections-per-ip",
            "ipv6-prefix",
            "trusted-network",
            "max-user-sessions",
            "idle-timeout",
            "login-timeout",
            "auth-failure-delay",
            "auth-failure-max-delay",
            "max-auth-failures",
            "max-line-length",
            "max-auth-line-length",
            "max-queued-commands",
            "max-bad-commands",
        ),
    ),
    (
        "Receiving mail",
        (
            "smtp",
            "lmtp",
            "domain",
            "max-message-size",
            "quota-bytes",
            "quota-messages",
            "recipient-delimiter",
        ),
    ),
    ("Other", ("help", "version")),
)

#: What each option's value is, in ``--help``.
METAVARS = {
    "pop3": "ENDPOINT",
    "pop3s": "ENDPOINT",
    "smtp": "ENDPOINT",
    "lmtp": "ENDPOINT",
    "metrics": "ENDPOINT",
    "hostname": "NAME",
    "data": "DIR",
    "passwd": "FILE",
    "maildir": "TEMPLATE",
    "uidl-format": "FORMAT",
    "tls-cert": "FILE|DIR",
    "tls-key": "FILE",
    "tls-min-version": "1.2|1.3",
    "tls-ciphers": "LIST",
    "tls-client-ca": "FILE",
    "tls-reload-interval": "SECONDS",
    "apop": "yes|no|auto",
    "sasl": "LIST|auto",
    "username-case": "fold|keep",
    "master-user": "NAME",
    "external-identity": "cn|email|email-local",
    "oauth-key": "FILE",
    "oauth-issuer": "ISS",
    "oauth-audience": "AUD",
    "oauth-user-claim": "CLAIM",
    "login-delay": "SECONDS",
    "expire": "DAYS|NEVER",
    "trusted-network": "CIDR",
    "ipv6-prefix": "BITS",
    "idle-timeout": "SECONDS",
    "login-timeout": "SECONDS",
    "auth-failure-delay": "SECONDS",
    "auth-failure-max-delay": "SECONDS",
    "domain": "DOMAIN",
    "max-message-size": "SIZE",
    "quota-bytes": "SIZE",
    "quota-messages": "N",
    "recipient-delimiter": "CHARS",
}

#: Defaults ``--help`` shows in words rather than as the stored value.
DEFAULT_TEXTS = {
    "pop3": DEFAULT_POP3_ENDPOINT,
    "passwd": "DIR/passwd, created with a first user on the first start",
    "maildir": "DIR/mail/{user}",
    "hostname": "the FQDN",
    "tls-ciphers": "Mozilla intermediate",
    "apop": "auto",
    "sasl": "auto",
    "expire": "NEVER",
    "domain": "the host name and localhost",
    "max-message-size": "25M",
    "quota-bytes": "none",
    "quota-messages": "none",
    "metrics": "off",
}

#: Width of ``--help``, whatever the terminal: texts are read, not scanned.
HELP_WIDTH = 79


def _default_text(value: object) -> str | None:
    if value is None or value == []:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Options(usage.Options):
    """Options of ``twistd popserv``."""

    synopsis = "[options]"
    longdesc = (
        "Serve POP3 from one Maildir per user, with logins checked against a "
        "Dovecot-style password file. With no options: 127.0.0.1:1110 and "
        "./popserv-data, creating a first account on the first start."
    )

    optParameters: ClassVar[list[list[Any]]] = _naming_the_option([
        ["data", "d", DEFAULT_DATA_DIR, "Data directory (password file, Maildirs)."],
        ["passwd", None, None, "The password file; when given, it must exist."],
        ["maildir", None, None, "Where Maildirs are: a path template with {user}."],
        ["hostname", None, None, "Host name for the greeting and SMTP."],
        [
            "username-case",
            None,
            FOLD,
            "How user names match: fold (Alice, ALICE and alice are one user, as"
            " Dovecot's auth_username_format=%Lu) or keep (exactly, as RFC 5321 allows)."
            " Either way names are NFKC-normalised. Give the popserv command the same.",
            _username_case,
        ],
        [
            "idle-timeout",
            None,
            600.0,
            "Seconds idle before autologout (RFC 1939: >= 600).",
            _positive_float,
        ],
        [
            "login-timeout",
            None,
            _DEFAULTS.login_timeout,
            "Seconds from connecting to logging in, TLS handshake included, before the"
            " connection is closed (a total, not reset by activity).",
            _positive_float,
        ],
        [
            "auth-failure-delay",
            None,
            _DEFAULTS.auth_failure_delay,
            "Seconds before answering a client's first failed login; each further"
            " failure from the same client doubles it.",
            _non_negative_float,
        ],
        [
            "auth-failure-max-delay",
            None,
            _DEFAULTS.auth_failure_max_delay,
            "The longest failed-login delay.",
            _non_negative_float,
        ],
        [
            "max-auth-failures",
            None,
            _DEFAULTS.max_auth_failures,
            "Failed logins before the connection closes.",
            _positive_int,
        ],
        [
            "max-connections",
            None,
            _DEFAULTS.max_connections,
            "Connections open at once, in all.",
            _positive_int,
        ],
        [
            "max-connections-per-ip",
            None,
            _DEFAULTS.max_connections_per_ip,
            "Connections open at once from one IPv4 address or IPv6 network (--ipv6-prefix).",
            _positive_int,
        ],
        [
            "ipv6-prefix",
            None,
            _DEFAULTS.ipv6_prefix,
            "IPv6 clients are counted and penalised per network of this many bits.",
            _prefix_length,
        ],
        [
            "max-user-sessions",
            None,
            _DEFAULTS.max_user_sessions,
            "Sessions logged in at once as one user.",
            _positive_int,
        ],
        [
            "max-line-length",
            None,
            _DEFAULTS.max_line_length,
            "Longest command line in octets, CRLF included (RFC 2449: 255).",
            _at_least(255),
        ],
        [
            "max-auth-line-length",
            None,
            _DEFAULTS.max_auth_line_length,
            "Longest AUTH line or SASL response in octets (OAuth tokens need a few KB).",
            _at_least(255),
        ],
        [
            "max-queued-commands",
            None,
            _DEFAULTS.max_queued_commands,
            "Pipelined commands read ahead; reading pauses while this many wait.",
            _positive_int,
        ],
        [
            "max-bad-commands",
            None,
            _DEFAULTS.max_bad_commands,
            "Bad command lines in a row before the connection closes (Dovecot: 10).",
            _positive_int,
        ],
        [
            "login-delay",
            None,
            0,
            "Minimum seconds between a user's logins (LOGIN-DELAY).",
            parse_login_delay,
        ],
        [
            "expire",
            None,
            None,
            "Days a retrieved message is kept, or NEVER (EXPIRE).",
            _expire,
        ],
        [
            "apop",
            None,
            None,
            "Offer APOP: yes, no, or auto (when an account has a password APOP"
            " can use, i.e. stored PLAIN).",
            _tristate,
        ],
        [
            "sasl",
            None,
            None,
            "SASL mechanisms to offer, comma-separated, or auto: PLAIN and LOGIN; CRAM-MD5"
            " and SCRAM while every account has a secret they can use; EXTERNAL with"
            " --tls-client-ca; OAUTHBEARER and XOAUTH2 with --oauth-key.",
            _mechanisms,
        ],
        [
            "external-identity",
            None,
            "cn",
            "How SASL EXTERNAL maps a client certificate to a user: cn, email or email-local.",
            _identity_rule,
        ],
        [
            "oauth-key",
            None,
            None,
            "Accept OAuth 2.0 JWTs (SASL OAUTHBEARER, XOAUTH2) signed with this key: a file"
            " with an HS256 secret or a PEM public key (RS256/ES256).",
        ],
        ["oauth-issuer", None, None, "Required 'iss' of OAuth tokens."],
        ["oauth-audience", None, None, "Required 'aud' of OAuth tokens."],
        ["oauth-user-claim", None, "sub", "The token claim that names the user."],
        [
            "uidl-format",
            None,
            DOVECOT,
            "UIDLs: dovecot (serve the ones Dovecot served where a dovecot-uidlist exists,"
            " else popserv's own), maildir (always popserv's own: the file's unique name),"
            " or a Dovecot pop3_uidl_format such as %08Xu%08Xv, %v.%u, %g.",
            _uidl_format,
        ],
        ["tls-min-version", None, "1.2", "Oldest TLS version accepted: 1.2 or 1.3."],
        [
            "tls-ciphers",
            None,
            INTERMEDIATE_CIPHERS,
            "OpenSSL cipher list for TLS 1.2.",
        ],
        [
            "tls-client-ca",
            None,
            None,
            "CA file for client certificates: asked for, not required (SASL EXTERNAL).",
        ],
        [
            "max-message-size",
            None,
            25 * 1024 * 1024,
            "Largest message the SMTP/LMTP receiver accepts (SIZE), e.g. 25M.",
            _size,
        ],
        [
            "quota-bytes",
            None,
            None,
            "Mailbox quota for delivery, e.g. 1G; a user's quota_bytes= in the password"
            " file overrides it.",
            parse_size,
        ],
        [
            "quota-messages",
            None,
            None,
            "Messages a mailbox may hold, for delivery; a user's quota_messages="
            " overrides it.",
            parse_count,
        ],
        [
            "recipient-delimiter",
            None,
            "+",
            "Delivery to user+tag@domain goes to user ('' turns it off).",
        ],
        [
            "tls-reload-interval",
            None,
            60.0,
            "Seconds between checks for renewed certificate files (SIGHUP reloads at once).",
            _positive_float,
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics on this endpoint, e.g. tcp:9110:interface=127.0.0.1.",
        ],
    ])

    optFlags: ClassVar[list[list[Any]]] = [
        [
            "allow-mixed-script-names",
            None,
            "Accept user names that mix scripts (Latin with Cyrillic or Greek letters),"
            " refused by default: they can look exactly like another user's name.",
        ],
        [
            "allow-cleartext-auth",
            None,
            "Allow USER/PASS without TLS from non-local clients (off: only under TLS"
            " or from 127.0.0.0/8 and ::1).",
        ],
        [
            "allow-cleartext-apop",
            None,
            "Allow APOP without TLS from non-local clients.",
        ],
        [
            "follow-maildir-symlinks",
            None,
            "Follow symbolic links in the part of --maildir from {user} on (such as"
            " /home/alice/Maildir -> /srv/mail/alice). Off: refused and logged, so a user"
            " cannot point the server at files that are not theirs. Never inside a Maildir.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["pop3"] = []
        self["pop3s"] = []
        self["tls-cert"] = []
        self["tls-key"] = []
        self["master-user"] = []
        self["smtp"] = []
        self["lmtp"] = []
        self["domain"] = []
        self["trusted-network"] = []

    def opt_pop3(self, endpoint: str) -> None:
        """POP3 listener, a Twisted endpoint string (repeatable). E.g. tcp:110,
        systemd:domain=INET:index=0"""
        self["pop3"].append(endpoint)

    def opt_pop3s(self, endpoint: str) -> None:
        """POP3 over TLS from the first byte (RFC 8314), an endpoint string
        (repeatable; needs --tls-cert). E.g. tcp:995"""
        self["pop3s"].append(endpoint)

    def opt_tls_cert(self, path: str) -> None:
        """PEM certificate chain (repeatable: SNI picks by host name), or a
        directory of them (Let's Encrypt's live/). Turns on STLS."""
        self["tls-cert"].append(path)

    def opt_master_user(self, name: str) -> None:
        """A user who may log in as any other with its own password, by naming
        the other as the SASL authorization identity (repeatable)."""
        self["master-user"].append(name)

    def opt_smtp(self, endpoint: str) -> None:
        """Receive mail for local users by SMTP, an endpoint string (repeatable;
        off unless given). E.g. tcp:25, tcp:2525:interface=127.0.0.1"""
        self["smtp"].append(endpoint)

    def opt_lmtp(self, endpoint: str) -> None:
        """Receive mail from the local MTA by LMTP (repeatable; off unless
        given). E.g. unix:/run/popserv/lmtp.sock"""
        self["lmtp"].append(endpoint)

    def opt_domain(self, domain: str) -> None:
        """A mail domain whose users' mail SMTP accepts (repeatable)."""
        self["domain"].append(domain)

    def opt_trusted_network(self, network: str) -> None:
        """A network (CIDR) of clients such as a webmail or a proxy, each
        speaking for many users: exempt from --max-connections-per-ip and the
        growing failed-login delay (repeatable)."""
        try:
            self["trusted-network"].append(ipaddress.ip_network(network, strict=False))
        except ValueError:
            raise usage.UsageError(f"--trusted-network: not a network: {network!r}") from None

    def opt_tls_key(self, path: str) -> None:
        """PEM private key of the --tls-cert in the same position (repeatable;
        not needed when the certificate file holds its key)."""
        self["tls-key"].append(path)

    def opt_version(self) -> NoReturn:
        """Print popserv's version and exit."""
        import twisted

        print(f"popserv {__version__} (Twisted {twisted.__version__})")
        sys.exit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Under twistd, a bad option ends the process with the usage line and
        one line naming the problem (twistd's own handler would print the
        whole help above it, on stdout, and exit 1); elsewhere, as usual,
        :class:`UsageError`.
        """
        if not under_twistd(self):
            super().parseOptions(options)
            return
        try:
            with exit_on_startup_error(self):
                super().parseOptions(options)
        except usage.UsageError as e:
            more = "; twistd popserv --help lists the options"
            exit_at_startup(self, str(e), EXIT_CONFIG, usage_line=self.getSynopsis() + more)

    def getUsage(self, width: int | None = None) -> str:
        """Every option, in :data:`HELP_GROUPS`, each text wrapped under its name."""
        width = width or HELP_WIDTH
        fill = textwrap.TextWrapper(
            width=width,
            initial_indent=" " * 8,
            subsequent_indent=" " * 8,
            break_on_hyphens=False,
            break_long_words=False,
        ).fill
        shorts = {long: short for short, long in self.synonyms.items() if len(short) == 1}
        parameters = {name.rstrip("=") for name in self.longOpt if name.endswith("=")}
        parts = ["", textwrap.fill(self.longdesc, width), ""]
        for title, names in HELP_GROUPS:
            parts.append(f"{title}:")
            for name in names:
                head = f"--{name}"
                if name in shorts:
                    head = f"-{shorts[name]}, {head}"
                if name in parameters:
                    head += " " + METAVARS.get(name, "N")
                text = " ".join((self.docs.get(name) or "").split())
                if text and not text.endswith("."):
                    text += "."
                default = DEFAULT_TEXTS.get(name) or _default_text(self.defaults.get(name))
                if default is not None and name in parameters:
                    text += f" Default: {default}."
                parts += [f"  {head}", fill(text)]
            parts.append("")
        return "\n".join(parts)

    def postOptions(self) -> None:
        if not self["pop3"] and not self["pop3s"]:
            self["pop3"] = [DEFAULT_POP3_ENDPOINT]
        for option in LISTENER_OPTIONS:
            for description in self[option]:
                if not description.startswith("systemd:"):
                    # systemd's sockets exist only under systemd: checked at start.
                    endpoint(option, description)
        try:
            Layout.create(self["data"], self["passwd"], self["maildir"])
        except ValueError as e:
            raise usage.UsageError(f"--maildir {self['maildir']!r}: {e}") from None
        if self["pop3s"] and not self["tls-cert"]:
            raise usage.UsageError("--pop3s needs a certificate: give --tls-cert")
        if self["tls-key"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-key needs a --tls-cert")
        if self["auth-failure-max-delay"] < self["auth-failure-delay"]:
            raise usage.UsageError("--auth-failure-max-delay must be >= --auth-failure-delay")
        rules = username_rules(self)
        for name in self["master-user"]:
            try:
                rules.normalize(name)
            except InvalidUsername as e:
                raise usage.UsageError(f"--master-user {name!r}: {e.detail}") from None
        if self["tls-min-version"] not in VERSIONS:
            raise usage.UsageError(f"--tls-min-version must be one of {', '.join(VERSIONS)}")
        try:
            self["tls"] = tls_server(self)
        except CertificateError as e:
            raise StartupError(str(e)) from None
        self["oauth"] = token_validator(self)


#: The options that name endpoints to listen on.
LISTENER_OPTIONS = ("pop3", "pop3s", "smtp", "lmtp")


def endpoint(option: str, description: str, reactor: Any = None) -> Any:
    """
    The server endpoint ``description`` names (nothing listens yet), or a
    usage error naming ``--option``: an unknown type (``tpc:110``), a
    missing or impossible port, a systemd socket that was not passed.
    """
    from twisted.internet.endpoints import serverFromString

    if reactor is None:
        from twisted.internet import reactor
    try:
        made = serverFromString(reactor, description)
    except (ValueError, TypeError) as e:
        raise usage.UsageError(f"--{option} {description!r}: {e}") from None
    except (IndexError, KeyError):
        raise usage.UsageError(
            f"--{option} {description!r}: systemd passed no such socket"
            " (LISTEN_FDS; start popserv from its .socket unit)"
        ) from None
    # TCP endpoints keep the port as given; the kernel would refuse it only
    # when listening (as OverflowError: port must be 0-65535).
    port = getattr(made, "_port", 0)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise usage.UsageError(f"--{option} {description!r}: the port must be 0 to 65535")
    return made


def username_rules(options: Mapping[str, Any]) -> UsernameRules:
    """How user names match: ``--username-case`` and ``--allow-mixed-script-names``."""
    return UsernameRules(
        options.get("username-case") or FOLD, bool(options.get("allow-mixed-script-names"))
    )


def tls_server(options: Mapping[str, Any]) -> TLSServer | None:
    """
    The TLS server the options describe, certificates loaded, or None when
    there is no ``tls-cert``.  Raises :class:`CertificateError` (one line).
    """
    certs = options.get("tls-cert") or []
    if not certs:
        return None
    client_ca = options.get("tls-client-ca")
    config = TLSConfig(
        find_certificates(certs, options.get("tls-key") or []),
        min_version=options.get("tls-min-version") or "1.2",
        ciphers=options.get("tls-ciphers") or INTERMEDIATE_CIPHERS,
        client_ca=Path(client_ca) if client_ca else None,
    )
    return TLSServer(config)


def token_validator(options: Mapping[str, Any]) -> JWTValidator | None:
    """The OAuth token validator the options describe, or None; StartupError if unusable."""
    key = options.get("oauth-key")
    if not key:
        return None
    try:
        return JWTValidator.from_file(
            key,
            issuer=options.get("oauth-issuer"),
            audience=options.get("oauth-audience"),
            claim=options.get("oauth-user-claim") or "sub",
        )
    except OSError as e:
        raise StartupError(f"--oauth-key {key}: {(e.strerror or str(e)).lower()}") from None
    except ValueError as e:
        raise StartupError(f"--oauth-key {key}: {e}") from None
