"""
What every SASL mechanism is: a small pure state machine (no Twisted, no
I/O) that the POP3 protocol drives with the client's decoded responses.

``step(response)`` gets the initial response first (``None`` when the
client sent none) and then each answer to a challenge.  It returns a
:class:`Challenge` to send, or a :class:`Success` carrying the
``twisted.cred`` credentials that the portal's checker then judges.  It
raises a :class:`popserv.core.errors.PopError` when the exchange fails, with the
``-ERR`` the client should see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from attrs import field, frozen

from popserv.core.errors import AuthFailed, BadArguments, PopError

#: A mechanism may ask this many challenges before the exchange is cut off
#: (SCRAM needs two, with its final message; ten leaves room, not loops).
MAX_ROUNDS = 10


@frozen
class Challenge:
    """Send ``data`` to the client (base64-encoded, after ``+ ``) and wait for its answer."""

    data: bytes = b""


@frozen
class Success:
    """
    The exchange is over: log in with ``credentials``.  ``final`` is data
    the server must still send (SCRAM's server-final-message): it goes out
    as one more challenge once the login succeeded, and the client answers
    it with an empty line before the ``+OK``.
    """

    credentials: Any
    final: bytes | None = None
    #: Sent as one more challenge when the login fails (OAUTHBEARER's error
    #: JSON); the client's answer to it is read and ignored before the -ERR.
    failure: bytes | None = None


class Need:
    """
    A step that asks the login layer a question before the exchange can go
    on (SCRAM needs the user's salt and keys before its first challenge):
    the exchange loop answers it (:func:`popserv.logins.sasl.exchange.answer`) and
    hands the answer to the mechanism's ``provide``, which returns the next
    step.  Mechanisms subclass it, so no mechanism is special-cased outside
    its own module.
    """


Step = Challenge | Success


class Mechanism(Protocol):
    """
    One exchange of one SASL mechanism.

    A ``step`` may also return a :class:`Need` (SCRAM asks for the user's
    keys): the exchange loop answers it and hands the answer to the
    exchange's ``provide`` (see :class:`Asking`).
    """

    def step(self, response: bytes | None) -> Step | Need: ...


class Asking(Mechanism, Protocol):
    """A mechanism whose ``step`` may return a :class:`Need`."""

    def provide(self, answer: Any) -> Step | Need: ...


@frozen
class SASLContext:
    """What a mechanism may know about the connection it runs on."""

    #: Host name for challenges that carry one (CRAM-MD5).
    hostname: str = "localhost"
    #: Whether the connection is under TLS.
    secure: bool = False
    #: Channel-binding data by type (``tls-exporter``, ``tls-server-end-point``).
    channel_bindings: Mapping[str, bytes] = field(factory=dict)
    #: The verified TLS client certificate, for EXTERNAL.
    client_certificate: Any = None
    #: Whether a -PLUS mechanism is offered on this connection (SCRAM's
    #: downgrade check).
    channel_binding_offered: bool = False


@frozen
class MechanismInfo:
    """A mechanism as the server offers it: its name, its factory, its needs."""

    name: str
    factory: Callable[[SASLContext], Mechanism]
    #: True when the client's password crosses the wire (PLAIN, LOGIN): only
    #: offered where cleartext logins are.
    exposes_password: bool = False
    #: True for challenge-response mechanisms (CRAM-MD5, SCRAM): governed
    #: like APOP by the cleartext policy.
    challenge_response: bool = False
    #: Only offered under TLS (the -PLUS mechanisms, EXTERNAL).
    needs_tls: bool = False
    #: Only offered when the TLS session has channel-binding data (-PLUS:
    #: not on a resumed TLS 1.2 session, for one).
    needs_channel_binding: bool = False
    #: Checked by a token validator: enabled by default only when the portal
    #: has a checker for OAuth token credentials.
    needs_token_checker: bool = False
    #: Only offered when the TLS handshake verified a client certificate,
    #: and enabled by default only when client certificates are asked for.
    needs_client_certificate: bool = False
    #: The kind of stored secret it needs (``ISecretInventory`` kinds), for
    #: offering it only where accounts have one; None: any password works.
    requires: str | None = None


class SASLAborted(PopError):
    """The client cancelled the exchange with ``*`` (RFC 5034)."""

    text = "Authentication cancelled"


class SASLMalformed(BadArguments):
    """A response that is not valid base64, or that the mechanism cannot parse."""

    text = "Invalid SASL response"


class SASLUnknownMechanism(PopError):
    text = "Unrecognized authentication mechanism"


class SASLUnavailable(PopError):
    """A mechanism this connection does not offer (cleartext policy, no TLS)."""

    code = "AUTH"
    text = "Authentication mechanism not available on this connection, use TLS"


class SASLTooManyRounds(PopError):
    text = "Authentication exchange too long"


class AuthzidRefused(AuthFailed):
    """An authorization identity other than the authentication identity."""


class ClientFirst:
    """
    A mechanism whose client sends everything in one message (PLAIN,
    EXTERNAL, OAUTHBEARER ...): without an initial response, one empty
    challenge asks for it; :meth:`message` turns it into the outcome.
    """

    def __init__(self, context: SASLContext) -> None:
        self.context = context
        self._asked = False

    def step(self, response: bytes | None) -> Step:
        if response is None:
            if self._asked:
                raise SASLMalformed("no response")
            self._asked = True
            return Challenge()
        return self.message(response)

    def message(self, response: bytes) -> Step:
        raise NotImplementedError


def split_utf8(data: bytes, what: str) -> str:
    """Decode a UTF-8 field of a SASL message, or fail the exchange."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLMalformed(f"{what} is not UTF-8") from None
