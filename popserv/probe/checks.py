"""
The checks of ``popserv probe``, in the order they run: each a small
function of the :class:`~popserv.probe.session.Probe` that returns a
status and one line of detail, or raises
:class:`~popserv.probe.session.Skip` when it cannot apply (a
:class:`~popserv.probe.client.ProbeError` is a failure).

Severities: ``fail`` where an RFC says MUST (or where a client would
misread the server: wrong sizes, unstuffed dots, a confused pipeline),
``warn`` for advice (RFC SHOULDs, and what operators are told to do:
delay failed logins, no passwords in the clear over a network), ``pass``
otherwise.  docs/probe.rst describes every check.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable

from attrs import frozen

from popserv.probe.client import Closed, Connection, ProbeError, reason, tls_context, tls_facts
from popserv.probe.report import FAIL, PASS, SKIP, WARN, Result
from popserv.probe.session import (
    IN_USE_PAUSE,
    IN_USE_TRIES,
    Capa,
    Certificate,
    LoginRefused,
    NotLoggedIn,
    Probe,
    Skip,
    capa,
    unique_ids,
)
from popserv.probe.syntax import (
    Reply,
    apop_timestamp,
    capa_problems,
    code_problem,
    parse_reply,
    per_user_after_login,
    scan_listing,
    status_line_problem,
    timestamp_problem,
    uidl_problem,
    unique_id_listing,
    unstuffed,
    unstuffed_dots,
)

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


# Before login


@check("greeting")
def greeting(probe: Probe) -> Outcome:
    """+OK, CRLF, at most 512 octets; an APOP timestamp is a msg-id, new on each connection."""
    first = probe.first
    if first is None:
        raise Skip("no first connection")
    problem = status_line_problem(first.greeting_raw)
    if problem is not None:
        return FAIL, f"the greeting {problem}: {shown(first.greeting_raw)!r}"
    reply = first.greeting
    assert reply is not None
    if not reply.ok:
        return FAIL, f"the server refuses sessions: {shown(str(reply))}"
    stamp = apop_timestamp(reply)
    if stamp is None:
        return PASS, f"{shown(str(reply), 50)!r}, no APOP timestamp"
    problem = timestamp_problem(stamp)
    if problem is not None:
        return FAIL, problem
    other = probe.open()
    again = apop_timestamp(other.greeting) if other.greeting else None
    probe.end(other)
    if again == stamp:
        return (
            FAIL,
            f"two connections got the same APOP timestamp {stamp} (RFC 1939 7: it must differ)",
        )
    return PASS, f"APOP timestamp {stamp}, a new one on each connection"


@check("capa")
def capa_before_login(probe: Probe) -> Outcome:
    """CAPA (RFC 2449) on the first connection: multi-line, every line a capability."""
    answer = probe.first_capa()
    if not answer.ok:
        return (
            WARN,
            f"CAPA answered {shown(str(answer.reply))}: clients cannot tell what is offered",
        )
    problems = capa_problems(answer.lines)
    if problems:
        return FAIL, "; ".join(problems[:3])
    implementation = answer.tags.get("IMPLEMENTATION")
    named = f"; IMPLEMENTATION {shown(' '.join(implementation), 30)}" if implementation else ""
    return PASS, answer.shown() + named


@check("cleartext-login")
def cleartext_login(probe: Probe) -> Outcome:
    """
    Before TLS, passwords (USER, SASL PLAIN or LOGIN) are offered only on a
    local connection; and when USER is not offered, USER is refused, before
    any password.
    """
    if probe.target.implicit_tls:
        raise Skip("pop3s://: TLS from the first byte")
    answer = probe.first_capa()
    if not answer.ok:
        raise Skip("no CAPA: the server says nothing of where it takes passwords")
    offered = (["USER"] if answer.has("USER") else []) + [
        f"SASL {name}" for name in answer.sasl() if name in ("PLAIN", "LOGIN")
    ]
    if offered:
        what = " and ".join(offered)
        if probe.is_local(probe.on_first()):
            return PASS, f"{what} offered without TLS, on a local connection"
        if probe.stls_offered():
            return WARN, (
                f"{what} offered before STLS on a network connection: RFC 8314 advises"
                " taking passwords only over TLS"
            )
        return WARN, f"{what} offered, and no STLS: passwords cross the network in the clear"
    connection = probe.open()
    try:
        reply = connection.command("USER popserv-probe")
    finally:
        probe.end(connection)
    if reply.ok:
        return WARN, "CAPA offers no USER before TLS, yet USER was answered +OK (no password sent)"
    return PASS, f"USER not offered before TLS, and refused: {shown(str(reply))}"


@check("stls")
def stls(probe: Probe) -> Outcome:
    """
    STLS (RFC 2595) on pop3://: offered, answered +OK, a handshake; then
    CAPA lists no STLS, and a second STLS is refused.
    """
    if probe.target.implicit_tls:
        raise Skip("pop3s://: TLS from the first byte")
    answer = probe.first_capa()
    if not answer.has("STLS"):
        if probe.settings.starttls:
            return FAIL, "--starttls: the server does not offer STLS"
        return WARN, "no STLS: passwords and mail cross the network in the clear"
    connection = probe.on_first()
    try:
        reply = probe.stls(connection, probe.verifying)
        verified = True
    except ssl.SSLCertVerificationError as e:
        # Go on without checking it, for what sends no password (certificate reports it).
        probe.certificate = Certificate(error=reason(e))
        connection.close()
        connection = probe.first = probe.open()
        reply = probe.stls(connection, probe.trusting)
        verified = False
    except ssl.SSLError as e:
        probe.drop(connection)
        probe.first = None
        return FAIL, f"the TLS handshake after STLS failed: {reason(e)}"
    if not reply.ok:
        return FAIL, f"STLS is offered, but answered {shown(str(reply))}"
    tls = connection.tls
    assert tls is not None
    if verified:
        probe.certificate = Certificate(peer=tls.getpeercert() or {}, tls=tls_facts(tls))
        probe.first_verified = True
    after = probe.capa_tls = capa(connection)
    again = connection.command("STLS")
    if again.ok:
        probe.drop(connection)
        probe.first = None
        return FAIL, "a second STLS, inside TLS, was answered +OK (RFC 2595 4)"
    if after.has("STLS"):
        return WARN, f"{tls_facts(tls)}; CAPA still offers STLS inside TLS"
    return PASS, f"{tls_facts(tls)}; after it, CAPA offers no STLS and STLS is refused"


@check("stls-injection")
def stls_injection(probe: Probe) -> Outcome:
    """
    ``STLS\\r\\nCAPA\\r\\n`` in one write: the CAPA, sent before the
    handshake, must be thrown away, not answered inside TLS (CVE-2011-0411,
    RFC 2595 4, RFC 7457 2.2).
    """
    if probe.target.implicit_tls:
        raise Skip("pop3s://: TLS from the first byte")
    if not probe.stls_offered():
        raise Skip("no STLS")
    connection = probe.open()
    try:
        connection.pipelined(["STLS", "CAPA"])
        reply = connection.reply("STLS")
        if not reply.ok:
            return FAIL, f"STLS answered {shown(str(reply))}"
        quiet = probe.patience()
        early = connection.arriving(quiet)
        if early:
            return FAIL, f"answered the CAPA sent with STLS before the handshake: {shown(early)!r}"
        try:
            tls = connection.start_tls(probe.trusting, probe.target.host)
        except (ssl.SSLError, OSError) as e:
            return PASS, f"the server ended the handshake after the injected CAPA ({reason(e)})"
        late = connection.arriving(quiet)
        if late:
            return FAIL, (
                f"answered inside TLS the CAPA sent in the clear with STLS (CVE-2011-0411):"
                f" {shown(late, 40)!r}"
            )
        return PASS, f"the CAPA sent with STLS was not answered ({tls_facts(tls)})"
    finally:
        probe.end(connection)


@check("certificate")
def certificate(probe: Probe) -> Outcome:
    """The chain verifies (system CAs or --cafile) for the URL's host, for 14 days more at least."""
    needs_tls(probe)
    if probe.certificate is None:
        connection = probe.open(probe.verifying)
        try:
            probe.secure(connection)
        except NotLoggedIn:
            pass
        finally:
            probe.end(connection)
    found = probe.certificate
    if found is None:
        raise Skip("no TLS handshake was made")
    host = probe.target.host
    if found.error is not None:
        hint = "" if probe.settings.cafile else " (a private CA: give it with --cafile)"
        return FAIL, f"does not verify for {host}: {found.error}{hint}"
    days = (ssl.cert_time_to_seconds(found.peer["notAfter"]) - time.time()) / 86400
    subject = _name(found.peer.get("subject", ()), "commonName")
    issuer = _name(found.peer.get("issuer", ()), "organizationName") or _name(
        found.peer.get("issuer", ()), "commonName"
    )
    detail = f"verifies for {host}: {subject} from {issuer}, expires in {days:.0f} days"
    if days < EXPIRY_WARNING_DAYS:
        return WARN, detail + " (renewal is failing?)"
    return PASS, detail


