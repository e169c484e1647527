"""
popserv: a POP3 server for Twisted.

The public API: the factory and its policy, the store interfaces, the stores
and realms that ship, the password-file checker, and the service builder
that ``twistd popserv`` runs.  The modules behind it are free to change.
"""

from popserv._version import __version__
from popserv.compat import TwistedMailRealm
from popserv.interfaces import (
    IAccountSettings,
    IMailbox,
    ISecretInventory,
    ISessionInfo,
    Listing,
)
from popserv.layout import Layout
from popserv.maildir import MaildirMailbox, deliver
from popserv.memory import MemoryMaildrop, MemoryRealm
from popserv.passwords import PasswdFile, PasswdFileChecker
from popserv.policy import Policy
from popserv.protocol import POP3Factory, POP3Protocol
from popserv.realm import MaildirRealm
from popserv.service import make_factory, makeService

__all__ = [
    "__version__",
    # The server
    "POP3Factory",
    "POP3Protocol",
    "Policy",
    "makeService",
    "make_factory",
    # What a store provides
    "IMailbox",
    "Listing",
    "IAccountSettings",
    "ISessionInfo",
    "ISecretInventory",
    # Stores and realms
    "Layout",
    "MaildirMailbox",
    "MaildirRealm",
    "MemoryMaildrop",
    "MemoryRealm",
    "TwistedMailRealm",
    "deliver",
    # Logins
    "PasswdFile",
    "PasswdFileChecker",
]
