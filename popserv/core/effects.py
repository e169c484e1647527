"""
The effects of a POP3 session: what :class:`~popserv.core.session.Session`
asks whoever drives it to do.  Each says what the driver sends back into
the session's generator (None unless said), or which failure it throws in.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

from attrs import frozen

from popserv.core.body import BodyEncoder


@frozen
class Send:
    """Send ``data`` (whole response lines)."""

    data: bytes


@frozen
class Stream:
    """Send ``chunks`` as fast as the client reads them (a multi-line body)."""

    chunks: Iterator[bytes]


@frozen
class Close:
    """Close the connection once what was sent is flushed; nothing more runs."""


@frozen
class Log:
    """Log ``template`` (twisted.logger style, with ``{peer}`` the client) at info level."""

    template: str
    fields: dict[str, object]


@frozen
class StartTLS:
    """Start TLS now; whatever the client sent after the command is dropped."""


@frozen
class Capabilities:
    """Answer with the CAPA lines (strings) for this session as it is now."""


@frozen
class Mechanisms:
    """Answer with the names of the SASL mechanisms this connection offers."""


@frozen
class ChooseMechanism:
    """
    Answer with the offered SASL mechanism called ``name``, as the driver
    knows it, or raise ``SASLUnavailable`` / ``SASLUnknownMechanism``.
    """

    name: str


@frozen
class BeginAttempt:
    """A login attempt begins: wait for the client's turn (failed-login penalty)."""


@frozen
class Authenticate:
    """
    Run the SASL exchange of ``mechanism`` (from :class:`ChooseMechanism`),
    starting from the client's ``initial`` response, reading the client's
    answers itself.  Answer with what :class:`LogIn` takes; raise
    :class:`Rejected` when the exchange proves the client wrong.
    """

    mechanism: object
    initial: bytes | None


@frozen
class PasswordLogin:
    """USER and PASS, as the client sent them."""

    username: bytes
    password: bytes


@frozen
class APOPLogin:
    """APOP: the name, the greeting's timestamp and the client's digest."""

    username: bytes
    timestamp: bytes
    digest: bytes


@frozen
class LogIn:
    """
    Check ``login`` (a :class:`PasswordLogin`, an :class:`APOPLogin`, or
    what :class:`Authenticate` answered) and take the maildrop; answer with
    the user name logged in.  Raise
    :class:`Rejected` when the credentials are wrong, a
    :class:`~popserv.core.errors.PopError` when the login is refused for
    another reason (the mailbox is in use, the account is delayed).
    """

    login: object


@frozen
class Penalise:
    """Count a failed login of ``user`` and wait out the client's penalty."""

    user: object
    reason: str


@frozen
class OpenMaildrop:
    """Answer with the logged-in maildrop's ``(Listing, account settings)``."""


@frozen
class LoggedIn:
    """The session is in TRANSACTION: note it (stop the login timer, log)."""

    user: object


@frozen
class SendMessage:
    """
    Send message ``index`` (from 0): ``+OK text``, then its body through
    ``encoder``, exactly ``listed`` octets when that is not None.  Answer
    with the octets of the body sent.
    """

    index: int
    encoder: BodyEncoder
    text: str
    listed: int | None


@frozen
class Commit:
    """Delete ``deleted`` and mark ``retrieved`` seen, then release the
    maildrop; raise ``CommitFailed`` when that fails."""

    deleted: list[int]
    retrieved: list[int]


#: The effects of a command whose answer is known at once, in order.
Effects = tuple[Any, ...]

#: What driving one command looks like: effects out, results in.
Steps = Generator[Any, Any, Any]


class Rejected(Exception):
    """The client's credentials are wrong (a failed login, counted)."""

    def __init__(self, user: object, reason: str) -> None:
        super().__init__(reason)
        self.user = user
        self.reason = reason


__all__ = [
    "Effects",
    "APOPLogin",
    "Authenticate",
    "BeginAttempt",
    "Capabilities",
    "ChooseMechanism",
    "Close",
    "Commit",
    "Log",
    "LogIn",
    "LoggedIn",
    "Mechanisms",
    "OpenMaildrop",
    "PasswordLogin",
    "Penalise",
    "Rejected",
    "Send",
    "SendMessage",
    "StartTLS",
    "Steps",
    "Stream",
]
