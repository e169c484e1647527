"""
Parsers of the ``twistd popserv`` option values: each takes the text given
and returns the value, or raises ValueError saying what is wrong in words;
:func:`naming_the_option` turns that into a usage error naming the option.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.python import usage

from popserv.core.usernames import CASES
from popserv.logins.accounts import parse_expire
from popserv.logins.sasl import MECHANISMS
from popserv.logins.sasl.external import RULES
from popserv.stores.maildir.uidls import UidlScheme, parse_uidl_format
from popserv.stores.quota import parse_size


def positive_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:  # nan compares false with everything
        raise ValueError("must be > 0")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be >= 0")
    return number


#: The longest ``--shutdown-grace``: a stop that takes longer looks like a hang
#: (systemd's TimeoutStopSec= is 90 s by default, and must be set above it).
MAX_SHUTDOWN_GRACE = 3600.0


def shutdown_grace(value: str) -> float:
    """``--shutdown-grace``: seconds, 0 (close every session at once) to an hour."""
    number = float(value)
    if not 0 <= number <= MAX_SHUTDOWN_GRACE:  # also refuses nan
        raise ValueError(f"must be 0 to {MAX_SHUTDOWN_GRACE:g}")
    return number


def database_url(value: str) -> str:
    """``--database``: a postgresql:// URL with no password in it."""
    from popserv.logins.database import check_url

    return check_url(value)


def database_query(value: str) -> str:
    """``--database-query``: SQL that takes the user name as ``%(user)s``."""
    if "%(user)s" not in value:
        raise ValueError("must take the user name as %(user)s")
    return value


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def workers(value: str) -> int:
    """``--workers``: a count, or ``auto`` for one per CPU this process may run on."""
    if value.strip().lower() == "auto":
        import os

        return max(1, len(os.sched_getaffinity(0)))
    return positive_int(value)


def size(value: str) -> int:
    size = parse_size(value)
    if size is None:
        raise ValueError("must be > 0")
    return size


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise ValueError(f"must be >= {minimum}")
        return number

    return parse


def prefix_length(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 128:
        raise ValueError("must be 1 to 128")
    return number


def tristate(value: str) -> bool | None:
    """``yes``/``no``/``auto`` as True/False/None."""
    choices = {"yes": True, "on": True, "no": False, "off": False, "auto": None}
    try:
        return choices[value.strip().lower()]
    except KeyError:
        raise ValueError("must be yes, no or auto") from None


def mechanisms(value: str) -> tuple[str, ...] | None:
    """``auto``, or a comma-separated list of SASL mechanism names popserv has."""
    if value.strip().lower() == "auto":
        return None
    names = tuple(name.strip().upper() for name in value.split(",") if name.strip())
    known = [m.name for m in MECHANISMS]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown: {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def uidl_format(value: str) -> UidlScheme:
    """``dovecot``, ``maildir`` or a Dovecot ``pop3_uidl_format`` such as ``%08Xu%08Xv``."""
    return parse_uidl_format(value.strip())


#: ``--store`` values.
STORES = ("maildir", "postgresql")
#: ``--maildrop-lock`` values.
MAILDROP_LOCKS = ("shared", "exclusive")


def maildrop_lock(value: str) -> str:
    if value not in MAILDROP_LOCKS:
        raise ValueError(f"must be one of {', '.join(MAILDROP_LOCKS)}")
    return value


def store(value: str) -> str:
    if value not in STORES:
        raise ValueError(f"must be one of {', '.join(STORES)}")
    return value


def username_case(value: str) -> str:
    if value not in CASES:
        raise ValueError(f"must be one of {', '.join(CASES)}")
    return value


def identity_rule(value: str) -> str:
    if value not in RULES:
        raise ValueError(f"must be one of {', '.join(RULES)}")
    return value


def expire(value: str) -> int | None:
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


def naming_the_option(parameters: list[list[Any]]) -> list[list[Any]]:
    """
    Make each coercer's ValueError a usage error that names the option and
    the value given; twistd's own says ``Parameter type enforcement failed``
    and names neither.
    """
    for parameter in parameters:
        if len(parameter) == 5:
            parameter[4] = _named(parameter[0], parameter[4])
    return parameters
