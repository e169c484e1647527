"""
What the server offers, in one place: the CAPA answer (RFC 2449), whether
greetings carry an APOP timestamp, and which SASL mechanisms (RFC 5034)
are enabled server-wide and offered on one connection.

The answers depend on the policy, on what the portal can check
(``listCredentialsInterfaces``) and on what the factory's ``accounts``
say about the accounts (``ISecretInventory``, ``IScramKeySource``): curl
uses APOP whenever the greeting has a timestamp and CRAM-MD5 whenever it
is listed, and cannot fall back, so nothing is offered that some account
could not pass.  Every function reads the factory or session it is given
at the moment it is asked, so a policy changed at run time is followed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.cred.credentials import IUsernameHashedPassword

from popserv.core.state import State
from popserv.interfaces import IScramKeySource, ISecretInventory
from popserv.logins.accounts import capability_lines
from popserv.logins.credentials import IOAuthTokenCredentials, IScramCredentials
from popserv.logins.sasl.mechanism import MechanismInfo

if TYPE_CHECKING:
    from popserv.server.factory import POP3Factory
    from popserv.server.protocol import POP3Protocol

#: Something that adds lines to the CAPA answer of a session.
CapabilitySource = Callable[["POP3Protocol"], Iterable[str]]


def core_capabilities(session: POP3Protocol) -> list[str]:
    """
    The capabilities of RFC 1939, 2449 and 2595: ``USER`` only where a
    password may be sent, ``STLS`` only before TLS and login.
    """
    lines = ["TOP"]
    if session.cleartext_login_allowed():
        lines.append("USER")
    lines += ["UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "UTF8 USER", "LANG"]
    if session.stls_offered():
        lines.append("STLS")
    if session.state is State.TRANSACTION:
        lines += capability_lines(session.account)
    else:
        announced = session.factory.announcement()
        lines += capability_lines(announced, per_user=announced.per_user)
    lines.append(f"IMPLEMENTATION {session.factory.policy.implementation}")
    return lines


def sasl_capability(session: POP3Protocol) -> list[str]:
    """``SASL`` with the mechanisms this connection offers, before login (RFC 5034)."""
    if session.state is State.TRANSACTION:
        return []
    names = [m.name for m in offered_mechanisms(session)]
    return ["SASL " + " ".join(names)] if names else []


def apop_offered(factory: POP3Factory) -> bool:
    """
    Whether greetings carry an APOP timestamp.

    Decided by the policy when it says; otherwise APOP is offered when the
    portal takes ``IUsernameHashedPassword`` credentials and the accounts,
    if they can tell (:class:`ISecretInventory`), have at least one that
    APOP could log in.
    """
    if factory.policy.apop is not None:
        return factory.policy.apop
    return coverage(factory, "apop") != "none"


def enabled_mechanisms(factory: POP3Factory) -> list[MechanismInfo]:
    """The SASL mechanisms the policy enables (see :attr:`Policy.sasl`)."""
    chosen = factory.policy.sasl
    if chosen is not None:
        return [m for m in factory.sasl if m.name in chosen]
    asking = factory.tls is not None and factory.tls.config.client_ca is not None
    tokens = IOAuthTokenCredentials in _credential_kinds(factory)
    # One coverage question per kind, not per mechanism (-PLUS twins share one).
    kinds = {m.requires for m in factory.sasl if m.requires is not None}
    everyone = {kind for kind in kinds if coverage(factory, kind) == "all"}
    return [
        m
        for m in factory.sasl
        if (m.requires is None or m.requires in everyone)
        and (asking or not m.needs_client_certificate)
        and (tokens or not m.needs_token_checker)
    ]


def offered_mechanisms(session: POP3Protocol) -> list[MechanismInfo]:
    """The SASL mechanisms this connection may use, in the server's order of preference."""
    info = session.info
    tls = info.tls
    certified = tls is not None and tls.client_certificate is not None
    bound = tls is not None and bool(tls.channel_bindings)
    cleartext, apop = session.cleartext_login_allowed(), session.apop_allowed()
    return [
        m
        for m in enabled_mechanisms(session.factory)
        if (info.secure or not m.needs_tls)
        and (bound or not m.needs_channel_binding)
        and (certified or not m.needs_client_certificate)
        and (cleartext or not m.exposes_password)
        and (apop or not m.challenge_response)
    ]


def coverage(factory: POP3Factory, kind: str) -> str:
    """
    How many accounts could pass ``kind`` of challenge-response login:
    ``"none"`` when the portal takes no credentials of its kind
    (``IScramCredentials`` for SCRAM, which also needs an
    :class:`IScramKeySource` among the factory's ``accounts``;
    ``IUsernameHashedPassword`` otherwise), else what ``accounts`` says as
    an :class:`ISecretInventory`, or ``"all"`` when it cannot tell.
    """
    scram = kind.startswith("scram-")
    wanted = IScramCredentials if scram else IUsernameHashedPassword
    if wanted not in _credential_kinds(factory):
        return "none"
    if scram and IScramKeySource(factory.accounts, None) is None:
        return "none"
    inventory = ISecretInventory(factory.accounts, None)
    return "all" if inventory is None else inventory.coverage(kind)


def _credential_kinds(factory: POP3Factory) -> list[Any]:
    """The credentials interfaces the portal can check."""
    return list(factory.portal.listCredentialsInterfaces())


__all__ = [
    "CapabilitySource",
    "apop_offered",
    "core_capabilities",
    "coverage",
    "enabled_mechanisms",
    "offered_mechanisms",
    "sasl_capability",
]
