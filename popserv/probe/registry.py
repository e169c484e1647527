"""
The frame of ``popserv probe``'s checks: how one is declared (:func:`check`,
which also fixes the order they run in), run (:func:`run_check`: whatever
goes wrong becomes its result) and named, and what several of them ask of
the CAPA answers seen.  The checks themselves are in
:mod:`~popserv.probe.beforelogin`, :mod:`~popserv.probe.loggedin` and
:mod:`~popserv.probe.othersessions`; :mod:`~popserv.probe.checks` has them all.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from attrs import frozen

from popserv.probe.client import Closed, Connection, ProbeError, reason
from popserv.probe.report import FAIL, PASS, SKIP, WARN, Result
from popserv.probe.session import Capa, Probe, Skip
from popserv.probe.syntax import Reply

Outcome = tuple[str, str]


@frozen
class Check:
    """A check: its name (as the table and ``--skip`` show it) and its function."""

    name: str
    run: Callable[[Probe], Outcome]


#: Every check, in the order they run.
CHECKS: list[Check] = []


def check(name: str) -> Callable[[Callable[[Probe], Outcome]], Callable[[Probe], Outcome]]:
    def register(function: Callable[[Probe], Outcome]) -> Callable[[Probe], Outcome]:
        CHECKS.append(Check(name, function))
        return function

    return register


def shown(text: str | bytes, limit: int = 60) -> str:
    """``text`` for a detail line: decoded, cut at ``limit`` characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.rstrip("\r\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_check(probe: Probe, one: Check) -> Result:
    """Run one check; whatever goes wrong becomes its result, never an exception."""
    try:
        status, detail = one.run(probe)
    except Skip as e:
        status, detail = SKIP, str(e)
    except ProbeError as e:
        probe.drop(probe.session)
        status, detail = FAIL, str(e)
    except (ssl.SSLError, OSError) as e:
        probe.drop(probe.session)
        status, detail = FAIL, reason(e)
    except Exception as e:
        probe.drop(probe.session)
        status, detail = (
            FAIL,
            f"the probe itself failed ({type(e).__name__}: {e}); please report it",
        )
    return Result(one.name, status, detail)


def latest_capa(probe: Probe) -> Capa | None:
    """The CAPA answer that was current before login: after STLS, or the first."""
    return probe.capa_tls or probe.capa_first


def advertised(probe: Probe, tag: str) -> bool:
    """Any CAPA answer (before TLS, after it, after login) listed ``tag``."""
    answers = (probe.capa_first, probe.capa_tls, probe.capa_login)
    return any(answer is not None and answer.has(tag) for answer in answers)


def needs_tls(probe: Probe) -> None:
    if not probe.target.implicit_tls and not probe.stls_offered():
        raise Skip("the server offers no TLS here (no STLS)")


def noop_reply(connection: Connection) -> Reply:
    return connection.command("NOOP")


def refusals(
    probe: Probe,
    connection: Connection,
    commands: list[tuple[str, str, bool]],
    going_on: Callable[[Connection], Reply] | None,
) -> Outcome:
    """
    Send each command, which must get -ERR (a +OK is a failure or a
    warning, as given, and its data is read when it has some); after each,
    ``going_on`` (CAPA, NOOP) must get +OK, so that servers that hang up
    on many bad commands in a row (Dovecot's pop3-login at the fourth) see none
    in a row.
    """
    wrong: list[tuple[str, str]] = []
    for command, severity, multi in commands:
        try:
            reply = connection.command(command)
            if reply.ok:
                wrong.append((severity, f"{command!r}: {shown(str(reply), 30)}"))
                if multi:
                    connection.data()
            after = going_on(connection) if going_on is not None else None
        except Closed:
            probe.drop(connection)
            return FAIL, f"the server closed the connection at {command!r}"
        if after is not None and not after.ok:
            probe.drop(connection)
            return FAIL, f"after {command!r}, the session did not go on: {shown(str(after))}"
    names = ", ".join(repr(command) for command, _, _ in commands[:5])
    if len(commands) > 5:
        names += f" ... ({len(commands)} commands)"
    if wrong:
        status = FAIL if any(severity == FAIL for severity, _ in wrong) else WARN
        return status, "answered +OK: " + "; ".join(text for _, text in wrong)
    return PASS, f"-ERR to {names}; the session went on"


def said(reply: Reply, text: str) -> bool:
    """+OK whose first words are ``text`` (RFC 1939 allows more after them)."""
    words = text.split(" ")
    return reply.ok and reply.text.split(" ")[: len(words)] == words


def counted(count: int, thing: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{count} {thing}" if count == 1 else f"{count} {thing}s"


def names() -> list[str]:
    return [one.name for one in CHECKS]
