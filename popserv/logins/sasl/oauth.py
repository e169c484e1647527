"""
OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's older form of the same idea):
the client sends an OAuth 2.0 bearer token; a token validator decides.

A token is a bearer secret like a password, so both are offered only where
cleartext logins are.  When the token is refused, the server sends an
error as one more challenge (RFC 7628 section 3.2.3), the client answers
with a dummy response, and only then comes the ``-ERR``.
"""

from __future__ import annotations

import json

from popserv.logins.credentials import OAuthTokenCredentials
from popserv.logins.sasl.mechanism import (
    ClientFirst,
    SASLMalformed,
    Step,
    Success,
    split_utf8,
)

#: RFC 7628 section 3.2.2: what the client hears when the token is refused.
OAUTHBEARER_ERROR = json.dumps({"status": "invalid_token"}).encode()
#: XOAUTH2's error is the same JSON shape (Google sends status 401 and schemes).
XOAUTH2_ERROR = json.dumps({"status": "401", "schemes": "bearer"}).encode()

#: Longest token accepted, octets (JWTs with many claims run to a few KB).
MAX_TOKEN = 8000


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SASLMalformed("auth is not a Bearer token")
    if len(token) > MAX_TOKEN:
        raise SASLMalformed("token too long")
    return token.strip()


def _pairs(text: str) -> dict[str, str]:
    pairs = {}
    for item in text.split("\x01"):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals or not key.isalpha():
            raise SASLMalformed("malformed key/value pair")
        pairs[key] = value
    return pairs


class _OAuthMessage(ClientFirst):
    def message(self, response: bytes) -> Step:
        return self._parse(split_utf8(response, "OAuth message"))

    def _parse(self, text: str) -> Success:
        raise NotImplementedError


class OAuthBearer(_OAuthMessage):
    """``gs2-header kvsep *(key=value kvsep) kvsep``, e.g. ``n,a=user,^Aauth=Bearer T^A^A``."""

    def _parse(self, text: str) -> Success:
        header, sep, rest = text.partition("\x01")
        if not sep or not rest.endswith("\x01"):
            raise SASLMalformed("OAUTHBEARER message is not gs2-header ^A pairs ^A")
        flag, comma, rest_header = header.partition(",")
        authzid, comma2, tail = rest_header.partition(",")
        if flag not in ("n", "y") or not comma or not comma2 or tail:
            raise SASLMalformed("bad GS2 header")
        if authzid and not authzid.startswith("a="):
            raise SASLMalformed("bad authzid")
        user = authzid[2:].replace("=2C", ",").replace("=3D", "=") or None
        pairs = _pairs(rest)
        if "auth" not in pairs:
            raise SASLMalformed("no auth value")
        credentials = OAuthTokenCredentials(user, _bearer(pairs["auth"]))
        return Success(credentials, failure=OAUTHBEARER_ERROR)


class XOAuth2(_OAuthMessage):
    """``user=USER ^A auth=Bearer TOKEN ^A ^A``."""

    def _parse(self, text: str) -> Success:
        pairs = _pairs(text)
        if not pairs.get("user") or "auth" not in pairs:
            raise SASLMalformed("XOAUTH2 needs user and auth")
        credentials = OAuthTokenCredentials(pairs["user"], _bearer(pairs["auth"]))
        return Success(credentials, failure=XOAUTH2_ERROR)
