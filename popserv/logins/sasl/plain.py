"""
PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login): the client sends
its password, so both are offered only where cleartext logins are allowed.

Both end in an ``IUsernamePassword`` credentials object, checked by the
same checker as USER/PASS.
"""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword

from popserv.logins.credentials import ActAsPasswordCredentials
from popserv.logins.sasl.mechanism import (
    Challenge,
    ClientFirst,
    SASLContext,
    SASLMalformed,
    Step,
    Success,
    split_utf8,
)

#: RFC 4616: servers must accept 255 octets per field; a little more is kept.
MAX_FIELD = 1024


def _credentials(authzid: bytes, authcid: bytes, password: bytes) -> Success:
    if not authcid or not password:
        raise SASLMalformed("empty user name or password")
    if len(authcid) > MAX_FIELD or len(password) > MAX_FIELD or len(authzid) > MAX_FIELD:
        raise SASLMalformed("field too long")
    if authzid and authzid != authcid:
        act_as = split_utf8(authzid, "authzid")
        return Success(ActAsPasswordCredentials(authcid, password, act_as))
    return Success(UsernamePassword(authcid, password))


class Plain(ClientFirst):
    """``[authzid] NUL authcid NUL passwd`` in one message."""

    def message(self, response: bytes) -> Step:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise SASLMalformed("PLAIN needs exactly two NULs")
        return _credentials(*parts)


class Login:
    """Asks ``Username:`` then ``Password:``; an initial response is the user name."""

    USERNAME = b"Username:"
    PASSWORD = b"Password:"

    def __init__(self, context: SASLContext) -> None:
        self._user: bytes | None = None
        self._started = False

    def step(self, response: bytes | None) -> Step:
        if not self._started:
            self._started = True
            if response is None:
                return Challenge(self.USERNAME)
        if response is None:
            raise SASLMalformed("no response")
        if self._user is None:
            self._user = response
            return Challenge(self.PASSWORD)
        return _credentials(b"", self._user, response)
