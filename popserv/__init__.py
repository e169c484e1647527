"""
popserv: a POP3 server for Twisted.

The public API: the factory and its policy, the store interfaces, the stores
and realms that ship, the password-file checker, and the service builder
that ``twistd popserv`` runs.  The modules behind it are free to change.

The modules sit in four layers: ``popserv.core`` (the pure core: the wire
grammar, bodies, errors, user names, a session's view of its maildrop),
``popserv.logins``, ``popserv.stores`` and ``popserv.server``.  Names are
imported when first used, so that ``import popserv.core.wire`` (or any
module of the core) needs no Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from popserv._version import __version__

#: Each public name and the module it lives in.
_EXPORTS = {
    # The server
    "POP3Factory": "popserv.server.factory",
    "POP3Protocol": "popserv.server.protocol",
    "Policy": "popserv.server.policy",
    "makeService": "popserv.server.service",
    "make_factory": "popserv.server.service",
    # What a store provides
    "IMailbox": "popserv.interfaces",
    "IChunkSource": "popserv.interfaces",
    "Listing": "popserv.interfaces",
    "IAccountSettings": "popserv.interfaces",
    "ISessionInfo": "popserv.interfaces",
    "ISecretInventory": "popserv.interfaces",
    # Stores and realms
    "Layout": "popserv.stores.layout",
    "MaildirMailbox": "popserv.stores.maildir",
    "MaildirRealm": "popserv.stores.realm",
    "MemoryMaildrop": "popserv.stores.memory",
    "MemoryRealm": "popserv.stores.memory",
    "TwistedMailRealm": "popserv.stores.compat",
    "deliver": "popserv.stores.maildir",
    # Logins
    "PasswdFile": "popserv.logins.passwords",
    "PasswdFileChecker": "popserv.logins.passwords",
}

__all__ = [
    "__version__",
    "POP3Factory",
    "POP3Protocol",
    "Policy",
    "makeService",
    "make_factory",
    "IMailbox",
    "IChunkSource",
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
    from popserv.interfaces import (
        IAccountSettings,
        IChunkSource,
        IMailbox,
        ISecretInventory,
        ISessionInfo,
        Listing,
    )
    from popserv.logins.passwords import PasswdFile, PasswdFileChecker
    from popserv.server.factory import POP3Factory
    from popserv.server.policy import Policy
    from popserv.server.protocol import POP3Protocol
    from popserv.server.service import make_factory, makeService
    from popserv.stores.compat import TwistedMailRealm
    from popserv.stores.layout import Layout
    from popserv.stores.maildir import MaildirMailbox, deliver
    from popserv.stores.memory import MemoryMaildrop, MemoryRealm
    from popserv.stores.realm import MaildirRealm


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'popserv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
