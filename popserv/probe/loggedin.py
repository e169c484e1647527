"""
``popserv probe``'s checks of a logged-in session: CAPA after login,
STAT and LIST against what RETR sends, byte-stuffing, TOP, UIDL,
pipelining, errors, lowercase commands, DELE then RSET, and QUIT.
"""

from __future__ import annotations

from collections.abc import Callable

from popserv.probe.client import Connection, tls_facts
from popserv.probe.registry import (
    Outcome,
    advertised,
    check,
    counted,
    latest_capa,
    noop_reply,
    refusals,
    said,
    shown,
)
from popserv.probe.report import FAIL, PASS, WARN
from popserv.probe.session import LoginRefused, Probe, Skip
from popserv.probe.syntax import (
    Reply,
    capa_problems,
    per_user_after_login,
    scan_listing,
    uidl_problem,
    unique_id_listing,
    unstuffed,
    unstuffed_dots,
)

# Logged in


@check("login")
def login(probe: Probe) -> Outcome:
    """The URL's user logs in: USER/PASS, or SASL PLAIN when USER is not offered."""
    try:
        session = probe.transaction()
    except LoginRefused as e:
        code = (e.reply.code or "").upper() if e.reply is not None else ""
        if code in ("IN-USE", "LOGIN-DELAY", "SYS/TEMP"):
            return WARN, f"could not log in now: {e}; the checks that need a login are skipped"
        return FAIL, str(e)
    tls = session.tls
    via = f"over {tls_facts(tls)}" if tls is not None else "without TLS"
    if tls is not None and not probe.target.implicit_tls:
        via += " (STLS)"
    return PASS, f"{probe.login_method} {via}"


@check("capa-login")
def capa_after_login(probe: Probe) -> Outcome:
    """CAPA works after login too (RFC 2449), and offers no STLS."""
    probe.transaction()
    answer = probe.capa_login
    assert answer is not None
    if not answer.ok:
        first = latest_capa(probe)
        if first is not None and first.ok:
            return FAIL, f"CAPA after login answered {shown(str(answer.reply))} (RFC 2449 5)"
        raise Skip("no CAPA")
    problems = capa_problems(answer.lines)
    if problems:
        return FAIL, "; ".join(problems[:3])
    if answer.has("STLS"):
        return WARN, f"offers STLS after login, where it is not allowed: {answer.shown()}"
    per_user = per_user_after_login(answer.lines)
    if per_user:
        return WARN, f"{', '.join(per_user)} after login, which should give the user's value"
    return PASS, answer.shown()


@check("stat-list")
def stat_list(probe: Probe) -> Outcome:
    """STAT and LIST agree: count, total octets, numbers 1 to n; LIST n answers the same."""
    drop = probe.maildrop()
    numbers = [number for number, _ in drop.listing]
    if numbers != list(range(1, len(numbers) + 1)):
        return FAIL, f"LIST numbers the messages {shown(str(numbers), 40)}, not 1 to {len(numbers)}"
    if len(numbers) != drop.count:
        return FAIL, f"STAT says {counted(drop.count, 'message')}, LIST lists {len(numbers)}"
    total = sum(size for _, size in drop.listing)
    if total != drop.octets:
        return FAIL, f"STAT says {drop.octets} octets, LIST's sizes add up to {total}"
    session = probe.transaction()
    for number in sorted({1, drop.count}) if drop.count else ():
        reply = session.command(f"LIST {number}")
        if not reply.ok or scan_listing(reply.text.encode()) != (number, drop.size(number)):
            return (
                FAIL,
                f"LIST {number} answered {shown(str(reply))}, not +OK {number} {drop.size(number)}",
            )
    return PASS, f"{counted(drop.count, 'message')}, {drop.octets} octets; LIST agrees"


