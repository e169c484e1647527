"""
``popserv probe``'s checks before login: the greeting and its APOP
timestamp, CAPA, cleartext logins, STLS and its command injection, the
certificate and TLS versions, and what must be refused before login.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable

from popserv.probe.client import Closed, Connection, ProbeError, reason, tls_context, tls_facts
from popserv.probe.registry import Outcome, check, needs_tls, refusals, shown
from popserv.probe.report import FAIL, PASS, WARN
from popserv.probe.session import Certificate, NotLoggedIn, Probe, Skip, capa
from popserv.probe.syntax import (
    Reply,
    apop_timestamp,
    capa_problems,
    status_line_problem,
    timestamp_problem,
)

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
        return refusals(probe, connection, list(_BAD_BEFORE_LOGIN), going_on)
    finally:
        probe.end(connection)


def _capa_reply(connection: Connection) -> Reply:
    return capa(connection).reply
