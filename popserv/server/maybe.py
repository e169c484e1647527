"""
Values that may or may not be Deferreds: IMailbox and the cred interfaces
let an implementation answer either way, and popserv answers at once when
it can, so a short session never waits a reactor turn for nothing.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


async def resolve(value: T | Deferred[T]) -> T:
    """Await a value that may or may not be a Deferred."""
    if isinstance(value, Deferred):
        return await value
    return value


def fired(waiting: Deferred[Any]) -> tuple[Any, BaseException | None]:
    """
    The outcome of a Deferred that has already fired, taken out of it:
    ``(result, None)``, or ``(None, exception)`` when it failed.
    """
    box: list[Any] = []
    waiting.addBoth(box.append)
    outcome = box[0]
    if isinstance(outcome, Failure):
        return None, outcome.value
    return outcome, None


__all__ = ["fired", "resolve"]
