"""
The line an operator reads for each SMTP or LMTP session, the receiver's
counterpart of the POP3 "Logged out" line (:mod:`popserv.server.summary`):
which client, over TLS or not, what it called itself, how many messages
and recipients were taken or refused, the octets taken, how long it lasted
and how it ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attrs import define
from twisted.internet.interfaces import ISSLTransport

from popserv.core.wire import loggable

if TYPE_CHECKING:
    from popserv.server.receiving.connection import ReceiverConnection

SESSION_ENDED = (
    "{service} session from {peer} ended ({tls}, helo {helo}): "
    "messages={accepted}/{octets}, refused={refused}, "
    "rcpt={recipients}, rcpt_refused={recipients_refused}, {duration} s, {ended}"
)


@define
class ReceiverTally:
    """What one receiving session did, counted as it goes."""

    #: Messages stored for at least one recipient, and their octets (as received).
    accepted: int = 0
    octets: int = 0
    #: Messages ended by DATA but stored for no one (too big, refused, failed).
    refused: int = 0
    #: RCPT commands, and those answered 250 (the others were refused).
    rcpt_commands: int = 0
    recipients: int = 0


def receiver_summary(session: ReceiverConnection, now: float) -> tuple[str, dict[str, Any]] | None:
    """
    The summary of a receiving session that ended at ``now``, as a log
    format and its fields (client text escaped); None for a connection
    never admitted, whose refusal was logged instead.
    """
    if session.started is None:
        return None
    tally = session.tally
    helo = getattr(session, "_helo", None)
    secure = session.startedTLS or ISSLTransport.providedBy(session.transport)
    return SESSION_ENDED, {
        "service": session.factory.service.upper(),
        "peer": session.peer,
        "tls": "TLS" if secure else "no TLS",
        # Twisted's SMTP sets (None, host) before any HELO.
        "helo": loggable(helo[0] if helo else None, 128),
        "accepted": tally.accepted,
        "octets": tally.octets,
        "refused": tally.refused,
        "recipients": tally.recipients,
        "recipients_refused": tally.rcpt_commands - tally.recipients,
        "duration": round(now - session.started, 1),
        "ended": session.ended or "disconnected",
    }


__all__ = ["SESSION_ENDED", "ReceiverTally", "receiver_summary"]