@check("list-sizes")
def list_sizes(probe: Probe) -> Outcome:
    """
    RETR sends exactly as many octets as LIST said, counted with CRLF line
    ends and without byte-stuffing (RFC 1939 11), for the first --retrieve
    messages no bigger than --max-size.
    """
    numbers = _retrievable(probe)
    drop = probe.maildrop()
    wrong = []
    octets = 0
    for number in numbers:
        got = len(unstuffed(probe.retrieve(number)))
        octets += got
        if got != drop.size(number):
            wrong.append((number, drop.size(number), got))
    if not wrong:
        return (
            PASS,
            f"RETR of {counted(len(numbers), 'message')} ({octets} octets) sent what LIST said",
        )
    shown_wrong = "; ".join(
        f"message {n}: LIST {listed}, RETR {got}" for n, listed, got in wrong[:3]
    )
    if all(got == listed + 2 for _, listed, got in wrong):
        return WARN, (
            f"{shown_wrong}: 2 octets more, as when a message lacks a last line end that the"
            " server adds but does not count"
        )
    return FAIL, shown_wrong


def _retrievable(probe: Probe) -> list[int]:
    drop = probe.maildrop()
    if not drop.count:
        raise Skip("the maildrop is empty")
    numbers = probe.to_retrieve()
    if not numbers:
        raise Skip(f"the first messages are all over --max-size ({probe.settings.max_size} octets)")
    return numbers


@check("byte-stuffing")
def byte_stuffing(probe: Probe) -> Outcome:
    """A message line that begins with '.' is sent with another '.' in front (RFC 1939 3)."""
    numbers = _retrievable(probe)
    stuffed = bare = 0
    where = []
    for number in numbers:
        more, wrong = unstuffed_dots(probe.retrieve(number))
        stuffed += more
        bare += wrong
        if wrong:
            where.append(str(number))
    if bare:
        return FAIL, f"{_lines(bare)} beginning with '.' not stuffed, in message {', '.join(where)}"
    if not stuffed:
        raise Skip(f"none of the {len(numbers)} messages retrieved has a line beginning with '.'")
    return PASS, f"{_lines(stuffed)} beginning with '.', all stuffed"


def _lines(count: int) -> str:
    return counted(count, "line")


@check("top")
def top(probe: Probe) -> Outcome:
    """
    TOP n 0 sends the header and the blank line, and TOP n 3 three body
    lines more, exactly as RETR sent them, for each message retrieved.
    """
    numbers = _retrievable(probe)
    session = probe.transaction()
    for number in numbers:
        whole = probe.retrieve(number)
        header = whole[: whole.index(b"") + 1] if b"" in whole else whole
        for lines in (0, 3):
            reply, sent = session.multi(f"TOP {number} {lines}")
            if not reply.ok and advertised(probe, "TOP"):
                return (
                    FAIL,
                    f"TOP is offered, but TOP {number} {lines} answered {shown(str(reply))}",
                )
            if not reply.ok:
                raise Skip(f"TOP not offered (TOP {number} 0 answered {shown(str(reply), 30)})")
            expected = whole[: len(header) + lines]
            probe.check_not_cut(session, f"TOP {number} {lines}", sent, len(unstuffed(expected)))
            if sent != expected:
                return FAIL, (
                    f"TOP {number} {lines} sent {_lines(len(sent))}, not the first"
                    f" {len(expected)} that RETR sent (the header, the blank line, {lines} more)"
                )
    messages = counted(len(numbers), "message")
    return PASS, f"TOP n 0 and TOP n 3 of {messages} sent the start of RETR's"


