"""
Build the popserv service from options: what ``twistd popserv`` runs, and
what an application embedding popserv may call.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.cred.portal import Portal
from twisted.internet.endpoints import serverFromString

from popserv.accounts import AccountSettings
from popserv.firstrun import announce, bootstrap
from popserv.layout import Layout
from popserv.passwords import PasswdFile, PasswdFileChecker
from popserv.policy import Policy
from popserv.protocol import POP3Factory
from popserv.realm import MaildirRealm
from popserv.tap import DEFAULT_POP3_ENDPOINT, Options


def make_factory(options: Mapping[str, Any], reactor: Any = None) -> POP3Factory:
    """The POP3 factory for ``options`` (the keys of :class:`popserv.tap.Options`)."""
    if reactor is None:
        from twisted.internet import reactor
    layout = Layout.create(options["data"], options.get("passwd"), options.get("maildir"))
    hostname = options.get("hostname") or socket.getfqdn()
    if not options.get("passwd"):
        account = bootstrap(layout, hostname)
        if account is not None:
            announce(account, (options.get("pop3") or [DEFAULT_POP3_ENDPOINT])[0])
    passwd = PasswdFile(layout.passwd_path)
    defaults = AccountSettings(options.get("login-delay", 0), options.get("expire"))
    realm = MaildirRealm(layout, passwd, defaults, reactor=reactor)
    portal = Portal(realm, [PasswdFileChecker(passwd, reactor=reactor)])
    policy = Policy(
        hostname=hostname,
        idle_timeout=options.get("idle-timeout", 600.0),
        auth_failure_delay=options.get("auth-failure-delay", 2.0),
        max_auth_failures=options.get("max-auth-failures", 3),
        account=defaults,
        apop=options.get("apop"),
    )
    return POP3Factory(portal, policy, clock=reactor, announce=realm.announcement)


def makeService(options: Mapping[str, Any]) -> MultiService:
    """One listening service per ``--pop3`` endpoint, all sharing one factory."""
    from twisted.internet import reactor

    factory = make_factory(options, reactor)
    top = MultiService()
    for description in options.get("pop3") or [DEFAULT_POP3_ENDPOINT]:
        endpoint = serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    return top


__all__ = ["Options", "makeService", "make_factory"]
