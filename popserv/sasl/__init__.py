"""
SASL for POP3 (RFC 5034): the mechanisms popserv ships.

Each mechanism is a pure state machine in its own module; the protocol
drives it (:mod:`popserv.sasl.mechanism` says how) and hands its final
credentials to the ``twisted.cred`` portal.
"""

from popserv.sasl.crammd5 import CramMD5
from popserv.sasl.mechanism import MechanismInfo
from popserv.sasl.plain import Login, Plain

PLAIN = MechanismInfo("PLAIN", Plain, exposes_password=True)
LOGIN = MechanismInfo("LOGIN", Login, exposes_password=True)
CRAM_MD5 = MechanismInfo("CRAM-MD5", CramMD5, challenge_response=True, requires="cram-md5")

#: Every mechanism popserv has, in the order CAPA lists them.
MECHANISMS = (CRAM_MD5, PLAIN, LOGIN)

__all__ = ["CRAM_MD5", "LOGIN", "MECHANISMS", "PLAIN", "MechanismInfo"]
