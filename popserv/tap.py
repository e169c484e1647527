"""The ``twistd popserv`` command line."""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.python import usage

from popserv.accounts import parse_expire, parse_login_delay
from popserv.layout import DEFAULT_DATA_DIR

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


def _tristate(value: str) -> bool | None:
    """``yes``/``no``/``auto`` as True/False/None."""
    choices = {"yes": True, "on": True, "no": False, "off": False, "auto": None}
    try:
        return choices[value.strip().lower()]
    except KeyError:
        raise ValueError("must be yes, no or auto") from None


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
            "idle-timeout",
            None,
            600.0,
            "Seconds idle before autologout (RFC 1939: >= 600).",
            _positive_float,
        ],
        [
            "auth-failure-delay",
            None,
            2.0,
            "Seconds before answering a failed login.",
            _non_negative_float,
        ],
        [
            "max-auth-failures",
            None,
            3,
            "Failed logins before the connection closes.",
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self["pop3"] = []

    def opt_pop3(self, endpoint: str) -> None:
        """POP3 listener, a Twisted endpoint string (repeatable; default
        tcp:1110:interface=127.0.0.1). E.g. tcp:110, systemd:domain=INET:index=0"""
        self["pop3"].append(endpoint)

    def postOptions(self) -> None:
        if not self["pop3"]:
            self["pop3"] = [DEFAULT_POP3_ENDPOINT]
