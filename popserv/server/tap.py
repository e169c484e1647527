"""
The ``twistd popserv`` command line: :class:`Options`, each option with its
parser and default, and the checks across options once all are parsed.
The parsers are in :mod:`popserv.server.optionvalues`, ``--help`` in
:mod:`popserv.server.helptext`, what the options describe (endpoints, TLS,
tokens) in :mod:`popserv.server.configure`.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Any, ClassVar, NoReturn

from twisted.python import usage

from popserv._version import __version__
from popserv.core.errors import InvalidUsername
from popserv.core.usernames import FOLD
from popserv.logins.accounts import parse_login_delay, parse_max_listed
from popserv.server import optionvalues as values
from popserv.server.clientsetup import parse_public_port, parse_submission
from popserv.server.configure import (
    DEFAULT_POP3_ENDPOINT,
    LISTENER_OPTIONS,
    endpoint,
    tls_server,
    token_validator,
    username_rules,
)
from popserv.server.drain import SHUTDOWN_GRACE
from popserv.server.helptext import grouped_usage
from popserv.server.logformat import JSON, TEXT, parse_log_format, use_json
from popserv.server.policy import Policy
from popserv.server.startup import (
    EXIT_CONFIG,
    StartupError,
    exit_at_startup,
    exit_on_startup_error,
    under_twistd,
)
from popserv.server.tls import INTERMEDIATE_CIPHERS, VERSIONS, CertificateError
from popserv.stores.layout import DEFAULT_DATA_DIR, Layout
from popserv.stores.maildir.uidls import DOVECOT
from popserv.stores.postgres.mailbox import LEASE_SECONDS
from popserv.stores.quota import parse_count, parse_size

#: The Policy defaults, which the options show.
_DEFAULTS = Policy(hostname="localhost")


class Options(usage.Options):
    """Options of ``twistd popserv``."""

    synopsis = "[options]"
    longdesc = (
        "Serve POP3 from one Maildir per user, with logins checked against a "
        "Dovecot-style password file. With no options: 127.0.0.1:1110 and "
        "./popserv-data, creating a first account on the first start."
    )

    optParameters: ClassVar[list[list[Any]]] = values.naming_the_option([
        ["data", "d", DEFAULT_DATA_DIR, "Data directory (password file, Maildirs)."],
        ["passwd", None, None, "The password file; when given, it must exist."],
        [
            "maildir",
            None,
            None,
            "Where Maildirs are: a path template with {user}, or {local} and {domain}.",
        ],
        [
            "database",
            None,
            None,
            "Accounts in PostgreSQL, e.g. postgresql://popserv@db/mail (the password in"
            " PGPASSWORD or PGPASSFILE, never in the URL), in place of the password file.",
            values.database_url,
        ],
        [
            "store",
            None,
            "maildir",
            "Where mail is kept: maildir (files under --maildir) or postgresql (in the"
            " --database, whose tables `popserv db init` creates).",
            values.store,
        ],
        [
            "maildrop-lock",
            None,
            "shared",
            "shared: several sessions of a user at once (a phone and a desktop), each"
            " seeing the mail as it was at its login, its deletions applied at QUIT to"
            " what is still there; exclusive: one at a time, others get -ERR [IN-USE]"
            " (RFC 1939's lock).",
            values.maildrop_lock,
        ],
        [
            "maildrop-lease",
            None,
            LEASE_SECONDS,
            "With --store postgresql: seconds a session's hold on its maildrop lasts"
            " unless renewed (every third of it), so how long the users of a process"
            " that died must wait.",
            values.positive_float,
        ],
        [
            "database-query",
            None,
            None,
            "The SQL that reads one account, with %(user)s for the name; it returns"
            " password and optionally user, active, quota, login_delay, expire, max_listed.",
            values.database_query,
        ],
        [
            "database-connections",
            None,
            8,
            "Connections to the database each process may hold.",
            values.positive_int,
        ],
        ["hostname", None, None, "Host name for the greeting and SMTP."],
        [
            "username-case",
            None,
            FOLD,
            "How user names match: fold (Alice, ALICE and alice are one user, as"
            " Dovecot's auth_username_format=%Lu) or keep (exactly, as RFC 5321 allows)."
            " Either way names are NFKC-normalised. Give the popserv command the same.",
            values.username_case,
        ],
        [
            "idle-timeout",
            None,
            600.0,
            "Seconds idle before autologout (RFC 1939: >= 600).",
            values.positive_float,
        ],
        [
            "login-timeout",
            None,
            _DEFAULTS.login_timeout,
            "Seconds from connecting to logging in, TLS handshake included, before the"
            " connection is closed (a total, not reset by activity).",
            values.positive_float,
        ],
        [
            "auth-failure-delay",
            None,
            _DEFAULTS.auth_failure_delay,
            "Seconds before answering a client's first failed login; each further"
            " failure from the same client doubles it.",
            values.non_negative_float,
        ],
        [
            "auth-failure-max-delay",
            None,
            _DEFAULTS.auth_failure_max_delay,
            "The longest failed-login delay.",
            values.non_negative_float,
        ],
        [
            "max-auth-failures",
            None,
            _DEFAULTS.max_auth_failures,
            "Failed logins before the connection closes.",
            values.positive_int,
        ],
        [
            "max-connections",
            None,
            _DEFAULTS.max_connections,
            "Connections open at once, in all.",
            values.positive_int,
        ],
        [
            "max-connections-per-ip",
            None,
            _DEFAULTS.max_connections_per_ip,
            "Connections open at once from one IPv4 address or IPv6 network (--ipv6-prefix).",
            values.positive_int,
        ],
        [
            "ipv6-prefix",
            None,
            _DEFAULTS.ipv6_prefix,
            "IPv6 clients are counted and penalised per network of this many bits.",
            values.prefix_length,
        ],
        [
            "max-user-sessions",
            None,
            _DEFAULTS.max_user_sessions,
            "Sessions logged in at once as one user.",
            values.positive_int,
        ],
        [
            "max-line-length",
            None,
            _DEFAULTS.max_line_length,
            "Longest command line in octets, CRLF included (RFC 2449: 255).",
            values.at_least(255),
        ],
        [
            "max-auth-line-length",
            None,
            _DEFAULTS.max_auth_line_length,
            "Longest AUTH line or SASL response in octets (OAuth tokens need a few KB).",
            values.at_least(255),
        ],
        [
            "max-queued-commands",
            None,
            _DEFAULTS.max_queued_commands,
            "Pipelined commands read ahead; reading pauses while this many wait.",
            values.positive_int,
        ],
        [
            "max-bad-commands",
            None,
            _DEFAULTS.max_bad_commands,
            "Bad command lines in a row before the connection closes (Dovecot: 10).",
            values.positive_int,
        ],
        [
            "max-listed",
            None,
            0,
            "Sessions see only the newest N messages, numbered from 1; the others stay"
            " untouched (for clients that choke on huge maildrops). 0: all.",
            parse_max_listed,
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
            values.expire,
        ],
        [
            "apop",
            None,
            None,
            "Offer APOP: yes, no, or auto (when an account has a password APOP"
            " can use, i.e. stored PLAIN).",
            values.tristate,
        ],
        [
            "sasl",
            None,
            None,
            "SASL mechanisms to offer, comma-separated, or auto: PLAIN and LOGIN; CRAM-MD5"
            " and SCRAM while every account has a secret they can use; EXTERNAL with"
            " --tls-client-ca; OAUTHBEARER and XOAUTH2 with --oauth-key.",
            values.mechanisms,
        ],
        [
            "external-identity",
            None,
            "cn",
            "How SASL EXTERNAL maps a client certificate to a user: cn, email or email-local.",
            values.identity_rule,
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
            values.uidl_format,
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
            values.size,
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
            values.positive_float,
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics, and /health for a load balancer, on this endpoint,"
            " e.g. tcp:9110:interface=127.0.0.1.",
        ],
        [
            "autoconfig",
            None,
            None,
            "Serve mail clients' self-configuration (Thunderbird's config-v1.1.xml,"
            " Outlook's autodiscover.xml) over HTTP on this endpoint, e.g."
            " tcp:8080:interface=127.0.0.1 behind the web server holding autoconfig.DOMAIN's"
            " certificate. Needs --submission and TLS.",
        ],
        [
            "submission",
            None,
            None,
            "The SMTP submission server clients send mail through (not popserv), HOST:PORT:"
            " 465 is TLS from the first byte, any other port STARTTLS; for --autoconfig and"
            " popserv dns.",
            parse_submission,
        ],
        [
            "workers",
            None,
            1,
            "Worker processes serving the listeners, or auto (one per CPU): the parent"
            " binds every listener and shares the limits; 1 is one process, no parent.",
            values.workers,
        ],
        [
            "shutdown-grace",
            None,
            SHUTDOWN_GRACE,
            "Seconds open sessions have to finish when the server stops (SIGTERM):"
            " it stops accepting at once, closes sessions not logged in, and at the end"
            " closes the rest; deletions without a QUIT are not applied.",
            values.shutdown_grace,
        ],
        [
            "log-format",
            None,
            TEXT,
            "text (twistd's lines) or json (one object per line, for Loki or ELK), to"
            " twistd's --logfile or standard output; json cannot go to --syslog.",
            parse_log_format,
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
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's usage.Options
        self["pop3"] = []
        self["pop3s"] = []
        self["tls-cert"] = []
        self["tls-key"] = []
        self["master-user"] = []
        self["smtp"] = []
        self["lmtp"] = []
        self["domain"] = []
        self["trusted-network"] = []
        self["public-port"] = []

    def opt_pop3(self, endpoint: str) -> None:
        """POP3 listener, a Twisted endpoint string (repeatable). E.g. tcp:110,
        systemd:domain=INET:index=0"""
        self["pop3"].append(endpoint)

    def opt_pop3s(self, endpoint: str) -> None:
        """POP3 over TLS from the first byte (RFC 8314), an endpoint string
        (repeatable; needs --tls-cert). E.g. tcp:995"""
        self["pop3s"].append(endpoint)

    def opt_public_port(self, value: str) -> None:
        """The port clients reach a service on, SERVICE=PORT (pop3s or pop3;
        repeatable), for --autoconfig and popserv dns when the listener's own
        port is not it (behind HAProxy or a port forward). Default: the first
        --pop3s or --pop3 endpoint's port; 995 or 110 for systemd: and haproxy:."""
        try:
            self["public-port"].append(parse_public_port(value))
        except ValueError as e:
            raise usage.UsageError(f"--public-port: {e}") from None

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
        #: The arguments as given, for worker processes to parse again.
        self.arguments = list(sys.argv[1:] if options is None else options)
        if not under_twistd(self):
            super().parseOptions(options)  # type: ignore[no-untyped-call]  # Twisted's usage.Options
            return
        try:
            with exit_on_startup_error(self):
                super().parseOptions(options)  # type: ignore[no-untyped-call]  # Twisted's usage.Options
        except usage.UsageError as e:
            more = "; twistd popserv --help lists the options"
            exit_at_startup(self, str(e), EXIT_CONFIG, usage_line=self.getSynopsis() + more)

    def getUsage(self, width: int | None = None) -> str:
        """Every option, in groups (:func:`~popserv.server.helptext.grouped_usage`)."""
        return grouped_usage(self, width)

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
        if self["log-format"] == JSON and under_twistd(self):
            try:
                use_json(self.parent)
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
