"""
Passwords: Dovecot-compatible schemes, the passwd-file and its cred checker.
"""

from popserv.logins.passwords.checker import PasswdFileChecker
from popserv.logins.passwords.passwdfile import (
    InvalidField,
    NoSuchUser,
    PasswdFile,
    UserEntry,
    UserExists,
)
from popserv.logins.passwords.schemes import (
    DEFAULT_SCHEME,
    HASH_SCHEMES,
    SCHEMES,
    PasswordTooLong,
    UnknownScheme,
    canonical_scheme,
    hash_password,
    hash_secrets,
    plaintext_secret,
    scheme_of,
    verify_password,
)

__all__ = [
    "PasswdFile",
    "PasswdFileChecker",
    "UserEntry",
    "UserExists",
    "NoSuchUser",
    "InvalidField",
    "DEFAULT_SCHEME",
    "SCHEMES",
    "HASH_SCHEMES",
    "UnknownScheme",
    "PasswordTooLong",
    "canonical_scheme",
    "hash_password",
    "hash_secrets",
    "verify_password",
    "plaintext_secret",
    "scheme_of",
]
