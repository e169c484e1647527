"""
The line an operator reads for each POP3 session, like Dovecot's "Logged
out" line: who, from where, over TLS or not, how they logged in, what they
retrieved and deleted, what is left, and how the session ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from popserv.core.state import State
from popserv.core.usernames import loggable_username

if TYPE_CHECKING:
    from popserv.server.protocol import POP3Protocol

LOGGED_OUT = (
    "Logged out {user} from {peer} ({tls}, {mechanism}): "
    "top={top}/{top_octets}, retr={retr}/{retr_octets}, "
    "del={deleted}/{deleted_octets}, left={left}/{left_octets}, "
    "sent={sent}, {duration} s, {ended}"
)
#: A session that saw only the newest messages (``--max-listed``) says how many.
LOGGED_OUT_LISTED = LOGGED_OUT.replace(
    "left={left}/{left_octets}, ", "left={left}/{left_octets}, listed={listed}, "
)
NO_LOGIN = (
    "Disconnected {peer} ({tls}) before login: {ended}, {failures} failed logins, {duration} s"
)


def session_summary(protocol: POP3Protocol, now: float) -> tuple[str, dict[str, Any]] | None:
    """
    The summary of a session that ended at ``now``, as a log format and its
    fields (each a bounded, escaped value); None for a connection never
    admitted, whose refusal was logged instead.
    """
    session = getattr(protocol, "session", None)
    if session is None:
        return None
    ended = session.ended or protocol.ended or "disconnected"
    if session.state is State.UPDATE and session.ended is None:
        ended = "disconnected during QUIT"
    fields: dict[str, Any] = {
        "peer": protocol.info.where,
        "tls": "TLS" if protocol.info.secure else "no TLS",
        "ended": ended,
        "duration": round(now - protocol.started, 1),
        "sent": protocol.octets_sent,
    }
    if protocol.logged_in_as is None:
        return NO_LOGIN, {"failures": session.failures, **fields}
    tally = session.tally
    capped = {"listed": tally.listed} if tally.listed else {}
    return LOGGED_OUT_LISTED if capped else LOGGED_OUT, {
        "user": loggable_username(protocol.logged_in_as),
        "mechanism": session.mechanism,
        "top": tally.top,
        "top_octets": tally.top_octets,
        "retr": tally.retr,
        "retr_octets": tally.retr_octets,
        "deleted": tally.deleted,
        "deleted_octets": tally.deleted_octets,
        "left": tally.left,
        "left_octets": tally.left_octets,
        **capped,
        **fields,
    }


def log_summary(log: Logger, summary: tuple[str, dict[str, Any]] | None) -> None:
    """
    Log a summary line (of either protocol) at info level.  The text is made
    here with ``str.format``, many times faster than the logger's own
    formatting of fifteen fields; the fields still go with the event, for
    ``--log-format json``.
    """
    if summary is not None:
        template, fields = summary
        log.info("{summary}", summary=template.format(**fields), **fields)


__all__ = ["LOGGED_OUT", "LOGGED_OUT_LISTED", "NO_LOGIN", "log_summary", "session_summary"]
