"""
CRAM-MD5 (RFC 2195): the server sends a unique challenge, the client
answers ``user SP hex(HMAC-MD5(password, challenge))``.

The password never crosses the wire, but the server needs it in a form it
can read back (PLAIN) or Dovecot's ``{CRAM-MD5}`` context; the checker
decides.  Governed by the cleartext policy like APOP: a recorded exchange
can be attacked offline.
"""

from __future__ import annotations

import re
import secrets
import time

from popserv.core import wire
from popserv.logins.credentials import CramMD5Credentials
from popserv.logins.sasl.mechanism import Challenge, SASLContext, SASLMalformed, Step, Success

_ANSWER = re.compile(rb"(.+) ([0-9a-fA-F]{32})")


class CramMD5:
    """One CRAM-MD5 exchange."""

    def __init__(self, context: SASLContext) -> None:
        # RFC 2195 asks for a msg-id style, globally unique challenge.
        local = f"{secrets.token_hex(8)}.{int(time.time())}"
        self.challenge = wire.msg_id(local, context.hostname)
        self._sent = False

    def step(self, response: bytes | None) -> Step:
        if not self._sent:
            if response is not None:
                raise SASLMalformed("CRAM-MD5 takes no initial response")
            self._sent = True
            return Challenge(self.challenge)
        match = _ANSWER.fullmatch(response or b"")
        if match is None:
            raise SASLMalformed("CRAM-MD5 answer is not 'user digest'")
        user, digest = match.groups()
        return Success(CramMD5Credentials(user, self.challenge, digest))
