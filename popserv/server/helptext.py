"""
``twistd popserv --help``: the options in groups, a newcomer's first, each
with what its value is and its default in words.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from popserv.server.configure import DEFAULT_POP3_ENDPOINT

if TYPE_CHECKING:
    from popserv.server.tap import Options

#: ``--help`` in groups, those a newcomer needs first; docs/options.rst has
#: the same groups in the same order (a test compares them).
HELP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Listening",
        (
            "pop3",
            "pop3s",
            "hostname",
            "metrics",
            "autoconfig",
            "submission",
            "public-port",
            "workers",
            "shutdown-grace",
        ),
    ),
    (
        "Data",
        (
            "data",
            "passwd",
            "maildir",
            "follow-maildir-symlinks",
            "uidl-format",
            "database",
            "store",
            "maildrop-lock",
            "maildrop-lease",
            "database-query",
            "database-connections",
        ),
    ),
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
            "max-listed",
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
    ("Logs", ("log-format",)),
    ("Other", ("help", "version")),
)

#: What each option's value is, in ``--help``.
METAVARS = {
    "pop3": "ENDPOINT",
    "pop3s": "ENDPOINT",
    "metrics": "ENDPOINT",
    "autoconfig": "ENDPOINT",
    "submission": "HOST:PORT",
    "public-port": "SERVICE=PORT",
    "smtp": "ENDPOINT",
    "lmtp": "ENDPOINT",
    "hostname": "NAME",
    "data": "DIR",
    "passwd": "FILE",
    "maildir": "TEMPLATE",
    "database": "URL",
    "database-query": "SQL",
    "store": "maildir|postgresql",
    "maildrop-lock": "shared|exclusive",
    "maildrop-lease": "SECONDS",
    "database-connections": "N",
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
    "max-listed": "N",
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
    "log-format": "text|json",
    "workers": "N|auto",
    "shutdown-grace": "SECONDS",
}

#: Defaults ``--help`` shows in words rather than as the stored value.
DEFAULT_TEXTS = {
    "metrics": "off",
    "autoconfig": "off",
    "submission": "none",
    "pop3": DEFAULT_POP3_ENDPOINT,
    "passwd": "DIR/passwd, created with a first user on the first start",
    "maildir": "DIR/mail/{user}",
    "database": "none: the password file",
    "database-query": "Postfixadmin's mailbox table",
    "hostname": "the FQDN",
    "tls-ciphers": "Mozilla intermediate",
    "apop": "auto",
    "sasl": "auto",
    "expire": "NEVER",
    "domain": "the host name and localhost",
    "max-message-size": "25M",
    "quota-bytes": "none",
    "quota-messages": "none",
    "max-listed": "0, all",
}

#: Width of ``--help``, whatever the terminal: texts are read, not scanned.
HELP_WIDTH = 79


def _default_text(value: object) -> str | None:
    if value is None or value == []:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def grouped_usage(options: Options, width: int | None = None) -> str:
    """Every option of ``options``, in :data:`HELP_GROUPS`, each text wrapped under its name."""
    width = width or HELP_WIDTH
    fill = textwrap.TextWrapper(
        width=width,
        initial_indent=" " * 8,
        subsequent_indent=" " * 8,
        break_on_hyphens=False,
        break_long_words=False,
    ).fill
    shorts = {long: short for short, long in options.synonyms.items() if len(short) == 1}
    parameters = {name.rstrip("=") for name in options.longOpt if name.endswith("=")}
    parts = ["", textwrap.fill(options.longdesc, width), ""]
    for title, names in HELP_GROUPS:
        parts.append(f"{title}:")
        for name in names:
            head = f"--{name}"
            if name in shorts:
                head = f"-{shorts[name]}, {head}"
            if name in parameters:
                head += " " + METAVARS.get(name, "N")
            text = " ".join((options.docs.get(name) or "").split())
            if text and not text.endswith("."):
                text += "."
            default = DEFAULT_TEXTS.get(name) or _default_text(options.defaults.get(name))
            if default is not None and name in parameters:
                text += f" Default: {default}."
            parts += [f"  {head}", fill(text)]
        parts.append("")
    return "\n".join(parts)
