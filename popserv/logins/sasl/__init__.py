"""
SASL for POP3 (RFC 5034): the mechanisms popserv ships.

Each mechanism is a pure state machine in its own module; the protocol
drives it (:mod:`popserv.logins.sasl.mechanism` says how) and hands its final
credentials to the ``twisted.cred`` portal.
"""

from popserv.logins.sasl import external
from popserv.logins.sasl.crammd5 import CramMD5
from popserv.logins.sasl.mechanism import MechanismInfo
from popserv.logins.sasl.oauth import OAuthBearer, XOAuth2
from popserv.logins.sasl.plain import Login, Plain
from popserv.logins.sasl.scram import mechanism as scram

PLAIN = MechanismInfo("PLAIN", Plain, exposes_password=True)
LOGIN = MechanismInfo("LOGIN", Login, exposes_password=True)
CRAM_MD5 = MechanismInfo("CRAM-MD5", CramMD5, challenge_response=True, requires="cram-md5")


def _scram(hash_name: str, plus: bool) -> MechanismInfo:
    name = f"SCRAM-{hash_name}" + ("-PLUS" if plus else "")
    requires = f"scram-{hash_name.lower()}"
    return MechanismInfo(
        name,
        scram(hash_name, plus),
        challenge_response=True,
        needs_tls=plus,
        needs_channel_binding=plus,
        requires=requires,
    )


SCRAM_SHA_256_PLUS = _scram("SHA-256", plus=True)
SCRAM_SHA_256 = _scram("SHA-256", plus=False)
SCRAM_SHA_1_PLUS = _scram("SHA-1", plus=True)
SCRAM_SHA_1 = _scram("SHA-1", plus=False)


def external_mechanism(rule: str = "cn") -> MechanismInfo:
    """EXTERNAL with the certificate-to-user ``rule`` (see popserv.logins.sasl.external.RULES)."""
    return MechanismInfo(
        "EXTERNAL", external.mechanism(rule), needs_tls=True, needs_client_certificate=True
    )


EXTERNAL = external_mechanism()
OAUTHBEARER = MechanismInfo(
    "OAUTHBEARER", OAuthBearer, exposes_password=True, needs_token_checker=True
)
XOAUTH2 = MechanismInfo("XOAUTH2", XOAuth2, exposes_password=True, needs_token_checker=True)

#: Every mechanism popserv has, in the order CAPA lists them (strongest first).
MECHANISMS = (
    EXTERNAL,
    SCRAM_SHA_256_PLUS,
    SCRAM_SHA_256,
    SCRAM_SHA_1_PLUS,
    SCRAM_SHA_1,
    CRAM_MD5,
    PLAIN,
    LOGIN,
    OAUTHBEARER,
    XOAUTH2,
)

__all__ = [
    "CRAM_MD5",
    "EXTERNAL",
    "LOGIN",
    "MECHANISMS",
    "OAUTHBEARER",
    "XOAUTH2",
    "PLAIN",
    "SCRAM_SHA_1",
    "SCRAM_SHA_1_PLUS",
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "MechanismInfo",
    "external_mechanism",
]
