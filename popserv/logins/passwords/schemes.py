"""
Dovecot-compatible password schemes.

A stored password is ``{SCHEME}data`` as Dovecot's ``doveadm pw`` writes it,
so a Dovecot passwd-file works unchanged and ours works in Dovecot.  A field
without a ``{SCHEME}`` prefix is read as crypt(3) output, told apart by its
``$id$`` (``$argon2id$``, ``$2y$``, ``$6$`` ...), as Dovecot's ``CRYPT``
default does.

Pure: no Twisted, no I/O.  Hashing is slow on purpose (argon2id takes tens
of milliseconds), so servers call these functions from a thread pool.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any

from passlib.exc import PasswordValueError
from passlib.hash import argon2, bcrypt, md5_crypt, sha256_crypt, sha512_crypt

from popserv.logins.passwords import crammd5
from popserv.logins.passwords.scram import ScramKeys

DEFAULT_SCHEME = "ARGON2ID"

#: Every scheme name :func:`verify_password` understands (aliases aside).
#: ``CRYPT`` is the prefix-less crypt(3) form, told apart by its ``$id$``.
SCHEMES: tuple[str, ...] = (
    "ARGON2ID",
    "ARGON2I",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "MD5-CRYPT",
    "CRYPT",
    "SSHA512",
    "SSHA256",
    "SSHA",
    "SHA512",
    "SHA256",
    "SHA",
    "PLAIN",
    "PLAIN-B64",
    "CRAM-MD5",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
)

#: The schemes :func:`hash_password` writes.  The others are kept for
#: reading hashes made elsewhere: MD5-CRYPT and SHA-1 are too weak to create.
HASH_SCHEMES: tuple[str, ...] = (
    "ARGON2ID",
    "ARGON2I",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "SSHA512",
    "SSHA256",
    "SHA512",
    "SHA256",
    "PLAIN",
    "PLAIN-B64",
    "CRAM-MD5",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
)

#: Other names Dovecot accepts for the same schemes.
ALIASES: dict[str, str] = {
    "CLEAR": "PLAIN",
    "CLEARTEXT": "PLAIN",
    "MD5": "MD5-CRYPT",
    "SHA1": "SHA",
}

#: bcrypt reads only this many bytes of a password (the algorithm's limit).
BCRYPT_MAX_BYTES = 72

# Dovecot's argon2 defaults (libsodium's "moderate" limits cut down to
# m=64 MiB, t=3, p=1), the same for ARGON2I and ARGON2ID.
_ARGON2 = {"memory_cost": 65536, "time_cost": 3, "parallelism": 1}
# Cost 12 is about 0.25 s on a current core: OWASP asks for at least 10.
_BCRYPT_COST = 12
# 5000 is glibc's and doveadm's default, written without a ``rounds=``
# field, so the hashes read back in any crypt(3).  These two schemes are
# here for compatibility; ARGON2ID is the one to choose.
_SHA_CRYPT_ROUNDS = 5000
_SALT_BYTES = 16

# crypt(3) ``$id$`` prefixes, in the order they are tried.
_CRYPT_IDS: tuple[tuple[str, str], ...] = (
    ("$argon2id$", "ARGON2ID"),
    ("$argon2i$", "ARGON2I"),
    ("$2y$", "BLF-CRYPT"),
    ("$2b$", "BLF-CRYPT"),
    ("$2a$", "BLF-CRYPT"),
    ("$6$", "SHA512-CRYPT"),
    ("$5$", "SHA256-CRYPT"),
    ("$1$", "MD5-CRYPT"),
)

_CRYPT_HANDLERS: dict[str, Any] = {
    "ARGON2ID": argon2,
    "ARGON2I": argon2,
    "BLF-CRYPT": bcrypt,
    "SHA512-CRYPT": sha512_crypt,
    "SHA256-CRYPT": sha256_crypt,
    "MD5-CRYPT": md5_crypt,
}

# name -> (hashlib constructor, salted)
_DIGESTS: dict[str, tuple[Callable[..., Any], bool]] = {
    "SHA512": (hashlib.sha512, False),
    "SHA256": (hashlib.sha256, False),
    "SHA": (hashlib.sha1, False),
    "SSHA512": (hashlib.sha512, True),
    "SSHA256": (hashlib.sha256, True),
    "SSHA": (hashlib.sha1, True),
}


#: SCRAM scheme -> its hash, as ScramKeys names it.
_SCRAM = {"SCRAM-SHA-256": "SHA-256", "SCRAM-SHA-1": "SHA-1"}


class UnknownScheme(ValueError):
    """A scheme popserv does not know, or a stored hash it cannot read."""


class PasswordTooLong(ValueError):
    """The password is longer than the scheme can use (bcrypt: 72 bytes)."""


def canonical_scheme(name: str) -> str:
    """The canonical upper-case name of ``name``, or raise :class:`UnknownScheme`."""
    upper = name.strip().upper()
    upper = ALIASES.get(upper, upper)
    if upper not in SCHEMES:
        raise UnknownScheme(f"unknown password scheme {name!r}")
    return upper


def hash_password(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    """
    The stored form of ``password`` in ``scheme``, ``{SCHEME}`` prefix included.

    Raises :class:`UnknownScheme` for a scheme that is unknown or only read,
    :class:`PasswordTooLong` for a BLF-CRYPT password over 72 bytes (bcrypt
    would silently ignore the rest).
    """
    name = canonical_scheme(scheme)
    if name not in HASH_SCHEMES:
        raise UnknownScheme(f"{name} hashes can be verified but not created")
    secret = password.encode("utf-8")
    if name == "PLAIN":
        return "{PLAIN}" + password
    if name == "PLAIN-B64":
        return "{PLAIN-B64}" + base64.b64encode(secret).decode("ascii")
    if name == "CRAM-MD5":
        return "{CRAM-MD5}" + crammd5.context(secret)
    if name in _SCRAM:
        return f"{{{name}}}" + ScramKeys.derive(_SCRAM[name], password).to_stored()
    if name in _DIGESTS:
        constructor, salted = _DIGESTS[name]
        salt = secrets.token_bytes(_SALT_BYTES) if salted else b""
        raw = constructor(secret + salt).digest() + salt
        return f"{{{name}}}" + base64.b64encode(raw).decode("ascii")
    if name == "BLF-CRYPT" and len(secret) > BCRYPT_MAX_BYTES:
        raise PasswordTooLong(
            f"BLF-CRYPT uses only the first {BCRYPT_MAX_BYTES} bytes of a password"
        )
    return f"{{{name}}}" + str(_hasher(name).hash(secret))


def verify_password(stored: str, password: str | bytes) -> bool:
    """
    True when ``password`` matches the ``stored`` field.

    ``password`` is text (checked as UTF-8) or the client's raw bytes.
    Raises :class:`UnknownScheme` when ``stored`` names an unknown scheme or
    is not a readable hash, so the caller can log the broken entry.  A
    prefix-less field that is empty or starts with ``!`` or ``*`` is a
    locked account (the crypt(3) convention) and matches nothing.
    """
    if isinstance(password, str):
        try:
            secret = password.encode("utf-8")
        except UnicodeEncodeError:
            return False
    else:
        secret = password
    prefix, body = _split(stored)
    if prefix is None and (not body or body[0] in "!*"):
        return False
    name = "CRYPT" if prefix is None else canonical_scheme(prefix)
    if name == "PLAIN":
        return hmac.compare_digest(body.encode("utf-8"), secret)
    if name == "PLAIN-B64":
        return hmac.compare_digest(_b64decode(name, body), secret)
    if name in _SCRAM:
        keys = stored_scram_keys(stored, _SCRAM[name])
        if keys is None:
            raise UnknownScheme(f"malformed {name} field")
        return keys.matches(secret)
    if name == "CRAM-MD5":
        stored_context = cram_md5_context(stored)
        if stored_context is None:
            raise UnknownScheme("malformed CRAM-MD5 field")
        return hmac.compare_digest(crammd5.context(secret), stored_context)
    if name in _DIGESTS:
        return _verify_digest(name, body, secret)
    return _verify_crypt(name, body, secret)


def hash_secrets(password: str, schemes: Sequence[str]) -> tuple[str, dict[str, str]]:
    """
    ``password`` stored in several schemes: the first is the password field
    (what USER/PASS checks), each other one an extra field named after its
    scheme in lower case, holding the value without its ``{SCHEME}`` prefix
    (PLAIN goes as ``plain-b64``: extra fields cannot hold spaces).
    """
    names = [canonical_scheme(s) for s in schemes] or [DEFAULT_SCHEME]
    primary = hash_password(password, names[0])
    extras: dict[str, str] = {}
    for name in names[1:]:
        scheme = "PLAIN-B64" if name == "PLAIN" else name
        _, value = _split(hash_password(password, scheme))
        extras[scheme.lower()] = value
    return primary, extras


def extra_secrets(extra: Mapping[str, str]) -> list[str]:
    """The stored fields held in extra fields named after schemes (see :func:`hash_secrets`)."""
    found = []
    for key, value in extra.items():
        name = key.upper()
        if name in SCHEMES and value:
            found.append(f"{{{name}}}{value}")
    return found


def stored_scram_keys(stored: str, hash_name: str) -> ScramKeys | None:
    """The SCRAM keys in a ``{SCRAM-SHA-256}``/``{SCRAM-SHA-1}`` field for ``hash_name``."""
    prefix, body = _split(stored)
    if prefix is None or _SCRAM.get(prefix.upper()) != hash_name:
        return None
    try:
        return ScramKeys.parse(hash_name, body)
    except ValueError:
        return None


def cram_md5_context(stored: str) -> str | None:
    """The HMAC-MD5 context of a ``{CRAM-MD5}`` field (lower-case hex), else None."""
    prefix, body = _split(stored)
    if prefix is None or prefix.upper() != "CRAM-MD5":
        return None
    body = body.strip().lower()
    if len(body) != crammd5.CONTEXT_HEX_LENGTH or any(c not in "0123456789abcdef" for c in body):
        return None
    return body


def plaintext_secret(stored: str) -> str | None:
    """
    The plaintext password when ``stored`` keeps it (``PLAIN``, ``PLAIN-B64``).

    Challenge-response logins (APOP, CRAM-MD5) need it; every other scheme,
    and any field that cannot be read, gives None.
    """
    prefix, body = _split(stored)
    if prefix is None:
        return None
    name = ALIASES.get(prefix.upper(), prefix.upper())
    if name == "PLAIN":
        return body
    if name == "PLAIN-B64":
        try:
            return _b64decode(name, body).decode("utf-8")
        except (UnknownScheme, UnicodeDecodeError):
            return None
    return None


def scheme_of(stored: str) -> str:
    """
    The scheme name of a stored field, without checking the hash itself.

    A prefix-less field gives the crypt(3) scheme its ``$id$`` shows, or
    ``CRYPT`` when none does; an unknown ``{NAME}`` is returned upper-cased.
    """
    prefix, body = _split(stored)
    if prefix is None or prefix.upper() == "CRYPT":
        return _crypt_scheme(body) or "CRYPT"
    upper = prefix.upper()
    return ALIASES.get(upper, upper)


def hash_parameters(stored: str) -> str | None:
    """
    What sets the cost of checking a crypt(3)-style field: its scheme and
    the hash string up to the salt (``ARGON2ID$argon2id$v=19$m=65536,t=3,p=1``,
    ``BLF-CRYPT$2y$12``, ``SHA512-CRYPT$6$rounds=10000``).  Two fields with
    the same parameters take the same work to check, whatever their salt.
    None for the other schemes, whose cost is small and fixed.
    """
    name = scheme_of(stored)
    _, body = _split(stored)
    if name not in _CRYPT_HANDLERS or _crypt_scheme(body) != name:
        return None
    # bcrypt's salt follows its cost with no "$"; the others end "$salt$hash".
    return name + body.rsplit("$", 1 if name == "BLF-CRYPT" else 2)[0]


def _split(stored: str) -> tuple[str | None, str]:
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 0:
            return stored[1:end], stored[end + 1 :]
    return None, stored


def _crypt_scheme(body: str) -> str | None:
    for ident, name in _CRYPT_IDS:
        if body.startswith(ident):
            return name
    return None


@cache
def _hasher(name: str) -> Any:
    if name == "ARGON2ID":
        return argon2.using(type="ID", **_ARGON2)
    if name == "ARGON2I":
        return argon2.using(type="I", **_ARGON2)
    if name == "BLF-CRYPT":
        return bcrypt.using(ident="2y", rounds=_BCRYPT_COST)
    if name == "SHA512-CRYPT":
        return sha512_crypt.using(rounds=_SHA_CRYPT_ROUNDS)
    return sha256_crypt.using(rounds=_SHA_CRYPT_ROUNDS)


def _verify_crypt(name: str, body: str, secret: bytes) -> bool:
    detected = _crypt_scheme(body)
    if detected is None:
        raise UnknownScheme(f"unsupported or malformed {name} hash")
    if name not in ("CRYPT", detected):
        raise UnknownScheme(f"{name} field holds a {detected} hash")
    handler = _CRYPT_HANDLERS[detected]
    try:
        handler.from_string(body)
    except ValueError:
        raise UnknownScheme(f"malformed {detected} hash") from None
    if detected == "BLF-CRYPT":
        # crypt(3) ignores bytes past the 72nd, so hashes made elsewhere from
        # longer passwords still match; the bcrypt module refuses them instead.
        secret = secret[:BCRYPT_MAX_BYTES]
    try:
        return bool(handler.verify(secret, body))
    except PasswordValueError:
        # NUL bytes, or over passlib's 4096-byte limit: no stored hash matches.
        return False
    except ValueError:
        # A salt without a checksum (a "config string"), and the like.
        raise UnknownScheme(f"malformed {detected} hash") from None


def _verify_digest(name: str, body: str, secret: bytes) -> bool:
    constructor, salted = _DIGESTS[name]
    size = constructor().digest_size
    raw = None
    if not salted and len(body) == 2 * size:
        # Dovecot reads a digest of hex length as hex (``{SHA256.HEX}``).
        try:
            raw = bytes.fromhex(body)
        except ValueError:
            raw = None
    if raw is None:
        raw = _b64decode(name, body)
    if len(raw) < size or (not salted and len(raw) != size):
        raise UnknownScheme(f"malformed {name} hash")
    digest, salt = raw[:size], raw[size:]
    return hmac.compare_digest(constructor(secret + salt).digest(), digest)


def _b64decode(name: str, body: str) -> bytes:
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise UnknownScheme(f"malformed {name} field") from None
