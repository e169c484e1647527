"""
SCRAM-SHA-1, SCRAM-SHA-256 and their -PLUS variants (RFC 5802, RFC 7677).

The exchange: client-first (``gs2-header`` ``n=user,r=nonce``), the server
asks the protocol for the user's keys (:class:`NeedKeys`), answers with its
nonce, salt and iteration count, then gets client-final (``c=`` binding,
``r=`` nonce, ``p=`` proof).  The proof goes to the checker inside
:class:`popserv.logins.credentials.ScramCredentials`; the server signature is the
``final`` data, sent only once the login succeeded.

Channel binding (-PLUS): ``tls-exporter`` (TLS 1.3, RFC 9266) or
``tls-server-end-point`` (RFC 5929), as the client names it.  A client
that says ``y`` (it supports binding but thinks the server does not) while
-PLUS is offered is refused: someone removed -PLUS from the list.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from collections.abc import Callable

from attrs import frozen
from scramp.core import ScramException
from scramp.utils import saslprep

from popserv.logins.credentials import ScramCredentials
from popserv.logins.passwords.scram import ScramKeys, derived_salt
from popserv.logins.sasl.mechanism import (
    Challenge,
    Need,
    SASLContext,
    SASLMalformed,
    Step,
    Success,
)

_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # printable but ','
_ESCAPE = re.compile(r"=(?!2C|3D)")
_CB_NAME = re.compile(r"[A-Za-z0-9.-]+")


class ScramFailed(SASLMalformed):
    """A SCRAM message that breaks the protocol (RFC 5802 says: fail the exchange)."""

    text = "SCRAM exchange failed"


@frozen
class NeedKeys(Need):
    """A step: the mechanism needs this user's keys (``None`` if there are none)."""

    username: str
    hash_name: str


def _unescape(name: str) -> str:
    """RFC 5802 ``saslname``: ``=2C`` is ',' and ``=3D`` is '='; any other '=' fails."""
    if _ESCAPE.search(name):
        raise ScramFailed("bad '=' escape in a name")
    return name.replace("=2C", ",").replace("=3D", "=")


def _prepared(name: str) -> str:
    """SASLprep (RFC 4013), as a stored string: stricter than the query form, never looser."""
    try:
        prepared: str = saslprep(name)  # scramp is not annotated
    except ScramException:
        raise ScramFailed("name fails SASLprep") from None
    if not prepared:
        raise ScramFailed("empty name")
    return prepared


def _attributes(message: str, expected: str) -> list[tuple[str, str]]:
    """``k=v,...`` pairs; the leading keys must be ``expected``, in that order."""
    pairs = []
    for item in message.split(","):
        key, equals, value = item.partition("=")
        if len(key) != 1 or not equals:
            raise ScramFailed("malformed attribute")
        pairs.append((key, value))
    keys = "".join(key for key, _ in pairs[: len(expected)])
    if keys != expected:
        raise ScramFailed(f"expected attributes {expected!r}")
    if any(key == "m" for key, _ in pairs):
        raise ScramFailed("mandatory extension not supported")
    return pairs


class Scram:
    """One SCRAM exchange, for ``hash_name`` (``SHA-1`` or ``SHA-256``), with or without -PLUS."""

    def __init__(self, context: SASLContext, hash_name: str, plus: bool) -> None:
        self._context = context
        self._hash = hash_name
        self._plus = plus
        self._stage = "start"
        self._gs2_header = b""
        self._binding = b""
        self._username = ""
        self._client_first_bare = ""
        self._nonce = ""
        self._server_first = ""
        self._keys: ScramKeys | None = None
        self._authzid: str | None = None

    def step(self, response: bytes | None) -> Step | NeedKeys:
        if self._stage == "start":
            self._stage = "client-first"
            if response is None:
                return Challenge()
        if response is None:
            raise ScramFailed("no response")
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramFailed("not UTF-8") from None
        if self._stage == "client-first":
            return self._client_first(text)
        if self._stage == "client-final":
            return self._client_final(text)
        raise ScramFailed("unexpected message")

    # client-first-message = gs2-header client-first-message-bare

    def _client_first(self, text: str) -> NeedKeys:
        flag, comma, rest = text.partition(",")
        authzid, comma2, bare = rest.partition(",")
        if not (comma and comma2):
            raise ScramFailed("no GS2 header")
        self._gs2_header = f"{flag},{authzid},".encode()
        self._check_binding_flag(flag)
        pairs = _attributes(bare, "nr")
        username = _prepared(_unescape(pairs[0][1]))
        if authzid:
            if not authzid.startswith("a="):
                raise ScramFailed("malformed authzid")
            act_as = _prepared(_unescape(authzid[2:]))
            self._authzid = act_as if act_as != username else None
        nonce = pairs[1][1]
        if not _NONCE.fullmatch(nonce):
            raise ScramFailed("bad client nonce")
        self._username = username
        self._client_first_bare = bare
        self._nonce = nonce + base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._stage = "keys"
        return NeedKeys(username, self._hash)

    def _check_binding_flag(self, flag: str) -> None:
        bindings = self._context.channel_bindings
        if flag.startswith("p="):
            name = flag[2:]
            if not _CB_NAME.fullmatch(name):
                raise ScramFailed("bad channel binding name")
            if not self._plus:
                raise ScramFailed("channel binding asked for with a non-PLUS mechanism")
            if name not in bindings:
                raise ScramFailed(f"channel binding {name} not available")
            self._binding = bindings[name]
        elif flag == "n":
            if self._plus:
                raise ScramFailed("a -PLUS mechanism needs channel binding")
        elif flag == "y":
            if self._context.channel_binding_offered:
                raise ScramFailed("client thinks channel binding is not offered: downgrade")
        else:
            raise ScramFailed("bad GS2 channel binding flag")

    def provide(self, keys: ScramKeys | None) -> Challenge:
        """Continue with the user's keys; ``None``: no such user, or no usable secret."""
        if self._stage != "keys":
            raise ScramFailed("keys not asked for")
        if keys is None:
            # No such user: keys that look real (a stable salt) and fail at the proof.
            keys = ScramKeys.decoy(self._hash, derived_salt(self._hash, self._username))
        self._keys = keys
        salt = base64.b64encode(keys.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={keys.iterations}"
        self._stage = "client-final"
        return Challenge(self._server_first.encode("ascii"))

    # client-final-message = channel-binding "," nonce ["," extensions] "," proof

    def _client_final(self, text: str) -> Success:
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise ScramFailed("no proof")
        pairs = _attributes(without_proof, "cr")
        try:
            binding = base64.b64decode(pairs[0][1], validate=True)
            proof = base64.b64decode(proof_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ScramFailed("bad base64") from None
        if not hmac.compare_digest(binding, self._gs2_header + self._binding):
            raise ScramFailed("channel binding does not match")
        if pairs[1][1] != self._nonce:
            raise ScramFailed("nonce does not match")
        assert self._keys is not None
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        message = auth_message.encode("utf-8")
        self._stage = "done"
        signature = base64.b64encode(self._keys.server_signature(message))
        credentials = ScramCredentials(self._username, self._hash, message, proof, self._authzid)
        return Success(credentials, final=b"v=" + signature)


def mechanism(hash_name: str, plus: bool) -> Callable[[SASLContext], Scram]:
    """A factory of :class:`Scram` exchanges for one mechanism name."""

    def make(context: SASLContext) -> Scram:
        return Scram(context, hash_name, plus)

    return make
