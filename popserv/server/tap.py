"""The ``twistd popserv`` command line."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from twisted.python import usage

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
from popserv.stores.layout import DEFAULT_DATA_DIR
from popserv.stores.maildir.uidls import DOVECOT, UidlScheme, parse_uidl_format
from popserv.stores.quota import parse_count, parse_size

#: Loopback only, on a port that needs no root: safe for a first start.
DEFAULT_POP3_ENDPOINT = "tcp:1110:interface=127.0.0.1"


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

    optParameters: ClassVar[list[list[Any]]] = [
        ["data", "d", DEFAULT_DATA_DIR, "Data directory (password file, Maildirs)."],
        ["passwd", None, None, "Password file (default: DATA/passwd)."],
        ["maildir", None, None, "Maildir path template with {user} (default: DATA/mail/{user})."],
        ["hostname", None, None, "Host name for the greeting (default: the FQDN)."],
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
            parse_expire,
        ],
        [
            "apop",
            None,
            None,
            "Offer APOP: yes, no, or auto (default: when an account"
            " has a password APOP can use, i.e. stored PLAIN).",
            _tristate,
        ],
        [
            "sasl",
            None,
            None,
            "SASL mechanisms to offer, comma-separated, or auto (default: PLAIN and LOGIN,"
            " and CRAM-MD5 when every account has a PLAIN or CRAM-MD5 password).",
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
            "OpenSSL cipher list for TLS 1.2 (default: Mozilla intermediate).",
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
            "Default mailbox quota for delivery, e.g. 1G (users may override it with"
            " quota_bytes= in the password file).",
            parse_size,
        ],
        [
            "quota-messages",
            None,
            None,
            "Default limit of messages per mailbox for delivery.",
            parse_count,
        ],
        [
            "recipient-delimiter",
            None,
            "+",
            "Delivery to user+tag@domain goes to user ('' to turn it off).",
        ],
        [
            "tls-reload-interval",
            None,
            60.0,
            "Seconds between checks for renewed certificate files (SIGHUP reloads at once).",
            _positive_float,
        ],
    ]

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
        """POP3 listener, a Twisted endpoint string (repeatable; default
        tcp:1110:interface=127.0.0.1). E.g. tcp:110, systemd:domain=INET:index=0"""
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
        """A mail domain whose users' mail SMTP accepts (repeatable; default:
        the host name and localhost)."""
        self["domain"].append(domain)

    def opt_trusted_network(self, network: str) -> None:
        """A network (CIDR) of clients such as a webmail or a proxy, each
        speaking for many users: exempt from --max-connections-per-ip and the
        growing failed-login delay (repeatable; default: none)."""
        try:
            self["trusted-network"].append(ipaddress.ip_network(network, strict=False))
        except ValueError:
            raise usage.UsageError(f"--trusted-network: not a network: {network!r}") from None

    def opt_tls_key(self, path: str) -> None:
        """PEM private key of the --tls-cert in the same position (repeatable;
        not needed when the certificate file holds its key)."""
        self["tls-key"].append(path)

    def postOptions(self) -> None:
        if not self["pop3"] and not self["pop3s"]:
            self["pop3"] = [DEFAULT_POP3_ENDPOINT]
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
            # A usage error would bury the line under the whole option help.
            raise SystemExit(f"popserv: {e}") from None
        self["oauth"] = token_validator(self)


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
    """The OAuth token validator the options describe, or None; one-line exit if unusable."""
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
        raise SystemExit(f"popserv: {key}: {e.strerror or e}") from None
    except ValueError as e:
        raise SystemExit(f"popserv: {key}: {e}") from None