@check("uidl")
def uidl(probe: Probe) -> Outcome:
    """UIDL: 1-70 characters of 0x21-0x7E each, unique, one per message; UIDL n agrees."""
    found = probe.uidl()
    if found is None:
        if advertised(probe, "UIDL"):
            return FAIL, "UIDL is offered, but answered -ERR"
        return WARN, "UIDL answered -ERR: clients cannot tell which messages they already have"
    drop = probe.maildrop()
    if [n for n, _ in found] != [n for n, _ in drop.listing]:
        return FAIL, f"UIDL lists {counted(len(found), 'message')}, LIST {len(drop.listing)}"
    for number, uid in found:
        problem = uidl_problem(uid)
        if problem is not None:
            return FAIL, f"message {number}'s UIDL {shown(uid, 40)!r} {problem}"
    uids = [uid for _, uid in found]
    if len(set(uids)) != len(uids):
        repeated = next(uid for uid in uids if uids.count(uid) > 1)
        return FAIL, f"UIDL {shown(repeated, 40)!r} is given to more than one message"
    session = probe.transaction()
    for number in sorted({1, len(found)}) if found else ():
        reply = session.command(f"UIDL {number}")
        if not reply.ok or unique_id_listing(reply.text.encode()) != found[number - 1]:
            return FAIL, f"UIDL {number} answered {shown(str(reply))}, not what UIDL listed"
    return PASS, f"{counted(len(uids), 'UIDL')}, unique, 1-70 characters of 0x21-0x7E"


@check("pipelining")
def pipelining(probe: Probe) -> Outcome:
    """With PIPELINING: several commands in one write are all answered, in order, as one by one."""
    if not advertised(probe, "PIPELINING"):
        raise Skip("PIPELINING not offered")
    session = probe.transaction()
    drop = probe.maildrop()
    expected: list[tuple[str, Callable[[Connection], bool]]] = [
        ("STAT", lambda c: said(c.reply("STAT"), f"{drop.count} {drop.octets}")),
        ("LIST", lambda c: _listing(c, "LIST") == [f"{n} {s}".encode() for n, s in drop.listing]),
        ("NOOP", lambda c: c.reply("NOOP").ok),
    ]
    uids = probe.uidl()
    if uids is not None:
        expected.append(("UIDL", lambda c: _listing(c, "UIDL") == [b"%d %s" % u for u in uids]))
    small = [n for n in probe.retrieved if drop.size(n) <= 65536]
    if small:
        lines = probe.retrieved[small[0]]
        expected.append((f"RETR {small[0]}", lambda c: _listing(c, "RETR") == lines))
    expected.append(("STAT", lambda c: said(c.reply("STAT"), f"{drop.count} {drop.octets}")))
    commands = [command for command, _ in expected]
    session.pipelined(commands)
    for index, (command, answered_right) in enumerate(expected):
        if not answered_right(session):
            probe.drop(session)
            sent = ", ".join(commands)
            return FAIL, f"in one write of {sent}: answer {index + 1}, to {command}, is wrong"
    return PASS, f"{', '.join(commands)} in one write: answered in order"


def _listing(connection: Connection, command: str) -> list[bytes] | None:
    reply = connection.reply(command)
    return connection.data() if reply.ok else None


#: What a server must refuse after login: (command, how bad a +OK is, whether
#: a +OK brings data).  TOP without its line count is merely lenient.
_BAD_AFTER_LOGIN = (
    ("XYZZY", FAIL, False),
    ("LIST 0", FAIL, False),
    ("LIST 99999999", FAIL, False),
    ("LIST -1", FAIL, False),
    ("RETR abc", FAIL, True),
    ("RETR", FAIL, True),
    ("RETR 99999999", FAIL, True),
    ("TOP 1", WARN, True),
    ("UIDL 0", FAIL, False),
    ("STLS", FAIL, False),
)


@check("errors-after-login")
def errors_after_login(probe: Probe) -> Outcome:
    """
    An unknown command, message numbers out of range or not numbers,
    missing arguments, STLS: one -ERR line each, and the session goes on
    (NOOP after each gets +OK).
    """
    session = probe.transaction()
    status, detail = refusals(probe, session, list(_BAD_AFTER_LOGIN), noop_reply)
    if status != PASS:
        probe.drop(session)
    return status, detail


