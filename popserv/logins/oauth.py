"""
OAuth 2.0 bearer tokens for SASL OAUTHBEARER (RFC 7628) and XOAUTH2.

A token is judged by an :class:`popserv.interfaces.ITokenValidator`, which
says which user it is for.  popserv ships :class:`JWTValidator` (signed JWTs,
checked with PyJWT against a configured key) and :class:`CallableValidator`
(any function, for example one that asks the identity provider's token
introspection endpoint).  :class:`TokenChecker` makes a validator a
``twisted.cred`` checker, so a portal handles tokens like passwords.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from popserv.core.errors import InvalidUsername
from popserv.core.usernames import DEFAULT_RULES, UsernameRules
from popserv.core.wire import loggable
from popserv.interfaces import ITokenValidator
from popserv.logins.credentials import IOAuthTokenCredentials

log = Logger()

#: Clock skew allowed on ``exp`` and ``nbf``, seconds.
LEEWAY = 30

#: RFC 7518 section 3.2: an HS256 key of at least 256 bits.
MIN_SECRET = 32


def _public_key(data: bytes) -> object | None:
    """A public key from PEM/DER (SPKI or PKCS#1) or a certificate, or None."""
    loaders = (
        serialization.load_pem_public_key,
        serialization.load_der_public_key,
        lambda d: x509.load_pem_x509_certificate(d).public_key(),
        lambda d: x509.load_der_x509_certificate(d).public_key(),
    )
    for load in loaders:
        try:
            return load(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    return None


@implementer(ITokenValidator)
class JWTValidator:
    """
    Accepts JSON Web Tokens signed with ``key``: an HS256 shared secret, or
    the PEM public key for RS256/ES256.  ``exp`` is required; ``iss`` and
    ``aud`` are checked when given.  The user is the ``claim`` (``sub`` by
    default; ``email`` or ``preferred_username`` are common choices).
    """

    def __init__(
        self,
        key: str | bytes,
        algorithms: Sequence[str] = ("HS256",),
        *,
        issuer: str | None = None,
        audience: str | None = None,
        claim: str = "sub",
        leeway: float = LEEWAY,
    ) -> None:
        self._key = key
        self._algorithms = list(algorithms)
        self._issuer = issuer
        self._audience = audience
        self._claim = claim
        self._leeway = leeway

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> JWTValidator:
        """
        A validator whose key is in ``path``: a public key (PEM or DER, SPKI
        or PKCS#1) or a certificate for RS256/ES256, or else an HS256 secret
        of at least 32 bytes.  Anything that looks like a key but cannot be
        read is refused (ValueError): taken for a secret, a public key would
        let anyone who has it sign tokens.
        """
        data = Path(path).read_bytes()
        public_key = _public_key(data)
        if public_key is not None:
            return cls(public_key, ("RS256", "ES256"), **kwargs)  # type: ignore[arg-type]
        secret = data.strip()
        if secret.startswith((b"-----BEGIN", b"{", b"0\x82", b"0\x81")):
            raise ValueError("looks like a key or JWKS but cannot be read as a public key")
        if len(secret) < MIN_SECRET:
            raise ValueError(f"an HS256 secret must be at least {MIN_SECRET} bytes")
        return cls(secret, ("HS256",), **kwargs)

    def validate(self, token: str, user: str | None) -> str:
        options = {"require": ["exp"], "verify_aud": self._audience is not None}
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.PyJWTError as e:
            raise UnauthorizedLogin(f"token refused: {e}") from None
        identity = claims.get(self._claim)
        if not isinstance(identity, str) or not identity:
            raise UnauthorizedLogin(f"token has no {self._claim!r} claim")
        return identity


@implementer(ITokenValidator)
class CallableValidator:
    """
    Any function ``(token, user) -> user`` (or a Deferred of it, or a
    coroutine) as a validator: the place for an introspection request.
    Returning None or raising refuses the token.
    """

    def __init__(self, function: Callable[[str, str | None], Any]) -> None:
        self._function = function

    def validate(self, token: str, user: str | None) -> Deferred[str]:
        async def run() -> str:
            result = self._function(token, user)
            if hasattr(result, "__await__"):
                result = await result
            if not isinstance(result, str) or not result:
                raise UnauthorizedLogin("token refused")
            return result

        return Deferred.fromCoroutine(run())


@implementer(ICredentialsChecker)
class TokenChecker:
    """
    Checks OAuth bearer tokens with a validator; the avatar id is the user
    the token is for, normalised under ``rules`` (those of the password
    file, so the token's ``Alice`` is the file's ``alice`` when case is
    folded).  A user named by the client (OAUTHBEARER's authzid, XOAUTH2's
    ``user=``) must be that same user.
    """

    credentialInterfaces = (IOAuthTokenCredentials,)

    def __init__(self, validator: ITokenValidator, rules: UsernameRules = DEFAULT_RULES) -> None:
        self.validator = validator
        self.rules = rules

    # Twisted types avatar ids as bytes; popserv's are str (normalized user
    # names), which Portal hands to the realm untouched.
    def requestAvatarId(self, credentials: Any) -> Deferred[str]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: Any) -> str:
        user = credentials.username
        try:
            # maybeDeferred flattens a returned Deferred; its overloads cannot say so.
            identity: str = await maybeDeferred(  # type: ignore[call-overload]
                self.validator.validate, credentials.token, user
            )
        except UnauthorizedLogin as e:
            log.info("OAuth token for {user} refused: {why}", user=loggable(user), why=str(e))
            raise UnauthorizedLogin() from None
        try:
            name = self.rules.normalize(identity)
        except InvalidUsername:
            log.info("OAuth token is for {identity}, not a user name", identity=loggable(identity))
            raise UnauthorizedLogin() from None
        if user and self._normalized(user) != name:
            log.info(
                "OAuth token is for {identity}, not {user}",
                identity=loggable(identity),
                user=loggable(user),
            )
            raise UnauthorizedLogin()
        return name

    def _normalized(self, user: str) -> str | None:
        try:
            return self.rules.normalize(user)
        except InvalidUsername:
            return None
