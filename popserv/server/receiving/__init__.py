"""
The optional mail receiver: ESMTP for other mail servers (``--smtp``) and
LMTP for the local MTA (``--lmtp``), delivering into the users' Maildirs.

:mod:`.factory` admits connections and makes sessions; :mod:`.connection`
is a session's input, output and time discipline on Twisted; :mod:`.protocol`
is what the commands mean.  The wire grammar is :mod:`popserv.core.smtpwire`.
"""

from popserv.server.receiving.factory import ReceiverFactory, ReceiverSettings
from popserv.server.receiving.protocol import LMTPProtocol, ReceiverProtocol

__all__ = ["LMTPProtocol", "ReceiverFactory", "ReceiverProtocol", "ReceiverSettings"]
