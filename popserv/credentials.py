"""
Credentials for the logins RFC 1939 defines beyond USER/PASS.

Checked by any ``twisted.cred`` checker that handles
``IUsernameHashedPassword`` (it calls :meth:`checkPassword` with the stored
plaintext), so an embedding application's own checker works unchanged.
"""

from __future__ import annotations

import hmac
from hashlib import md5

from twisted.cred.credentials import IUsernameHashedPassword
from zope.interface import implementer


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
