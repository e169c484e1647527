"""
``popserv probe``'s checks that need sessions of their own: a pipelined
login, UIDLs across sessions, DELE without QUIT, and a wrong password
(its response code and its delay); and the status lines of all of them.
"""

from __future__ import annotations

import time

from popserv.probe.client import Connection, ProbeError
from popserv.probe.registry import Outcome, advertised, check, counted, said, shown
from popserv.probe.report import FAIL, PASS, WARN
from popserv.probe.session import IN_USE_PAUSE, IN_USE_TRIES, LoginRefused, Probe, Skip, unique_ids
from popserv.probe.syntax import code_problem, parse_reply, scan_listing, status_line_problem


@check("pipelining-login")
def pipelining_login(probe: Probe) -> Outcome:
    """
    With PIPELINING: the login, STAT and QUIT in one write, answered in
    order (no QUIT when the server expires retrieved mail).
    """
    if not advertised(probe, "PIPELINING"):
        raise Skip("PIPELINING not offered")
    probe.can_log_in()
    drop = probe.maildrop()
    if probe.session is not None:
        probe.end(probe.session)
        probe.session = None
    password = probe.settings.password
    assert password is not None
    ending = [] if probe.expires() else ["QUIT"]
    for attempt in range(IN_USE_TRIES):
        if attempt:
            time.sleep(IN_USE_PAUSE)
        connection, capa_now = probe.verified_connection()
        login = probe.login_commands(capa_now, connection, password)
        commands = [*login, "STAT", *ending]
        try:
            connection.pipelined(commands)
            replies = [connection.reply(command.split(" ")[0]) for command in commands]
            if ending:
                connection.arriving(min(2.0, probe.settings.timeout))
        finally:
            connection.close()
        refused = next((reply for reply in replies[: len(login)] if not reply.ok), None)
        if refused is None or (refused.code or "").upper() != "IN-USE":
            break
    sent = ", ".join(command.split(" ")[0] for command in commands)
    if refused is not None:
        if (refused.code or "").upper() == "LOGIN-DELAY":
            raise Skip(f"a second login was refused: {shown(str(refused))}")
        return FAIL, f"in one write of {sent}: the login got {shown(str(refused))}"
    stat = replies[len(login)]
    if not said(stat, f"{drop.count} {drop.octets}") or not all(r.ok for r in replies):
        return FAIL, f"in one write of {sent}: STAT or QUIT answered wrong"
    return PASS, f"{sent} in one write: answered in order"


@check("uidl-stable")
def uidl_stable(probe: Probe) -> Outcome:
    """A second session lists the same UIDLs for the same messages, in the same order."""
    probe.can_log_in()
    before = probe.uidl()
    if before is None:
        raise Skip("no UIDL")
    drop = probe.maildrop()
    if probe.session is not None:
        probe.end(probe.session)
        probe.session = None
    second = _second_session(probe)
    try:
        after = unique_ids(second) or []
        reply, lines = second.multi("LIST")
    finally:
        probe.end(second)
    sizes = dict(entry for entry in map(scan_listing, lines) if entry is not None)
    now = {uid: number for number, uid in after}
    missing = [uid for _, uid in before if uid not in now]
    if missing:
        gone = counted(len(missing), "UIDL")
        return FAIL, f"{gone} of the first session not in the second: {shown(missing[0])}"
    order = [now[uid] for _, uid in before]
    if order != sorted(order):
        return FAIL, "the second session lists the messages in another order"
    for number, uid in before:
        if reply.ok and sizes.get(now[uid]) != drop.size(number):
            return (
                FAIL,
                f"UIDL {shown(uid)}: {drop.size(number)} octets, then {sizes.get(now[uid])}",
            )
    new = len(after) - len(before)
    arrived = f"; {counted(new, 'new message')} after them" if new else ""
    return PASS, f"a second session: the same {counted(len(before), 'UIDL')}, sizes, order{arrived}"


