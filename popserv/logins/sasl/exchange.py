"""
The SASL exchange loop (RFC 5034 section 4), without I/O: it drives one
mechanism with the client's answers until it succeeds, fails or runs out
of rounds.  The protocol supplies two coroutines, one that sends a
challenge and returns the client's decoded answer, and one that answers a
mechanism's question to the login layer (:class:`~popserv.logins.sasl.mechanism.Need`,
such as SCRAM's keys); :func:`answer` is that second one for popserv's own
mechanisms, reaching accounts only through the interfaces they provide.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import cast

from popserv.interfaces import IScramKeySource
from popserv.logins.sasl.mechanism import (
    MAX_ROUNDS,
    Asking,
    Mechanism,
    Need,
    SASLAborted,
    SASLMalformed,
    SASLTooManyRounds,
    Success,
)
from popserv.logins.sasl.scram import NeedKeys


async def run(
    exchange: Mechanism,
    response: bytes | None,
    challenge: Callable[[bytes], Awaitable[bytes]],
    ask: Callable[[Need], Awaitable[object]],
) -> Success:
    """
    Step ``exchange`` from the client's initial ``response`` (None: there
    was none) to its :class:`Success`.  Failures of the mechanism propagate
    (an ``AuthFailed`` is a failed login); a cancelled challenge too.
    """
    for _ in range(MAX_ROUNDS):
        step = exchange.step(response)
        while isinstance(step, Need):
            # Only a mechanism that asks has provide().
            step = cast(Asking, exchange).provide(await ask(step))
        if isinstance(step, Success):
            return step
        response = await challenge(step.data)
    raise SASLTooManyRounds()


def answer(need: Need, accounts: object) -> object:
    """
    What the login layer says to ``need``, directly or as a Deferred:
    SCRAM's keys from ``accounts`` as an :class:`IScramKeySource` (None
    when it is not one: the exchange then fails as for an unknown user).
    """
    if isinstance(need, NeedKeys):
        source = IScramKeySource(accounts, None)
        return None if source is None else source.scram_keys(need.username, need.hash_name)
    raise TypeError(f"no answer for {type(need).__name__}")


def decode(line: bytes, initial: bool = False) -> bytes:
    """
    A client's SASL response line, base64-decoded: ``*`` cancels the
    exchange, and an ``initial`` response of ``=`` is an empty one (RFC 5034).
    """
    if line.strip() == b"*":
        raise SASLAborted()
    if initial and line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLMalformed("invalid base64") from None


__all__ = ["answer", "decode", "run"]
