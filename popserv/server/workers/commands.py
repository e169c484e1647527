"""
The AMP commands a worker process asks its parent's admission with.

One command per :class:`~popserv.server.admission.IAdmission` question and
per verdict on what it granted.  The worker names each lease and turn with
an id of its own choosing (a counter per connection to the parent), sent
with the question: so it can give a thing back, or give up its place in
line, before the answer has even arrived, with no second round trip to
learn a name.  The answers carry nothing but success (or the refusal), and
the verdicts that need no answer (``Release``, ``Succeeded``) are sent
without one.

Names are short because ``connection()`` is asked for every connection and
``Release`` sent for every one that ends: a ``Connect`` is about 90 bytes
on the wire and its answer about 15.
"""

from __future__ import annotations

from typing import ClassVar

from twisted.protocols import amp

from popserv.core.errors import TemporaryFailure, TooManySessions
from popserv.server.admission import OverLimit

# The error codes the parent answers with; any other failure in the
# parent is logged there and answered as FAILED, never left to AMP's
# default (which drops the connection, and with it every lease the worker
# holds).
OVER_LIMIT = b"OVER"
TOO_MANY_SESSIONS = b"SESSIONS"
FAILED = b"FAILED"
CANCELLED = b"CANCELLED"


class AdmissionUnavailable(TemporaryFailure, OverLimit):
    """
    The parent's admission cannot be asked (the connection to it is gone) or
    failed to answer.  Refused, never admitted without limits: as an
    :class:`OverLimit` a listener refuses the connection (and its refusal
    log counts it, once a minute, rather than a traceback each); as a
    ``TemporaryFailure`` a login answers ``-ERR [SYS/TEMP]``.
    """


class Given(Exception):
    """The worker gave the question up (``Release`` before the answer): no answer is wanted."""


# AMP argument types, made once and shared by the commands.
_ID: amp.Argument = amp.Integer()
_TEXT: amp.Argument = amp.Unicode()
_CLIENT: amp.Argument = amp.Unicode(optional=True)
_SECONDS: amp.Argument = amp.Float()

_Arguments = list[tuple[bytes, amp.Argument]]
_Errors = dict[type[Exception], bytes]

#: The failures a question can end with, by code.
_QUESTION_ERRORS: _Errors = {
    AdmissionUnavailable: FAILED,
    Given: CANCELLED,
}


class Connect(amp.Command):
    """``IAdmission.connection(service, client)``; the lease is named ``id``."""

    commandName = b"conn"
    arguments: ClassVar[_Arguments] = [(b"id", _ID), (b"service", _TEXT), (b"client", _CLIENT)]
    # The specific first: AMP codes a failure by the first class it matches.
    errors: ClassVar[_Errors] = {**_QUESTION_ERRORS, OverLimit: OVER_LIMIT}


class UserSession(amp.Command):
    """``IAdmission.user_session(user)``; the lease is named ``id``."""

    commandName = b"user"
    arguments: ClassVar[_Arguments] = [(b"id", _ID), (b"user", _TEXT)]
    errors: ClassVar[_Errors] = {**_QUESTION_ERRORS, TooManySessions: TOO_MANY_SESSIONS}


class LoginTurn(amp.Command):
    """
    ``IAdmission.login_turn(client)``, the turn named ``id``: answered when
    the turn begins, after the client's earlier attempts and its penalty,
    waited out in the parent.
    """

    commandName = b"turn"
    arguments: ClassVar[_Arguments] = [(b"id", _ID), (b"client", _CLIENT)]
    errors: ClassVar[_Errors] = dict(_QUESTION_ERRORS)


class Failed(amp.Command):
    """``ILoginTurn.failed(user)`` of turn ``id``: seconds after its start the -ERR is due."""

    commandName = b"fail"
    arguments: ClassVar[_Arguments] = [(b"id", _ID), (b"user", _TEXT)]
    response: ClassVar[_Arguments] = [(b"due", _SECONDS)]
    errors: ClassVar[_Errors] = dict(_QUESTION_ERRORS)


class Succeeded(amp.Command):
    """``ILoginTurn.succeeded(user)`` of turn ``id``."""

    commandName = b"ok"
    arguments: ClassVar[_Arguments] = [(b"id", _ID), (b"user", _TEXT)]
    requiresAnswer = False


class Release(amp.Command):
    """
    Give back lease or turn ``id``; if the question is still open, give it
    up (a turn's place in line is given to the next attempt).
    """

    commandName = b"rel"
    arguments: ClassVar[_Arguments] = [(b"id", _ID)]
    requiresAnswer = False


__all__ = [
    "AdmissionUnavailable",
    "Connect",
    "Failed",
    "Given",
    "LoginTurn",
    "Release",
    "Succeeded",
    "UserSession",
]
