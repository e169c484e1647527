"""
SASL for POP3 (RFC 5034): the mechanisms popserv ships.

Each mechanism is a pure state machine in its own module; the protocol
drives it (:mod:`popserv.sasl.mechanism` says how) and hands its final
credentials to the ``twisted.cred`` portal.
"""

from popserv.sasl.mechanism import MechanismInfo
from popserv.sasl.plain import Login, Plain

PLAIN = MechanismInfo("PLAIN", Plain, exposes_password=True)
LOGIN = MechanismInfo("LOGIN", Login, exposes_password=True)

#: What a factory offers unless told otherwise: the mechanisms every
#: password checker can verify, whatever scheme stores the password.
DEFAULT_MECHANISMS = (PLAIN, LOGIN)

__all__ = ["DEFAULT_MECHANISMS", "LOGIN", "PLAIN", "MechanismInfo"]