@check("lowercase")
def lowercase(probe: Probe) -> Outcome:
    """Keywords in lower or mixed case work as in upper case (RFC 1939 3)."""
    session = probe.transaction()
    drop = probe.maildrop()
    wrong = []
    answers: list[tuple[str, Callable[[Reply], bool]]] = [
        ("noop", lambda r: r.ok),
        ("stat", lambda r: said(r, f"{drop.count} {drop.octets}")),
    ]
    if drop.count:
        number, size = drop.listing[0]
        answers.append((f"List {number}", lambda r: said(r, f"{number} {size}")))
    for command, right in answers:
        reply = session.command(command)
        if not right(reply):
            wrong.append(f"{command!r}: {shown(str(reply), 30)}")
    if wrong:
        return FAIL, "answered otherwise than in upper case: " + "; ".join(wrong)
    return PASS, ", ".join(repr(command) for command, _ in answers) + " answered as in upper case"


@check("dele-rset")
def dele_rset(probe: Probe) -> Outcome:
    """
    With --allow-delete: DELE hides the last message from STAT, LIST, RETR
    and UIDL; RSET brings it back (nothing is deleted).
    """
    if not probe.settings.allow_delete:
        raise Skip("needs --allow-delete")
    session = probe.transaction()
    drop = probe.maildrop()
    if not drop.count:
        raise Skip("the maildrop is empty")
    number, size = drop.count, drop.size(drop.count)
    uids = probe.uidl()
    restored = False
    try:
        steps: list[tuple[str, Callable[[], bool]]] = [
            (f"DELE {number}", lambda: session.command(f"DELE {number}").ok),
            ("STAT", lambda: said(session.command("STAT"), f"{number - 1} {drop.octets - size}")),
            (f"LIST {number}", lambda: not session.command(f"LIST {number}").ok),
            (f"RETR {number}", lambda: not session.command(f"RETR {number}").ok),
            (f"DELE {number} again", lambda: not session.command(f"DELE {number}").ok),
            (f"UIDL {number}", lambda: uids is None or not session.command(f"UIDL {number}").ok),
            ("LIST", lambda: _listing_after(session) == list(drop.listing[:-1])),
            ("RSET", lambda: session.command("RSET").ok),
            ("STAT after RSET", lambda: said(session.command("STAT"), f"{number} {drop.octets}")),
            (
                f"LIST {number} after RSET",
                lambda: said(session.command(f"LIST {number}"), f"{number} {size}"),
            ),
        ]
        for name, right in steps:
            if not right():
                return FAIL, f"{name} answered wrong after DELE {number} (see docs/probe.rst)"
        restored = True
    finally:
        if not restored:
            probe.drop(session)  # hung up without QUIT: the DELE is not applied
    return PASS, f"DELE {number} hid it from STAT, LIST, RETR and UIDL; RSET brought it back"


def _listing_after(session: Connection) -> list[tuple[int, int]]:
    reply, lines = session.multi("LIST")
    return [entry for entry in map(scan_listing, lines) if entry is not None] if reply.ok else []


@check("quit")
def quit_session(probe: Probe) -> Outcome:
    """QUIT (no DELE pending) answers +OK, and the server closes the connection."""
    session = probe.transaction()
    if probe.expires():
        probe.drop(session)
        raise Skip(
            "the server expires retrieved mail (EXPIRE): the session was ended without QUIT,"
            " so that nothing is removed"
        )
    reply = session.command("QUIT")
    after = session.arriving(min(5.0, probe.settings.timeout))
    closed = session.closed
    probe.drop(session)
    if not reply.ok:
        return FAIL, f"QUIT answered {shown(str(reply))}"
    if after:
        return FAIL, f"sent {shown(after, 40)!r} after the +OK to QUIT"
    if not closed:
        return FAIL, "the connection was still open 5 s after QUIT (RFC 1939 6)"
    return PASS, f"{shown(str(reply), 40)!r}, then the server closed the connection"