def _second_session(probe: Probe) -> Connection:
    try:
        return probe.new_session()
    except LoginRefused as e:
        if e.reply is not None and (e.reply.code or "").upper() == "LOGIN-DELAY":
            raise Skip(f"a second login was refused: {e}") from None
        raise ProbeError(f"a second login was refused: {e}") from None


@check("dele-no-quit")
def dele_no_quit(probe: Probe) -> Outcome:
    """
    With --allow-delete: DELE the last message, hang up without QUIT; a new
    session still has it (RFC 1939 6: no UPDATE state without QUIT).
    """
    if not probe.settings.allow_delete:
        raise Skip("needs --allow-delete")
    probe.can_log_in()
    if probe.session is not None:
        probe.end(probe.session)
        probe.session = None
    session = _second_session(probe)
    found = unique_ids(session)
    if found is None:
        probe.end(session)
        raise Skip("needs UIDL, to find the message again")
    if not found:
        probe.end(session)
        raise Skip("the maildrop is empty")
    number, uid = found[-1]
    reply = session.command(f"DELE {number}")
    session.close()  # no QUIT
    if not reply.ok:
        return FAIL, f"DELE {number} answered {shown(str(reply))}"
    later = _second_session(probe)
    try:
        still = [u for _, u in unique_ids(later) or []]
    finally:
        probe.end(later)
    if uid not in still:
        return (
            FAIL,
            f"message {number} was deleted though the session ended without QUIT (RFC 1939 6)",
        )
    return PASS, f"DELE {number}, then hanging up without QUIT: the next session still has it"


# A wrong password


@check("auth-code")
def auth_code(probe: Probe) -> Outcome:
    """A wrong password gets -ERR, with [AUTH] (RFC 3206) when AUTH-RESP-CODE is offered."""
    failed = probe.failed_login()
    reply = failed.reply
    if reply is None:
        return FAIL, f"the server closed the connection at a wrong password ({failed.method})"
    if reply.ok:
        return FAIL, f"a wrong password was accepted ({failed.method})"
    if (reply.code or "").upper() == "AUTH":
        return PASS, shown(str(reply))
    if advertised(probe, "AUTH-RESP-CODE"):
        return FAIL, f"{shown(str(reply))}: no [AUTH], though AUTH-RESP-CODE is offered (RFC 3206)"
    return WARN, f"{shown(str(reply))}: no [AUTH], so a client cannot tell it from a server fault"


#: A failed login answered sooner than this is a warning.  (Dovecot's
#: auth_failure_delay of 2 s counts in whole seconds: it waits 1 to 2.5 s.)
MIN_FAILURE_DELAY = 0.5


@check("login-delay")
def login_delay(probe: Probe) -> Outcome:
    """A wrong password's -ERR comes after a delay (at least 0.5 s), which slows guessing."""
    failed = probe.failed_login()
    if failed.reply is None or failed.reply.ok:
        raise Skip("see auth-code")
    if failed.seconds >= MIN_FAILURE_DELAY:
        return PASS, f"-ERR after {failed.seconds:.1f} s"
    return WARN, (
        f"-ERR after {failed.seconds:.2f} s: guesses cost nothing (Dovecot and popserv wait 2 s)"
    )


@check("responses")
def responses(probe: Probe) -> Outcome:
    """Every status line seen: +OK or -ERR, CRLF, at most 512 octets; response codes well formed."""
    codes = advertised(probe, "RESP-CODES")
    problems = []
    for command, raw in probe.transcript.lines:
        problem = status_line_problem(raw)
        reply = parse_reply(raw)
        if problem is None and codes and reply is not None:
            problem = code_problem(reply)
        if problem is not None:
            problems.append(f"{command}: {problem}")
    if problems:
        return FAIL, "; ".join(problems[:3]) + (
            f" ({len(problems)} in all)" if len(problems) > 3 else ""
        )
    with_codes = ", response codes well formed" if codes else ""
    return PASS, f"{len(probe.transcript.lines)} status lines: CRLF, at most 512 octets{with_codes}"
