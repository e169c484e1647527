"""
Which user names popserv accepts.

A user name becomes a directory name and a field of the password file, so
anything that could leave the data directory or break the ``:``-separated
format is refused before it reaches either.
"""

from __future__ import annotations

import unicodedata

from scramp.utils import ScramException, saslprep

from popserv.errors import InvalidUsername

#: Long enough for ``local-part@domain`` addresses (RFC 5321 limits a path to 256).
MAX_USERNAME_LENGTH = 255

_FORBIDDEN = frozenset("/\\:\x00")


def validate_username(name: str) -> str:
    """
    Return ``name`` if it is a safe user name, else raise :class:`InvalidUsername`.

    Refused: empty names, over-long names, ``/``, ``\\``, ``:``, NUL, any
    control or whitespace character, a leading ``.`` (``.``, ``..`` and
    hidden files) or ``-`` (would read as an option to tools).
    """
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_USERNAME_LENGTH:
        raise InvalidUsername("empty or too long user name")
    if name[0] in ".-":
        raise InvalidUsername("user name starts with '.' or '-'")
    for char in name:
        if char in _FORBIDDEN or char.isspace():
            raise InvalidUsername("forbidden character in user name")
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            raise InvalidUsername("control character in user name")
    if not name.isascii():
        # Logins SASLprep the name they are given (RFC 6856); a name that
        # SASLprep changes or refuses could never be matched.
        try:
            prepared = saslprep(name)
        except ScramException:
            raise InvalidUsername("user name refused by SASLprep") from None
        if prepared != name:
            raise InvalidUsername("user name not in SASLprep form (NFKC)")
    return name


def is_valid_username(name: str) -> bool:
    """True when :func:`validate_username` accepts ``name``."""
    try:
        validate_username(name)
    except InvalidUsername:
        return False
    return True