#: Warn when the certificate has fewer days left: renewals (certbot's at 30
#: days, acme.sh's at 30 of 90) have then been failing for weeks.
EXPIRY_WARNING_DAYS = 14


def _name(fields: Iterable[Iterable[tuple[str, str]]], key: str) -> str:
    for rdn in fields:
        for name, value in rdn:
            if name == key:
                return value
    return ""


#: TLS versions, from the oldest.
TLS_VERSIONS = (
    ("1.0", ssl.TLSVersion.TLSv1),
    ("1.1", ssl.TLSVersion.TLSv1_1),
    ("1.2", ssl.TLSVersion.TLSv1_2),
    ("1.3", ssl.TLSVersion.TLSv1_3),
)

#: OpenSSL's reasons for not even trying: this machine cannot offer that version.
_CANNOT_OFFER = (
    "NO_PROTOCOLS_AVAILABLE",
    "NO_CIPHERS_AVAILABLE",
    "NO_SUITABLE_SIGNATURE_ALGORITHM",
)


def tls_version(probe: Probe, label: str, version: ssl.TLSVersion) -> tuple[bool, str]:
    """Whether a handshake offering only ``version`` succeeds, and its facts or why not."""

    def attempt() -> tuple[bool, str]:
        needs_tls(probe)
        try:
            context = tls_context(verify=False, version=version)
        except (ValueError, ssl.SSLError) as e:
            raise Skip(f"this machine's OpenSSL cannot offer TLS {label} ({reason(e)})") from None
        connection: Connection | None = None
        try:
            if probe.target.implicit_tls:
                connection = probe.open(context)
            else:
                connection = probe.open()
                reply = probe.stls(connection, context)
                if not reply.ok:
                    raise ProbeError(f"STLS answered {shown(str(reply))}")
            tls = connection.tls
            assert tls is not None
            return True, tls_facts(tls)
        except ssl.SSLError as e:
            if e.reason in _CANNOT_OFFER:
                raise Skip(f"this machine's OpenSSL cannot offer TLS {label}") from None
            return False, reason(e)
        except (Closed, ConnectionError) as e:
            return False, str(e)
        except TimeoutError:
            return False, "no answer to the handshake"
        finally:
            if connection is not None:
                if connection.tls is None:
                    connection.close()
                else:
                    probe.end(connection)

    return probe.memo(f"tls-{label}", attempt)


