"""
Credentials for challenge-response logins: APOP (RFC 1939) and CRAM-MD5.

Checked by any ``twisted.cred`` checker that handles
``IUsernameHashedPassword`` (it calls :meth:`checkPassword` with the stored
plaintext), so an embedding application's own checker works unchanged.
CRAM-MD5 answers can also be checked against a stored HMAC-MD5 context.
"""

from __future__ import annotations

import hmac
from hashlib import md5
from typing import TYPE_CHECKING

from twisted.cred.credentials import ICredentials, IUsernameHashedPassword
from zope.interface import Attribute, implementer

if TYPE_CHECKING:
    from popserv.logins.passwords.scram import ScramKeys


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """An APOP login: user name, the greeting's timestamp, the client's MD5 digest."""

    def __init__(self, username: bytes, timestamp: bytes, digest: bytes) -> None:
        self.username = username
        self.timestamp = timestamp
        self.digest = digest.lower()

    def checkPassword(self, password: str | bytes) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        expected = md5(self.timestamp + password, usedforsecurity=False).hexdigest()
        return hmac.compare_digest(expected.encode("ascii"), self.digest)


class ICramMD5Credentials(IUsernameHashedPassword):
    """CRAM-MD5 credentials, which can also be checked against a stored HMAC-MD5 context."""

    def checkContext(context: str) -> bool:  # noqa: N805 (zope.interface)
        """Check against Dovecot's ``{CRAM-MD5}`` context (64 hex digits)."""


@implementer(ICramMD5Credentials)
class CramMD5Credentials:
    """A CRAM-MD5 answer (RFC 2195): the user, the server's challenge, the client's digest."""

    def __init__(self, username: bytes, challenge: bytes, digest: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.digest = digest.lower()

    def checkPassword(self, password: str | bytes) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        expected = hmac.new(password, self.challenge, md5).hexdigest()
        return hmac.compare_digest(expected.encode("ascii"), self.digest)

    def checkContext(self, context: str) -> bool:
        # Imported here: popserv.logins.passwords imports this module.
        from popserv.logins.passwords import crammd5

        return crammd5.check_response(context, self.challenge, self.digest)


class IScramCredentials(ICredentials):
    """A finished SCRAM exchange, for the checker to verify against the user's keys."""

    username = Attribute("The authentication identity (SASLprep'd), str.")
    hash_name = Attribute("'SHA-1' or 'SHA-256'.")

    def verify(keys: ScramKeys) -> bool:  # noqa: N805 (zope.interface)
        """Whether the client's proof matches ``keys``."""


@implementer(IScramCredentials)
class ScramCredentials:
    """The client's proof over the exchange's AuthMessage (RFC 5802 section 3)."""

    def __init__(
        self,
        username: str,
        hash_name: str,
        auth_message: bytes,
        proof: bytes,
        authzid: str | None = None,
    ) -> None:
        self.username = username
        self.authzid = authzid
        self.hash_name = hash_name
        self.auth_message = auth_message
        self.proof = proof

    def verify(self, keys: ScramKeys) -> bool:
        return keys.hash_name == self.hash_name and keys.verify(self.auth_message, self.proof)


class IExternalCredentials(ICredentials):
    """An identity the transport vouches for: a verified TLS client certificate (EXTERNAL)."""

    username = Attribute("The user the certificate maps to, str.")


@implementer(IExternalCredentials)
class ExternalCredentials:
    def __init__(self, username: str) -> None:
        self.username = username


class IOAuthTokenCredentials(ICredentials):
    """An OAuth 2.0 bearer token (OAUTHBEARER, XOAUTH2), for a token validator to judge."""

    username = Attribute("The user the client names (str), or None.")
    token = Attribute("The bearer token, str.")


@implementer(IOAuthTokenCredentials)
class OAuthTokenCredentials:
    def __init__(self, username: str | None, token: str) -> None:
        self.username = username
        self.token = token


class IActAsPasswordCredentials(ICredentials):
    """
    PLAIN with an authorization identity other than the user: log in as
    ``authzid`` with ``username``'s password.  Deliberately not
    ``IUsernamePassword``: only a checker that knows who may act for whom
    (master users) handles it, any other portal refuses the login.
    """

    username = Attribute("The authentication identity, bytes.")
    password = Attribute("Its password, bytes.")
    authzid = Attribute("The user to act as, str.")


@implementer(IActAsPasswordCredentials)
class ActAsPasswordCredentials:
    def __init__(self, username: bytes, password: bytes, authzid: str) -> None:
        self.username = username
        self.password = password
        self.authzid = authzid
