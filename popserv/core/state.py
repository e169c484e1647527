"""The states of a POP3 session (RFC 1939 section 3)."""

from __future__ import annotations

import enum


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    #: AUTHORIZATION after a USER command, waiting for PASS.
    USER_GIVEN = "USER_GIVEN"
    TRANSACTION = "TRANSACTION"
    #: After QUIT in TRANSACTION, while deletions are applied.
    UPDATE = "UPDATE"


__all__ = ["State"]
