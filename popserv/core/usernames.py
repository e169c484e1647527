"""
Which user names popserv accepts, and the one form each is looked up under.

A user name becomes a directory name and a field of the password file, so
anything that could leave the data directory or break the ``:``-separated
format is refused before it reaches either.

Every name a login, a delivery or the ``popserv`` command is given goes
through :func:`normalize_username` before it is looked up: SASLprep (NFKC,
RFC 4013, as RFC 6856 asks of a POP3 server's user names), so ``alice`` in
full-width letters (U+FF41...) is ``alice``; lower case when the rules fold
case (the default: ``ALICE`` is ``alice``); and the checks of
:func:`validate_username`, which by default refuse a name that mixes
scripts, the homoglyph trick that makes ``alice`` with a Cyrillic a
(U+0430) look like ``alice``.
"""

from __future__ import annotations

import unicodedata

from attrs import field, frozen
from attrs.validators import in_
from confusable_homoglyphs.categories import alias as script_of
from scramp.utils import ScramException, saslprep

from popserv.core.errors import InvalidUsername
from popserv.core.wire import loggable

#: Long enough for ``local-part@domain`` addresses (RFC 5321 limits a path to 256).
MAX_USERNAME_LENGTH = 255

_FORBIDDEN = frozenset("/\\:\x00")

#: ``--username-case``: names matched whatever their case, or exactly.
FOLD, KEEP = "fold", "keep"
CASES = (FOLD, KEEP)

#: Scripts that go with any other (Unicode's Scripts.txt): digits,
#: punctuation and symbols (Common), and combining marks (Inherited), which
#: take the script of the letter they sit on.
_ANY_SCRIPT = frozenset({"COMMON", "INHERITED"})

#: Scripts one writing system uses together, each also with Latin: UTS #39
#: section 5.2's "Highly Restrictive" level (ICU's default), so Japanese
#: (Han, Hiragana, Katakana), Korean (Han, Hangul) and Chinese with
#: Bopomofo pass, and Latin with Cyrillic or Greek does not.
_USED_TOGETHER = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
)


def mixes_scripts(name: str) -> bool:
    """
    True when ``name`` has letters of scripts not written together, such
    as Latin with Cyrillic (UTS #39 mixed-script detection, on the Script
    property).  Any single script is fine: ``иван`` as much as ``ivan``.
    """
    if name.isascii():
        return False
    scripts = {script_of(char) for char in name} - _ANY_SCRIPT
    return len(scripts) > 1 and not any(scripts <= system for system in _USED_TOGETHER)


def validate_username(name: str, *, mixed_scripts: bool = False) -> str:
    """
    Return ``name`` if it is a safe user name, else raise :class:`InvalidUsername`.

    Refused: empty names, over-long names, ``/``, ``\\``, ``:``, NUL, any
    control or whitespace character, a leading ``.`` (``.``, ``..`` and
    hidden files) or ``-`` (would read as an option to tools), a name not
    in SASLprep form (NFKC), and unless ``mixed_scripts``, a name that
    :func:`mixes_scripts`.
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
        if _prepared(name) != name:
            raise InvalidUsername("user name not in SASLprep form (NFKC)")
        if not mixed_scripts and mixes_scripts(name):
            raise InvalidUsername("user name mixes scripts")
    return name


def is_valid_username(name: str, *, mixed_scripts: bool = False) -> bool:
    """True when :func:`validate_username` accepts ``name``."""
    try:
        validate_username(name, mixed_scripts=mixed_scripts)
    except InvalidUsername:
        return False
    return True


@frozen
class UsernameRules:
    """
    How names are matched: ``case`` is :data:`FOLD` (``ALICE`` is
    ``alice``) or :data:`KEEP` (exact, as RFC 5321 allows for local parts);
    ``mixed_scripts`` accepts names that :func:`mixes_scripts`.
    """

    case: str = field(default=FOLD, validator=in_(CASES))
    mixed_scripts: bool = False

    def normalize(self, name: str) -> str:
        """:func:`normalize_username` under these rules."""
        return normalize_username(name, self)

    def key(self, valid: str) -> str:
        """
        :meth:`normalize` of a name :func:`validate_username` accepted, at
        less cost for an ASCII one (lower-casing ASCII changes nothing the
        validation looks at): for reading a large password file.
        """
        if valid.isascii():
            return valid.lower() if self.case == FOLD else valid
        return self.normalize(valid)


#: The defaults of ``twistd popserv`` and the ``popserv`` command.
DEFAULT_RULES = UsernameRules()


def normalize_username(name: str, rules: UsernameRules = DEFAULT_RULES) -> str:
    """
    The form ``name`` is looked up under, and ``popserv user add`` stores:
    SASLprep'd (NFKC), lower-cased when ``rules`` fold case, and valid
    (:func:`validate_username`); else :class:`InvalidUsername`.

    Idempotent, so a stored name that is already normal is its own key.
    """
    prepared = _prepared(name) if not name.isascii() else name
    if rules.case == FOLD:
        # Unicode toLowerCase, as PRECIS's UsernameCaseMapped profile chose
        # (RFC 8265 section 3.3.2) over case folding, which makes ß "ss".
        prepared = prepared.lower()
        if not prepared.isascii():
            prepared = _prepared(prepared)
    return validate_username(prepared, mixed_scripts=rules.mixed_scripts)


def loggable_username(value: bytes | str | None) -> str:
    """
    A login name for one log line: NFKC'd (a full-width name shows as
    ASCII) and, when it is a name popserv accepts, shown as it is; any
    other is escaped like every client value (:func:`popserv.core.wire.loggable`),
    so a Cyrillic a (U+0430) among Latin letters shows as ``\\u0430``.
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return loggable(value)
    if value is None or value.isascii():
        return loggable(value)
    try:
        value = _prepared(value)
    except InvalidUsername:
        return loggable(value)
    return value[:64] if is_valid_username(value) else loggable(value)


def _prepared(name: str) -> str:
    try:
        prepared: str = saslprep(name)  # scramp is not annotated
    except ScramException:
        raise InvalidUsername("user name refused by SASLprep") from None
    return prepared