def _old_tls(label: str, version: ssl.TLSVersion) -> Callable[[Probe], Outcome]:
    def old(probe: Probe) -> Outcome:
        """A handshake offering only this old version must fail (RFC 8996)."""
        accepted, detail = tls_version(probe, label, version)
        if accepted:
            return FAIL, f"accepted ({detail}): RFC 8996 forbids TLS {label}"
        return PASS, f"refused ({detail})"

    return old


for _label, _version in TLS_VERSIONS[:2]:
    check(f"tls-{_label}")(_old_tls(_label, _version))


@check("tls-1.2")
def tls_1_2(probe: Probe) -> Outcome:
    """A handshake offering only TLS 1.2: either way is fine (a server may want 1.3)."""
    accepted, detail = tls_version(probe, "1.2", ssl.TLSVersion.TLSv1_2)
    if accepted:
        return PASS, f"accepted ({detail})"
    return PASS, f"refused ({detail}): TLS 1.3 only, if tls-1.3 passes"


@check("tls-1.3")
def tls_1_3(probe: Probe) -> Outcome:
    """A handshake offering only TLS 1.3: accepted (RFC 9325), or at least TLS 1.2 is."""
    accepted, detail = tls_version(probe, "1.3", ssl.TLSVersion.TLSv1_3)
    if accepted:
        return PASS, f"accepted ({detail})"
    try:
        older, _ = tls_version(probe, "1.2", ssl.TLSVersion.TLSv1_2)
    except Skip:
        older = False
    if not older:
        return FAIL, f"refused ({detail}), and TLS 1.2 too: no client can connect"
    return WARN, f"refused ({detail}): RFC 9325 advises offering TLS 1.3"


