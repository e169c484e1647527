"""
popserv: a POP3 server for Twisted.

The public API: the factory and its policy, the store interfaces, the stores
and realms that ship, the password-file checker, and the service builder
that ``twistd popserv`` runs.  The modules behind it are free to change.

Names are imported when first used, so that ``import popserv.wire`` (the
pure core: wire, body, errors, lang, usernames, maildrop) needs no Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from popserv._version import __version__

#: Each public name and the module it lives in.
_EXPORTS = {
    # The server
    "POP3Factory": "popserv.protocol",
    "POP3Protocol": "popserv.protocol",
    "Policy": "popserv.policy",
    "makeService": "popserv.service",
    "make_factory": "popserv.service",
    # What a store provides
    "IMailbox": "popserv.interfaces",
    "Listing": "popserv.interfaces",
    "IAccountSettings": "popserv.interfaces",
    "ISessionInfo": "popserv.interfaces",
    "ISecretInventory": "popserv.interfaces",
    # Stores and realms
    "Layout": "popserv.layout",
    "MaildirMailbox": "popserv.maildir",
    "MaildirRealm": "popserv.realm",
    "MemoryMaildrop": "popserv.memory",
    "MemoryRealm": "popserv.memory",
    "TwistedMailRealm": "popserv.compat",
    "deliver": "popserv.maildir",
    # Logins
    "PasswdFile": "popserv.passwords",
    "PasswdFileChecker": "popserv.passwords",
}

__all__ = [
    "__version__",
    "POP3Factory",
    "POP3Protocol",
    "Policy",
    "makeService",
    "make_factory",
    "IMailbox",
    "Listing",
    "IAccountSettings",
    "ISessionInfo",
    "ISecretInventory",
    "Layout",
    "MaildirMailbox",
    "MaildirRealm",
    "MemoryMaildrop",
    "MemoryRealm",
    "TwistedMailRealm",
    "deliver",
    "PasswdFile",
    "PasswdFileChecker",
]

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'popserv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
