"""
EXTERNAL (RFC 4422 appendix A): the identity is the TLS client certificate
the handshake verified, mapped to a user name by a rule the admin picks.

The client may send an authorization identity: empty means "the one my
certificate maps to"; anything else must be that same name.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from cryptography.x509.oid import NameOID

from popserv.logins.credentials import ExternalCredentials
from popserv.logins.sasl.mechanism import (
    AuthzidRefused,
    ClientFirst,
    SASLContext,
    Step,
    Success,
    split_utf8,
)


class NoIdentity(AuthzidRefused):
    """No verified certificate, or none the rule can turn into a user name."""


def _common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _email(certificate: x509.Certificate) -> str | None:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        addresses = []
    else:
        addresses = san.value.get_values_for_type(x509.RFC822Name)
    if not addresses:
        addresses = [
            str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
        ]
    return addresses[0] if addresses else None


def _email_local_part(certificate: x509.Certificate) -> str | None:
    address = _email(certificate)
    return address.rsplit("@", 1)[0] if address and "@" in address else None


#: How a certificate becomes a user name (``--external-identity``).
RULES: dict[str, Callable[[x509.Certificate], str | None]] = {
    "cn": _common_name,
    "email": _email,
    "email-local": _email_local_part,
}


class External(ClientFirst):
    """One EXTERNAL exchange under ``rule``."""

    def __init__(self, context: SASLContext, rule: str = "cn") -> None:
        super().__init__(context)
        self._certificate = context.client_certificate
        self._rule = RULES[rule]

    def message(self, response: bytes) -> Step:
        if self._certificate is None:
            raise NoIdentity("no verified client certificate")
        identity = self._rule(self._certificate)
        if not identity:
            raise NoIdentity("the client certificate names no user under this rule")
        authzid = split_utf8(response, "authzid")
        if authzid and authzid != identity:
            raise AuthzidRefused("authorization identity differs from the certificate's")
        return Success(ExternalCredentials(identity))


def mechanism(rule: str) -> Callable[[SASLContext], External]:
    """A factory of EXTERNAL exchanges using ``rule`` (a key of :data:`RULES`)."""
    if rule not in RULES:
        raise ValueError(f"unknown identity rule {rule!r}; known: {', '.join(RULES)}")

    def make(context: SASLContext) -> External:
        return External(context, rule)

    return make