#: What a server must refuse before login: (command, how bad a +OK is,
#: whether a +OK brings data).  An unknown command and those of the
#: TRANSACTION state must get -ERR; USER without a name is merely lenient.
_BAD_BEFORE_LOGIN = (
    ("XYZZY", FAIL, False),
    ("STAT", FAIL, False),
    ("LIST", FAIL, True),
    ("RETR 1", FAIL, True),
    ("USER", WARN, False),
)


@check("errors-before-login")
def errors_before_login(probe: Probe) -> Outcome:
    """
    An unknown command, TRANSACTION commands and USER with no name get
    -ERR, and the session goes on (CAPA after each is answered).
    """
    connection = probe.open()
    try:
        going_on = _capa_reply if probe.first_capa().ok else None
        return _refusals(probe, connection, list(_BAD_BEFORE_LOGIN), going_on)
    finally:
        probe.end(connection)


def _capa_reply(connection: Connection) -> Reply:
    return capa(connection).reply


def _noop_reply(connection: Connection) -> Reply:
    return connection.command("NOOP")


def _refusals(
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


def counted(count: int, thing: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{count} {thing}" if count == 1 else f"{count} {thing}s"


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
        ("STAT", lambda c: _is(c.reply("STAT"), f"{drop.count} {drop.octets}")),
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
    expected.append(("STAT", lambda c: _is(c.reply("STAT"), f"{drop.count} {drop.octets}")))
    commands = [command for command, _ in expected]
    session.pipelined(commands)
    for index, (command, answered_right) in enumerate(expected):
        if not answered_right(session):
            probe.drop(session)
            sent = ", ".join(commands)
            return FAIL, f"in one write of {sent}: answer {index + 1}, to {command}, is wrong"
    return PASS, f"{', '.join(commands)} in one write: answered in order"


def _is(reply: Reply, text: str) -> bool:
    """+OK whose first words are ``text`` (RFC 1939 allows more after them)."""
    words = text.split(" ")
    return reply.ok and reply.text.split(" ")[: len(words)] == words


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
    status, detail = _refusals(probe, session, list(_BAD_AFTER_LOGIN), _noop_reply)
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
        ("stat", lambda r: _is(r, f"{drop.count} {drop.octets}")),
    ]
    if drop.count:
        number, size = drop.listing[0]
        answers.append((f"List {number}", lambda r: _is(r, f"{number} {size}")))
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
            ("STAT", lambda: _is(session.command("STAT"), f"{number - 1} {drop.octets - size}")),
            (f"LIST {number}", lambda: not session.command(f"LIST {number}").ok),
            (f"RETR {number}", lambda: not session.command(f"RETR {number}").ok),
            (f"DELE {number} again", lambda: not session.command(f"DELE {number}").ok),
            (f"UIDL {number}", lambda: uids is None or not session.command(f"UIDL {number}").ok),
            ("LIST", lambda: _listing_after(session) == list(drop.listing[:-1])),
            ("RSET", lambda: session.command("RSET").ok),
            ("STAT after RSET", lambda: _is(session.command("STAT"), f"{number} {drop.octets}")),
            (
                f"LIST {number} after RSET",
                lambda: _is(session.command(f"LIST {number}"), f"{number} {size}"),
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
    if not _is(stat, f"{drop.count} {drop.octets}") or not all(r.ok for r in replies):
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


def names() -> list[str]:
    return [one.name for one in CHECKS]


__all__ = ["CHECKS", "Check", "check", "names", "run_check"]
